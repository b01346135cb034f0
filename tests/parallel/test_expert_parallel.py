"""Expert parallelism over 2 and 4 CPU processes (gloo) equals one process holding all experts."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.parallel import ep_worker
from tests.parallel.test_sequence_parallel import _free_port


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("top_k", [1, 2])
def test_sharded_experts_equal_one_process(world, top_k, tmp_path):
    out = tmp_path / "errors.pt"
    mp.spawn(ep_worker.run, args=(world, _free_port(), top_k, str(out)), nprocs=world, join=True)
    results = torch.load(out)  # per rank: output error, worst gradient error, experts held
    assert (results[:, :2] <= 1e-10).all(), results  # float64
    assert (results[:, 2] == 8 // world).all()


def test_shard_experts_needs_distributed():
    import scaleformer as sf
    from scaleformer.parallel import shard_experts

    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        shard_experts(sf.build(sf.load_preset("gpt-moe-tiny")))
