#!/usr/bin/env bash
# The GPU bench in one command, sized for one lent-GPU call (under 9 minutes of wall clock):
#   1. native correctness first: the kernel tests (pytest-xdist workers where installed) side by side
#      with the CUDA-graph sampling test. If the kernel tests fail, the script stops there (a fast
#      but wrong kernel posts no number) and the rest of the lease is left for a rerun after a fix.
#      The resident GroupNorm path (off by default; its programs of a group meet at a barrier with the
#      "coop" knob) is tested apart, under a timeout: if it fails or hangs, the bench goes on without it:
#      the tune sweeps no resident or coop setting and the paths that set one are dropped from the stages;
#   2. the bench suite at full size (seed preset, batch 256 training, batch 2560 sampling, the
#      U-Net's kernel shapes), stage by stage, each under its own time cap and with its own dtypes:
#      eager baselines first, then bf16 (the headline), so a stage cut off by its cap still has
#      what matters; every finished result is also appended at once to a JSON-lines log;
#   3. the merged JSON and the markdown report.
# Writes into $OUT when set (the device tool's output folder), else bench/results/:
#   <date>-<card>.json        (commit it as bench/results/<date>-<card>.json)
#   report.md                 (python -m bench.report on that JSON)
#   bench.log (everything printed), graph-test.log (the CUDA-graph test), resident-tests.log (the resident
#   GroupNorm path's native tests, whole), nvidia-smi.txt, and tune.json / profile.json from those stages:
#   8 files with both, the device tool's limit (it brings back 8): add none without dropping one
# Usage, from the repository root (the GPU machine's copy has no .git, so pass the commit in):
#   FASTDDPM_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu.sh
# Before the call, on the CPU: make gpu-triton-check (every launch compiled by the GPU image's Triton).
# Opt-in stages: profile (bench.profile_step -> profile.json), tune (bench.tune_groupnorm ->
# tune.json) and batch (bench/test_train_batch.py: training images/s at batch 64 to 1,024, eager and
# compiled, into the same JSON), e.g. BENCH_STAGES="tests tune profile" or "tests batch".
# Knobs: BENCH_BUDGET_S (default 530: the whole script), BENCH_TEST_WORKERS (the native tests'
# pytest-xdist workers, default 8; 0 runs them in one process), BENCH_STAGES (default "tests train sample kernels"),
# TRAIN_DTYPES / SAMPLE_DTYPES (default bf16,fp32), KERNEL_DTYPES (default bf16),
# BATCH_DTYPES (default bf16), TRAIN_CAP_S / SAMPLE_CAP_S / KERNEL_CAP_S / PROFILE_CAP_S / TUNE_CAP_S /
# BATCH_CAP_S (seconds per stage),
# TUNE_ARGS (bench.tune_groupnorm's sweep, default its full grid; e.g. "--lane 0 --tile 2048 --programs 528
# --threads 8,16,32 --resident 0,4096,16384"),
# PROFILE_WORKLOAD (train or sample), PROFILE_IMPLS (default compiled,eager), PROFILE_LAYOUTS (default
# nchw,nhwc), PROFILE_KNOBS (default none; e.g.
# none,cudnn_benchmark,force_layout,cudagraphs: see bench/profile_step.py), FASTDDPM_BENCH_TRAIN_IMPLS
# (the train stage's non-eager paths, default compiled,fast,compiled-graphs,fast-graphs: the last two
# under CUDA graphs; compiled-graphs-nhwc and fast-graphs-nhwc train channels_last),
# FASTDDPM_BENCH_BATCH_IMPLS (the batch stage's, default compiled), FASTDDPM_BENCH_SAMPLE_IMPLS (the
# sample stage's engines, default compiled,fast,diffusers; compiled-nhwc and fast-nhwc sample channels_last),
# PYTHON (python3). A Triton path in any of
# these lists may carry GroupNorm launch settings, timed beside its defaults in the same stage:
# FASTDDPM_BENCH_TRAIN_IMPLS=compiled-graphs,fast-graphs,fast-graphs@split=65536+tile=8192+persistent=2
# (knobs: bench.tune_groupnorm's; FASTDDPM_GN_* variables, recorded with the command, change the defaults).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
WORK=$(mktemp -d)
BUDGET=${BENCH_BUDGET_S:-530}
STAGES=${BENCH_STAGES:-tests train sample kernels}
START=$(date +%s)
mkdir -p "$DEST"
LOG="$DEST/bench.log"
: >"$LOG"

