#!/usr/bin/env bash
# GPU check of issue 15, < 8 minutes on one H200: devices, precisions, exactness on the GPU,
# a cross-device resume, --nproc 2 where two GPUs exist, and the end-to-end benchmark.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   PY=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs a Python with dptrain's dependencies (pyproject.toml; torch with CUDA; opacus for the
# Opacus contenders).  Everything is printed; results also go to $OUT (default /tmp/gpu_check)
# and benchmarks/results/recipe_path.json (under "cuda").  Each part has its own time limit,
# so one that hangs or fails does not stop the rest.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
export DPTRAIN_CACHE=${DPTRAIN_CACHE:-$OUT/cache}
START=$(date +%s)
part() {  # part NAME SECONDS CMD...: run with a limit, print the outcome and the elapsed time
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s, at +$(($(date +%s) - START))s)"
    timeout "$limit" "$@" 2>&1 | grep -v -e "^WARNING:dptrain.data" -e "^truncated "
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc"
}
CLI=("$PY" -m dptrain.cli)
TINY=recipes/tiny.yaml

part "environment" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, transformers, peft; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"gpus\", torch.cuda.device_count(), \"bf16\", torch.cuda.is_bf16_supported()); \
  print(\"transformers\", transformers.__version__, \"peft\", peft.__version__)'; \
  $PY -c 'import opacus; print(\"opacus\", opacus.__version__)' || echo 'opacus missing: Opacus contenders skipped'"

# device auto must pick the GPU and say so; the private step against the explicit float64
# per-example loop, on the GPU, in fp32 and under bf16 / fp16 autocast
for p in fp32 bf16 fp16; do
    part "check tiny on cuda $p" 90 "${CLI[@]}" check $TINY --records 8 --batch-size 4 \
        --set training.device=cuda --set training.precision=$p
done
for p in fp32 bf16 fp16; do
    part "train tiny device auto $p" 90 "${CLI[@]}" train $TINY --no-progress \
        --output "$OUT/tiny-$p" --set training.precision=$p
    "$PY" -c "import json; m = json.load(open('$OUT/tiny-$p/run.json')); \
print('run.json: device', m.get('device'), 'precision', m.get('precision'), 'steps', m['steps'], \
'epsilon', m['epsilon'], 'skipped', m.get('skipped_steps'), 'nonfinite', m.get('nonfinite_samples'))" 2>&1
done

# a checkpoint written on the GPU resumes on the CPU (and the steps continue there)
part "resume a GPU run on the CPU" 120 bash -c "\
  ${CLI[*]} train $TINY --no-progress --output $OUT/cross --set training.device=cuda \
    --set training.steps=4 --set training.checkpoint_every=2 > /dev/null && \
  ${CLI[*]} train $TINY --no-progress --resume $OUT/cross --set training.device=cpu \
    --set training.steps=8 --set training.checkpoint_every=2 | tail -4"

if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    part "nproc 2 on two GPUs" 150 "${CLI[@]}" train $TINY --no-progress --nproc 2 \
        --output "$OUT/nproc2" --set training.device=cuda
else
    echo "=== nproc 2: skipped (one GPU)"
fi

# the end-to-end benchmark: recipe path vs bare engine vs non-private (vs Opacus)
part "recipe path gpt2-124m bf16" 120 "$PY" benchmarks/recipe_path.py --setups gpt2-124m \
    --precision bf16 --opacus --blocks 4 --block 5 --profile 5 --records 1200
part "recipe path gpt2-124m fp32" 100 "$PY" benchmarks/recipe_path.py --setups gpt2-124m \
    --precision fp32 --blocks 4 --block 5 --profile 5 --records 1200
part "recipe path llama-0.5b lora bf16" 120 "$PY" benchmarks/recipe_path.py \
    --setups llama-0.5b --precision bf16 --opacus --blocks 3 --block 4 --profile 4 --records 480
echo
echo "=== done in $(($(date +%s) - START))s; results: benchmarks/results/recipe_path.json"
