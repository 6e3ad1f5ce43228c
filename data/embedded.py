"""The embedded default corpus: the documentation inside the user's own Python, no network needed.

Why: the main README command must train and score a model on a fresh machine with no download.
Every Python ships its reference prose (`pydoc_data.topics`, the text behind `help("with")`) and the
standard library's docstrings: about 1.6 MB of English technical text, identical for a given Python
build.

Documents: one per pydoc topic (sorted by key), then one per standard-library module (collected in a
child process by data/_stdlib_docs.py), each normalized with inspect.cleandoc, then shuffled with
random.Random(1337) so that validation and train are drawn from the same mix. Validation is the
first documents of that order up to about VAL_TEXT_BYTES of text; the tokenizer is trained on the
train documents only.

    python -m data.embedded [--out-root data] [--vocab-size 1024] [--force] [--json]

writes data/tokenizers/pydoc_1024_bpe.model (+ .vocab) and data/datasets/pydoc_sp1024/
fineweb_{val,train}_000000.bin + manifest.json + shards.json, and prints the counts and
unigram_bpb: the bits per byte of the val tokens under the train unigram distribution (add-one
smoothing), the floor a trained model must beat.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data.build import (
    export_shards,
    load_tokenizer,
    report,
    train_tokenizer,
    verify_manifest,
    write_json,
)
from data.shards import BINDING_NAME, read_shard, write_binding

SEED = 1337
VAL_TEXT_BYTES = 320_000  # ~120k sp1024 tokens: enough for smoke evals of 1024-token sequences
VAL_MAX_FRACTION = 0.3  # small (test) corpora: val takes at most this share of the text
MIN_VAL_TOKENS = 70_000  # full builds: smoke training evaluates sequences of up to 1024 tokens
BUILDER_VERSION = 1  # bump when the corpus recipe changes, so cached builds are rebuilt


# -----------------------------------------------------------------------------
# CORPUS
# -----------------------------------------------------------------------------


def pydoc_topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [inspect.cleandoc(topics[key]) for key in sorted(topics) if topics[key].strip()]


def stdlib_documents(timeout_s: float = 300.0) -> list[str]:
    """One document per importable pure-Python stdlib module, sorted by module name.

    Collected in a child process with a fixed hash seed, no user site-packages, no bytecode writes
    and stdin/stdout/stderr captured, so import-time noise never reaches this process or its output.
    """
    worker = Path(__file__).with_name("_stdlib_docs.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")
    with tempfile.TemporaryDirectory(prefix="pydoc_corpus.") as tmp:
        out = Path(tmp) / "docs.json"
        try:
            proc = subprocess.run(
                [sys.executable, "-B", "-s", str(worker), str(out)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{worker}: collecting stdlib docstrings took over {timeout_s:.0f} s"
            ) from None
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{worker}: exited with status {proc.returncode}: {tail[0]}")
        docs = json.loads(out.read_text(encoding="utf-8"))
    return [docs[name] for name in sorted(docs)]


def embedded_documents(max_docs: int | None = None) -> list[str]:
    """The corpus in its fixed shuffled order; max_docs keeps only the first N (for quick tests)."""
    docs = pydoc_topic_documents() + stdlib_documents()
    random.Random(SEED).shuffle(docs)
    return docs[:max_docs] if max_docs is not None else docs


def choose_num_val_docs(docs: list[str]) -> int:
    """The first documents up to VAL_TEXT_BYTES of text (at most VAL_MAX_FRACTION), leaving train
    non-empty."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    target = min(VAL_TEXT_BYTES, VAL_MAX_FRACTION * sum(sizes))
    total = 0
    for i, size in enumerate(sizes):
        total += size
        if total >= target:
            return max(1, min(i + 1, len(docs) - 1))
    return max(1, len(docs) - 1)


# -----------------------------------------------------------------------------
# BUILD
# -----------------------------------------------------------------------------


def output_paths(out_root: str | os.PathLike, vocab_size: int) -> tuple[Path, Path]:
    out_root = Path(out_root)
    return (
        out_root / "tokenizers" / f"pydoc_{vocab_size}_bpe.model",
        out_root / "datasets" / f"pydoc_sp{vocab_size}",
    )


