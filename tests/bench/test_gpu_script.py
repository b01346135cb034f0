"""Issue 39's prepared GPU run, checked on the CPU: ``bench kernels`` (every Triton kernel against its float64
reference) passes and catches a wrong kernel, and ``benchmarks/gpu/run_all.sh dry`` runs every step's code
path at tiny sizes with the kernels under Triton's interpreter (about a minute on 2 cores). In the Triton
tier: the interpreter must be set before triton is imported."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scaleformer.cli import main

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_is_within_its_tolerance_and_a_wrong_one_is_caught(tmp_path, monkeypatch, capsys):
    from scaleformer.bench.kernels import cases

    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--size", "tiny", "--device", "cpu", "--dtypes", "float32",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == set(cases()) and all(r["ok"] for r in rows)
    assert all(r["error"] < 1e-5 for r in rows)  # the interpreter's float32: far inside the 1e-4 tolerance
    # the gradients are checked too: every case has out and at least q, k, v
    assert all({"out", "dq", "dk", "dv"} <= {r["tensor"] for r in rows if r["case"] == case} for case in cases())

    retention_op = sys.modules["scaleformer.ops.retention"]  # (the package's `retention` is the function)
    kernel = retention_op._triton_retention

    def off_by_a_little(*args, **kwargs):  # a kernel whose output is 0.1% of its scale wrong
        out, state = kernel(*args, **kwargs)
        return out + 1e-3 * out.detach().abs().max(), state

    monkeypatch.setattr(retention_op, "_triton_retention", off_by_a_little)
    assert main(["bench", "kernels", "--size", "tiny", "--device", "cpu", "--dtypes", "float32",
                 "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    failed = {(r["case"], r["tensor"]) for r in rows if not r["ok"]}
    assert failed and all(case.startswith("retention") and tensor == "out" for case, tensor in failed)
    assert "FAILED" in capsys.readouterr().out


def test_the_prepared_gpu_run_goes_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "dry"], env=env, capture_output=True,
                            text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:] + result.stderr[-2000:]
    steps = ["environment", "kernels", "retention-head", "retention-gated", "delta", "sparse", "train-gpt",
             "train-retnet", "train-gdn"]
    assert all(f"-- {step}: exit 0" in summary for step in steps), summary
    with tarfile.open(tmp_path / "issue39-results.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
        assert {f"{step}.log" for step in steps} <= names
        assert {"kernels.json", "retention-head.json", "delta.json", "sparse.json", "train-gdn.json"} <= names
        kernels = json.load(archive.extractfile("./kernels.json"))
    assert kernels["failed"] == 0
    assert set(os.listdir(tmp_path)) == {"summary.txt", "issue39-results.tar.gz"}  # within the device's 8 files
    bad = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "everything"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
