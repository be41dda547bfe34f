#!/usr/bin/env bash
# K-GPU scaling predicted on ONE GPU: the whole zoo, then each of its K shards (`--shard i/K`, as torchrun's
# rank i builds it, OMP_NUM_THREADS=1), one after another on the same GPU, then the merge. Each run has cold
# compile caches. Prints T1 / (K * (slowest shard + merge)): what zoo_scaling.sh measures on K GPUs, less
# torchrun's start-up and teardown and the ranks' contention for the host (a few seconds there). Use it
# where no machine of K GPUs is lent, and to compare code changes at the cost of one GPU.
# Usage: bash benchmarks/shard_proxy.sh K "zoo overrides"
# e.g.   bash benchmarks/shard_proxy.sh 2 "--config configs/zoo/mnist_cnn_s_hyp.yaml precision=bf16 compile=true \
#            train_eval_samples=10000 epochs=4 checkpoints=[0,1,2,3,4]"       (nvidia-h100-x1, MNIST carried)
# Logs go to ${OUT:-data/scaling_logs}.
set -euo pipefail
K=$1; args=$2
log=${OUT:-data/scaling_logs}; mkdir -p "$log" data/zoos
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/scaling_common.sh"  # bytecode cache; run NAME COMMAND...
run all python -m zoo.build $args --out data/zoos/p_all.h5 --overwrite
shards=()
for ((i = 0; i < K; i++)); do
  OMP_NUM_THREADS=1 run "s$i" python -m zoo.build $args --shard "$i/$K" --out "data/zoos/p_s$i.h5" --overwrite
  shards+=("data/zoos/p_s$i.h5")
done
run merge python -m zoo.merge data/zoos/p_merged.h5 "${shards[@]}" --overwrite
python - "$K" "$log" <<'PY'
import sys
k, log = int(sys.argv[1]), sys.argv[2]
s = lambda name: float(open(f"{log}/{name}.s").read())
t1, ts, tm = s("all"), [s(f"s{i}") for i in range(k)], s("merge")
tk = max(ts) + tm
print(f"1 GPU {t1:.1f} s; shards {', '.join(f'{t:.1f}' for t in ts)} s, merge {tm:.1f} s: predicted {k} GPUs "
      f"{tk:.1f} s, speed-up {t1 / tk:.2f}x, scaling efficiency {t1 / (k * tk):.1%}")
PY
