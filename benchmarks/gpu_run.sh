#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine, in one script (benchmarks/gpu.py does the measuring):
#
#   benchmarks/gpu_run.sh                    # python -m benchmarks.gpu --samples 2000 (every section,
#                                            # the GPU shape included: fused against split, and
#                                            # mmbatch preprocess in both features.gpu_shape values)
#   benchmarks/gpu_run.sh --samples 500      # other benchmarks.gpu flags instead
#   benchmarks/gpu_run.sh --only hf          # the hf extractors alone (ViT-B/16, wav2vec2-base, BERT-base
#                                            # built from configs with random weights; no download)
#
# Python environment, the first that applies:
#   a. .whl/ holds wheels (made here by benchmarks/gpu_wheels.sh, for a machine that cannot reach
#      PyPI, such as this workplace's lent H200): the machine's python3 with its own CUDA torch,
#      plus those wheels installed with --target into /tmp/mmbatch-site (nothing installed is replaced).
#   b. PyPI is reachable: a fresh venv, `pip install torch==2.13.0 -e ".[hf]"` as README says (on Linux
#      x86-64 PyPI's torch==2.13.0 is a CUDA build; the hf extra adds transformers for the hf section).
#   c. neither: python3 as it is; a section whose packages are missing fails with its import
#      error in the table, and the other sections still run (the hf section needs transformers >= 5
#      in the machine's image: its dependency tree does not fit the carried .whl/).
# The benchmark itself is stopped after MMBATCH_GPU_TIMEOUT seconds (default 420), so that the
# whole script ends within about 8 minutes; results are written after each section, so a stopped
# run keeps what it measured. Prints the table; the results are in benchmarks/results/gpu.{md,json}
# and, where $OUT is set (the device tool's output folder), copied there with the log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--samples 2000)
BASE_PY=${MMBATCH_BASE_PYTHON:-python3}
PY=$BASE_PY
LOG=/tmp/mmbatch-gpu.log

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv 2>&1 \
  || echo "nvidia-smi: not available"
echo "cores: $(nproc); $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
"$BASE_PY" -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "| torch", torch.__version__,
"| CUDA build", torch.version.cuda, "| torch.cuda.is_available()", torch.cuda.is_available())' \
  || echo "WARNING: $BASE_PY cannot import torch"

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== offline: installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/mmbatch-site"
  "$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mmbatch-site .whl/*.whl \
    || echo "WARNING: installing .whl failed (wheels for another Python? see benchmarks/gpu_wheels.sh)"
  export PYTHONPATH=/tmp/mmbatch-site${PYTHONPATH:+:$PYTHONPATH}
elif timeout 20 "$BASE_PY" -m pip download -q --no-deps --dest /tmp/mmbatch-pypi-probe six >/dev/null 2>&1; then
  echo "== online: venv /tmp/mmbatch-venv, pip install torch==2.13.0 -e .[hf]"
  if "$BASE_PY" -m venv /tmp/mmbatch-venv && /tmp/mmbatch-venv/bin/python -m pip install -q torch==2.13.0 -e ".[hf]"; then
    PY=/tmp/mmbatch-venv/bin/python
  else
    echo "WARNING: the install failed; running with $BASE_PY as it is"
  fi
else
  echo "== no .whl/ and no PyPI: running with $BASE_PY as it is"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "python: $PY"

echo "== python -m benchmarks.gpu ${ARGS[*]}"
timeout --kill-after=20 "${MMBATCH_GPU_TIMEOUT:-420}" "$PY" -m benchmarks.gpu "${ARGS[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "WARNING: the benchmark was stopped after ${MMBATCH_GPU_TIMEOUT:-420} s; the files hold the sections it finished"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp benchmarks/results/gpu*.md benchmarks/results/gpu*.json "$LOG" "$OUT"/ 2>/dev/null
  echo "copied the results and the log to $OUT"
fi
echo "== done in ${SECONDS} s, exit status $rc"
exit "$rc"
