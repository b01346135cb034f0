import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from tests.conftest import NORMS, assert_close, fast_and_reference, make_model, tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch,position,norm", [
    ("decoder", "xpos", "subln"), ("decoder", "relative", "deepnorm"), ("encoder", "relative", "pre"),
    ("encoder", "absolute", "post"), ("encoder_decoder", "rope", "deepnorm"), ("encoder_decoder", "sinusoidal", "subln"),
])
def test_sdpa_model_matches_reference_model_logits_and_gradients(arch, position, norm, dtype):
    cfg = tiny(arch, position=position, norm=norm, ffn="glu", activation="swish")
    fast, ref = fast_and_reference(cfg, dtype)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    if arch == "encoder_decoder":
        call = lambda m: m(ids, ids[:, :6], src_mask=mask).logits
    else:
        call = lambda m: m(ids, attention_mask=mask).logits
    out_fast, out_ref = call(fast), call(ref)
    assert_close(out_fast, out_ref, dtype)
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in fast.named_parameters():
        assert_close(param.grad, ref_grads[name].grad, dtype)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = sf.build(tiny(position="rope", norm="subln", dropout=0.1, drop_path=0.1)).train()
    data = torch.randint(0, 97, (8, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        out = model(data[:, :-1])
        return F.cross_entropy(out.logits.flatten(0, 1), data[:, 1:].flatten()) + out.aux_loss

    first = loss_fn().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0, (first, loss.item())


@pytest.mark.parametrize("norm", NORMS)
def test_activation_checkpointing_gives_the_same_gradients(norm):
    cfg = tiny(position="relative", norm=norm)
    plain = make_model(cfg).train()
    ckpt = make_model(cfg.replace(checkpoint_activations=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 8))
    for model in (plain, ckpt):
        model(ids).logits.square().mean().backward()
    ckpt_params = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        assert_close(ckpt_params[name].grad, param.grad)


def test_dropout_and_drop_path_act_only_in_training():
    model = make_model(tiny(dropout=0.3, attention_dropout=0.3, activation_dropout=0.3, drop_path=0.5))
    ids = torch.randint(0, 97, (2, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)  # eval: deterministic
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    rates = [block.drop_path.p for block in model.decoder.blocks]
    assert rates == pytest.approx([0.0, 0.5])  # linear from 0 to drop_path


def test_models_own_embeddings_and_heads():
    tied = sf.build(tiny())
    assert tied.output_projection is None
    untied = sf.build(tiny(tie_embeddings=False))
    assert untied.output_projection is not None
    assert untied.output_projection.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    separate = sf.build(tiny("encoder_decoder", share_encoder_decoder_embeddings=False))
    assert separate.decoder.embed_tokens is not separate.encoder.embed_tokens


def test_encoder_rejects_cache_and_multiway_needs_split():
    with pytest.raises(ValueError, match="Encoder is bidirectional"):
        sf.build(tiny("encoder"))(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="pass multiway_split"):
        sf.build(tiny(multiway=2))(torch.zeros(1, 3, dtype=torch.long))


def test_xpos_overflow_is_a_clear_error():
    model = make_model(tiny(position="xpos", xpos_scale_base=1.0, max_positions=512))
    with pytest.raises(ValueError, match="overflows xPos scaling"):
        model(torch.zeros(1, 200, dtype=torch.long))
