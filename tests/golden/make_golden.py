"""Write the golden files: ``python -m tests.golden.make_golden`` (from the repository root).

Run it only to pin behaviour that is meant to change; the files it writes are the reference that
``test_golden.py`` holds the model code to. Each case is a directory ``tests/golden/data/<case>/`` with the
model (``sf.save``: config.json + model.safetensors, fixed seed) and ``expected.safetensors`` (inputs and
outputs in float32, and in float64 for the cases in ``FLOAT64``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import scaleformer as sf
from tests.golden.cases import FLOAT64, cases, compute, inputs

ROOT = Path(__file__).parent / "data"


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    data = inputs()
    for index, (name, cfg) in enumerate(sorted(cases().items())):
        torch.manual_seed(index)
        model = sf.build(cfg).eval()
        with torch.no_grad():  # non-trivial norm weights and biases (fresh ones are exactly 1 and 0)
            for param_name, param in model.named_parameters():
                if param.dim() == 1:
                    param.add_(0.1 * torch.randn_like(param))
        sf.save(model, ROOT / name)
        expected = {f"input/{key}": value for key, value in data.items()}
        expected.update({f"float32/{key}": value for key, value in compute(model, cfg, data).items()})
        if name in FLOAT64:
            expected.update({f"float64/{key}": value for key, value in compute(model.double(), cfg, data).items()})
        save_file(expected, str(ROOT / name / "expected.safetensors"))
    print(f"wrote {len(cases())} golden cases to {ROOT}")


if __name__ == "__main__":
    main()
