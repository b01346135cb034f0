"""Dilated attention (LongNet, arXiv 2307.02486): a fast path on SDPA-class kernels and a dense reference.

Shapes: B batch, H heads, T length, D head dim; a pattern (w, r) has N = ceil(T/w) segments of
L = ceil(w/r) selected rows.

Definition. For each pattern (w_i, r_i) the sequence is cut into segments of w_i positions; in a segment,
head h keeps the positions whose offset from the segment start is ≡ h (mod r_i), and attends among those
(causally if asked). The patterns' outputs are mixed by their softmax denominators,
O = Σ_i s_i O_i / Σ_j s_j, s_i = Σ_{k in pattern i} exp(score_k). Expanding the sum shows this equals ONE
softmax over all keys in which a key counts once per pattern that links it to the query:

    O = softmax(q kᵀ·scale + log c) v,   c[q, k] = number of patterns linking q and k

which is how :func:`dilated_attention_reference` computes it (explicit count masks), how cached decoding
computes it (:func:`dilated_bias`), and why gradients must flow through the mixing weights (TorchScale
computes them under no_grad).

Fast path. Each pattern is gathered into dense (B, H·N, L, D) blocks and run through a fused
attention kernel that also returns the log-sum-exp (PyTorch's flash kernel on CPU; FlashAttention-2 or
the memory-efficient kernel on CUDA, see kernel_name); the patterns are then merged online by their
log-sum-exps. Backward runs each pattern's kernel backward with the MERGED output and log-sum-exp in
place of the pattern's own — exactly the gradient of the merged output, mixing weights included — so
memory stays O(T·D) per pattern and nothing T×T is ever built. Where no fused kernel with log-sum-exp
is available (other devices, fp64 on CUDA), an explicit per-segment kernel is used.

Which offset a head keeps (``head_offsets``): "modulo" (ours, the default) gives head h offset h mod r, so
consecutive heads cover consecutive offsets; "grouped" gives it ⌊h / ⌈H/r⌉⌋, splitting the heads into r
groups in order — TorchScale's LongNet, whose checkpoints (LongViT's) need it.

Padding: ``key_mask`` (B, T), True = real token. Positions count real tokens only (so a padded row
behaves like the unpadded row); outputs at padding are 0.
"""

from __future__ import annotations

import functools
from typing import Literal, Sequence

import torch
from torch import Tensor

__all__ = ["dilated_attention", "dilated_attention_reference", "dilated_bias", "check_patterns", "dilation_offsets",
           "HeadOffsets",
           # The pieces the op is built from, shared with its sequence-parallel form (ops.dilated_parallel):
           "selection", "last_valid", "gather_rows", "scatter_rows", "covered_rows", "kernel_name", "kernel_forward",
           "kernel_backward", "merge_by_lse", "aligned_bias", "with_real_tokens_first"]


def check_patterns(segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                   require_coverage: bool = True) -> list[tuple[int, int]]:
    """Validate and pair up the patterns; for attention every position must be covered: one rate must be 1."""
    if len(segment_lengths) != len(dilation_rates) or not segment_lengths:
        raise ValueError(f"segment_lengths {tuple(segment_lengths)} and dilation_rates {tuple(dilation_rates)} "
                         "must be non-empty and of equal length")
    for w, r in zip(segment_lengths, dilation_rates):
        if not (isinstance(w, int) and isinstance(r, int) and w >= 1 and 1 <= r <= w):
            raise ValueError(f"each pattern needs integers 1 <= dilation_rate <= segment_length, got ({w}, {r})")
    if require_coverage and 1 not in dilation_rates:
        raise ValueError(f"dilation_rates {tuple(dilation_rates)} must include 1: with every rate > 1 some "
                         "positions are seen by no pattern for some heads")
    return list(zip(segment_lengths, dilation_rates))


HeadOffsets = Literal["modulo", "grouped"]


