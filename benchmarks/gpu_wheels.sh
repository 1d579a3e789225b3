#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh needs on the lent GPU machine (nvidia-h200), which has
# torch, numpy, scipy, tokenizers, safetensors, accelerate, matplotlib, ... but not dptrain's
# own pins and privacy libraries, and no network.  Run HERE (where pip reaches the registry),
# from the repository root; it fills .whl/ (git-ignored, about 25 MB), which the device call
# carries:   bash benchmarks/gpu_wheels.sh   then   run(command="bash benchmarks/gpu_check.sh",
# carry=[".whl"]).  Versions are those of the local venv (what CI tests), else the pins below.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
[ -x "$PY" ] || PY=python3
# name==fallback-version (pyproject pins; their dependencies the image lacks or pins otherwise)
WANT="gguf==0.19.0 dp-accounting==0.6.0 prv-accountant==0.2.0
dm-tree==0.1.10 attrs==23.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 typing-extensions==4.16.0 cryptography==50.0.2 cffi==2.1.1
pycparser==3.12 opacus==1.6.0 stable-baselines3==2.9.2 gymnasium==1.4.0 farama-notifications==0.0.6
pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==25.0 pygments==2.21.0"
# the Hugging Face layer (.whl/hf/): our transformers and peft with the hub stack they need;
# gpu_check.sh uses it only if it imports there (else the image's own transformers and peft)
HF="transformers==5.23.0 peft==0.21.2 huggingface-hub==2.4.0 tokenizers==0.23.3
safetensors==0.8.0 regex==2026.11.19 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
hf-xet==1.8.0 click==8.5.1 anyio==4.16.0 idna==3.20 h11==0.16.0 typer==0.20.1"
pinned() {  # pinned NAME==VERSION...: each name at the local venv's version, else the pin
    local w name have
    for w in "$@"; do
        name=${w%%==*}
        have=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
        echo "$name==${have:-${w##*==}}"
    done
}
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
get() {  # get DIR SPEC...: cp312 x86-64 wheels, no dependencies
    local dir=$1
    shift
    mkdir -p "$dir"
    rm -f "$dir"/*.whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plat[@]}" -d "$dir" "$@"
}
# shellcheck disable=SC2086
get .whl $(pinned $WANT)
# shellcheck disable=SC2086
get .whl/hf $(pinned $HF)
ls -1 .whl .whl/hf
du -sh .whl
