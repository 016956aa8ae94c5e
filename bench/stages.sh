# Sourced by bench/gpu.sh, bench/quality.sh and bench/sweep.sh: logging and time-capped stages for a
# GPU call that must end inside its limit. The caller sets LOG (the log file), BUDGET (seconds for the whole
# script), START ($(date +%s) at its start) and RESERVE (seconds kept for what runs after the stages).

say() { echo "== $*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS CMD...: runs CMD under min(CAP, what the budget leaves minus RESERVE). A stage
# that would get under 20 s is skipped (exit 124); SIGINT first, so that Python code can stop cleanly.
stage() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  local t=$(( left < cap ? left : cap ))
  if (( t < 20 )); then say "$name: skipped, the time budget is spent"; return 124; fi
  say "$name: up to ${t}s"
  timeout -s INT -k 20 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc$( (( rc == 124 )) && echo ' (cut off by its time cap)') after $(( $(date +%s) - START ))s in all"
  return "$rc"
}

# The start of a script with a --smoke mode (quality.sh, sweep.sh): from the repository root, the
# checkout importable, SMOKE=1 under --smoke, PY, and START for the budget. Call with the script's "$@".
smoke_script_setup() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
  SMOKE=0
  [[ ${1:-} == --smoke ]] && SMOKE=1
  export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  PY=${PYTHON:-python3}
  START=$(date +%s)
}

# The fused reverse step's native tests (small tensors, seconds; DDPM sampling runs that kernel), into
# FILE, whose last line is "exit STATUS"; then reverse_step_gate FILE says how they went and, where
# they failed, has DDPM sample with the compiled engine (ENGINE+=) rather than a wrong kernel.
reverse_step_tests() {
  timeout -k 10 180 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_reverse_step.py >"$1" 2>&1
  echo "exit $?" >>"$1"
}
reverse_step_gate() {
  say "native reverse-step kernel tests:"; tail -n 3 "$1" | tee -a "$LOG"
  if [[ $(tail -n 1 "$1") != "exit 0" ]]; then
    say "the fused reverse step failed its native tests: DDPM samples with the compiled engine instead"
    ENGINE+=(--ddpm-engine compiled)
  fi
}
