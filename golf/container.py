"""The artifact container, the one implementation every tool uses: writing, reading and checking
an artifact (every header field before anything is allocated), the counted code, and loading the
dequantized model through the model's ModelSpec.
"""

import dataclasses
import hashlib
import json
import math
import os
import struct

import numpy as np
import torch

from golf.codec import (
    ARTIFACT_MAX_RANK,
    ARTIFACT_MAX_RAW_BYTES,
    ARTIFACT_MAX_TENSORS,
    ARTIFACT_VERSION_PACKED_HEADER,
    COMPRESSORS,
    MAX_HEADER_BYTES,
    PERGROUP_AUTO_MIN_RAW,
    _check_groups,
    _is_count,
    _pack_head,
    _sortable,
    _unpack_head,
    compress_payload,
    compress_pergroup,
    decompress_pergroup,
    payload_groups,
)
from golf.contract import model_for_script, model_hook
from golf.quant import (
    ARTIFACT_DTYPES,
    ENTRY_PARTS,
    LQER_MAX_GROUP,
    LQER_MAX_RANK,
    QuantScheme,
    _fixed_bytes,
    dequantize_entries,
    plan_bits,
    quantize_state_dict,
    width_table,
)
from golf.runtime import Progress, file_sha256, sha256_hex, write_bytes_atomic

try:
    import zstandard
except ImportError:  # zstd is optional: zlib and lzma are in the standard library
    zstandard = None


# Quantization and the artifact container. Large 2-D tensors are stored as per-row symmetric int-k
# (k = 4..8) with fp16 scales (Triton kernels on GPU, the same maths in torch as reference and CPU
# path), small tensors as fp16, control tensors as fp32. Clips: CLIP_METHOD; GPTQ where a
# calibration Hessian is given; late QAT through a straight-through fake quant; BIT_ALLOC fits
# per-tensor widths to the byte budget. The container is ours: magic, version, a JSON header (script
# and its sha256, hyperparameters, tokenizer, every tensor's scheme), one compressed payload of raw
# little-endian arrays. No pickle.

ARTIFACT_MAGIC = b"PGOLFART"
ARTIFACT_VERSION = 1
ARTIFACT_PREFIX = struct.Struct("<8sII")
RUN_ONLY_FIELDS = ("run_id", "log_dir", "artifact_path")
# The official baseline's .ptz (zlib of a torch.save dict): the most its zlib stream may inflate
# to before anything else is read (the baseline's own inflates to ~17 MB). eval_bpb.py and pack.py
# both stop there.
OFFICIAL_MAX_RAW_BYTES = 256 << 20


def compact_running():
    """Whether this process runs a compact form (its wrapper set COMPACT_PATH)."""
    return globals().get("COMPACT_PATH") is not None


def readable_sha256(spec):
    """sha256 of the readable script: the one the artifact header binds as script_sha256."""
    if compact_running():
        return globals()["READABLE_SHA256"]
    return sha256_hex(code_bytes_of(spec))


def readable_size(spec):
    """Bytes of the readable script (the compact form carries the figure)."""
    if compact_running():
        return globals()["READABLE_BYTES"]
    return len(code_bytes_of(spec))


def running_source(spec):
    """The source this process runs: the readable file, or the minified one a compact form
    expanded."""
    if compact_running():
        return globals()["RUNNING_SOURCE"].encode("utf-8")
    return code_bytes_of(spec)


def compact_builder():
    """golf.compact.compact_code, the build-time minifier. It is not part of a bundle: a bundle
    finds it in the golf package beside it (a checkout of the harness); CODE_FORM=readable needs
    no builder, and a compact form counts its own file."""
    try:
        from golf.compact import compact_code
    except ImportError:
        raise ValueError(
            "CODE_FORM=compact: the compact form is built by golf/compact.py, which is not "
            "importable here; run from a checkout of the harness or set CODE_FORM=readable"
        ) from None
    return compact_code


