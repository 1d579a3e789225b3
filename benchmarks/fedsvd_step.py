"""FedSVD's server step: the full SVD of each d x k product against thin QRs and an r x r SVD.

    python benchmarks/fedsvd_step.py [--rounds 2] [--layers 24] [--d 2048] [--k 2048] [--r 16]
                                     [--old-layers N] [--threads T]

One global LoRA state of ``--layers`` (A, B) pairs (A orthonormal rows, as FedSVD keeps it; B
the weighted mean of client updates, random here) goes through the server step
``get_strategy("fedsvd").merge`` as it is now (:func:`dptrain.federated.lora.refactorize`:
``B = Q_B R_B``, ``A^T = Q_A R_A``, SVD of ``R_B R_A^T``) and as it was before (the SVD of the
formed ``d x k`` product ``B A``, kept below as :func:`full_svd_refactorize`), in interleaved
rounds on the CPU in float64.  Every round checks that both give the same new factors (up to
float error; the same sign convention), and prints the median wall and CPU (all threads)
times and their ratio.  The old step costs minutes at the default shape on a busy 2-core box:
``--old-layers N`` times it on the first ``N`` layers only and scales by ``layers / N`` (each
layer is the same work; marked ``extrapolated``).  Writes ``benchmarks/results/fedsvd_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dptrain.federated.lora import State, get_strategy, pairs

RESULTS = Path(__file__).resolve().parent / "results" / "fedsvd_step.json"


def full_svd_refactorize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step before: SVD of the formed product, ``A' = V_r^T``, ``B' = U_r S_r``, then the
    same sign convention as ``refactorize`` (largest-magnitude entry of each row of A' > 0)."""
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    sign = torch.where(vh[torch.arange(r), vh.abs().argmax(dim=1)] < 0, -1.0, 1.0).double()
    return (vh * sign[:, None]).to(a.dtype), (u * sign * s).to(b.dtype)


def full_svd_merge(global_state: State, mean: State, layers: int | None = None) -> State:
    """The old server step, on the first ``layers`` pairs only (all when None)."""
    out = {**global_state, **mean}
    for a, b in pairs(out)[:layers]:
        out[a], out[b] = full_svd_refactorize(out[a], out[b])
    return out


def state(layers: int, d: int, k: int, r: int) -> tuple[State, State]:
    """A FedSVD global state (A orthonormal, B = 0) and a mean of client B's (random)."""
    g = torch.Generator().manual_seed(0)
    raw: State = {}
    for i in range(layers):
        raw[f"l{i}.q.lora_A.default.weight"] = torch.randn(r, k, generator=g)
        raw[f"l{i}.q.lora_B.default.weight"] = torch.zeros(d, r)
    glob = get_strategy("fedsvd").init(raw)
    mean = {n: 0.01 * torch.randn(d, r, generator=g) for n in glob if ".lora_B." in n}
    return glob, mean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=2048, help="out features (B's rows)")
    ap.add_argument("--k", type=int, default=2048, help="in features (A's columns)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--old-layers", type=int, default=None, help="time the old step on N layers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # on an oversubscribed box 1 beats 2 (MKL spins)
    glob, mean = state(args.layers, args.d, args.k, args.r)
    spec = get_strategy("fedsvd")
    threads = torch.get_num_threads()
    n_old = min(args.old_layers or args.layers, args.layers)
    scale = args.layers / n_old
    print(
        f"{args.layers} layers, d={args.d}, k={args.k}, r={args.r}, float32 state, float64 "
        f"linear algebra, {threads} torch threads, {os.cpu_count()} CPUs, load {os.getloadavg()}"
        + (f"; old step timed on {n_old} layers x {scale:g}" if n_old < args.layers else "")
    )
    times: dict[str, list[float]] = {k: [] for k in ("full_svd", "thin_qr")}
    cpu: dict[str, list[float]] = {k: [] for k in ("full_svd", "thin_qr")}
    worst = 0.0
    for i in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        old = full_svd_merge(glob, mean, n_old)
        t1, c1 = time.perf_counter(), time.process_time()
        new = spec.merge(glob, mean)
        t2, c2 = time.perf_counter(), time.process_time()
        times["full_svd"].append((t1 - t0) * scale)
        times["thin_qr"].append(t2 - t1)
        cpu["full_svd"].append((c1 - c0) * scale)
        cpu["thin_qr"].append(c2 - c1)
        done = [n for a, b in pairs(new)[:n_old] for n in (a, b)]
        worst = max(worst, max(float((old[n] - new[n]).abs().max()) for n in done))
        print(
            f"round {i}: full SVD {times['full_svd'][-1]:.2f} s (CPU {cpu['full_svd'][-1]:.2f}), "
            f"thin QR {t2 - t1:.4f} s (CPU {c2 - c1:.4f}), max |diff| {worst:.2e}",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["full_svd"] / med["thin_qr"]
    ratio_cpu = med_cpu["full_svd"] / med_cpu["thin_qr"]
    print(
        f"median server step: full SVD {med['full_svd']:.2f} s (CPU {med_cpu['full_svd']:.2f}), "
        f"thin QR {med['thin_qr']:.4f} s (CPU {med_cpu['thin_qr']:.4f})"
    )
    print(
        f"speed-up {ratio:.0f}x wall, {ratio_cpu:.0f}x CPU; largest difference of a factor "
        f"entry {worst:.2e} (float32 state)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "config": vars(args) | {"threads": threads, "cpus": os.cpu_count()},
                "old_step_extrapolated_from_layers": n_old if n_old < args.layers else None,
                "seconds": times,
                "cpu_seconds": cpu,
                "median_seconds": med,
                "median_cpu_seconds": med_cpu,
                "speedup": ratio,
                "speedup_cpu": ratio_cpu,
                "max_abs_difference": worst,
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
