"""Tiny randomly initialized causal LMs for tests and benchmarks: ``"tiny-gpt2"`` and
``"tiny-llama"`` with ``key=value`` overrides after a colon, and a byte-level BPE tokenizer
trained on the bundled corpus."""

from __future__ import annotations

import functools
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .. import rng
from ..errors import ModelSpecError

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
    with rng.seeded(seed):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tok
