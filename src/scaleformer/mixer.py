"""What a token mixer is, as configuration: the open union every layer's ``mixer`` accepts.

A mixer is a :class:`MixerConfig` subclass with a ``kind`` (it registers itself when its class is
defined), which declares what it supports (:class:`MixerSupport`), checks what it needs of the model,
builds its module, and gives small examples of itself for the conformance suite. The built-in ones live in
:mod:`scaleformer.models.architecture` and in the layer files that define their own (every module of
:mod:`scaleformer.layers` is imported when the architecture is, so a mixer added as one layer file is
found without an edit elsewhere). Torch-free.

The module a mixer builds is called as ``module(x, ctx, cache)`` and makes its own decoding state
(``new_state()``, a dataclass of tensors, or None). A recurrent mixer may also offer a compiled decoding
step (:mod:`scaleformer.compiled_decoding`) with two methods: ``decode_step(x, positions, state) ->
(out, state)`` for one token per row, tensor operations only, where ``state`` is the tuple of its state
dataclass's fields in order; and ``empty_decode_state(batch, dtype, device)``, that tuple for a layer that
has read nothing. The conformance suite checks the step against the module's own forward for every
mixer that has one, and a model with a mixer that has none is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from scaleformer.config import ConfigBase

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MixerSupport", "MixerConfig", "RECURRENT_FORMS"]


@dataclass(frozen=True)
class MixerSupport:
    """What a mixer can be combined with. The model checks every layer against its mixer's declaration and
    refuses any other combination with one ConfigError naming the layer and the option: an option a mixer
    cannot honour is an error, never silently ignored."""

    #: runs without a causal mask (an encoder's layers); False: causal only
    bidirectional: bool = True
    #: Sub-LN's norm before the output projection (MAGNETO)
    inner_norm: bool = True
    #: per-modality copies of its projections (Multiway scope "all", BEiT-3)
    multiway: bool = True
    #: reads the model's rotary (RoPE/xPos) positions; False: it carries its own (a decay, a rotation of
    #: its own), and the model's rotary and relative positions do not reach it
    model_positions: bool = True
    #: adds a T5 relative position bias to its scores (one table for the model)
    relative_bias: bool = True
    #: the forms a call may choose for it (``model(ids, form=...)``): all agree; () for one way of running
    forms: tuple[str, ...] = ()


#: a linear recurrence's three equal forms: every token against every earlier one, chunk by chunk, token by token
RECURRENT_FORMS = ("parallel", "chunkwise", "recurrent")


class MixerConfig(ConfigBase):
    """A token mixer: one member of the open union a layer's ``mixer`` accepts. A subclass with a ``kind``
    registers itself (a mixer defined outside the package too), declares what it supports
    (:attr:`support`), checks what it needs of the model (:meth:`check_model`), builds its module, and
    gives small examples of itself for the conformance suite (:meth:`examples`)."""

    _members: ClassVar[dict[str, type["MixerConfig"]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            known = MixerConfig._members.get(kind)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(f"mixer kind {kind!r} is taken by {known.__module__}.{known.__qualname__}")
            MixerConfig._members[kind] = cls

    @classmethod
    def members(cls) -> tuple[type["MixerConfig"], ...]:
        """Every registered mixer config class, in registration order."""
        return tuple(MixerConfig._members.values())

    @classmethod
    def named(cls, kind: str) -> type["MixerConfig"]:
        """The registered mixer config class of ``kind`` (a KeyError names the known ones)."""
        if kind not in MixerConfig._members:
            raise KeyError(f"no mixer of kind {kind!r}; known: {', '.join(MixerConfig._members)}")
        return MixerConfig._members[kind]

    @property
    def support(self) -> MixerSupport:
        return MixerSupport()

    @property
    def title(self) -> str:
        """The mixer as errors name it: its class's ``TITLE``, or "<kind> mixer"."""
        return getattr(type(self), "TITLE", None) or f"{self.kind} mixer"

    def rotated_heads(self) -> int | None:
        """How many heads it rotates with the model's RoPE/xPos (their width is embed_dim / this), or None."""
        return None

    def check_model(self, model: ConfigBase) -> None:
        """What this mixer needs of ``model`` (the ModelConfig it is in: widths its heads divide, ...): a
        ConfigError if not."""

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> nn.Module:
        """The layer's module in ``model`` (a ModelConfig): ``gain`` is DeepNorm's β or Sub-LN's γ for its
        output projections, ``inner_norm`` and ``ways`` are asked only where :attr:`support` allows them,
        ``depth`` is the layer's index from 1."""
        raise NotImplementedError(f"{type(self).__name__} does not build a module")

    def build_stage(self, model: ConfigBase) -> tuple[str, "nn.Module"] | None:
        """A module the stack runs once before the first layer of a run of this mixer, and its attribute
        name; None (the default) for none. It computes what those layers share and hands it to them as a
        context feature: ``stage(x, ctx, state) -> ctx.with_feature(...)``, with ``stage.new_state()``
        its decoding state (kept in ``cache.stages[name]``). YOCO's cross-decoder projects its one set of
        keys and values this way. When no layer from the stage on keeps a state of its own, a call that
        needs only the last tokens' outputs runs those layers on the last tokens alone."""
        return None

    @classmethod
    def examples(cls) -> dict[str, tuple["MixerConfig", ...]]:
        """Small models using this mixer (width 16), one per pattern it has: each a tuple of the mixers of
        its layers. The conformance suite (tests/models/test_mixer_contract.py) checks every one."""
        raise NotImplementedError(f"{cls.__name__} gives no examples(): the conformance suite needs at least one")