def counted_code(h, code=None):
    """The bytes that count against SIZE_BUDGET: the readable script `code` (this file by
    default; CODE_FORM=readable) or its compact form (CODE_FORM=compact). A compact form counts
    its own file."""
    if code is None and compact_running():
        if h.code_form != "compact":
            raise ValueError(
                "CODE_FORM=readable: this process runs the compact form; run the readable "
                f"{h.spec.script} to count it"
            )
        with open(globals()["COMPACT_PATH"], "rb") as f:
            return f.read()
    code = code_bytes_of(h.spec) if code is None else code
    if h.code_form == "compact":
        return compact_builder()(code, h.spec.script)
    return code


def code_bytes_of(spec, path=None):
    """The readable script's bytes: the model's bundle (spec.code_path) or `path`. A compact form
    has only its minified source: there, use readable_sha256 / running_source."""
    if path is None and compact_running():
        raise ValueError("the readable source is not part of a compact form (readable_sha256)")
    with open(path or spec.code_path, "rb") as f:
        return f.read()


def _header_sha256(header):
    """sha256 of the canonical header JSON without its own checksum: header bit flips are caught."""
    body = json.dumps(
        {k: v for k, v in header.items() if k != "header_sha256"},
        sort_keys=True,
        separators=(",", ":"),
    )
    return sha256_hex(body.encode("utf-8"))


def _artifact_prefix_and_head(header, packed=False):
    """The bytes before the payload: version 1 with the header as JSON, or (packed) version 2
    with its sha256 and the compressed JSON."""
    head = json.dumps(
        {**header, "header_sha256": _header_sha256(header)}, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")
    if not packed:
        return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(head)) + head
    stored = _pack_head(head)
    version = ARTIFACT_VERSION_PACKED_HEADER
    digest = hashlib.sha256(stored).digest()
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, version, len(stored)) + digest + stored


def write_artifact(path, header, payload, packed=False):
    return write_bytes_atomic(path, _artifact_prefix_and_head(header, packed) + payload)


# --- reading an artifact: every header field is checked before anything is allocated or run ---

_HEX = frozenset("0123456789abcdef")


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def valid_script_name(name):
    """A bare training-script file name: no folder, no '..', ends in .py."""
    if not isinstance(name, str) or not name.endswith(".py") or len(name) > 128:
        return False
    if ".." in name or name.startswith("."):
        return False
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)


def valid_byte_source(source):
    """Whether `source` is what golf.bpb.byte_source writes: the tables, or the sidecars with the
    sha256 of their digests, their count and the manifest check ("verified" or "none")."""
    if not isinstance(source, dict):
        return False
    if source == {"kind": "tables"}:
        return True
    return (
        set(source) == {"kind", "sha256", "files", "manifest"}
        and source["kind"] == "sidecar"
        and _is_sha256(source["sha256"])
        and _is_count(source["files"])
        and source["manifest"] in ("verified", "none")
    )


