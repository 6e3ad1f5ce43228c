"""Quantization gap per scheme: val_bpb after an artifact roundtrip minus val_bpb of the float
weights, and the bytes each scheme takes, for one trained model.

The reference weights come from an artifact stored in fp16 (train with
KEEP_FLOAT_MAX_NUMEL=1000000000 so that no tensor is quantized), or from a run this tool starts
itself (--train SECONDS: `python train_gpt.py` with that setting). Every scheme then re-quantizes
those weights with the training script's own save_artifact / load_artifact and is scored with its
eval_val on the first --val-tokens validation tokens. Tensor schemes (`int6`, `fp16`) are read
with the script's QuantScheme.

  # a CPU smoke model trained for 150 s, then the table
  DATA_PATH=data/datasets/pydoc_sp1024 TOKENIZER_PATH=data/tokenizers/pydoc_1024_bpe.model \\
    python scripts/quant_report.py --train 150
  python scripts/quant_report.py --artifact logs/RUN.pga --json
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FLOAT_EVERYTHING = "1000000000"

# (label, overrides of the artifact's hyperparameters, GPTQ?). EMBED_BITS stays 8 as in the records.
# The mixed row spends the bytes of the INT6_GPTQ row.
INT6_GPTQ = "int6 GPTQ (search clip)"
SCHEMES = [
    (
        "int8 RTN (percentile clip)",
        {"quant_bits": 8, "embed_bits": 8, "clip_method": "percentile"},
        False,
    ),
    ("int6 clip search", {"quant_bits": 6, "embed_bits": 8, "clip_method": "search"}, False),
    (INT6_GPTQ, {"quant_bits": 6, "embed_bits": 8, "clip_method": "search"}, True),
    (
        "mixed BIT_ALLOC + GPTQ, int6 GPTQ bytes",
        {"bit_alloc": True, "embed_bits": 7, "clip_method": "search", "size_margin": 0},
        True,
    ),
]
# Issue 15: the record's int6 GPTQ + int7 SD-clip embedding, then GPTQ on the tied embedding and
# LQER (rank 4 on the 3 worst tensors), alone and together (#1855).
RECORD_Q = {"quant_bits": 6, "embed_bits": 7, "clip_method": "sdclip", "sdclip_k_embed": 14.0}
SCHEMES += [
    ("int6 GPTQ, int7 embedding RTN (SD-clip)", RECORD_Q, True),
    ("+ GPTQ embedding", {**RECORD_Q, "gptq_embed": True}, True),
    ("+ LQER r4 top-3", {**RECORD_Q, "lqer_rank": 4, "lqer_top_k": 3}, True),
    ("+ GPTQ embedding + LQER", {**RECORD_Q, "gptq_embed": True, "lqer_rank": 4}, True),
]
EMBED_HESSIANS = ("tok_emb.weight", "lm_head.weight")


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def int_schemes(mod, header):
    """{tensor name: QuantScheme} of the int-k tensors of an artifact header, read with the
    script's QuantScheme (tensors that are not floating point are stored "raw" and have none)."""
    schemes = {
        e["name"]: mod.QuantScheme.parse(e["scheme"])
        for e in header["tensors"]
        if e["scheme"] != "raw"
    }
    return {name: s for name, s in schemes.items() if s.kind == "int"}


