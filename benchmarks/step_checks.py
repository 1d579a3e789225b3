"""Cost of the per-step state checks of a private step (dptrain.grad_sample.capture._run_once):
the buffer snapshot, compare and restore, and the ``.data`` watch on the parameters.

    python benchmarks/step_checks.py [--repeats 200]

Prints microseconds per step for each model, beside the time of one engine chunk
(``GradCapture.run``: forward, backward, per-sample gradients) of a batch of 4.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from dptrain.grad_sample import GradCapture
from dptrain.grad_sample.capture import _buffer_versions, _restore_buffers, _snapshot_buffers
from dptrain.grad_sample.watch import DataWatch
from dptrain.losses import causal_lm_loss
from dptrain.models import load_model_and_tokenizer


def _bn_cnn(layers: int = 40) -> nn.Module:
    """A convolution stack with ``layers`` BatchNorms in eval mode (3 buffers each)."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*mods).eval()


def _smollm2_shape() -> nn.Module:
    """SmolLM2-135M's architecture, randomly initialized (no download)."""
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _checks_us(model: nn.Module, repeats: int) -> tuple[float, float]:
    """Microseconds per step: the checks now (snapshot, watch, compare and restore), and
    before (the buffers' version counters read before and after)."""
    watch = DataWatch(model)
    t0 = time.perf_counter()
    for _ in range(repeats):
        versions, saved = _snapshot_buffers(model)
        with watch:
            pass
        _restore_buffers(model, saved, versions)
        watch.moved()
    t1 = time.perf_counter()
    for _ in range(repeats):
        before = _buffer_versions(model)
        _ = [n for n, v in _buffer_versions(model).items() if before.get(n) != v]
    t2 = time.perf_counter()
    return (t1 - t0) / repeats * 1e6, (t2 - t1) / repeats * 1e6


def _chunk_ms(model: nn.Module, batch: dict, repeats: int = 3) -> float:
    cap = GradCapture(model)
    cap.attach()
    cap.run(causal_lm_loss, batch)  # probes and plans
    t0 = time.perf_counter()
    for _ in range(repeats):
        cap.run(causal_lm_loss, batch)
    cap.detach()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    tiny, _ = load_model_and_tokenizer("tiny-gpt2")
    ids = torch.randint(0, 100, (4, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    models = {"tiny-gpt2": tiny, "SmolLM2-135M shape": _smollm2_shape(), "CNN 40 BN": _bn_cnn()}
    for name, model in models.items():
        n_buf = sum(1 for _ in model.named_buffers())
        now, before = _checks_us(model, args.repeats)
        line = f"{name:<20} {n_buf:>4} buffers  checks {now:8.1f} us/step (before: {before:.1f})"
        if name == "tiny-gpt2":
            line += f"  (one engine chunk of 4 x 32 tokens: {_chunk_ms(model, batch):.1f} ms)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
