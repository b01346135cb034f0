import math

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.config import MoEConfig
from scaleformer.layers.moe import MoEFeedForward, XMoERouter
from scaleformer.parallel import expert_parameters, sparse_clip_grad_norm_
from tests.conftest import assert_close


def _layer(**overrides):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"experts": 4, "top_k": 1, "capacity_factor": 1.0, **overrides})
    return MoEFeedForward(cfg, 8, 16, kind="glu", activation="swish", bias=True).double()


def test_xmoe_router_is_the_papers_formula():
    router = XMoERouter(8, 4, dim=3, temperature_init=0.3, balance_temperature=0.5).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    h = x @ router.projection.weight.T
    s = (h / h.norm(dim=-1, keepdim=True)) @ (router.expert_embeddings / router.expert_embeddings.norm(dim=-1,
                                                                                                     keepdim=True)).T
    probs, balance = router(x)
    tau = router.log_temperature.exp()  # learnable, initialised at 0.3 (stored in the module's dtype)
    assert tau.item() == pytest.approx(0.3, rel=1e-6)
    assert_close(probs, torch.softmax(s / tau, -1), torch.float64)
    assert_close(balance, torch.softmax(s / 0.5, -1), torch.float64)
    assert s.abs().max() <= 1 + 1e-12  # scores live on the hypersphere


def test_layer_output_is_gate_times_expert_by_hand():
    layer = _layer(top_k=2, second_expert_policy="all", capacity_factor=10.0).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out = layer(x)
    probs, _ = layer.router(x.reshape(-1, 8))
    ex = layer.experts
    expected = torch.zeros(10, 8, dtype=torch.float64)
    for t, token in enumerate(x.reshape(-1, 8)):
        top = probs[t].topk(2)
        gates = top.values / top.values.sum()
        for g, e in zip(gates, top.indices):
            hidden = F.silu(token @ ex.fc1[e] + ex.fc1_bias[e, 0]) * (token @ ex.gate[e] + ex.gate_bias[e, 0])
            expected[t] += g * (hidden @ ex.fc2[e] + ex.fc2_bias[e, 0])
    assert_close(out.reshape(-1, 8), expected, torch.float64)


def test_balance_loss_value_and_its_gradient_reaches_the_router():
    layer = _layer(router="softmax", aux_loss_weight=0.5).train()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    layer(x)
    probs, _ = layer.router(x.reshape(-1, 8))
    fraction = torch.bincount(probs.argmax(-1), minlength=4).double() / 21
    assert_close(layer.aux_loss, 0.5 * 4 * (fraction * probs.mean(0)).sum(), torch.float64)
    layer.aux_loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.load is not None and layer.load.sum().item() == pytest.approx(1.0)


def test_padding_tokens_are_not_routed():
    layer = _layer(capacity_factor=0.5).train()
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[False, False, False, False, True, True, True, True]])
    out = layer(x, mask)
    alone = layer(x[:, 4:])
    assert_close(out[:, 4:], alone, torch.float64)  # same capacity and routing as without the padding
    assert torch.all(out[:, :4] == 0)


@pytest.mark.parametrize("router", ["softmax", "xmoe", "xmoe_torchscale"])
def test_a_call_that_routes_no_token_has_zero_aux_loss(router):
    """An all-padding call (e.g. a chunk of a chunked prefill) routes nothing: aux loss 0, not NaN, and a
    backward through it still works."""
    layer = _layer(router=router).train()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    assert layer.aux_loss.item() == 0.0 and torch.all(out == 0)
    (out.sum() + layer.aux_loss).backward()
    assert torch.all(x.grad == 0)


def test_sparse_clip_scales_expert_gradients_in_the_norm_and_clips_them():
    model = sf.build(sf.load_preset("gpt-moe-tiny"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    n_expert = sum(p.numel() for p in experts)
    n_dense = sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)
    denom = math.sqrt(max(1, 4))  # one process, 4 experts
    expected = math.sqrt(n_dense + n_expert / denom**2)
    total = sparse_clip_grad_norm_(model, max_norm=1.0)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    coef = 1.0 / (expected + 1e-6)
    assert all(torch.allclose(p.grad, torch.full_like(p, coef)) for p in experts)  # experts are clipped too
    dense = next(p for p in model.parameters() if id(p) not in expert_ids)
    assert torch.allclose(dense.grad, torch.full_like(dense, coef))
