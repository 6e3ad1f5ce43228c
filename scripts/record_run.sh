#!/usr/bin/env bash
# Seeds to a checked record folder in one command: trains each seed with torchrun, assembles the
# folder with `pack.py record`, checks it with `pack.py check`, and prints the verdict.
#
#   scripts/record_run.sh NAME --author "Your Name" --github-id you --blurb "What is new." \
#       [--against RECORD_DIR] [--non-record] [any other `pack.py record` flag]
#
# Environment: SCRIPT (train_gpt.py), NPROC (8: processes per seed), SEEDS ("1 2 3"), PYTHON
# (python), LOG_DIR (logs), RUN_TAG (NAME_<date>_<time>: the seeds' RUN_IDs are RUN_TAG_s<seed>);
# every other variable (PRESET, DATA_PATH, ...) reaches the training runs as usual. A run that
# ends `score INVALID` (exit 3) is still packed, and pack.py decides (a record needs
# --non-record then); any other failure stops here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "error: usage: scripts/record_run.sh NAME [pack.py record flags]" >&2
  exit 2
fi
name="$1"
shift
script="${SCRIPT:-train_gpt.py}"
nproc="${NPROC:-8}"
seeds="${SEEDS:-1 2 3}"
python="${PYTHON:-python}"
log_dir="${LOG_DIR:-logs}"
tag="${RUN_TAG:-${name}_$(date +%Y%m%d_%H%M%S)}"
logs=()
for seed in $seeds; do
  echo "record_run: seed $seed of \"$seeds\": $script on $nproc process(es), RUN_ID=${tag}_s${seed}"
  status=0
  SEED="$seed" RUN_ID="${tag}_s${seed}" LOG_DIR="$log_dir" \
    "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$script" || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then
    echo "error: seed $seed failed with exit status $status (see $log_dir/${tag}_s${seed}.txt)" >&2
    exit "$status"
  fi
  logs+=("$log_dir/${tag}_s${seed}.txt")
done
packed="$("$python" pack.py record "${logs[@]}" --name "$name" "$@")"
echo "$packed"
folder="$(printf '%s\n' "$packed" | sed -n 's/^record: //p')"
if [ -z "$folder" ]; then
  echo "error: pack.py record named no folder" >&2
  exit 1
fi
status=0
checked="$("$python" pack.py check "$folder")" || status=$?
echo "$checked"
if [ "$status" -eq 0 ]; then
  echo "record_run: verdict: $folder is consistent ($(printf '%s\n' "$packed" | sed -n 's/^track: //p'))"
else
  echo "record_run: verdict: $folder has problems (pack.py check, above)" >&2
fi
exit "$status"