def train_float_artifact(script, seconds, log_dir):
    """Run the training script (PRESET=smoke unless set) with nothing quantized.

    Returns the artifact path.
    """
    run_id = time.strftime("quant_report_%Y%m%d_%H%M%S")
    env = {
        **os.environ,
        "PRESET": os.environ.get("PRESET", "smoke"),
        "MAX_WALLCLOCK_SECONDS": str(seconds),
        "KEEP_FLOAT_MAX_NUMEL": FLOAT_EVERYTHING,
        "RUN_ID": run_id,
        "LOG_DIR": str(log_dir),
    }
    out = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(
            f"error: training failed (exit {out.returncode}): {out.stderr.strip()[-800:]}"
        )
    return Path(log_dir) / f"{run_id}.pga"


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="an artifact holding float (fp16) weights; see --train")
    ap.add_argument(
        "--train",
        type=float,
        metavar="SECONDS",
        help="train a model for this long first (CPU smoke)",
    )
    ap.add_argument(
        "--script",
        default=str(REPO / "train_gpt.py"),
        help="training script (default: train_gpt.py)",
    )
    ap.add_argument(
        "--data-path",
        default=os.environ.get("DATA_PATH"),
        help="dataset dir (default: $DATA_PATH, else the artifact's)",
    )
    ap.add_argument(
        "--tokenizer-path",
        default=os.environ.get("TOKENIZER_PATH"),
        help="tokenizer (default: $TOKENIZER_PATH, else the artifact's)",
    )
    ap.add_argument(
        "--val-tokens", type=int, default=262144, help="score the first N val tokens (0 = all)"
    )
    ap.add_argument(
        "--calib-seqs", type=int, default=32, help="GPTQ calibration sequences of training data"
    )
    ap.add_argument(
        "--keep-float-max-numel",
        type=int,
        default=4096,
        help="tensors up to this size stay float "
        "(the scripts' default 65536 leaves a smoke model's attention in fp16)",
    )
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if bool(args.artifact) == bool(args.train):
        ap.error("give exactly one of --artifact and --train")

    torch.manual_seed(0)
    mod = load_script(args.script)
    workdir = Path(tempfile.mkdtemp(prefix="quant_report_"))
    artifact = (
        Path(args.artifact)
        if args.artifact
        else train_float_artifact(args.script, args.train, workdir)
    )

    # The reference: the float weights, scored on the first --val-tokens val tokens.
    model, h = mod.load_artifact(str(artifact), allow_script_mismatch=True)
    header, _ = mod.read_artifact_header(str(artifact))
    quantized = list(int_schemes(mod, header))
    if quantized:
        print(
            f"warning: {artifact} already holds quantized tensors "
            f"({len(quantized)}, e.g. {quantized[0]}); gaps are measured against those weights",
            file=sys.stderr,
        )
    h = dataclasses.replace(
        h,
        data_path=args.data_path or h.data_path,
        tokenizer_path=args.tokenizer_path or h.tokenizer_path,
        keep_float_max_numel=args.keep_float_max_numel,
        compressor="auto",
    )

    val = mod.load_validation_tokens(h.data_path, h.train_seq_len, args.val_tokens)
    luts = mod.build_sentencepiece_luts(
        mod.load_tokenizer(h.tokenizer_path, h.vocab_size), h.vocab_size, torch.device("cpu")
    )
    before = mod.eval_val(h, model, val, luts)["val_bpb"]

    # GPTQ Hessians once, shared by every GPTQ row (GPTQ: Frantar et al. 2022).
    loader = mod.DistributedTokenLoader(h.data_path, 0, 1, torch.device("cpu"))
    t0 = time.perf_counter()
    hessians = mod.gptq_calibrate(
        model,
        dataclasses.replace(h, gptq_calib_seqs=args.calib_seqs, gptq_embed=True),
        lambda: loader.next_batch(8 * h.train_seq_len, h.train_seq_len, 1),
    )
    calib_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    # Each scheme: quantize and save with the script, reload from disk, score.
    rows = []
    int6_gptq_bytes = None
    for label, overrides, use_gptq in SCHEMES:
        hs = dataclasses.replace(h, **overrides)
        # Same total bytes as int6 GPTQ: does spending them per tensor beat a uniform width?
        if hs.bit_alloc:
            hs = dataclasses.replace(hs, size_budget=int6_gptq_bytes)

        path = workdir / "scheme.pga"
        t0 = time.perf_counter()
        row_hessians = None
        if use_gptq:  # the embedding's Hessian only for the rows that GPTQ it
            row_hessians = {
                k: v
                for k, v in hessians.items()
                if k not in EMBED_HESSIANS or getattr(hs, "gptq_embed", False)
            }
        sizes = mod.save_artifact(model, hs, str(path), hessians=row_hessians)
        save_s = time.perf_counter() - t0

        qmodel, _ = mod.load_artifact(str(path))
        bpb = mod.eval_val(hs, qmodel, val, luts)["val_bpb"]
        scheme_header, _ = mod.read_artifact_header(str(path))
        widths = sorted({s.bits for s in int_schemes(mod, scheme_header).values()})
        if label == INT6_GPTQ:
            int6_gptq_bytes = sizes["total_bytes"]
        rows.append(
            {
                "scheme": label,
                "widths": widths,
                "compressor": sizes["compressor"],
                "artifact_bytes": sizes["artifact_bytes"],
                "total_bytes": sizes["total_bytes"],
                "val_bpb": bpb,
                "gap_bpb": bpb - before,
                "save_s": round(save_s, 1),
            }
        )

    report = {
        "artifact": str(artifact),
        "model_params": n_params,
        "val_tokens": val.numel() - 1,
        "float_val_bpb": before,
        "gptq_calib_seqs": args.calib_seqs,
        "gptq_calib_s": round(calib_s, 1),
        "code_bytes": rows[0]["total_bytes"] - rows[0]["artifact_bytes"],
        "schemes": rows,
    }
    if args.json:
        print(json.dumps(report))
        return 0

    for key, value in report.items():
        if key != "schemes":
            print(f"{key}: {value}")

    print()
    print("| scheme | widths | compressor | artifact bytes | total bytes | val_bpb | gap (bpb) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scheme']} | {','.join(map(str, r['widths']))} | {r['compressor']} "
            f"| {r['artifact_bytes']:,} | {r['total_bytes']:,} "
            f"| {r['val_bpb']:.4f} | {r['gap_bpb']:+.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
