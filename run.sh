#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: a local venv, the offline corpus built from
# this Python's own documentation, a few minutes of CPU training with PRESET=smoke, the artifact written,
# then re-scored from disk by eval_bpb.py. Extra env vars (ITERATIONS, MAX_WALLCLOCK_SECONDS, ...) apply.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh requirements.txt
python -m data.embedded
export PRESET=smoke RUN_ID="${RUN_ID:-smoke_$(date +%Y%m%d_%H%M%S)}"
export DATA_PATH=data/datasets/pydoc_sp1024 TOKENIZER_PATH=data/tokenizers/pydoc_1024_bpe.model
python train_gpt.py
python eval_bpb.py "logs/$RUN_ID.pga" --data-path "$DATA_PATH" --tokenizer-path "$TOKENIZER_PATH"
echo "logs: logs/$RUN_ID.txt  artifact: logs/$RUN_ID.pga"
