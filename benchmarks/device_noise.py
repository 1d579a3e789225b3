"""Throughput of the device noise generator (ChaCha20 + float64 Box-Muller in torch) against
the CPU AES-CTR path, on GPT-2 124M's trainable tensors (148 tensors, 124.4 M normals).

    python benchmarks/device_noise.py --device cpu  [--scale 0.02]       # a share of the shapes
    python benchmarks/device_noise.py --device cuda [--modes eager,compiled]

For each mode: one draw first (on CUDA: the compile, and the check of the compiled kernels
against eager), then the best of ``--repeats`` timed draws of one step's ``noise.many`` over
the tensors (float32, std 1; CUDA synchronized), and the raw keystream rate of the cipher.  On
the CPU the AES path is timed on the same tensors.  Prints one JSON line per mode (also to
``--out`` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dptrain.device_noise import AES, CHACHA
from dptrain.noise import GaussianNoise
from dptrain.secret import RunKey


def gpt2_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """GPT-2 124M's parameter shapes (``scale`` < 1 shrinks the vocabulary and the layers'
    widths' product by about that factor, keeping the tensor count)."""
    d, v, ctx, layers = 768, 50257, 1024, 12  # width, vocabulary, positions, blocks
    s = max(1, round(d * scale**0.5)) if scale < 1 else d
    v = max(1, round(v * scale**0.5)) if scale < 1 else v
    shapes: list[tuple[int, ...]] = [(v, s), (ctx, s)]
    for _ in range(layers):
        shapes += [(s,), (s,), (s, 3 * s), (3 * s,), (s, s), (s,), (s,), (s,)]
        shapes += [(s, 4 * s), (4 * s,), (4 * s, s), (s,)]
    return [*shapes, (s,), (s,)]


def timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="eager,compiled", help="eager, compiled (CUDA), aes")
    ap.add_argument("--scale", type=float, default=None, help="share of GPT-2's normals")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.02)
    likes = [torch.empty(s, device=device) for s in gpt2_shapes(scale)]
    n = sum(t.numel() for t in likes)
    stds = [1.0] * len(likes)
    base = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "tensors": len(likes),
        "normals": n,
    }
    modes = [m for m in args.modes.split(",") if m]
    if device.type != "cuda":
        modes = [m for m in modes if m != "compiled"] + (["aes"] if "aes" not in modes else [])
    lines = []
    for mode in modes:
        noise = GaussianNoise(RunKey.generate(), backend=AES if mode == "aes" else CHACHA)
        if mode != "aes":
            noise.backends.normals.compile = mode == "compiled"
        t0 = time.perf_counter()
        noise.many(likes, stds)  # warm-up: the compile and its check on CUDA
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        first = time.perf_counter() - t0
        secs = timed(lambda noise=noise: noise.many(likes, stds), device, args.repeats)
        row = {**base, "mode": mode, "first_draw_s": first, "step_s": secs}
        row["ns_per_normal"] = secs / n * 1e9
        if mode != "aes":
            row["compile_error"] = noise.backends.normals.compile_error
            blocks = noise.backends.normals.chunk_for(device)
            cipher = noise.backends.normals.cipher
            ks = timed(
                lambda c=cipher, b=blocks: c.keystream(1, 0, b, device), device, args.repeats
            )
            row["keystream_ns_per_normal"] = ks / (4 * blocks) * 1e9  # 4 normals per block
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if mode != "aes":  # the same key and step on the CPU: the same values (libm ulps)
                here, cpu = (
                    GaussianNoise(RunKey.from_insecure_seed(5), backend=CHACHA) for _ in "ab"
                )
                here.backends.normals.compile = mode == "compiled"
                like = torch.empty(1 << 20, dtype=torch.float64)
                diff = here(like.to(device), 1.0).cpu() - cpu(like, 1.0)
                row["cpu_vs_device_max_abs_diff"] = float(diff.abs().max())
                z = noise.many(likes, stds)
                tail = sum(int((t.abs() > 4).sum()) for t in z)
                row["tail_4sigma_over_expected"] = tail / (n * 6.334248366623996e-05)
        print(json.dumps(row), flush=True)
        lines.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(lines, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
