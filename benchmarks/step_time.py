"""Step time and peak memory of a private step: plain PyTorch vs Opacus vs dptrain.

    python benchmarks/step_time.py                          # all setups; CUDA when present
    python benchmarks/step_time.py --setups full --steps 5  # one setup, more steps
    python benchmarks/step_time.py --profile full           # where a dptrain step spends time

Every setup builds one model per contender from the same seed (same weights, batch, sequence
length and data), then interleaves the contenders step by step (A B C D, B C D A, ...) so that
a machine shared with other work slows them alike, and reports the median step time and the
median peak memory of a step:

* ``nonprivate``: ``loss.mean().backward(); optimizer.step()``;
* ``opacus-hooks``: Opacus ``PrivacyEngine.make_private(grad_sample_mode="hooks")``;
* ``opacus-ghost``: Opacus ghost clipping, where it applies (not with tied weights);
* ``dptrain``: :class:`dptrain.PrivacyEngine` with the static policy (``ghost="auto"``);

all with AdamW, clip 1 and noise multiplier 1.  Times are wall-clock (CPU time of the process
is recorded beside them, steadier on a shared machine).  Peak memory is the growth over a
step, measured in separate untimed rounds after the timed ones: on CUDA the allocator's peak
above what was allocated before the step; on CPU the peak resident set (VmHWM, reset before
the step) above the resident set before it, with glibc told to return freed blocks of 64 KiB
or more to the system at once (``M_MMAP_THRESHOLD``, ``malloc_trim``) so that memory cached
by the allocator is not counted.  Timed rounds run with glibc's steady-state thresholds (32
MiB), since mapping every block afresh would slow all contenders.

Results go to ``benchmarks/results/step_time.json`` under the device they were measured on
(runs on other devices are kept).  SmolLM2-135M uses its pretrained weights when they are
cached (``dptrain.models``); elsewhere (a GPU machine without them) the same architecture with
random weights, which costs the same time and memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def _malloc_mode(exact: bool) -> None:
    """glibc: ``exact`` serves blocks >= 64 KiB by mmap and trims at once, so the resident set
    follows live memory; otherwise the thresholds glibc reaches in a steady training loop."""
    if _LIBC is None:
        return
    size = 64 * 1024 if exact else 32 * 2**20
    _LIBC.mallopt(-3, size)  # M_MMAP_THRESHOLD
    _LIBC.mallopt(-1, size if exact else 2 * size)  # M_TRIM_THRESHOLD
    if exact:
        _LIBC.malloc_trim(0)


SMOLLM2_ARCH = {  # SmolLM2-135M(-Instruct): used with random weights where none are cached
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

GPT2_SMALL = "tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=8000"

SETUPS: dict[str, dict[str, Any]] = {
    "lora": {  # (a) SmolLM2-135M + LoRA r=8 on q, v
        "model": "smollm2-135m",
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "batch": 4,
        "seq": 128,
    },
    "full": {"model": GPT2_SMALL, "lora": None, "batch": 16, "seq": 128},  # (b)
    "full-b64": {"model": GPT2_SMALL, "lora": None, "batch": 64, "seq": 128},  # (c)
}

TARGETS = {  # from the issue; ratios of medians from one run
    "lora": {"dp_over_nonprivate": 1.05, "dptrain_over_opacus": 1.0},
    "full": {"dp_over_nonprivate": 1.25, "dptrain_over_opacus": 0.75},
    "full-b64": {"mem_dp_over_nonprivate": 1.2, "mem_dptrain_over_opacus": 1.0},
}

CONTENDERS = ["nonprivate", "opacus-hooks", "opacus-ghost", "dptrain"]
NOISE, CLIP, LR, DATASET = 1.0, 1.0, 1e-4, 10_000
MEMORY_ROUNDS = 2  # untimed steps per contender for peak memory (their maximum is reported)


# -- models and data ----------------------------------------------------------------------


def build_model(setup: dict[str, Any], device: torch.device, seed: int) -> tuple[nn.Module, str]:
    """The setup's model on ``device`` (train mode) and a note on its weights."""
    from dptrain.models import SMOLLM2, cache_root, load_model_and_tokenizer

    note = "pretrained"
    if setup["model"] == SMOLLM2:
        if (cache_root() / "models" / SMOLLM2 / "config.json").is_file():
            model, _ = load_model_and_tokenizer(SMOLLM2)
        else:  # not cached here (e.g. a GPU machine without network): same architecture
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_ARCH))
            note = "random weights, same architecture (pretrained weights not cached)"
    else:
        model, _ = load_model_and_tokenizer(f"{setup['model']},seed={seed}")
        note = "random init"
    if setup["lora"]:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **setup["lora"]))
    return model.to(device).train(), note


def make_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous().to(device),
        "labels": ids.to(device),
    }


