"""Sequence-parallel dilated attention over 2 and 4 CPU processes (gloo) equals the single process."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.parallel import sp_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    # T = 32: with 2 ranks n = 16 (w=8 local, w=16 local, w=32 spans 2); with 4 ranks n = 8 (w=16, 32 span).
    "causal": dict(length=32, heads=4, segments=(8, 16, 32), rates=(1, 2, 4), causal=True, fp64=False),
    "bidirectional": dict(length=32, heads=3, segments=(8, 16, 32), rates=(1, 2, 4), causal=False, fp64=False),
    # Rates that do not divide the shard, a segment longer than the sequence, fp64.
    "ragged_fp64": dict(length=48, heads=5, segments=(12, 24, 96), rates=(1, 3, 5), causal=True, fp64=True),
    # Segments spanning a number of ranks that does not divide the world: w = 3n on 4 ranks (T = 32, n = 8)
    # and w = 2n on 3 ranks (T = 48, n = 16). The last segment is the sequence's partial tail.
    "span_3_of_4": dict(length=32, heads=3, segments=(8, 24), rates=(1, 2), causal=True, fp64=True),
    "span_2_of_3_bidirectional": dict(length=48, heads=3, segments=(16, 32), rates=(1, 3), causal=False, fp64=True),
}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_equals_single_process(case, world, tmp_path):
    spec = CASES[case]
    if spec["length"] % world or any(min(w, spec["length"]) % (spec["length"] // world) and
                                     (spec["length"] // world) % min(w, spec["length"])
                                     for w in spec["segments"]):
        pytest.skip("segments do not tile the shards for this world size")
    out = tmp_path / "errors.pt"
    mp.spawn(sp_worker.run, args=(world, _free_port(), spec, str(out)), nprocs=world, join=True)
    results = torch.load(out)
    tol = 1e-10 if spec["fp64"] else 1e-5
    errors = results[:, :4]  # output, dq, dk, dv relative errors per rank
    assert (errors <= tol).all(), errors
    sent, gathered = results[:, 4], results[:, 5]
    # Exactly the sparse rows: per pattern spanning `span` ranks, each rank sends its L = ceil(n / r) rows per
    # head of k and v to span - 1 peers three times (forward all-gather, the backward's re-gather instead of
    # keeping the gathered rows, backward reduce-scatter) and holds span·L rows after each all-gather.
    n, elem = spec["length"] // world, 8 if spec["fp64"] else 4
    expected_sent, expected_gathered = torch.zeros(world, dtype=sent.dtype), torch.zeros(world, dtype=sent.dtype)
    for w, r in zip(spec["segments"], spec["rates"]):
        w = min(w, spec["length"])
        if w > n:
            span, rows_bytes = w // n, 2 * 2 * spec["heads"] * (-(-n // r)) * 8 * elem  # k and v, B = 2, D = 8
            for rank in range(world):
                members = min(span, world - rank // span * span)  # ranks in this rank's segment
                expected_sent[rank] += 3 * rows_bytes * (members - 1)
                expected_gathered[rank] += 2 * members * rows_bytes
    assert torch.equal(sent, expected_sent) and torch.equal(gathered, expected_gathered), (sent, expected_sent, gathered, expected_gathered)


def test_a_layout_that_cannot_be_split_fails_on_every_rank(tmp_path):
    """w = 24 on 2 ranks of n = 16 is neither a divisor nor a multiple of n: a clear error on each rank."""
    case = dict(length=32, segments=(8, 24), rates=(1, 2))
    out = tmp_path / "error"
    mp.spawn(sp_worker.run_bad_layout, args=(2, _free_port(), case, str(out)), nprocs=2, join=True)
    for rank in range(2):
        assert "segment length 24 must be a multiple of the per-rank length 16" in (tmp_path / f"error.{rank}").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_on_cuda_equals_single_process(world, causal, tmp_path):
    """The CUDA kernels inside the distributed algorithm: nccl with one GPU per rank where the machine has
    them (NCCL refuses two ranks on one GPU), else gloo with all ranks sharing the one GPU."""
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    spec = dict(length=256, heads=4, head_dim=64, segments=(32, 64, 256), rates=(1, 2, 4), causal=causal,
                fp64=False, device="cuda", backend=backend)
    out = tmp_path / "errors.pt"
    mp.spawn(sp_worker.run, args=(world, _free_port(), spec, str(out)), nprocs=world, join=True)
    errors = torch.load(out)[:, :4]
    assert (errors <= 1e-5).all(), (backend, errors)


@pytest.mark.parametrize("world,arch", [(2, "decoder"), (4, "decoder"), (2, "encoder")])
def test_longnet_model_on_sequence_shards_equals_single_process(world, arch, tmp_path):
    out = tmp_path / "errors.pt"
    mp.spawn(sp_worker.run_model, args=(world, _free_port(), arch, str(out)), nprocs=world, join=True)
    errors = torch.load(out)  # per rank: logits error, worst parameter-gradient error (relative)
    assert (errors <= 1e-5).all(), errors


def test_sequence_parallel_needs_distributed():
    from scaleformer.parallel import sequence_parallel_dilated_attention

    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        sequence_parallel_dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,), causal=True)


def test_torchrun_example_matches_one_process():
    """The documented torchrun entry point works end to end (2 CPU processes, gloo)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "longnet_sequence_parallel.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", str(example), "--length", "128"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"loss ([\d.]+) \(one process: ([\d.]+)\), worst gradient error ([\d.e+-]+)", result.stdout)
    assert match, result.stdout
    assert abs(float(match[1]) - float(match[2])) < 1e-5 and float(match[3]) < 1e-5


@pytest.mark.parametrize("world, head_offsets", [(2, "modulo"), (2, "grouped")])  # 4 ranks: the LongNet test above
def test_longvit_on_image_strips_equals_single_process(world, head_offsets, tmp_path):
    """Each rank holds a horizontal strip of the image (a contiguous shard of its patches); float64; with our
    head offsets and with TorchScale's grouped ones."""
    out = tmp_path / "errors.pt"
    mp.spawn(sp_worker.run_longvit, args=(world, _free_port(), {"head_offsets": head_offsets}, str(out)), nprocs=world,
             join=True)
    errors = torch.load(out)  # per rank: logits error, worst parameter-gradient error
    assert (errors <= 1e-10).all(), errors
