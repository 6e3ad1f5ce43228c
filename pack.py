"""Size accounting, record folders and significance for Parameter Golf submissions.

  python pack.py size ARTIFACT [--script train_gpt.py] [--json]
  python pack.py record logs/run_s1.txt logs/run_s2.txt --name MyStack \
      --author "A. Person" --github-id aperson
  python pack.py check records/track_10min_16mb/2026-05-01_MyStack [--rescore \
      --data-path DIR --tokenizer-path MODEL]
  python pack.py significance --new logs/a.txt logs/b.txt \
      --baseline-values 1.2244,1.2250 --metric val_bpb

Counted size = artifact file bytes + script bytes, against 16,000,000 (decimal). The log parser
reads the baseline log family (`step:N/M ...`, `final_int8_zlib_roundtrip_exact ...`), the late
family (`N/M train_loss: ...`, `quantized_ttt val_loss:...`) and this harness's `summary: {json}`
line (preferred).

Record folders are tamper-evident: submission.json holds the sha256 of every other file in the
folder, and `check` verifies them (`--rescore` also re-scores each artifact with eval_bpb.py and
compares with its log). pack.py never runs code it was handed: it imports only this checkout's
training scripts, and only when the record's script is byte for byte one of them.

Exit status: 0 ok, 1 over budget / a check failed / a record refused, 2 bad input.
"""

import argparse
import glob
import hashlib
import json
import lzma
import math
import os
import py_compile
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

BUDGET_BYTES = 16_000_000
THRESHOLD_NATS = 0.005
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
RUN_ONLY_HPARAMS = ("run_id", "seed", "log_dir", "artifact_path")
SEPARATOR = "=" * 100
HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's training scripts: the only code pack.py imports, and only when a record's script
# is byte for byte one of them.
OUR_SCRIPTS = ("train_gpt.py", "train_hydra.py", "train_manifold.py")
# A name that stays inside its folder: letters, digits and . _ -, no separator, no leading dot.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# The largest file read whole as an official .ptz (the baseline's is ~16 MB; ours are streamed).
MAX_OFFICIAL_FILE_BYTES = 64 << 20
TIME_LIMIT_S = 600.0
RESCORE_TOLERANCE = 1e-6


class InputError(Exception):
    """Bad input (exit 2): a file that is missing, unreadable or not what it claims to be."""


class Refused(Exception):
    """A budget, audit or consistency rule says no (exit 1)."""


def _golf(module):
    """golf.<module> of this checkout, imported on first use (most of the package imports torch,
    which `pack.py --help` and the log parser do without). pack.py never imports a train_*.py."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import importlib

    return importlib.import_module(f"golf.{module}")


def sha256_file(path):
    return _golf("runtime").file_sha256(path)


def model_spec(script_name):
    """The registered ModelSpec of one of our scripts (golf.models), or None."""
    return _golf("models").registry().get(os.path.basename(script_name))


def is_plain_name(name):
    """True for a bare file or folder name that cannot leave its folder."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def plain_name(name, what):
    """name itself, or InputError naming `what` and the bad value."""
    if not is_plain_name(name):
        raise InputError(
            f"{what} {name!r}: not a plain name (letters, digits and . _ - only, "
            "no path separators, no leading dot)"
        )
    return name


def plain_date(date):
    """A YYYY-MM-DD date that exists, or InputError."""
    try:
        valid = bool(DATE.fullmatch(date)) and bool(time.strptime(date, "%Y-%m-%d"))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InputError(f"--date {date!r}: not a date of the form YYYY-MM-DD")
    return date


# -----------------------------------------------------------------------------
# ARTIFACTS
# -----------------------------------------------------------------------------
# pack.py recounts sizes from the files themselves, never from a run's log: our containers through
# golf.container (the reader the training run and eval_bpb.py use, which checks every header field,
# the header and payload sha256 and the inflated size); the official .ptz is only decompressed here,
# never unpickled.


def _inflate_official(data, limit=None):
    """An official .ptz's zlib stream, at most `limit` bytes (golf.container's
    OFFICIAL_MAX_RAW_BYTES, the bound eval_bpb.py applies; streamed: never grows past it)."""
    if limit is None:
        limit = _golf("container").OFFICIAL_MAX_RAW_BYTES
    out = zlib.decompressobj().decompress(data, limit + 1)
    if len(out) > limit:
        raise InputError(f"payload inflates beyond {limit} bytes")
    return out


def read_container(path):
    """{format, header, raw, overhead_bytes, file_bytes, groups}: raw is the decompressed payload
    (ours, read and checked by golf.container, the one reader every tool uses) or the raw
    torch.save bytes (official int8 .ptz, never unpickled here). InputError for anything else."""
    container = _golf("container")
    try:
        with open(path, "rb") as f:
            prefix = f.read(container.ARTIFACT_PREFIX.size)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    if prefix[: len(container.ARTIFACT_MAGIC)] == container.ARTIFACT_MAGIC:
        try:
            header, raw = container.read_artifact(path)  # checks the header, then the payload
        except ValueError as exc:
            raise InputError(str(exc)) from None
        version = container.ARTIFACT_PREFIX.unpack(prefix)[1]  # read_artifact checked it is whole
        offset = size - header["payload_bytes"]  # the payload runs to the end of the file
        return {
            "format": header.get("format", "pgolf-artifact"),
            "version": version,
            "header": header,
            "raw": raw,
            "overhead_bytes": offset,
            "file_bytes": size,
            "groups": container.group_table(header) or None,
        }
    if size > MAX_OFFICIAL_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes is not an artifact of this challenge")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        raw = _inflate_official(blob)
    except (zlib.error, InputError):
        raise InputError(
            f"{path}: neither a Parameter Golf artifact nor a zlib-compressed official .ptz"
        ) from None
    if not raw.startswith((b"PK", b"\x80")):
        raise InputError(f"{path}: zlib data that is not a torch.save payload")
    return {
        "format": "int8_clean_per_row_v1 (zlib .ptz)",
        "version": None,
        "header": None,
        "raw": raw,
        "overhead_bytes": 0,
        "file_bytes": len(blob),
        "groups": None,
    }


def compressor_table(raw):
    """Bytes each compressor makes of the same raw payload (brotli and zstd when installed)."""
    table = {"zlib-9": len(zlib.compress(raw, 9))}
    try:
        import zstandard

        table["zstd-22"] = len(zstandard.ZstdCompressor(level=22).compress(raw))
    except ImportError:
        pass
    table["lzma-9e"] = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    try:
        import brotli

        table["brotli-11"] = len(brotli.compress(raw, quality=11))
    except ImportError:
        pass
    return table


def text_utf8_bytes(code, where):
    """The UTF-8 bytes of a script's text as Python reads it (its coding declaration, else
    UTF-8): the count the official code makes, len(code.encode("utf-8")). The counted code is
    ours only when it equals the file's bytes (issue 24: a latin-1 file is smaller on disk)."""
    import io
    import tokenize

    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(code).readline)
        text = code.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise InputError(f"{where}: not readable as Python source text ({exc})") from None
    return len(text.encode("utf-8"))


def size_report(artifact, script, budget=BUDGET_BYTES, table=True):
    info = read_container(artifact)
    try:
        with open(script, "rb") as f:
            code = f.read()
    except OSError as exc:
        raise InputError(f"{script}: {exc.strerror or exc}") from None
    total = info["file_bytes"] + len(code)
    report = {
        "artifact": artifact,
        "format": info["format"],
        "artifact_bytes": info["file_bytes"],
        "script": script,
        "code_bytes": len(code),
        "code_bytes_utf8": text_utf8_bytes(code, script),
        "total_bytes": total,
        "budget_bytes": budget,
        "margin_bytes": budget - total,
        "over_budget": total > budget,
        "code_bytes_lzma_info_only": len(lzma.compress(code, preset=9 | lzma.PRESET_EXTREME)),
        "raw_payload_bytes": len(info["raw"]),
    }
    header = info["header"]
    if header is not None:
        report["compressor"] = header.get("compressor")
        report["header_bytes"] = info["overhead_bytes"]
        code_sha = hashlib.sha256(code).hexdigest()
        report["script_sha256_matches"] = code_sha == header.get("script_sha256")
        if "code_sha256" in header:  # the counted code is a compact form of the script
            report["counted_code_bytes"] = header.get("code_bytes")
            report["code_is_the_counted_form"] = code_sha == header["code_sha256"]
    if info["groups"]:
        report["groups"] = [
            {k: g[k] for k in ("name", "codec", "sorted", "raw_bytes", "bytes")}
            for g in info["groups"]
        ]
        report["pergroup_payload_bytes"] = sum(g["bytes"] for g in info["groups"])
    if table:
        report["compressors"] = {
            name: {"payload_bytes": n, "total_bytes": info["overhead_bytes"] + n + len(code)}
            for name, n in compressor_table(info["raw"]).items()
        }
    return report


# -----------------------------------------------------------------------------
# LOGS
# -----------------------------------------------------------------------------
# One parser for three families. Figures from our `summary:` line win; otherwise the final score is
# the most evolved exact line: TTT, then sliding window, then the int8 roundtrip (later labels
# follow). The eval modes and our labels come from the one registry, golf.modes.EVAL_MODES.

NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
PATTERNS = {
    "train": re.compile(
        rf"^step:(\d+)/(\d+) train_loss:({NUM}) train_time:({NUM})ms step_avg:({NUM})ms"
    ),
    "val": re.compile(rf"^step:(\d+)/(\d+) val_loss:({NUM}) val_bpb:({NUM}) train_time:({NUM})ms"),
    "late_train": re.compile(rf"^(\d+)/(\d+) train_loss: ?({NUM}) train_time: ?({NUM})(ms|m|s)\b"),
    "late_val": re.compile(rf"^(\d+)/(\d+) val_loss: ?({NUM}) val_bpb: ?({NUM})"),
    "stop": re.compile(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/(\d+)"),
    "params": re.compile(r"^model_params:(\d+)"),
    "serialized": re.compile(r"^Serialized model (\S+): (\d+) bytes"),
    "code": re.compile(r"^Code size: (\d+) bytes"),
    "code_compressed": re.compile(r"^Code size \(compressed\): (\d+) bytes"),
    "total": re.compile(r"^Total submission size (\S+): (\d+) bytes"),
    "exact": re.compile(rf"^(\S+)_exact val_loss:({NUM}) val_bpb:({NUM})"),
    "eval": re.compile(rf"^(.+?) val_loss:({NUM}) val_bpb:({NUM}) eval_time:({NUM})ms"),
    "audit": re.compile(r"^audit:(\S+) passed:(True|False)"),
    "invalid": re.compile(r"^score INVALID: ?(.*)"),
    "ledger": re.compile(r"^time_ledger: (\{.*\})\s*$"),
    "summary": re.compile(r"^summary: (\{.*\})\s*$"),
    "versions": re.compile(r"^versions: (.*)"),
    "hardware": re.compile(r"^hardware: (.*?)(?: world_size:(\d+).*)?$"),
    "total_eval": re.compile(rf"^total_eval_time: ?({NUM})s"),
    "seed": re.compile(r"^seed:(\d+)$"),
    "seed_in_name": re.compile(r"seed_?(\d+)"),
}


# How the standard eval's final label reads in the other log families: the baseline's
# `final_int8_zlib_roundtrip`, the late family's `quantized`.
STANDARD_LABEL_WORDS = ("roundtrip", "quantized")


def _evolved_modes():
    """The eval modes beyond standard, most evolved first (the registry lists plainest first)."""
    return [name for name in reversed(_golf("modes").EVAL_MODES) if name != "standard"]


def _final_label(labels):
    """The label that carries the final score: TTT, then sliding, then roundtrip/quantized, else
    the last. Pre-quantization evals never carry it."""
    for word in (*_evolved_modes(), *STANDARD_LABEL_WORDS):
        hits = [lb for lb in labels if word in lb and "pre-quant" not in lb]
        if hits:
            return hits[-1]
    return labels[-1] if labels else None


def eval_mode_of(label):
    """The eval mode whose score a final log label reports: ours by the registry's labels, the other
    families' (`quantized_ttt_phased`, `final_sliding_window_s64`) by the mode name in them."""
    modes = _golf("modes").EVAL_MODES
    for mode in modes.values():
        if label == mode.label:
            return mode.name
    for name in _evolved_modes():
        if name in (label or ""):
            return name
    return "standard"


def parse_log(path):
    """Figures of one training log as a dict (see the README of records/ for the fields)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    log = {
        "path": path,
        "family": "baseline",
        "source_sha256": None,
        "source_bytes": None,
        "hparams": {},
        "train": [],
        "val": [],
        "evals": {},
        "exact": {},
        "audits": {},
        "invalid": None,
        "summary": None,
        "time_ledger": None,
        "versions": {},
        "hardware": None,
        "world_size": None,
        "seed": None,
    }
    sep = re.search(rf"^{SEPARATOR}$", text, flags=re.MULTILINE)
    body = text
    if sep and sep.start() > 0:
        source = text[: sep.start() - 1].encode("utf-8")
        log["source_sha256"] = hashlib.sha256(source).hexdigest()
        log["source_bytes"] = len(source)
        body = text[sep.end() :]
    in_hparams = False
    for line in body.splitlines():
        if line == "Hyperparameters:":
            in_hparams = True
            continue
        if in_hparams:
            if line.startswith("  ") and ":" in line:
                key, _, value = line.strip().partition(":")
                log["hparams"][key] = value.strip()
                continue
            in_hparams = False
        _parse_line(log, line)
    if log["summary"]:
        _apply_summary(log)
    else:
        _final_from_lines(log)
    if log["seed"] is None:
        m = PATTERNS["seed_in_name"].search(os.path.basename(path))
        log["seed"] = int(m.group(1)) if m else None
    return log


def _parse_line(log, line):
    P = PATTERNS
    if m := P["train"].match(line):
        log["train"].append(
            {"step": int(m[1]), "train_loss": float(m[3]), "train_time_ms": float(m[4])}
        )
        log["iterations"] = int(m[2])
    elif m := P["val"].match(line):
        log["val"].append({"step": int(m[1]), "val_loss": float(m[3]), "val_bpb": float(m[4])})
    elif m := P["late_train"].match(line):
        scale = {"ms": 1.0, "s": 1000.0, "m": 60000.0}[m[5]]
        log["train"].append(
            {"step": int(m[1]), "train_loss": float(m[3]), "train_time_ms": float(m[4]) * scale}
        )
        log["iterations"] = int(m[2])
        log["family"] = "late"
    elif m := P["late_val"].match(line):
        log["val"].append({"step": int(m[1]), "val_loss": float(m[3]), "val_bpb": float(m[4])})
        log["family"] = "late"
    elif m := P["stop"].match(line):
        log["stopped_early"] = {"train_time_ms": int(m[1]), "step": int(m[2])}
    elif m := P["params"].match(line):
        log["model_params"] = int(m[1])
    elif m := P["serialized"].match(line):
        log["artifact_bytes"] = int(m[2])
        log["artifact_kind"] = m[1]
    elif m := P["code"].match(line):
        log["code_bytes_raw"] = int(m[1])
    elif m := P["code_compressed"].match(line):
        log["code_bytes_compressed"] = int(m[1])
        log["family"] = "late"
    elif m := P["total"].match(line):
        log["total_bytes"] = int(m[2])
    elif m := P["exact"].match(line):
        log["exact"][m[1]] = {"val_loss": float(m[2]), "val_bpb": float(m[3])}
    elif m := P["eval"].match(line):
        log["evals"][m[1]] = {
            "val_loss": float(m[2]),
            "val_bpb": float(m[3]),
            "eval_time_ms": float(m[4]),
        }
        if m[1].startswith("quantized"):
            log["family"] = "late"
    elif m := P["audit"].match(line):
        log["audits"][m[1]] = {"passed": m[2] == "True"}
    elif m := P["invalid"].match(line):
        log["invalid"] = m[1] or "INVALID"
    elif m := P["ledger"].match(line):
        log["time_ledger"] = _json_line(log, "time_ledger", m[1])
    elif m := P["summary"].match(line):
        log["summary"] = _json_line(log, "summary", m[1])
    elif m := P["versions"].match(line):
        words = m[1].split()
        log["versions"] = dict(zip(words[::2], words[1::2]))
    elif m := P["hardware"].match(line):
        log["hardware"] = m[1]
        log["world_size"] = int(m[2]) if m[2] else None
    elif m := P["total_eval"].match(line):
        log["total_eval_time_s"] = float(m[1])
    elif m := P["seed"].match(line):
        log["seed_line"] = int(m[1])


def _json_line(log, key, text):
    """The JSON object of a `key: {...}` line, or InputError naming the log."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{log['path']}: the {key} line is not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{log['path']}: the {key} line is not a JSON object")
    return obj


def _apply_summary(log):
    s = log["summary"]
    log["family"] = "ours"
    for key in (
        "run_id",
        "script",
        "preset",
        "valid",
        "artifact_path",
        "artifact_bytes",
        "code_bytes",
        "total_bytes",
        "budget_bytes",
        "eval_mode",
        "byte_source",
        "val_loss",
        "val_bpb",
        "tokens",
        "bytes",
        "eval_time_ms",
        "pre_quant_val_bpb",
        "roundtrip_val_bpb",
        "model_params",
        "seed",
        "world_size",
        "hardware",
        "steps",
        "train_time_ms",
        "step_avg_ms",
    ):
        if key in s:
            log[key] = s[key]
    log["time_ledger"] = s.get("time_ledger", log["time_ledger"])
    log["audits"] = {k: {"passed": bool(v.get("passed"))} for k, v in s.get("audits", {}).items()}
    log["final_label"] = "summary"


def _final_from_lines(log):
    """The final figures of a log without a summary line, from its eval, size and step lines."""
    exact = log["exact"]
    evals = log["evals"]
    label = _final_label(list(exact)) or _final_label(list(evals))
    final = exact.get(label) or evals.get(label) or {}
    log["final_label"] = label
    log["val_loss"] = final.get("val_loss")
    log["val_bpb"] = final.get("val_bpb")
    log["eval_mode"] = eval_mode_of(label)

    timed = evals.get(label) or evals.get(_final_label(list(evals))) or {}
    log["eval_time_ms"] = timed.get("eval_time_ms")
    if log.get("total_eval_time_s") is not None:
        log["eval_time_ms"] = 1000.0 * log["total_eval_time_s"]
    pre = [v for k, v in evals.items() if k.startswith("pre-quant")]
    log["pre_quant_val_bpb"] = pre[-1]["val_bpb"] if pre else None

    log["code_bytes"] = log.get("code_bytes_compressed", log.get("code_bytes_raw"))
    if (
        log.get("total_bytes") is None
        and log.get("artifact_bytes") is not None
        and log["code_bytes"] is not None
    ):
        log["total_bytes"] = log["artifact_bytes"] + log["code_bytes"]

    log["seed"] = (
        int(log["hparams"]["seed"])
        if log["hparams"].get("seed", "").isdigit()
        else log.get("seed_line")
    )
    # The last step line, unless the run logged where the wallclock cap stopped it.
    last = log.get("stopped_early") or (log["train"][-1] if log["train"] else None)
    if last is not None:
        log["steps"] = last["step"]
        log["train_time_ms"] = last["train_time_ms"]
        log["step_avg_ms"] = log["train_time_ms"] / max(log["steps"], 1)

    log["valid"] = (
        not log["invalid"]
        and all(a["passed"] for a in log["audits"].values())
        and (log.get("total_bytes") or 0) <= BUDGET_BYTES
    )
    log["tokens"] = None
    log["bytes"] = None


def tokens_per_byte(log):
    """tokens/bytes from the summary, else from the loss pair.

    val_bpb = val_loss / ln 2 x tokens/bytes.
    """
    if log.get("tokens") and log.get("bytes"):
        return log["tokens"] / log["bytes"]
    if log.get("val_loss") and log.get("val_bpb"):
        return log["val_bpb"] * math.log(2) / log["val_loss"]
    return None


