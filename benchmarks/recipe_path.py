"""The ``dptrain train`` path end to end against the bare engine step and plain PyTorch.

    python benchmarks/recipe_path.py --quick                 # < 3 minutes on 2 CPU cores
    python benchmarks/recipe_path.py --setups full lora --accountants rdp prv
    python benchmarks/recipe_path.py --setups gpt2-124m llama-0.5b --precision bf16  # a GPU

Contenders, each on its own copy of the model (same seed, same weights), on the same Poisson
batches (step ``t`` of every contender uses the recipe run's batch ``t``), interleaved in
rounds: a round runs one block of ``--block`` steps of every contender, in an order taken from
a Williams design (:func:`balanced_orders`: over its rows every contender takes every position
equally often and follows every other contender equally often, so the recipe's checkpoint at
its block's end precedes each of the others equally often), after one untimed warm-up round:

* ``recipe``: :func:`dptrain.train.loop` of a real run (prepared, started and built by
  :mod:`dptrain.train` from a recipe): Poisson sampler, collation, budget filter, accountant,
  the metrics line and the ledger every step (``log_every: 1``), a checkpoint at the end of
  every block (``checkpoint_every`` = the block);
* ``engine``: :meth:`dptrain.PrivacyEngine.step` of an engine without a budget on the
  batches collated in advance (the bare step of ``benchmarks/step_time.py``);
* ``nonprivate``: ``loss.mean().backward(); AdamW.step()`` on the same batches, autocast as
  the recipe's ``training.precision``;
* ``opacus-hooks`` / ``opacus-ghost`` (``--opacus``): Opacus 1.6 ``make_private`` on the same
  batches (fixed-size sampling: only its step is timed), where it applies.

Step time is the total time of a contender over all its blocks divided by its steps; tokens
per second counts the non-padding tokens of the batches.  The ratios are per round (the two
contenders' blocks of one round ran on the same batches within seconds of each other):
median and interquartile range over the rounds, besides the ratio of the totals; a
contender's block time after the recipe's block against after the others' says what the
checkpoint costs its successor.  Then ``--profile`` steps of the
recipe contender run with timers (synchronizing the GPU) around its parts: data (sampler and
collation), forward, backward, per-sample work (clipping and sums), noise, optimizer,
accounting (budget filter, ledger, epsilon for the log line), checkpoint (the one at the end
of the profiled steps) and the rest (metrics, Python).  Results are printed and written to
``benchmarks/results/recipe_path.json`` (keyed by device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dptrain import train as T  # noqa: E402
from dptrain.hardware import to_device  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "recipe_path.json"

SETUPS: dict[str, dict[str, Any]] = {
    # the 4-layer GPT-2 of benchmarks/step_time.py, full fine-tuning
    "full": {
        "model": "tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=8000",
        "lora": None,
        "batch": 16,
        "seq": 128,
        "concat": 1,
    },
    "tiny": {"model": "tiny-gpt2", "lora": None, "batch": 16, "seq": 48, "concat": 1},
    "lora": {  # SmolLM2-135M + LoRA r=8 on q, v (pretrained weights, loaded by dptrain.models)
        "model": "smollm2-135m",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "batch": 4,
        "seq": 128,
        "concat": 1,
    },
    # GPU sizes (issue 15): GPT-2 124M architecture (vocab 8000: the bundled tokenizer), and a
    # Llama-architecture model of ~0.5B parameters with LoRA, random init
    "gpt2-124m": {
        "model": "tiny-gpt2:n_layer=12,n_embd=768,n_head=12,vocab=8000",
        "lora": None,
        "batch": 32,
        "seq": 256,
        "concat": 4,
    },
    "llama-0.5b": {
        "model": "tiny-llama:num_hidden_layers=32,hidden_size=1024,num_attention_heads=16,"
        "num_key_value_heads=4,intermediate_size=4096,vocab=8000",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "batch": 8,
        "seq": 512,
        "concat": 8,
    },
}


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams design on ``n`` contenders: rows (round orders) in which every contender
    takes every position equally often and immediately follows every other contender equally
    often (first-order carry-over balance).  Row r of the cyclic design is ``(s + r) mod n``
    for the sequence s = 0, 1, n-1, 2, n-2, ...; an odd ``n`` adds the reversed rows (2n rows
    then, n otherwise)."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def rounds_for(args: argparse.Namespace, n: int) -> int:
    """``--rounds`` rounded up to whole passes over the design (at least one pass)."""
    rows = len(balanced_orders(n))
    return max(1, -(-(args.rounds or rows) // rows)) * rows


def spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles (linear interpolation) of per-round values."""
    q1, med, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def long_records(path: Path, concat: int, limit: int) -> Path:
    """The bundled notes, ``concat`` per record (so that records reach long sequences)."""
    src = ROOT / "dptrain" / "data" / "bundled" / "clinic_notes.jsonl"
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines() if line.strip()]
    out = path / f"notes_x{concat}.jsonl"
    with out.open("w") as f:
        for i in range(0, min(len(texts), limit * concat), concat):
            f.write(json.dumps({"text": "\n\n".join(texts[i : i + concat])}) + "\n")
    return out


