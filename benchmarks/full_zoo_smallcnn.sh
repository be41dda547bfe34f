#!/usr/bin/env bash
# The full-size run of one device call: a 10,000-member Small-CNN-Zoo-style MNIST random zoo (smallcnn, the exact
# network: valid padding, [-1, 1] pixels) built, a HR21-sized hyper-representation fitted, every checkpoint
# embedded (mean and token sequence) and probed, each stage bounded so the whole fits in DEADLINE seconds and
# what finished survives. The weight baselines (W, s(W)) are probed on the CPU while the encoder fits, on its
# test members (hyperrep.split); the embeddings after embed. Every target is regressed (train fraction too, as
# HR21), so all of a column's targets share its ridge decompositions.
#   PYTHONPATH=. bash benchmarks/full_zoo_smallcnn.sh                       # one H200, 446 s (FULL_ZOO.md)
#   CAT_TARGETS="optimizer activation init" ...  # also HR21's categorical targets (a third probe process)
#   N=3000 EPOCHS=12 CHECKPOINTS=[0,1,2,3,4,6,8,12] DEADLINE=545 ...    # one call, 541 s (FULL_ZOO.md)
#   EPOCHS=16 CHECKPOINTS=[0,1,2,3,4,6,8,12,16] ZOO_OVER="population_size=5000 train_eval_samples=0" \
#     MAX_POPULATIONS=1 PYTHONPATH=. bash benchmarks/full_zoo_smallcnn.sh   # twice (one population each; the
#                                                         # second with RESUME_ONLY=1: no .partial file, as on a
#                                                         # fresh machine, exits at once with rc 3), then
#                                                         # REUSE_ZOO=1 with the same EPOCHS: three calls back to back
#   NPROC=4 EPOCHS=16 CHECKPOINTS=[0,1,2,4,8,16] ZOO_OVER="train_eval_samples=0" \
#     PYTHONPATH=. bash benchmarks/full_zoo_smallcnn.sh   # 4 GPUs (nvidia-h100-x4): the 16-epoch zoo in one call
#   N=24 EPOCHS=1 ZOO_OVER="train_eval_samples=500 precision=fp32 compile=false" FIT_MINUTES=0.2 \
#     DEADLINE=1500 PROBE_OVER="bootstrap=10" bash benchmarks/full_zoo_smallcnn.sh      # CPU smoke (needs MNIST)
# (tests/test_benchmarks.py runs it on digits resized to 16x16, WORK= a temporary folder for zoo and run)
# Output: ${OUT:-data/pipeline_logs/full_zoo}/ (stage logs, times.txt, the zoo table, probe tables and plots,
# targets.md: the embeddings against HR21 and s(W), `hr21_targets.py`; gap_noise.md: how much of the
# generalisation gap is sampling noise, the ceiling on its R², `gap_noise.py`).
set -uo pipefail
export PYTHONUNBUFFERED=1 WEIGHTZOO_QUIET=1
out=${OUT:-data/pipeline_logs/full_zoo}; mkdir -p "$out"
n=${N:-10000}; epochs=${EPOCHS:-3}; deadline=$(( $(date +%s) + ${DEADLINE:-570} ))
name=mnist_smallcnn_random_n$n; [ "$epochs" = 3 ] || name+=_e$epochs  # REUSE_ZOO never takes another length
work=${WORK:-data}; zoo=$work/zoos/$name.h5; run=$work/hyperrep/$name
ckpts=${CHECKPOINTS:-$(python3 -c "print('[' + ','.join(map(str, range($epochs + 1))) + ']')")}
left() { echo $(( deadline - $(date +%s) - ${1:-0} )); }  # seconds to the deadline, keeping $1 in reserve
stage() { local name=$1; shift; local t0; t0=$(date +%s); "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$name rc $rc $(( $(date +%s) - t0 )) s" | tee -a "$out/times.txt"; return $rc; }

