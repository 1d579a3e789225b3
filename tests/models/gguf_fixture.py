"""Write a tiny Llama GGUF (random weights, byte-level BPE vocabulary) for loader tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_tiny_llama_gguf(
    path: Path, *, vocab_size: int = 300, hidden: int = 64, seed: int = 0
) -> Path:
    import gguf

    from dptrain.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer(vocab_size)
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    eot = vocab["<|endoftext|>"]
    n_vocab, n_layer, n_head, n_kv, ffn = len(tokens), 2, 4, 2, 128
    head_dim = hidden // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)

    rng = np.random.default_rng(seed)

    def t(name: str, *shape: int, quant: bool = False) -> None:
        arr = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if quant:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    t("token_embd.weight", n_vocab, hidden, quant=True)
    t("output_norm.weight", hidden)
    for i in range(n_layer):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", hidden, hidden, quant=True)
        t(f"blk.{i}.attn_k.weight", n_kv * head_dim, hidden, quant=True)
        t(f"blk.{i}.attn_v.weight", n_kv * head_dim, hidden, quant=True)
        t(f"blk.{i}.attn_output.weight", hidden, hidden, quant=True)
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden, quant=True)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden, quant=True)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn, quant=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
