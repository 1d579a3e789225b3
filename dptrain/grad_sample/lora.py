"""The LoRA A/B pair (peft ``lora.Linear``) as one use: ``y = base(x) + s B A x``.

With ``h = x A^T`` (A's output, ``r`` wide), output gradient ``g``, ``g_B = s g`` and
``g_A = g_B B``, the per-sample gradients are

    dB_b = sum_t g_B,bt h_bt^T        dA_b = sum_t g_A,bt x_bt^T

so both factors share the input ``x``, and B's factors are A's output: one record per adapted
layer, one autograd node whose backward returns the input gradient ``g_A A`` (the frozen base
layer is differentiated by autograd as usual) and never the parameter gradients.  Calls the
pair cannot run exactly (dropout active, DoRA and other variants, merged or several active
adapters, LoRA bias, mixed-adapter batches) run through peft and its A and B leaves are
recorded one by one by the Linear rule.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .outer import Outer
from .rules import FusedRule, Use, _flat, register_rule


class LoraPairRule(FusedRule):
    hook_fallback = False  # when declined, the A and B leaves record themselves

    @staticmethod
    def adapter(module: Any) -> str | None:
        """The single active adapter of ``module``, or None."""
        active = [a for a in module.active_adapters if a in module.lora_A]
        return active[0] if len(active) == 1 else None

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        name = self.adapter(module)
        if name is None:
            return {}
        pair = {"lora_A": module.lora_A[name].weight, "lora_B": module.lora_B[name].weight}
        return {k: p for k, p in pair.items() if p.requires_grad}

    def supports(self, module: Any, args: tuple, kwargs: dict) -> bool:
        name = self.adapter(module)
        if name is None or not super().supports(module, args, kwargs):
            return False
        drop = module.lora_dropout[name]
        return not (
            module.disable_adapters
            or module.merged
            or name in getattr(module, "lora_variant", {})
            or module.lora_A[name].bias is not None
            or module.lora_B[name].bias is not None
            or (drop.training and getattr(drop, "p", 0) > 0)
        )

    def fused_call(self, capture: Any, module: Any, args: tuple, kwargs: dict) -> Tensor | None:
        params = self.fusable(module, args, kwargs)
        if params is None:
            return None
        name = self.adapter(module)
        x = args[0]
        result = module.base_layer(x)
        a = module.lora_A[name].weight
        use, xa = capture.record(module, x if x.dtype == a.dtype else x.to(a.dtype), params)
        b = module.lora_B[name].weight
        use.cache.update(A=a.detach(), B=b.detach(), scale=module.scaling[name])
        delta = self.run(use, xa, params)
        return (result + delta).to(result.dtype)

    def compute(self, use: Use) -> Tensor:
        c = use.cache
        c["h"] = F.linear(use.input, c["A"])
        return F.linear(c["h"], c["B"]) * c["scale"]

    def _g_a(self, use: Use) -> Tensor:
        c = use.cache
        if "g_A" not in c:
            c["g_A"] = (use.grad * c["scale"]) @ c["B"]
        return c["g_A"]

    def input_grad(self, use: Use) -> Tensor:
        return self._g_a(use) @ use.cache["A"]

    def outer(self, use: Use) -> dict[str, Outer]:
        c = use.cache
        out = {}
        if "lora_A" in use.params:
            out["lora_A"] = Outer(_flat(self._g_a(use)), _flat(use.input), c["A"].shape[0])
        if "lora_B" in use.params:
            g_b = _flat(use.grad) * c["scale"]
            out["lora_B"] = Outer(g_b, _flat(c["h"]), c["B"].shape[0])
        return out


try:  # peft is a dependency, but keep the engine importable without it
    from peft.tuners.lora.layer import Linear as _LoraLinear

    register_rule(_LoraLinear, LoraPairRule())
except ImportError:  # pragma: no cover
    pass