def _entry_parts(e, scheme, numel):
    """{part: expected byte length} of one tensor entry (lqer_rank / lqer_group already
    checked)."""
    if scheme is None:
        itemsize = np.dtype(ARTIFACT_DTYPES[e["dtype"]][1]).itemsize
        return {"data": numel * itemsize}
    if scheme.is_int:
        parts = {"data": numel, "scale": 2 * e["shape"][0]}
        if "awq_starts" in e:
            parts["awq_scale"] = 2 * e["shape"][0]
        if "lqer_rank" in e:
            rows, cols = e["shape"]
            rank = e["lqer_rank"]
            parts["lqer_a"] = rows * rank
            parts["lqer_a_scale"] = 2
            parts["lqer_b"] = rank * cols
            parts["lqer_b_scale"] = 2 * rank * (-(-cols // e["lqer_group"]))
        return parts
    return {"data": numel * scheme.bits // 8}


AWQ_FIELDS = ("awq_bits", "awq_group", "awq_starts")


def _check_awq(where, e, scheme, text):
    """AWQ-lite groups of an int tensor: all three fields, a width above the tensor's, and
    column groups in increasing order that neither overlap nor leave the matrix."""
    if scheme is None or not scheme.is_int:
        raise ValueError(f"{where}: AWQ-lite groups on a tensor that is not int-k ({text})")
    if not all(k in e for k in AWQ_FIELDS):
        raise ValueError(f"{where}: AWQ-lite needs all of {', '.join(AWQ_FIELDS)}")
    bits = e["awq_bits"]
    group = e["awq_group"]
    starts = e["awq_starts"]
    cols = e["shape"][1]
    if not (_is_count(bits) and scheme.bits < bits <= 8):
        raise ValueError(f"{where}: awq_bits {str(bits)[:40]}: expected {scheme.bits + 1}..8")
    if not (_is_count(group) and 1 <= group <= cols):
        raise ValueError(f"{where}: awq_group {str(group)[:40]}: expected 1..{cols}")
    ok = isinstance(starts, list) and 0 < len(starts) <= cols // group
    ok = ok and all(_is_count(v) for v in starts)
    ok = ok and all(b >= a + group for a, b in zip(starts, starts[1:]))
    if not (ok and starts[-1] + group <= cols):
        raise ValueError(
            f"{where}: awq_starts {str(starts)[:80]}: expected increasing column starts of "
            f"groups of {group} that do not overlap and end by column {cols}"
        )


def _check_entry(path, i, e, names):
    """The byte spans [(offset, length, what)] of one valid tensor entry; ValueError otherwise."""
    where = f"{path}: artifact header tensors[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{where}: expected an object, got {type(e).__name__}")  # noqa: TRY004
    name = e.get("name")
    if not isinstance(name, str) or not name or len(name) > 256 or name in names:
        raise ValueError(f"{where}.name {name!r}: expected a new non-empty tensor name")
    names.add(name)
    where = f"{path}: artifact header tensor {name[:80]!r}"
    dtype = e.get("dtype")
    if not isinstance(dtype, str) or dtype not in ARTIFACT_DTYPES:
        raise ValueError(
            f"{where}: dtype {str(dtype)[:40]!r} is not one of {', '.join(ARTIFACT_DTYPES)}"
        )
    shape = e.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > ARTIFACT_MAX_RANK
        or not all(_is_count(n) for n in shape)
    ):
        raise ValueError(
            f"{where}: shape {str(shape)[:80]}: expected at most {ARTIFACT_MAX_RANK} "
            "non-negative integers"
        )
    numel = math.prod(shape)
    if numel > ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"{where}: shape {shape} holds {numel} elements, beyond the ceiling")
    text = e.get("scheme")
    if not isinstance(text, str):
        raise ValueError(f"{where}: scheme {str(text)[:40]!r}: expected text")
    if text == "raw":
        scheme = None
        if ARTIFACT_DTYPES[dtype][1] is None:
            raise ValueError(f"{where}: scheme 'raw' is for integer tensors, not {dtype}")
    else:
        try:
            scheme = QuantScheme.parse(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if ARTIFACT_DTYPES[dtype][1] is not None:
            raise ValueError(f"{where}: scheme {text!r} is for float tensors, not {dtype}")
        if scheme.is_int and len(shape) != 2:
            raise ValueError(f"{where}: scheme {text!r} needs a 2-D shape, got {shape}")
    if "lqer_rank" in e or "lqer_group" in e:
        rank = e.get("lqer_rank")
        group = e.get("lqer_group")
        if scheme is None or not scheme.is_int:
            raise ValueError(f"{where}: LQER factors on a tensor that is not int-k ({text})")
        if not (_is_count(rank) and 1 <= rank <= LQER_MAX_RANK):
            raise ValueError(f"{where}: lqer_rank {str(rank)[:40]}: expected 1..{LQER_MAX_RANK}")
        if not (_is_count(group) and 1 <= group <= LQER_MAX_GROUP):
            raise ValueError(f"{where}: lqer_group {str(group)[:40]}: expected 1..{LQER_MAX_GROUP}")
    if any(k in e for k in AWQ_FIELDS):
        _check_awq(where, e, scheme, text)
    parts = _entry_parts(e, scheme, numel)
    extra = set(ENTRY_PARTS) - set(parts)
    if any(k in e for k in extra):
        raise ValueError(f"{where}: unexpected {sorted(k for k in extra if k in e)} for {text}")
    spans = []
    for part, want in parts.items():
        span = e.get(part)
        if not (isinstance(span, list) and len(span) == 2 and all(_is_count(v) for v in span)):
            raise ValueError(f"{where}.{part} {str(span)[:80]}: expected [offset, length]")
        if span[1] != want:
            raise ValueError(
                f"{where}.{part}: length {span[1]}, but shape {shape} as {text} needs {want}"
            )
        spans.append((span[0], span[1], f"{name[:80]!r}.{part}"))
    return spans


def check_artifact_header(path, header, payload_bytes):
    """ValueError naming the file and the field for anything a reader should not act on: the
    checksum is mandatory, then every field is checked (docs/design.md, The artifact
    container)."""
    if not isinstance(header, dict) or "tensors" not in header or "payload_sha256" not in header:
        raise ValueError(f"{path}: artifact header lacks its tensor table")
    if "header_sha256" not in header:
        raise ValueError(f"{path}: artifact header has no header_sha256 (it is mandatory)")
    if header["header_sha256"] != _header_sha256(header):
        raise ValueError(
            f"{path}: header is corrupted (its sha256 differs from the one it records)"
        )
    if header.get("format") != "pgolf-artifact":
        raise ValueError(f"{path}: artifact header format {header.get('format')!r}")
    if not valid_script_name(header.get("script")):
        raise ValueError(
            f"{path}: artifact header script {str(header.get('script'))[:80]!r}: expected a bare "
            "file name ending in .py"
        )
    if "code_sha256" in header and not (
        _is_sha256(header["code_sha256"]) and _is_count(header.get("code_bytes"))
    ):
        raise ValueError(f"{path}: artifact header code_sha256 / code_bytes: bad values")
    for key in ("script_sha256", "payload_sha256"):
        if not _is_sha256(header.get(key)):
            raise ValueError(f"{path}: artifact header {key}: expected 64 lowercase hex digits")
    if header.get("tokenizer_sha256") is not None and not _is_sha256(header["tokenizer_sha256"]):
        raise ValueError(f"{path}: artifact header tokenizer_sha256: expected 64 hex digits")
    if "byte_source" in header and not valid_byte_source(header["byte_source"]):
        raise ValueError(
            f"{path}: artifact header byte_source {str(header['byte_source'])[:80]}: expected "
            '{"kind": "tables"} or a sidecar with its sha256, file count and manifest check'
        )
    name = header.get("compressor")
    if name == "pergroup":
        pass  # its groups are checked against the tensor entries below
    elif "groups" in header:
        raise ValueError(f"{path}: artifact header groups given for compressor {name!r}")
    elif name not in COMPRESSORS or (name == "zstd" and zstandard is None):
        raise ValueError(
            f"{path}: compressor {str(name)[:40]!r} is unknown or not installed "
            "(zstd needs zstandard)"
        )
    raw_bytes = header.get("raw_bytes")
    if not _is_count(raw_bytes) or raw_bytes > ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(
            f"{path}: artifact header raw_bytes {str(raw_bytes)[:40]}: expected an integer in "
            f"[0, {ARTIFACT_MAX_RAW_BYTES}]"
        )
    if header.get("payload_bytes") != payload_bytes:
        raise ValueError(
            f"{path}: payload is truncated or corrupted ({payload_bytes} bytes after the header, "
            f"the header says {str(header.get('payload_bytes'))[:40]})"
        )
    if not isinstance(header.get("hparams"), dict):
        raise ValueError(f"{path}: artifact header hparams: expected an object")  # noqa: TRY004
    tensors = header["tensors"]
    if not isinstance(tensors, list) or len(tensors) > ARTIFACT_MAX_TENSORS:
        raise ValueError(
            f"{path}: artifact header tensors: expected a list of at most "
            f"{ARTIFACT_MAX_TENSORS} entries"
        )
    names = set()
    spans = []
    for i, e in enumerate(tensors):
        spans += _check_entry(path, i, e, names)
    end = 0
    for offset, length, what in sorted(spans):
        if offset < end:
            raise ValueError(f"{path}: artifact header {what} overlaps the tensor before it")
        end = offset + length
        if end > raw_bytes:
            raise ValueError(
                f"{path}: artifact header {what} ends at {end}, beyond raw_bytes {raw_bytes}"
            )
    if sum(length for _, length, _ in spans) != raw_bytes:
        raise ValueError(
            f"{path}: artifact header raw_bytes {raw_bytes} is not the "
            f"{sum(length for _, length, _ in spans)} bytes its tensor shapes imply"
        )
    if name == "pergroup":
        _check_groups(path, header, tensors, payload_bytes)


def artifact_hparams(path, header, spec):
    """The header's hyperparameters through the checks of Hyperparameters.from_env: only this
    script's fields (run-only ones excluded), each of its declared type, then validate()."""
    fields = {f.name: f for f in dataclasses.fields(spec.hyperparameters)}
    values = {}
    for key, value in header["hparams"].items():
        f = fields.get(key)
        if f is None or key in RUN_ONLY_FIELDS:
            raise ValueError(
                f"{path}: artifact header hparams.{str(key)[:60]}: not a field this script reads"
            )
        kind = f.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and kind is float and not math.isfinite(value):
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: artifact header hparams.{key} {str(value)[:40]!r}: expected a finite "
                f"{kind.__name__}"
            )
        values[key] = value
    if values.get("preset", "record") not in spec.presets:
        raise ValueError(f"{path}: artifact header hparams.preset {values['preset']!r} is unknown")
    try:
        h = spec.hyperparameters(**values)
        h.validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: artifact header hparams: {exc}") from None
    return h


