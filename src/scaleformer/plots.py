"""The two things every plot of the package needs: pyplot on a file backend, and a figure saved to PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); one clear ImportError without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'scaleformer[plot]'") from None
    return plt


def save(figure: Any, path: Path) -> Path:
    """Write ``figure`` as a PNG and close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    print(f"wrote {path}")
    return path
