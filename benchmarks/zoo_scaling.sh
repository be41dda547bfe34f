#!/usr/bin/env bash
# Multi-GPU scaling of `python -m zoo.build`: the same zoo on 1 GPU, then on K GPUs with torchrun (each rank
# one shard, rank 0 merges), each with a cold compile cache; prints wall times, the scaling efficiency
# T1 / (K * TK), and how far the two zoos are apart (members see the same batches wherever they train).
# Usage: bash benchmarks/zoo_scaling.sh K "zoo overrides"
# e.g.   bash benchmarks/zoo_scaling.sh 2 "--config configs/zoo/mnist_cnn_s_hyp.yaml precision=bf16 compile=true \
#            train_eval_samples=10000 epochs=3 checkpoints=[0,1,2,3]"      (nvidia-h200-x2, MNIST carried)
# Logs go to ${OUT:-data/scaling_logs}.
set -euo pipefail
K=$1; args=$2
log=${OUT:-data/scaling_logs}; mkdir -p "$log" data/zoos
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/scaling_common.sh"  # bytecode cache; run NAME COMMAND...
# K GPUs first: on a tight device budget its (shorter) result is in hand before the 1-GPU run starts
run g$K torchrun --standalone --nproc_per_node="$K" -m zoo.build $args --out "data/zoos/g$K.h5" --overwrite
run g1 python -m zoo.build $args --out data/zoos/g1.h5 --overwrite
python - "$K" "$log" <<'PY'
import sys, h5py, numpy as np, pyarrow.parquet as pq
k, log = int(sys.argv[1]), sys.argv[2]
t1, tk = (float(open(f"{log}/g{n}.s").read()) for n in (1, k))
print(f"1 GPU {t1:.1f} s, {k} GPUs {tk:.1f} s: speed-up {t1 / tk:.2f}x, scaling efficiency {t1 / (k * tk):.1%}")
a, b = (pq.read_table(f"data/zoos/g{n}.parquet").to_pandas().sort_values(["model_id", "epoch"]) for n in (1, k))
with h5py.File("data/zoos/g1.h5") as fa, h5py.File(f"data/zoos/g{k}.h5") as fb:
    wa, wb = fa["weights"][:], fb["weights"][:]
d = np.abs(a.test_acc.values - b.test_acc.values)
print(f"weights {wa.shape}: max |diff| {np.nanmax(np.abs(wa - wb)):.3g}; test_acc |diff| median {np.nanmedian(d):.2g}, "
      f"max {np.nanmax(d):.3g}, {int((d > 0.01).sum())} of {len(d)} rows > 0.01; rows {len(a)} vs {len(b)}")
for n, t in ((1, a), (k, b)):  # the zoo itself: final test accuracy over members
    last = t[t.epoch == t.epoch.max()].test_acc.values
    q10, q50, q90 = np.nanquantile(last, [0.1, 0.5, 0.9])
    print(f"{n} GPU zoo, epoch {t.epoch.max()}: test_acc median {q50:.4f}, q10 {q10:.4f}, q90 {q90:.4f}, "
          f"NaN {int(np.isnan(last).sum())} of {len(last)} members")
PY