def read_events(path):
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return events


# -----------------------------------------------------------------------------
# SIGNIFICANCE
# -----------------------------------------------------------------------------
# The record rule (docs/rules.md, Records and significance): at least 0.005 nats better at
# p < 0.01, one-sided Welch t-test of the new seeds against the old ones shifted by the threshold.
# In bpb the threshold is 0.005 x tokens/byte / ln 2.


def welch_significance(
    new, old, metric="val_loss", tpb=None, threshold_nats=THRESHOLD_NATS, alpha=0.01
):
    from scipy import stats

    if metric not in ("val_loss", "val_bpb"):
        raise InputError(f"metric must be val_loss or val_bpb, not {metric!r}")
    if metric == "val_bpb" and not tpb:
        raise InputError("val_bpb significance needs tokens per byte (from the new runs' logs)")
    threshold = threshold_nats if metric == "val_loss" else threshold_nats * tpb / math.log(2)
    if len(new) < 2 or len(old) < 2:
        raise InputError(
            "the Welch test needs at least 2 values on each side "
            f"(new {len(new)}, baseline {len(old)})"
        )
    res = stats.ttest_ind(
        list(new), [o - threshold for o in old], equal_var=False, alternative="less"
    )
    delta = statistics.fmean(old) - statistics.fmean(new)
    if metric == "val_loss":
        to_nats = 1.0
    elif tpb:
        to_nats = math.log(2) / tpb
    else:
        to_nats = float("nan")
    out = {
        "metric": metric,
        "n_new": len(new),
        "n_baseline": len(old),
        "mean_new": statistics.fmean(new),
        "mean_baseline": statistics.fmean(old),
        "improvement": delta,
        "improvement_nats": delta * to_nats,
        "threshold": threshold,
        "threshold_nats": threshold_nats,
        "t_statistic": float(res.statistic),
        "welch_df": float(getattr(res, "df", float("nan"))),
        "p_value": float(res.pvalue),
        "alpha": alpha,
        "baseline_values": list(old),
        "new_values": list(new),
    }
    if tpb:
        out["tokens_per_byte"] = tpb
        out["improvement_bpb"] = delta if metric == "val_bpb" else delta * tpb / math.log(2)
    out["significant"] = bool(out["p_value"] < alpha)
    return out


# The rule as the maintainers applied it to the recent records (PR #1902, #2146; issue #2148): a
# one-sided Welch test against the previous record's seeds at p < 0.25, with no margin. Both rules
# are reported side by side; `significant` (the README rule) is what a record must meet here.
APPLIED_ALPHA = 0.25


def significance_pair(new_logs, baseline_logs, baseline_values, metric):
    """{"readme": the README rule (0.005 nats, p < 0.01), "applied": the maintainers' rule
    (no margin, p < 0.25)}: one-sided Welch tests of the same values."""
    return {
        "readme": significance_from(new_logs, baseline_logs, baseline_values, metric),
        "applied": significance_from(
            new_logs, baseline_logs, baseline_values, metric, applied=True
        ),
    }


def baseline_of(args):
    """(baseline logs, baseline values, where they come from) of --against RECORD_DIR,
    --baseline LOG... or --baseline-values V,...; (None, None, None) without any."""
    if args.against:
        by_seed, source = record_values(args.against, args.metric)
        return None, list(by_seed.values()), source
    if args.baseline:
        return [parse_log(p) for p in args.baseline], None, f"{len(args.baseline)} baseline logs"
    if args.baseline_values:
        return None, parse_values(args.baseline_values), "--baseline-values"
    return None, None, None


MAX_SUBMISSION_BYTES = 1 << 20


def record_values(folder, metric="val_loss"):
    """({seed: value}, where they came from) of a record folder, ours or an official one: its
    submission.json's seed_results, else its train_seed*.log files. Read as data only (a JSON
    object of at most 1 MiB, logs through parse_log): nothing in the folder runs."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise InputError(f"--against {folder}: not a record folder")
    sub_path = os.path.join(folder, "submission.json")
    if os.path.isfile(sub_path):
        if os.path.getsize(sub_path) > MAX_SUBMISSION_BYTES:
            raise InputError(f"{sub_path}: over {MAX_SUBMISSION_BYTES} bytes")
        try:
            with open(sub_path, encoding="utf-8") as f:
                sub = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{sub_path}: not a JSON submission ({exc})") from None
        results = sub.get("seed_results") if isinstance(sub, dict) else None
        if isinstance(results, dict) and results:
            values = {}
            for seed, row in results.items():
                value = row.get(metric) if isinstance(row, dict) else None
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"{sub_path}: seed_results.{seed}.{metric} is not a number")
                if not math.isfinite(value):
                    raise InputError(f"{sub_path}: seed_results.{seed}.{metric} is not finite")
                values[str(seed)] = float(value)
            return values, f"{sub_path} (seed_results)"
    logs = sorted(glob.glob(os.path.join(folder, "train_seed*.log")))
    if not logs:
        raise InputError(f"--against {folder}: no submission.json seed_results, no train_seed*.log")
    values = {}
    for path in logs:
        log = parse_log(path)
        if log.get(metric) is None:
            raise InputError(f"{path}: no final {metric}")
        seed = os.path.basename(path).removeprefix("train_seed").removesuffix(".log")
        values[seed] = float(log[metric])
    return values, f"{len(logs)} train_seed*.log files in {folder}"


def significance_from(
    new_logs, baseline_logs=None, baseline_values=None, metric="val_loss", applied=False
):
    """The README's rule on the logs' final figures, or with `applied` the maintainers' one."""
    new = [lg[metric] for lg in new_logs]
    if any(v is None for v in new):
        raise InputError(f"a new log has no final {metric}")
    tpbs = [t for t in (tokens_per_byte(lg) for lg in new_logs) if t]
    tpb = statistics.fmean(tpbs) if tpbs else None
    if baseline_logs:
        old = [lg[metric] for lg in baseline_logs]
        if any(v is None for v in old):
            raise InputError(f"a baseline log has no final {metric}")
    else:
        old = list(baseline_values or [])
    if applied:
        return welch_significance(
            new, old, metric=metric, tpb=tpb, threshold_nats=0.0, alpha=APPLIED_ALPHA
        )
    return welch_significance(new, old, metric=metric, tpb=tpb)


def parse_values(text):
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(
            f"--baseline-values {text!r}: expected numbers separated by commas"
        ) from None


# -----------------------------------------------------------------------------
# RECORD FOLDERS
# -----------------------------------------------------------------------------
# `record` proves before it writes: every seed's artifact is the one its log measured, the shipped
# script is the one that wrote the artifacts (sha256 in their headers) and logged itself, the seeds
# share one config, and the compliance block holds only what the logs show. It writes into a temp
# folder and renames it. `check` recomputes the same facts from a finished folder, one check each.


def compliance_of(logs):
    """Each field True/False only where the logs prove it; None where they cannot."""

    def all_of(values):
        values = list(values)
        return None if not values or any(v is None for v in values) else all(values)

    on_8xh100 = [
        bool(lg.get("hardware") and "H100" in lg["hardware"] and lg.get("world_size") == 8)
        for lg in logs
    ]
    train_s = [_train_seconds(lg) for lg in logs]
    eval_s = [_eval_seconds(lg) for lg in logs]
    causality = [
        [a["passed"] for n, a in lg["audits"].items() if n.startswith("causality")] for lg in logs
    ]
    ttt = [str(lg.get("eval_mode") or "").startswith("ttt") for lg in logs]
    score_first = None
    if all(ttt):
        score_first = all(lg["audits"].get("score_first", {}).get("passed", False) for lg in logs)
    elif any(ttt):
        score_first = False
    return {
        "artifact_under_16mb": all_of(
            None if lg.get("total_bytes") is None else lg["total_bytes"] <= BUDGET_BYTES
            for lg in logs
        ),
        "training_under_600s": all_of(
            None if s is None else (s <= TIME_LIMIT_S and hw) for s, hw in zip(train_s, on_8xh100)
        ),
        "eval_under_600s": all_of(
            None if s is None else (s <= TIME_LIMIT_S and hw) for s, hw in zip(eval_s, on_8xh100)
        ),
        "score_first_ttt": score_first,
        "bytes_counted": _bytes_counted(logs),
        "causality_audit_passed": all_of(all(c) if c else None for c in causality),
        "no_val_data_in_training": None,
        "three_seeds": len(logs) >= 3,
    }


def _bytes_counted(logs):
    """ "tables" or "sidecar" when every seed counted its bytes the same way (with the same sidecar
    files), else None: the logs cannot say (older runs) or the seeds disagree."""
    sources = [lg.get("byte_source") for lg in logs]
    if not sources or any(s is None for s in sources) or any(s != sources[0] for s in sources):
        return None
    return sources[0]["kind"]


def _train_seconds(log):
    """The run's 600 s training clock in seconds, or None where the log does not show it.

    Our time ledger states it as `train_s` (precompute + train loop + GPTQ). Older ledgers hold only
    the parts; their GPTQ time was spelled `gptq_s` or `gptq_calib_s` (what the scripts wrote). Logs
    without a ledger give the train time of their last step line.
    """
    ledger = log.get("time_ledger") or {}
    if "train_s" in ledger:
        return _seconds(log, ledger, "train_s")
    if "train_loop_s" in ledger:
        gptq_key = "gptq_s" if "gptq_s" in ledger else "gptq_calib_s"
        parts = ("train_loop_s", "precompute_s", gptq_key)
        return sum(_seconds(log, ledger, key) or 0.0 for key in parts)
    if log.get("train_time_ms") is not None:
        return log["train_time_ms"] / 1000.0
    return None


def _seconds(log, ledger, key):
    """ledger[key] as a float (None when absent); InputError naming the log for anything else."""
    value = ledger.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{log['path']}: time_ledger {key} {value!r} is not a number")
    return float(value)


def _eval_seconds(log):
    """The run's 600 s eval clock in seconds: the ledger's `eval_s`, else the final eval's time."""
    ledger = log.get("time_ledger") or {}
    if "eval_s" in ledger:
        return _seconds(log, ledger, "eval_s")
    if log.get("eval_time_ms") is not None:
        return log["eval_time_ms"] / 1000.0
    return None


