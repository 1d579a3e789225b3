"""Variants of the step on a representative subset: GPT-2, Llama and Gemma (full fine-tuning),
Llama with LoRA q/v, a Conv2d net and an LSTM read through ``h_n``.

- ``batch-1``: the first step has one sample; ``physical-batch-1``: a batch of 3 split into
  physical batches of 1; ``two-steps``: batches of 1, 3 and 2 in a row, the model moving between
  them (a one-time check on the first step must not hide a later error).
- ``checkpoint-reentrant`` / ``checkpoint-non-reentrant``: activation checkpointing on
  (transformers' ``gradient_checkpointing_enable``; ``torch.utils.checkpoint`` around the
  torch.nn models).
- ``bf16`` / ``fp16``: the weights in half precision, against the float64 loop on the same
  weights, tolerance ``TOL_BF16`` (2e-2) / ``TOL_FP16`` (5e-3); ``autocast-bf16``: float32
  weights, the engine's step under ``torch.autocast("cpu", bfloat16)``, ``TOL_BF16``;
  ``autocast-fp16`` likewise with float16, ``TOL_FP16``.
- ``per-layer`` / ``per-param``: per-group clipping; ``ghost-always`` / ``ghost-never``: the
  engine's ``ghost`` argument (ghost norms wherever possible, or never).

Plus T5 on a batch whose size equals the query length (the relative attention bias has a
``(q_len, k_len)`` gradient: its first axis must not be taken for the batch axis).
"""

from __future__ import annotations

import functools

import pytest
import torch

from .builders import LAYER_CASES, Case, Checkpointed, hf_case, seq2seq_batch, with_lora
from .harness import TOL_BF16, TOL_FP16


def _lora(case: Case) -> Case:
    return Case(lambda: with_lora(case.build(), "qv"), case.batch, case.loss)


def _checkpointed(case: Case, reentrant: bool) -> Case:
    return Case(lambda: Checkpointed(case.build(), reentrant), case.batch, case.loss)


SUBSET: dict[str, Case] = {
    "gpt2": hf_case("gpt2"),
    "llama": hf_case("llama"),
    "gemma": hf_case("gemma"),
    "llama-lora-qv": _lora(hf_case("llama")),
    "conv2d": LAYER_CASES["conv2d"],
    "lstm-hn": LAYER_CASES["lstm-batch-first-hn"],
}
HF = {"gpt2", "llama", "gemma", "llama-lora-qv"}


def _hf_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _to(dtype: torch.dtype):
    return lambda m: m.to(dtype)


# variant -> run_case keyword arguments
VARIANTS = {
    "batch-1": {"sizes": (1,)},
    "physical-batch-1": {"sizes": (3,), "max_physical_batch_size": 1},
    "two-steps": {"sizes": (1, 3, 2), "lr": 1.0},
    "checkpoint-reentrant": {"checkpoint": True},
    "checkpoint-non-reentrant": {"checkpoint": False},
    "bf16": {"transform": _to(torch.bfloat16), "tol": TOL_BF16},
    "fp16": {"transform": _to(torch.float16), "tol": TOL_FP16},
    "autocast-bf16": {"transform": _to(torch.float32), "autocast": torch.bfloat16, "tol": TOL_BF16},
    "autocast-fp16": {"transform": _to(torch.float32), "autocast": torch.float16, "tol": TOL_FP16},
    "per-layer": {"grouping": "per_layer"},
    "per-param": {"grouping": "per_param"},
    "ghost-always": {"ghost": "always"},
    "ghost-never": {"ghost": "never"},
}


# combinations torch itself cannot run (without dptrain): not part of the matrix
NOT_IN_TORCH = {("lstm-hn", "autocast-fp16")}  # oneDNN has no float16 LSTM on CPU


@functools.cache
def _lstm_autocasts(dtype: torch.dtype) -> bool:
    """Whether plain torch (no dptrain) runs an LSTM's forward and backward under CPU autocast
    to ``dtype``: oneDNN's support depends on the CPU's instruction set."""
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=dtype):
            out, _ = lstm(torch.randn(2, 5, 3))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    "name,variant",
    [(n, v) for n in SUBSET for v in VARIANTS if (n, v) not in NOT_IN_TORCH],
)
def test_variant(exact, name, variant):
    case, kwargs = SUBSET[name], dict(VARIANTS[variant])
    if name == "lstm-hn" and "autocast" in kwargs and not _lstm_autocasts(kwargs["autocast"]):
        pytest.skip("torch itself cannot run an LSTM under this autocast on this CPU (oneDNN)")
    reentrant = kwargs.pop("checkpoint", None)
    if reentrant is not None:
        if name in HF:
            kwargs["prepare"] = functools.partial(_hf_checkpointing, reentrant=reentrant)
        else:
            case = _checkpointed(case, reentrant)
    exact("variants", f"{name} {variant}", case, **kwargs)


def test_t5_query_length_equals_batch_size(exact):
    t5 = hf_case("t5")
    case = Case(t5.build, functools.partial(seq2seq_batch, length=4, target=4), t5.loss)
    exact("variants", "t5 q_len = k_len = B = 4", case, sizes=(4,))
