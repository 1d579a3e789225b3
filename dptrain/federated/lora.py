"""LoRA adapters as the federated state, and the three ways a server combines them.

A LoRA module adds ``(alpha / r) B A x`` to a frozen layer, with ``A`` of shape ``(r, in)``
(peft's ``lora_A``) and ``B`` of shape ``(out, r)`` (``lora_B``).  The global state is every
``A`` and ``B``; what clients train and send, and the server step, depend on the strategy:

``dp_lora``   clients train ``A`` and ``B``; the server averages each.  The average of the
              products is not the product of the averages, and DP noise on both factors
              enters the update through their product (quadratic noise amplification).
``ffa_lora``  ``A`` stays at its random initialization; clients train and send only ``B``;
              the server averages ``B`` (FFA-LoRA, Sun et al. 2024).
``fedsvd``    ``A`` starts orthonormal (QR of the random init, B = 0); clients train and send
              only ``B``; the server averages ``B``, forms ``M = mean(B) A`` and re-factorizes
              its rank-``r`` SVD ``M = U S V^T``: ``A <- V_r^T`` (orthonormal rows, the
              principal input directions of the update), ``B <- U_r S_r``.  As ``M`` has rank
              at most ``r`` the new ``B A`` equals ``M`` exactly: the step re-parametrizes
              without changing the model.  With ``A`` orthonormal, ``||dL/dB|| <=
              ||dL/dW||`` (``A^T`` is an isometry), so clipping at ``C`` loses less signal.
              (Lee et al. 2025, "FedSVD: Adaptive Orthogonalization for Private Federated
              Learning with LoRA".)

Server steps read only released (DP) client outputs: they are post-processing.  The state
lives on the CPU (it travels as Flower arrays); the server's linear algebra (FedSVD's QR and
SVD) runs on the ``device`` it is given (the server recipe's ``training.device``), in float64,
and its results come back to the CPU: on the CPU that is the computation itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import RecipeError

State = dict[str, Tensor]
_A, _B = ".lora_A.", ".lora_B."


def lora_state(model: nn.Module) -> State:
    """Every LoRA ``A`` and ``B`` of ``model`` (detached CPU copies, wherever the model is), by
    parameter name."""
    state = {
        n: p.detach().to("cpu", copy=True)
        for n, p in model.named_parameters()
        if _A in n or _B in n
    }
    if not state:
        raise ValueError("the model has no LoRA adapters (lora_A / lora_B parameters)")
    return state


def load_lora_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's LoRA parameters (every one must be present)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(set(lora_state(model)) - set(state))
    if unknown or missing:
        raise ValueError(
            f"adapter state does not fit the model (unknown {unknown[:2]}, missing {missing[:2]}): "
            "server and clients must use the same model and lora sections"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.as_tensor(value).to(params[name].dtype))


def pairs(state: State) -> list[tuple[str, str]]:
    """``(A name, B name)`` of each LoRA module in ``state``."""
    return [(n, n.replace(_A, _B)) for n in sorted(state) if _A in n and n.replace(_A, _B) in state]


def orthonormal_rows(a: Tensor, device: torch.device | None = None) -> Tensor:
    """The ``(r, in)`` matrix with orthonormal rows spanning the rows of ``a`` (QR in float64
    on ``device``, default ``a``'s; the result on ``a``'s device)."""
    q, _ = torch.linalg.qr(a.to(device or a.device, torch.float64).T)
    return q.T.to(a.device, a.dtype).contiguous()


def refactorize(a: Tensor, b: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """FedSVD: ``(A', B')`` with ``B' A'`` the rank-``r`` truncated SVD of ``B A`` and
    ``A' = V_r^T`` (orthonormal rows), ``B' = U_r S_r``; computed in float64 on ``device``
    (default ``a``'s), returned on the devices of ``a`` and ``b``."""
    r, where = a.shape[0], device or a.device
    m = b.to(where, torch.float64) @ a.to(where, torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (
        vh[:r].to(a.device, a.dtype).contiguous(),
        (u[:, :r] * s[:r]).to(b.device, b.dtype).contiguous(),
    )


@dataclass(frozen=True)
class LoraStrategy:
    """What clients train and how the server initializes and updates the global adapters."""

    name: str
    trains: tuple[str, ...]  # which factors clients train and send: "A", "B"
    init: Callable[..., State]  # (state, device=None) -> initial global
    merge: Callable[..., State]  # (global, mean of client updates, device=None) -> new global

    def trainable(self, name: str) -> bool:
        return any(f".lora_{f}." in name for f in self.trains)


def _keep(state: State, device: torch.device | None = None) -> State:
    return dict(state)


def _replace(global_state: State, mean: State, device: torch.device | None = None) -> State:
    return {**global_state, **mean}


def _orthonormal_init(state: State, device: torch.device | None = None) -> State:
    out = dict(state)
    for a, b in pairs(state):
        out[a] = orthonormal_rows(state[a], device)
        out[b] = torch.zeros_like(state[b])
    return out


def _svd_merge(global_state: State, mean: State, device: torch.device | None = None) -> State:
    out = {**global_state, **mean}
    for a, b in pairs(out):
        out[a], out[b] = refactorize(out[a], out[b], device)
    return out


STRATEGIES: dict[str, LoraStrategy] = {
    "dp_lora": LoraStrategy("dp_lora", ("A", "B"), _keep, _replace),
    "ffa_lora": LoraStrategy("ffa_lora", ("B",), _keep, _replace),
    "fedsvd": LoraStrategy("fedsvd", ("B",), _orthonormal_init, _svd_merge),
}


def get_strategy(name: str) -> LoraStrategy:
    if name not in STRATEGIES:
        raise RecipeError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