def read_artifact_header(path):
    """(header, payload offset) of a checked header (check_artifact_header). ValueError naming the
    file for anything else."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(ARTIFACT_PREFIX.size)
        if len(prefix) < ARTIFACT_PREFIX.size:
            raise ValueError(f"{path}: {size} bytes is too short to be an artifact")
        magic, version, head_len = ARTIFACT_PREFIX.unpack(prefix)
        if magic != ARTIFACT_MAGIC:
            raise ValueError(f"{path}: not a Parameter Golf artifact (magic {magic!r})")
        if version not in (ARTIFACT_VERSION, ARTIFACT_VERSION_PACKED_HEADER):
            raise ValueError(
                f"{path}: artifact format version {version}, this script reads "
                f"{ARTIFACT_VERSION} and {ARTIFACT_VERSION_PACKED_HEADER}"
            )
        digest_len = 32 if version == ARTIFACT_VERSION_PACKED_HEADER else 0
        if head_len + digest_len > min(MAX_HEADER_BYTES, size - ARTIFACT_PREFIX.size):
            raise ValueError(f"{path}: truncated or corrupt header (declares {head_len} bytes)")
        digest = f.read(digest_len)
        head = f.read(head_len)
        if digest_len:
            if hashlib.sha256(head).digest() != digest:
                raise ValueError(
                    f"{path}: header is corrupted (its sha256 differs from the one it records)"
                )
            head = _unpack_head(path, head)
        try:
            header = json.loads(head.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: corrupt artifact header ({why})") from None
    offset = ARTIFACT_PREFIX.size + digest_len + head_len
    check_artifact_header(path, header, size - offset)
    return header, offset


def read_artifact(path):
    """(checked header, decompressed payload): the payload's length and sha256 are the header's,
    and it inflates, streamed, to exactly raw_bytes (never beyond)."""
    header, offset = read_artifact_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        payload = f.read(header["payload_bytes"] + 1)
    if len(payload) != header["payload_bytes"] or sha256_hex(payload) != header["payload_sha256"]:
        raise ValueError(
            f"{path}: payload is truncated or corrupted (sha256 or length differs from the header)"
        )
    try:
        if header["compressor"] == "pergroup":
            raw = decompress_pergroup(header, payload)
        else:
            raw = COMPRESSORS[header["compressor"]][1](payload, header["raw_bytes"])
    except Exception as exc:  # zlib.error, lzma.LZMAError, ValueError, zstandard's own error type
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: payload does not decompress ({why})") from None
    if len(raw) != header["raw_bytes"]:
        raise ValueError(
            f"{path}: payload inflates to {len(raw)} bytes, header says {header['raw_bytes']}"
        )
    return header, raw


def artifact_state(model):
    """The state that ships: training-only heads (prefixes listed by the model) are left out."""
    drop = tuple(model_hook(model, "training_only_prefixes") or ())
    return {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}


RATIO_STEP_MIN = 0.25  # the most one try may shrink or grow the compression ratio estimate
RATIO_STEP_MAX = 4.0


def save_artifact(model, h, path, state=None, hessians=None, byte_source=None):
    """Quantize (GPTQ for tensors with a Hessian), compress, write; returns the byte accounting.
    BIT_ALLOC: plan widths, measure the compression ratio, re-plan until the total fits and uses
    >= 99% of SIZE_BUDGET - SIZE_MARGIN (at most 4 tries; the largest fitting one is written).
    `byte_source` (golf.bpb.byte_source of the run's val bytes) goes into the header, so that a
    re-score counts the bytes the run counted."""
    state = artifact_state(model) if state is None else state
    code = counted_code(h)
    cache = {}
    group_cache = {}  # per-group streams already compressed, by content
    ratio = 1.0  # compressed bytes per estimated byte, measured after each try
    compressor = h.compressor  # "auto" picks on the first try; later tries keep the winner
    plan = None
    tries = []  # (total bytes, header, payload, plan)
    table = width_table(state, h, hessians, cache) if h.bit_alloc else None
    progress = Progress("serialize", 4 if h.bit_alloc else 1, state="serializing")
    for _ in range(4 if h.bit_alloc else 1):
        progress.advance()
        if h.bit_alloc:
            previous = plan
            plan = plan_bits(state, h, len(code), hessians, table, ratio)
            if plan == previous:
                break
        widths = {r["name"]: r["bits"] for r in plan or []}
        entries, raw = quantize_state_dict(state, h, widths, hessians, cache)
        compressor, payload, groups = compress_artifact(entries, raw, compressor, h, group_cache)
        header = _artifact_header(h, code, compressor, raw, payload, entries, groups, byte_source)
        head_bytes = len(_artifact_prefix_and_head(header, h.header_compress))
        total = head_bytes + len(payload) + len(code)
        tries.append((total, header, payload, plan))
        target = 0.99 * (h.size_budget - h.size_margin)
        if not h.bit_alloc or h.size_budget >= total >= target:
            break
        if total < target and all(r["bits"] == max(table[r["name"]]) for r in plan):
            break  # every width is the widest already: nothing to spend the rest of the budget on
        # Compressed bytes per estimated byte of the traded (int) tensors. The fixed part is
        # estimated uncompressed, so on a small model it can exceed what the whole artifact
        # compresses to: the correction of one try is bounded (issue 24: a shrunk record preset
        # read a negative ratio, then a ratio of millions, and refused a model of 1 M parameters).
        planned_bytes = max(sum(r["bytes"] for r in plan), 1)
        measured = (total - _fixed_bytes(state, h, len(code))) / planned_bytes
        ratio *= min(max(measured, RATIO_STEP_MIN), RATIO_STEP_MAX)
    progress.close()
    fitting = [t for t in tries if t[0] <= h.size_budget]
    if fitting:
        _, header, payload, plan = max(fitting, key=lambda t: t[0])
    else:
        _, header, payload, plan = min(tries, key=lambda t: t[0])
    artifact_bytes = write_artifact(path, header, payload, h.header_compress)
    return {
        "artifact_bytes": artifact_bytes,
        "header_bytes": artifact_bytes - len(payload),
        "code_bytes": len(code),
        "code_bytes_readable": readable_size(h.spec),
        "groups": group_table(header),
        "total_bytes": artifact_bytes + len(code),
        "payload_bytes": len(payload),
        "raw_bytes": header["raw_bytes"],
        "compressor": header["compressor"],
        "budget_bytes": h.size_budget,
        "margin_bytes": h.size_budget - artifact_bytes - len(code),
        "plan": plan,
        "tries": len(tries),
    }


def compress_artifact(entries, raw, compressor, h, group_cache=None):
    """(compressor name, payload, groups or None). "auto": per-group from PERGROUP_AUTO_MIN_RAW
    raw bytes (it picks the best back end for every group, so the whole-payload compressors are
    not run too), below that the smallest single stream."""
    if compressor == "auto" and len(raw) >= PERGROUP_AUTO_MIN_RAW:
        compressor = "pergroup"
    if compressor == "pergroup":
        payload, groups = compress_pergroup(entries, raw, group_cache, h.pergroup_sort)
        return "pergroup", payload, groups
    name, payload = compress_payload(raw, compressor, h.zstd_level)
    return name, payload, None


def group_table(header):
    """[{name, codec, sorted, raw_bytes, bytes}] of a per-group header ([] for one stream)."""
    if header.get("compressor") != "pergroup":
        return []
    members = dict(payload_groups(header["tensors"]))
    rows = []
    for g in header["groups"]:
        if g["name"] == "order":
            raw = sum(
                2 * header["tensors"][i]["shape"][0]
                for grp in header["groups"]
                if grp["sorted"]
                for i, part in members[grp["name"]]
                if _sortable(header["tensors"][i], part)
            )
        else:
            raw = sum(header["tensors"][i][part][1] for i, part in members[g["name"]])
        rows.append({**g, "raw_bytes": raw})
    return rows


def _artifact_header(h, code, compressor, raw, payload, entries, groups=None, byte_source=None):
    """Everything a reader needs to rebuild the model from the payload, and to check it. The
    script binding is the readable source's sha256; code_sha256 / code_bytes are those of the
    counted code (the compact form under CODE_FORM=compact)."""
    has_tokenizer = os.path.isfile(h.tokenizer_path)
    extra = {} if groups is None else {"groups": groups}
    if byte_source is not None:
        extra["byte_source"] = byte_source
    return {
        **extra,
        "code_sha256": sha256_hex(code),
        "code_bytes": len(code),
        "format": "pgolf-artifact",
        "script": h.spec.script,
        "script_sha256": readable_sha256(h.spec),
        "tokenizer_sha256": file_sha256(h.tokenizer_path) if has_tokenizer else None,
        "hparams": {k: v for k, v in dataclasses.asdict(h).items() if k not in RUN_ONLY_FIELDS},
        "vocab_size": h.vocab_size,
        "compressor": compressor,
        "raw_bytes": len(raw),
        "payload_bytes": len(payload),
        "payload_sha256": sha256_hex(payload),
        "tensors": entries,
    }


def check_model_shapes(path, header, spec, h):
    """The model the header's hyperparameters describe, built on the meta device (no memory), has
    exactly the shapes of the header's tensors: so the real model allocates no more than the
    payload the header bounds (issue 24). ValueError naming the first difference."""
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in artifact_state(spec.build_model(h)).items()}
    stored = {e["name"]: e["shape"] for e in header["tensors"]}
    missing = [k for k in shapes if k not in stored]
    if missing:
        raise ValueError(f"{path}: artifact lacks tensors {missing[:4]} of the model it names")
    for name, shape in shapes.items():
        if stored[name] != shape:
            raise ValueError(
                f"{path}: tensor {name[:80]!r} is {stored[name]} in the artifact, "
                f"{shape} in the model its hyperparameters describe"
            )


def load_artifact(path, spec=None, allow_script_mismatch=False):
    """The dequantized model (on CPU, eval mode) and its hyperparameters, from the bytes on disk.
    `spec` is the ModelSpec that builds the model (golf.contract); by default the registered model
    of the script the header names. The header, the script binding and the hyperparameters are
    checked before the payload is read or the model allocated."""
    header, _ = read_artifact_header(path)
    spec = spec or model_for_script(header["script"], path)
    own_sha = readable_sha256(spec)
    if header["script_sha256"] != own_sha and not allow_script_mismatch:
        raise ValueError(
            f"{path}: written by {header['script']} sha256 {header['script_sha256']}, "
            f"not by this script ({spec.script} sha256 {own_sha})"
        )
    h = artifact_hparams(path, header, spec)
    check_model_shapes(path, header, spec, h)
    header, raw = read_artifact(path)
    model = spec.build_model(h)
    state = dequantize_entries(header["tensors"], raw)
    model.load_state_dict(state, strict=not model_hook(model, "training_only_prefixes"))
    return model.eval(), h
