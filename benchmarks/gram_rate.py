"""The cost of float64 ghost norms on a device: one self Gram ``X X^T`` (batched) in float32
and in float64 (with the cast), at the shapes of GPT-2's block linears and LM head.

    python benchmarks/gram_rate.py --device cuda    # in benchmarks/gpu_check.sh

The ghost norms' Gram matrices are float64 (the certified clip bound, ``dptrain.clipping``):
on GPUs with full-rate float64 (A100, H100/H200) the ratio should be near 1-2; on cards with
float64 at 1/32-1/64 of float32 (L4, L40S, consumer cards) far more.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(16, 128, 1024), (8, 256, 768), (32, 256, 3072), (8, 512, 50257)]  # (B, T, width)


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _gram64(x: torch.Tensor) -> torch.Tensor:
    xd = x.to(torch.float64)
    return torch.bmm(xd, xd.transpose(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for b, t, w in SHAPES:
        if device.type == "cpu" and w > 4096:
            continue  # minutes on a CPU; the GPU is what this measures
        x = torch.randn(b, t, w, device=device)
        f32 = _time(lambda x=x: torch.bmm(x, x.transpose(1, 2)), device)
        f64 = _time(lambda x=x: _gram64(x), device)
        rows.append({"shape": [b, t, w], "float32_ms": f32 * 1e3, "float64_ms": f64 * 1e3})
        print(f"{name}  B={b} T={t} width={w}: float32 {f32 * 1e3:.2f} ms, float64 (with cast) "
              f"{f64 * 1e3:.2f} ms, ratio {f64 / f32:.2f}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
