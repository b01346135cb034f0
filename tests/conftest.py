import os

import pytest
import torch

import scaleformer as sf

@pytest.fixture(scope="module")
def triton_interpreter():
    """The Triton tier's files use this (``pytest.mark.usefixtures``): without a GPU, Triton must interpret.
    TRITON_INTERPRET has to be set before triton is first imported (its own library functions are compiled
    at import), so the tier runs in a process of its own; it is set here, when a Triton test first runs,
    not at import, so that collecting these files in the default tier changes nothing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    yield


POSITIONS = ["absolute", "sinusoidal", "rope", "xpos", "relative", "none"]
NORMS = ["pre", "post", "deepnorm", "subln"]


def tiny(arch: str = "decoder", **overrides) -> sf.TransformerConfig:
    """A very small config for exact-equivalence tests."""
    base = dict(arch=arch, vocab_size=97, embed_dim=32, layers=2, heads=4, ffn_dim=48, max_positions=64,
                relative_buckets=8, relative_max_distance=16, xpos_scale_base=16.0)
    base.update(overrides)
    return sf.TransformerConfig(**base)


def make_model(cfg: sf.TransformerConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = sf.build(cfg).to(dtype).eval()
    # Non-trivial norm and bias parameters, so tests also see them (fresh ones are 1 and 0).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def fast_and_reference(cfg: sf.TransformerConfig, dtype: torch.dtype = torch.float32):
    """The same weights built twice: on the fast kernels and on the pure-PyTorch reference kernels."""
    fast = make_model(cfg, dtype)
    ref = make_model(cfg.replace(attention_impl="reference"), dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def decode_step_by_step(model, ids: torch.Tensor, prefill: int, **kwargs) -> torch.Tensor:
    """Prefill ``prefill`` tokens in one call, then one token per call; the logits of every position."""
    out = model(ids[:, :prefill], use_cache=True, **kwargs)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True, **kwargs)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def decode_target_step_by_step(model, src: torch.Tensor, tgt: torch.Tensor, prefill: int, **kwargs) -> torch.Tensor:
    """An encoder-decoder: the source and ``prefill`` target tokens in one call, then one target token per
    call (the cache holds the encoded source); the logits of every target position."""
    out = model(src, tgt[:, :prefill], use_cache=True, **kwargs)
    logits = [out.logits]
    for t in range(prefill, tgt.shape[1]):
        out = model(None, tgt[:, t:t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), out.cache


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    """Relative tolerance on the tensor's magnitude: 1e-5 (fp32) or 1e-10 (fp64), times ``scale``."""
    tol = (1e-5 if dtype == torch.float32 else 1e-10) * scale
    assert not torch.isnan(actual).any(), "NaN in result"
    err = (actual - expected).abs().max().item()
    ref = max(expected.abs().max().item(), 1.0)
    assert err <= tol * ref, f"max abs error {err:.3e} > {tol * ref:.3e}"


def assert_rows_alone(model, lengths: list[int], dtype: torch.dtype = torch.float32, vocab: int = 97,
                      packed: bool = True) -> None:
    """Rows of these lengths, left-padded into one batch, each get what they get alone; and (``packed``)
    the same rows packed into one as documents each get what they get alone."""
    width = max(lengths)
    rows = [torch.randint(0, vocab, (n,)) for n in lengths]
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        alone = [model(row[None]).logits[0] for row in rows]
        for i, row in enumerate(rows):
            assert_close(out[i, width - len(row):], alone[i], dtype)
        if packed:
            documents = torch.tensor([[d for d, row in enumerate(rows) for _ in row]])
            joined = model(torch.cat(rows)[None], document_ids=documents).logits[0]
            for d, row in enumerate(rows):
                assert_close(joined[documents[0] == d], alone[d], dtype)


def assert_fast_equals_reference(make, vocab: int = 97) -> dict[str, torch.Tensor]:
    """``make(impl)`` builds a float64 model on the "sdpa" or the "reference" kernels with the same weights:
    their logits and every parameter's gradient agree within 1e-10 relative. Returns the fast path's gradients."""
    results = []
    for impl in ("sdpa", "reference"):
        model = make(impl)
        ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fast, fast_grads), (ref, ref_grads) = results
    assert_close(fast, ref, torch.float64)
    for name, grad in fast_grads.items():
        assert_close(grad, ref_grads[name], torch.float64)
    return fast_grads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