def unigram_bpb(sp, train: np.ndarray, val: np.ndarray) -> tuple[float, int]:
    """Bits per byte of val under the add-one-smoothed train unigram; also returns the val byte
    count.

    Targets are val[1:] (every token has a predecessor, as in the challenge eval); bytes are the
    UTF-8 length of each decoded document, so BOS tokens cost bits but carry no bytes.
    """
    vocab = sp.vocab_size()
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    log_p = np.log2((counts + 1.0) / (counts.sum() + vocab))
    bits = -float(log_p[val[1:]].sum())
    starts = np.flatnonzero(val == sp.bos_id())
    ids = val.astype(np.int64).tolist()
    bounds = list(starts) + [len(ids)]
    docs = [ids[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:])]
    num_bytes = sum(len(text.encode("utf-8")) for text in sp.decode(docs)) if docs else 0
    if num_bytes == 0:
        raise RuntimeError("val split decodes to 0 bytes; cannot compute bits per byte")
    return bits / num_bytes, num_bytes


def _source(docs: list[str], vocab_size: int, max_docs: int | None) -> dict:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return {
        "corpus": "pydoc",
        "builder_version": BUILDER_VERSION,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "vocab_size": vocab_size,
        "max_docs": max_docs,
        "docs_sha256": digest.hexdigest(),
    }


def build_embedded(
    out_root: str | os.PathLike = "data",
    vocab_size: int = 1024,
    force: bool = False,
    max_docs: int | None = None,
) -> dict:
    """Build (or verify) the embedded tokenizer and shards; returns the summary that the CLI prints.

    Skips the work when the manifest records the same corpus and settings and every sha256 verifies.
    """
    start = time.perf_counter()
    model_path, dataset_dir = output_paths(out_root, vocab_size)
    docs = embedded_documents(max_docs)
    if len(docs) < 2:
        raise ValueError(f"max_docs={max_docs}: need at least 2 documents (one val, one train)")
    source = _source(docs, vocab_size, max_docs)
    where = {
        "tokenizer": str(model_path),
        "dataset": str(dataset_dir),
    }  # not stored: the manifest stays path-free

    manifest_path = dataset_dir / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if (
            old.get("source") == source
            and "summary" in old
            and model_path.with_suffix(".vocab").is_file()
            and not verify_manifest(dataset_dir, model_path)
        ):
            if not (dataset_dir / BINDING_NAME).is_file():  # a build from before the binding
                write_binding(dataset_dir, model_path, old["summary"]["vocab_size"])
            return {
                "status": "up to date",
                **old["summary"],
                **where,
                "seconds": round(time.perf_counter() - start, 2),
            }

    num_val = choose_num_val_docs(docs)
    train_tokenizer(docs[num_val:], vocab_size, model_path)
    manifest = export_shards(docs, model_path, dataset_dir, num_val_docs=num_val)
    if max_docs is None and manifest["tokens_val"] < MIN_VAL_TOKENS:
        raise RuntimeError(
            f"{dataset_dir}: val holds {manifest['tokens_val']} tokens, "
            f"fewer than {MIN_VAL_TOKENS}; try a smaller --vocab-size than {vocab_size}"
        )

    sp = load_tokenizer(model_path)
    files = {f["split"]: [] for f in manifest["files"]}
    for f in manifest["files"]:
        files[f["split"]].append(read_shard(dataset_dir / f["name"]))
    val = np.concatenate(files["val"])
    train = np.concatenate(files["train"])
    bpb, val_bytes = unigram_bpb(sp, train, val)
    summary = {
        "corpus": f"pydoc ({source['python']})",
        "docs": manifest["num_docs"],
        "val_docs": manifest["num_val_docs"],
        "train_docs": manifest["num_train_docs"],
        "bytes": manifest["text_bytes_val"] + manifest["text_bytes_train"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "train_tokens": manifest["tokens_train"],
        "val_tokens": manifest["tokens_val"],
        "val_bytes": val_bytes,
        "unigram_bpb": round(bpb, 4),
        # which targets: a training run's quick look prints its own figure on its val prefix
        "unigram_split": f"the whole val split ({max(len(val) - 1, 0):,} targets)",
    }
    write_json(manifest_path, {**manifest, "source": source, "summary": summary})
    return {"status": "built", **summary, **where, "seconds": round(time.perf_counter() - start, 2)}


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.embedded",
        description=(
            "Build the offline default corpus (pydoc topics + stdlib docstrings of this Python): "
            "a SentencePiece tokenizer and official-format shards."
        ),
    )
    parser.add_argument(
        "--out-root", default="data", help="root for tokenizers/ and datasets/ (default: data)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=1024, help="tokenizer vocabulary size (default: 1024)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the outputs verify")
    parser.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help="use only the first N shuffled documents (quick tests)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(
        lambda: build_embedded(
            args.out_root, args.vocab_size, force=args.force, max_docs=args.max_docs
        ),
        args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