# batch 64 (Unterthiner et al. use 32): 178 vs 116 model-epochs/s at 10,000 members on one H200.
# MAX_POPULATIONS=K builds K populations and stops (a zoo longer than one call: population_size=P in ZOO_OVER,
# then the same command again resumes from the .partial file; each call's files must survive to the next). That
# mode only builds: the pipeline then runs with REUSE_ZOO=1.
# NPROC=K builds on K GPUs of one host (torchrun: rank r trains the r-th of K pieces of the members, the shards are
# joined); the rest of the pipeline runs on one GPU
launch=(python3 -m); (( ${NPROC:-1} > 1 )) && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m)
build=("${launch[@]}" zoo.build --config configs/zoo/mnist_smallcnn_random.yaml n_random="$n" epochs="$epochs"
  checkpoints="$ckpts" fixed.batch_size=64 precision=bf16 compile=true train_eval_samples=10000 ${ZOO_OVER:-}
  --out "$zoo")
if [ -n "${RESUME_ONLY:-}" ] && [ ! -e "$zoo.partial" ]; then
  echo "RESUME_ONLY: no partial build $zoo.partial to resume (a fresh machine?): run without RESUME_ONLY" >&2
  exit 3
fi
[ -e "$zoo.partial" ] || build+=(--overwrite)  # a partial build resumes; anything else is rebuilt
if [ -n "${MAX_POPULATIONS:-}" ]; then
  stage build timeout "$(left 5)" "${build[@]}" --max-populations "$MAX_POPULATIONS" || exit 1
  [ -e "$zoo.partial" ] && state=paused || state=finished
  echo "build $state after $MAX_POPULATIONS population(s)" | tee -a "$out/times.txt"; exit 0
elif [ -z "${REUSE_ZOO:-}" ] || [ ! -e "$zoo" ]; then
  stage build timeout "$(left 260)" "${build[@]}" || exit 1
fi
cp "${zoo%.h5}.parquet" "$out/zoo_table.parquet"
stage gap_noise python3 benchmarks/gap_noise.py --zoo "$zoo" --out "$out/gap_noise.md"  # the gap's R² ceiling
fitcfg=(--config configs/hyperrep/mnist_smallcnn_random.yaml "zoo=$zoo" max_minutes="${FIT_MINUTES:-1.0}" ${FIT_OVER:-})
python3 -m hyperrep.split "${fitcfg[@]}" --out "$out/split.json" --overwrite || exit 1
probe() {  # probe NAME COLUMNS TARGETS...: one probes.evaluate process in the background, bounded by the deadline
  local name=$1 cols=$2; shift 2
  OMP_NUM_THREADS=${PROBE_THREADS:-12} stage "probes_$name" timeout "$(left 5)" python3 -m probes.evaluate \
    --zoo "$zoo" --quiet bootstrap=100 "columns=[$cols]" "split=$out/split.json" regress=[train_fraction] \
    ${PROBE_OVER:-} \
    --out "$out/probes_$name" --targets "$@" &
}
# the weight baselines need no encoder: they run on the CPU while the GPU fits it, on the fit's test members
base="W linear,s(W) linear,s(W) gbm"; emb="emb linear,emb seq linear"
probe base "$base" test_acc epoch gen_gap lr dropout train_fraction
stage fit timeout "$(left 160)" python3 -m hyperrep.fit "${fitcfg[@]}" --out "$run" --overwrite || { wait; exit 1; }
cp "$run/loss.png" "$out/fit_loss.png" 2>/dev/null
stage embed timeout "$(left 90)" python3 -m hyperrep.embed --zoo "$zoo" --model "$run" sequence=true --overwrite \
  --quiet || { wait; exit 1; }
probe emb "$emb" test_acc epoch gen_gap lr dropout train_fraction
# CAT_TARGETS="optimizer activation init": HR21's categorical targets, logistic probes (on CUDA in torch)
[ -n "${CAT_TARGETS:-}" ] && probe cat "$base,$emb" $CAT_TARGETS
wait
[ -e "$out/probes_base/results.csv" ] && [ -e "$out/probes_emb/results.csv" ] && python3 benchmarks/hr21_targets.py \
  base="$out/probes_base" emb="$out/probes_emb" --out "$out/targets.md"
