"""Examples are tests: every ```python block of README.md and docs/*.md runs as written, on its own, in a fresh
process started in an empty directory (a block that cannot run here is fenced as something else and says
why). One test per block, named by file and line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> dict[str, str]:
    """"file:line" -> the code of each ```python block."""
    found = {}
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found[f"{document.relative_to(ROOT)}:{line}"] = match.group(1)
    return found


def test_the_documents_hold_examples():
    names = blocks()
    assert sum(name.startswith("README.md") for name in names) >= 12
    assert {name.split(":")[0] for name in names} >= {str(d.relative_to(ROOT)) for d in DOCUMENTS}


@pytest.mark.parametrize("name", sorted(blocks()))
def test_the_example_runs_as_written(name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SCALEFORMER_CACHE": str(tmp_path / "cache"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", blocks()[name]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
