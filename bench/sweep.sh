#!/usr/bin/env bash
# The sampler sweep (issue 13) in one GPU call: one trained model (the quality run's EMA weights),
# DPM-Solver++ and DDIM at 10 to 100 steps and the paper's DDPM at all T steps, the same N images and
# seed each, into $OUT as samples-<sampler>.npz (uint8) and sweep.json (engine, timings, guards).
# Scoring happens afterwards, here on the CPU:
#   python -m bench.quality sweep-record --returned <the folder the files came back to>
#
#   GPU:  FASTDDPM_GIT_COMMIT=$(git rev-parse HEAD) bash bench/sweep.sh
#         weights: data-carry/weights/ema-fp16.pt (the quality run's, joined by `bench.quality record`
#         into runs/quality-scored-<date>-<card>/); carry data-carry/weights only (25 MiB: the CIFAR
#         zips beside it would break the 64 MiB carry limit)
#   CPU:  SWEEP_WEIGHTS=<a tiny model's weights> bash bench/sweep.sh --smoke   (N 8, T-step DDPM and
#         2-step DDIM (eta 0 and 1)/DPM++ on the fast engine in Triton's interpreter, with its guard; CI runs it)
#
# What comes back: 7 .npz of 2,048 images (6 MiB each; "dpm++" is "dpmpp" in file names, which the
# device returns only of letters, digits, ".", "_", "-") + sweep.json = 8 files, 42 MiB: the device's
# limits (8 files, 16 MiB each, 64 MiB). The log is what the call prints.
# Knobs: SWEEP_WEIGHTS, SWEEP_N (2048), SWEEP_CONFIGS (bench.quality's SWEEP; names ddpm, ddimK, ddimK-etaE,
# dpm++K, each with -clip for a clipped x0, at most 7 of them), SWEEP_BUDGET_S (560), PYTHON.
set -uo pipefail
source "$(dirname "$0")/stages.sh"  # say, stage, smoke_script_setup
smoke_script_setup "$@"
BUDGET=${SWEEP_BUDGET_S:-560}
RESERVE=5
LOG=/dev/null  # the call's printed output is the log: every returned file is a result
WEIGHTS=${SWEEP_WEIGHTS:-data-carry/weights/ema-fp16.pt}
if (( SMOKE )); then
  DEST=${OUT:-runs/sweep-smoke}; N=${SWEEP_N:-8}; CONFIGS=${SWEEP_CONFIGS:-dpm++2-clip,ddim2,ddim2-eta1,ddpm}
  export TRITON_INTERPRET=1
  ENGINE=(--engine fast --ddpm-engine eager)  # the fast engine runs in Triton's interpreter here
else
  DEST=${OUT:-runs/sweep}; N=${SWEEP_N:-2048}; CONFIGS=${SWEEP_CONFIGS:-}
  ENGINE=(--engine auto)
fi
mkdir -p "$DEST"
if [[ ! -f $WEIGHTS ]]; then
  say "no weights at $WEIGHTS: copy the quality run's joined ema-fp16.pt there (and carry data-carry/weights)"
  exit 2
fi
say "commit ${FASTDDPM_GIT_COMMIT:-unknown}, smoke $SMOKE, weights $WEIGHTS, N $N, budget ${BUDGET}s"
(( SMOKE )) || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/== /'
if (( ! SMOKE )); then
  TESTS=$(mktemp)
  reverse_step_tests "$TESTS"
  reverse_step_gate "$TESTS"
fi
stage "sweep (${CONFIGS:-default samplers})" 600 "$PY" -m bench.quality sweep --weights "$WEIGHTS" --out "$DEST" \
  --n "$N" ${CONFIGS:+--configs "$CONFIGS"} "${ENGINE[@]}" $( (( SMOKE )) && echo --smoke) \
  --command "bash bench/sweep.sh$( (( SMOKE )) && echo ' --smoke') (N $N)"
RC=$?
say "done in $(( $(date +%s) - START ))s: $(ls "$DEST" | tr '\n' ' ')"
exit "$RC"
