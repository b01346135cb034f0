"""Context parallelism (scaleformer.parallel.context): a sequence split across 2 and 4 CPU processes (gloo)
gives, for every mixer's example of the conformance suite, the logits and every parameter gradient of the
whole sequence in one process, in float64 (1e-10 relative: rounding differs only in the order of sums)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.models.test_mixer_contract import CASES
from tests.parallel import cp_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4])
def split_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp("cp") / "results.pt"
    mp.spawn(cp_worker.run_cases, args=(world, _free_port(), 32, str(out)), nprocs=world, join=True)
    return world, torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_every_mixer_split_across_ranks_equals_one_process(split_results, name):
    world, results = split_results
    per_rank = [result[name] for result in results]
    assert all(not isinstance(r, str) for r in per_rank), per_rank[0]
    for rank, (output_error, grad_error, sent) in enumerate(per_rank):
        assert output_error <= 1e-10 and grad_error <= 1e-10, (world, rank, output_error, grad_error)