RESERVE=25  # seconds for the report after the stages
source bench/stages.sh

# pytest-benchmark and nvidia-ml-py (the `bench` extra: pip install -e '.[bench]') are in the GPU
# image; install either only if it is missing and pip can reach an index (no retries: the lent
# machine has no network).
for pair in pytest_benchmark:pytest-benchmark pynvml:nvidia-ml-py; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null ||
    "$PY" -m pip install -q --retries 0 --timeout 5 "${pair##*:}" >/dev/null 2>&1 ||
    say "note: ${pair##*:} is not installed and cannot be (the results say so)"
done
nvidia-smi >"$DEST/nvidia-smi.txt" 2>&1 || true
CARD=$("$PY" -c "import torch; from fastddpm.measured import card_slug as s; print(s(torch.cuda.get_device_name()))" \
  2>/dev/null || echo cpu)
NAME="$(date -u +%Y-%m-%d)-$CARD"
say "device $CARD, commit ${FASTDDPM_GIT_COMMIT:-unknown}, stages: $STAGES, budget ${BUDGET}s"

bench() {  # bench NAME CAP DTYPES: one bench module, through pytest-benchmark or, without it, bench.run
  local name=$1 cap=$2 file
  case $name in
    train) file=test_train_step.py ;; batch) file=test_train_batch.py ;;
    sample) file=test_sampling.py ;; kernels) file=test_kernels.py ;;
  esac
  export FASTDDPM_BENCH_DTYPES=$3 FASTDDPM_BENCH_LOG="$WORK/$name.jsonl"
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    stage "bench $name ($3)" "$cap" "$PY" -m pytest -q -p no:cacheprovider \
      "bench/$file" --benchmark-only --benchmark-json="$WORK/$name.json" --benchmark-columns=median,ops,rounds
  else
    stage "bench $name ($3, bench.run)" "$cap" "$PY" -m bench.run --only "$name" --json "$WORK/$name.json"
  fi
}