def per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token NLL per sequence (explicit per-sample position ids, which Opacus needs)."""
    from dptrain.losses import token_nll

    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    )
    return token_nll(out.logits, batch["labels"]).mean_per_sample


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- contenders: each returns a step function -----------------------------------------------


def _mean_loss_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: dict
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        per_sample_loss(model, batch).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def nonprivate(model: nn.Module, batch: dict) -> Callable[[], None]:
    return _mean_loss_step(model, torch.optim.AdamW(_trainable(model), lr=LR), batch)


def _opacus(model: nn.Module, batch: dict, mode: str) -> Callable[[], None]:
    from opacus import PrivacyEngine as OpacusEngine
    from torch.utils.data import DataLoader, TensorDataset

    b = batch["input_ids"].shape[0]
    loader = DataLoader(TensorDataset(torch.zeros(DATASET)), batch_size=b)
    opt = torch.optim.AdamW(_trainable(model), lr=LR)
    common = {
        "optimizer": opt,
        "data_loader": loader,
        "noise_multiplier": NOISE,
        "max_grad_norm": CLIP,
        "poisson_sampling": False,
    }
    if mode == "hooks":
        gsm, opt, _ = OpacusEngine().make_private(module=model, grad_sample_mode="hooks", **common)
        return _mean_loss_step(gsm, opt, batch)

    crit = nn.CrossEntropyLoss(ignore_index=-100)
    gsm, opt, crit, _ = OpacusEngine().make_private(
        module=model, criterion=crit, grad_sample_mode="ghost", **common
    )

    def ghost_step() -> None:
        opt.zero_grad(set_to_none=True)
        out = gsm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        logits = out.logits[:, :-1]
        labels = batch["labels"][:, 1:]
        v = logits.shape[-1]
        loss = crit(logits.reshape(-1, v), labels.reshape(-1), shape=labels.shape)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return ghost_step


def opacus_hooks(model: nn.Module, batch: dict) -> Callable[[], None]:
    return _opacus(model, batch, "hooks")


def opacus_ghost(model: nn.Module, batch: dict) -> Callable[[], None]:
    return _opacus(model, batch, "ghost")


def dptrain_step(model: nn.Module, batch: dict, ghost: str = "auto") -> Callable[[], None]:
    import dptrain

    b = batch["input_ids"].shape[0]
    engine = dptrain.PrivacyEngine(
        model,
        torch.optim.AdamW(_trainable(model), lr=LR),
        policy=dptrain.StaticPolicy(clip=CLIP, noise_multiplier=NOISE),
        sample_rate=b / DATASET,
        dataset_size=DATASET,
        loss_fn=per_sample_loss,
        noise=dptrain.GaussianNoise(),  # the keyed full-tailed sampler every run uses
        ghost=ghost,
    )

    def step() -> None:
        engine.step(batch)

    return step


FACTORIES: dict[str, Callable[[nn.Module, dict], Callable[[], None]]] = {
    "nonprivate": nonprivate,
    "opacus-hooks": opacus_hooks,
    "opacus-ghost": opacus_ghost,
    "dptrain": dptrain_step,
    "dptrain-materialized": lambda m, b: dptrain_step(m, b, "never"),
    "dptrain-ghost": lambda m, b: dptrain_step(m, b, "always"),
}


# -- measurement ----------------------------------------------------------------------------


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS:``, ``VmHWM:``) in bytes; 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Wall time, process CPU time (all threads) or peak memory growth of one call."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], None]) -> tuple[float, float]:
        """Wall and process CPU seconds of ``fn()``."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    def memory(self, fn: Callable[[], None]) -> int:
        """Peak memory growth (bytes) while ``fn()`` runs."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        _malloc_mode(exact=True)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            base = proc_status("VmRSS:")
            fn()
            return proc_status("VmHWM:") - base
        finally:
            _malloc_mode(exact=False)


def run_setup(
    name: str, contenders: list[str], steps: int, warmup: int, device: torch.device, seed: int
) -> dict[str, Any]:
    setup = SETUPS[name]
    steps_of: dict[str, Callable[[], None]] = {}
    result: dict[str, Any] = {"config": {k: setup[k] for k in ("model", "lora", "batch", "seq")}}
    failed: dict[str, str] = {}
    for c in contenders:
        model, note = build_model(setup, device, seed)
        result["config"]["weights"] = note
        vocab = model.get_input_embeddings().weight.shape[0]
        batch = make_batch(vocab, setup["batch"], setup["seq"], device, seed)
        try:
            steps_of[c] = FACTORIES[c](model, batch)
            for _ in range(warmup):
                steps_of[c]()
        except Exception as e:  # a contender that does not apply (e.g. Opacus ghost + tied weights)
            failed[c] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            steps_of.pop(c, None)
            print(f"  [{name}] {c}: not applicable: {failed[c]}", flush=True)
            if os.environ.get("STEP_TIME_DEBUG"):
                traceback.print_exc()
    meter = Meter(device)
    times: dict[str, list[float]] = {c: [] for c in steps_of}
    cpus: dict[str, list[float]] = {c: [] for c in steps_of}
    mems: dict[str, list[int]] = {c: [] for c in steps_of}
    order = list(steps_of)
    for i in range(steps):
        k = i % len(order) if order else 0
        for c in order[k:] + order[:k]:
            dt, cpu = meter.time(steps_of[c])
            times[c].append(dt)
            cpus[c].append(cpu)
        print(
            f"  [{name}] step {i + 1}/{steps}: "
            + "  ".join(f"{c} {times[c][-1]:.3f}s" for c in order),
            flush=True,
        )
    for _ in range(MEMORY_ROUNDS):
        for c in order:
            mems[c].append(meter.memory(steps_of[c]))
    result["contenders"] = {
        c: {
            "median_s": statistics.median(times[c]),
            "step_s": times[c],
            "median_cpu_s": statistics.median(cpus[c]),
            "peak_mem_mb": max(mems[c]) / 2**20,
        }
        for c in order
    }
    result["not_applicable"] = failed
    result["ratios"] = ratios(result["contenders"])
    result["targets"] = TARGETS.get(name, {})
    result["met"] = {
        k: result["ratios"].get(k) is not None and result["ratios"][k] <= v
        for k, v in result["targets"].items()
    }
    steps_of.clear()
    gc.collect()
    return result


def ratios(r: dict[str, dict[str, float]]) -> dict[str, float | None]:
    def ratio(a: str, b: str, key: str) -> float | None:
        if a in r and b in r and r[b][key] > 0:
            return r[a][key] / r[b][key]
        return None

    return {
        "dp_over_nonprivate": ratio("dptrain", "nonprivate", "median_s"),
        "dptrain_over_opacus": ratio("dptrain", "opacus-hooks", "median_s"),
        "dptrain_over_opacus_ghost": ratio("dptrain", "opacus-ghost", "median_s"),
        "opacus_over_nonprivate": ratio("opacus-hooks", "nonprivate", "median_s"),
        "cpu_dp_over_nonprivate": ratio("dptrain", "nonprivate", "median_cpu_s"),
        "cpu_dptrain_over_opacus": ratio("dptrain", "opacus-hooks", "median_cpu_s"),
        "mem_dp_over_nonprivate": ratio("dptrain", "nonprivate", "peak_mem_mb"),
        "mem_dptrain_over_opacus": ratio("dptrain", "opacus-hooks", "peak_mem_mb"),
        "mem_dptrain_over_opacus_ghost": ratio("dptrain", "opacus-ghost", "peak_mem_mb"),
    }


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    try:
        import opacus
        import transformers

        info["opacus"] = opacus.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    info["cpu"] = names[0] if names else platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(device: str, results: dict[str, Any]) -> None:
    print(f"\nstep time (median) and peak step memory on {device}")
    head = f"{'setup':10s} {'contender':22s} {'step s':>9s} {'cpu s':>9s} {'peak MB':>9s}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        for c, v in r["contenders"].items():
            print(
                f"{name:10s} {c:22s} {v['median_s']:9.3f} {v['median_cpu_s']:9.3f} "
                f"{v['peak_mem_mb']:9.0f}"
            )
        for c, why in r["not_applicable"].items():
            print(f"{name:10s} {c:22s} {'n/a':>9s}  ({why[:60]})")
    print("\nratios (dptrain = static policy; targets from the issue)")
    for name, r in results.items():
        parts = []
        for k, v in r["ratios"].items():
            if v is None:
                continue
            t = r["targets"].get(k)
            mark = "" if t is None else (f" (<= {t} {'met' if v <= t else 'MISSED'})")
            parts.append(f"{k} {v:.2f}{mark}")
        print(f"{name:10s} " + "; ".join(parts))


def profile(name: str, device: torch.device, seed: int, contender: str) -> None:
    """Top operators of one step of ``contender`` (after a warm-up step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    setup = SETUPS[name]
    model, _ = build_model(setup, device, seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = make_batch(vocab, setup["batch"], setup["seq"], device, seed)
    step = FACTORIES[contender](model, batch)
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=acts) as p:
        step()
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== {name} / {contender}")
    print(p.key_averages().table(sort_by=key, row_limit=25))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated: " + ", ".join(SETUPS)
    )
    ap.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="from: " + ", ".join(FACTORIES)
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--profile", metavar="SETUP", help="profile one step of each contender instead")
    ap.add_argument("--out", default=str(RESULTS / "step_time.json"))
    args = ap.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [s for s in setups if s not in SETUPS] + [c for c in contenders if c not in FACTORIES]
    if bad:
        ap.error(f"unknown setups/contenders {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    _malloc_mode(exact=False)
    torch.manual_seed(args.seed)
    if args.profile:
        for c in contenders:
            profile(args.profile, device, args.seed, c)
        return 0
    info = machine(device)
    print(f"device {device}: {info.get('gpu', info['cpu'])}, {info['threads']} threads", flush=True)
    t0 = time.perf_counter()
    results = {}
    for name in setups:
        print(f"[{name}] {SETUPS[name]}", flush=True)
        results[name] = run_setup(name, contenders, args.steps, args.warmup, device, args.seed)
    info["load_average_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t0
    info["command"] = "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:])
    label = f"cuda: {info['gpu']}" if device.type == "cuda" else "cpu"
    print_table(label, results)
    out = Path(args.out)
    stored: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    entry = stored.get(label, {"setups": {}})
    entry["machine"] = info
    entry["setups"].update(results)
    stored[label] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=2))
    print(f"wrote {out} ({info['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
