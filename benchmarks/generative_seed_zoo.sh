#!/usr/bin/env bash
# Decoded and sampled networks on the Model Zoos MNIST seed zoo (cnn_s, 1,000 seeds, 50 epochs, 51 checkpoints):
# build -> fit (configs/hyperrep/mnist_cnn_s_seed_gen.yaml) -> reconstruct -> sample (+ memorization test)
# -> transfer (sample from the MNIST hyperrep, fine-tune on Fashion-MNIST).
#
#   bash benchmarks/generative_seed_zoo.sh all                 # one GPU: ~15 min in all
#   bash benchmarks/generative_seed_zoo.sh build fit           # stages in order; each skips if its output exists,
#   bash benchmarks/generative_seed_zoo.sh reconstruct sample  # so a later call on the same machine continues
#   ZOO_OVER="seeds=8 epochs=2 checkpoints=[0,1,2]" FIT_OVER="epochs=1" SAMPLE_OVER="n=4 finetune=[0,1]" \
#       bash benchmarks/generative_seed_zoo.sh all             # a CPU dry run of every stage (minutes)
# Needs MNIST (and Fashion-MNIST for transfer) in data/datasets/{mnist,fashion_mnist}. Logs, tables and plots
# go to data/pipeline_logs/generative/ and, packed as generative.tar.gz, to $OUT when it is set (device runs).
set -euo pipefail
log=data/pipeline_logs/generative; mkdir -p "$log" data/samples
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
zoo=data/zoos/mnist_cnn_s_seed.h5 run=data/hyperrep/mnist_cnn_s_seed_gen
gpu=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
fast=$([ "$gpu" = 1 ] && echo "precision=bf16 compile=true" || echo "")

stage() {  # name, output that marks it done, command...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name: $*"; local t0=$(date +%s)
  "$@" 2>&1 | grep -v "it/s\]" | tee "$log/$name.log"
  echo "== $name took $(( $(date +%s) - t0 )) s" | tee -a "$log/$name.log"
}

for s in "$@"; do
  case $s in
    build|all) stage build "$zoo" python3 -m zoo.build --config configs/zoo/mnist_cnn_s_seed.yaml --out "$zoo" --quiet \
                 $fast train_eval_samples=10000 ${ZOO_OVER:-} ;;&
    fit|all) stage fit "$run/model.pt" python3 -m hyperrep.fit --config configs/hyperrep/mnist_cnn_s_seed_gen.yaml \
               --zoo "$zoo" --out "$run" ${FIT_OVER:-} ;;&
    reconstruct|all) stage reconstruct "$log/reconstruct/summary.csv" python3 -m hyperrep.reconstruct --zoo "$zoo" \
                       --model "$run" --out "$log/reconstruct" --quiet "checkpoints=[0,1,5,25,-1]" ${REC_OVER:-} ;;&
    sample|all) stage sample data/samples/seed.h5 python3 -m hyperrep.sample --zoo "$zoo" --model "$run" \
                  --out data/samples/seed.h5 --quiet subsample=5 "finetune=[0,1,5,25]" $fast ${SAMPLE_OVER:-} ;;&
    transfer|all) stage transfer data/samples/seed_to_fashion.h5 python3 -m hyperrep.sample --zoo "$zoo" \
                    --model "$run" --out data/samples/seed_to_fashion.h5 --quiet subsample=5 "finetune=[0,1,5,25]" \
                    dataset=fashion_mnist "groups=[sampled,scratch,zoo_top]" $fast ${SAMPLE_OVER:-} ;;&
    build|fit|reconstruct|sample|transfer|all) ;;
    *) echo "unknown stage $s (build, fit, reconstruct, sample, transfer, all)"; exit 2 ;;
  esac
done
cp "$run/loss.png" "$log/fit_loss.png" 2>/dev/null || true
cp data/samples/seed*.{csv,md,png} "$log/" 2>/dev/null || true
for f in "$log/reconstruct/table.md" "$log"/seed*.summary.md; do [ -e "$f" ] && { echo "== $f"; cat "$f"; }; done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/generative.tar.gz" -C data/pipeline_logs generative; fi
