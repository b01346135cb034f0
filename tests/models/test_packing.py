"""Packed documents: a row holding several documents (``document_ids``) gives every document the logits it
gets alone — positions restart, attention never crosses a boundary, retention and dilated states reset."""

import pytest
import torch

import scaleformer as sf
from scaleformer.config import MoEConfig
from scaleformer.layers.context import DocumentRows, positions_from_mask
from tests.conftest import POSITIONS, assert_close, make_model, tiny

RETNET = sf.RetNetConfig(vocab_size=97, embed_dim=32, value_dim=48, heads=2, ffn_dim=40, layers=2, chunk_size=3)
LENGTHS = [[3, 5, 4], [7, 5]]  # documents per row; both rows 12 tokens


def _packed(lengths=LENGTHS, pad_row=None):
    """ids (B, T), document ids (B, T), attention mask (B, T) or None, and each document's ids alone."""
    ids = torch.randint(0, 97, (len(lengths), sum(lengths[0])))
    documents = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in lengths])
    mask = None
    if pad_row is not None:  # the first document of that row starts with padding
        mask = torch.ones_like(ids)
        mask[pad_row, :pad_row + 1] = 0
    alone = []
    for b, row in enumerate(lengths):
        for d in range(len(row)):
            real = (documents[b] == d) & (mask[b].bool() if mask is not None else True)
            alone.append((b, real, ids[b, real]))
    return ids, documents, mask, alone


def _check(model, pad_row=None, **kwargs):
    ids, documents, mask, alone = _packed(pad_row=pad_row)
    packed = model(ids, attention_mask=mask, document_ids=documents, **kwargs).logits
    for b, real, doc in alone:
        assert_close(packed[b, real], model(doc[None], **kwargs).logits[0])
    assert not torch.allclose(packed, model(ids, attention_mask=mask, **kwargs).logits, atol=1e-4)  # packing mattered


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_packed_row_equals_documents_alone(position):
    _check(make_model(tiny(position=position, norm="subln")))
    _check(make_model(tiny(position=position)), pad_row=1)


@pytest.mark.parametrize("position", ["absolute", "rope", "relative"])
def test_encoder_packed_row_equals_documents_alone(position):
    _check(make_model(tiny("encoder", position=position)), pad_row=0)


@pytest.mark.parametrize("options", [dict(kv_heads=2, window=3), dict(blockwise_causal_block=2, position="xpos"),
                                     dict(moe=MoEConfig(experts=3, top_k=2, every=1, eval_capacity_factor=None))])
def test_attention_options_packed_row_equals_documents_alone(options):
    _check(make_model(tiny(**options)), pad_row=1)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_dilated_packed_row_restarts_segments_with_each_document(arch):
    cfg = tiny(arch, position="xpos", attention="dilated", segment_lengths=(2, 4), dilation_rates=(1, 2))
    _check(make_model(cfg))
    _check(make_model(cfg.replace(attention_impl="reference")), pad_row=1)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_retnet_packed_row_starts_each_document_from_an_empty_state(form):
    torch.manual_seed(0)
    model = sf.build(RETNET).eval()
    _check(model, form=form)
    _check(model, pad_row=1, form=form)


def test_positions_restart_at_each_document_and_count_real_tokens():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    assert positions_from_mask(torch.ones_like(mask), None, documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert positions_from_mask(mask, None, documents)[mask].tolist() == [0, 1, 0, 0, 1, 2]
    rows = DocumentRows.of(documents, mask)
    assert rows.index.tolist() == [[0, 1, 2], [3, 4, 0], [5, 6, 7]]
    assert rows.valid.tolist() == [[False, True, True], [True, False, False], [True, True, True]]
    x = torch.randn(1, 8, 3)
    assert torch.equal(rows.scatter(rows.gather(x), 8), x)


def test_document_ids_are_checked():
    model = make_model(tiny())
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="document_ids must have the shape of input_ids"):
        model(ids, document_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer document ids"):
        model(ids, document_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="decode with a cache one document per row"):
        model(ids, document_ids=torch.zeros(2, 5, dtype=torch.long), use_cache=True)


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "relative"])
def test_encoder_decoder_packed_pairs_equal_each_pair_alone(position):
    """Source documents packed in one row, targets in another: target document k reads only source
    document k, and every pair gets the logits it gets alone."""
    model = make_model(tiny("encoder_decoder", position=position, norm="deepnorm"))
    src_lengths, tgt_lengths = [[4, 6], [3, 7]], [[5, 3], [6, 2]]
    src, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 8))
    docs = lambda lengths: torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    src_docs, tgt_docs = docs(src_lengths), docs(tgt_lengths)
    packed = model(src, tgt, src_document_ids=src_docs, tgt_document_ids=tgt_docs).logits
    for b in range(2):
        for d in range(2):
            alone = model(src[b, src_docs[b] == d][None], tgt[b, tgt_docs[b] == d][None]).logits[0]
            assert_close(packed[b, tgt_docs[b] == d], alone)
    with pytest.raises(ValueError, match="needs the source document with its id"):
        model(src, tgt, src_document_ids=torch.zeros_like(src), tgt_document_ids=tgt_docs)
    with pytest.raises(ValueError, match="need both"):
        model(src, tgt, src_document_ids=src_docs)


@pytest.mark.parametrize("preset", ["gpt-tiny", "gret-tiny", "retnet-tiny", "s2-tiny", "tnl-tiny", "longnet-tiny"])
def test_a_reused_id_starts_a_new_document_for_every_mixer(preset):
    """One definition for every mixer: a document is a maximal run of equal ids, so [0,0,0,1,1,1,0,0,0]
    holds three documents, as [0,0,0,1,1,1,2,2,2] does (attention once grouped the first and last by id)."""
    torch.manual_seed(0)
    model = sf.build(sf.load_preset(preset)).to(torch.float64).eval()
    ids = torch.randint(1, 200, (1, 9))
    reused = model(ids, document_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0]])).logits
    distinct = model(ids, document_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])).logits
    assert torch.equal(reused, distinct)
    assert_close(reused[0, 6:], model(ids[:, 6:]).logits[0], torch.float64)  # the last run alone


def test_packed_pairs_refuse_an_id_used_for_two_runs():
    model = make_model(tiny("encoder_decoder"))
    src, tgt = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 6))
    with pytest.raises(ValueError, match="tgt_document_ids row 0: an id is used for two separate runs"):
        model(src, tgt, src_document_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]),
              tgt_document_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))
