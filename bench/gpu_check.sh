#!/usr/bin/env bash
# Every GPU check and benchmark of this project as one prepared run, for a session that is lent a GPU machine
# (the `device` tool: ~15 minutes of device time a task, 10 minutes a command). Each stage has its own time limit,
# so the run ends inside its budget and what finished is kept; results land in $OUT (at most 8 files come back).
#
# Once, in the checkout:   ../shared/gpu/pack-ray.sh && cp ../shared/bench/reference_step.py .gpu/
# Then, through `device`:  . .gpu/setup.sh && bash bench/gpu_check.sh            (carry: [".gpu"])
#                          STAGES="compile profile" bash bench/gpu_check.sh     (the second half, if time is left)
#
# Stages (default: check train reference throughput eval memory, ~7 min on an H100/H200):
#   check       pytest tests/test_cuda.py and the CUDA loader test: no host sync in any step, compile through
#               Triton, bf16 attacks
#   train       `raydist train` of the digits demo on the GPU through Ray Train (compile auto: on), then
#               `raydist eval` of its best.pt in fp32 and in bf16 (does bf16 weaken the attacks?)
#   reference   ../shared/bench/reference_step.py (copied into .gpu/), the hand-written yardstick, same device
#   throughput  bench/train_throughput.py --gpu, eager, beside the reference's figures
#   eval        bench/eval_throughput.py: PGD-10/50, fp32 and bf16, 1/2/4 actors sharing the GPU
#   memory      bench/memory.py: peak memory per method, largest FGSM-SDI batch for ResNet-18 / WRN-34-10 / B0
#   compile     bench/train_throughput.py --gpu --compile true (FGSM-RS, FGSM-SDI; then reduce-overhead)
#   profile     bench/profile_step.py --gpu: kernel time per phase of the step, top kernels
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${STAGES:-check train reference throughput eval memory}
LOG="$OUT/log.txt"
TRACES=$(mktemp -d)
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0

say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the script
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v "^\s*$" | tail -40
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - t0))s"
}

if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: error: torch sees no CUDA device" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
$PY -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__)" | tee -a "$LOG"

for s in $STAGES; do
  case $s in
    check)
      stage check 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
        "tests/test_data.py::test_cuda_batch_loop_does_not_sync_with_host" ;;
    train)
      run=$(mktemp -d)
      stage train 150 $PY -m raydist.cli train jobs/digits_fgsm_sdi.yaml --set scaling.use_gpu=true \
        --set run.output_dir="$run"
      for p in fp32 bf16; do
        stage "eval-$p" 90 $PY -m raydist.cli eval "$run/digits_fgsm_sdi/best.pt" --attacks clean,pgd20,pgd50,aa \
          --workers 2 --gpus-per-worker 0.5 --precision "$p" --out "$run/eval_$p"
        cp "$run/eval_$p/report.json" "$OUT/digits_eval_$p.json" 2>/dev/null
      done ;;
    reference)
      if [ -f .gpu/reference_step.py ]; then
        stage reference 120 $PY .gpu/reference_step.py --steps 40 --skip-imagenet --out "$OUT/reference.json"
      else
        say "reference: skipped (.gpu/reference_step.py missing: cp ../shared/bench/reference_step.py .gpu/)"
      fi ;;
    throughput)
      ref=(); [ -f "$OUT/reference.json" ] && ref=(--reference "$OUT/reference.json")
      stage throughput 200 $PY bench/train_throughput.py --gpu --compile false --train-size 25600 --epochs 3 \
        "${ref[@]}" --out "$OUT/train_eager.json" ;;
    eval)
      stage eval 150 $PY bench/eval_throughput.py --synthetic --width 64 --samples 4096 --gpu --actors 1,2,4 \
        --attacks pgd10,pgd50 --precision fp32,bf16 --out "$OUT/eval.json" ;;
    memory)
      stage memory 120 $PY bench/memory.py --gpu --max-batch 16384 --out "$OUT/memory.json" ;;
    compile)
      stage compile 240 $PY bench/train_throughput.py --gpu --compile true --methods fgsm_rs,fgsm_sdi \
        --train-size 25600 --epochs 3 --out "$OUT/train_compiled.json"
      stage cudagraphs 200 $PY bench/train_throughput.py --gpu --compile true --compile-mode reduce-overhead \
        --methods fgsm_sdi --train-size 25600 --epochs 3 --out "$OUT/train_cudagraphs.json" ;;
    profile)
      stage profile 120 $PY bench/profile_step.py --gpu --compile false --out "$TRACES/profile.json"
      cp "$TRACES/profile.json" "$OUT/profile.json" 2>/dev/null ;;
    *) say "unknown stage $s (see the header of bench/gpu_check.sh)" ;;
  esac
done
say "done: $(ls "$OUT" | tr '\n' ' ')"
