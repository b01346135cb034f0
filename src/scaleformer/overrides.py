"""Dotted overrides: change any option of a config (or of a reproduction's settings) from the command line.

    layers[*].mixer.window=64            every layer's mixer
    layers[1::2].ffn={"kind": "moe", "expert": {"ffn_dim": 512}}   every second layer, from the second
    position.base=500000                 a nested config's field
    moe.routing.experts=8                the same on a flat preset

A path is names joined by dots, each name optionally followed by selectors: ``[i]`` (negative counts from
the end), ``[*]`` (every item) or a slice ``[start:stop:step]``. It is applied to the config's plain data
(``to_dict()``), which is then read back like a config file, so every value is checked as in a file and
an error names the path with a did-you-mean. Values are JSON when they parse (``64``, ``true``,
``{"kind": "moe"}``), else strings. Torch-free: the CLI parses them before importing anything heavy.
"""

from __future__ import annotations

import json
import re
from typing import Any

from scaleformer.config import ConfigError, closest_match

__all__ = ["parse_options", "apply_overrides", "is_path"]

_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\]]*\])*)")
_SELECTOR = re.compile(r"\[([^\]]*)\]")

Step = str | int | slice


def parse_options(options: tuple[str, ...] | list[str], what: str = "model option") -> dict[str, Any]:
    """("layers=4", "position.base=500000") -> {"layers": 4, "position.base": 500000}: JSON values when
    they parse, else strings; each path checked for form here."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {option!r} is not KEY=VALUE")
        steps(key)
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def is_path(key: str) -> bool:
    """Whether ``key`` reaches below the top level (a dot or a selector)."""
    return "." in key or "[" in key


def steps(path: str) -> list[Step]:
    """``layers[1::2].ffn`` -> ["layers", slice(1, None, 2), "ffn"]."""
    out: list[Step] = []
    for part in path.split("."):
        match = _NAME.fullmatch(part)
        if match is None:
            raise ConfigError(f"`{path}` is not a path of the form name, name.sub, name[i], name[*] or name[a:b:c]")
        out.append(match.group(1))
        out.extend(_selector(text, path) for text in _SELECTOR.findall(match.group(2)))
    return out


def _selector(text: str, path: str) -> int | slice:
    text = text.strip()
    if text == "*":
        return slice(None)
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or parts[2:] == [0]:
                raise ValueError
            return slice(*parts)
        return int(text)
    except ValueError:
        raise ConfigError(f"`[{text}]` in `{path}` is not an index, [*] or a slice [start:stop:step]") from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` (plain config data) with each path set to its value, in order; the input is not changed."""
    for path, value in overrides.items():
        data = _set(data, steps(path), value, "")
    return data


def _set(node: Any, rest: list[Step], value: Any, here: str) -> Any:
    if not rest:
        return value
    step, rest = rest[0], rest[1:]
    if isinstance(step, str):
        where = f"{here}.{step}" if here else step
        if not isinstance(node, dict):
            raise ConfigError(f"`{here}` is {node!r}, which has no option `{step}`"
                              + (": give the whole object, e.g. " f"{here}={{...}}" if node is None else ""))
        if step in ("family", "kind") and step in node:
            raise ConfigError(f"`{where}` says which component this is; to change it give the whole object, e.g. "
                              f"{here or 'the config'}={{\"kind\": ...}} with its options")
        if step not in node:
            names = [k for k in node if k not in ("family", "kind")]
            listed = f"; options: {', '.join(names)}" if len(names) <= 12 else ""
            raise ConfigError(f"unknown option `{step}`{closest_match(step, names)}{listed}", here or None)
        return {**node, step: _set(node[step], rest, value, where)}
    if not isinstance(node, list):
        raise ConfigError(f"`{here}` is {node!r}, not a list: it takes no [index]"
                          + (" (a flat preset counts its layers; a model with a list of layers is needed)"
                             if here.endswith("layers") and isinstance(node, int) else ""))
    if isinstance(step, int):
        if not -len(node) <= step < len(node):
            raise ConfigError(f"index {step} is out of range: `{here}` has {len(node)} items")
        chosen = [step % len(node)]
    else:
        chosen = list(range(len(node)))[step]
        if not chosen:
            raise ConfigError(f"[{step.start or ''}:{step.stop or ''}:{step.step or ''}] selects none of the "
                              f"{len(node)} items of `{here}`")
    out = list(node)
    for index in chosen:
        out[index] = _set(out[index], rest, value, f"{here}[{index}]")
    return out
