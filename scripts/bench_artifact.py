"""Bytes per stage of the record preset's artifact (issue 15), on stand-in weights with trained-like
statistics (tests/test_record_preset.py's trained_like_), at fixed widths (int6 matrices, int7
embedding, no bit allocation) so that every stage stores the same quantized weights.

Stages: int6 + zstd-22 with the readable code and a JSON header (before issue 15); the same
codes per-group; + the compact code form; + the compressed header; + LQER factors (rank 4, top 3).
Also the whole payload under each single-stream compressor, the per-group table, and the
parameters the saved bytes would buy at the int6 per-group rate; for each group of at least
1 MiB its bytes against the best single back end on the whole group and the order-0 entropy
bound of its bytes (the floor for any coder that treats the codes as independent).

--train-seconds N: the same measurement on weights trained for real on one CPU thread instead:
the record preset at a CPU width (CPU_RUN below, --model-dim) trained for N seconds on the
real FineWeb SP8192 shards with train_gpt.py's own stages (open_run, build_run_model, train,
calibrate), then measured with its GPTQ Hessians. --save keeps the trained state and Hessians,
--load measures a saved run again without training.

  OMP_NUM_THREADS=1 python scripts/bench_artifact.py [--json]
  OMP_NUM_THREADS=1 python scripts/bench_artifact.py --train-seconds 1500 --save run.pt
  OMP_NUM_THREADS=1 python scripts/bench_artifact.py --load run.pt
"""

import argparse
import dataclasses
import json
import lzma
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_record_preset import trained_like_

import train_gpt as gpt


def single_streams(raw):
    """{name: (bytes, seconds)} of the whole payload under each single-stream compressor."""
    out = {}
    codecs = {
        "zstd-22": lambda d: gpt.COMPRESSORS["zstd"][0](d, 22),
        "lzma-9e": lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
        "zlib-9": lambda d: gpt.COMPRESSORS["zlib"][0](d, 9),
    }
    if gpt.brotli is not None:
        codecs["brotli-11"] = gpt.PERGROUP_CODECS["brotli"][0]
    for name, fn in codecs.items():
        t0 = time.perf_counter()
        out[name] = (len(fn(raw)), time.perf_counter() - t0)
    return out


def stage(h, entries, raw, payload, compressor, groups, readable):
    """(payload, header, code, total) bytes of one stage, the header built as save_artifact
    builds it."""
    code = gpt.counted_code(h, readable)
    header = gpt._artifact_header(h, code, compressor, raw, payload, entries, groups)
    head = len(gpt._artifact_prefix_and_head(header, h.header_compress))
    return len(payload), head, len(code), len(payload) + head + len(code)


# Real FineWeb data for --train-seconds: a folder with shards/realtext_sp8192 (val and train
# shards) and tokenizers/fineweb_8192_bpe.model, named by FINEWEB_SAMPLE (or pass --data-path and
# --tokenizer-path; `python -m data.download --variant sp8192` makes such shards).
SAMPLE = os.environ.get("FINEWEB_SAMPLE")

# Overrides of the record preset that make it train at a useful pace on one CPU thread: eager
# (no torch.compile), shorter sequences and batches (--seq-len, --batch-tokens: 16,384-token
# batches take 30-45 s a step at width 256 on one thread), a few GPTQ calibration sequences, no
# validation during training, the whole budget in MAX_WALLCLOCK_SECONDS, and the schedules that
# assume thousands of steps (EMA 0.9965, momentum warmup over 1,500 steps) shortened to the few
# hundred steps a CPU run makes. The depth, MLP width ratio and every architecture flag stay.
CPU_RUN = {
    "PRESET": "record",
    "COMPILE": "0",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "ITERATIONS": "1000000",
    "VAL_LOSS_EVERY": "0",
    "VAL_MAX_TOKENS": "65536",
    "TRAIN_LOG_EVERY": "10",
    "GPTQ_CALIB_SEQS": "16",
    "EMA_DECAY": "0.95",
    "MUON_MOMENTUM_WARMUP_STEPS": "50",
}


def machine():
    """The machine in words: architecture, cores, processor and the torch threads in use."""
    return (
        f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    )


