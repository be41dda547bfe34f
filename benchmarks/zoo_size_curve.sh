#!/usr/bin/env bash
# The zoo-size curve: for each size N, one hyper-representation fitted on the first N members of the zoo
# (max_members=N; the same members nested across sizes), its embeddings (mean and token sequence), and probes on
# those N members only (members=fit); then one plot of every feature's probe quality against N.
#   ZOO=data/zoos/mnist_cnn_gap_random.h5 FIT_CONFIG=configs/hyperrep/mnist_cnn_gap_random.yaml \
#     SIZES="1000 3000 10000" bash benchmarks/zoo_size_curve.sh                         # one GPU
#   SIZES="64 128 256" FIT_OVER="epochs=4" bash benchmarks/zoo_size_curve.sh            # the default zoo, CPU
# Output: data/pipeline_logs/size_curve/ (n<N>/ probe tables, size_curve.png, size_curve.md).
set -euo pipefail
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
zoo=${ZOO:-data/zoos/digits_default.h5}; fitcfg=${FIT_CONFIG:-configs/hyperrep/default.yaml}
targets=${TARGETS:-test_acc epoch gen_gap lr dropout}
log=data/pipeline_logs/size_curve; runs=data/hyperrep/size_curve; mkdir -p "$log" "$runs"
[ -e "$zoo" ] || python3 -m zoo.build --out "$zoo" --quiet
args=()
for n in ${SIZES:-64 128 256}; do
  run="$runs/n$n"
  [ -e "$run/model.pt" ] || python3 -m hyperrep.fit --config "$fitcfg" "zoo=$zoo" max_members="$n" --out "$run" \
    ${FIT_OVER:-} 2>&1 | tail -1
  python3 -m hyperrep.embed --zoo "$zoo" --model "$run" --out "$run/embeddings.h5" sequence=true --overwrite --quiet
  python3 -m probes.evaluate --zoo "$zoo" --embeddings "$run/embeddings.h5" members=fit --targets $targets \
    --out "$log/n$n" --quiet ${PROBE_OVER:-} | tail -n +1 > "$log/n$n.log"
  args+=("$n=$log/n$n")
done
python3 benchmarks/size_curve_plot.py "${args[@]}" --out "$log/size_curve.png"
