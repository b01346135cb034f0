"""Write the golden files: ``python -m tests.golden.make_golden`` (from the repository root).

It writes the cases that have no files yet (a new preset, a new option) and leaves the others: the files
that exist are the reference ``test_golden.py`` holds the model code to. Each case is a directory ``tests/golden/data/<case>/`` with the
model (``sf.save``: config.json + model.safetensors, fixed seed) and ``expected.safetensors`` (inputs and
outputs in float32, and in float64 for the cases in ``FLOAT64``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

import scaleformer as sf
from tests.golden.cases import FLOAT64, cases, compute, inputs

ROOT = Path(__file__).parent / "data"


def main() -> None:
    """Write the files of every case that has none; the files that exist are never rewritten (they pin
    what older code computed). Delete a case's directory to pin it anew."""
    data = inputs()
    written = []
    for name, cfg in sorted(cases().items()):
        if (ROOT / name).exists():
            continue
        torch.manual_seed(zlib.crc32(name.encode()))  # a case's weights do not depend on which others exist
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
        written.append(name)
    print(f"wrote {len(written)} new golden cases to {ROOT}: {', '.join(written) or 'none'}")


if __name__ == "__main__":
    main()
