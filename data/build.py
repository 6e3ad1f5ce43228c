"""Tokenizer and shard builder: any corpus -> SentencePiece BPE (official settings) -> shards.

The settings are those of the official export (docs/rules.md, Data) so that a tokenizer built here
behaves like fineweb_1024_bpe.model: byte fallback (no <unk> on real text), split digits, nmt_nfkc
normalization, pad/bos/eos/unk = 0/1/2/3. A document becomes [BOS] + encode(text) with no EOS, and
validation is the first N documents, as in the official export.

    python -m data.build tokenizer --input docs.jsonl --vocab-size 1024 \\
        --model data/tokenizers/my_1024_bpe.model
    python -m data.build shards --input docs.jsonl --model data/tokenizers/my_1024_bpe.model \\
        --out-dir data/datasets/my_sp1024 --num-val-docs 50000
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data.caseops import CASEOPS_SHARD_TOKENS, check_caseops_export, export_caseops_shards
from data.shards import (
    MAX_TOKEN_ID,
    SHARD_SIZE,
    check_export_args,
    document_text,
    progress,
    remove_stale_shards,
    sha256_file,
    shard_info,
    write_binding,
    write_bytes_atomic,
    write_shard,
)

# Official trainer settings (docs/rules.md, Data); ids are fixed so every script can rely on BOS=1.
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    hard_vocab_limit=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)
# A fixed thread count and no sampling of the input: the same corpus gives the same model bytes.
TOKENIZER_THREADS = 2
ENCODE_BATCH_DOCS = 256


# -----------------------------------------------------------------------------
# DOCUMENTS
# -----------------------------------------------------------------------------


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of one corpus file.

    - `.jsonl` / `.jsonl.gz`: one JSON object per line with a string "text" field; blank lines are
      skipped.
    - `.txt` / `.txt.gz`: plain text; a document is a block of lines ended by one or more blank
      lines (lines holding only whitespace count as blank), i.e. paragraphs separated by two or
      more newlines.
    """
    path = Path(path)
    name = path.name
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith(".jsonl"):
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield document_text(line, f"{path}:{lineno}")
    elif stem.endswith(".txt"):
        with opener(path, "rt", encoding="utf-8") as f:
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                yield "".join(block).rstrip("\n")
    else:
        raise ValueError(
            f"{path}: unsupported corpus file (expected .jsonl, .jsonl.gz, .txt or .txt.gz)"
        )


def iter_corpus(paths: Iterable[str | os.PathLike], max_docs: int | None = None) -> Iterator[str]:
    """Documents of several files in order, optionally only the first max_docs."""
    docs = itertools.chain.from_iterable(iter_documents(p) for p in paths)
    return itertools.islice(docs, max_docs) if max_docs is not None else docs


# -----------------------------------------------------------------------------
# TOKENIZER
# -----------------------------------------------------------------------------


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    # SentencePiece skips any sentence over max_sentence_length (4,192 bytes), which would drop most
    # long documents. BPE pieces never cross whitespace and nmt_nfkc folds newlines to spaces, so
    # feeding the non-empty lines of each document loses nothing and keeps every document.
    for doc in documents:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                yield line


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, model_path: str | os.PathLike
) -> Path:
    """Train a SentencePiece BPE with the official settings; writes model_path and its .vocab.

    Deterministic: the whole input is used in order (no sampling, no shuffle) with a fixed thread
    count, and the model is serialized in memory (a model_prefix on disk would be recorded inside
    the model, so the bytes would depend on the output path). With hard_vocab_limit=False a small
    corpus may give fewer pieces than vocab_size. Model and .vocab are written atomically.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"{model_path}: tokenizer path must end in .model")
    if not 260 < vocab_size <= MAX_TOKEN_ID + 1:
        raise ValueError(
            f"vocab_size={vocab_size}: must be above 260 (4 specials + 256 byte pieces) "
            "and at most 65,536"
        )
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents),
            model_writer=writer,
            vocab_size=vocab_size,
            num_threads=TOKENIZER_THREADS,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
            **TOKENIZER_SETTINGS,
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"{model_path}: SentencePiece training failed: {str(e).strip()}"
        ) from None
    proto = writer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # The .vocab text SentencePiece itself writes: "piece<TAB>score" per id, the score as C++
    # prints a float.
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(model_path.with_suffix(".vocab"), vocab.encode("utf-8"))
    write_bytes_atomic(model_path, proto)
    return model_path


def load_tokenizer(model_path: str | os.PathLike):
    """Load a SentencePiece model, refusing vocabularies that do not fit uint16 shards."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if sp.vocab_size() > MAX_TOKEN_ID + 1:
        raise ValueError(
            f"{model_path}: vocab size {sp.vocab_size()} above 65,536 does not fit uint16 shards"
        )
    if sp.bos_id() < 0:
        raise ValueError(f"{model_path}: tokenizer has no BOS piece; documents could not be split")
    return sp


