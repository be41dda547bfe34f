#!/usr/bin/env bash
# Sequence zoos of gpt_t members on generated data (CPU is enough): build the memorisation, grokking and continual
# zoos, tabulate memorisation / grokking / forgetting per memory kind with intervals over members, fit one
# hyper-representation per zoo, embed, and probe what the weights hold (which sequence, its first token,
# whether a member grokked, its memory kind) from W, s(W) and embeddings. seq_memoria needs the memoria extra.
#
#   bash benchmarks/sequence_zoos.sh                                   # the configs' sizes, ~1 h on 2 cores
#   ZOO_OVER="n_random=16 epochs=2 checkpoints=[0,2]" FIT_OVER="epochs=1" bash benchmarks/sequence_zoos.sh
#   NAMES="modular continual" FIT_OVER="epochs=6" bash benchmarks/sequence_zoos.sh     # some zoos, shorter fits
# Logs and tables: data/pipeline_logs/sequences/.
set -euo pipefail
log=data/pipeline_logs/sequences; mkdir -p "$log"
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
targets=(memory "class_subset first_token memory_kind mem_neurons weight_decay test_acc"
         memoria "class_subset first_token memory_kind mem_neurons memoria weight_decay test_acc"
         modular "grokked test_acc mem_neurons weight_decay"
         continual "forgetting test_a_acc test_b_acc mem_neurons weight_decay")
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  name=${targets[i]}; zoo=data/zoos/seq_$name.h5
  [ -e "$zoo" ] || python3 -m zoo.build --config "configs/zoo/seq_$name.yaml" --out "$zoo" --quiet ${ZOO_OVER:-} \
    2>&1 | tee "$log/build_$name.log"
done
python3 benchmarks/sequence_table.py data/zoos/seq_{memory,memoria,modular,continual}.h5 | tee "$log/table.md"
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  name=${targets[i]}; zoo=data/zoos/seq_$name.h5; run=data/hyperrep/seq_$name
  [[ " ${NAMES:-memory memoria modular continual} " == *" $name "* ]] || continue
  # gpt_t members are ~850 tokens of 64: train on random windows of 128 tokens, embed by covering windows
  [ -e "$run/model.pt" ] || python3 -m hyperrep.fit --zoo "$zoo" --out "$run" epochs=20 d_model=64 d_latent=16 \
    window=128 batch_size=32 ${FIT_OVER:-} 2>&1 | grep -v "it/s\]" | tail -3 | tee "$log/fit_$name.log"
  python3 -m hyperrep.embed --zoo "$zoo" --model "$run" --overwrite --quiet | tee -a "$log/embed.log"
  python3 -m probes.evaluate --zoo "$zoo" --targets ${targets[i + 1]} --checkpoints -1 --bootstrap 200 \
    --out "$log/probes_$name" --quiet 2>&1 | tee "$log/probes_$name.log"
done
