"""Worker for the context-parallel tests, run by torch.multiprocessing in W processes (gloo, CPU, float64).

For every mixer's example (the conformance suite's cases) it compares a sequence split across the ranks
with the whole sequence in one process: each rank's logits and the summed parameter gradients."""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from scaleformer.parallel.context import COMM


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


def compare(model: torch.nn.Module, ids: torch.Tensor, group, mask: torch.Tensor | None = None,
            documents: torch.Tensor | None = None, **kwargs) -> tuple[float, float, int]:
    """(output error, largest gradient error, bytes sent) of ``model`` on ``ids`` (with padding ``mask`` and
    packed ``documents``) split across ``group``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = ids.shape[1] // world
    shard = slice(rank * n, (rank + 1) * n)
    if mask is not None:
        kwargs["attention_mask"] = mask
    if documents is not None:
        kwargs["document_ids"] = documents
    full = model(ids, **kwargs).logits
    weights = torch.randn(full.shape, dtype=full.dtype, generator=torch.Generator().manual_seed(5))
    if mask is not None:  # what a padded position outputs is unspecified (as in the conformance suite): not compared
        weights = weights * mask[..., None].to(weights.dtype)
        full = full * mask[..., None].to(full.dtype)
    (full * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    COMM.reset()
    if mask is not None:
        kwargs["attention_mask"] = mask[:, shard]
    if documents is not None:
        kwargs["document_ids"] = documents[:, shard]
    local = model(ids[:, shard], sequence_group=group, **kwargs).logits
    if mask is not None:
        local = local * mask[:, shard, None].to(local.dtype)
    (local * weights[:, shard]).sum().backward()
    sent = COMM.sent
    grad_error = 0.0
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grad, group=group)  # each rank's loss is its shard's: the whole loss's gradient is their sum
        if name in expected:
            grad_error = max(grad_error, _relative(grad, expected[name]))
        else:
            grad_error = max(grad_error, grad.abs().max().item())
    model.zero_grad(set_to_none=True)
    return _relative(local, full[:, shard]), grad_error, sent


def _on_ranks(rank: int, world: int, port: int, out_path: str, work) -> None:
    """Join a gloo group of ``world`` processes, run ``work()`` on this rank, and have rank 0 save every
    rank's result (a list, in rank order) to ``out_path``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gathered = [None] * world
        dist.all_gather_object(gathered, work())
        if rank == 0:
            torch.save(gathered, out_path)
        dist.barrier()  # nobody leaves while a peer's last message may still be on its way
    finally:
        dist.destroy_process_group()


def packed_documents(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document ids, padding mask) of two packed rows of ``length`` 32 whose documents straddle the splits
    into 2 and 4: row 0's documents [0, 5) [5, 19) [19, 22) [22, 32) (on 4 ranks one document covers rank 1
    whole, and rank 3's convolution halo reaches into the document before its own); row 1's [0, 16) [16, 32)
    (a document starting exactly where a rank does), its last 3 positions padding."""
    assert length == 32
    documents = torch.tensor([[0] * 5 + [1] * 14 + [2] * 3 + [3] * 10, [0] * 16 + [1] * 16])
    mask = torch.ones_like(documents)
    mask[1, -3:] = 0
    return documents, mask


def run_cases(rank: int, world: int, port: int, length: int, out_path: str) -> None:
    """Every mixer's example, with whole rows, with a row left-padded past the first quarter (on 4 ranks,
    rank 0 then holds only its padding), and with packed documents across the split: per case, [whole,
    padded, documents], each (errors, bytes) or the error."""
    from tests.models.test_mixer_contract import CASES, VOCAB, build, model_config

    def work() -> dict:
        results = {}
        for name, mixers in CASES.items():
            model = build(model_config(mixers)).train()  # train(): as in training (no dropout is configured)
            ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
            mask = torch.ones_like(ids)
            mask[1, :length // 4 + 3] = 0
            documents, packed_mask = packed_documents(length)
            results[name] = []
            for padding, packed in ((None, None), (mask, None), (packed_mask, documents)):
                try:
                    results[name].append(compare(model, ids, dist.group.WORLD, padding, packed))
                except ValueError as error:
                    results[name].append(str(error))
                except Exception:  # noqa: BLE001 - reported to the test, which fails with it
                    results[name].append("crash: " + traceback.format_exc())
        return results

    _on_ranks(rank, world, port, out_path, work)


PRESETS = ("gdn-hybrid-tiny", "samba-tiny", "jamba-tiny", "yoco-tiny", "yoco-mamba2-tiny", "retnet-tiny", "gpt-tiny")


def run_presets(rank: int, world: int, port: int, length: int, out_path: str) -> None:
    """The hybrids of each kind (and a RetNet and a GPT) as whole presets, split across the ranks, at two
    lengths (to compare the bytes each rank sends)."""
    import scaleformer as sf

    def work() -> dict:
        results = {}
        for name in PRESETS:
            torch.manual_seed(0)
            model = sf.build(sf.load_preset(name)).double()
            results[name] = [compare(model, torch.randint(0, model.config.vocab_size, (2, size),
                                                          generator=torch.Generator().manual_seed(3)), dist.group.WORLD)
                             for size in (length, 2 * length)]
        return results

    _on_ranks(rank, world, port, out_path, work)


def run_refusals(rank: int, world: int, port: int, out_path: str) -> None:
    """Calls a split cannot take: each must fail with the same one line on every rank, and none may hang."""
    import scaleformer as sf

    def work() -> dict:
        torch.manual_seed(0)
        model = sf.build(sf.load_preset("gdn-hybrid-tiny")).double()
        ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(3))
        group = dist.group.WORLD
        calls = {
            "uneven": lambda: model(ids[:, : 8 if rank == 0 else 6], sequence_group=group),
            "dilated padding": lambda: sf.build(sf.load_preset("longnet-tiny")).double()(
                ids, attention_mask=torch.ones_like(ids), sequence_group=group),
            "cache": lambda: model(ids, use_cache=True, sequence_group=group),
            "dilated documents": lambda: sf.build(sf.load_preset("longnet-tiny")).double()(
                ids, document_ids=torch.zeros_like(ids), sequence_group=group),
            "relative": lambda: sf.build(sf.load_preset("gpt-tiny", position="relative")).double()(
                ids, sequence_group=group),
        }
        messages = {}
        for name, call in calls.items():
            try:
                call()
                messages[name] = "no error"
            except ValueError as error:
                messages[name] = str(error)
        dist.barrier()  # every rank got here: nothing hung
        return messages

    _on_ranks(rank, world, port, out_path, work)


def run_balance(rank: int, world: int, port: int, out_path: str) -> None:
    """A GPT (dense causal attention) split with the causal work balanced and not: per mode, the errors
    against one process (rows whole, left-padded, packed), the bytes sent and the (query, key) pairs scored."""
    import scaleformer as sf
    from scaleformer.parallel.context import causal_balance

    def work() -> dict:
        torch.manual_seed(0)
        model = sf.build(sf.load_preset("gpt-tiny")).double()
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        mask[1, :11] = 0
        documents, packed_mask = packed_documents(32)
        results = {}
        for balanced in (True, False):
            with causal_balance(balanced):
                runs = [compare(model, ids, dist.group.WORLD, padding, packed)
                        for padding, packed in ((None, None), (mask, None), (packed_mask, documents))]
                results[balanced] = {"errors": [run[:2] for run in runs], "sent": runs[0][2],
                                     "scored": COMM.scored}
        return results

    _on_ranks(rank, world, port, out_path, work)