def make_recipe(setup: dict, args: argparse.Namespace, accountant: str, out: Path):
    from dptrain.recipe import parse_recipe

    records = args.records
    data = long_records(out, setup["concat"], records + 64)
    most = rounds_for(args, 5 if args.opacus else 3)  # Opacus may refuse: an upper bound
    steps = (most + 1) * args.block + args.profile + 4
    return parse_recipe(
        {
            "name": "bench",
            "output_dir": str(out / f"run-{accountant}"),
            "model": {"name": setup["model"]},
            "lora": setup["lora"],
            "data": {
                "path": str(data),
                "max_length": setup["seq"],
                "validation_fraction": 0.02,
                "max_validation_records": 8,
            },
            "training": {
                "steps": steps,
                "batch_size": setup["batch"],
                "physical_batch_size": args.physical or setup["batch"] * 2,
                "optimizer": "adamw",
                "lr": 1e-4,
                "log_every": 1,
                "checkpoint_every": 10**9,  # loop() checkpoints at the end of every block
                "device": args.device,
                "precision": args.precision,
            },
            "policy": {"name": "static", "clip": 1.0, "noise_multiplier": 1.0},
            "privacy": {"epsilon": 1e6, "accountant": accountant},
        },
        "benchmark",
    )


def tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


class Timers:
    """Accumulated seconds per part; wrappers synchronize the device around each call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            if self.depth:  # nested in another timed part: counted there
                return fn(*a, **k)
            _sync(self.device)
            t0 = time.perf_counter()
            self.depth += 1
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                _sync(self.device)
                self.seconds[part] += time.perf_counter() - t0

        return timed


class _TimedNoise:
    def __init__(self, noise, timers: Timers) -> None:
        self._noise, self._call = noise, timers.wrap("noise", noise.__call__)
        self._many = timers.wrap("noise", noise.many) if hasattr(noise, "many") else None

    def __call__(self, like, std):
        return self._call(like, std)

    def many(self, likes, stds):
        if self._many is None:
            raise AttributeError("many")
        return self._many(likes, stds)

    def __getattr__(self, name):
        return getattr(self._noise, name)


@contextlib.contextmanager
def profiled(built, timers: Timers):
    """Timers around the parts of the recipe contender's step (see the module docstring)."""
    import dptrain.engine as E

    engine = built.engine
    saved = {
        "clip": E.clip_and_sum,
        "run": engine.capture.run,
        "loss": engine.loss_fn,
        "noise": engine.noise,
        "opt": engine.optimizer.step,
        "sample": built.sampler.sample,
        "batch": built.train_ex.batch,
        "allows": engine.filter.allows if engine.filter else None,
        "record": engine.ledger.record,
        "epsilon": engine.epsilon,
        "checkpoint": T.checkpoint,
    }
    forward = timers.wrap("forward", saved["loss"])
    E.clip_and_sum = timers.wrap("per-sample work", saved["clip"])
    engine.loss_fn = forward
    run = timers.wrap("forward+backward", saved["run"])
    engine.capture.run = run
    engine.noise = _TimedNoise(saved["noise"], timers)
    engine.optimizer.step = timers.wrap("optimizer", saved["opt"])
    built.sampler.sample = timers.wrap("data", saved["sample"])
    built.train_ex.batch = timers.wrap("data", saved["batch"])
    if engine.filter:
        engine.filter.allows = timers.wrap("accounting", saved["allows"])
    engine.epsilon = timers.wrap("accounting", saved["epsilon"])
    ledger = engine.ledger
    ledger.record = timers.wrap("accounting", saved["record"])
    T.checkpoint = timers.wrap("checkpoint", saved["checkpoint"])
    # forward runs inside forward+backward: time it there without the depth guard
    fwd_seconds = defaultdict(float)

    def loss_timed(*a, **k):
        _sync(timers.device)
        t0 = time.perf_counter()
        try:
            return saved["loss"](*a, **k)
        finally:
            _sync(timers.device)
            fwd_seconds["forward"] += time.perf_counter() - t0

    engine.loss_fn = loss_timed
    try:
        yield fwd_seconds
    finally:
        E.clip_and_sum = saved["clip"]
        engine.capture.run = saved["run"]
        engine.loss_fn = saved["loss"]
        engine.noise = saved["noise"]
        del engine.optimizer.step
        del built.sampler.sample
        del built.train_ex.batch
        if engine.filter:
            del engine.filter.allows
        del engine.epsilon
        del ledger.record
        T.checkpoint = saved["checkpoint"]


