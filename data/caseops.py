"""CaseOps: lossless capitalization operators, and val shards scored on the ORIGINAL bytes.

CaseOps (`lossless_caps_caseops_v1`, PR #1729; the records implement it as
`encode_lossless_caps_v2`) is a bijective character-level text transform applied before
tokenizing with the CaseOps SentencePiece model. Over each maximal run of ASCII letters (a
"word"):

- an ALL-CAPS word of two or more letters becomes ALLCAPS + the word lowercased;
- otherwise every uppercase letter is lowercased and preceded by an operator: TITLE before the
  first letter, CAPNEXT before a later one. So "hello" is unchanged, "Hello" and "A" get TITLE,
  "iPhone" becomes "i" CAPNEXT "phone" and "McDonald" TITLE "mc" CAPNEXT "donald";
- a literal operator character in the input is escaped as ESC + itself;
- everything else (digits, punctuation, "_", non-ASCII letters such as "É") is untouched, and
  ends a word.

The operators are private-use characters, ids 4-7 of the CaseOps model. Written from the
definition in the record's `lossless_caps.py` (PR #1729, record folder
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, PR #1855); the output equals the
record's on 200 real FineWeb documents (tests/test_caseops.py pins it where they are present).

Because the tokenizer sees transformed text, its lookup-table bytes would count operators and
score the transformed text. As in the records, the val split therefore carries a sidecar of
ORIGINAL UTF-8 byte counts, `fineweb_val_bytes_%06d.bin`, one uint16 per val token in the shard
format: each token counts the original bytes of the text it covers (SentencePiece's piece span,
so whitespace the normalizer folds into a piece is counted with it), operators and BOS count 0.

    python -m data.build shards --caseops --input docs.jsonl --model CASEOPS.model \\
        --out-dir data/datasets/fineweb10B_sp8192_caseops --num-val-docs 50000
    python -m data.caseops audit --input docs.jsonl --model CASEOPS.model --num-docs 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data.shards import (
    MAX_TOKEN_ID,
    check_export_args,
    read_shard,
    remove_stale_shards,
    sha256_file,
    shard_info,
    write_binding,
    write_bytes_atomic,
    write_shard,
)

TRANSFORM_NAME = "lossless_caps_caseops_v1"
TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
# Ids of the operators in fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model.
OPERATOR_IDS = (4, 5, 6, 7)
ESC_ID = 7
BOS_ID = 1
# The records' prepare_caseops_data.py cuts shards at 10M tokens (the plain export uses 1e8); with
# the same size the val shards and sidecars here are file-for-file those of the records.
CASEOPS_SHARD_TOKENS = 10_000_000
ENCODE_BATCH_DOCS = 256


# -----------------------------------------------------------------------------
# TRANSFORM
# -----------------------------------------------------------------------------

_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")

# One unit of transformed text: an escaped operator, an ALL-CAPS word, a word with optional TITLE
# and CAPNEXT marks, or a run of characters the transform leaves alone. Uppercase ASCII never
# appears in transformed text, and neither does an operator outside these patterns.
_ENCODED_UNIT = re.compile(
    "\ue004(?P<escaped>[\ue001-\ue004])"
    "|\ue002(?P<allcaps>[a-z]{2,})"
    "|(?P<title>\ue001)?(?P<word>[a-z](?:\ue003?[a-z])*)"
    "|(?P<other>[^\ue001-\ue004A-Za-z]+)"
)


def _encode_word(word: str) -> str:
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    parts = []
    for position, (original, lowered) in enumerate(zip(word, lower)):
        if original != lowered:
            parts.append(CAPNEXT if position else TITLE)
        parts.append(lowered)
    return "".join(parts)


def _encode_unit(match: re.Match) -> str:
    unit = match.group()
    if unit in OPERATORS:
        return ESC + unit
    return _encode_word(unit)


def encode(text: str) -> str:
    """The CaseOps transform of text (lossless_caps_caseops_v1)."""
    return _WORD_OR_OPERATOR.sub(_encode_unit, text)


def _decode_word(title: str | None, body: str) -> str:
    chars = []
    upper_next = title is not None
    for ch in body:
        if ch == CAPNEXT:
            upper_next = True
            continue
        chars.append(ch.upper() if upper_next else ch)
        upper_next = False
    return "".join(chars)


def decode(text: str) -> str:
    """The inverse of encode. Strict: a string encode cannot produce raises ValueError, so
    decode(s) succeeds exactly when encode(decode(s)) == s."""
    out = []
    pos = 0
    previous_was_word = False
    while pos < len(text):
        match = _ENCODED_UNIT.match(text, pos)
        if match is None:
            raise ValueError(
                f"not CaseOps text: {text[pos : pos + 8]!r} at character {pos} "
                "(a stray operator, or an uppercase ASCII letter)"
            )
        is_word = match.lastgroup in ("allcaps", "word")
        if is_word and previous_was_word:
            raise ValueError(f"not CaseOps text: a word marker inside a word at character {pos}")
        if match.lastgroup == "allcaps":
            piece = match.group("allcaps").upper()
        elif match.lastgroup == "word":
            piece = _decode_word(match.group("title"), match.group("word"))
            if len(piece) >= 2 and piece.isupper():
                raise ValueError(
                    f"not CaseOps text: {piece!r} at character {pos} is spelled with TITLE/CAPNEXT "
                    "where the transform writes ALLCAPS"
                )
        else:
            piece = match.group(match.lastgroup)
        out.append(piece)
        previous_was_word = is_word
        pos = match.end()
    return "".join(out)


# -----------------------------------------------------------------------------
# ORIGINAL BYTES
# -----------------------------------------------------------------------------


def load_caseops_tokenizer(model_path: str | os.PathLike):
    """The CaseOps SentencePiece model, refused unless the four operators are its ids 4-7."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = tuple(sp.piece_to_id(op) for op in OPERATORS)
    if ids != OPERATOR_IDS or sp.bos_id() != BOS_ID:
        raise ValueError(
            f"{model_path}: not a CaseOps tokenizer (operator ids {ids}, BOS {sp.bos_id()}; "
            f"expected {OPERATOR_IDS} and {BOS_ID})"
        )
    if sp.vocab_size() > MAX_TOKEN_ID + 1:
        raise ValueError(f"{model_path}: vocab size {sp.vocab_size()} does not fit uint16 shards")
    return sp


