"""Peak memory of a private step against the non-private step as batch and sequence grow.

    python benchmarks/memory.py                     # both models, both sweeps, all modes
    python benchmarks/memory.py --quick             # the ends of each sweep (about 15 minutes)
    python benchmarks/memory.py --models gpt2 --sweeps seq --modes nonprivate,auto

Models (random init, CPU, float32): ``gpt2``, a GPT-2 of 4 layers, width 256, vocabulary 8000
(tied embedding and output weights), every parameter trained; ``llama-lora``, a Llama of 4
layers, width 256, vocabulary 8000, LoRA r=8 on q and v.  Sweeps: batch 8..64 at sequence 128;
sequence 128..1024 at batch 8.  Modes at each point: ``nonprivate`` (``loss.mean().backward();
AdamW``) and the private step (:class:`dptrain.PrivacyEngine`, static policy, AdamW) with the
per-parameter cost rule ``auto`` and the rule forced each way: ``ghost`` (``ghost="always"``:
ghost norms for every factorized parameter) and ``materialized`` (``ghost="never"``).

Each point (model, mode, batch, sequence) runs in its own process, so that peaks do not mix and
nothing cached by one point lowers or raises the next.  After one warm-up step (optimizer
state, the engine's probe), one step runs under ``torch.profiler`` with ``profile_memory``: the
profiler reports every allocation and free of torch's CPU allocator, and the step's peak is the
maximum of their running sum.  That is what the tensors of the step occupy, the CPU analogue of
``torch.cuda.max_memory_allocated``: unlike the resident set (``ru_maxrss``, ``VmHWM``) it does
not depend on what glibc caches, maps or fragments, nor on the Python objects and libraries of
the process, so equal tensor work gives equal figures in both modes.  The step's **total peak**
adds the tensors alive before the step (weights, optimizer state, the batch: every live tensor
storage, counted once), which both modes hold; **growth** is the peak above them.  With
``--rss`` a second step reports the growth of the resident set (VmHWM reset before it, glibc
returning freed blocks at once) as a cross-check.

Results: ``benchmarks/results/memory.json``; with matplotlib (``dptrain[plots]``) the figure
``benchmarks/results/memory.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_time import proc_status  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "spec": "tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=8000,n_positions=1024",
        "lora": None,
        "what": "GPT-2, 4 layers, width 256, vocab 8000 (tied), full fine-tuning",
    },
    "llama-lora": {
        "spec": (
            "tiny-llama:num_hidden_layers=4,hidden_size=256,intermediate_size=688,"
            "num_attention_heads=4,num_key_value_heads=2,vocab=8000,max_position_embeddings=1024"
        ),
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "what": "Llama, 4 layers, width 256, vocab 8000, LoRA r=8 on q,v",
    },
}
MODES = ["nonprivate", "auto", "ghost", "materialized"]
GHOST = {"auto": "auto", "ghost": "always", "materialized": "never"}
SWEEPS = {  # name -> (batches, sequence lengths)
    "batch": ([8, 16, 32, 64], [128]),
    "seq": ([8], [128, 256, 512, 1024]),
}
QUICK = {"batch": ([8, 64], [128]), "seq": ([8], [128, 1024])}
TARGET = 1.05  # the bound on private / non-private peak at batch 64 and at T = 1024
NOISE, CLIP, LR, DATASET, SEED = 1.0, 1.0, 1e-4, 10_000, 0
FORWARD = "memory.forward"  # profiler range around the forward pass and the loss


# -- one point (child process) ------------------------------------------------------------


def _build(model_name: str, batch: int, seq: int) -> tuple[Any, dict]:
    import torch

    from dptrain.models import load_model_and_tokenizer

    cfg = MODELS[model_name]
    model, _ = load_model_and_tokenizer(f"{cfg['spec']},seed={SEED}")
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(SEED)
        model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **cfg["lora"]))
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _step_fn(model: Any, batch: dict, mode: str) -> tuple[Callable[[], None], dict]:
    """The step of ``mode`` and a dict it fills with what the engine chose."""
    import torch

    import dptrain
    import dptrain.engine as engine_module
    from dptrain.losses import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def loss_fn(model: Any, batch: dict) -> Any:  # marked, so the profile shows where it ends
        with torch.profiler.record_function(FORWARD):
            return causal_lm_loss(model, batch)

    info: dict[str, Any] = {"trainable": sum(p.numel() for p in params), "tensors": len(params)}
    if mode == "nonprivate":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, info

    clip_and_sum = engine_module.clip_and_sum

    def recording(*args: Any, **kwargs: Any) -> Any:  # notes the rule's choice, changes nothing
        out = clip_and_sum(*args, **kwargs)
        info["ghosted"] = out.ghosted
        return out

    engine_module.clip_and_sum = recording
    engine = dptrain.PrivacyEngine(
        model,
        opt,
        policy=dptrain.StaticPolicy(clip=CLIP, noise_multiplier=NOISE),
        sample_rate=batch["input_ids"].shape[0] / DATASET,
        dataset_size=DATASET,
        loss_fn=loss_fn,
        ghost=GHOST[mode],
    )
    return lambda: engine.step(batch), info


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python, each storage counted once."""
    import warnings

    import torch

    gc.collect()
    seen: dict[int, int] = {}
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated torch aliases
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_meta:
            try:
                s = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def profiled_peak(fn: Callable[[], None]) -> tuple[int, int, int, float]:
    """Peak, peak after the forward pass (backward, per-sample work, noise, optimizer) and net
    change (bytes) of torch's CPU allocations while ``fn()`` runs, from the profiler's
    allocation events in time order; and the (profiled) wall time."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    wall = time.perf_counter() - t0
    raw = prof.profiler.kineto_results.events()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in raw
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    forward_end = max((e.end_ns() for e in raw if e.name() == FORWARD), default=0)
    running = peak = after = 0
    for t, nbytes in events:
        running += nbytes
        peak = max(peak, running)
        if t > forward_end:
            after = max(after, running)
    return peak, after, running, wall


def rss_growth(fn: Callable[[], None]) -> int:
    """Growth of the resident set's high-water mark over ``fn()`` (glibc: blocks of 64 KiB and
    more mapped and returned at once, so the resident set follows live memory)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = proc_status("VmRSS:")
    fn()
    return proc_status("VmHWM:") - base


