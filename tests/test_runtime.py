"""The allocator setting around the training loop: large tensors freed in one step are reused by the next
without page-faulting fresh memory in (what made the default run's cross-entropy three times slower), and
the memory goes back to the system when the loop ends."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from scaleformer.runtime import reusing_freed_memory

def faults_of_a_fresh_40mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 * 2**20).fill_(1.0)  # 40 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with reusing_freed_memory() as applied:
    faults_of_a_fresh_40mb_tensor()
    inside = min(faults_of_a_fresh_40mb_tensor() for _ in range(5))
after = min(faults_of_a_fresh_40mb_tensor() for _ in range(5))
print(applied, inside, after)
"""
PAGES = 10 * 2**20 * 4 // 4096


def _probe(env_value: str | None) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "SCALEFORMER_MALLOC"}
    if env_value is not None:
        env["SCALEFORMER_MALLOC"] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    applied, inside, after = result.stdout.split()
    return applied, int(inside), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_inside_the_block_only_and_the_setting_can_be_refused():
    applied, inside, after = _probe(None)
    assert applied == "True" and inside < PAGES // 20  # reused: almost no page is faulted in again
    assert after > PAGES // 2  # after the block, freed memory is returned: every page faults in again
    applied, inside, _ = _probe("system")
    assert applied == "False" and inside > PAGES // 2


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