RESIDENT_OK=1  # the resident GroupNorm path (off by default) passed its native tests: the tune may sweep it
native_tests() {
  local workers=() rc
  (( ${BENCH_TEST_WORKERS:-8} > 0 )) && "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${BENCH_TEST_WORKERS:-8}")
  # Tests, not timings: the runs may share the GPU. The graph test and the resident GroupNorm path's
  # tests (a path no bench case runs unless the tune turns it on) beside them, each into its own file.
  (LOG="$DEST/graph-test.log"; : >"$LOG"
   stage "CUDA-graph sampling test (native)" 200 "$PY" -m pytest -q -rA -p no:cacheprovider tests/test_engine.py \
     -k cuda_graph >/dev/null 2>&1
   echo $? >"$WORK/graph-test.rc") &
  local graph=$!
  # every resident test (no -x), its log whole in $DEST: a failure's message comes back
  (timeout -k 10 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_groupnorm_gelu.py -k resident \
     >"$DEST/resident-tests.log" 2>&1; echo "exit $?" >>"$DEST/resident-tests.log") &
  local resident=$!
  # No -x: under xdist one failure would stop every worker and hide the tests not yet run (a lease of
  # 2026-11-27 left 19 of 168 unrun that way, after 149 in 170 s); the bench still stops on any failure,
  # and on a run cut off by its cap (some kernels untested): 300 s with 8 workers, 540 s serially.
  stage "kernel tests (native${workers:+, ${workers[1]} workers})" $(( ${#workers[@]} ? 300 : 540 )) \
    "$PY" -m pytest -q -p no:cacheprovider \
    "${workers[@]}" tests/test_kernels_groupnorm_gelu.py tests/test_kernels_reverse_step.py tests/test_unet_triton.py \
    tests/test_upsample_bilinear.py -k "not resident"
  rc=$?
  wait "$graph" "$resident"
  say "CUDA-graph sampling test: exit $(cat "$WORK/graph-test.rc" 2>/dev/null || echo unknown)"
  tail -n 15 "$DEST/graph-test.log" | tee -a "$LOG"
  say "resident GroupNorm tests (native):"; grep -E '^(FAILED|ERROR)' "$DEST/resident-tests.log" | tee -a "$LOG"
  tail -n 2 "$DEST/resident-tests.log" | tee -a "$LOG"
  if [[ $(tail -n 1 "$DEST/resident-tests.log") != "exit 0" ]]; then
    RESIDENT_OK=0; say "the resident GroupNorm path failed its native tests: the tune sweeps no resident or coop" \
      "setting, and the bench paths that set one are dropped"
    local var
    for var in FASTDDPM_BENCH_TRAIN_IMPLS FASTDDPM_BENCH_SAMPLE_IMPLS FASTDDPM_BENCH_BATCH_IMPLS PROFILE_IMPLS; do
      [[ -n ${!var:-} ]] && export "$var=$(tr ',' '\n' <<<"${!var}" | grep -Ev '(resident|coop)=[1-9]' | paste -sd, -)"
    done
    export FASTDDPM_GN_RESIDENT_MAX=0 FASTDDPM_GN_COOP_TILE=0  # nor as a process's default
  fi
  return "$rc"
}

# A bench stage cut off by its cap (124) still counts as run; the kernel tests must finish and pass.
STATUS=0
for s in $STAGES; do
  case $s in
    tests)
      native_tests; rc=$?
      if (( rc != 0 )); then
        say "the native kernel tests failed or did not finish (exit $rc): no bench runs on untested kernels;" \
          "stopping here"
        STATUS=1
        break
      fi ;;
    train) bench train "${TRAIN_CAP_S:-170}" "${TRAIN_DTYPES:-bf16,fp32}" ;;
    sample) bench sample "${SAMPLE_CAP_S:-120}" "${SAMPLE_DTYPES:-bf16,fp32}" ;;
    kernels) bench kernels "${KERNEL_CAP_S:-110}" "${KERNEL_DTYPES:-bf16}" ;;
    batch) bench batch "${BATCH_CAP_S:-300}" "${BATCH_DTYPES:-bf16}" ;;
    profile)  # where a training (or sampling) step's time goes, NCHW vs NHWC (ratios from one process)
      stage "profile ${PROFILE_WORKLOAD:-train} step (bf16)" "${PROFILE_CAP_S:-200}" "$PY" -m bench.profile_step \
        --workload "${PROFILE_WORKLOAD:-train}" --impls "${PROFILE_IMPLS:-compiled,eager}" \
        --knobs "${PROFILE_KNOBS:-none}" --layouts "${PROFILE_LAYOUTS:-nchw,nhwc}" --dtype bf16 \
        --json "$DEST/profile.json" ;;
    tune)  # the GroupNorm kernels' launch parameters and reduction style, against Inductor
      stage "GroupNorm launch sweep (bf16)" "${TUNE_CAP_S:-200}" "$PY" -m bench.tune_groupnorm \
        --dtype bf16 --json "$DEST/tune.json" ${TUNE_ARGS:-} $( ((RESIDENT_OK)) || echo --resident 0 --coop 0) ;;
    *) say "unknown stage $s" ;;
  esac
done

# JSON lines first, the pytest-benchmark JSON after (the same results; the later file wins).
shopt -s nullglob
inputs=("$WORK"/*.jsonl "$WORK"/*.json)
if (( ${#inputs[@]} )); then
  knobs=""
  while IFS='=' read -r k v; do knobs+="$k=$(printf '%q' "$v") "; done \
    < <(env | grep -E '^(BENCH_|TRAIN_|BATCH_|SAMPLE_|KERNEL_|PROFILE_|TUNE_)' | sort
        env | grep -E '^FASTDDPM_(BENCH_(SIZE|COMPILE|TRAIN_IMPLS|BATCH_IMPLS|SAMPLE_IMPLS)|GN_)' | sort)
  "$PY" -m bench.report "${inputs[@]}" --merge "$DEST/$NAME.json" --command "${knobs}bash bench/gpu.sh" \
    >"$DEST/report.md" 2>>"$LOG"
  cat "$DEST/report.md"
  say "wrote $DEST/$NAME.json and $DEST/report.md in $(( $(date +%s) - START ))s"
else
  say "no bench results were produced"
fi
rm -rf "$WORK"
exit "$STATUS"
