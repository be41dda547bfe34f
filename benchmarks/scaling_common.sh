# Sourced by the scaling scripts (zoo_scaling.sh, shard_proxy.sh), after they set $log.
#
# Bytecode cache. The device's Python sets PYTHONDONTWRITEBYTECODE=1 and its packages ship no
# .pyc files, so every process compiles the source of each module it imports: ~13 s per process there
# (py-spy, benchmarks/NOTES.md "Per-process fixed cost"), paid once per rank, which a normal install (pip writes .pyc files)
# does not pay. Give the runs a bytecode cache and fill it before anything is timed.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
python - <<'PY'
import importlib
for name in ("zoo.build", "zoo.merge", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx",
             "torch._inductor.codegen.triton", "torch._inductor.runtime.triton_heuristics",
             "torch._inductor.compile_worker.subproc_pool", "torch._functorch.partitioners",
             "torch._dynamo.backends.debugging", "functorch.compile", "triton.compiler",
             "triton.backends.nvidia.compiler", "networkx", "jinja2", "h5py", "pyarrow.parquet"):
    try:
        importlib.import_module(name)
    except ImportError:  # CPU installs have no triton
        pass
PY

run() {  # name, command...: cold caches, wall seconds to $log/name.s, progress lines to $log/name.log (live)
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$name TRITON_CACHE_DIR=/tmp/tri_$name "$@" 2>&1 | stdbuf -o0 tr '\r' '\n' \
    | { grep --line-buffered -E "epoch [0-9]+:|trained|written|[Ee]rror" || true; } > "$log/$name.log"
  python -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$t0" > "$log/$name.s"
  tail -n 6 "$log/$name.log"; echo "$name: $(cat "$log/$name.s") s wall"
}
