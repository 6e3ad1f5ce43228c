#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: a local venv, the offline corpus built from
# this Python's own documentation, a few minutes of CPU training with PRESET=smoke, the artifact written,
# then re-scored from disk by eval_bpb.py. Extra env vars (ITERATIONS, MAX_WALLCLOCK_SECONDS, SEED, ...) apply.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh requirements.txt
# OpenMP threads that wait sleep instead of spinning: a busy laptop keeps its throughput (issue 18).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
started=$(date +%s)
python -m data.embedded
export PRESET=smoke RUN_ID="${RUN_ID:-smoke_$(date +%Y%m%d_%H%M%S)}"
export DATA_PATH=data/datasets/pydoc_sp1024 TOKENIZER_PATH=data/tokenizers/pydoc_1024_bpe.model
status=0
python train_gpt.py || status=$?
[ "$status" -le 3 ] && [ -f "logs/$RUN_ID.pga" ] || exit "$status"
python eval_bpb.py "logs/$RUN_ID.pga" --data-path "$DATA_PATH" --tokenizer-path "$TOKENIZER_PATH" --json \
  > "logs/$RUN_ID.rescore.json" || status=$?
python - "$RUN_ID" "$(( $(date +%s) - started ))" <<'PY'
import json
import sys

run_id = sys.argv[1]
seconds = int(sys.argv[2])
lines = open(f"logs/{run_id}.txt", encoding="utf-8").read().splitlines()
s = json.loads(next(x for x in reversed(lines) if x.startswith("summary: "))[len("summary: "):])
r = json.load(open(f"logs/{run_id}.rescore.json", encoding="utf-8"))
scope = "val prefix of {:,} targets: a quick look".format(s["tokens"]) if s.get("quick_look") else "whole val"
unigram = f", unigram {s['unigram_bpb']:.4f} on the same targets" if s.get("unigram_bpb") is not None else ""
print("=" * 60)
print(f"run.sh done in {seconds // 60}m{seconds % 60:02d}s")
print(f"val_bpb:     {s['val_bpb']:.4f} (re-scored from disk: {r['val_bpb']:.4f}{unigram}) [{scope}]")
print(f"total bytes: {s['total_bytes']:,} of {s['budget_bytes']:,}")
print(f"valid:       {s['valid'] and r['valid']}")
print(f"log:         logs/{run_id}.txt")
print(f"artifact:    logs/{run_id}.pga")
print("=" * 60)
PY
exit "$status"
