#!/usr/bin/env bash
# The zoo builder's speed targets (cnn_gap >= 400 and vit_t >= 200 model-epochs/s on one H200, cnn_s not slower)
# in one device call: vit_t, cnn_gap and smallcnn at 4,096 members with the plain-loop agreement check, cnn_s
# without, then the channels-last weight-gradient forms of cnn_gap's 16-channel convs alone. Each step is bounded
# by what is left of DEADLINE seconds, so what finished survives a step that runs long; the order puts the targets
# first.
#   PYTHONPATH=. OUT=$OUT bash benchmarks/speed_targets.sh      # one GPU, ~8 min (carry data/datasets: MNIST)
#   ARCHS=cnn_gap MEMBERS=4 ZOO_ARGS="--dataset digits --steps 2 --solo-steps 3 --variants fp32" CHECK=0 \
#     KERNEL_ARGS="--members 2 --batch 2 --iters 1 --dtype fp32" bash benchmarks/speed_targets.sh   # CPU smoke
# DW=taps,joint times cnn_gap with both weight-gradient forms (default: the module's, joint); VIT_ARGS adds options
# to vit_t's step (e.g. "--tokens images,members") and VIT_LIMIT its seconds (default 240).
# Output: ${OUT:-data/pipeline_logs/speed_targets}/: gpu.txt, a log (and JSON) a step, steps.txt (each step's exit
# code and seconds), summary.md (every rate row and agreement line of the logs).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-data/pipeline_logs/speed_targets}; mkdir -p "$out"
deadline=$(( $(date +%s) + ${DEADLINE:-580} ))
members=${MEMBERS:-4096}; check=${CHECK:-2}
zoo_args=${ZOO_ARGS:-"--variants bf16+compile+fused+graphs"}
kernel_args=${KERNEL_ARGS:-"--iters 5"}  # a plain assignment: expanded unquoted below, it splits into words
archs=${ARCHS:-"vit_t cnn_gap smallcnn cnn_s"}

step() {  # step NAME LIMIT CMD...: run CMD for at most LIMIT seconds and what is left of the deadline
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) )) t0; t0=$(date +%s)
  (( left < limit )) && limit=$left
  if (( limit <= 0 )); then echo "$name skipped: deadline" >> "$out/steps.txt"; return; fi
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? ${limit}s-limit $(( $(date +%s) - t0 ))s" >> "$out/steps.txt"
}

throughput() {  # throughput ARCH LIMIT CHECK [more zoo_throughput options]
  local arch=$1 limit=$2 n_check=$3; shift 3
  # shellcheck disable=SC2086  # zoo_args holds several options
  step "$arch" "$limit" python benchmarks/zoo_throughput.py --archs "$arch" --members "$members" --check "$n_check" \
    $zoo_args --json "$out/$arch.json" "$@"
}

: > "$out/steps.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
for arch in $archs; do
  case $arch in
    cnn_gap) throughput cnn_gap 150 "$check" --dw "${DW:-joint}" ;;
    # shellcheck disable=SC2086  # VIT_ARGS holds several options
    vit_t) throughput vit_t "${VIT_LIMIT:-240}" "$check" --solo-steps 50 ${VIT_ARGS:-} ;;
    smallcnn) throughput smallcnn 150 "$check" --solo-steps 50 ;;
    *) throughput "$arch" 70 0 ;;
  esac
done
# shellcheck disable=SC2086  # kernel_args holds several options
step dw_kernels 60 python benchmarks/directconv_kernels.py --layers cnn_gap.conv2,cnn_gap.conv3 --no-torch $kernel_args
grep -h -E "^\| (cnn|vit|small)|agree|dw cl act" "$out"/*.log > "$out/summary.md" || true
cat "$out/steps.txt"
