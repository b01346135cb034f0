"""The allocator setting around the training loop: large tensors freed in one step are reused by the next
without page-faulting fresh memory in (what made the default run's cross-entropy three times slower), and
the memory goes back to the system when the loop ends."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, torch
from scaleformer.runtime import reusing_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's mallinfo2: hblkhd is the bytes held in mmapped blocks
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2

def a_fresh_40mb_tensor():
    \"\"\"(page faults, whether it was a mapping of its own) of allocating and filling 40 MiB, then freeing it.\"\"\"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(10 * 2**20).fill_(1.0)
    mapped = mallinfo2().hblkhd >= tensor.nbytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, mapped

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

with reusing_freed_memory() as applied:
    a_fresh_40mb_tensor()
    inside = [a_fresh_40mb_tensor() for _ in range(5)]
    torch.empty(50 * 2**20).fill_(1.0)  # 200 MiB, freed: kept by the process while the setting lasts
    kept = resident()
returned = kept - resident()
print(applied, min(faults for faults, _ in inside), any(mapped for _, mapped in inside), returned // 2**20)
"""
PAGES = 10 * 2**20 * 4 // 4096


def _probe(env_value: str | None) -> tuple[bool, int, bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "SCALEFORMER_MALLOC"}
    if env_value is not None:
        env["SCALEFORMER_MALLOC"] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    applied, faults, mapped_inside, returned_mb = result.stdout.split()
    return applied == "True", int(faults), mapped_inside == "True", int(returned_mb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_inside_the_block_and_returned_after_it():
    # Inside: a freed 40 MiB comes back from the heap, already faulted in (at least once in five: glibc does
    # not promise which free chunk it reuses), never as a mapping of its own; freed memory stays with the
    # process until the block ends, which returns it (resident memory falls by the 200 MiB freed last).
    applied, faults, mapped_inside, returned_mb = _probe(None)
    assert applied and faults < PAGES // 20 and not mapped_inside
    assert returned_mb >= 150
    # Refused: glibc's own thresholds throughout, so 40 MiB is a mapping of its own (counting a fresh
    # mapping's page faults instead would depend on transparent huge pages).
    applied, _, mapped_inside, _ = _probe("system")
    assert not applied and mapped_inside


def test_the_training_loop_runs_inside_the_setting(tmp_path, monkeypatch):
    import contextlib

    import scaleformer.train.trainer as trainer_module

    state = {"active": False, "steps_inside": 0, "steps_outside": 0}

    @contextlib.contextmanager
    def recording():
        state["active"] = True
        yield True
        state["active"] = False

    real_step = trainer_module.Trainer.train_step

    def counting_step(self, step):
        state["steps_inside" if state["active"] else "steps_outside"] += 1
        return real_step(self, step)

    monkeypatch.setattr(trainer_module, "reusing_freed_memory", recording)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", counting_step)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i} of a small corpus for a few training steps." for i in range(400)))
    trainer_module.Trainer(trainer_module.TrainConfig(model="retnet-tiny", tokenizer="byte", seq_len=16, batch_size=2,
                                                      steps=3, eval_batches=1, samples=0, progress=False,
                                                      data=str(corpus), out=str(tmp_path / "run"))).run()
    assert state == {"active": False, "steps_inside": 3, "steps_outside": 0}
