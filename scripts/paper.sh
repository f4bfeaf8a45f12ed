#!/usr/bin/env bash
# The paper profile on whatever devices are present (`make paper`):
#   scripts/paper.sh                                    # every stage, params/paper.yaml
#   STAGES="ssl finetune" scripts/paper.sh --set ssl.train.steps=300 --set finetune.train.steps=300
# GPUs are counted with nvidia-smi: none -> plain `python -m` (CPU), 1 -> configs/accelerate/1gpu.yaml, N > 1 ->
# configs/accelerate/8gpu.yaml with --num_processes N (several nodes: launch configs/accelerate/multinode.yaml on each,
# see docs/scale.md). After each training stage, scripts/mfu.py logs perf/mfu and perf/tflops_per_device to the
# stage's MLflow run (FLOPs counted on the stage's objective x the logged train/steps_per_s / the GPUs' peak).
# The data must exist: outputs/render (python -m duotok.stages.render, or your own corpus) is indexed by preprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-params/paper.yaml}
STAGES=${STAGES:-"preprocess ssl finetune codebook vae pre_encode decoder evaluate"}
N=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${N:-0}" -ge 2 ]; then LAUNCH=(accelerate launch --config_file configs/accelerate/8gpu.yaml --num_processes "$N" -m)
elif [ "${N:-0}" -eq 1 ]; then LAUNCH=(accelerate launch --config_file configs/accelerate/1gpu.yaml -m)
else LAUNCH=(python -m); N=1; fi
echo "[paper] devices: $N ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo CPU)); profile $PROFILE"
for s in $STAGES; do
  case $s in
    ssl|finetune|codebook|vae|decoder) "${LAUNCH[@]}" "duotok.stages.$s" --profile "$PROFILE" "$@"
                                       python scripts/mfu.py "${s}" --profile "$PROFILE" --devices "$N" "$@" ;;
    *) python -m "duotok.stages.$s" --profile "$PROFILE" "$@" ;;
  esac
done
