"""See writes to a model's parameters through ``.data`` while a private step runs.

``p.data`` is a fresh tensor with a version counter of its own, so a write through it leaves
``p._version`` alone and a per-step check of the counters misses it.  While a
:class:`DataWatch` is active, ``nn.Parameter.data`` is a property that, the first time a step
reads or sets ``.data`` of one of the model's parameters, takes that parameter's fingerprint
(sum and norm in float64) *before* handing out the alias (so before any write through it) and
notes which of the model's modules asked.  After the step, :meth:`DataWatch.moved` compares
those parameters with their fingerprints.

Cost per step: setting and removing one class attribute; nothing per operator; one
fingerprint per parameter whose ``.data`` is touched (none in most models).  Writes that go
around ``torch`` entirely (a NumPy view of the storage) are not seen.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import Tensor, nn

_BASE = torch._C.TensorBase.data  # the C descriptor: plain ``.data``
_LOCK = threading.Lock()
_ACTIVE: list[DataWatch] = []  # watches of steps running now (any thread)


def fingerprint(t: Tensor) -> tuple[float, float]:
    """``(sum, norm)`` of ``t`` in float64, outside every torch-function mode."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        return (
            float(t.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(t, dtype=torch.float64)),
        )


def _get(p: Tensor) -> Tensor:
    for w in tuple(_ACTIVE):
        w.touch(p)
    return _BASE.__get__(p)


def _set(p: Tensor, value: Tensor) -> None:
    for w in tuple(_ACTIVE):
        w.touch(p)
    _BASE.__set__(p, value)


_PROPERTY = property(_get, _set, doc="``Tensor.data``, watched during a private step")


class DataWatch:
    """Fingerprints of the model's parameters whose ``.data`` one step touched."""

    def __init__(self, model: nn.Module) -> None:
        self._params = {id(p): n for n, p in model.named_parameters()}
        self._modules = {id(m): n or "<model>" for n, m in model.named_modules()}
        self._seen: dict[str, tuple[Tensor, tuple[float, float], str]] = {}

    def touch(self, p: Tensor) -> None:
        name = self._params.get(id(p))
        if name is None or name in self._seen:
            return
        self._seen[name] = (p, fingerprint(_BASE.__get__(p)), self._caller())

    def _caller(self) -> str:
        """The innermost of the model's modules whose code is running (``self`` of a frame)."""
        frame = sys._getframe(3)
        while frame is not None:
            me = frame.f_locals.get("self")
            if isinstance(me, nn.Module) and id(me) in self._modules:
                return f"'{self._modules[id(me)]}' ({type(me).__name__})"
            frame = frame.f_back
        return "code outside the model's modules"

    def moved(self) -> list[tuple[str, str]]:
        """``(parameter, where)`` for each touched parameter whose values changed."""
        out = []
        seen, self._seen = self._seen, {}
        for name, (p, before, where) in seen.items():
            after = fingerprint(_BASE.__get__(p))
            if not all(a == b or (a != a and b != b) for a, b in zip(before, after, strict=True)):
                out.append((name, where))
        return out

    def __enter__(self) -> DataWatch:
        self._seen = {}
        with _LOCK:
            if not _ACTIVE:
                nn.Parameter.data = _PROPERTY  # type: ignore[assignment]
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                del nn.Parameter.data
