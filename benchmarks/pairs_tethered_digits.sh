#!/usr/bin/env bash
# Mergeability on a tethered digits zoo (CPU scale): build (the default recipes, 2 seeds each, tethers, no
# merging), pick pairs of every same-zoo relation, and probe merged accuracy / barriers from pairwise baselines
# (tether compatibility among them); with FIT=1 also one hyper-representation and the embedding-pair probes.
#   bash benchmarks/pairs_tethered_digits.sh            # ~5 min on 2 CPU cores
#   FIT=1 bash benchmarks/pairs_tethered_digits.sh      # + hyperrep fit and embed (the fit is the slow part)
set -euo pipefail
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
zoo=data/zoos/digits_tethered.h5; run=data/hyperrep/digits_tethered; log=data/pipeline_logs/pairs_tethered; mkdir -p "$log"
[ -e "$zoo" ] || python3 -m zoo.build --out "$zoo" --quiet name=digits_tethered seeds=2 epochs=4 \
  "checkpoints=[0,1,2,4]" architecture_kwargs.tethered=true 2>&1 | tee "$log/build.log"
if [ "${FIT:-0}" = 1 ]; then
  [ -e "$run/model.pt" ] || python3 -m hyperrep.fit --zoo "$zoo" --out "$run" 2>&1 | tail -1 | tee "$log/fit.log"
  python3 -m hyperrep.embed --zoo "$zoo" --model "$run" --overwrite --quiet | tee "$log/embed.log"
fi
[ -e "${zoo%.h5}.pairs.parquet" ] || python3 -m pairs.build --zoo "$zoo" --quiet n_per_relation=200 | tee "$log/pairs.log"
python3 -m pairs.predict --zoo "$zoo" --out "$log/predict" | tee "$log/predict.log"
