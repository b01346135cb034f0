"""Bad inputs to a model's forward get one clear ValueError naming the problem (none is silently accepted)."""

import pytest
import torch

import scaleformer as sf
from tests.conftest import make_model, tiny

RETNET = sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, heads=2, ffn_dim=48, layers=2, chunk_size=4)
MODELS = {"decoder": tiny(position="rope"), "retnet": RETNET, "encoder": tiny("encoder")}


def _model(name):
    torch.manual_seed(0)
    return sf.build(MODELS[name]).eval()


IDS = torch.randint(0, 97, (2, 5))
CASES = {
    "id past the vocabulary": (dict(input_ids=torch.tensor([[1, 2, 97]])), r"ids outside \[0, 97\).*span \[1, 97\]"),
    "negative id": (dict(input_ids=torch.tensor([[-1, 2]])), r"ids outside \[0, 97\)"),
    "float ids": (dict(input_ids=IDS.float()), "must hold integer token ids, got torch.float32"),
    "1-D ids": (dict(input_ids=IDS[0]), r"must have shape \(batch, length\), got \(5,\)"),
    "empty ids": (dict(input_ids=IDS[:, :0]), r"input_ids is empty"),
    "mask value 2": (dict(input_ids=IDS, attention_mask=torch.full((2, 5), 2)), r"only 0 \(padding\) and 1.*\[2"),
    "mask value -1": (dict(input_ids=IDS, attention_mask=-torch.ones(2, 5, dtype=torch.long)), r"found \[-1"),
    "mask value 0.5": (dict(input_ids=IDS, attention_mask=torch.full((2, 5), 0.5)), r"found \[0.5"),
    "mask value NaN": (dict(input_ids=IDS, attention_mask=torch.full((2, 5), float("nan"))), r"found \[nan"),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_are_named(name, case):
    kwargs, message = CASES[case]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        _model(name)(**kwargs)


def test_encoder_decoder_names_the_argument():
    model = make_model(tiny("encoder_decoder"))
    with pytest.raises(ValueError, match="src_ids holds ids outside"):
        model(torch.tensor([[500]]), IDS)
    with pytest.raises(ValueError, match="tgt_mask must hold only 0"):
        model(IDS, IDS, tgt_mask=torch.full((2, 5), 3))


@pytest.mark.parametrize("name", ["decoder", "retnet"])
def test_a_cache_stepped_with_another_batch_size_is_refused(name):
    model = _model(name)
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
        with pytest.raises(ValueError, match="the cache holds 2 rows but input_ids has 3"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)  # the right batch still works


def test_valid_masks_of_any_dtype_are_accepted_and_mean_the_same():
    model = _model("decoder")
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(IDS, attention_mask=mask.bool()).logits
        for dtype in (torch.long, torch.int32, torch.float32):
            assert torch.equal(model(IDS, attention_mask=mask.to(dtype)).logits, expected)
