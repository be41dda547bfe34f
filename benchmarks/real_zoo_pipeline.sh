#!/usr/bin/env bash
# One real zoo through the whole pipeline on a GPU machine: build -> hyperrep fit -> embed -> probes.
# Usage: bash benchmarks/real_zoo_pipeline.sh ZOO_CONFIG HYPERREP_CONFIG "zoo overrides" "fit overrides" "probe args"
# e.g.   bash benchmarks/real_zoo_pipeline.sh configs/zoo/mnist_smallcnn_random.yaml \
#            configs/hyperrep/mnist_smallcnn_random.yaml "n_random=1000 epochs=6" "epochs=20" "--targets test_acc epoch"
# Logs and the probe table go to ${OUT:-data/pipeline_logs}.
set -euo pipefail
zoo_cfg=$1; hr_cfg=$2; zoo_over=${3:-}; fit_over=${4:-}; probe_args=${5:-}
name=$(basename "$zoo_cfg" .yaml)
log=${OUT:-data/pipeline_logs}; mkdir -p "$log"
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
t0=$(date +%s)
python -m zoo.build --config "$zoo_cfg" --out "data/zoos/$name.h5" --overwrite --quiet $zoo_over 2>&1 | tee "$log/$name.build.log"
t1=$(date +%s); echo "build took $((t1-t0)) s"
python -m hyperrep.fit --config "$hr_cfg" --zoo "data/zoos/$name.h5" --out "data/hyperrep/$name" --overwrite $fit_over 2>&1 \
  | grep -v "it/s" | tee "$log/$name.fit.log"
t2=$(date +%s); echo "fit took $((t2-t1)) s"
python -m hyperrep.embed --zoo "data/zoos/$name.h5" --model "data/hyperrep/$name" --overwrite --quiet 2>&1 | tee "$log/$name.embed.log"
t3=$(date +%s); echo "embed took $((t3-t2)) s"
python -m probes.evaluate --zoo "data/zoos/$name.h5" --out "data/probes/$name" --bootstrap 100 $probe_args 2>&1 | tee "$log/$name.probes.log"
t4=$(date +%s)
cp "data/probes/$name/table.md" "$log/$name.table.md"; cp "data/hyperrep/$name/loss.png" "$log/$name.loss.png" || true
echo "seconds: build $((t1-t0)) fit $((t2-t1)) embed $((t3-t2)) probes $((t4-t3))" | tee -a "$log/$name.probes.log"
