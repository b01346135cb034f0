"""The allocator setting around the training loop: large tensors freed in one step are reused by the next
without page-faulting fresh memory in (what made the default run's cross-entropy three times slower), and
the memory goes back to the system when the loop ends."""

import os
import subprocess
import sys

import pytest
import torch

PROBE = """
import ctypes, resource, torch
import scaleformer.train.trainer  # the heap as a training run has it: the library loaded (the package is lazy now,
from scaleformer.runtime import reusing_freed_memory  # and with only runtime imported glibc reused less often)

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


def _small_retnet(tie: bool):
    import torch

    import scaleformer as sf

    torch.manual_seed(0)
    # value/FFN width 48 > 32: wide projections; the head is a Linear (96 × 32) or the tied embedding
    config = sf.RetNetConfig(vocab_size=96, embed_dim=32, value_dim=48, ffn_dim=48, heads=2, layers=2,
                             tie_embeddings=tie)
    return sf.build(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_decoding_layout_stores_wide_weights_column_major_and_restores_them_exactly(tie):
    import torch
    from torch import nn

    from scaleformer.runtime import decoding_layout

    model = _small_retnet(tie)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wide = {name + ".weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features}
    wide.add("output_projection.weight" if not tie else "embed_tokens.weight")  # the head, either way
    assert "decoder.blocks.0.ffn.fc2.weight" not in wide  # (32, 48): deeper than wide
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        standard_steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(9)], 1)
        with decoding_layout(model) as count:
            assert count == len(wide)
            for name, p in model.named_parameters():
                assert torch.equal(p, before[name])  # same values and shape
                if p.dim() == 2:  # wide ones column-major (columns contiguous; a block's, a slice of it)
                    column_major = p.stride(0) == 1 and p.stride(1) >= p.shape[0]
                    assert column_major == (name in wide) and p.is_contiguous() == (name not in wide), name
            cache = model.new_cache()
            laid_steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(9)], 1)
            laid_full = model(ids).logits
    # only the order of summation changed: equal to float32 rounding
    torch.testing.assert_close(laid_steps, standard_steps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(laid_full, full, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():  # afterwards: the very tensors it had, contiguous again
        assert p.is_contiguous() and torch.equal(p, before[name]), name


def test_the_head_weight_is_what_the_logits_multiply_by():
    import torch

    import scaleformer as sf

    for tie in (False, True):
        model = _small_retnet(tie)
        hidden = torch.randn(1, 3, 32)
        assert torch.equal(model.output(hidden).logits, hidden @ model.head_weight.t())
    torch.manual_seed(0)
    mt = sf.build(sf.load_preset("mt-tiny", share_encoder_decoder_embeddings=False)).eval()
    assert mt.head_weight is mt.decoder.embed_tokens.weight and mt.head_weight is not mt.embed_tokens.weight


def test_decoding_layout_restores_after_an_error_and_lays_out_shared_weights_once():
    import torch
    from torch import nn

    from scaleformer.runtime import decoding_layout

    shared = nn.Linear(4, 8, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 4), shared.__class__(4, 8))
    model[3].weight = shared.weight  # the same Parameter in two modules
    before = shared.weight.detach().clone()
    with pytest.raises(RuntimeError, match="inside"):
        with decoding_layout(model) as count:
            assert count == 1 and shared.weight.t().is_contiguous()  # laid out once, not transposed back
            assert not model[2].weight.t().is_contiguous()  # (4, 8): deeper than wide, left alone
            raise RuntimeError("inside")
    assert shared.weight.is_contiguous() and torch.equal(shared.weight, before)


def test_thread_advice_speaks_only_when_threads_make_matmuls_slower(monkeypatch):
    """The 8-10x slow-down of a 2-core machine shared with another job (OMP_NUM_THREADS=2): measured by timing
    a matmul with torch's threads and with one; said once, in the training header."""
    import scaleformer.runtime as runtime

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    timings = {}
    monkeypatch.setattr(runtime, "_matmul_seconds", lambda threads: timings[threads])
    timings.update({2: 8e-3, 1: 2e-4})
    advice = runtime.thread_advice()
    assert advice.startswith("2 threads multiply matrices 40.0x slower than 1") and "OMP_NUM_THREADS=1" in advice
    timings.update({2: 1.2e-4, 1: 2e-4})
    assert runtime.thread_advice() is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert runtime.thread_advice() is None


def test_the_measurement_restores_the_thread_count():
    from scaleformer.runtime import _matmul_seconds

    before = torch.get_num_threads()
    assert _matmul_seconds(1) > 0 and torch.get_num_threads() == before


def _count_matrix_products(step) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Counting():
        step()
    return len(calls)


