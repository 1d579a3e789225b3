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
lives on the CPU (it travels as Flower arrays); the server's linear algebra (FedSVD's QRs and
its ``r x r`` SVD) runs on the ``device`` it is given (the server recipe's
``training.device``), in float64, and its results come back to the CPU: on the CPU that is the
computation itself.
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
            p = params[name]
            p.copy_(torch.as_tensor(value, dtype=p.dtype, device=p.device))


def pairs(state: State) -> list[tuple[str, str]]:
    """``(A name, B name)`` of each LoRA module in ``state``."""
    return [(n, n.replace(_A, _B)) for n in sorted(state) if _A in n and n.replace(_A, _B) in state]


def orthonormal_rows(a: Tensor, device: torch.device | None = None) -> Tensor:
    """The ``(r, in)`` matrix with orthonormal rows spanning the rows of ``a`` (QR in float64
    on ``device``, default ``a``'s; the result on ``a``'s device)."""
    q, _ = torch.linalg.qr(a.to(device or a.device, torch.float64).T)
    return q.T.to(a.device, a.dtype).contiguous()


def refactorize(a: Tensor, b: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """FedSVD: ``(A', B')`` with ``B' A'`` the rank-``r`` truncated SVD of ``M = B A`` and
    ``A' = V_r^T`` (orthonormal rows), ``B' = U_r S_r``; computed in float64 on ``device``
    (default ``a``'s), returned on the devices of ``a`` and ``b``.

    ``M`` (``d x k``) has rank at most ``r``, so it is never formed: with the thin QR
    factorizations ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (``Q_B`` ``d x r``, ``Q_A`` ``k x r``,
    orthonormal columns; ``R_B``, ``R_A`` ``r x r``) and the SVD of the ``r x r`` core
    ``R_B R_A^T = U_c S V_c^T``,

        ``M = Q_B R_B R_A^T Q_A^T = (Q_B U_c) S (Q_A V_c)^T``

    is a thin SVD of ``M`` (``Q_B U_c`` and ``Q_A V_c`` have orthonormal columns), so
    ``A' = V_c^T Q_A^T`` and ``B' = Q_B U_c S``.  Cost ``O((d + k) r^2 + r^3)`` instead of the
    full SVD's ``O(d k min(d, k))``.  Singular vectors are unique up to sign (for distinct
    singular values) and up to a rotation within repeated ones, e.g. the null space of a
    rank-deficient ``M``, where ``A'`` keeps directions of ``span(A^T)``; the sign is fixed by
    :func:`_sign_convention` (the largest-magnitude entry of each row of ``A'`` is positive), so
    the result does not depend on the LAPACK or cuSOLVER conventions.

    Privacy: unchanged.  ``A`` is the public global factor and ``B`` the (weighted mean of
    the) released client factors, so ``(A', B')`` is post-processing of DP outputs; no data
    and no randomness enter here.
    """
    r, (d, k), where = a.shape[0], (b.shape[0], a.shape[1]), device or a.device
    if b.shape[1] != r or r > min(d, k):
        raise RecipeError(
            f"LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)}: FedSVD needs A (r, in) "
            "and B (out, r) with r <= min(in, out). Fix: a smaller lora.r"
        )
    q_b, r_b = torch.linalg.qr(b.to(where, torch.float64))  # (d, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.to(where, torch.float64).T)  # (k, r), (r, r)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T)
    u_c, vh_c = _sign_convention(u_c, vh_c @ q_a.T)  # vh_c <- V_c^T Q_A^T, (r, k)
    return (
        vh_c.to(a.device, a.dtype).contiguous(),
        ((q_b @ u_c) * s).to(b.device, b.dtype).contiguous(),
    )


def _sign_convention(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular pairs ``(u_i, v_i) -> (-u_i, -v_i)`` (each term ``s_i u_i v_i^T`` is
    unchanged) so that the entry of largest magnitude of each row of ``vh`` is positive."""
    top = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    signs = torch.where(top < 0, -1.0, 1.0).to(vh.dtype)
    return u * signs, vh * signs[:, None]


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
