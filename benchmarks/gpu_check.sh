#!/usr/bin/env bash
# GPU check of issue 15 in one go, < 9 minutes on one H200 (a global deadline, BUDGET seconds,
# clips every part and skips what no longer fits): devices, precisions, exactness on the GPU,
# a cross-device resume and run.json's device segments, a classifier with gradient
# checkpointing, the white-box audit and the rl policy on the GPU, --nproc 2 where two GPUs
# exist, and the end-to-end benchmark (recipe path vs bare engine vs non-private vs Opacus).
#
#   bash benchmarks/gpu_wheels.sh        # HERE first (pip reaches the registry): fills .whl/
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580)   # the device
#   DEVICE=cpu BENCH=0 WHEELS=0 bash benchmarks/gpu_check.sh   # smoke test of its commands (CPU)
#
# The lent machine's python3 has torch (a CUDA build) but not dptrain's pins and privacy
# libraries: .whl/ (if present) is installed into /tmp/site first.  Everything is printed;
# files go to $OUT (the device tool returns them; default /tmp/gpu_check): the log, and
# recipe_path.json (the benchmark's results, keyed by device), to be merged into
# benchmarks/results/.  Each part has its own limit, so one that hangs or fails does not stop
# the rest.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
BENCH=${BENCH:-1}
BUDGET=${BUDGET:-520}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site
    else
        echo "wheel install failed: running with $PY's own packages"
    fi
    # our transformers + peft and their hub stack, only if they import there (else the image's)
    if ls .whl/hf/*.whl > /dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --upgrade --target /tmp/site-hf .whl/hf/*.whl &&
        PYTHONPATH="/tmp/site-hf${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import transformers, peft; \
from transformers import GPT2LMHeadModel, LlamaForCausalLM"; then
        export PYTHONPATH="/tmp/site-hf${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "our transformers/peft layer does not import there: using the image's own"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
export DPTRAIN_CACHE=${DPTRAIN_CACHE:-/tmp/gpu_check_cache}  # not under $OUT: 8 files come back
RUNS=$(mktemp -d)  # run directories: not returned (the tool takes 8 files at most)
part() {  # part NAME SECONDS CMD...: run with a limit (clipped to the budget left), print rc
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    echo
    if [ "$left" -lt 15 ]; then
        echo "=== $name: SKIPPED (budget of ${BUDGET}s spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, at +$(($(date +%s) - START))s)"
    timeout "$limit" "$@" 2>&1 | grep -v -e "^WARNING:dptrain.data" -e "^truncated " -e "^step "
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc"
}
meta() {  # meta RUN_DIR: the device fields of run.json, the private counts of stats.json
    "$PY" -c "import json, sys; d = sys.argv[1]; m = json.load(open(d + '/run.json')); \
s = json.load(open(d + '/private/stats.json')); \
print('run.json: device', m.get('device'), 'devices', m.get('devices'), 'precision', \
m.get('precision'), 'steps', m['steps'], 'epsilon', m['epsilon'], 'skipped', \
m.get('skipped_steps'), '| stats.json: nonfinite', s.get('nonfinite_samples'))" "$1" 2>&1
}
CLI=("$PY" -m dptrain.cli)
TINY=recipes/tiny.yaml
ON=(--set "training.device=$DEVICE")

part "environment" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, transformers, peft; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"gpus\", torch.cuda.device_count(), \"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported()); \
  print(\"transformers\", transformers.__version__, \"peft\", peft.__version__)'; \
  $PY -c 'import dptrain, accountants, dp_accounting, prv_accountant; print(\"dptrain imports\")'; \
  $PY -c 'import opacus; print(\"opacus\", opacus.__version__)' || echo 'opacus missing: Opacus contenders skipped'"

# the private step against the explicit float64 per-example loop, on the device, in fp32 and
# under bf16 / fp16 autocast; a classifier with gradient checkpointing likewise
for p in fp32 bf16 fp16; do
    part "check tiny on $DEVICE $p" 60 "${CLI[@]}" check $TINY --records 8 --batch-size 4 \
        "${ON[@]}" --set training.precision=$p
done
part "check classifier on $DEVICE, gradient checkpointing, bf16" 60 "${CLI[@]}" check \
    recipes/classification_tiny.yaml --records 8 --batch-size 4 "${ON[@]}" \
    --set training.gradient_checkpointing=true --set training.precision=bf16

# device auto must pick the GPU and say so (run.json: device, devices)
for p in fp32 bf16; do
    part "train tiny device auto $p" 60 "${CLI[@]}" train $TINY --no-progress \
        --output "$RUNS/tiny-$p" --set training.precision=$p
    meta "$RUNS/tiny-$p"
done

# the rl policy with the model on the device (its SAC agent stays on the CPU)
part "rl policy on $DEVICE" 60 "${CLI[@]}" train $TINY --no-progress --output "$RUNS/rl" \
    "${ON[@]}" --set training.steps=6 --set policy.name=rl --set data.public_fraction=0.1 \
    --set policy.rl.every=2
# the tests that need a GPU (skipped in CI): the saved-statistics norms' bits against the
# inner-graph path under CUDA autocast, ghost norms against the loop, the device noise
part "pytest on $DEVICE" 90 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/grad_sample/test_saved_norms.py tests/grad_sample/test_ghost.py \
    tests/engine/test_device_noise.py tests/engine/test_randomness.py -k cuda

# the end-to-end benchmark: recipe path vs bare engine vs non-private (vs Opacus)
if [ "$BENCH" = 1 ]; then
    RP=("$PY" benchmarks/recipe_path.py --device "$DEVICE" --out "$OUT/recipe_path.json")
    part "recipe path gpt2-124m bf16" 100 "${RP[@]}" --setups gpt2-124m --precision bf16 \
        --opacus --rounds 4 --block 4 --profile 4 --kernels 2 --records 1000
    part "recipe path llama-0.5b lora bf16" 100 "${RP[@]}" --setups llama-0.5b \
        --precision bf16 --opacus --rounds 10 --block 2 --profile 4 --kernels 2 --records 400
    part "recipe path gpt2-124m fp32" 70 "${RP[@]}" --setups gpt2-124m --precision fp32 \
        --rounds 6 --block 2 --profile 3 --records 800
fi

# a checkpoint written on the GPU resumes on the CPU: a second segment in run.json's devices
# (a fixed noise multiplier: a calibrated one would spend the budget in the first 4 steps)
part "resume a $DEVICE run on the CPU" 90 bash -c "set -o pipefail; \
  ${CLI[*]} train $TINY --no-progress --output $RUNS/cross ${ON[*]} --set training.steps=4 \
    --set training.checkpoint_every=2 --set policy.noise_multiplier=1.0 > /dev/null && \
  ${CLI[*]} train $TINY --no-progress --resume $RUNS/cross --set training.device=cpu \
    --set training.steps=8 --set training.checkpoint_every=2 --set policy.noise_multiplier=1.0 \
    | grep -E '^(steps|privacy guarantee|final model|status) '"
meta "$RUNS/cross"

# the white-box audit of a run on the device (canaries through the engine there)
part "white-box audit on $DEVICE" 60 "${CLI[@]}" train $TINY --no-progress \
    --output "$RUNS/whitebox" "${ON[@]}" --set training.steps=4 --set audit.whitebox=true \
    --set audit.whitebox_canaries=300 --set audit.whitebox_simulations=4
# the ghost norms' float64 Grams against float32 on this GPU (the certified clip's cost here)
part "float64 vs float32 Gram" 40 "$PY" benchmarks/gram_rate.py --device "$DEVICE" \
    --out "$OUT/gram_rate.json"
# the device noise generator (ChaCha20 + float64 Box-Muller in torch) on GPT-2 124M's 124.4 M
# normals, eager and compiled: step time, compile + check, CPU-vs-device values, 4-sigma rate
[ "${NOISE:-1}" = 1 ] && part "device noise gpt2-124m eager and compiled" 100 "$PY" benchmarks/device_noise.py \
    --device "$DEVICE" --out "$OUT/device_noise.json"

if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -ge 2 ]; then
    part "nproc 2 on two GPUs" 120 "${CLI[@]}" train $TINY --no-progress --nproc 2 \
        --output "$RUNS/nproc2" --set training.device=cuda
else
    echo "=== nproc 2: skipped (fewer than two GPUs)"
fi
rm -rf "$RUNS"
echo
echo "=== done in $(($(date +%s) - START))s; log and results in $OUT"