def run_point(point: dict[str, Any]) -> dict[str, Any]:
    import torch

    if point.get("threads"):
        torch.set_num_threads(point["threads"])
    model, batch = _build(point["model"], point["batch"], point["seq"])
    step, info = _step_fn(model, batch, point["mode"])
    t0 = time.perf_counter()
    step()  # warm-up: optimizer state, the engine's probe and plan
    warm = time.perf_counter() - t0
    state = live_tensor_bytes()
    peak, after, net, wall = profiled_peak(step)
    out = {
        **point,
        **info,
        "state_mb": state / 2**20,
        "growth_mb": peak / 2**20,
        "peak_mb": (state + peak) / 2**20,
        "after_forward_mb": (state + after) / 2**20,
        "net_mb": net / 2**20,
        "warmup_s": warm,
        "profiled_s": wall,
    }
    if point.get("rss"):
        out["rss_growth_mb"] = rss_growth(step) / 2**20
    return out


# -- the sweep (parent) ---------------------------------------------------------------------


def _spawn(point: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(point)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**point, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**point, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def points(models: list[str], sweeps: list[str], modes: list[str], quick: bool) -> list[dict]:
    grid = QUICK if quick else SWEEPS
    seen, out = set(), []
    for model in models:
        for sweep in sweeps:
            batches, seqs = grid[sweep]
            for b in batches:
                for t in seqs:
                    for mode in modes:
                        key = (model, mode, b, t)
                        if key not in seen:
                            seen.add(key)
                            out.append({"model": model, "mode": mode, "batch": b, "seq": t})
    return out


def ratios(results: list[dict]) -> list[dict]:
    """Per (model, batch, seq): each private mode's total peak and growth over non-private's."""
    base = {
        (r["model"], r["batch"], r["seq"]): r
        for r in results
        if r["mode"] == "nonprivate" and "error" not in r
    }
    rows = []
    for r in results:
        ref = base.get((r["model"], r["batch"], r["seq"]))
        if r["mode"] == "nonprivate" or ref is None or "error" in r:
            continue
        rows.append(
            {
                "model": r["model"],
                "batch": r["batch"],
                "seq": r["seq"],
                "mode": r["mode"],
                "peak_ratio": r["peak_mb"] / ref["peak_mb"],
                "growth_ratio": r["growth_mb"] / ref["growth_mb"],
                "after_forward_ratio": r["after_forward_mb"] / ref["after_forward_mb"],
                "ghosted": r.get("ghosted"),
                "tensors": r.get("tensors"),
            }
        )
    return rows


def print_table(results: list[dict]) -> None:
    ref = {
        (r["model"], r["batch"], r["seq"]): r
        for r in results
        if r["mode"] == "nonprivate" and "error" not in r
    }
    head = (
        f"{'model':11s} {'B':>3s} {'T':>5s} {'mode':13s} {'state MB':>9s} {'growth MB':>10s} "
        f"{'peak MB':>9s} {'peak x':>7s} {'growth x':>9s} {'bwd MB':>8s} {'bwd x':>6s} "
        f"{'ghosted':>8s}"
    )
    print(head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['model']:11s} {r['batch']:3d} {r['seq']:5d} {r['mode']:13s} {r['error']}")
            continue
        n = ref.get((r["model"], r["batch"], r["seq"]))
        px = f"{r['peak_mb'] / n['peak_mb']:7.3f}" if n and r is not n else " " * 7
        gx = f"{r['growth_mb'] / n['growth_mb']:9.3f}" if n and r is not n else " " * 9
        bx = f"{r['after_forward_mb'] / n['after_forward_mb']:6.3f}" if n and r is not n else ""
        gh = f"{r['ghosted']}/{r['tensors']}" if "ghosted" in r else ""
        print(
            f"{r['model']:11s} {r['batch']:3d} {r['seq']:5d} {r['mode']:13s} "
            f"{r['state_mb']:9.1f} {r['growth_mb']:10.1f} {r['peak_mb']:9.1f} {px} {gx} "
            f"{r['after_forward_mb']:8.1f} {bx:>6s} {gh:>8s}"
        )


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'dptrain[plots]'): no figure")
        return False
    ok = [r for r in results if "error" not in r]
    models = sorted({r["model"] for r in ok}, key=list(MODELS).index)
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    style = {
        "nonprivate": ("k", "o", "non-private"),
        "auto": ("C0", "s", "private, auto rule"),
        "ghost": ("C1", "^", "private, ghost forced"),
        "materialized": ("C2", "v", "private, materialized forced"),
    }
    for i, model in enumerate(models):
        for j, (axis, fixed, label) in enumerate(
            (
                ("batch", ("seq", 128), "batch size (T = 128)"),
                ("seq", ("batch", 8), "sequence length (B = 8)"),
            )
        ):
            ax = axes[i][j]
            for mode, (color, marker, name) in style.items():
                for key, look in (
                    ("peak_mb", {"label": name}),
                    ("after_forward_mb", {"ls": "--", "alpha": 0.6, "ms": 3}),
                ):
                    pts = sorted(
                        (r[axis], r[key])
                        for r in ok
                        if r["model"] == model and r["mode"] == mode and r[fixed[0]] == fixed[1]
                    )
                    if len(pts) > 1:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, color=color, marker=marker, **look)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("peak MB (dashed: after the forward)")
            ax.set_title(MODELS[model]["what"], fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="from: " + ", ".join(MODELS))
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help="batch, seq")
    ap.add_argument("--modes", default=",".join(MODES), help="from: " + ", ".join(MODES))
    ap.add_argument("--quick", action="store_true", help="the ends of each sweep only")
    ap.add_argument("--rss", action="store_true", help="also the resident set's growth")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per point")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per point")
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    ap.add_argument("--plot", default=str(RESULTS / "memory.png"))
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print JSON
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return 0
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    models, sweeps, modes = split(args.models), split(args.sweeps), split(args.modes)
    bad = [m for m in models if m not in MODELS] + [s for s in sweeps if s not in SWEEPS]
    bad += [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown models/sweeps/modes {bad}")
    if "nonprivate" not in modes:
        modes = ["nonprivate", *modes]  # every ratio needs it
    todo = points(models, sweeps, modes, args.quick)
    t0 = time.perf_counter()
    results = []
    for i, point in enumerate(todo):
        point = {**point, "threads": args.threads, "rss": args.rss}
        r = _spawn(point, args.timeout)
        results.append(r)
        what = r.get("error") or f"peak {r['peak_mb']:.1f} MB (growth {r['growth_mb']:.1f})"
        print(
            f"[{i + 1}/{len(todo)}] {point['model']} {point['mode']} B={point['batch']} "
            f"T={point['seq']}: {what}",
            flush=True,
        )
    print()
    print_table(results)
    import torch

    info = {
        "command": "python benchmarks/memory.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
        "measure": "torch.profiler profile_memory: peak of the running sum of CPU allocations",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "models": MODELS,
        "target": TARGET,
        "points": results,
        "ratios": ratios(results),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out} ({info['wall_s']:.0f} s)")
    if plot(results, Path(args.plot)):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