COMPLIANCE_NOTES = {
    "training_under_600s": (
        "time_ledger train_s (precompute + train loop + GPTQ) within 600 s on 8xH100 (world_size 8)"
    ),
    "eval_under_600s": "time_ledger eval_s (the final eval) within 600 s on 8xH100",
    "score_first_ttt": (
        "null when the eval mode is not TTT; true only if the score_first audit passed"
    ),
    "no_val_data_in_training": (
        "null: a log cannot prove it (the shipped script's loader reads fineweb_train_* only)"
    ),
    "bytes_counted": (
        "what counted the val bytes, the same for every seed: tables (SentencePiece lookup "
        "tables) or sidecar (original-byte files, their sha256 in each log and artifact); null "
        "when the logs predate the field or the seeds differ"
    ),
}


def problems_of(logs):
    """Why these logs cannot be a record.

    Over budget, a failed audit, a score marked INVALID, over 600 s of training or of eval (the
    time ledger's train_s and eval_s, the fields the scripts enforce), or not proven within time on
    8xH100.
    """
    out = []
    for lg in logs:
        name = os.path.basename(lg["path"])
        if lg.get("total_bytes") is not None and lg["total_bytes"] > BUDGET_BYTES:
            out.append(f"{name}: total {lg['total_bytes']} bytes is over the {BUDGET_BYTES} budget")
        for clock, seconds in (("train_s", _train_seconds(lg)), ("eval_s", _eval_seconds(lg))):
            if seconds is not None and not seconds <= TIME_LIMIT_S:
                out.append(
                    f"{name}: time_ledger {clock} {seconds:.1f} s is over the "
                    f"{TIME_LIMIT_S:.0f} s limit"
                )
        for audit, res in lg["audits"].items():
            if not res["passed"]:
                out.append(f"{name}: audit {audit} failed")
        if lg.get("summary", {}) and lg["summary"].get("val_truncated"):
            out.append(
                f"{name}: scored on a truncated val split (VAL_MAX_TOKENS), not an official score"
            )
        if lg.get("invalid"):
            out.append(f"{name}: score INVALID: {lg['invalid']}")
        elif lg.get("valid") is False and not any(not r["passed"] for r in lg["audits"].values()):
            out.append(f"{name}: the run marked its score invalid")
    hardware = sorted(
        {
            f"{lg.get('hardware')} (world_size {lg.get('world_size')})"
            for lg in logs
            if not (lg.get("hardware") and "H100" in lg["hardware"] and lg.get("world_size") == 8)
        }
    )
    if hardware:
        out.append(f"ran on {', '.join(hardware)}, not 8xH100, so the 600 s bounds are not proven")
    comp = compliance_of(logs)
    for key in ("training_under_600s", "eval_under_600s"):
        if comp[key] is None:
            out.append(f"{key} cannot be proven from these logs (no time figure)")
    return out


def _config_of(log):
    return {k: v for k, v in log["hparams"].items() if k not in RUN_ONLY_HPARAMS}


def check_same_config(logs):
    first = logs[0]
    for lg in logs[1:]:
        if lg["source_sha256"] != first["source_sha256"]:
            raise Refused(
                f"{lg['path']} was written by a different script than {first['path']} "
                "(logged source differs)"
            )
        ours = _config_of(first)
        theirs = _config_of(lg)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k}={ours.get(k)!r}/{theirs.get(k)!r}" for k in diff[:4])
            raise Refused(f"{lg['path']} and {first['path']} use different configs: {shown}")
    seeds = [lg["seed"] for lg in logs]
    if len(set(seeds)) != len(seeds):
        raise Refused(f"seeds repeat across the logs: {seeds}")


def _find_file(candidates):
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return None


def locate_artifact(log):
    path = log.get("artifact_path")
    here = os.path.dirname(os.path.abspath(log["path"]))
    stem = os.path.splitext(os.path.basename(log["path"]))[0]
    cands = [
        path,
        path and os.path.join(here, os.path.basename(path)),
        log.get("run_id") and os.path.join(here, f"{log['run_id']}.pga"),
        os.path.join(here, f"{stem}.pga"),
    ]
    return _find_file(cands)


def mean_std(values):
    """(mean, sample standard deviation); the deviation of one seed is None, not 0: one run says
    nothing of the spread (issue 25)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def env_lines(log, script_path):
    """Env assignments that reproduce the run, read from the log's `Hyperparameters:` block.

    PRESET and every hyperparameter that differs from the preset's defaults; every hyperparameter
    when the defaults are not known (the script is not one of this checkout's). The script itself
    is never executed.
    """
    hp = log["hparams"]
    defaults = preset_defaults(hp.get("preset"), script_path)
    env = {"PRESET": hp.get("preset")} if hp.get("preset") else {}
    for key, value in sorted(hp.items()):
        if key == "preset" or key in RUN_ONLY_HPARAMS or defaults.get(key) == value:
            continue
        env[key.upper()] = {"True": "1", "False": "0"}.get(value, value)
    return env


def our_script(script_path):
    """This checkout's copy of the training script at script_path when the two are byte for byte
    the same file (sha256), else None: the only scripts pack.py runs or has eval_bpb.py run."""
    name = os.path.basename(script_path)
    ours = os.path.join(HERE, name)
    if name not in OUR_SCRIPTS or not os.path.isfile(ours) or not os.path.isfile(script_path):
        return None
    if sha256_file(ours) != sha256_file(script_path):
        return None
    return ours


def preset_defaults(preset, script_path):
    """{hyperparameter: str(default)} of the preset, from this checkout's model (golf.models);
    {} when the record's script is not one of ours (it is not imported: pack.py runs no code it was
    handed)."""
    ours = our_script(script_path)
    if not preset or ours is None:
        return {}
    import dataclasses

    spec = model_spec(ours)
    try:
        base = spec.hyperparameters.from_env({"PRESET": preset})
    except ValueError:
        return {}
    return {k: str(v) for k, v in dataclasses.asdict(base).items()}


def plot_curves(runs, path):
    """Train loss and periodic val_bpb per seed from the JSONL events.

    False when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for seed, events in runs:
        train = [(e["step"], e["train_loss"]) for e in events if e.get("event") == "train"]
        val = [
            (e["step"], e["val_bpb"])
            for e in events
            if e.get("event") == "eval" and e.get("label") == "periodic"
        ]
        if train:
            ax1.plot(*zip(*train), label=f"seed {seed}")
        if val:
            ax2.plot(*zip(*val), marker="o", label=f"seed {seed}")
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="train loss")
    ax2.set(xlabel="step", ylabel="val_bpb", title="validation bpb (periodic)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_significance(readme, applied, path):
    """Each side's per-seed values (points) and mean (a bar), with the README rule's margin
    below the baseline mean, titled with both rules' p values (issue 25). False when matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    sides = (("baseline", readme["baseline_values"]), ("new", readme["new_values"]))
    for x, (label, values) in enumerate(sides):
        offsets = [x + 0.06 * (i - (len(values) - 1) / 2) for i in range(len(values))]
        ax.scatter(offsets, values, zorder=3, label=f"{label} seeds")
        mean = sum(values) / len(values)
        ax.hlines(mean, x - 0.25, x + 0.25, colors="black", linewidth=2, zorder=2)
    bar = readme["mean_baseline"] - readme["threshold"]
    ax.axhline(bar, color="red", linestyle="--", label=f"baseline mean - {readme['threshold']:.4g}")
    ax.set_xticks([0, 1], ["baseline", "new"])
    ax.set_ylabel(readme["metric"])
    ax.set_title(
        f"README rule p = {readme['p_value']:.3g} (alpha {readme['alpha']}); "
        f"applied p = {applied['p_value']:.3g} (alpha {applied['alpha']})",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_record(args):
    """(folder, submission) of a new record folder; InputError or Refused and nothing written
    otherwise. Every name that becomes a path is a plain name; the folder is built beside its
    final place and renamed into it at the end, or removed on any failure."""
    name = plain_name(args.name, "--name")
    date = plain_date(args.date) if args.date else time.strftime("%Y-%m-%d")
    logs = [parse_log(p) for p in args.logs]
    for lg in logs:
        _check_finished(lg)
    check_same_config(logs)
    artifacts = args.artifact or [locate_artifact(lg) for lg in logs]
    if len(artifacts) != len(logs):
        raise InputError(f"{len(artifacts)} --artifact paths for {len(logs)} logs")
    headers = []
    for lg, art in zip(logs, artifacts):
        if not art or not os.path.isfile(art):
            raise InputError(f"{lg['path']}: artifact not found (pass --artifact)")
        size = os.path.getsize(art)
        if lg.get("artifact_bytes") is not None and size != lg["artifact_bytes"]:
            raise Refused(
                f"{art}: {size} bytes, but {lg['path']} logged {lg['artifact_bytes']}: "
                "not that run's artifact"
            )
        plain_name(_artifact_name(lg["seed"], art), f"{art}: the artifact's file name")
        headers.append(read_container(art)["header"])
    script_name = (headers[0] or {}).get("script") or logs[0].get("script") or "train_gpt.py"
    plain_name(script_name, "the script name in the artifact header or log")
    script = args.script or _find_file(
        [
            os.path.join(os.path.dirname(os.path.abspath(logs[0]["path"])), "..", script_name),
            script_name,
        ]
    )
    if not script:
        raise InputError(f"script {script_name} not found (pass --script)")
    script_sha = sha256_file(script)
    for lg, head in zip(logs, headers):
        if lg["source_sha256"] and lg["source_sha256"] != script_sha:
            raise Refused(f"{script}: sha256 differs from the source logged in {lg['path']}")
        if head is not None and head.get("script_sha256") != script_sha:
            raise Refused(f"{script}: sha256 differs from the artifact header's script_sha256")
    problems = problems_of(logs)
    if problems and not args.non_record:
        raise Refused(
            "refusing to write a record: " + "; ".join(problems) + " (pass --non-record to file it "
            "as a non-record submission)"
        )
    sig = None
    base_logs, base_values, _ = baseline_of(args)
    if base_logs or base_values:
        sig = significance_pair(logs, base_logs, base_values, args.metric)
    track = TRACKS[1] if args.non_record else TRACKS[0]
    final = os.path.join(args.out, track, f"{date}_{name}")
    if os.path.lexists(final):
        raise InputError(f"{final} already exists")
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{date}_{name}.", dir=parent)
    except OSError as exc:
        raise InputError(
            f"{parent}: cannot create the record folder ({exc.strerror or exc})"
        ) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a record folder is for everyone
        sub = _write_record(
            tmp, args, logs, artifacts, script, script_name, track, date, problems, sig
        )
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(
            f"{final}: could not write the record ({exc.strerror or exc}); nothing was left behind"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, sub


def _check_finished(log):
    """InputError unless the log is a finished run of this harness: a `summary:` line with a final
    val_bpb and an integer seed (a killed run has neither, only its pre-quantization score)."""
    path = log["path"]
    if log["summary"] is None:
        raise InputError(
            f"{path}: no final `summary:` line: the run did not finish (killed or failed), "
            "so the log has no final score"
        )
    if log.get("val_bpb") is None:
        raise InputError(f"{path}: the summary has no val_bpb")
    seed = log.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"{path}: seed {seed!r} is not a non-negative integer")


def _artifact_name(seed, artifact):
    """The artifact's file name in a record folder: final_model_seed<N> plus its extension."""
    return f"final_model_seed{seed}{os.path.splitext(artifact)[1] or '.pga'}"


def record_hashes(folder):
    """{file name: sha256} of every file in the folder but submission.json, which holds them."""
    return {
        name: sha256_file(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name != "submission.json"
    }


def _write_record(folder, args, logs, artifacts, script, script_name, track, date, problems, sig):
    logs = sorted(zip(logs, artifacts), key=lambda p: p[0]["seed"])
    shutil.copyfile(script, os.path.join(folder, script_name))
    compact_name = _write_compact(folder, script, script_name, artifacts)
    code_bytes = os.path.getsize(os.path.join(folder, compact_name or script_name))
    seed_results = {}
    curves = []
    for lg, art in logs:
        seed = lg["seed"]
        shutil.copyfile(lg["path"], os.path.join(folder, f"train_seed{seed}.log"))
        events_path = os.path.splitext(lg["path"])[0] + ".jsonl"
        if os.path.isfile(events_path):
            shutil.copyfile(events_path, os.path.join(folder, f"train_seed{seed}.jsonl"))
            curves.append((seed, read_events(events_path)))
        art_name = _artifact_name(seed, art)
        shutil.copyfile(art, os.path.join(folder, art_name))
        seed_results[str(seed)] = {
            "val_loss": lg["val_loss"],
            "val_bpb": lg["val_bpb"],
            "artifact_bytes": os.path.getsize(art),
            "total_bytes": os.path.getsize(art) + code_bytes,
            "steps": lg.get("steps"),
            "step_avg_ms": lg.get("step_avg_ms"),
            "eval_time_s": None if lg.get("eval_time_ms") is None else lg["eval_time_ms"] / 1000.0,
            "pre_quant_val_bpb": lg.get("pre_quant_val_bpb"),
            "artifact": art_name,
            "artifact_sha256": sha256_file(art),
        }
    plain_logs = [lg for lg, _ in logs]
    bpb_mean, bpb_std = mean_std([lg["val_bpb"] for lg in plain_logs])
    loss_mean, _ = mean_std([lg["val_loss"] for lg in plain_logs])
    first = plain_logs[0]
    sub = {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": date,
        "track": track,
        "val_loss": loss_mean,
        "val_bpb": bpb_mean,
        "val_bpb_std": bpb_std,
        "bytes_total": max(r["total_bytes"] for r in seed_results.values()),
        "bytes_code": code_bytes,
        "script": script_name,
        **({"script_compact": compact_name} if compact_name else {}),
        "eval_mode": first.get("eval_mode"),
        "seeds": [lg["seed"] for lg in plain_logs],
        "seed_results": seed_results,
        "hardware": first.get("hardware"),
        "world_size": first.get("world_size"),
        "versions": first.get("versions") or {},
        "compliance": compliance_of(plain_logs),
        "compliance_notes": COMPLIANCE_NOTES,
        "non_record": bool(args.non_record),
        "non_record_reasons": problems,
    }
    if sig:
        readme = sig["readme"]
        sub.update(
            p_value=readme["p_value"],
            t_statistic=readme["t_statistic"],
            welch_df=readme["welch_df"],
            significance=readme,
            significance_applied=sig["applied"],
        )
    with open(os.path.join(folder, "requirements.txt"), "w", encoding="utf-8") as f:
        f.write(_requirements(first, artifacts, script))
    has_plot = plot_curves(curves, os.path.join(folder, "loss_curve.png")) if curves else False
    if sig:
        path = os.path.join(folder, "significance.png")
        sub["significance_plot"] = plot_significance(sig["readme"], sig["applied"], path)
    env = env_lines(first, script)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(sub, plain_logs, env, script_name, has_plot, track, date))
    # Last: the sha256 of every file written above, so that `check` can tell any later change.
    sub["sha256"] = record_hashes(folder)
    with open(os.path.join(folder, "submission.json"), "w", encoding="utf-8") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")
    return sub


# The packages a training script may import, by import name -> requirement name; pinned from this
# checkout's requirements.txt. torch, numpy and sentencepiece always (the loader, the model, the
# byte tables), zstandard (COMPRESSOR=auto can pick zstd) and tqdm (progress bars) likewise.
SCRIPT_PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "sentencepiece": "sentencepiece",
    "zstandard": "zstandard",
    "tqdm": "tqdm",
}