def piece_spans(sp, transformed: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of transformed text and, per token, the [begin, end) character span of the input
    it covers (SentencePiece's surface). The first pieces of a byte-fallback character cover
    nothing and the last covers the character; whitespace the normalizer drops is covered by the
    piece after it, or by none at the end of the text."""
    if hasattr(sp, "encode_as_immutable_proto"):  # sentencepiece 0.2.0
        pieces = sp.encode_as_immutable_proto(transformed).pieces
        return [p.id for p in pieces], [(p.begin, p.end) for p in pieces]
    mapping = sp.encode(transformed, return_type="offset_mapping")  # 0.2.1 and later
    return list(mapping["ids"]), [tuple(span) for span in mapping["offsets"]]


def original_byte_counts(surfaces: Iterable[str]) -> list[int]:
    """Original UTF-8 bytes of each piece surface of transformed text, in order.

    An operator counts 0, a character escaped by ESC counts its own bytes (the ESC 0), every other
    character its UTF-8 length. The escape may end one piece and its character begin the next.
    """
    counts = []
    escaped = False
    for surface in surfaces:
        if not escaped and ESC not in surface:  # fast path: each operator is 3 UTF-8 bytes
            operators = surface.count(TITLE) + surface.count(ALLCAPS) + surface.count(CAPNEXT)
            counts.append(len(surface.encode("utf-8")) - 3 * operators)
            continue
        total = 0
        for ch in surface:
            if escaped:
                total += len(ch.encode("utf-8"))
                escaped = False
            elif ch == ESC:
                escaped = True
            elif ch not in OPERATORS:
                total += len(ch.encode("utf-8"))
        counts.append(total)
    return counts


def tokenize_with_spans(sp, text: str) -> tuple[np.ndarray, np.ndarray, str, list]:
    """[BOS] + the CaseOps tokens of one document and per token its original UTF-8 bytes (BOS 0),
    both uint16; also the transformed text and the piece spans in it (BOS has none)."""
    transformed = encode(text)
    ids, spans = piece_spans(sp, transformed)
    counts = original_byte_counts(transformed[begin:end] for begin, end in spans)
    too_long = [c for c in counts if c > MAX_TOKEN_ID]
    if too_long:
        raise ValueError(f"a piece covers {too_long[0]} original bytes, more than uint16 holds")
    tokens = np.array([BOS_ID, *ids], dtype=np.uint16)
    sidecar = np.array([0, *counts], dtype=np.uint16)
    return tokens, sidecar, transformed, spans


def tokenize_document(sp, text: str) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + the CaseOps tokens of one document, and per token its original UTF-8 bytes (BOS 0),
    both uint16: what the val shard and its sidecar hold for the document."""
    tokens, sidecar, _, _ = tokenize_with_spans(sp, text)
    return tokens, sidecar


# -----------------------------------------------------------------------------
# SHARDS
# -----------------------------------------------------------------------------


class _ParallelSplitWriter:
    """One split's token stream (and, for val, its byte sidecar) cut into files of exactly
    shard_size tokens; the sidecar is cut at the same places, so file k of both is parallel."""

    def __init__(self, out_dir: Path, names: tuple[str, ...], shard_size: int):
        self.out_dir = out_dir
        self.names = names
        self.shard_size = shard_size
        self.buffers = [[] for _ in names]
        self.buffered = 0
        self.files: list[Path] = []
        self.tokens = 0

    def add(self, *arrays: np.ndarray) -> None:
        for buffer, array in zip(self.buffers, arrays, strict=True):
            buffer.append(array)
        self.buffered += arrays[0].size
        self.tokens += arrays[0].size
        while self.buffered >= self.shard_size:
            streams = [np.concatenate(buffer) for buffer in self.buffers]
            self._write([stream[: self.shard_size] for stream in streams])
            self.buffers = [[stream[self.shard_size :]] for stream in streams]
            self.buffered -= self.shard_size

    def close(self) -> None:
        if self.buffered:
            self._write([np.concatenate(buffer) for buffer in self.buffers])
        self.buffers = [[] for _ in self.names]
        self.buffered = 0

    def _write(self, arrays: list[np.ndarray]) -> None:
        index = len(self.files) // len(self.names)
        for name, array in zip(self.names, arrays):
            self.files.append(write_shard(self.out_dir / f"{name}_{index:06d}.bin", array))


def sidecar_path(val_shard: str | os.PathLike) -> Path:
    """fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin, beside it."""
    val_shard = Path(val_shard)
    match = re.fullmatch(r"(.*)_val_(\d{6})\.bin", val_shard.name)
    if match is None:
        raise ValueError(f"{val_shard}: not a val shard name (expected PREFIX_val_NNNNNN.bin)")
    return val_shard.with_name(f"{match.group(1)}_val_bytes_{match.group(2)}.bin")


def export_caseops_shards(
    documents: Iterable[str],
    sp_model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_val_docs: int,
    shard_size: int = CASEOPS_SHARD_TOKENS,
    prefix: str = "fineweb",
) -> dict:
    """CaseOps-transform and tokenize documents into `{prefix}_val_%06d.bin` (the first
    num_val_docs), their sidecars `{prefix}_val_bytes_%06d.bin` and `{prefix}_train_%06d.bin`.

    Each document is [BOS] + encode(CaseOps(text)), no EOS, as in the records. Writes
    out_dir/manifest.json (transform, tokenizer sha256, counts, original bytes, per-file sha256),
    removes shards of an earlier export that this one did not write, and returns the manifest.
    """
    check_export_args(num_val_docs, shard_size)
    sp_model_path = Path(sp_model_path)
    out_dir = Path(out_dir)
    sp = load_caseops_tokenizer(sp_model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    val = _ParallelSplitWriter(out_dir, (f"{prefix}_val", f"{prefix}_val_bytes"), shard_size)
    train = _ParallelSplitWriter(out_dir, (f"{prefix}_train",), shard_size)
    counts = {"val": 0, "train": 0}
    text_bytes = {"val": 0, "train": 0}
    original_bytes_val = 0
    batch: list[str] = []

    def flush_train() -> None:
        for ids in sp.encode([encode(text) for text in batch], out_type=int):
            train.add(np.array([BOS_ID, *ids], dtype=np.uint16))
        batch.clear()

    for index, text in enumerate(documents):
        split = "val" if index < num_val_docs else "train"
        counts[split] += 1
        text_bytes[split] += len(text.encode("utf-8"))
        if split == "val":
            tokens, sidecar = tokenize_document(sp, text)
            val.add(tokens, sidecar)
            original_bytes_val += int(sidecar.sum(dtype=np.int64))
            continue
        batch.append(text)
        if len(batch) >= ENCODE_BATCH_DOCS:
            flush_train()
    flush_train()
    val.close()
    train.close()

    written = {path.name for path in val.files + train.files}
    remove_stale_shards(out_dir, prefix, ("val", "val_bytes", "train"), written)

    manifest = {
        "text_transform": TRANSFORM_NAME,
        "tokenizer": {
            "model": sp_model_path.name,
            "sha256": sha256_file(sp_model_path),
            "vocab_size": int(sp.vocab_size()),
            "bos_id": BOS_ID,
            "operator_ids": list(OPERATOR_IDS),
        },
        "append_eos": False,
        "shard_size": shard_size,
        "num_docs": counts["val"] + counts["train"],
        "num_val_docs": counts["val"],
        "num_train_docs": counts["train"],
        "tokens_val": val.tokens,
        "tokens_train": train.tokens,
        "text_bytes_val": text_bytes["val"],
        "text_bytes_train": text_bytes["train"],
        "original_bytes_val": original_bytes_val,
        "files": [
            {"name": path.name, "split": _split_of(path.name), **shard_info(path)}
            for path in val.files + train.files
        ],
    }
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    write_bytes_atomic(out_dir / "manifest.json", manifest_bytes)
    # The binding the training scripts check before they train or score (shards.json).
    write_binding(out_dir, sp_model_path, sp.vocab_size())
    return manifest


def _split_of(name: str) -> str:
    if "_val_bytes_" in name:
        return "val_bytes"
    if "_val_" in name:
        return "val"
    return "train"


def check_bytes_sidecar(
    val_tokens: str | os.PathLike,
    sidecar: str | os.PathLike,
    operator_ids: tuple[int, ...] = OPERATOR_IDS,
    esc_id: int = ESC_ID,
) -> np.ndarray:
    """Validate one val shard's original-byte sidecar and return it (uint16).

    A ValueError naming the sidecar file when it is missing, not a valid shard, of another length
    than the val shard, or not CaseOps accounting: BOS must count 0, and so must every operator
    token not escaped by the ESC token before it (a sidecar of lookup-table bytes gives them 3).
    """
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise ValueError(f"{sidecar}: missing original-byte sidecar for val shard {val_tokens}")
    tokens = read_shard(val_tokens)
    counts = read_shard(sidecar)
    if counts.size != tokens.size:
        raise ValueError(
            f"{sidecar}: {counts.size} byte counts for {tokens.size} tokens in {val_tokens}"
        )
    bad_bos = np.flatnonzero((tokens == BOS_ID) & (counts != 0))
    if bad_bos.size:
        raise ValueError(f"{sidecar}: BOS at token {bad_bos[0]} counts {counts[bad_bos[0]]} bytes")
    # The token before the first is in the previous file: give it the benefit of the doubt.
    previous = np.concatenate([[esc_id], tokens[:-1].astype(np.int64)])
    bare_operator = np.isin(tokens, operator_ids) & (previous != esc_id)
    bad_operator = np.flatnonzero(bare_operator & (counts != 0))
    if bad_operator.size:
        first = bad_operator[0]
        raise ValueError(
            f"{sidecar}: operator token {tokens[first]} at {first} counts {counts[first]} "
            "bytes (expected 0: not a CaseOps original-byte sidecar)"
        )
    return counts


def check_caseops_export(
    data_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> dict:
    """Check a CaseOps export as a trainer would before scoring on it: the manifest names the
    transform and (when given) the tokenizer's sha256, and every val shard has a valid sidecar.
    Returns {"val_files", "tokens", "original_bytes"}; ValueError naming the file otherwise."""
    data_path = Path(data_path)
    manifest_path = data_path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest_path}: unreadable ({e.__class__.__name__})") from None
    if manifest.get("text_transform") != TRANSFORM_NAME:
        raise ValueError(
            f"{manifest_path}: text_transform {manifest.get('text_transform')!r}, "
            f"expected {TRANSFORM_NAME!r}"
        )
    if tokenizer_path is not None:
        recorded = manifest.get("tokenizer", {}).get("sha256")
        actual = sha256_file(tokenizer_path)
        if recorded != actual:
            raise ValueError(
                f"{manifest_path}: shards were built with tokenizer sha256 {recorded}, "
                f"but {tokenizer_path} has {actual}"
            )
    val_files = sorted(
        path
        for path in data_path.glob("*_val_*.bin")
        if re.fullmatch(r".*_val_\d{6}\.bin", path.name)
    )
    if not val_files:
        raise ValueError(f"{data_path}: no val shards")
    tokens = 0
    original_bytes = 0
    for path in val_files:
        counts = check_bytes_sidecar(path, sidecar_path(path))
        tokens += counts.size
        original_bytes += int(counts.sum(dtype=np.int64))
    return {"val_files": len(val_files), "tokens": tokens, "original_bytes": original_bytes}


# -----------------------------------------------------------------------------
# AUDIT
# -----------------------------------------------------------------------------


def aligned_encoding(text: str) -> tuple[str, list[int]]:
    """The transform built one original character at a time: the transformed text and, for each
    of its characters, the index of the original character it spells (-1 for an operator).

    A second construction of encode, used by the audit to recount bytes independently of the
    surface counter; the audit checks that both spell the same text.
    """
    chars = []
    origin = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch in OPERATORS:
            chars.extend((ESC, ch))
            origin.extend((-1, pos))
            pos += 1
            continue
        if not ("a" <= ch <= "z" or "A" <= ch <= "Z"):
            chars.append(ch)
            origin.append(pos)
            pos += 1
            continue
        end = pos
        while end < len(text) and ("a" <= text[end] <= "z" or "A" <= text[end] <= "Z"):
            end += 1
        word_is_allcaps = end - pos >= 2 and all("A" <= c <= "Z" for c in text[pos:end])
        if word_is_allcaps:
            chars.append(ALLCAPS)
            origin.append(-1)
        for index in range(pos, end):
            if "A" <= text[index] <= "Z" and not word_is_allcaps:
                chars.append(TITLE if index == pos else CAPNEXT)
                origin.append(-1)
            chars.append(text[index].lower())
            origin.append(index)
        pos = end
    return "".join(chars), origin


def audit_document(sp, text: str) -> dict:
    """Recount one document's sidecar from the original text each piece covers.

    Inverting the transform character by character, the transformed prefix of length k spells the
    original prefix text[:consumed[k]]; a piece spanning [begin, end) therefore covers the
    original text[consumed[begin]:consumed[end]], and its recount is that slice's UTF-8 length.
    Returns the totals, the bytes of original text no piece covers (what the tokenizer's
    normalization drops, e.g. trailing whitespace) and the tokens whose sidecar differs.
    """
    transformed, origin = aligned_encoding(text)
    if transformed != encode(text):
        raise ValueError("aligned_encoding and encode disagree: the transform is inconsistent")
    if decode(transformed) != text:
        raise ValueError("decode(encode(text)) != text")
    tokens, sidecar, _, spans = tokenize_with_spans(sp, text)
    spells = np.array(origin, dtype=np.int64) >= 0
    consumed = np.concatenate([[0], np.cumsum(spells)])
    char_bytes = [len(ch.encode("utf-8")) for ch in text]
    byte_offset = np.concatenate([[0], np.cumsum(char_bytes, dtype=np.int64)])
    span_array = np.array(spans, dtype=np.int64).reshape(-1, 2)
    first = byte_offset[consumed[span_array[:, 0]]]
    last = byte_offset[consumed[span_array[:, 1]]]
    recount = last - first
    ordered = bool(np.all(span_array[1:, 0] >= span_array[:-1, 1]))
    mismatched = np.flatnonzero(recount != sidecar[1:])
    covered = int(recount.sum())
    raw = text.encode("utf-8")
    uncovered = []
    previous_end = 0
    for begin, end in zip(first.tolist() + [len(raw)], last.tolist() + [len(raw)]):
        if begin > previous_end:
            uncovered.append(raw[previous_end:begin].decode("utf-8"))
        previous_end = max(previous_end, end)
    return {
        "tokens": int(tokens.size),
        "sidecar_bytes": int(sidecar.sum(dtype=np.int64)),
        "recount_bytes": covered,
        "raw_bytes": int(byte_offset[-1]),
        "uncovered_bytes": int(byte_offset[-1]) - covered,
        "uncovered_text": "".join(uncovered),
        "pieces_in_order": ordered,
        "mismatches": [(int(i) + 1, int(sidecar[i + 1]), int(recount[i])) for i in mismatched],
    }


def audit_original_bytes(sp, documents: Iterable[str]) -> dict:
    """The byte audit over documents: per-token sidecar bytes equal the independent recount, and
    sidecar total + uncovered bytes equals the raw UTF-8 length. `passed` when all three hold."""
    totals = {"docs": 0, "tokens": 0, "sidecar_bytes": 0, "recount_bytes": 0, "raw_bytes": 0}
    totals["uncovered_bytes"] = 0
    mismatched_tokens = 0
    out_of_order_docs = 0
    uncovered_chars: dict[str, int] = {}
    for text in documents:
        doc = audit_document(sp, text)
        totals["docs"] += 1
        for key in ("tokens", "sidecar_bytes", "recount_bytes", "raw_bytes", "uncovered_bytes"):
            totals[key] += doc[key]
        mismatched_tokens += len(doc["mismatches"])
        out_of_order_docs += not doc["pieces_in_order"]
        for ch in doc["uncovered_text"]:
            uncovered_chars[repr(ch)] = uncovered_chars.get(repr(ch), 0) + 1
    difference = totals["raw_bytes"] - totals["sidecar_bytes"]
    passed = (
        mismatched_tokens == 0
        and out_of_order_docs == 0
        and difference == totals["uncovered_bytes"]
    )
    return {
        "passed": passed,
        **totals,
        "raw_minus_sidecar": difference,
        "mismatched_tokens": mismatched_tokens,
        "out_of_order_docs": out_of_order_docs,
        "uncovered_chars": dict(sorted(uncovered_chars.items())),
    }


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def _documents(paths: list[str], max_docs: int | None):
    from data.build import iter_corpus

    return iter_corpus(paths, max_docs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.caseops",
        description="The CaseOps byte audit (shards: python -m data.build shards --caseops).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser(
        "audit", help="recount the sidecar bytes of the first documents from their text"
    )
    audit.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="FILE",
        help="corpus file (.jsonl(.gz) with a 'text' field, or .txt(.gz)); repeatable",
    )
    audit.add_argument(
        "--model", required=True, help="the CaseOps SentencePiece model (operators at 4-7)"
    )
    audit.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    audit.add_argument("--num-docs", type=int, default=200, help="documents to audit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sp = load_caseops_tokenizer(args.model)
        summary = audit_original_bytes(sp, _documents(args.input, args.num_docs))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
