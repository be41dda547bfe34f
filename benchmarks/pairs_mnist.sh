#!/usr/bin/env bash
# Mergeability on a tethered cnn_s MNIST zoo with every relation (one GPU): build the zoo and its Fashion-MNIST twin
# (configs/zoo/*_cnn_s_pairs.yaml: tethers merged during training), fit and embed one hyper-representation of the
# MNIST zoo, pick pairs of every relation (other_order, other_init, other_hparams, checkpoints, other_dataset),
# measure naive / weight-matched averages and barriers, and probe them from pairwise baselines and embedding pairs.
#   bash benchmarks/pairs_mnist.sh                                            # 2 x 800 members, ~3,000 pairs
#   ZOO_OVER="n_random=4 epochs=1 checkpoints=[0,1]" FIT_OVER="epochs=1" PAIRS_OVER="n_per_relation=8" \
#     bash benchmarks/pairs_mnist.sh                                          # tiny CPU run
# Needs data/datasets/{mnist,fashion_mnist}. Logs, tables and plots: data/pipeline_logs/pairs_mnist/ (and
# $OUT/pairs_mnist.tar.gz when OUT is set, also when a stage runs past its limit).
set -euo pipefail
log=data/pipeline_logs/pairs_mnist; mkdir -p "$log"
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1 PYTHONFAULTHANDLER=1 TQDM_MININTERVAL=20
[ -n "${OUT:-}" ] && trap 'tar czf "$OUT/pairs_mnist.tar.gz" -C data/pipeline_logs pairs_mnist' EXIT
gpu=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
fast=$([ "$gpu" = 1 ] && echo "precision=bf16" || echo "")
zoo=data/zoos/mnist_cnn_s_pairs.h5; twin=data/zoos/fashion_mnist_cnn_s_pairs.h5; run=data/hyperrep/mnist_cnn_s_pairs
t0=$(date +%s)
for d in mnist fashion_mnist; do
  [ -e "data/zoos/${d}_cnn_s_pairs.h5" ] || timeout -s INT "${BUILD_S:-900}" python3 -m zoo.build \
    --config "configs/zoo/${d}_cnn_s_pairs.yaml" --out "data/zoos/${d}_cnn_s_pairs.h5" $fast ${ZOO_OVER:-} \
    2>&1 | tee "$log/build_$d.log"
done
t1=$(date +%s)
[ -e "$run/model.pt" ] || timeout -s INT "${FIT_S:-3600}" python3 -m hyperrep.fit \
  --config configs/hyperrep/mnist_cnn_s_pairs.yaml --out "$run" ${FIT_OVER:-} 2>&1 | grep -v "it/s\]" | tee "$log/fit.log"
python3 -m hyperrep.embed --zoo "$zoo" --model "$run" --overwrite --quiet | tee "$log/embed.log"
t2=$(date +%s)
[ -e "${zoo%.h5}.pairs.parquet" ] || python3 -m pairs.build --zoo "$zoo" --zoo-b "$twin" \
  "relations=[other_order,other_init,other_hparams,checkpoints,other_dataset]" n_per_relation=700 ${PAIRS_OVER:-} \
  2>&1 | tee "$log/pairs.log"
t3=$(date +%s)
python3 -m pairs.predict --zoo "$zoo" --out "$log/predict" | tee "$log/predict.log"
python3 -m pairs.tethers "$zoo" --out "$log/tethers.png"
cp "${zoo%.h5}.pairs.parquet" "$log/" && cp "$run/loss.png" "$log/fit_loss.png" 2>/dev/null || true
python3 - "$zoo" <<'PY' | tee "$log/relations.md"
import sys, pandas as pd
t = pd.read_parquet(sys.argv[1].replace(".h5", ".pairs.parquet"))
cols = ["acc_a", "acc_b", "naive_avg_acc", "matched_avg_acc", "naive_barrier_loss", "matched_barrier_loss",
        "naive_barrier_acc", "matched_barrier_acc", "agreement", "tether_compat"]
g = t.groupby("relation", sort=False)
m = pd.concat([g.size().rename("n"), g[[c for c in cols if c in t]].median()], axis=1)
print("medians per relation\n\n| relation | " + " | ".join(m.columns) + " |\n" + "|---" * (len(m.columns) + 1) + "|")
for rel, r in m.iterrows():
    print(f"| {rel} | {int(r['n'])} | " + " | ".join(f"{v:.3f}" for v in r.iloc[1:]) + " |")
PY
t4=$(date +%s)
echo "seconds: build $((t1 - t0)) fit+embed $((t2 - t1)) pairs $((t3 - t2)) predict $((t4 - t3))" | tee -a "$log/predict.log"
