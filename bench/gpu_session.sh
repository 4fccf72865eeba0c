#!/usr/bin/env bash
# One GPU loan's work in one device call that ends by itself within 9 minutes on a bare machine.
#
#   FASTADAPTERS_GIT_COMMIT=<sha> PYTHONUNBUFFERED=1 bash bench/gpu_session.sh
#
# (the device gets a copy of the tree without .git: pass the commit so every record names it)
#
# Steps, in order of what a short loan must not lose; each runs under its own limit AND under the
# session deadline (SESSION_BUDGET_S, 500 s by default: with a minute or two of machine start the
# whole call stays under 9 minutes), so a slow step shortens the later ones instead of running the
# call past its limit (a step skipped for want of time returns 125). A step that reaches its limit gets SIGINT first (the benchmarks then write
# the rows they have, marked "truncated"; pytest prints its summary), then SIGKILL 15 s later.
#
#   1. build: `pip install -e .` with the CUDA extension fastadapters._C    -> build.log
#      (on failure, again without it: the Triton steps do not need it)
#   2. gpu_check.py: compiled Triton kernels vs fp64, bf16 and the fp32
#      rank-256 cases of issue 12, one line per check as it finishes          -> gpu_check.log
#   3. pytest -m gpu on the GPU test files only (collecting every CPU test
#      module on a bare machine risks a collection error; test_flashinfer_path.py's
#      one GPU test skips without flashinfer)                                 -> gpu_tests.log
#   4. the engine's decode paths (written without a GPU, never run on one before): SDPA and
#      FlashInfer attention, eager and with decode steps replayed from CUDA graphs, on a small
#      random llama with 4 routed LoRA adapters: greedy tokens of each graph engine vs its eager
#      twin and the decode step time of each. FlashInfer only when `flashinfer` imports here: the
#      device image has none and reaches no registry; wheels put in .whl/ (see the device notes;
#      flashinfer-python 0.7.4 alone is 101 MB, over one call's 64 MiB, with a dozen requirements)
#      are installed into /tmp/site before step 3                            -> session.log
#   5. the quick kernel table                                                 -> kernels.json
#   6. the quick serving tables (engine; CUDA C++ multi-adapter op)           -> serving*.json
#
# Every result is written to $OUT as it is produced (at most 8 files: session.log, build.log,
# gpu_check.log, gpu_tests.log, kernels.json, serving.json, serving_cuda.json), so a call cut
# short still returns what ran. bench/render.py turns the JSON into bench/results/RESULTS.md once
# copied to bench/results/.
set -u
OUT=${OUT:-/tmp/fastadapters_gpu_out}
mkdir -p "$OUT"
BUDGET=${SESSION_BUDGET_S:-500}
t0=$(date +%s)
export PYTHONUNBUFFERED=1
log() { echo "[gpu_session +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
step() {  # step SECONDS NAME LOGFILE COMMAND...: run under min(SECONDS, time left), keep going
  local limit=$1 name=$2 logfile=$3; shift 3
  local rem; rem=$(left)
  (( rem - 20 < limit )) && limit=$(( rem - 20 ))
  if (( limit < 15 )); then log "skip $name: session budget spent"; return 125; fi
  log "start $name (limit ${limit}s)"
  timeout -s INT -k 15 "$limit" "$@" >> "$logfile" 2>&1
  local rc=$?
  log "end $name: rc=$rc"
  return $rc
}

log "gpu session on $(hostname), budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$OUT/session.log"
python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/session.log"
python -c "import ninja" 2>/dev/null && log "ninja present" || log "ninja missing: the extension builds serially"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=""  # setup.py always builds sm_80 + sm_90a; nothing more

# 1. build (a failed build still lets the Triton steps run)
if step 210 "build" "$OUT/build.log" pip install -q --no-deps --no-build-isolation -e .; then
  step 60 "load extension" "$OUT/build.log" python -c \
    "from fastadapters import _ext; _ext.load_extension(); print('fastadapters._C:', _ext.extension_status())" \
    && log "CUDA extension loaded" || log "CUDA extension NOT loaded (see build.log)"
else  # the Triton kernels need no extension: install without it (the csrc tests then skip)
  log "install failed or timed out: installing without the CUDA extension"
  [ -f "$OUT/build.log" ] && tail -30 "$OUT/build.log" | tee -a "$OUT/session.log"
  step 60 "install (no extension)" "$OUT/build.log" \
    env FASTADAPTERS_NO_CUDA_EXT=1 pip install -q --no-deps --no-build-isolation -e .
fi

# 2. compiled Triton kernels vs fp64 (no TRITON_INTERPRET: real kernels)
(cd tests/kernels && step 180 "gpu_check" "$OUT/gpu_check.log" env -u TRITON_INTERPRET python gpu_check.py)
[ -f "$OUT/gpu_check.log" ] && tail -15 "$OUT/gpu_check.log" | tee -a "$OUT/session.log"

# flashinfer from wheels carried in .whl/ (step 4's header), before the GPU tests that use it
if ls .whl/flashinfer*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/session.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 3. GPU-marked tests, GPU test files only (tests/kernels/test_triton_gpu.py is gpu_check's pytest
#    wrapper: gpu_check already ran)
step 150 "pytest -m gpu" "$OUT/gpu_tests.log" python -m pytest -m gpu -q -rfEs -p no:cacheprovider \
  tests/csrc/test_cuda_ops_gpu.py tests/serving/test_gpu.py tests/serving/test_flashinfer_path.py
[ -f "$OUT/gpu_tests.log" ] && tail -15 "$OUT/gpu_tests.log" | tee -a "$OUT/session.log"

# 4. the engine's decode paths: SDPA and (when it imports) FlashInfer, eager and from CUDA graphs
step 150 "decode check" "$OUT/session.log" python bench/decode_check.py

# 5-6. quick tables
step 75 "kernels --quick" "$OUT/session.log" python bench/kernel_ops.py --quick --json "$OUT/kernels.json"
step 45 "serving_cuda --quick" "$OUT/session.log" python bench/serving_cuda.py --quick --out "$OUT/serving_cuda.json"
step 60 "serving (quick table)" "$OUT/session.log" python bench/serving.py --no-peft --json "$OUT/serving.json"
log "done in $(( $(date +%s) - t0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
