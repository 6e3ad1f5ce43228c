#!/usr/bin/env bash
# The device check (issue 17): what can only be proven on a GPU, in one run of at most 9 minutes.
#
#   scripts/gpu_check.sh [OUTFILE]       # on a lent GPU; figures to OUTFILE, else $OUT/gpu_check.md
#   scripts/gpu_check.sh --dry-run       # any machine: every step's command printed and checked
#
# Steps, in this order so that a short lease still proves the most (each step's time limit shrinks
# to what is left of the 540 s budget):
#   1. the CUDA-only tests: kernels against torch on hardware, compile with inductor, bf16;
#   2. a 120 s record-preset training on ../shared/data shards, sliding eval, end to end, the
#      artifact re-scored by eval_bpb.py;
#   3. the official baseline script (../shared/anchors, run where it lives, never copied) and our
#      baseline preset, 60 s each on the same GPU and shards: tokens/s side by side;
#   4. scripts/bench.py, record and baseline at full shape: ms/step, tokens/s, MFU, peak memory.
# It installs nothing: the device's own torch and Triton, the working tree and ../shared. Logs go
# beside OUTFILE in gpu_check_logs/; OUTFILE is markdown, ready for BENCHMARKS.md.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="${PG_SHARED:-$REPO/../shared}"
[ -d "$SHARED" ] || SHARED="$REPO/shared"
PY="${PYTHON:-python}"
BUDGET_S=540
DRY=0
OUTFILE=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) OUTFILE="$arg" ;;
  esac
done
OUTFILE="${OUTFILE:-${OUT:-$REPO/logs}/gpu_check.md}"
LOGS="$(dirname "$OUTFILE")/gpu_check_logs"
WORK="$(mktemp -d)"
DATA="$SHARED/data/shards/realtext_sp1024"
TOKENIZER="$SHARED/data/tokenizers/fineweb_1024_bpe.model"
OFFICIAL="$SHARED/anchors/official_baseline_train_gpt.py"
CUDA_TESTS=(tests/test_gpu_ready.py tests/test_quant.py -k "on_cuda or on_gpu")
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
DATA_ENV=(DATA_PATH="$DATA" TOKENIZER_PATH="$TOKENIZER" VAL_LOSS_EVERY=0 ITERATIONS=20000)
START=$SECONDS
FAILED=0
mkdir -p "$LOGS"
: >"$LOGS/steps.tsv"

# step NAME LIMIT_S CHECK -- COMMAND...: run COMMAND (its output to $LOGS/NAME.log) within
# min(LIMIT_S, what is left of the budget); under --dry-run print it and run CHECK instead.
step() {
  local name="$1" limit="$2" check="$3"
  shift 4
  if [ "$DRY" = 1 ]; then
    printf '[dry-run] %s: %s\n' "$name" "${*@Q}"
    if bash -c "$check" >"$LOGS/$name.dry.log" 2>&1; then
      echo "[dry-run] $name: ok"
    else
      echo "[dry-run] $name: FAILED ($check)"; tail -5 "$LOGS/$name.dry.log"; FAILED=1
    fi
    return
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >>"$LOGS/steps.tsv"; echo "gpu_check: $name skipped"; return
  fi
  echo "gpu_check: $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$LOGS/steps.tsv"
  [ "$rc" = 0 ] || FAILED=1
  echo "gpu_check: $name rc=$rc in $((SECONDS - t0))s"
}

compiles() {  # a Python file parses (without writing __pycache__ beside it)
  echo "$PY -c \"compile(open('$1').read(), '$1', 'exec')\""
}

cd "$REPO"
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no CUDA device (use --dry-run on a CPU machine)" >&2
  exit 2
fi

step cuda_tests 100 "$PY -m pytest --collect-only -q ${CUDA_TESTS[*]:0:2} -k 'on_cuda or on_gpu' \
  | grep -q '::'" -- \
  "$PY" -m pytest -q -rs -p no:cacheprovider "${CUDA_TESTS[@]}"

mkdir -p "$WORK/record" "$WORK/official" "$WORK/ours"
step record_120s 330 "$(compiles train_gpt.py) && test -f $DATA/fineweb_val_000000.bin \
  && test -f $TOKENIZER && env PRESET=record ${DATA_ENV[*]} MAX_WALLCLOCK_SECONDS=120 \
  $PY -c 'import train_gpt as t; t.Hyperparameters.from_env()' && $PY eval_bpb.py --help" -- \
  bash -c "cd '$WORK/record' && env PRESET=record RUN_ID=record_120s LOG_DIR=logs \
    ${DATA_ENV[*]} MAX_WALLCLOCK_SECONDS=120 ${TORCHRUN[*]} '$REPO/train_gpt.py' \
    && $PY '$REPO/eval_bpb.py' logs/record_120s.pga --script '$REPO/train_gpt.py' --json"