def last_train_loss(text_path):
    """The last `train_loss:` the run's text log shows, or None."""
    found = re.findall(r"train_loss:([0-9.]+)", Path(text_path).read_text(encoding="utf-8"))
    if not found:
        return None
    return float(found[-1])


def train_for_real(args):
    """(env, h, float state, GPTQ Hessians, info) of the record preset at a CPU width trained
    for args.train_seconds with train_gpt.py's own stages; env is the settings h came from."""
    if not args.data_path or not args.tokenizer_path:
        raise SystemExit(
            "error: --train-seconds needs real data: set FINEWEB_SAMPLE or pass --data-path and "
            "--tokenizer-path"
        )
    log_dir = tempfile.mkdtemp(prefix="bench_real_")
    # The matrices kept float scale with the width squared, so that the same tensors are int6
    # (and GPTQ'd) as at width 512: with the default 65,536, every attention matrix of width 256
    # would stay fp16 and the attn.int6 group would vanish.
    keep_float = max(1, 65536 * args.model_dim**2 // 512**2)
    env = {
        **CPU_RUN,
        "MODEL_DIM": str(args.model_dim),
        "KEEP_FLOAT_MAX_NUMEL": str(keep_float),
        "TRAIN_SEQ_LEN": str(args.seq_len),
        "EVAL_SEQ_LEN": str(args.seq_len),
        "TRAIN_BATCH_TOKENS": str(args.batch_tokens),
        "DATA_PATH": str(args.data_path),
        "TOKENIZER_PATH": str(args.tokenizer_path),
        "VOCAB_SIZE": "8192",
        "MAX_WALLCLOCK_SECONDS": str(args.train_seconds),
        "LOG_DIR": log_dir,
        "RUN_ID": "bench_real",
    }
    h = gpt.Hyperparameters.from_env(env)
    t0 = time.perf_counter()
    run = gpt.open_run(h)
    with gpt.failures_recorded(run.logger):
        model, n_params = gpt.build_run_model(run)
        stats = gpt.train(run, model)
        hessians = gpt.calibrate(run, model)
    gpt.set_progress_logger(None)
    info = {
        "machine": machine(),
        "params": n_params,
        "model_dim": h.model_dim,
        "num_layers": h.num_layers,
        "steps": stats["steps"],
        "train_loop_s": stats["train_time_ms"] / 1000,
        "train_budget_s": run.ledger.train_s,
        "wall_s": time.perf_counter() - t0,
        "tokens_seen": stats["steps"] * h.train_batch_tokens,
        "final_train_loss": last_train_loss(run.logger.text_path),
        "log": run.logger.text_path,
    }
    state = {k: v.detach().cpu().clone() for k, v in gpt.artifact_state(model).items()}
    hessians = {k: v.detach().cpu() for k, v in (hessians or {}).items()}
    return env, h, state, hessians, info


def trained_run(args):
    """(h, state, hessians, info): trained now (and saved with --save) or read back (--load)."""
    if args.load:
        saved = torch.load(args.load, weights_only=True)
        env = saved["env"]
        h = gpt.Hyperparameters.from_env(env)
        return h, saved["state"], saved["hessians"], saved["info"]
    env, h, state, hessians, info = train_for_real(args)
    if args.save:
        torch.save({"env": env, "state": state, "hessians": hessians, "info": info}, args.save)
    return h, state, hessians, info


def order0_bound(data):
    """Bytes of the order-0 entropy bound of data: -sum p log2 p over byte values, x len / 8."""
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / max(len(data), 1)
    return float(-(p * np.log2(p)).sum()) * len(data) / 8


def group_bounds(entries, raw, groups, min_raw=1 << 20):
    """For each group of at least min_raw raw bytes: its stored stream (rows in the same order
    compress_pergroup chose) under each back end alone as one stream, and the order-0 bound."""
    members = dict(gpt.payload_groups(entries))
    out = []
    for g in groups:
        if g["name"] not in members:
            continue  # the row-order group
        names = members[g["name"]]
        orders = {}
        if g["sorted"]:
            for i, part in names:
                if gpt._sortable(entries[i], part):
                    off, n = entries[i]["data"]
                    rows = entries[i]["shape"][0]
                    q = np.frombuffer(raw, np.int8, n, off).reshape(rows, -1)
                    orders[i] = gpt.l1_row_order(q)
        stream = gpt._group_stream(entries, names, raw, orders)
        if len(stream) < min_raw:
            continue
        singles = {n: len(gpt.PERGROUP_CODECS[n][0](stream)) for n in gpt.pergroup_codecs()}
        best = min(singles, key=singles.get)
        bound = order0_bound(stream)
        out.append(
            {
                "name": g["name"],
                "raw_bytes": len(stream),
                "bytes": g["bytes"],
                "codec": g["codec"],
                "best_single": best,
                "best_single_bytes": singles[best],
                "order0_bound_bytes": math.ceil(bound),
                "bits_per_byte": 8 * g["bytes"] / len(stream),
                "order0_bits_per_byte": 8 * bound / len(stream),
            }
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--train-seconds",
        type=float,
        default=0.0,
        help="train the record preset at a CPU width for real for this many seconds",
    )
    ap.add_argument("--model-dim", type=int, default=256, help="MODEL_DIM of the trained run")
    ap.add_argument("--seq-len", type=int, default=512, help="TRAIN_SEQ_LEN of the trained run")
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=4096,
        help="TRAIN_BATCH_TOKENS of the trained run (a multiple of 8 x --seq-len)",
    )
    ap.add_argument(
        "--data-path",
        default=SAMPLE and os.path.join(SAMPLE, "shards", "realtext_sp8192"),
        help="SP8192 shards (default: $FINEWEB_SAMPLE/shards/realtext_sp8192)",
    )
    ap.add_argument(
        "--tokenizer-path",
        default=SAMPLE and os.path.join(SAMPLE, "tokenizers", "fineweb_8192_bpe.model"),
        help="the shards' tokenizer (default: $FINEWEB_SAMPLE/tokenizers/fineweb_8192_bpe.model)",
    )
    ap.add_argument("--save", help="write the trained float state and GPTQ Hessians here")
    ap.add_argument("--load", help="measure a state saved with --save instead of training")
    args = ap.parse_args(argv)
    hessians = None
    info = None
    if args.train_seconds > 0 or args.load:
        h0, state, hessians, info = trained_run(args)
        params = info["params"]
    else:
        h0 = gpt.Hyperparameters.from_env({"PRESET": "record"})
        torch.manual_seed(0)
        model = trained_like_(gpt.build_model(h0))
        state = gpt.artifact_state(model)
        params = sum(p.numel() for p in model.parameters())
    readable = gpt.code_bytes_of(gpt.MODEL)
    fixed = {"bit_alloc": False, "gptq_embed": False, "gate_int8": False, "lqer_rank": 0}
    today = dataclasses.replace(
        h0, **fixed, compressor="zstd", header_compress=False, code_form="readable"
    )
    quant_cache = {}  # the same codes in both quantizations: GPTQ runs once per tensor
    entries, raw = gpt.quantize_state_dict(state, today, hessians=hessians, cache=quant_cache)
    streams = single_streams(raw)
    zstd_payload = gpt.COMPRESSORS["zstd"][0](raw, 22)

    cache = {}  # shared by the per-group stages: only groups that change are compressed again
    t0 = time.perf_counter()
    payload, groups = gpt.compress_pergroup(entries, raw, cache)
    pergroup_s = time.perf_counter() - t0
    compact = dataclasses.replace(today, code_form="compact")
    packed = dataclasses.replace(compact, header_compress=True)
    lqer_h = dataclasses.replace(packed, lqer_rank=4)
    lqer_entries, lqer_raw = gpt.quantize_state_dict(
        state, lqer_h, hessians=hessians, cache=quant_cache
    )
    lqer_payload, lqer_groups = gpt.compress_pergroup(lqer_entries, lqer_raw, cache)

    runs = [
        ("int6 + zstd-22, readable code, JSON header (before)", today, entries, raw,
         zstd_payload, "zstd", None),
        ("+ per-group", today, entries, raw, payload, "pergroup", groups),
        ("+ compact code", compact, entries, raw, payload, "pergroup", groups),
        ("+ compressed header", packed, entries, raw, payload, "pergroup", groups),
        ("+ LQER r4 top-3", lqer_h, lqer_entries, lqer_raw, lqer_payload, "pergroup",
         lqer_groups),
    ]  # fmt: skip
    rows = []
    for label, h, ents, rw, pl, comp, grp in runs:
        p_bytes, h_bytes, c_bytes, total = stage(h, ents, rw, pl, comp, grp, readable)
        rows.append(
            {
                "stage": label,
                "payload_bytes": p_bytes,
                "header_bytes": h_bytes,
                "code_bytes": c_bytes,
                "total_bytes": total,
            }
        )
    table = gpt.group_table(
        {"compressor": "pergroup", "tensors": lqer_entries, "groups": lqer_groups}
    )

    best_name = min(streams, key=lambda n: streams[n][0])
    # the bytes per parameter of the int6 matrices per-group: what a saved byte buys
    int6 = [g for g in table if g["name"].endswith(".int6")]
    rate = sum(g["bytes"] for g in int6) / max(sum(g["raw_bytes"] for g in int6), 1)

    bounds = group_bounds(lqer_entries, lqer_raw, lqer_groups)

    saved = rows[0]["total_bytes"] - rows[-1]["total_bytes"]
    report = {
        "machine": machine(),
        "weights": "stand-in" if info is None else "trained",
        "training": info,
        "params": params,
        "raw_payload_bytes": len(raw),
        "single_streams": {n: {"bytes": b, "s": round(s, 1)} for n, (b, s) in streams.items()},
        "best_single_stream": best_name,
        "pergroup_over_best_single": len(payload) / streams[best_name][0],
        "pergroup_s": round(pergroup_s, 1),
        "stages": rows,
        "groups": table,
        "group_bounds": bounds,
        "bytes_saved": saved,
        "int6_bytes_per_param": rate,
        "extra_int6_params_for_saved_bytes": int(saved / rate),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0

    if info is None:
        print(
            f"machine: {report['machine']}; record preset, {params:,} parameters (stand-in weights)"
        )
    else:
        print(f"machine: {report['machine']}")
        print(
            f"trained on {info['machine']}: record preset at {info['num_layers']} x "
            f"{info['model_dim']}, {params:,} parameters, {info['steps']} steps "
            f"({info['tokens_seen']:,} tokens) in {info['train_loop_s']:.0f} s of loop, "
            f"{info['train_budget_s']:.0f} s of training budget, {info['wall_s']:.0f} s wall; "
            f"final train loss {info['final_train_loss']}"
        )
    print(f"raw payload {len(raw):,} bytes")
    for n, (b, s) in streams.items():
        print(f"single stream {n}: {b:,} bytes ({s:.1f} s)")
    print(
        f"per-group payload {len(payload):,} = {report['pergroup_over_best_single']:.4f} x "
        f"{best_name} ({pergroup_s:.1f} s)"
    )
    print()
    print("| stage | payload | header | code | total |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['payload_bytes']:,} | {r['header_bytes']:,} "
            f"| {r['code_bytes']:,} | {r['total_bytes']:,} |"
        )
    print()
    print("| group | codec | sorted | raw | bytes | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for g in table:
        ratio = g["bytes"] / max(g["raw_bytes"], 1)
        print(
            f"| {g['name']} | {g['codec']} | {g['sorted']} | {g['raw_bytes']:,} "
            f"| {g['bytes']:,} | {ratio:.3f} |"
        )
    print()
    print(
        "| group (>= 1 MiB) | raw | bytes | best single back end | its bytes | order-0 bound "
        "| bits/byte | order-0 bits/byte |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for b in bounds:
        print(
            f"| {b['name']} | {b['raw_bytes']:,} | {b['bytes']:,} | {b['best_single']} "
            f"| {b['best_single_bytes']:,} | {b['order0_bound_bytes']:,} "
            f"| {b['bits_per_byte']:.3f} | {b['order0_bits_per_byte']:.3f} |"
        )
    print()
    print(
        f"saved {saved:,} bytes; at {rate:.4f} bytes per int6 parameter that is "
        f"{report['extra_int6_params_for_saved_bytes']:,} more parameters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
