"""Long-run soak: 10,000 private steps of a tiny model in one process, memory sampled every
1,000 steps; fails if resident memory grows by more than the stated bound.

    python benchmarks/soak.py [--steps 10000] [--every 1000] [--bound-mb 64]

Writes benchmarks/results/soak.json.  Includes everything a run repeats: Poisson sampling,
the private step, the accountant's epsilon and the budget filter, and checkpoint state dicts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=1_000)
    ap.add_argument(
        "--bound-mb", type=float, default=64.0, help="allowed RSS growth after the first sample"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args(argv)

    import io

    import torch
    from peft import LoraConfig, get_peft_model

    from accountants import Budget
    from dptrain import PoissonSampler, PrivacyEngine, StaticPolicy
    from dptrain.data import load_texts, tokenize
    from dptrain.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny-gpt2")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))
    data = tokenize(load_texts("bundled:clinic_notes:train"), tok, 48)
    n, q = len(data), 8 / len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(
        model,
        torch.optim.AdamW(params, lr=1e-3),
        policy=StaticPolicy(1.0, 3.0),
        sample_rate=q,
        dataset_size=n,
        budget=Budget(1e6, 1e-5),
    )
    sampler = PoissonSampler([str(i) for i in range(n)], q)
    samples, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        engine.step(data.batch(sampler.sample(engine.steps_taken)))
        if step % args.every == 0:
            engine.epsilon()
            torch.save(
                {"engine": engine.state_dict(), "sampler": sampler.state_dict()}, io.BytesIO()
            )
            gc.collect()
            samples.append({"step": step, "rss_mb": rss_mb(), "seconds": time.perf_counter() - t0})
            print(
                f"step {step:6d}  rss {samples[-1]['rss_mb']:8.1f} MB  {samples[-1]['seconds']:7.1f} s",
                flush=True,
            )
    growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"]
    ok = growth <= args.bound_mb
    result = {
        "steps": args.steps,
        "samples": samples,
        "growth_mb": growth,
        "bound_mb": args.bound_mb,
        "ledger_entries": len(engine.ledger.events),
        "ok": ok,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"RSS growth after step {samples[0]['step']}: {growth:+.1f} MB (bound {args.bound_mb} MB): {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
