"""Sparse mixture-of-experts feed-forward layer: routers (softmax, X-MoE, TorchScale's X-MoE) and experts.

Shapes: N tokens, C width, F expert hidden width, E experts, S capacity, d_e routing dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import RouterConfig, check_choice
from scaleformer.layers.bitlinear import quantised_input, quantised_weight
from scaleformer.layers.ffn import ACTIVATIONS
from scaleformer.layers.norms import RMSNorm
from scaleformer.ops.moe import (
    Routing,
    all_to_all,
    capacity_for,
    combine,
    dispatch,
    route,
)

__all__ = ["SoftmaxRouter", "XMoERouter", "TorchScaleXMoERouter", "Experts", "MoEFeedForward", "make_router",
           "moe_layers"]


class SoftmaxRouter(nn.Module):
    """Switch/GShard: probs = softmax(W x); the balance loss uses the same probs."""

    def __init__(self, embed_dim: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, embed_dim))
        nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C) -> (probs (N, E), balance probs (N, E)), in float32 or wider."""
        probs = torch.softmax((x @ self.weight.t()).to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        return probs, probs


class XMoERouter(nn.Module):
    """X-MoE as the paper defines it: s_i = cos(W x, e_i) on a d_e-dimensional hypersphere,
    probs = softmax(s / τ) with τ learnable; the balance loss uses softmax(s / τ₀) with τ₀ fixed."""

    def __init__(self, embed_dim: int, experts: int, dim: int, temperature_init: float,
                 balance_temperature: float) -> None:
        super().__init__()
        self.projection = nn.Linear(embed_dim, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(experts, dim))
        nn.init.orthogonal_(self.expert_embeddings)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.balance_temperature = balance_temperature

    def scores(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        tokens = F.normalize(self.projection(x).to(compute), dim=-1)
        experts = F.normalize(self.expert_embeddings.to(compute), dim=-1)
        return tokens @ experts.t()  # cosine similarities in [-1, 1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scores(x)
        return torch.softmax(s / self.log_temperature.exp(), -1), torch.softmax(s / self.balance_temperature, -1)


class TorchScaleXMoERouter(nn.Module):
    """TorchScale's X-MoE gate (``Top1Gate``/``Top2Gate`` with ``use_xmoe``), for compatibility: logits are
    the unnormalized token projection against unit-norm expert embeddings, no temperature; the balance loss
    uses the same probs.

    TorchScale rescales its stored embeddings to norm 1.5 before each call, but its cosine L2-normalizes
    them again (eps 1e-4), so the 1.5 never reaches the logits: only the embeddings' directions matter.
    """

    def __init__(self, embed_dim: int, experts: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(embed_dim, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(experts, dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        compute = torch.promote_types(x.dtype, torch.float32)
        experts = F.normalize(self.expert_embeddings.to(compute), dim=-1, eps=1e-4)
        probs = torch.softmax(self.projection(x).to(compute) @ experts.t(), dim=-1)
        return probs, probs


def make_router(cfg: RouterConfig, embed_dim: int) -> nn.Module:
    if cfg.router == "softmax":
        return SoftmaxRouter(embed_dim, cfg.experts)
    if cfg.router == "xmoe":
        return XMoERouter(embed_dim, cfg.experts, cfg.router_dim, cfg.temperature_init, cfg.balance_temperature)
    check_choice(cfg.router, ("softmax", "xmoe", "xmoe_torchscale"), "router")  # RouterConfig checks it too
    return TorchScaleXMoERouter(embed_dim, cfg.experts, cfg.router_dim)


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, run on an (E, S, C) buffer with batched matmuls.

    mlp: W2 act(W1 x); glu: W2 (act(W1 x) ⊙ W3 x). Each expert's matrices are Xavier-initialised on their
    own and multiplied by ``gain`` (DeepNorm β / Sub-LN γ), like the dense FFN. ``first`` is the index of
    this module's first expert in the whole layer (expert parallelism holds a slice).

    ``bitlinear``: BitNet b1.58, each product as a BitLinear computes it — its input RMS-normalised
    (no learned scale) and quantised to 8 bits per token, each expert's matrix ternary with its own scale —
    so an expert computes what a dense FFN of BitLinears with its weights computes.
    """

    def __init__(self, experts: int, embed_dim: int, ffn_dim: int, *, kind: str = "mlp", activation: str = "gelu",
                 bias: bool = True, activation_dropout: float = 0.0, inner_norm: str | None = None,
                 norm_eps: float = 1e-5, gain: float = 1.0, bitlinear: bool = False) -> None:
        super().__init__()
        self.options = dict(kind=kind, activation=activation, bias=bias, activation_dropout=activation_dropout,
                            inner_norm=inner_norm, norm_eps=norm_eps, gain=gain, bitlinear=bitlinear)
        self.bitlinear = bitlinear
        # BitLinear's input norm; without a learned scale it has no parameters and fits any width
        self.bit_norm = RMSNorm(embed_dim, eps=1e-6, affine=False)
        check_choice(kind, ("mlp", "glu"), "FFN kind")
        check_choice(activation, ACTIVATIONS, "activation")
        check_choice(inner_norm, (None, "layernorm", "rmsnorm"), "expert inner norm")
        self.fc1 = nn.Parameter(torch.empty(experts, embed_dim, ffn_dim))
        self.gate = nn.Parameter(torch.empty(experts, embed_dim, ffn_dim)) if kind == "glu" else None
        self.fc2 = nn.Parameter(torch.empty(experts, ffn_dim, embed_dim))
        self.fc1_bias = nn.Parameter(torch.zeros(experts, 1, ffn_dim)) if bias else None
        self.gate_bias = nn.Parameter(torch.zeros(experts, 1, ffn_dim)) if bias and kind == "glu" else None
        self.fc2_bias = nn.Parameter(torch.zeros(experts, 1, embed_dim)) if bias else None
        # Sub-LN's norm on the hidden activations, one per expert.
        self.inner_norm = inner_norm
        self.norm_weight = nn.Parameter(torch.ones(experts, 1, ffn_dim)) if inner_norm else None
        self.norm_bias = nn.Parameter(torch.zeros(experts, 1, ffn_dim)) if inner_norm == "layernorm" else None
        self.norm_eps = norm_eps
        self.activation = ACTIVATIONS[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.gain = gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.fc1, self.gate, self.fc2):
            if weight is None:
                continue
            fan_in, fan_out = weight.shape[1], weight.shape[2]
            bound = self.gain * math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform per expert matrix, × gain
            with torch.no_grad():
                weight.uniform_(-bound, bound)

    def matrices(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """fc1, gate, fc2 (E, in, out) as the products use them: the weights, or (BitNet) their ternary
        quantisation, one scale per expert."""
        if not self.bitlinear:
            return self.fc1, self.gate, self.fc2
        return (quantised_weight(self.fc1, per_matrix=True),
                None if self.gate is None else quantised_weight(self.gate, per_matrix=True),
                quantised_weight(self.fc2, per_matrix=True))

    def _input(self, x: Tensor) -> Tensor:
        return quantised_input(x, self.bit_norm) if self.bitlinear else x

    def forward(self, buffer: Tensor) -> Tensor:
        """buffer (E, S, C) -> (E, S, C)."""
        fc1, gate, fc2 = self.matrices()
        buffer = self._input(buffer)  # BitNet: fc1 and gate normalise and quantise the same input alike
        hidden = torch.baddbmm(self.fc1_bias, buffer, fc1) if self.fc1_bias is not None else buffer @ fc1
        hidden = self.activation(hidden)
        if gate is not None:
            hidden = hidden * (torch.baddbmm(self.gate_bias, buffer, gate) if self.gate_bias is not None
                               else buffer @ gate)
        hidden = self.activation_dropout(hidden)
        if self.inner_norm == "layernorm":
            hidden = F.layer_norm(hidden, hidden.shape[-1:], eps=self.norm_eps) * self.norm_weight + self.norm_bias
        elif self.inner_norm == "rmsnorm":
            compute = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
            hidden = (compute * torch.rsqrt(compute.pow(2).mean(-1, keepdim=True) + self.norm_eps)).to(hidden.dtype)
            hidden = hidden * self.norm_weight
        hidden = self._input(hidden)
        return torch.baddbmm(self.fc2_bias, hidden, fc2) if self.fc2_bias is not None else hidden @ fc2


class MoEFeedForward(nn.Module):
    """A sparse FFN: route each token to its top-K experts, run them, combine by the gates.

    After each forward, ``aux_loss`` holds the weighted load-balancing loss (a scalar that carries
    gradient to the router) and ``load`` the fraction of kept assignments per expert (for logging);
    models add every layer's aux_loss to their output's ``aux_loss``.

    Balance loss: E · Σ_i f_i · P_i, f_i the fraction of tokens whose first choice is expert i, P_i the
    mean balance probability of expert i (X-MoE: softmax at the fixed temperature τ₀).
    """

    def __init__(self, cfg: RouterConfig, embed_dim: int, ffn_dim: int, *, kind: str = "mlp", activation: str = "gelu",
                 bias: bool = True, activation_dropout: float = 0.0, inner_norm: str | None = None,
                 norm_eps: float = 1e-5, gain: float = 1.0, bitlinear: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = make_router(cfg, embed_dim)
        self.experts = Experts(cfg.experts, embed_dim, ffn_dim, kind=kind, activation=activation,
                               bias=bias, activation_dropout=activation_dropout, inner_norm=inner_norm,
                               norm_eps=norm_eps, gain=gain, bitlinear=bitlinear)
        self.aux_loss: Tensor | None = None
        self.load: Tensor | None = None
        self.expert_group = None  # set by scaleformer.parallel.shard_experts: this rank holds a slice of experts

    def routing(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Routing, Tensor]:
        """Route tokens x (N, C): the kept assignments and the (unweighted) balance loss."""
        router_input = x
        if self.training and self.cfg.jitter > 0:
            noise = torch.empty_like(x).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter, generator=generator)
            router_input = x * noise
        probs, balance_probs = self.router(router_input)
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        capacity = capacity_for(x.shape[0], self.cfg.experts, self.cfg.top_k, factor)
        routing = route(probs, top_k=self.cfg.top_k, capacity=capacity,
                        second_expert_policy=self.cfg.second_expert_policy if self.training else "all",
                        normalize_gates=self.cfg.normalize_gates, generator=generator)
        if len(x) == 0:  # nothing routed (e.g. an all-padding chunk): no imbalance, and mean(0) would be NaN
            return routing, balance_probs.sum() * 0.0  # a zero that keeps the router in the graph
        first_choice = probs.argmax(-1)
        fraction = torch.bincount(first_choice, minlength=self.cfg.experts).to(balance_probs.dtype) / len(x)
        balance = self.cfg.experts * (fraction * balance_probs.mean(0)).sum()
        return routing, balance

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``token_mask`` (B, T) bool: only real tokens are routed."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        keep = None if token_mask is None else token_mask.reshape(-1)
        tokens = flat if keep is None else flat[keep]
        routing, balance = self.routing(tokens)
        if self.expert_group is None:
            expert_out = self.experts(dispatch(tokens, routing, self.cfg.experts))
        else:
            expert_out = self._sharded_experts(tokens, routing)
        out = combine(expert_out, routing, len(tokens))
        self.aux_loss = self.cfg.aux_loss_weight * balance
        self.load = (routing.counts.float() / max(int(routing.counts.sum()), 1)).detach()
        if keep is not None:
            out = flat.new_zeros(flat.shape).index_put((keep.nonzero(as_tuple=True)[0],), out)
        return out.reshape(shape)


    def _sharded_experts(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Expert parallelism: rank j holds experts [j·E/W, (j+1)·E/W). Each rank dispatches its own tokens
        into an (E, S, C) buffer, all-to-all sends expert j's rows to its owner, the owner runs them, and a
        second all-to-all brings the results home. S is the largest capacity over ranks (buffers must
        match; the padding rows are zeros), while dropping follows each rank's own capacity."""
        import torch.distributed as dist

        group, world = self.expert_group, dist.get_world_size(self.expert_group)
        capacity = torch.tensor([routing.capacity], device=tokens.device)
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=group)
        buffer = dispatch(tokens, routing, self.cfg.experts, int(capacity))  # (E, S, C)
        local = self.cfg.experts // world
        received = all_to_all(buffer, group)  # (W·E_local, S, C): chunk j came from rank j
        s, c = received.shape[1], received.shape[2]
        mine = received.view(world, local, s, c).transpose(0, 1).reshape(local, world * s, c)
        done = self.experts(mine).view(local, world, s, c).transpose(0, 1).reshape(world * local, s, c)
        return all_to_all(done, group)  # (E, S, C), rows back at their token's rank


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
