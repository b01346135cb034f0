"""``trainer.json``: the trainer's state in a checkpoint directory (step, the run's settings, the optimizer's
manifest and, for a sharded checkpoint, its shards), read and checked in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaleformer.files import read_json_object

__all__ = ["MAX_TRAINER_JSON_BYTES", "trainer_state"]

MAX_TRAINER_JSON_BYTES = 16 << 20  # far above any real trainer.json: a bigger file is not one of ours


def trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, checked (a ``ValueError`` naming the file when it is damaged)."""
    file = path / "trainer.json"
    state = read_json_object(file, "the trainer state", MAX_TRAINER_JSON_BYTES)
    if not (isinstance(state.get("step"), int) and state["step"] >= 0 and isinstance(state.get("train"), dict)
            and isinstance(state.get("optimizer"), dict)):
        raise ValueError(f"{file}: not a trainer state (an object with step, train and optimizer)")
    return state