# -----------------------------------------------------------------------------
# SHARDS
# -----------------------------------------------------------------------------


class _SplitWriter:
    """Buffers one split's token stream and cuts it into files of exactly shard_size tokens."""

    def __init__(self, out_dir: Path, name: str, shard_size: int, vocab_size: int):
        self.out_dir = out_dir
        self.name = name
        self.shard_size = shard_size
        self.vocab_size = vocab_size
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[Path] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += tokens.size
        self.tokens += tokens.size
        while self.buffered >= self.shard_size:
            stream = np.concatenate(self.buffer)
            self._write(stream[: self.shard_size])
            rest = stream[self.shard_size :]
            self.buffer = [rest]
            self.buffered = rest.size

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer = []
        self.buffered = 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / f"{self.name}_{len(self.files):06d}.bin"
        self.files.append(write_shard(path, tokens, self.vocab_size))


def export_shards(
    documents: Iterable[str],
    sp_model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_val_docs: int,
    shard_size: int = SHARD_SIZE,
    prefix: str = "fineweb",
) -> dict:
    """Tokenize documents into `{prefix}_val_%06d.bin` (the first num_val_docs) and
    `{prefix}_train_%06d.bin`.

    Each document is [BOS] + encode(text), no EOS. Each split is one token stream cut into files of
    exactly shard_size tokens (the last file of a split holds the rest), so a document may span two
    files, as in the official export; val and train never share a file. Writes out_dir/manifest.json
    (tokenizer sha256, vocab size, document and token counts, per-file sha256) and
    out_dir/shards.json (the tokenizer binding the training scripts check), removes shards of an
    earlier export that this one did not write, and returns the manifest.
    """
    check_export_args(num_val_docs, shard_size)
    sp_model_path = Path(sp_model_path)
    out_dir = Path(out_dir)
    sp = load_tokenizer(sp_model_path)
    bos = sp.bos_id()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = int(sp.vocab_size())
    writers = {
        "val": _SplitWriter(out_dir, f"{prefix}_val", shard_size, vocab_size),
        "train": _SplitWriter(out_dir, f"{prefix}_train", shard_size, vocab_size),
    }
    counts = {"val": 0, "train": 0}
    text_bytes = {"val": 0, "train": 0}

    def flush(split: str, batch: list[str]) -> None:
        for ids in sp.encode(batch, out_type=int):
            writers[split].add(np.array([bos, *ids], dtype=np.uint16))
        counts[split] += len(batch)
        text_bytes[split] += sum(len(t.encode("utf-8")) for t in batch)
        batch.clear()

    batch: list[str] = []
    split = "val"
    docs = progress(documents, f"export {out_dir.name}", unit="doc")
    for i, text in enumerate(docs):
        doc_split = "val" if i < num_val_docs else "train"
        if doc_split != split or len(batch) >= ENCODE_BATCH_DOCS:
            flush(split, batch)
            split = doc_split
        batch.append(text)
    flush(split, batch)
    for writer in writers.values():
        writer.close()

    written = {p.name for w in writers.values() for p in w.files}
    remove_stale_shards(out_dir, prefix, ("val", "train"), written)

    manifest = {
        "tokenizer": {
            "model": sp_model_path.name,
            "sha256": sha256_file(sp_model_path),
            "vocab_size": int(sp.vocab_size()),
            "bos_id": int(bos),
            "eos_id": int(sp.eos_id()),
        },
        "append_eos": False,
        "shard_size": shard_size,
        "num_docs": counts["val"] + counts["train"],
        "num_val_docs": counts["val"],
        "num_train_docs": counts["train"],
        "tokens_val": writers["val"].tokens,
        "tokens_train": writers["train"].tokens,
        "text_bytes_val": text_bytes["val"],
        "text_bytes_train": text_bytes["train"],
        "files": [
            {"name": p.name, "split": split, **shard_info(p)}
            for split, w in writers.items()
            for p in w.files
        ],
    }
    write_json(out_dir / "manifest.json", manifest)
    write_binding(out_dir, sp_model_path, vocab_size)
    return manifest


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write: a reader never sees a half-written manifest."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def verify_manifest(
    out_dir: str | os.PathLike, sp_model_path: str | os.PathLike | None = None
) -> list[str]:
    """Problems found checking an export against its manifest (sha256 of every file).

    [] when intact.
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{out_dir / 'manifest.json'}: unreadable ({e.__class__.__name__})"]
    problems = []
    checks = [(out_dir / f["name"], f["sha256"]) for f in manifest.get("files", [])]
    if sp_model_path is not None:
        checks.append((Path(sp_model_path), manifest.get("tokenizer", {}).get("sha256")))
    for path, digest in checks:
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def print_summary(summary: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")


def report(action, as_json: bool = False) -> int:
    """Run a CLI's action: its summary as `key: value` lines (or JSON), or one `error:` line and
    exit status 1."""
    try:
        summary = action()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary, as_json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.build",
        description=(
            "Train a SentencePiece BPE tokenizer with the official settings "
            "and export documents to shards."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a tokenizer (writes MODEL and its .vocab)")
    shards = sub.add_parser(
        "shards", help="export documents to fineweb_{val,train}_%%06d.bin + manifest.json"
    )
    for p in (tok, shards):
        p.add_argument(
            "--input",
            action="append",
            required=True,
            metavar="FILE",
            help=(
                "corpus file: .jsonl(.gz) with a 'text' field, or .txt(.gz) with "
                "blank-line-separated documents; repeatable, read in order"
            ),
        )
        p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
        p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    tok.add_argument("--vocab-size", type=int, default=1024, help="number of pieces (default 1024)")
    tok.add_argument("--model", required=True, help="output path, must end in .model")
    shards.add_argument("--model", required=True, help="SentencePiece model to encode with")
    shards.add_argument(
        "--out-dir", required=True, help="directory for the shards and manifest.json"
    )
    shards.add_argument(
        "--num-val-docs",
        type=int,
        required=True,
        help="the first N documents form the validation split",
    )
    shards.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"tokens per file (default {SHARD_SIZE}; {CASEOPS_SHARD_TOKENS} with --caseops)",
    )
    shards.add_argument(
        "--caseops",
        action="store_true",
        help="CaseOps-transform the documents first (PR #1729; use the CaseOps tokenizer) and "
        "write the fineweb_val_bytes_*.bin sidecars of original UTF-8 bytes",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        docs = iter_corpus(args.input, args.max_docs)
        if args.command == "tokenizer":
            path = train_tokenizer(docs, args.vocab_size, args.model)
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path))
            summary = {
                "model": str(path),
                "vocab_size": sp.vocab_size(),
                "sha256": sha256_file(path),
            }
        elif args.caseops:
            m = export_caseops_shards(
                docs,
                args.model,
                args.out_dir,
                num_val_docs=args.num_val_docs,
                shard_size=args.shard_size or CASEOPS_SHARD_TOKENS,
            )
            checked = check_caseops_export(args.out_dir, args.model)
            summary = {
                "out_dir": args.out_dir,
                "transform": m["text_transform"],
                "val_docs": m["num_val_docs"],
                "train_docs": m["num_train_docs"],
                "val_tokens": m["tokens_val"],
                "train_tokens": m["tokens_train"],
                "val_original_bytes": m["original_bytes_val"],
                "sidecars_checked": checked["val_files"],
            }
        else:
            m = export_shards(
                docs,
                args.model,
                args.out_dir,
                args.num_val_docs,
                shard_size=args.shard_size or SHARD_SIZE,
            )
            summary = {
                "out_dir": args.out_dir,
                "docs": m["num_docs"],
                "val_docs": m["num_val_docs"],
                "train_docs": m["num_train_docs"],
                "val_tokens": m["tokens_val"],
                "train_tokens": m["tokens_train"],
                "files": len(m["files"]),
            }
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
