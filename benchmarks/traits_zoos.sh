#!/usr/bin/env bash
# One frozen encoder for the MNIST and Fashion-MNIST data-trait zoos: build both (configs/zoo/*_traits.yaml),
# fit one hyper-representation on both (configs/hyperrep/mnist_fashion_traits.yaml), embed both with it, probe
# the dataset, label noise, train fraction and trained classes from W, s(W) (linear, GBM) and the embeddings.
#
#   bash benchmarks/traits_zoos.sh                                   # full size (2 x 2,000 members), one GPU
#   ZOO_OVER="n_random=1000" FIT_OVER="epochs=40" bash benchmarks/traits_zoos.sh       # benchmarks/TRAITS.md, ~6 min
#   ZOO_OVER="n_random=16 epochs=1 checkpoints=[0,1]" FIT_OVER="epochs=1 batch_size=8" bash benchmarks/traits_zoos.sh
# Needs data/datasets/{mnist,fashion_mnist}. Logs and the probe table: data/pipeline_logs/traits/ (and
# $OUT/traits.tar.gz when OUT is set).
set -euo pipefail
log=data/pipeline_logs/traits; mkdir -p "$log"
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1 PYTHONFAULTHANDLER=1 TQDM_MININTERVAL=20
# the logs come back even when a stage runs past its limit (BUILD_S, FIT_S, seconds each)
[ -n "${OUT:-}" ] && trap 'tar czf "$OUT/traits.tar.gz" -C data/pipeline_logs traits' EXIT
gpu=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
# no compile: its stall on this zoo came with ~600 activation slices per population (fixed); not re-measured (NOTES.md)
fast=$([ "$gpu" = 1 ] && echo "precision=bf16" || echo "")
run=data/hyperrep/mnist_fashion_traits
t0=$(date +%s)
for d in mnist fashion_mnist; do
  [ -e "data/zoos/${d}_traits.h5" ] || timeout -s INT "${BUILD_S:-900}" python3 -m zoo.build \
    --config "configs/zoo/${d}_traits.yaml" --out "data/zoos/${d}_traits.h5" $fast ${ZOO_OVER:-} 2>&1 | tee "$log/build_$d.log"
done
t1=$(date +%s)
[ -e "$run/model.pt" ] || timeout -s INT "${FIT_S:-3600}" python3 -m hyperrep.fit --config configs/hyperrep/mnist_fashion_traits.yaml \
  --out "$run" ${FIT_OVER:-} 2>&1 | grep -v "it/s\]" | tee "$log/fit.log"
t2=$(date +%s)
for d in mnist fashion_mnist; do
  python3 -m hyperrep.embed --zoo "data/zoos/${d}_traits.h5" --model "$run" --overwrite --quiet | tee -a "$log/embed.log"
done
t3=$(date +%s)
python3 -m probes.evaluate --zoo data/zoos/mnist_traits.h5 data/zoos/fashion_mnist_traits.h5 \
  --targets dataset label_noise train_fraction trained_classes test_acc --checkpoints -1 --bootstrap 100 \
  --out "$log/probes" --quiet ${PROBE_OVER:-} 2>&1 | tee "$log/probes.log"
t4=$(date +%s)
echo "seconds: build $((t1 - t0)) fit $((t2 - t1)) embed $((t3 - t2)) probes $((t4 - t3))" | tee -a "$log/probes.log"
cp "$run/loss.png" "$log/fit_loss.png" 2>/dev/null || true
