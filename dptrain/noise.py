"""Gaussian noise sources: a seeded ``torch.Generator`` (reproducible) or a secure one.

The secure source draws uniforms from the operating system's CSPRNG (``os.urandom``: 53-bit
uniforms in (0, 1]) and turns them into normals by Box-Muller in float64.  It cannot be replayed,
so a resumed secure run continues with fresh noise.  Floating-point artifacts of sampling
(Mironov 2012) are not addressed by either source.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor


class GaussianNoise:
    """``noise(like, std)`` returns ``N(0, std^2)`` shaped like ``like``."""

    def __init__(self, seed: int | None = 0, *, secure: bool = False) -> None:
        self.secure = secure
        self.seed = seed
        self.generator = torch.Generator()
        self._device_generators: dict[str, torch.Generator] = {}
        if not secure:
            self.generator.manual_seed(int(seed if seed is not None else torch.seed()))

    @property
    def description(self) -> str:
        if self.secure:
            return "os.urandom (OS CSPRNG) 53-bit uniforms -> Box-Muller, float64"
        return f"torch.Generator (Mersenne Twister, CPU) seeded with {self.seed}"

    def __call__(self, like: Tensor, std: float) -> Tensor:
        if std == 0:
            return torch.zeros_like(like)
        if self.secure:
            z = _secure_normal(like.numel())
            return torch.from_numpy(z).to(like.dtype).view_as(like).to(like.device) * std
        gen = self._generator(like.device)
        z = torch.randn(like.shape, generator=gen, dtype=torch.float32, device=gen.device)
        return (z * std).to(like.dtype).to(like.device)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The CPU generator, or for an accelerator one on it (drawing there avoids a copy per
        parameter), seeded once from the CPU generator so that runs stay reproducible."""
        if device.type == "cpu":
            return self.generator
        key = str(device)
        if key not in self._device_generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            self._device_generators[key] = gen
        return self._device_generators[key]

    def state_dict(self) -> dict[str, Any]:
        state = {"secure": self.secure, "seed": self.seed, "state": self.generator.get_state()}
        if self._device_generators:
            state["device_states"] = {k: g.get_state() for k, g in self._device_generators.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["secure"] != self.secure:
            raise ValueError("checkpoint noise mode (secure or seeded) differs from this run's")
        if not self.secure:
            self.generator.set_state(state["state"])
            self._device_generators = {}
            for key, s in state.get("device_states", {}).items():
                gen = torch.Generator(device=torch.device(key))
                gen.set_state(s)
                self._device_generators[key] = gen


def _secure_normal(n: int) -> np.ndarray:
    """``n`` standard normals from ``os.urandom`` by Box-Muller."""
    pairs = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    r = np.sqrt(-2.0 * np.log(u[0]))
    theta = 2.0 * math.pi * u[1]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
