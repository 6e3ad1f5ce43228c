"""Time of the n-gram tilt's hint precompute (golf/ngram.py) on a full-size val stream, this CPU.

  FINEWEB_SAMPLE=DIR python scripts/ngram_bench.py   # DIR holds shards/realtext_sp8192/
  python scripts/ngram_bench.py --shard data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin

Reads the real val tokens of a shard (default: $FINEWEB_SAMPLE/shards/realtext_sp8192's val
shard, BENCHMARKS.md "Machines"; any shard in the official format serves, e.g. the sp8192 export
of `python -m data.download --variant sp8192`), checked and read by golf.data, and tiles them to
--tokens (default 47,853,343, the CaseOps SP8192 val split). It computes the hints once in this
process with the record's parameters (TOKEN_ORDER=16, TOKEN_THRESHOLD=0.8) and prints
`ngram_precompute_s: <seconds>`, the gated count and the process's peak resident memory. A tiled
stream repeats its contexts far more often than the real split does: more positions read a hint
than in the real val, so the figure is, if anything, a slower case of the real one.
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from golf.data import load_data_shard  # noqa: E402
from golf.ngram import ngram_hints  # noqa: E402

SAMPLE = os.environ.get("FINEWEB_SAMPLE", "")
CASEOPS_VAL_TOKENS = 47_853_343


def fail(message):
    """Bad input: one line on stderr, exit 2 (as the training scripts)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_tokens(path):
    if not os.path.isfile(path):
        fail(
            f"--shard {path!r}: no such file (set FINEWEB_SAMPLE to a folder holding "
            "shards/realtext_sp8192/, or pass --shard)"
        )
    try:
        tokens = load_data_shard(path).numpy()
    except (OSError, ValueError) as e:
        fail(f"--shard {path!r}: {e}")
    if tokens.size < 2:
        fail(f"--shard {path!r}: holds {tokens.size} tokens, need at least 2")
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shard",
        default=os.path.join(SAMPLE, "shards", "realtext_sp8192", "fineweb_val_000000.bin"),
        help="a val shard of real tokens (default: FINEWEB_SAMPLE's sp8192 val shard)",
    )
    p.add_argument("--tokens", type=int, default=CASEOPS_VAL_TOKENS, help="stream length")
    p.add_argument("--order", type=int, default=16, help="TOKEN_ORDER")
    p.add_argument("--threshold", type=float, default=0.8, help="TOKEN_THRESHOLD")
    args = p.parse_args()
    if args.tokens < 2:
        fail(f"--tokens {args.tokens}: need at least 2")
    real = load_tokens(args.shard)
    tokens = np.resize(real, args.tokens)  # tiled
    t0 = time.perf_counter()
    hint, gate = ngram_hints(tokens, args.order, args.threshold)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"tokens: {tokens.size:,} ({real.size:,} real tokens tiled)")
    print(f"gated: {int(gate.sum()):,}  hinted: {int((hint > 0).sum()):,}")
    print(f"ngram_precompute_s: {seconds:.2f}")
    print(f"peak_rss_mib: {peak_mib:.0f}")


if __name__ == "__main__":
    main()
