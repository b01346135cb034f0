"""A small lm-eval task that ships with the package and needs no download: ``scaleformer_demo``, twenty
multiple-choice completions in the style of the built-in corpus (Python and its documentation). It shows the
lm-eval path end to end, offline; it is far too small to rank models (a 95% interval spans about ±0.2).
``scaleformer lm-eval`` adds this folder to lm-eval's task path."""

from __future__ import annotations

from pathlib import Path

#: the folder lm-eval is given with --include_path
TASKS = Path(__file__).parent