def checkout_pins(path=None):
    """{requirement name: pinned line} of this checkout's requirements.txt."""
    pins = {}
    with open(path or os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line and not line.startswith("-"):
                pins[line.split("==", 1)[0].strip().lower()] = line
    return pins


def _requirements(log, artifacts, script=None):
    """requirements.txt of a record folder: every package the script imports (and the ones it
    needs at run time: zstandard, tqdm), pinned as in this checkout's requirements.txt, with the
    versions the run logged as a comment when they differ."""
    pins = checkout_pins()
    source = ""
    if script and os.path.isfile(script):
        with open(script, encoding="utf-8") as f:
            source = f.read()
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", source, re.MULTILINE))
    names = [n for n in SCRIPT_PACKAGES if n in imported or n in ("torch", "numpy", "zstandard")]
    compressors = {(read_container(a)["header"] or {}).get("compressor") for a in artifacts}
    if "zstd" in compressors and "zstandard" not in names:
        names.append("zstandard")
    lines = [pins.get(SCRIPT_PACKAGES[n], SCRIPT_PACKAGES[n]) for n in names]
    vers = log.get("versions") or {}
    logged = [f"{k} {v}" for k, v in sorted(vers.items()) if k in ("torch", "numpy")]
    if logged:
        lines.insert(0, f"# the run logged: {', '.join(logged)}")
    return "\n".join(lines) + "\n"


def compact_name_of(script_name):
    return script_name.removesuffix(".py") + "_compact.py"


def _write_compact(folder, script, script_name, artifacts):
    """Under CODE_FORM=compact (the artifacts' headers give a code_sha256 that is not the
    script's): write the compact form (issue 15) beside the readable script and return its name.
    It must be the counted code every header binds."""
    wants = {(read_container(a)["header"] or {}).get("code_sha256") for a in artifacts}
    with open(script, "rb") as f:
        source = f.read()
    readable_sha = hashlib.sha256(source).hexdigest()
    if wants <= {None, readable_sha}:
        return None
    compact = _golf("compact").compact_code(source, script_name)
    if wants != {hashlib.sha256(compact).hexdigest()}:
        raise Refused(
            f"the artifacts bind counted code {sorted(w or '' for w in wants)} but the compact "
            f"form of {script_name} has sha256 {hashlib.sha256(compact).hexdigest()}"
        )
    name = compact_name_of(script_name)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(compact)
    return name


def _check_compact(folder, sub, script):
    """(problems, counted code bytes): a compact form named in submission.json must expand,
    without running, to exactly the minified form of the readable script, and bind its sha256."""
    name = sub.get("script_compact")
    if name is None:
        with open(script, "rb") as f:
            readable = f.read()
        return _check_counted_text(os.path.basename(script), readable), len(readable)
    path = os.path.join(folder, name)
    if not is_plain_name(name) or not os.path.isfile(path):
        return [f"missing the compact form {str(name)[:80]}"], os.path.getsize(script)
    with open(path, "rb") as f:
        blob = f.read()
    with open(script, "rb") as f:
        source = f.read()
    try:
        _golf("compact").check_compact(blob, source, os.path.basename(script))
    except ValueError as exc:
        return [f"{name}: {exc}"], len(blob)
    return _check_counted_text(name, blob), len(blob)


def _check_counted_text(name, blob):
    """The counted code's file bytes must be the UTF-8 bytes of its text (issue 24)."""
    try:
        utf8 = text_utf8_bytes(blob, name)
    except InputError as exc:
        return [str(exc)]
    if utf8 != len(blob):
        return [
            f"{name}: {len(blob)} bytes on disk but {utf8} UTF-8 bytes of text, the count the "
            "challenge makes"
        ]
    return []


def portable_env(env):
    """The env with absolute paths made relative to the repository root: from the last `data`
    component on (`/x/shared/data/shards/a` -> `data/shards/a`), else `data/datasets/<name>` for a
    folder and `data/tokenizers/<name>` for a file. Returns (env, names of the changed variables):
    a record's reproduce commands must not name the machine's temporary folders."""
    out = {}
    changed = []
    for key, value in env.items():
        text = str(value)
        if not os.path.isabs(text):
            out[key] = value
            continue
        parts = [p for p in text.replace("\\", "/").split("/") if p]
        if "data" in parts[:-1]:
            last = len(parts) - 1 - parts[::-1].index("data", 1)
            out[key] = "/".join(parts[last:])
        elif text.endswith(".model"):
            out[key] = f"data/tokenizers/{parts[-1]}"
        else:
            out[key] = f"data/datasets/{parts[-1]}"
        changed.append(key)
    return out, changed


def _readme(sub, logs, env, script_name, has_plot, track, date):
    folder = f"records/{track}/{date}_{sub['name']}"
    out = [f"# {sub['name']}", ""]
    if sub["non_record"]:
        out += [
            "> **NON-RECORD SUBMISSION.** This folder is not a record-track entry: "
            + ("; ".join(sub["non_record_reasons"]) or "filed as non-record by its author")
            + ".",
            "",
        ]
    out += [
        sub["blurb"] or "",
        "",
        (
            f"val_bpb **{sub['val_bpb']:.8f}** "
            f"(mean of {len(logs)} seed{'s' * (len(logs) > 1)}, std {_std_text(sub)}), "
            f"val_loss {sub['val_loss']:.8f}, eval mode `{sub['eval_mode']}`; "
            f"largest submission {sub['bytes_total']:,} bytes of {BUDGET_BYTES:,} "
            f"(code {sub['bytes_code']:,}). "
            f"Hardware: {sub['hardware']}, world size {sub['world_size']}."
        ),
        "",
        "## Results",
        "",
        (
            "| seed | val_loss | val_bpb | pre-quant val_bpb | artifact bytes | total bytes "
            "| steps | step_avg ms | eval s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in sub["seed_results"].items():
        pre = "" if r["pre_quant_val_bpb"] is None else f"{r['pre_quant_val_bpb']:.8f}"
        avg = "" if r["step_avg_ms"] is None else f"{r['step_avg_ms']:.2f}"
        ev = "" if r["eval_time_s"] is None else f"{r['eval_time_s']:.1f}"
        out.append(
            f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {pre} "
            f"| {r['artifact_bytes']:,} | {r['total_bytes']:,} | {r['steps']} | {avg} | {ev} |"
        )
    if has_plot:
        out += ["", "![loss curves](loss_curve.png)"]
    out += ["", "## Compliance (from the logs only)", "", "| check | value |", "|---|---|"]
    out += [f"| {k} | {json.dumps(v)} |" for k, v in sub["compliance"].items()]
    out += [
        "",
        "`null` means the logs cannot prove it: "
        + "; ".join(f"{k}: {v}" for k, v in sub["compliance_notes"].items())
        + ".",
    ]
    if "significance" in sub:
        s = sub["significance"]
        verdict = "significant" if s["significant"] else "not significant"
        out += [
            "",
            "## Significance",
            "",
            (
                f"One-sided Welch t-test on {s['metric']} "
                f"(new < baseline - {s['threshold']:.6g}, i.e. {s['threshold_nats']} nats): "
                f"t = {s['t_statistic']:.4f}, df = {s['welch_df']:.2f}, p = {s['p_value']:.3g} "
                f"({verdict} at p < {s['alpha']}); "
                f"improvement {s['improvement_nats']:.5f} nats."
            ),
        ]
    if sub.get("significance_plot"):
        out += ["", "![per-seed values of both sides](significance.png)"]
    if "significance_applied" in sub:
        a = sub["significance_applied"]
        verdict = "significant" if a["significant"] else "not significant"
        out += [
            "",
            (
                f"As the maintainers applied it to recent records (no margin, p < {a['alpha']}): "
                f"t = {a['t_statistic']:.4f}, df = {a['welch_df']:.2f}, p = {a['p_value']:.3g} "
                f"({verdict})."
            ),
        ]
    launch = (
        f"torchrun --standalone --nproc_per_node={sub['world_size']} {folder}/{script_name}"
        if (sub["world_size"] or 1) > 1 or "cpu" not in str(sub["hardware"])
        else f"python {folder}/{script_name}"
    )
    env, moved = portable_env(env)
    env_text = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    art = next(iter(sub["seed_results"].values()))["artifact"]
    out += [
        "",
        "## Reproduce",
        "",
        "From the repository root, with the data and tokenizer of the run in place:",
        "",
        *(
            [
                (
                    f"({', '.join(moved)}: relative to the repository root here; the run's own "
                    "paths are in its log's `Hyperparameters:` block.)"
                ),
                "",
            ]
            if moved
            else []
        ),
        "```bash",
        "pip install -r " + f"{folder}/requirements.txt",
    ]
    for seed in sub["seeds"]:
        out.append(f"RUN_ID=seed{seed} SEED={seed} {env_text} {launch}")
    out += [
        f"python eval_bpb.py {folder}/{art}   # re-score an artifact from this folder",
        f"python pack.py check {folder}        # sizes, hashes and figures against the logs",
        "```",
        "",
        "## Files",
        "",
        f"- `{script_name}`: the training script (its sha256 is in every artifact header)",
    ]
    if sub.get("script_compact"):
        out.append(
            f"- `{sub['script_compact']}`: its compact form, the counted code (bytes_code); "
            "it expands to exactly the readable script and runs it"
        )
    out += [
        "- `final_model_seed<N>.pga`: the artifacts",
        "- `train_seed<N>.log`, `train_seed<N>.jsonl`: the run logs",
        "- `submission.json`, `requirements.txt`"
        + (", `loss_curve.png`" if has_plot else "")
        + (", `significance.png`" if sub.get("significance_plot") else ""),
        "",
    ]
    return "\n".join(out)


def check_record(folder, rescore=None):
    """Problems found in a record folder (empty list: consistent).

    Each check below is one function returning its problems. The first ones stop the list early:
    what follows them reads submission.json's fields, the files they name and the script. With
    `rescore` ({data_path, tokenizer_path}, either None) each artifact is also re-scored by
    eval_bpb.py and compared with its log.
    """
    problems = _check_files_present(folder)
    if not os.path.isfile(os.path.join(folder, "submission.json")):
        return problems
    try:
        sub = _read_submission(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return problems + [f"submission.json is not JSON ({exc})"]
    if not isinstance(sub, dict):
        return problems + ["submission.json is not a JSON object"]
    problems += _check_submission_fields(sub)
    if problems:
        return problems
    problems += _check_names(sub)
    if problems:
        return problems
    problems += _check_hashes(folder, sub)

    logs, missing_logs = _read_seed_logs(folder, sub["seeds"])
    problems += missing_logs
    script = os.path.join(folder, sub.get("script", "train_gpt.py"))
    if not os.path.isfile(script):
        return problems + [f"missing the script {os.path.basename(script)}"]
    problems += _check_script_compiles(script)
    script_sha = sha256_file(script)
    compact_problems, code_bytes = _check_compact(folder, sub, script)
    problems += compact_problems
    problems += _check_code_bytes(sub, code_bytes)
    for seed in sub["seeds"]:
        problems += _check_seed(folder, sub, seed, logs.get(seed), script_sha)

    if logs and len(logs) == len(sub["seeds"]):
        seed_logs = [logs[seed] for seed in sub["seeds"]]
        problems += _check_means(sub, seed_logs)
        problems += _check_compliance(sub, seed_logs)
        problems += _check_record_track(sub, seed_logs)
        problems += _check_significance(sub, seed_logs)
    problems += _check_bytes_total(folder, sub, code_bytes)
    problems += _check_track(folder, sub)
    if rescore is not None:
        problems += rescore_record(folder, sub, logs, **rescore)
    return problems


SUBMISSION_FIELDS = (
    "author",
    "github_id",
    "name",
    "date",
    "val_bpb",
    "val_loss",
    "bytes_total",
    "bytes_code",
    "seeds",
    "seed_results",
    "track",
)


def _check_files_present(folder):
    return [
        f"missing {name}"
        for name in ("README.md", "submission.json")
        if not os.path.isfile(os.path.join(folder, name))
    ]


def _read_submission(folder):
    with open(os.path.join(folder, "submission.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_submission_fields(sub):
    return [f"submission.json lacks {key}" for key in SUBMISSION_FIELDS if key not in sub]


def _check_names(sub):
    """The seeds are integers and every file name submission.json gives is a plain name, so that
    nothing below reads outside the folder."""
    seeds = sub["seeds"]
    if not isinstance(seeds, list) or not all(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in seeds
    ):
        return [f"seeds {seeds!r} is not a list of non-negative integers"]
    if not isinstance(sub["seed_results"], dict) or not all(
        isinstance(r, dict) for r in sub["seed_results"].values()
    ):
        return ["seed_results is not an object of per-seed objects"]
    problems = []
    script = sub.get("script", "train_gpt.py")
    if not is_plain_name(script):
        problems.append(f"script {script!r} is not a plain file name in the folder")
    for seed, result in sub["seed_results"].items():
        art = result.get("artifact")
        if art is not None and not is_plain_name(art):
            problems.append(f"seed {seed}: artifact {art!r} is not a plain file name in the folder")
    return problems


def _check_hashes(folder, sub):
    """Every file of the folder but submission.json has the sha256 submission.json gives it: a
    changed, missing or extra file is a problem naming it."""
    table = sub.get("sha256")
    if not isinstance(table, dict) or not table:
        why = "its files cannot be verified (remake the folder with pack.py record)"
        return [f"submission.json has no sha256 table, so {why}"]
    problems = []
    for name, want in sorted(table.items()):
        path = os.path.join(folder, name)
        if not is_plain_name(name):
            problems.append(f"the sha256 table names {name!r}, not a plain file name")
        elif os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            problems.append(f"{name}: not a regular file")
        elif not os.path.isfile(path):
            problems.append(f"{name}: missing (submission.json's sha256 table lists it)")
        elif sha256_file(path) != want:
            problems.append(
                f"{name}: sha256 differs from submission.json (changed after recording)"
            )
    extra = sorted(set(os.listdir(folder)) - set(table) - {"submission.json"})
    problems += [f"{name}: extra file, not in submission.json's sha256 table" for name in extra]
    return problems


def _read_seed_logs(folder, seeds):
    """({seed: parsed log}, problems) for the train_seed<N>.log of each seed."""
    logs = {}
    problems = []
    for seed in seeds:
        path = os.path.join(folder, f"train_seed{seed}.log")
        if not os.path.isfile(path):
            problems.append(f"missing train_seed{seed}.log")
            continue
        try:
            log = parse_log(path)
        except InputError as exc:
            problems.append(str(exc))
            continue
        if log["summary"] is None:
            problems.append(
                f"train_seed{seed}.log has no final `summary:` line (an unfinished run)"
            )
        logs[seed] = log
    return logs, problems


def _check_script_compiles(script):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            py_compile.compile(script, cfile=os.path.join(tmp, "check.pyc"), doraise=True)
        except py_compile.PyCompileError as exc:
            last_line = exc.msg.strip().splitlines()[-1]
            return [f"{os.path.basename(script)} does not compile: {last_line}"]
    return []


def _check_code_bytes(sub, code_bytes):
    if sub["bytes_code"] != code_bytes:
        return [f"bytes_code {sub['bytes_code']} but the script has {code_bytes} bytes"]
    return []


def _seed_artifact(folder, seed, result):
    return os.path.join(folder, result.get("artifact") or f"final_model_seed{seed}.pga")


def _check_seed(folder, sub, seed, log, script_sha):
    """One seed's entry in seed_results against its artifact file and its log."""
    result = sub["seed_results"].get(str(seed))
    if result is None:
        return [f"seed_results lacks seed {seed}"]
    art = _seed_artifact(folder, seed, result)
    if not os.path.isfile(art):
        return [f"seed {seed}: missing artifact {os.path.basename(art)}"]
    problems = _check_artifact(seed, art, result, script_sha)
    if log is not None:
        problems += _check_seed_log(seed, log, result, os.path.getsize(art), script_sha)
        problems += _check_byte_source(seed, art, log)
    return problems


def _check_byte_source(seed, art, log):
    """What counted the seed's bytes (issue 24): the log's summary and the artifact header must
    name the same source (the tables, or the same sidecar files). Logs and artifacts from before
    the field are reported by the compliance block (bytes_counted: null), not here."""
    try:
        header = read_container(art)["header"] or {}
    except InputError:
        return []  # _check_artifact reports it
    logged = log.get("byte_source")
    stored = header.get("byte_source")
    if logged is None or stored is None:
        return []
    if logged != stored:
        return [
            f"seed {seed}: the log counted bytes with {logged}, the artifact header says {stored}"
        ]
    return []


def _check_artifact(seed, art, result, script_sha):
    """The artifact file against its seed_results entry and the script's sha256."""
    problems = []
    name = os.path.basename(art)
    size = os.path.getsize(art)
    if result.get("artifact_sha256") and sha256_file(art) != result["artifact_sha256"]:
        problems.append(f"seed {seed}: {name} sha256 differs from submission.json")
    if result.get("artifact_bytes") != size:
        problems.append(
            f"seed {seed}: artifact_bytes {result.get('artifact_bytes')} but the file has {size}"
        )
    try:
        header = read_container(art)["header"]
    except InputError as exc:
        problems.append(f"seed {seed}: {exc}")
        header = None
    if header is not None and header.get("script_sha256") != script_sha:
        problems.append(f"seed {seed}: the script's sha256 does not match {name}'s header")
    return problems


def _check_seed_log(seed, log, result, size, script_sha):
    """The seed's log against the artifact size, the script and the submitted scores."""
    problems = []
    if log.get("artifact_bytes") is not None and log["artifact_bytes"] != size:
        problems.append(
            f"seed {seed}: the log measured a {log['artifact_bytes']}-byte artifact, "
            f"the file has {size}"
        )
    if log["source_sha256"] and log["source_sha256"] != script_sha:
        problems.append(f"seed {seed}: the script differs from the source in train_seed{seed}.log")
    for key in ("val_bpb", "val_loss"):
        if log.get(key) is None or not _close(result.get(key), log[key]):
            problems.append(
                f"seed {seed}: {key} {result.get(key)} in submission.json, "
                f"{log.get(key)} in the log"
            )
    return problems


def _std_text(sub):
    std = sub["val_bpb_std"]
    return "n/a (one seed)" if std is None else f"{std:.8f}"


def _check_means(sub, logs):
    bpb_mean, bpb_std = mean_std([lg["val_bpb"] for lg in logs])
    loss_mean, _ = mean_std([lg["val_loss"] for lg in logs])
    problems = []
    for key, want in (("val_bpb", bpb_mean), ("val_bpb_std", bpb_std), ("val_loss", loss_mean)):
        if want is None and sub.get(key) is None:
            continue  # the deviation of one seed
        if not _close(sub.get(key), want):
            problems.append(f"{key} {sub.get(key)} but the logs give {want}")
    return problems


def _check_compliance(sub, logs):
    comp = compliance_of(logs)
    if "compliance" not in sub or sub["compliance"] == comp:
        return []
    diff = [k for k in comp if sub["compliance"].get(k) != comp[k]]
    return [f"compliance differs from the logs at {', '.join(diff) or 'extra keys'}"]


def _check_record_track(sub, logs):
    """A folder on the record track must meet every record rule (problems_of)."""
    if sub["track"] != TRACKS[0]:
        return []
    return [f"record track: {p}" for p in problems_of(logs)]


def _check_significance(sub, logs):
    problems = []
    s = sub.get("significance")
    if not s:
        return []
    redo = significance_from(logs, baseline_values=s["baseline_values"], metric=s["metric"])
    if not (_close(redo["p_value"], s["p_value"]) and _close(sub.get("p_value"), redo["p_value"])):
        problems.append(f"p_value {sub.get('p_value')} but the logs give {redo['p_value']}")
    a = sub.get("significance_applied")
    if a:
        redo = significance_from(
            logs, baseline_values=a["baseline_values"], metric=a["metric"], applied=True
        )
        if not _close(redo["p_value"], a["p_value"]):
            problems.append(
                f"significance_applied p_value {a['p_value']} but the logs give {redo['p_value']}"
            )
    return problems


def _check_bytes_total(folder, sub, code_bytes):
    """bytes_total is the largest artifact + script among the seeds whose artifact is present."""
    totals = []
    for seed in sub["seeds"]:
        result = sub["seed_results"].get(str(seed))
        if result is None:
            continue
        art = _seed_artifact(folder, seed, result)
        if os.path.isfile(art):
            totals.append(os.path.getsize(art) + code_bytes)
    if totals and sub["bytes_total"] != max(totals):
        return [f"bytes_total {sub['bytes_total']} but the files give {max(totals)}"]
    return []


def _check_track(folder, sub):
    problems = []
    if sub["track"] not in TRACKS:
        problems.append(f"unknown track {sub['track']!r}")
    parent = os.path.basename(os.path.dirname(os.path.abspath(folder)))
    if parent in TRACKS and parent != sub["track"]:
        problems.append(f"the folder sits in {parent} but submission.json says {sub['track']}")
    return problems


def rescore_record(folder, sub, logs, data_path=None, tokenizer_path=None, figures=None):
    """Each seed's artifact re-scored by this checkout's eval_bpb.py (a subprocess) against the
    val_bpb of its log, within RESCORE_TOLERANCE.

    Only this checkout's copy of the record's script runs (passed to eval_bpb.py as --script); a
    record whose script is not byte for byte one of ours is not re-scored here. Each seed's
    progress goes to stderr as it starts (a re-score takes minutes), and what was compared is
    appended to `figures` ({seed, logged_val_bpb, rescored_val_bpb, difference, ok}).
    """
    script_name = sub.get("script", "train_gpt.py")
    ours = our_script(os.path.join(folder, script_name))
    if ours is None:
        why = "pack.py runs only this checkout's scripts (eval_bpb.py --trust-script runs another)"
        return [f"not re-scored: {script_name} is not this checkout's {script_name}; {why}"]
    flags = []
    if data_path:
        flags += ["--data-path", os.path.abspath(data_path)]
    if tokenizer_path:
        flags += ["--tokenizer-path", os.path.abspath(tokenizer_path)]
    problems = []
    for seed in sub["seeds"]:
        result = sub["seed_results"].get(str(seed))
        log = logs.get(seed)
        if result is None or log is None or log.get("val_bpb") is None:
            continue  # already a problem of the plain check
        art = _seed_artifact(folder, seed, result)
        if os.path.isfile(art):
            print(
                f"rescore: seed {seed} ({os.path.basename(art)}): eval_bpb.py is running...",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.perf_counter()
            found = _rescore_one(seed, art, ours, flags, log["val_bpb"], figures)
            print(
                f"rescore: seed {seed} done in {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            problems += found
    return problems


def _rescore_one(seed, art, script, flags, logged, figures=None):
    """Problems of one artifact's re-score: eval_bpb.py refused it, an audit failed, or its val_bpb
    is not the logged one."""
    name = os.path.basename(art)
    cmd = [sys.executable, os.path.join(HERE, "eval_bpb.py"), art, "--script", script, "--json"]
    proc = subprocess.run(
        cmd + flags, env=_rescore_env(), capture_output=True, text=True, check=False
    )
    last_err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode not in (0, 3):
        return [f"seed {seed}: eval_bpb.py could not re-score {name}: {last_err}"]
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        return [f"seed {seed}: eval_bpb.py printed no JSON result for {name}"]
    problems = []
    if proc.returncode == 3 or not out.get("valid"):
        problems.append(f"seed {seed}: re-scored {name} is INVALID ({last_err})")
    got = out.get("val_bpb")
    number = isinstance(got, (int, float))
    if figures is not None:
        figures.append(
            {
                "seed": seed,
                "logged_val_bpb": logged,
                "rescored_val_bpb": got,
                "difference": got - logged if number else None,
                "ok": number and abs(got - logged) <= RESCORE_TOLERANCE,
            }
        )
    if not number or not abs(got - logged) <= RESCORE_TOLERANCE:
        problems.append(
            f"seed {seed}: {name} re-scores to val_bpb {got} but train_seed{seed}.log "
            f"says {logged} (tolerance {RESCORE_TOLERANCE})"
        )
    return problems


def _rescore_env():
    """The environment without the variables that would change the eval (every hyperparameter,
    PRESET) or make it distributed: the re-score uses the artifact's own settings."""
    import dataclasses

    names = {
        f.name.upper()
        for spec in _golf("models").registry().values()
        for f in dataclasses.fields(spec.hyperparameters)
    }
    names |= {"PRESET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _close(a, b, tol=1e-9):
    return (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and abs(a - b) <= tol * max(1.0, abs(b))
    )


# -----------------------------------------------------------------------------
# COMMAND LINE
# -----------------------------------------------------------------------------


def _emit(obj, as_json, keys=None):
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
        return
    for k in keys or obj:
        if k in obj and not isinstance(obj[k], (dict, list)):
            print(f"{k}: {obj[k]}")


def script_of(artifact):
    """The counted script of our artifact when --script is not given (issue 25), found by the
    sha256 the header binds: the compact form (`<script>_compact.py`) or the readable script
    beside the artifact (a record folder), else this checkout's script of that name. InputError
    when none is the one the header names."""
    header = read_container(artifact)["header"]
    if header is None:
        raise InputError(f"{artifact}: an official .ptz names no script: pass --script")
    name = header["script"]
    here = os.path.dirname(os.path.abspath(artifact))
    wanted = {header["script_sha256"], header.get("code_sha256")}
    for path in (
        os.path.join(here, compact_name_of(name)),
        os.path.join(here, name),
        os.path.join(HERE, name),
    ):
        if os.path.isfile(path) and sha256_file(path) in wanted:
            return path
    raise InputError(
        f"{artifact}: no {name} with the sha256 its header binds beside it or in this checkout: "
        "pass --script"
    )


def cmd_size(args):
    script = args.script or script_of(args.artifact)
    rep = size_report(args.artifact, script, budget=args.budget, table=not args.no_table)
    if args.json:
        _emit(rep, True)
    else:
        _emit(
            rep,
            False,
            [
                "artifact",
                "format",
                "artifact_bytes",
                "script",
                "code_bytes",
                "code_bytes_utf8",
                "total_bytes",
                "budget_bytes",
                "margin_bytes",
                "over_budget",
                "compressor",
                "header_bytes",
                "script_sha256_matches",
                "counted_code_bytes",
                "code_is_the_counted_form",
                "raw_payload_bytes",
                "pergroup_payload_bytes",
                "code_bytes_lzma_info_only",
            ],
        )
        for name, row in rep.get("compressors", {}).items():
            print(
                f"compressor {name}: payload {row['payload_bytes']} bytes, "
                f"total {row['total_bytes']} bytes"
            )
        for g in rep.get("groups", []):
            print(
                f"group {g['name']}: {g['codec']}{' sorted' if g['sorted'] else ''}, "
                f"{g['raw_bytes']} raw -> {g['bytes']} bytes"
            )
    if rep["code_bytes_utf8"] != rep["code_bytes"]:
        print(
            f"error: {rep['script']} is {rep['code_bytes']} bytes on disk but its text is "
            f"{rep['code_bytes_utf8']} UTF-8 bytes, the count the challenge makes: write it in "
            "ASCII or UTF-8",
            file=sys.stderr,
        )
        return 1
    if rep["over_budget"]:
        print(
            f"error: total {rep['total_bytes']} bytes is over the {rep['budget_bytes']} budget",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_record(args):
    folder, sub = build_record(args)
    out = {
        "record": folder,
        "track": sub["track"],
        "val_bpb": sub["val_bpb"],
        "val_bpb_std": sub["val_bpb_std"],
        "bytes_total": sub["bytes_total"],
        "seeds": sub["seeds"],
        "non_record": sub["non_record"],
    }
    if "p_value" in sub:
        out["p_value"] = sub["p_value"]
    _emit(out, args.json)
    return 0


def cmd_check(args):
    if not os.path.isdir(args.folder):
        raise InputError(f"{args.folder}: not a folder")
    if (args.data_path or args.tokenizer_path) and not args.rescore:
        raise InputError("--data-path and --tokenizer-path are for --rescore")
    for flag, path in (("--data-path", args.data_path), ("--tokenizer-path", args.tokenizer_path)):
        if path and not os.path.exists(path):
            raise InputError(f"{flag} {path}: no such file or folder")
    rescore = None
    figures = []
    if args.rescore:
        rescore = {
            "data_path": args.data_path,
            "tokenizer_path": args.tokenizer_path,
            "figures": figures,
        }
    problems = check_record(args.folder, rescore)
    if args.json:
        out = {"folder": args.folder, "ok": not problems, "problems": problems}
        if args.rescore:
            out["rescored"] = figures
        _emit(out, True)
    else:
        for f in figures:
            verdict = "same" if f["ok"] else "DIFFERS"
            print(
                f"rescore: seed {f['seed']}: val_bpb logged {f['logged_val_bpb']:.8f}, "
                f"re-scored {f['rescored_val_bpb']}, difference {f['difference']} "
                f"(tolerance {RESCORE_TOLERANCE}): {verdict}"
            )
        for p in problems:
            print(f"problem: {p}")
        print(f"ok: {not problems}")
    return 1 if problems else 0


def cmd_significance(args):
    base_logs, base_values, source = baseline_of(args)
    rules = significance_pair([parse_log(p) for p in args.new], base_logs, base_values, args.metric)
    res = {**rules["readme"], "baseline_source": source}
    for key in ("threshold", "alpha", "t_statistic", "welch_df", "p_value", "significant"):
        res[f"applied_{key}"] = rules["applied"][key]
    if args.json:
        _emit(res, True)
        return 0
    keys = ["metric", "baseline_source", "n_new", "n_baseline", "mean_new", "mean_baseline"]
    keys += ["improvement", "improvement_nats", "tokens_per_byte", "threshold", "threshold_nats"]
    keys += ["t_statistic", "welch_df", "p_value", "significant", "applied_p_value"]
    keys += ["applied_significant"]
    _emit(res, False, keys)
    print(f"new values:      {', '.join(f'{v:.8f}' for v in res['new_values'])}")
    print(f"baseline values: {', '.join(f'{v:.8f}' for v in res['baseline_values'])}")
    print(f"{'rule':<34}{'margin':>16}{'alpha':>7}{'t':>10}{'df':>8}{'p':>10}  verdict")
    for name, label in (
        ("readme", "README: 0.005 nats, p < 0.01"),
        ("applied", "applied: Welch, p < 0.25"),
    ):
        r = rules[name]
        margin = f"{r['threshold']:.6f} {args.metric}"
        verdict = "significant" if r["significant"] else "not significant"
        print(
            f"{label:<34}{margin:>16}{r['alpha']:>7}{r['t_statistic']:>10.3f}"
            f"{r['welch_df']:>8.2f}{r['p_value']:>10.4f}  {verdict}"
        )
    return 0


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("size", help="counted size of an artifact + script against the budget")
    s.add_argument("artifact", help="our .pga artifact or an official final_model.int8.ptz")
    s.add_argument(
        "--script",
        help="the counted script (default: the one the header names, found by its sha256 beside "
        "the artifact or in this checkout)",
    )
    s.add_argument(
        "--budget", type=int, default=BUDGET_BYTES, help="byte budget (default 16,000,000)"
    )
    s.add_argument(
        "--no-table",
        action="store_true",
        help="skip the per-compressor table (slow on full models)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_size)

    r = sub.add_parser("record", help="assemble records/<track>/<date>_<name>/ from run logs")
    r.add_argument("logs", nargs="+", help="text logs logs/<RUN_ID>.txt, one per seed")
    r.add_argument(
        "--artifact", action="append", help="artifact of each log, in order (default: from the log)"
    )
    r.add_argument(
        "--script", help="training script (default: the one the artifacts name, beside logs/)"
    )
    r.add_argument(
        "--name",
        required=True,
        help="short description, becomes <date>_<name> (letters, digits and . _ -)",
    )
    r.add_argument("--author", required=True, help="author's name")
    r.add_argument("--github-id", required=True, help="author's GitHub id")
    r.add_argument("--blurb", default="", help="one paragraph on what is new")
    r.add_argument("--date", help="YYYY-MM-DD (default today)")
    r.add_argument("--out", default="records", help="records root (default records)")
    r.add_argument(
        "--non-record",
        action="store_true",
        help="file under track_non_record_16mb even if over budget, invalid or not 8xH100-timed",
    )
    rb = r.add_mutually_exclusive_group()
    rb.add_argument("--baseline", nargs="+", help="baseline logs for the significance test")
    rb.add_argument("--baseline-values", help="baseline scores, comma separated, instead of logs")
    rb.add_argument(
        "--against",
        metavar="RECORD_DIR",
        help="the record folder to test against (its seed_results or train_seed*.log), instead",
    )
    r.add_argument(
        "--metric", default="val_loss", choices=("val_loss", "val_bpb"), help="metric to test"
    )
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_record)

    c = sub.add_parser("check", help="validate a record folder against its logs and files")
    c.add_argument("folder", help="records/<track>/<date>_<name>")
    c.add_argument(
        "--rescore",
        action="store_true",
        help="also re-score each artifact with eval_bpb.py and compare with its log's val_bpb "
        "(runs only this checkout's copy of the record's script)",
    )
    c.add_argument("--data-path", help="with --rescore: the val shards (default: the run's)")
    c.add_argument("--tokenizer-path", help="with --rescore: the tokenizer (default: the run's)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_check)

    g = sub.add_parser(
        "significance",
        help="one-sided Welch t-tests: the README's rule (0.005 nats, p < 0.01) and the one the "
        "maintainers applied (p < 0.25), side by side",
    )
    g.add_argument("--new", nargs="+", required=True, help="logs of the new runs (one per seed)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--against",
        metavar="RECORD_DIR",
        help="a record folder (ours or official): its submission.json seed_results, else its "
        "train_seed*.log files; read as data, nothing in it runs",
    )
    src.add_argument("--baseline", nargs="+", help="logs of the baseline runs")
    src.add_argument(
        "--baseline-values", help="baseline scores, comma separated (in --metric units)"
    )
    g.add_argument(
        "--metric", default="val_loss", choices=("val_loss", "val_bpb"), help="metric to test"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_significance)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
