"""Op tests run with uninitialised memory poisoned: every floating tensor made by ``torch.empty``,
``torch.empty_like``, ``Tensor.new_empty`` or ``torch.empty_strided`` starts as NaN, so a fast path that
forgets to write part of its output (or reads a buffer before writing it) fails its comparison instead of
passing on whatever the allocator left there (often zeros)."""

import pytest
import torch


def _poisoned(make):
    def wrapper(*args, **kwargs):
        out = make(*args, **kwargs)
        if out.dtype.is_floating_point or out.dtype.is_complex:
            with torch.no_grad():
                out.fill_(float("nan"))
        return out
    return wrapper


@pytest.fixture(autouse=True)
def poison_uninitialised_outputs(monkeypatch):
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
