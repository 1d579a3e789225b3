"""Host-side cost of the capture: its recorded forward and backward of one chunk minus a plain
forward and backward of the same per-sample losses, on Python-bound models (one thread).

    python benchmarks/capture_overhead.py                       # this checkout, both models
    python benchmarks/capture_overhead.py --profile gpt2        # cProfile of the capture's run
    python benchmarks/capture_overhead.py --ab /path/to/other   # interleaved A/B: this checkout
                                                                # against another one

``--ab`` starts one worker per checkout (each imports its own ``dptrain``) and alternates them
round by round, so that both see the same machine load; it prints each side's median and range
of "capture minus plain" per model, and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = {
    "gpt2": ("tiny-gpt2:n_layer=12,n_embd=32,n_head=4,vocab=512", None),
    "llama-lora": (
        "tiny-llama:num_hidden_layers=32,hidden_size=32,intermediate_size=64,"
        "num_attention_heads=4,num_key_value_heads=2,vocab=512",
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    ),
}
BATCH, SEQ = 4, 16


def _setup(name: str) -> tuple[Any, Any, Any, Any]:
    import torch

    from dptrain.grad_sample.capture import GradCapture
    from dptrain.losses import causal_lm_loss
    from dptrain.models import load_model_and_tokenizer

    spec, lora = MODELS[name]
    model, _ = load_model_and_tokenizer(f"{spec},seed=0")
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    capture = GradCapture(model)
    capture.attach()
    capture.run(causal_lm_loss, batch)  # the probe and a first step
    return model, capture, causal_lm_loss, batch


def _times(setup: tuple, steps: int) -> tuple[float, float]:
    """Medians (ms) over ``steps`` of the capture's run and of a plain step, alternated, in CPU
    time of the process (one thread: on a shared machine, wall time mostly measures the wait
    for a core)."""
    model, capture, loss_fn, batch = setup
    cap, plain = [], []
    clock = time.process_time
    for _ in range(steps):
        t = clock()
        capture.run(loss_fn, batch)
        cap.append(clock() - t)
        t = clock()
        loss_fn(model, batch).sum().backward()
        plain.append(clock() - t)
        model.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(cap), 1e3 * statistics.median(plain)


def worker() -> None:
    """Serve rounds: a line ``name steps`` on stdin -> one JSON line of medians on stdout."""
    import torch

    import dptrain

    torch.set_num_threads(1)
    print(f"worker: dptrain from {Path(dptrain.__file__).parent}", file=sys.stderr)
    setups: dict[str, tuple] = {}
    for line in sys.stdin:
        name, steps = line.split()
        if name not in setups:
            setups[name] = _setup(name)
        cap, plain = _times(setups[name], int(steps))
        print(json.dumps({"capture": cap, "plain": plain}), flush=True)


def _spawn(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )


def ab(other: Path, models: list[str], rounds: int, steps: int) -> None:
    here = Path(__file__).resolve().parents[1]
    sides = {"A (other)": _spawn(other), "B (this)": _spawn(here)}
    diffs: dict[str, dict[str, list[float]]] = {m: {s: [] for s in sides} for m in models}
    for r in range(rounds):
        for m in models:
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for s in order:
                proc = sides[s]
                proc.stdin.write(f"{m} {steps}\n")
                proc.stdin.flush()
                out = json.loads(proc.stdout.readline())
                diffs[m][s].append(out["capture"] - out["plain"])
    for proc in sides.values():
        proc.stdin.close()
        proc.wait()
    print(f"load average {os.getloadavg()}")
    for m in models:
        a, b = diffs[m].values()
        ratios = [y / x for x, y in zip(a[1:], b[1:], strict=True)]  # round 0: warm-up
        line = ", ".join(
            f"{s}: {statistics.median(v[1:]):.2f} ms [{min(v[1:]):.2f}, {max(v[1:]):.2f}]"
            for s, v in diffs[m].items()
        )
        print(f"{m}: capture minus plain, {line}; B/A median {statistics.median(ratios):.3f}")


def profile(name: str, steps: int) -> None:
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(1)
    setup = _setup(name)
    _, capture, loss_fn, batch = setup
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        capture.run(loss_fn, batch)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ab", type=Path, help="another checkout to compare against")
    ap.add_argument("--profile", choices=list(MODELS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    if a.worker:
        worker()
    elif a.profile:
        profile(a.profile, a.steps)
    elif a.ab is not None:
        ab(a.ab.resolve(), a.models, a.rounds, a.steps)
    else:
        import torch

        torch.set_num_threads(1)
        for m in a.models:
            cap, plain = _times(_setup(m), a.steps)
            print(f"{m}: capture {cap:.2f} ms, plain {plain:.2f} ms, minus {cap - plain:.2f} ms")


if __name__ == "__main__":
    main()
