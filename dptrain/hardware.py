"""Where a run computes: the one resolution of ``training.device`` and the moves onto it.

``resolve_device(spec)`` maps the recipe's ``auto | cpu | cuda | cuda:N`` to a
:class:`torch.device`:

* ``auto``: ``cuda`` when :func:`torch.cuda.is_available`, else ``cpu``;
* ``cuda`` under ``torch.distributed`` (``--nproc``): ``cuda:LOCAL_RANK``, so each rank owns
  its GPU (``cuda:N``, one chosen GPU, is for one process and refused under ``--nproc``);
* ``cuda``/``cuda:N`` without CUDA (or with fewer GPUs): a :class:`~dptrain.errors.RecipeError`
  naming the fix.

Privacy does not depend on the device: the Poisson coins and the Gaussian noise are computed
on the CPU from the run key (:mod:`dptrain.noise`) and then moved, so a run draws the same
values on any device; only floating-point rounding of the model's arithmetic differs.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import Tensor

from .errors import RecipeError

DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+"


def _local_rank() -> int | None:
    """``LOCAL_RANK`` under torchrun, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str = "auto") -> torch.device:
    """The device of ``training.device: spec`` (see the module docstring)."""
    spec = str(spec).strip().lower()
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise RecipeError(
            f"training.device: {spec!r} is not a device. Fix: use auto, cpu, cuda or cuda:N"
        )
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(
            f"training.device: {spec} was asked for, but this machine has no usable CUDA "
            f"device (torch {torch.__version__}, CUDA build {torch.version.cuda}). Fix: set "
            "training.device: auto (or cpu) to train on the CPU, or install a CUDA build of "
            "torch on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        rank = _local_rank()
        index = rank if rank is not None else torch.cuda.current_device()
    else:
        index = int(spec.split(":")[1])
        if _local_rank() is not None:
            raise RecipeError(
                f"training.device: {spec} would put every --nproc rank on the same GPU. Fix: "
                "set training.device: cuda (rank r takes cuda:r; choose the GPUs with "
                "CUDA_VISIBLE_DEVICES)"
            )
    if index >= count:
        raise RecipeError(
            f"training.device: cuda:{index} does not exist (this machine has {count} CUDA "
            f"device(s)). Fix: choose cuda:0..cuda:{count - 1}, or run fewer --nproc ranks"
        )
    return torch.device("cuda", index)


FULL_RATE_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
"""CUDA compute capabilities whose float64 runs at half the float32 rate or better (P100, V100,
A100, H100/H200, B200); the others run it at 1/32-1/64."""


def float64_note(major: int, minor: int) -> str:
    """What a GPU of compute capability ``major.minor`` should say about float64: the ghost
    norms' Gram matrices are float32 with a certified error for the wide layers of runs with a
    public length bound (``dptrain train``), float64 elsewhere and for the samples float32
    cannot certify (the certified clip bound, :mod:`dptrain.clipping`)."""
    if (major, minor) in FULL_RATE_FLOAT64:
        return ""
    return (
        "; float64 at 1/32-1/64 of its float32 rate: ghost norms that float32 cannot certify "
        "(float64 Grams) cost more here than on datacenter GPUs"
    )


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200, 139.8 GiB)`` or ``cpu (2 threads)``: what the run says it uses
    (and, for a GPU with slow float64, :func:`float64_note`)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        note = float64_note(props.major, props.minor)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB{note})"
    return f"{device} ({torch.get_num_threads()} threads)"


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, dicts, tuples, lists of them) with every tensor on ``device``.
    Tensors already there are returned as they are; host-to-GPU copies are non-blocking from
    pinned memory."""
    if isinstance(batch, Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (cpu for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
