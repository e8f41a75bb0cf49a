#!/usr/bin/env bash
# Runs every CPU benchmark and writes their output into docs/benchmarks.md (between the
# "run_all" markers; the hand-written sections above them are kept).
#   bash benchmarks/run_all.sh                 # ~20-30 min on 2 idle cores
#   QUICK=1 bash benchmarks/run_all.sh         # smaller shapes, fewer repetitions (~5-10 min)
# SciFact (BM25 benchmark) is read from $DEEPRETRIEVAL_DATA_DIR/scifact or ../shared/data/scifact.
# Timings depend on the machine's load: the load average is recorded with every section.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
DATA="${DEEPRETRIEVAL_DATA_DIR:-../shared/data}/scifact"
OUT=${REUSE_OUT:-$(mktemp -d)}  # REUSE_OUT=DIR: rewrite the doc from a previous run's outputs
# RERUN_SERVE=1 with REUSE_OUT: run only the serving benchmark again, keep the other outputs.
QUICK=${QUICK:-0}
echo "outputs in $OUT" >&2

run() {  # run NAME COMMAND...: one benchmark, its output captured in $OUT/NAME.md
  local name=$1
  shift
  echo "== $name: $*" >&2
  local start=$SECONDS
  {
    echo "### $name"
    echo
    echo "\`$*\` (load average before: $(cut -d' ' -f1 /proc/loadavg) on $(nproc) cores)"
    echo
    if "$@" > "$OUT/$name.log" 2>&1; then
      grep -v -E '^(I|W)[0-9]{4} |^WARNING|^$|it/s\]' "$OUT/$name.log" || true
    else
      echo "FAILED (exit $?); last lines:"
      echo '```'
      tail -n 20 "$OUT/$name.log"
      echo '```'
    fi
    echo
    echo "wall time $((SECONDS - start)) s"
    echo
  } > "$OUT/$name.md"
}

if [ -n "${REUSE_OUT:-}" ]; then
  :
elif [ "$QUICK" = 1 ]; then
  run sampler python benchmarks/sampler.py --layers=2 --batches=1,8 --new_tokens=64
  run ppo_step python benchmarks/ppo_step.py --reps=1
  run reward_pool python benchmarks/reward_pool.py --queries=32
  run bm25_scifact python benchmarks/bm25_scifact.py --data="$DATA" --repeats=1
else
  run sampler python benchmarks/sampler.py
  run ppo_step python benchmarks/ppo_step.py
  run reward_pool python benchmarks/reward_pool.py
  run bm25_scifact python benchmarks/bm25_scifact.py --data="$DATA"
fi
if [ -z "${REUSE_OUT:-}" ] || [ -n "${RERUN_SERVE:-}" ]; then
  if [ "$QUICK" = 1 ]; then
    run serve python benchmarks/serve.py --requests=16 --clients=1,8 --layers_0_5b=2
  else
    run serve python benchmarks/serve.py
  fi
fi

DOC=docs/benchmarks.md
BEGIN='<!-- run_all:begin -->'
END='<!-- run_all:end -->'
{
  echo "$BEGIN"
  echo "## All CPU benchmarks (\`bash benchmarks/run_all.sh\`, generated)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(uname -m)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM; QUICK=$QUICK."
  echo
  cat "$OUT"/*.md
  echo "$END"
} > "$OUT/section.txt"
python - "$DOC" "$OUT/section.txt" "$BEGIN" "$END" <<'PY'
import sys
from pathlib import Path

doc, section, begin, end = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), sys.argv[3], sys.argv[4]
text = doc.read_text() if doc.exists() else "# Benchmarks\n"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + section.rstrip("\n") + rest.split(end, 1)[1]
else:
    text = text.rstrip("\n") + "\n\n" + section
doc.write_text(text if text.endswith("\n") else text + "\n")
PY
echo "wrote $DOC" >&2
