#!/usr/bin/env bash
# The full-size run of one device call: a 10,000-member Small-CNN-Zoo-style MNIST random zoo (smallcnn, the exact
# network: valid padding, [-1, 1] pixels) built, a HR21-sized hyper-representation fitted, every checkpoint
# embedded (mean and token sequence) and probed, each stage bounded so the whole fits in DEADLINE seconds and
# what finished survives. The continuous targets run in one probe process (they share the ridge decompositions),
# train_fraction (four values: a categorical probe) in a second one beside it.
#   PYTHONPATH=. bash benchmarks/full_zoo_smallcnn.sh                       # one H200, ~9.5 min
#   N=24 EPOCHS=1 ZOO_OVER="train_eval_samples=500 precision=fp32 compile=false" FIT_MINUTES=0.2 \
#     DEADLINE=1500 PROBE_OVER="bootstrap=10" bash benchmarks/full_zoo_smallcnn.sh      # CPU smoke (needs MNIST)
# Output: ${OUT:-data/pipeline_logs/full_zoo}/ (stage logs, times.txt, the zoo table, probe tables and plots).
set -uo pipefail
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
out=${OUT:-data/pipeline_logs/full_zoo}; mkdir -p "$out"
n=${N:-10000}; epochs=${EPOCHS:-3}; deadline=$(( $(date +%s) + ${DEADLINE:-570} ))
zoo=data/zoos/mnist_smallcnn_random_n$n.h5; run=data/hyperrep/mnist_smallcnn_random_n$n
ckpts=$(python3 -c "print('[' + ','.join(map(str, range($epochs + 1))) + ']')")
left() { echo $(( deadline - $(date +%s) - ${1:-0} )); }  # seconds to the deadline, keeping $1 in reserve
stage() { local name=$1; shift; local t0; t0=$(date +%s); "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$name rc $rc $(( $(date +%s) - t0 )) s" | tee -a "$out/times.txt"; return $rc; }

# batch 64 (Unterthiner et al. use 32): 178 vs 116 model-epochs/s at 10,000 members on one H200
[ -n "${REUSE_ZOO:-}" ] && [ -e "$zoo" ] || stage build timeout "$(left 240)" python3 -m zoo.build --config configs/zoo/mnist_smallcnn_random.yaml \
  n_random="$n" epochs="$epochs" checkpoints="$ckpts" fixed.batch_size=64 precision=bf16 compile=true \
  train_eval_samples=10000 ${ZOO_OVER:-} --out "$zoo" --overwrite || exit 1
cp "${zoo%.h5}.parquet" "$out/zoo_table.parquet"
stage fit timeout "$(left 150)" python3 -m hyperrep.fit --config configs/hyperrep/mnist_smallcnn_random.yaml \
  "zoo=$zoo" max_minutes="${FIT_MINUTES:-1.5}" ${FIT_OVER:-} --out "$run" --overwrite || exit 1
cp "$run/loss.png" "$out/fit_loss.png" 2>/dev/null
stage embed timeout "$(left 110)" python3 -m hyperrep.embed --zoo "$zoo" --model "$run" sequence=true --overwrite \
  --quiet || exit 1
probe=(python3 -m probes.evaluate --zoo "$zoo" --quiet bootstrap=100 ${PROBE_OVER:-})
OMP_NUM_THREADS=10 stage probes_continuous timeout "$(left 5)" "${probe[@]}" --out "$out/probes_continuous" \
  --targets test_acc epoch gen_gap lr dropout &
OMP_NUM_THREADS=6 stage probes_train_fraction timeout "$(left 5)" "${probe[@]}" --out "$out/probes_train_fraction" \
  --targets train_fraction &
wait