step official_60s 150 "$(compiles "$OFFICIAL")" -- \
  bash -c "cd '$WORK/official' && env RUN_ID=official_60s ${DATA_ENV[*]} \
    MAX_WALLCLOCK_SECONDS=60 ${TORCHRUN[*]} '$OFFICIAL' && cp logs/official_60s.txt '$LOGS/'"

step ours_baseline_60s 150 "env PRESET=baseline ${DATA_ENV[*]} \
  $PY -c 'import train_gpt as t; t.Hyperparameters.from_env()'" -- \
  bash -c "cd '$WORK/ours' && env PRESET=baseline RUN_ID=ours_baseline_60s LOG_DIR=logs \
    ${DATA_ENV[*]} MAX_WALLCLOCK_SECONDS=60 ${TORCHRUN[*]} '$REPO/train_gpt.py'"

step bench 150 "$PY scripts/bench.py --dry-run --compare baseline --json" -- \
  "$PY" scripts/bench.py --device cuda --compare baseline --world-size 8 --steps 5 --warmup 2 \
  --json

if [ "$DRY" = 1 ]; then
  rm -rf "$WORK"
  [ "$FAILED" = 0 ] && echo "gpu_check: dry run ok" || echo "gpu_check: dry run FAILED"
  exit "$FAILED"
fi

# The figures, as markdown for BENCHMARKS.md.
"$PY" - "$LOGS" "$OUTFILE" <<'EOF'
import json
import re
import sys
from pathlib import Path

import torch

logs = Path(sys.argv[1])
out = []
name = torch.cuda.get_device_name(0)
out.append(f"## Device check: {name}\n")
out.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, `scripts/gpu_check.sh`\n")
out.append("| step | exit | seconds |\n|---|---:|---:|")
for line in (logs / "steps.tsv").read_text().splitlines():
    step, rc, secs = line.split("\t")
    out.append(f"| {step} | {rc} | {secs} |")


def text(name):
    path = logs / name
    return path.read_text(errors="replace") if path.exists() else ""


tests = re.findall(r"^=* ?(\d+ (?:passed|failed).*?) ?=*$", text("cuda_tests.log"), re.M)
out.append(f"\nCUDA-only tests: {tests[-1] if tests else 'no result'}")

record = text("record_120s.log")
summary = [ln for ln in record.splitlines() if ln.startswith("summary: ")]
rescore = re.findall(r"^\{.*\}$", record, re.M)
if summary:
    s = json.loads(summary[-1][len("summary: "):])
    out.append(
        f"\nRecord, 120 s: {s.get('eval_mode')} val_bpb {s.get('val_bpb'):.4f}, "
        f"total bytes {s.get('total_bytes'):,}, valid {s.get('valid')}"
    )
    if rescore:
        r = json.loads(rescore[-1])
        out.append(f"eval_bpb.py re-score: val_bpb {r.get('val_bpb')}")
steps = re.findall(r"step:(\d+)/\d+ .*?step_avg:([\d.]+)ms", record)
if steps:
    out.append(f"record steps {steps[-1][0]}, step_avg {steps[-1][1]} ms")


def tok_s(log, batch=524288):
    found = re.findall(r"step:(\d+)/\d+ .*?step_avg:([\d.]+)ms", log)
    if not found:
        return None
    step, avg = found[-1]
    return int(step), float(avg), batch / float(avg) * 1000


official = tok_s(text("official_60s.txt") or text("official_60s.log"))
ours = tok_s(text("ours_baseline_60s.log"))
out.append("\n| 60 s, 1 GPU, sp1024 shards | steps | ms/step | tokens/s |\n|---|---:|---:|---:|")
for label, r in (("official baseline script", official), ("our PRESET=baseline", ours)):
    if r:
        out.append(f"| {label} | {r[0]} | {r[1]:.2f} | {r[2]:,.0f} |")
if official and ours:
    out.append(f"\nours / official tokens/s: {ours[2] / official[2]:.3f}x")

bench = re.findall(r"^\{.*\}$", text("bench.log"), re.M)
if bench:
    b = json.loads(bench[-1])
    out.append("\n| bench (one rank of 8) | ms/step | tokens/s (rank) | MFU | peak MiB |")
    out.append("|---|---:|---:|---:|---:|")
    for preset in ("record", "baseline"):
        r = b.get(preset)
        if r:
            out.append(
                f"| {preset} | {r['ms_per_step']} | {r['tokens_per_s_rank']:,} | {r['mfu']} | "
                f"{r['peak_memory_mib']:,} |"
            )
Path(sys.argv[2]).write_text("\n".join(out) + "\n")
print("\n".join(out))
EOF
rm -rf "$WORK"
echo "gpu_check: figures in $OUTFILE, logs in $LOGS"
exit "$FAILED"