@functools.lru_cache(maxsize=256)
def _offsets_list(heads: int, r: int, scheme: str) -> tuple[int, ...]:
    if scheme == "modulo":
        return tuple(h % r for h in range(heads))
    if scheme == "grouped":
        size = -(-heads // r)  # heads per group
        return tuple(h // size for h in range(heads))
    raise ValueError(f"head_offsets must be 'modulo' or 'grouped', got {scheme!r}")


def dilation_offsets(heads: int, r: int, scheme: str = "modulo", device: torch.device | None = None) -> Tensor:
    """(H,) long: the offset within each segment that each head keeps at rate r (see the module docstring)."""
    return torch.tensor(_offsets_list(heads, r, scheme), dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------------
# Dense definition: counts of linking patterns
# ----------------------------------------------------------------------------------------------------------

def dilated_bias(query_positions: Tensor, key_positions: Tensor, *, heads: int, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], causal: bool, head_offsets: HeadOffsets = "modulo") -> Tensor:
    """log c (b, H, Tq, Tk), float64, for integer positions (b, Tq), (b, Tk); -inf where no pattern links them."""
    counts = torch.zeros((), dtype=torch.int32, device=query_positions.device)
    for w, r in check_patterns(segment_lengths, dilation_rates, require_coverage=False):
        offsets = dilation_offsets(heads, r, head_offsets, query_positions.device)[None, :, None]  # (1, H, 1)
        same_segment = (query_positions[:, :, None] // w) == (key_positions[:, None, :] // w)  # (b, Tq, Tk)
        q_kept = (query_positions[:, None, :] % w) % r == offsets  # (b, H, Tq)
        k_kept = (key_positions[:, None, :] % w) % r == offsets  # (b, H, Tk)
        link = same_segment[:, None] & q_kept[..., :, None] & k_kept[..., None, :]
        counts = counts + link.int()
    if causal:
        counts = counts * (key_positions[:, None, None, :] <= query_positions[:, None, :, None]).int()
    return torch.log(counts.double())  # float64: callers cast (log 2, log 3 exact to their precision)


def dilated_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, segment_lengths: Sequence[int],
                                dilation_rates: Sequence[int], causal: bool, key_mask: Tensor | None = None,
                                scale: float | None = None, head_offsets: HeadOffsets = "modulo") -> Tensor:
    """The definition, densely: softmax(q kᵀ·scale + log c) v with explicit masks (any float dtype)."""
    b, h, t, _ = q.shape
    real = torch.ones(b, t, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    positions = real.long().cumsum(1) - 1
    bias = dilated_bias(positions, positions, heads=h, segment_lengths=segment_lengths,
                        dilation_rates=dilation_rates, causal=causal, head_offsets=head_offsets,
                        ).to(torch.promote_types(q.dtype, torch.float32))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).to(bias.dtype) * scale + bias
    allowed = torch.isfinite(bias) & real[:, None, None, :] & real[:, None, :, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key  # rows with no key: output 0
    return torch.matmul(probs.to(v.dtype), v) * real[:, None, :, None].to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fast path
# ----------------------------------------------------------------------------------------------------------

def selection(t: int, w: int, r: int, heads: int, device: torch.device,
              scheme: HeadOffsets = "modulo") -> tuple[Tensor, Tensor, int, int]:
    """Positions kept by pattern (w, r): index (H, N, L) long and valid (H, N, L) bool.

    Rows past a block's end (valid False) hold copies of the block's last kept row; they are computed
    and dropped. Not copies of position 0: under xPos, key scales grow exponentially with position, and
    a far-away query against a block's late keys can overflow q·k in fp32 (measured: NaN losses training
    longnet-base at 32k on an H100), and a dropped NaN row still poisons a sum (NaN · 0 = NaN).
    """
    w = min(w, t)  # a segment longer than the sequence is the whole sequence (same selection)
    n, length = -(-t // w), -(-w // r)
    local = dilation_offsets(heads, r, scheme, device)[:, None] + torch.arange(length, device=device)[None, :] * r
    positions = torch.arange(n, device=device)[None, :, None] * w + local[:, None, :]  # (H, N, L)
    valid = (local < w)[:, None, :] & (positions < t)  # a prefix of each block's rows
    return last_valid(positions, valid), valid, n, length


def last_valid(positions: Tensor, valid: Tensor) -> Tensor:
    """``positions`` with each invalid entry replaced by the last valid one before it along the last dim
    (valid entries form a prefix and increase); 0 where a row has none."""
    return torch.where(valid, positions, -1).cummax(dim=-1).values.clamp(min=0)


@functools.lru_cache(maxsize=64)
def _head_offsets(heads: int, r: int, device: torch.device, scheme: str) -> Tensor:
    """(1, H, 1, 1, 1, 1): each head's offset. Cached: on GPUs the per-call cost of building it is launch overhead."""
    return dilation_offsets(heads, r, scheme, device).view(1, -1, 1, 1, 1, 1)


@functools.lru_cache(maxsize=8)
def _no_rng_state(device: torch.device) -> Tensor:
    """The generator state the CUDA backward kernels take; unused at dropout 0."""
    return torch.zeros((), dtype=torch.int64, device=device)


class _Selection:
    """The rows one pattern (w, r) keeps: gathered into blocks (B, H·N, L, D) and scattered back.

    When every block is full (w divides T, r divides w) the kept rows are a strided view of the input —
    for r = 1 the blocks are a plain reshape — so no index tensors are built or read; otherwise index
    gathers. For strided views with r > 1, head h keeps offset h mod r: on CPUs a slice per head is
    fastest, on GPUs one gather along the offset axis (a launch per head would dominate there).
    """

    def __init__(self, t: int, w: int, r: int, heads: int, device: torch.device, scheme: HeadOffsets = "modulo") -> None:
        w = min(w, t)
        self.t, self.w, self.r, self.heads, self.device, self.scheme = t, w, r, heads, device, scheme
        self.offsets = _offsets_list(heads, r, scheme)  # head i keeps offset offsets[i] in each segment
        self.blocks, self.length = -(-t // w), -(-w // r)
        self.regular = t % w == 0 and w % r == 0

    @functools.cached_property
    def _index_valid(self) -> tuple[Tensor, Tensor]:
        return selection(self.t, self.w, self.r, self.heads, self.device, self.scheme)[:2]

    @property
    def index(self) -> Tensor:
        """(H, N, L) long: the kept positions (rows past a block's end repeat its last kept position)."""
        return self._index_valid[0]

    @property
    def valid(self) -> Tensor:
        """(H, N, L) bool: which block rows are real positions."""
        return self._index_valid[1]

    @staticmethod
    def _slice_per_head(x: Tensor) -> bool:
        """Per-head slices (CPU: 2-10x faster than one gather, measured) or one batched gather (elsewhere)."""
        return x.device.type == "cpu"

    def _strided(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> view (B, H, N, L, r, D)
        return x.view(x.shape[0], self.heads, self.blocks, self.length, self.r, x.shape[-1])

    def _offsets(self, view: Tensor) -> Tensor:
        """Index along a strided view's offset axis: head h -> its offset, shaped (B, H, N, L, 1, D) (stride 0)."""
        return _head_offsets(self.heads, self.r, view.device, self.scheme).expand(*view.shape[:4], 1, view.shape[-1])

    def gather(self, x: Tensor) -> Tensor:
        """x (B, H, T, D) -> (B, H·N, L, D)."""
        b, h, _, d = x.shape
        if self.regular:
            if self.r == 1:
                return x.reshape(b, h * self.blocks, self.length, d)
            view = self._strided(x)
            if not self._slice_per_head(x):
                return view.gather(4, self._offsets(view)).view(b, h * self.blocks, self.length, d)
            return torch.stack([view[:, i, :, :, self.offsets[i]] for i in range(h)], 1).view(b, h * self.blocks,
                                                                                          self.length, d)
        flat = self.index.reshape(1, h, -1, 1).expand(b, h, self.blocks * self.length, d)
        return x.gather(2, flat).view(b, h * self.blocks, self.length, d)

    def add_into(self, target: Tensor, values: Tensor) -> Tensor:
        """target (B, H, T, D) += values (B, H·N, L, D) at the kept rows (in place; returns target)."""
        b, h, _, d = target.shape
        values = values.reshape(b, h, self.blocks, self.length, d)
        if self.regular:
            if self.r == 1:
                return target.add_(values.reshape(b, h, self.t, d))
            view = self._strided(target)
            if not self._slice_per_head(target):
                view.scatter_add_(4, self._offsets(view), values.unsqueeze(4).to(target.dtype))
                return target
            for i in range(h):
                view[:, i, :, :, self.offsets[i]] += values[:, i]
            return target
        values = torch.where(self.valid.reshape(1, h, -1, 1), values.flatten(2, 3), 0)  # NaN-safe; contiguous
        return target.scatter_add_(2, self.index.reshape(1, h, -1, 1).expand_as(values), values)

    def merge_into(self, out: Tensor, lse: Tensor, o_i: Tensor, lse_i: Tensor) -> bool:
        """Merge this pattern's blocks into running (out (B, H, T, D), lse (B, H, T)) in place, touching only
        the kept rows. Only for regular selections with r > 1 (rows are a strided view); returns False when
        the caller must merge densely instead."""
        if not self.regular or self.r == 1:
            return False
        b, h, _, d = out.shape
        o_i = o_i.reshape(b, h, self.blocks, self.length, d).to(out.dtype)
        lse_i = lse_i.reshape(b, h, self.blocks, self.length).to(lse.dtype)
        out_view, lse_view = self._strided(out), self._strided(lse[..., None])
        if not self._slice_per_head(out):
            o_index, lse_index = self._offsets(out_view), self._offsets(lse_view)
            o_rows, lse_rows = out_view.gather(4, o_index)[..., 0, :], lse_view.gather(4, lse_index)[..., 0, 0]
            new_lse = torch.logaddexp(lse_rows, lse_i)
            new_o = o_rows * torch.exp(lse_rows - new_lse)[..., None] + o_i * torch.exp(lse_i - new_lse)[..., None]
            out_view.scatter_(4, o_index, new_o.unsqueeze(4))
            lse_view.scatter_(4, lse_index, new_lse[..., None, None])
            return True
        for i in range(h):
            o_rows, lse_rows = out_view[:, i, :, :, self.offsets[i]], lse_view[:, i, :, :, self.offsets[i], 0]
            new_lse = torch.logaddexp(lse_rows, lse_i[:, i])
            o_rows.copy_(o_rows * torch.exp(lse_rows - new_lse)[..., None]
                         + o_i[:, i] * torch.exp(lse_i[:, i] - new_lse)[..., None])
            lse_rows.copy_(new_lse)
        return True

    def scatter(self, values: Tensor) -> Tensor:
        """(B, H·N, L, D) -> (B, H, T, D), zeros at the rows this pattern does not keep."""
        b, d = values.shape[0], values.shape[-1]
        if self.regular and self.r == 1:
            return values.reshape(b, self.heads, self.t, d)
        return self.add_into(values.new_zeros(b, self.heads, self.t, d), values)

    def covered(self) -> Tensor | None:
        """(H, T) bool: the positions this pattern keeps; None when it keeps them all."""
        if self.regular and self.r == 1:
            return None
        return covered_rows(self.index, self.valid, self.t)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, T, D), index (H, N, L) -> (B, H·N, L, D)."""
    b, h, _, d = x.shape
    _, n, length = index.shape
    flat = index.reshape(1, h, n * length, 1).expand(b, h, n * length, d)
    return x.gather(2, flat).view(b, h * n, length, d)


def scatter_rows(values: Tensor, index: Tensor, valid: Tensor, t: int) -> Tensor:
    """Inverse of gather_rows for kept positions: (B, H·N, L, D) -> (B, H, T, D), zeros elsewhere."""
    h, n, length = index.shape
    b, d = values.shape[0], values.shape[-1]
    values = torch.where(valid.reshape(1, h, n * length, 1), values.reshape(b, h, n * length, d), 0)
    out = values.new_zeros(b, h, t, d)
    return out.scatter_add(2, index.reshape(1, h, n * length, 1).expand(b, h, n * length, d), values)


# Kernels. Each takes blocks q, k, v (B, G, L, D) — G independent attention problems of L rows — and an
# optional additive key bias broadcastable to (B, G, L, L), and returns (out, lse (B, G, L) fp32). Backward
# takes the MERGED out and lse (see _DilatedAttention.backward), which every kernel here accepts since each
# recomputes probabilities as exp(score - lse) and its softmax-gradient term from (grad · out).
#   "cpu_flash"      PyTorch's fused CPU flash kernel (any float dtype, bias allowed)
#   "cuda_flash"     FlashAttention-2 inside PyTorch (fp16/bf16, no bias): the fastest on NVIDIA GPUs
#   "cuda_efficient" the memory-efficient (CUTLASS) kernel: fp32/fp16/bf16, bias allowed
#   "math"           explicit per-block softmax (any device and dtype; builds L×L scores per block)

_CUDA_GRID = 65535  # CUDA kernels put blocks on a grid axis limited to 2^16 - 1: larger G runs in slices


def kernel_name(q: Tensor, requested: str, has_bias: bool) -> str:
    """The kernel for these blocks; ``requested`` is "auto", "fused" (fail if none) or "math"."""
    if requested not in ("auto", "fused", "math"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'math', got {requested!r}")
    if requested == "math":
        return "math"
    if q.device.type == "cpu":
        return "cpu_flash"
    d = q.shape[-1]
    if q.device.type == "cuda" and d % 8 == 0:
        if q.dtype in (torch.float16, torch.bfloat16) and not has_bias and d <= 256:
            return "cuda_flash"
        if q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return "cuda_efficient"
    if requested == "fused":
        raise ValueError(f"no fused dilated kernel with log-sum-exp for {q.dtype} with head dim {d} on "
                         f"{q.device.type} (CUDA needs fp32/fp16/bf16 and head dim a multiple of 8); use kernel='math'")
    return "math"


def aligned_bias(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero bias of ``shape`` whose rows start on 16-element boundaries (the CUDA kernels read the bias
    in aligned vectors): the storage's last dim is rounded up to a multiple of 16 and sliced back."""
    *lead, last = shape
    return torch.zeros(*lead, -(-last // 16) * 16, dtype=dtype, device=device)[..., :last]


def _in_grid_slices(fn, tensors: tuple, *args) -> tuple:
    """fn(*tensors, *args) over slices of at most _CUDA_GRID blocks along dim 1 (G), concatenated."""
    g = tensors[0].shape[1]
    if g <= _CUDA_GRID:
        return fn(*tensors, *args)
    parts = [fn(*[x if x is None or x.shape[1] != g else x[:, start:start + _CUDA_GRID] for x in tensors], *args)
             for start in range(0, g, _CUDA_GRID)]
    return tuple(torch.cat(items, 1) for items in zip(*parts))


def _cuda_forward(q, k, v, bias, causal, scale, kernel):
    length = q.shape[-2]
    if kernel == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        full = None if bias is None else bias.expand(q.shape[0], q.shape[1], length, k.shape[-2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, full, True, 0.0, causal,
                                                                           scale=scale)[:2]
    return out, lse[..., :length]  # the efficient kernel pads lse to a multiple of 32 rows


def _cuda_backward(grad, q, k, v, out, lse, bias, causal, scale, kernel):
    length, keys = q.shape[-2], k.shape[-2]
    no_rng = _no_rng_state(q.device)
    lse = lse.float().contiguous()
    if kernel == "cuda_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, None, None, length, keys, 0.0, causal, no_rng, no_rng, scale=scale)
    padded = lse.new_zeros(*lse.shape[:-1], -(-length // 32) * 32)  # the layout the forward returned
    padded[..., :length] = lse
    full = None if bias is None else bias.expand(q.shape[0], q.shape[1], length, keys)
    # The fp16/bf16 memory-efficient backward reads `out` and `grad` as laid out by its forward,
    # (B, L, G, D) in memory, whatever their strides say (measured on an H100, torch 2.11: contiguous
    # (B, G, L, D) inputs give garbage gradients). Hand them over in that layout.
    out, grad = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (out, grad))
    return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, full, out, padded, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale)[:3]


def kernel_forward(q, k, v, causal, bias, scale, kernel):
    """(out, lse) of softmax attention per block; bias (.., 1 or L, L) additive on keys or None."""
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                         scale=scale)
    if kernel.startswith("cuda"):
        return _in_grid_slices(_cuda_forward, (q, k, v, bias), causal, scale, kernel)
    scores = _block_scores(q, k, causal, bias, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def kernel_backward(grad, q, k, v, out, lse, causal, bias, scale, kernel):
    """(dq, dk, dv) of one block given the output and log-sum-exp to differentiate through (the merged ones)."""
    if kernel == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    if kernel.startswith("cuda"):
        return _in_grid_slices(_cuda_backward, (grad, q, k, v, out, lse, bias), causal, scale, kernel)
    probs = torch.exp(_block_scores(q, k, causal, bias, scale) - lse[..., None]).to(q.dtype)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad)
    grad_scores = probs * (torch.matmul(grad, v.transpose(-1, -2)) - (grad * out).sum(-1, keepdim=True))
    return torch.matmul(grad_scores, k) * scale, torch.matmul(grad_scores.transpose(-1, -2), q) * scale, grad_v


def _block_scores(q, k, causal, bias, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        length = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool, device=q.device).tril(),
                                    float("-inf"))
    return scores


def covered_rows(index: Tensor, valid: Tensor, t: int) -> Tensor:
    """(H, T) bool: the positions a pattern keeps, from its index and valid (H, N, L)."""
    h = index.shape[0]
    return torch.zeros(h, t, dtype=torch.int32, device=index.device).scatter_add(
        1, index.reshape(h, -1), valid.reshape(h, -1).int()) > 0


def merge_by_lse(out: Tensor | None, lse: Tensor | None, o_i: Tensor, lse_i: Tensor) -> tuple[Tensor, Tensor]:
    """Online merge of two attention results by log-sum-exp, in fp32 or wider:
    O = (e^{lse} O + e^{lse_i} O_i) / (e^{lse} + e^{lse_i}); positions neither covers stay (0, -inf)."""
    acc = torch.promote_types(o_i.dtype, torch.float32)
    o_i, lse_i = o_i.to(acc), lse_i.to(acc)
    if out is None or lse is None:
        return o_i, lse_i
    new_lse = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isfinite(new_lse), new_lse, 0.0)
    return out * torch.exp(lse - safe)[..., None] + o_i * torch.exp(lse_i - safe)[..., None], new_lse


class _Plan:
    """Per-pattern selections, key biases and kernels for one call (shared by forward and backward).

    Keys that must stay hidden — rows past a block's end, padding — always come after every real row of
    their block (blocks follow positions, and padding is packed to the tail). So causal attention hides
    them by itself, and a mask is built only for bidirectional attention. That keeps causal calls on
    FlashAttention-2 on GPUs (it takes no mask) and mask-free on CPUs.
    """

    def __init__(self, q: Tensor, patterns: list[tuple[int, int]], lengths: Tensor | None, kernel: str,
                 causal: bool, scheme: HeadOffsets = "modulo") -> None:
        b, h, t, _ = q.shape
        # A finite "minus infinity" for masked keys (bidirectional calls only): rows whose keys are all
        # masked (only ever padding) stay finite instead of NaN, while a real row's masked keys underflow
        # to exactly zero weight.
        masked = max(-1e9, torch.finfo(q.dtype).min / 2)
        self.steps = []
        for w, r in sorted(patterns, key=lambda p: p[1] != 1):  # rate 1 first (see _DilatedAttention.forward)
            sel = _Selection(t, w, r, h, q.device, scheme)
            bias = None
            if causal or (lengths is None and sel.regular):  # nothing to hide (no mask, no device sync)
                self.steps.append((sel, bias, kernel_name(q, kernel, has_bias=False)))
                continue
            keys_real = sel.valid[None]
            if lengths is not None:
                keys_real = keys_real & (sel.index[None] < lengths[:, None, None, None])
            if not bool(keys_real.all()):
                bias = aligned_bias(keys_real.shape, q.dtype, q.device).masked_fill_(~keys_real, masked)
                bias = bias.reshape(keys_real.shape[0], h * sel.blocks, 1, sel.length)
            self.steps.append((sel, bias, kernel_name(q, kernel, bias is not None)))


@functools.lru_cache(maxsize=32)
def _shared_plan(heads: int, t: int, d: int, patterns: tuple[tuple[int, int], ...], dtype: torch.dtype,
                 device: torch.device, kernel: str, causal: bool, scheme: HeadOffsets) -> _Plan:
    """Without padding a plan depends only on shapes: built once, shared by every layer and step (on a GPU,
    building one — index tensors, masks, a device sync — costs more launches than running it)."""
    like = torch.empty((1, 1, 1, 1), dtype=dtype, device=device).expand(1, heads, t, d)  # shapes, no storage
    return _Plan(like, list(patterns), None, kernel, causal, scheme)


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, causal: bool, scale: float):
        out = lse = None
        for sel, bias, kernel in plan.steps:  # a rate-1 pattern first: it covers every position
            o_i, lse_i = kernel_forward(sel.gather(q), sel.gather(k), sel.gather(v), causal, bias, scale, kernel)
            if out is not None and lse is not None and sel.merge_into(out, lse, o_i, lse_i):
                continue
            lse_i = sel.scatter(lse_i[..., None])[..., 0]
            covered = sel.covered()
            if covered is not None:
                lse_i = torch.where(covered, lse_i, float("-inf"))
            out, lse = merge_by_lse(out, lse, sel.scatter(o_i), lse_i)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.causal, ctx.scale = plan, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        grads: list[Tensor] | None = None
        # Positions no pattern covers (only padding can be) get lse +big: zero probability.
        merged_lse = torch.where(torch.isfinite(lse), lse, 1e30)[..., None]
        for sel, bias, kernel in ctx.plan.steps:
            grad_i, lse_i = sel.gather(grad), sel.gather(merged_lse)[..., 0]
            if not sel.regular:  # rows past a block's end are clamped copies: no gradient, zero probability
                keep = sel.valid.reshape(1, -1, sel.length, 1)  # (1, H·N, L, 1)
                grad_i, lse_i = torch.where(keep, grad_i, 0), torch.where(keep[..., 0], lse_i, 1e30)
            dq, dk, dv = kernel_backward(grad_i, sel.gather(q), sel.gather(k), sel.gather(v), sel.gather(out), lse_i,
                                          ctx.causal, bias, ctx.scale, kernel)
            if grads is None:  # the first (rate-1) pattern writes every row: start from it, no zero-fill
                grads = [sel.scatter(g).to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v))]
            else:
                for target, g in zip(grads, (dq, dk, dv)):
                    sel.add_into(target, g)
        assert grads is not None
        return grads[0], grads[1], grads[2], None, None, None


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, *, segment_lengths: Sequence[int],
                      dilation_rates: Sequence[int], causal: bool, key_mask: Tensor | None = None,
                      scale: float | None = None, kernel: str = "auto", head_offsets: HeadOffsets = "modulo") -> Tensor:
    """Dilated attention, q, k, v (B, H, T, D) -> (B, H, T, D); same function as the reference.

    ``kernel``: "fused" (PyTorch's flash kernel on CPU; FlashAttention-2 for fp16/bf16 blocks without a
    key bias, else the memory-efficient kernel, on CUDA), "math" (explicit per-segment softmax, any
    device and dtype), "auto" (fused where available, else math) or "triton" (one block-sparse Triton
    kernel per pattern that addresses the dilated rows itself and merges the patterns in its epilogue:
    :mod:`scaleformer.ops.block_sparse_triton`; CUDA, or the CPU under ``TRITON_INTERPRET=1``).
    ``head_offsets``: which offset each head keeps ("modulo" or TorchScale's "grouped"; module docstring).
    """
    patterns = check_patterns(segment_lengths, dilation_rates)
    b, h, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    _offsets_list(h, 1, head_offsets)  # a bad scheme: one line, before any work
    if kernel == "triton":
        from scaleformer.ops.block_sparse_triton import block_sparse_attention, dilated_passes, tile_size

        passes = dilated_passes(t, tuple(patterns), causal, tile_size(q.device), q.device, heads=h,
                                head_offsets=head_offsets)
        return with_real_tokens_first(
            lambda q, k, v, lengths: block_sparse_attention(q, k, v, passes, causal=causal, lengths=lengths,
                                                            scale=scale), q, k, v, key_mask)
    if key_mask is None:
        plan = _shared_plan(h, t, d, tuple(patterns), q.dtype, q.device, kernel, causal, head_offsets)
        return _DilatedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, causal, scale)
    return with_real_tokens_first(
        lambda q, k, v, lengths: _DilatedAttention.apply(q, k, v, _Plan(q, patterns, lengths, kernel, causal,
                                                                         head_offsets), causal, scale),
        q, k, v, key_mask)


def with_real_tokens_first(op, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """op(q, k, v, lengths) on rows whose real tokens come first, for inputs with padding anywhere.

    Each row's real tokens are moved to the front, in order: slot index then equals position, so segments,
    blocks and causality follow positions (padding anywhere is invisible), and padding becomes a tail of
    ``lengths`` (B,) real tokens. The outputs go back to their slots; padding outputs 0. Without a mask,
    op runs on the inputs as they are, with ``lengths`` None.
    """
    if key_mask is None:
        return op(q.contiguous(), k.contiguous(), v.contiguous(), None)
    b, h, t, d = q.shape
    real = key_mask.bool()
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # (B, T)
    expand = order[:, None, :, None].expand(b, h, t, d)
    out = op(*(x.gather(2, expand).contiguous() for x in (q, k, v)), real.sum(1))
    out = torch.zeros_like(out).scatter(2, expand, out)
    return out * real[:, None, :, None].to(out.dtype)
