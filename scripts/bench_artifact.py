"""Bytes per stage of the record preset's artifact (issue 15), on stand-in weights with trained-like
statistics (tests/test_record_preset.py's trained_like_), at fixed widths (int6 matrices, int7
embedding, no bit allocation) so that every stage stores the same quantized weights.

Stages: int6 + zstd-22 with the readable code and a JSON header (before issue 15); the same
codes per-group; + the compact code form; + the compressed header; + LQER factors (rank 4, top 3).
Also the whole payload under each single-stream compressor, the per-group table, and the
parameters the saved bytes would buy at the int6 per-group rate.

  OMP_NUM_THREADS=1 python scripts/bench_artifact.py [--json]
"""

import argparse
import dataclasses
import json
import lzma
import os
import platform
import sys
import time
from pathlib import Path

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    h0 = gpt.Hyperparameters.from_env({"PRESET": "record"})
    torch.manual_seed(0)
    model = trained_like_(gpt.build_model(h0))
    state = gpt.artifact_state(model)

    params = sum(p.numel() for p in model.parameters())
    readable = gpt.code_bytes_of()
    fixed = {"bit_alloc": False, "gptq_embed": False, "gate_int8": False, "lqer_rank": 0}
    today = dataclasses.replace(
        h0, **fixed, compressor="zstd", header_compress=False, code_form="readable"
    )
    entries, raw = gpt.quantize_state_dict(state, today)
    streams = single_streams(raw)
    zstd_payload = gpt.COMPRESSORS["zstd"][0](raw, 22)

    cache = {}  # shared by the per-group stages: only groups that change are compressed again
    t0 = time.perf_counter()
    payload, groups = gpt.compress_pergroup(entries, raw, cache)
    pergroup_s = time.perf_counter() - t0
    compact = dataclasses.replace(today, code_form="compact")
    packed = dataclasses.replace(compact, header_compress=True)
    lqer_h = dataclasses.replace(packed, lqer_rank=4)
    lqer_entries, lqer_raw = gpt.quantize_state_dict(state, lqer_h)
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

    saved = rows[0]["total_bytes"] - rows[-1]["total_bytes"]
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "params": params,
        "raw_payload_bytes": len(raw),
        "single_streams": {n: {"bytes": b, "s": round(s, 1)} for n, (b, s) in streams.items()},
        "best_single_stream": best_name,
        "pergroup_over_best_single": len(payload) / streams[best_name][0],
        "pergroup_s": round(pergroup_s, 1),
        "stages": rows,
        "groups": table,
        "bytes_saved": saved,
        "int6_bytes_per_param": rate,
        "extra_int6_params_for_saved_bytes": int(saved / rate),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0

    print(f"machine: {report['machine']}; record preset, {params:,} parameters (stand-in weights)")
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
        f"saved {saved:,} bytes; at {rate:.4f} bytes per int6 parameter that is "
        f"{report['extra_int6_params_for_saved_bytes']:,} more parameters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
