#!/usr/bin/env bash
# One-command check of the local backend on a GPU machine (at most 8 minutes, nothing to install):
# a random-weight Qwen3-VL of the real 2B sizes in bf16, a few GRPO and AXPO steps with the demo's
# rollout shape (step time, rollout and logprob tokens/s, peak GPU memory), then the TRL comparison
# of tools/bench_vs_trl.py on the GPU. Arguments go to tools/device_check.py (--help lists them;
# --tiny runs a small CPU version).
#
# Runs $PYTHON when set, else the repository's .venv when it has one (the project installed in
# it), else python3 with torch and transformers importable; the repository root goes first on
# PYTHONPATH, so an editable install made at another path still imports this checkout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
limit="${DEVICE_CHECK_TIMEOUT_S:-480}"
status=0
timeout --signal=INT --kill-after=20 "$limit" "$python" tools/device_check.py "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "device_check: stopped after ${limit} s (the time limit)" >&2
fi
exit "$status"
