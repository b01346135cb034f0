"""RetNet's ablations (its Table 5) as Retention options: each changes what it names, and the three forms
still agree, with padding and from a cached state."""

import pytest
import torch

import scaleformer as sf
from scaleformer.layers.retention import retention_log_decays
from tests.conftest import assert_close


def _hybrid(**options):
    layer = sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=32, chunk_size=3, **options), ffn=sf.GLU(ffn_dim=32))
    torch.manual_seed(0)
    return sf.build(sf.ModelConfig(vocab_size=50, embed_dim=16, layers=(layer, layer), position=sf.NoPosition())).double().eval()


@pytest.mark.parametrize("options", [dict(gate=False), dict(head_norm=False), dict(decay="shared"), dict(decay="none")])
def test_every_ablation_keeps_the_forms_and_cached_decoding_exact(options):
    model = _hybrid(**options)
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask, form="parallel").logits
    for form in ("chunkwise", "recurrent"):
        assert_close(model(ids, attention_mask=mask, form=form).logits, full, torch.float64)
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 11):
        out = model(ids[:, t:t + 1], cache=out.cache)
        steps.append(out.logits)
    assert_close(torch.cat(steps, 1)[1, 3:], full[1, 3:], torch.float64)
    assert_close(torch.cat(steps, 1)[0], full[0], torch.float64)


def test_ablations_change_what_they_name():
    mixer = _hybrid(gate=False).decoder.blocks[0].mixer
    assert mixer.g_proj is None and "g_proj" not in dict(mixer.named_parameters())
    assert isinstance(_hybrid(head_norm=False).decoder.blocks[0].mixer.head_norm, torch.nn.Identity)
    assert torch.equal(retention_log_decays(3, "none"), torch.zeros(3, dtype=torch.float64))
    shared = retention_log_decays(3, "shared").exp()
    assert torch.allclose(shared, torch.full((3,), 1 - 2**-5, dtype=torch.float64))
    ids = torch.randint(0, 50, (1, 9))
    base = _hybrid()(ids).logits
    for options in (dict(decay="shared"), dict(decay="none"), dict(head_norm=False)):
        other = _hybrid(**options)
        other.load_state_dict(_hybrid().state_dict())
        assert not torch.allclose(other(ids).logits, base, atol=1e-6), options