def nonprivate_step(model: nn.Module, opt, precision) -> Callable[[dict], None]:
    from dptrain.losses import causal_lm_loss

    device = next(model.parameters()).device

    def step(batch: dict) -> None:
        if batch["input_ids"].shape[0] == 0:
            return  # a plain loop takes no step on an empty Poisson batch (llama's forward fails)
        opt.zero_grad(set_to_none=True)
        with precision.autocast(device):
            loss = causal_lm_loss(model, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def opacus_step(
    model: nn.Module, mode: str, batch_size: float, precision
) -> Callable[[dict], None]:
    """Opacus 1.6 on a live batch: ``step_time``'s contender reading the batch at call time,
    its forward and backward under the recipe's autocast (as the other contenders)."""
    import step_time as S

    live: dict = {}
    fn = S._opacus(model, _LiveBatch(live, max(1, round(batch_size))), mode)
    device = next(model.parameters()).device

    def step(batch: dict) -> None:
        b, t = batch["input_ids"].shape
        if b == 0:
            return  # skipped as in the plain loop: llama's forward fails on an empty batch
        live.update(batch)
        live["position_ids"] = torch.arange(t, device=batch["input_ids"].device).expand(b, t)
        with precision.autocast(device):
            fn()

    return step


class _LiveBatch(dict):
    """A dict whose items are read from ``live`` at call time (the batch changes per step)."""

    def __init__(self, live: dict, size: int) -> None:
        super().__init__()
        self.live, self.size = live, size

    def __getitem__(self, key):
        if key == "input_ids" and not self.live:
            return torch.zeros(self.size, 1, dtype=torch.long)
        return self.live[key]


def run_setup(name: str, args: argparse.Namespace, accountant: str) -> dict[str, Any]:
    import dptrain
    from dptrain.losses import causal_lm_loss
    from dptrain.models import build_model
    from dptrain.precision import Precision

    setup = SETUPS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        recipe = make_recipe(setup, args, accountant, out)
        prep = T.prepare(recipe)
        T.start(prep)
        built = T.build(prep)
        meta, stats = T.begin_meta(prep, built)
        device = next(built.model.parameters()).device
        precision = built.engine.precision
        most = rounds_for(args, 5 if args.opacus else 3)
        batches = [
            built.train_ex.batch(built.sampler.sample(t))
            for t in range((most + 1) * args.block + 1)
        ]
        dev_batches = [to_device(b, device) for b in batches]

        contenders: dict[str, Callable[[int], None]] = {}

        def recipe_block(start: int) -> None:
            assert built.engine.steps_taken == start, (built.engine.steps_taken, start)
            T.loop(prep, built, meta, stats, False, args.block)

        contenders["recipe"] = recipe_block

        def blockwise(step: Callable[[dict], None]) -> Callable[[int], None]:
            def block(start: int) -> None:
                for t in range(start, start + args.block):
                    step(dev_batches[t])

            return block

        m_engine, _ = build_model(recipe, device)
        params = [p for p in m_engine.parameters() if p.requires_grad]
        engine = dptrain.PrivacyEngine(
            m_engine,
            torch.optim.AdamW(params, lr=1e-4),
            policy=dptrain.StaticPolicy(clip=1.0, noise_multiplier=1.0),
            sample_rate=prep.plan.sample_rate,
            dataset_size=len(built.train_ex),
            loss_fn=causal_lm_loss,
            max_physical_batch_size=recipe.training.physical_batch_size,
            noise=dptrain.GaussianNoise(),
            precision=Precision(recipe.training.precision, recipe.training.loss_scale),
            max_length=recipe.data.max_length,  # as `dptrain train` passes it
        )
        contenders["engine"] = blockwise(engine.step)
        m_plain, _ = build_model(recipe, device)
        plain_opt = torch.optim.AdamW([p for p in m_plain.parameters() if p.requires_grad], 1e-4)
        contenders["nonprivate"] = blockwise(nonprivate_step(m_plain, plain_opt, precision))
        errors, notes = {}, {}
        if args.opacus:
            # under the recipe's precision; where Opacus fails under autocast (its hooks'
            # per-sample gradients in bf16), in fp32, and the result says so
            tries = [precision] if precision.name == "fp32" else [precision, Precision("fp32")]
            for mode in ("hooks", "ghost"):
                why = []
                for p in tries:
                    try:
                        m_op, _ = build_model(recipe, device)
                        step = opacus_step(m_op, mode, setup["batch"], p)
                        step(dev_batches[0])  # warm-up, and refuse here if it does not apply
                    except Exception as err:  # recorded, e.g. tied weights
                        why.append(f"{p.name}: {type(err).__name__}: {str(err)[:160]}")
                        continue
                    contenders[f"opacus-{mode}"] = blockwise(step)
                    if why:
                        notes[f"opacus-{mode}"] = f"ran in {p.name}; " + "; ".join(why)
                    break
                else:
                    errors[f"opacus-{mode}"] = "; ".join(why)

        # warm-up: step 0 of each outside the timed blocks (the engine probes the model then)
        T.loop(prep, built, meta, stats, False, 1)
        engine.step(dev_batches[0])
        nonprivate_step(m_plain, plain_opt, precision)(dev_batches[0])
        names = list(contenders)
        orders = balanced_orders(len(names))
        rounds = rounds_for(args, len(names))
        total = rounds * args.block
        first = 1 + args.block  # steps 1 .. block: the warm-up round, discarded
        n_tokens = sum(tokens(b) for b in batches[first : first + total])
        for c in names:  # the warm-up round: every contender's first block, untimed
            contenders[c](1)
        load_start = os.getloadavg()
        block_s: dict[str, list[float]] = {c: [] for c in names}
        after_recipe: dict[str, list[bool]] = {c: [] for c in names}
        # on CUDA: a block's peak of allocated memory above what was allocated before it (all
        # contenders' weights and optimizer states stay resident: the growth is the step's own)
        growth: dict[str, int] = {c: 0 for c in names}
        cuda = device.type == "cuda"
        previous = names[-1]
        for i in range(rounds):
            for j in orders[i % len(orders)]:
                c = names[j]
                _sync(device)
                if cuda:
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                contenders[c](first + i * args.block)
                _sync(device)
                block_s[c].append(time.perf_counter() - t0)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(device) - base
                    growth[c] = max(growth[c], peak)
                after_recipe[c].append(previous == "recipe")
                previous = c
        seconds = {c: sum(v) for c, v in block_s.items()}
        result: dict[str, Any] = {
            "setup": name,
            "model": setup["model"],
            "lora": bool(setup["lora"]),
            "accountant": accountant,
            "precision": precision.name,
            "device": str(device),
            "expected_batch": setup["batch"],
            "seq": setup["seq"],
            "rounds": rounds,
            "block": args.block,
            "orders": [[names[j] for j in row] for row in orders],
            "steps_per_contender": total,
            "tokens": n_tokens,
            "contenders": {
                c: {
                    "step_s": s / total,
                    "tokens_per_s": n_tokens / s,
                    "block_step_s": [b / args.block for b in block_s[c]],
                    **({"peak_growth_gib": growth[c] / 2**30} if cuda else {}),
                }
                for c, s in seconds.items()
            },
            "errors": errors,
            "notes": notes,
            "load_average": {"start": load_start, "end": os.getloadavg()},
        }
        pairs = [(c, b) for b in ("nonprivate", "engine") for c in names if c != b]
        pairs = [p for p in pairs if p != ("nonprivate", "engine")]
        result["ratios"] = {
            f"{c}_over_{b}": {
                **spread([x / y for x, y in zip(block_s[c], block_s[b], strict=True)]),
                "of_totals": seconds[c] / seconds[b],
            }
            for c, b in pairs
        }
        # what following the recipe's block (and its checkpoint) costs a contender: its
        # block time after the recipe over its block time after another, per-round normalized
        # by the round's non-private block
        carry = {}
        for c in names:
            if c in ("recipe", "nonprivate"):
                continue
            rel = [x / y for x, y in zip(block_s[c], block_s["nonprivate"], strict=True)]
            after = [r for r, a in zip(rel, after_recipe[c], strict=True) if a]
            other = [r for r, a in zip(rel, after_recipe[c], strict=True) if not a]
            if after and other:
                carry[c] = float(np.median(after) / np.median(other))
        result["after_recipe_over_after_other"] = carry
        if args.profile:
            timers = Timers(device)
            with profiled(built, timers) as fwd:
                _sync(device)
                t0 = time.perf_counter()
                T.loop(prep, built, meta, stats, False, args.profile)
                _sync(device)
                wall = time.perf_counter() - t0
            parts = dict(timers.seconds)
            both = parts.pop("forward+backward", 0.0)
            parts["forward"] = fwd["forward"]
            parts["backward"] = both - fwd["forward"]
            parts["other (metrics, python)"] = wall - sum(parts.values())
            result["profile_per_step_ms"] = {
                k: 1e3 * v / args.profile for k, v in sorted(parts.items(), key=lambda x: -x[1])
            }
        if args.kernels:  # what the device runs: the bare engine's step against non-private
            plain = nonprivate_step(m_plain, plain_opt, precision)
            some = dev_batches[first : first + args.kernels]
            result["kernels"] = {
                c: kernel_table(step, some, device)
                for c, step in (("engine", engine.step), ("nonprivate", plain))
            }
        built.engine.detach()
        engine.detach()
    return result


def kernel_table(
    step: Callable[[Any], Any], batches: list, device: torch.device, rows: int = 25
) -> str:
    """``torch.profiler``'s operator table of ``step`` over ``batches``, by self time on the
    device (CUDA) or the CPU: which kernels, and how many calls, the step's time is made of."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        _sync(device)
    table = prof.key_averages()
    for key in (
        ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    ):
        try:
            return table.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return table.table(row_limit=rows)


def print_result(r: dict[str, Any]) -> None:
    head = (
        f"\n{r['setup']} ({r['model']}{', LoRA' if r['lora'] else ''}) on {r['device']}, "
        f"{r['precision']}, accountant {r['accountant']}, E[B]={r['expected_batch']}, "
        f"seq<={r['seq']}, {r['steps_per_contender']} steps each"
    )
    print(head)
    la = r["load_average"]
    print(f"  load average (1, 5, 15 min) at start {la['start']}, at end {la['end']}")
    for c, v in r["contenders"].items():
        mem = f"  peak growth {v['peak_growth_gib']:.2f} GiB" if "peak_growth_gib" in v else ""
        print(
            f"  {c:14s} {1e3 * v['step_s']:9.1f} ms/step  {v['tokens_per_s']:10.0f} tokens/s{mem}"
        )
    print(f"  per-round ratios over {r['rounds']} rounds of {r['block']} steps: median [q1, q3]")
    for k, v in r["ratios"].items():
        print(
            f"  {k:28s} {v['median']:.3f} [{v['q1']:.3f}, {v['q3']:.3f}]"
            f"  (totals {v['of_totals']:.3f})"
        )
    for k, v in r.get("after_recipe_over_after_other", {}).items():
        print(f"  {k} after the recipe's block / after another's: {v:.3f}")
    for k, v in r.get("errors", {}).items():
        print(f"  {k}: not run ({v})")
    for k, v in r.get("notes", {}).items():
        print(f"  {k}: {v}")
    if "profile_per_step_ms" in r:
        print("  profile of a recipe step (ms):")
        for k, v in r["profile_per_step_ms"].items():
            print(f"    {k:38s} {v:8.2f}")
    for c, table in r.get("kernels", {}).items():
        print(f"  operators of {c} ({r['device']}):")
        print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", nargs="+", default=None, choices=sorted(SETUPS))
    ap.add_argument("--accountants", nargs="+", default=["rdp"])
    ap.add_argument("--rounds", type=int, default=None, help="rounds (rounded up to whole designs)")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--profile", type=int, default=5)
    ap.add_argument("--kernels", type=int, default=0, help="steps under torch.profiler")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--physical", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--opacus", action="store_true", help="add Opacus 1.6 hooks and ghost")
    ap.add_argument(
        "--quick", action="store_true", help="rdp, one design of rounds of 3 steps (full setup)"
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:  # --setups still applies (default full)
        args.accountants = ["rdp"]
        args.rounds, args.block, args.profile, args.records = None, 3, 3, 600
    args.setups = args.setups or ["full"]
    results = []
    for name in args.setups:
        for acc in args.accountants:
            r = run_setup(name, args, acc)
            print_result(r)
            results.append(r)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.exists() else {}
    for r in results:  # one entry per device, setup, precision and accountant (latest run)
        runs = stored.setdefault(r["device"].split(":")[0], {})
        runs[f"{r['setup']} {r['precision']} {r['accountant']}"] = {
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": " ".join(["python", *sys.argv]),
            **r,
        }
    path.write_text(json.dumps(stored, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
