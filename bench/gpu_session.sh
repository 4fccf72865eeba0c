#!/usr/bin/env bash
# Everything a GPU loan is for, in at most two device runs of under ten minutes each.
#
#   FASTADAPTERS_GIT_COMMIT=<sha> PYTHONUNBUFFERED=1 bash bench/gpu_session.sh tests   # build, pytest -m gpu, quick benches
#   FASTADAPTERS_GIT_COMMIT=<sha> PYTHONUNBUFFERED=1 bash bench/gpu_session.sh bench   # build, every benchmark
#
# (the device gets a copy of the tree without .git: pass the commit so every record names it)
# A step that reaches its limit gets SIGINT first: the benchmarks then write the rows they have,
# marked "truncated", and pytest prints its summary.
#
# Each phase installs the project (building fastadapters._C: a loaned machine starts bare), runs its
# steps each under its own timeout so one slow step cannot eat the others, and leaves at most eight
# files in $OUT (what the device tool brings back): session.log, build.log, gpu_tests.log and the
# JSON records, which bench/render.py turns into bench/results/RESULTS.md once copied there.
set -u
OUT=${OUT:-/tmp/fastadapters_gpu_out}
mkdir -p "$OUT"
phase=${1:-tests}
t0=$(date +%s)
log() { echo "[gpu_session +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }
step() {  # step SECONDS NAME COMMAND...: run under a timeout, log its status, keep going
  local limit=$1 name=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@"
  log "end $name: rc=$?"
}

log "phase $phase on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$OUT/session.log"
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)" 2>&1 | tee -a "$OUT/session.log"
python -c "import ninja" 2>/dev/null && log "ninja present" || log "ninja missing: the extension builds serially"
if ! pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  log "install failed"; tail -40 "$OUT/build.log"; exit 1
fi
log "installed"
python -c "from fastadapters import _ext; _ext.load_extension(); print('fastadapters._C:', _ext.extension_status())" \
  >> "$OUT/build.log" 2>&1 && log "CUDA extension loaded" || { log "CUDA extension NOT loaded"; tail -20 "$OUT/build.log"; }

case "$phase" in
  tests)
    log "start pytest -m gpu (limit 240s)"
    timeout -s INT -k 20 240 python -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
    log "end pytest -m gpu: rc=$?"
    tail -25 "$OUT/gpu_tests.log"
    step 60 "serving_cuda --quick" python bench/serving_cuda.py --quick --out "$OUT/serving_cuda.json"
    step 120 "kernels --quick" python bench/kernels.py --quick --json "$OUT/kernels.json"
    ;;
  bench)
    step 150 "kernels" python bench/kernels.py --json "$OUT/kernels.json"
    step 120 "serving" python bench/serving.py --json "$OUT/serving.json"
    step 60 "serving_cuda" python bench/serving_cuda.py --out "$OUT/serving_cuda.json"
    step 150 "fastadapters bench (1b, bf16)" fastadapters bench --no-serving --no-kernels \
      --json "$OUT/training_step.json"
    ;;
  *)
    log "unknown phase $phase; valid: tests, bench"; exit 2 ;;
esac
log "done"
