"""The counted code of each training script (issue 15): the readable bytes, what each step of
the minified form removes, and the compact form under Brotli and LZMA, with the time to build
it. Sizes are exact and machine-independent; the times are this machine's.

  python scripts/bench_code.py [--json]
"""

import argparse
import ast
import json
import lzma
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import golf.compact as tools  # the build-time minifier and compact-form builder

SCRIPTS = ("train_gpt.py", "train_hydra.py", "train_manifold.py")


def packed_sizes(text):
    """{codec: bytes} of a source text under the compact form's back ends."""
    out = {"lzma": len(tools._compact_pack(text, "lzma"))}
    if tools.brotli is not None:
        out["brotli"] = len(tools._compact_pack(text, "brotli"))
    return out


def steps(source):
    """[(step, source bytes)] of the minified form built up one step at a time."""
    text = source.decode("utf-8")
    stripped = tools._Minifier(text, tools._docstring_starts(ast.parse(text))).run().encode()
    local = tools.rename_locals(source)
    local_text = local.decode("utf-8")
    local_min = tools._Minifier(local_text, tools._docstring_starts(ast.parse(local_text))).run()
    return [
        ("readable", source),
        ("comments, docstrings, blank lines, indents", stripped),
        ("+ local names shortened", local_min.encode()),
        ("+ module-level names shortened (minify_source)", tools.minify_source(source)),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "scripts": {}}
    for name in SCRIPTS:
        source = (REPO / name).read_bytes()
        rows = [
            {"step": step, "bytes": len(text), **packed_sizes(text)} for step, text in steps(source)
        ]
        t0 = time.perf_counter()
        compact = tools.compact_code(source, name)
        seconds = time.perf_counter() - t0
        report["scripts"][name] = {
            "steps": rows,
            "compact_bytes": len(compact),
            "compact_codec": "lzma" if tools.brotli is None else "brotli",
            "build_s": round(seconds, 2),
            "lossless_lzma_bytes": len(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)),
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"machine: {report['machine']}")
    for name, r in report["scripts"].items():
        print(
            f"\n{name}: compact form {r['compact_bytes']:,} bytes ({r['compact_codec']}, "
            f"built in {r['build_s']} s); the readable source LZMA'd losslessly: "
            f"{r['lossless_lzma_bytes']:,}"
        )
        print("| step | source bytes | brotli-11 | lzma-9e |")
        print("|---|---:|---:|---:|")
        for row in r["steps"]:
            brotli_bytes = f"{row['brotli']:,}" if "brotli" in row else "-"
            print(f"| {row['step']} | {row['bytes']:,} | {brotli_bytes} | {row['lzma']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