@pytest.mark.parametrize("decay", ["retnet", "gated"])
def test_projections_of_one_input_are_one_product_in_the_decoding_layout(decay):
    """A retention layer's q, k, v and gate (and gated decays) projections, and a GLU's two, become views of
    one column-major block: a decoding step multiplies by each block once (4 products per layer instead of
    8 or 9, plus the head), a prompt still layer by layer; outputs agree to rounding, in float64 closely."""
    import scaleformer as sf
    from scaleformer.runtime import decoding_layout

    torch.manual_seed(0)
    config = sf.RetNetConfig(vocab_size=96, embed_dim=32, value_dim=48, ffn_dim=48, heads=2, layers=2,
                             decay="gated" if decay == "gated" else "retnet")
    model = sf.build(config).eval().double()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.new_cache()
        standard = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(7)], 1)
        per_layer = 5 + (decay == "gated") + 3  # q, k, v, g, [decay], out; fc1, gate, fc2
        assert _count_matrix_products(lambda: model(ids[:, :1], cache=model.new_cache())) == 2 * per_layer + 1
        with decoding_layout(model):
            mixer, ffn = model.decoder.blocks[0].mixer, model.decoder.blocks[0].ffn
            storage = {p.weight.untyped_storage().data_ptr() for p in mixer.shared_input_linears()[0]}
            assert len(storage) == 1 and ffn.fc1.weight.untyped_storage().data_ptr() == \
                ffn.gate.weight.untyped_storage().data_ptr()
            assert _count_matrix_products(lambda: model(ids[:, :1], cache=model.new_cache())) == 2 * 4 + 1
            # three rows (a prompt of 3, or a batch of 3): the layers one by one
            assert _count_matrix_products(lambda: model(ids[:, :3], cache=model.new_cache())) == 2 * per_layer + 1
            cache = model.new_cache()
            laid = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(7)], 1)
    # float64: the block sums each output over the same inputs; what differs is the BLAS's order
    torch.testing.assert_close(laid, standard, rtol=1e-12, atol=1e-12)
    assert not any(hasattr(m, "_shared_input_block") for m in model.modules())


def test_layers_that_cannot_share_a_block_are_left_to_themselves():
    from torch import nn

    from scaleformer.layers.bitlinear import BitLinear
    from scaleformer.layers.shared_input import lay_out_block, project

    def weights(group):
        return [linear.weight.detach().clone() for linear in group]

    for group in ([nn.Linear(8, 8), nn.Linear(6, 8)],  # different input widths
                  [nn.Linear(8, 3), nn.Linear(8, 8)],  # the second's columns would start at an odd offset
                  [nn.Linear(8, 2), nn.Linear(8, 2)],  # narrower than its input
                  [BitLinear(8, 8), nn.Linear(8, 8)]):  # a subclass with its own forward
        before = weights(group)
        assert lay_out_block(group) is None
        assert all(linear.weight.is_contiguous() and torch.equal(linear.weight, w) for linear, w in zip(group, before))
    shared = nn.Linear(8, 8)
    assert lay_out_block([shared, shared]) is None  # one weight twice
    group = [nn.Linear(8, 8, bias=True), nn.Linear(8, 4, bias=False)]
    x = torch.randn(1, 8)
    expected = [linear(x) for linear in group]
    block = lay_out_block(group)
    assert block is not None and block.bias is not None and torch.equal(block.bias[8:], torch.zeros(4))
    group[0].__dict__["_shared_input_block"] = block
    for got, want in zip(project(x, group), expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # new values loaded in place reach the block: weights and biases are its views
        group[0].weight.mul_(2)
        group[0].bias.add_(1)
    torch.testing.assert_close(project(x, group)[0], group[0](x))
    assert project(x, group[::-1])[0].shape == (1, 4)  # another order is not the block: each layer itself


def test_a_glu_with_biases_decodes_alike_and_gets_its_own_tensors_back():
    from scaleformer.layers.ffn import FeedForward
    from scaleformer.runtime import decoding_layout

    torch.manual_seed(0)
    ffn = FeedForward(16, 24, kind="glu", activation="swish", bias=True).double().eval()
    with torch.no_grad():
        for linear in ffn.linears():
            linear.bias.normal_()
    before = {name: p.detach().clone() for name, p in ffn.named_parameters()}
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        standard = ffn(x)
        with decoding_layout(ffn):
            assert ffn.fc1.bias.untyped_storage().data_ptr() == ffn.gate.bias.untyped_storage().data_ptr()
            torch.testing.assert_close(ffn(x), standard, rtol=1e-12, atol=1e-12)
    for name, p in ffn.named_parameters():
        assert torch.equal(p, before[name]) and p.is_contiguous(), name
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name  # no longer a view of a block
