"""Bits per byte: the tokenizer, its byte lookup tables, CaseOps byte sidecars, and the byte
audit."""

import os

import numpy as np
import torch

from golf.data import data_text_transform, val_byte_sidecar

# Bits per byte: val_bpb = sum NLL / (ln 2 x sum bytes). Bytes come from the official SentencePiece
# lookup tables: base bytes of each piece, plus one byte for a leading "\u2581" unless the previous
# token is a boundary (control/unknown). Byte-fallback pieces are one byte, never three (the Scylla
# bug, PR #1271).


def load_tokenizer(path, vocab_size):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path!r}: no such file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except Exception as exc:
        raise ValueError(f"TOKENIZER_PATH={path!r}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() != vocab_size:
        raise ValueError(
            f"TOKENIZER_PATH={path!r}: tokenizer has {sp.vocab_size()} pieces "
            f"but VOCAB_SIZE={vocab_size}"
        )
    return sp


def build_sentencepiece_luts(sp, vocab_size, device):
    table_size = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(table_size, dtype=np.int16)
    has_leading_space = np.zeros(table_size, dtype=np.bool_)
    is_boundary_token = np.ones(table_size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary_token[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return tuple(
        torch.tensor(a, device=device) for a in (base_bytes, has_leading_space, is_boundary_token)
    )


class SidecarBytes:
    """Per-token ORIGINAL UTF-8 byte counts of the val split (`fineweb_val_bytes_*.bin`, parallel
    to the val tokens), written for CaseOps data (PR #1729): the tokens spell a transformed text,
    so the lookup tables would count operator characters and lowercase text, not the bytes of the
    document. With a sidecar, target j counts `per_token[j]` whatever the token before it.
    `source` says which files: their sha256, count and manifest check (golf.data)."""

    def __init__(self, per_token, source=None):
        self.per_token = per_token
        self.source = source or {}

    def to(self, device):
        return SidecarBytes(self.per_token.to(device), self.source)


def byte_source(luts):
    """What counted the bytes of a score, for the summary, the artifact header and pack.py:
    {"kind": "tables"} (the official lookup tables) or {"kind": "sidecar", "sha256", "files",
    "manifest"}. Read by shape, so that a counter made by a script of another revision (eval_bpb.py
    re-scores those) is named too; one from before `source` names no files."""
    if hasattr(luts, "per_token"):
        return {"kind": "sidecar", **(getattr(luts, "source", None) or {})}
    return {"kind": "tables"}


def tokenizer_transform(sp):
    """ "lossless_caps_caseops_v1" when the tokenizer has CaseOps operator pieces (its tokens spell
    a transformed text), else None."""
    marks = (*CASEOPS_OPERATORS, CASEOPS_ESCAPE)
    for i in range(sp.vocab_size()):
        if any(mark in sp.id_to_piece(i) for mark in marks):
            return "lossless_caps_caseops_v1"
    return None


def target_bytes(prev_ids, target_ids, luts, positions=None):
    """Bytes of each target token given the token before it (the official formula), or, when
    `luts` is a SidecarBytes, the sidecar's count at each target's position in the val split."""
    if isinstance(luts, SidecarBytes):
        if positions is None:
            raise ValueError("sidecar byte counts need the targets' positions in the val split")
        return luts.per_token[positions]
    base_bytes, has_leading_space, is_boundary_token = luts
    leading_space = has_leading_space[target_ids] & ~is_boundary_token[prev_ids]
    return base_bytes[target_ids].to(torch.int64) + leading_space.to(torch.int64)


def val_byte_counter(h, sp, val_tokens, device):
    """How this val split counts bytes: its sidecar (SidecarBytes) when it has one, else the
    official lookup tables; never the tables for a transformed text (a tokenizer with CaseOps
    operator pieces, or a manifest that declares a transform): there a missing sidecar is an
    error, since the tables would count the transformed text (+10 % bytes on FineWeb, issue 24)."""
    found = val_byte_sidecar(h.data_path, val_tokens.numel())
    if found is not None:
        per_token, source = found
        return SidecarBytes(per_token.to(device), source)
    transform = tokenizer_transform(sp) or data_text_transform(h.data_path)
    if transform:
        raise ValueError(
            f"DATA_PATH={h.data_path!r}: no val byte sidecars (fineweb_val_bytes_*.bin), but "
            f"the text is {transform} (TOKENIZER_PATH={h.tokenizer_path!r}): bits per byte "
            "count the original bytes only the sidecars hold; get the CaseOps export with "
            "`python -m data.download --variant sp8192_caseops`, or build shards with "
            "`python -m data.build shards --caseops`"
        )
    return build_sentencepiece_luts(sp, h.vocab_size, device)


# CaseOps operator characters (PR #1729): TITLE, ALLCAPS, CAPNEXT stand for no original byte; ESC
# makes the character after it literal.
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003")
CASEOPS_ESCAPE = "\ue004"
# The decoded text is normalized (NFKC, whitespace runs): it cannot give the original bytes back
# exactly (on 200 real FineWeb documents it has 97 bytes fewer, 0.0065 %). The exact check is the
# manifest's (sha256 of every sidecar, original_bytes_val); this recount bounds the rest at 0.05 %,
# under a tenth of a sidecar bias worth 0.004 bpb (+0.4 %).
SIDECAR_TOLERANCE = 0.0005
# A byte audit's window may run on to this many times its sample size to end on a BOS.
AUDIT_MAX_STRETCH = 8


def original_utf8_bytes(transformed):
    """UTF-8 bytes of the text before the CaseOps transform, counted without inverting it: case
    changes keep ASCII lengths, operators count 0, an escaped character counts itself."""
    total = 0
    escaped = False
    for char in transformed:
        if escaped:
            total += len(char.encode("utf-8"))
            escaped = False
        elif char == CASEOPS_ESCAPE:
            escaped = True
        elif char not in CASEOPS_OPERATORS:
            total += len(char.encode("utf-8"))
    return total


def audit_window(sp, tokens, sample_tokens, bos_id=1):
    """The [start, stop) slice the byte audits read: from the first BOS, about `sample_tokens`
    tokens, ended on a document boundary. A cut inside a document can split a byte-fallback UTF-8
    sequence (<0xD9><0x84> is one Arabic letter): decoded alone, the orphan byte becomes U+FFFD,
    three bytes where the tables rightly count one, and an honest table fails. So the window runs on
    to the next BOS, or back to the last one inside it when the next is far; one document longer
    than that is cut before its trailing byte pieces."""
    bos_at = (tokens == bos_id).nonzero().flatten()
    start = int(bos_at[0]) if bos_at.numel() else 0
    stop = min(tokens.numel(), start + sample_tokens)
    if stop == tokens.numel():
        return start, stop
    later = bos_at[bos_at >= stop]
    if later.numel() and int(later[0]) <= start + AUDIT_MAX_STRETCH * sample_tokens:
        return start, int(later[0])
    inside = bos_at[(bos_at > start) & (bos_at < stop)]
    if inside.numel():
        return start, int(inside[-1])
    while stop > start + 1 and sp.is_byte(int(tokens[stop - 1])):
        stop -= 1
    return start, stop


def audit_sidecar_bytes(sp, tokens, counter, sample_tokens=10_000, bos_id=1):
    """The sidecar against an independent recount on a val sample: BOS counts 0, and each
    document's sidecar total equals the original bytes of its decoded text up to the tokenizer's
    normalization (SIDECAR_TOLERANCE; the difference is reported)."""
    tokens = tokens.detach().cpu().to(torch.int64)
    per_token = counter.per_token.detach().cpu()
    start, stop = audit_window(sp, tokens, sample_tokens, bos_id)
    sample = tokens[start:stop]
    counts = per_token[start:stop]
    failures = []
    if per_token.numel() != tokens.numel():
        failures.append(f"sidecar has {per_token.numel()} counts for {tokens.numel()} tokens")
    bos_bytes = int(counts[sample == bos_id].sum())
    if bos_bytes:
        failures.append(f"BOS tokens count {bos_bytes} bytes (must be 0)")
    bounds = (sample == bos_id).nonzero().flatten().tolist() + [sample.numel()]
    sidecar_total = 0
    recount_total = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        sidecar_total += int(counts[a + 1 : b].sum())
        recount_total += original_utf8_bytes(sp.decode(sample[a + 1 : b].tolist()))
    difference = sidecar_total - recount_total
    if abs(difference) > SIDECAR_TOLERANCE * max(recount_total, 1):
        failures.append(
            f"sidecar counts {sidecar_total} bytes, the decoded text {recount_total} "
            f"(off by more than {SIDECAR_TOLERANCE:.2%})"
        )
    return {
        "passed": not failures,
        "tokens": int(sample.numel()),
        "sidecar_bytes": sidecar_total,
        "decoded_bytes": recount_total,
        "difference": difference,
        "failures": failures,
    }


def audit_bytes(sp, tokens, luts, sample_tokens=10_000, bos_id=1):
    """Lookup-table bytes of a val sample must equal the UTF-8 bytes of its decoded documents (or,
    with a sidecar, audit_sidecar_bytes)."""
    if isinstance(luts, SidecarBytes):
        return audit_sidecar_bytes(sp, tokens, luts, sample_tokens, bos_id)
    tokens = tokens.detach().cpu().to(torch.int64)
    start, stop = audit_window(sp, tokens, sample_tokens, bos_id)
    sample = tokens[start:stop]
    cpu_luts = tuple(t.cpu() for t in luts)
    lut_total = int(target_bytes(sample[:-1], sample[1:], cpu_luts).sum())
    doc_bounds = (sample == bos_id).nonzero().flatten().tolist() + [sample.numel()]
    decoded_total = sum(
        len(sp.decode(sample[a + 1 : b].tolist()).encode("utf-8"))
        for a, b in zip(doc_bounds[:-1], doc_bounds[1:])
    )
    if not doc_bounds[:-1] or doc_bounds[0] != 0:
        decoded_total += len(sp.decode(sample[1 : doc_bounds[0]].tolist()).encode("utf-8"))
    result = {
        "passed": lut_total == decoded_total,
        "tokens": int(sample.numel()),
        "lut_bytes": lut_total,
        "decoded_bytes": decoded_total,
    }
    if not result["passed"]:
        result["first_mismatch_ids"] = _mismatched_token_ids(sp, sample, cpu_luts)[:8]
    return result


def _mismatched_token_ids(sp, sample, luts):
    """Token ids whose table bytes disagree with their own decoded bytes, for the error message."""
    bad = []
    for prev, cur in zip(sample[:-1].tolist(), sample[1:].tolist()):
        pair_bytes = len(sp.decode([prev, cur]).encode("utf-8"))
        want = pair_bytes - len(sp.decode([prev]).encode("utf-8"))
        got = int(target_bytes(torch.tensor([prev]), torch.tensor([cur]), luts))
        if want != got and cur not in bad:
            bad.append(cur)
    return bad
