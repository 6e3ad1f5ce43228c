"""The CaseOps SP8192 shards built from the official documents: parallel, resumable, unmixed.

    python -m data.download --variant sp8192_caseops --from-docs [--train-shards 80] [--workers N]

1. Fetches docs_selected.jsonl (about 48 GB) and docs_selected.source_manifest.json from the
   official repo (willdepueoai/parameter-golf) into data/, and checks the file's sha256 against
   the manifest's docs_sha256 (a mismatch: one-line error, the file is not kept). A verified file
   gets a stamp (size, mtime, sha256) so a resumed build does not hash 48 GB again.
2. Fetches the CaseOps tokenizer from the CaseOps repo (as the download does).
3. Builds the canonical layout (data/caseops_hub.py): the first 50,000 documents are val (with the
   byte sidecars), files of 1e8 tokens, and the train stream ends with the document that crosses
   80 x 1e8 tokens, whose tail the last train file keeps (the hub manifest's 80 files holding
   8,000,000,058 tokens). --train-shards N builds only the first N of those files.

Workers: the documents are read in chunks of CHUNK_DOCS; worker processes transform and tokenize
the chunks (val documents with their sidecars) and the main process cuts the ordered token streams
into files, each written to a temporary file and renamed.

Resuming: manifest.json is rewritten after every finished file, with the point of the document
stream right after it (document index, byte offset of its line, tokens of it already written).
A rerun checks the files manifest.json lists (size and sha256), keeps the prefix that verifies,
deletes everything after it (temporary files, a file written after the last manifest update) and
continues from there. Files are never trusted on their name alone:

- shard files in the folder with no manifest.json, or one that says they came from elsewhere (the
  hub, data.build), stop the build with a one-line error naming a file;
- a manifest.json of another configuration (another docs_sha256, tokenizer, shard size, val count
  or train file count) also stops it, naming a file and what differs.
Remove the folder (or pass another --local-dir) to build afresh.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from data import caseops
from data.caseops_hub import (
    CASEOPS_REPO_ID,
    DOCS_MANIFEST_NAME,
    DOCS_NAME,
    DOCS_REPO_ID,
    NUM_VAL_DOCS,
    SHARD_SIZE,
    TOKENIZER_NAME,
    TRAIN_FILES,
    _remote,
    file_record,
    local_paths,
    read_folder_manifest,
    remove_if_empty,
    write_export_manifest,
)
from data.hub import make_source
from data.shards import (
    PROGRESS_EVERY_S,
    document_text,
    write_binding,
    write_bytes_atomic,
    write_shard,
)

CHUNK_DOCS = 2048
SHARD_NAME = re.compile(r"fineweb_(val|val_bytes|train)_\d{6}\.bin")
STAMP_SUFFIX = ".verified.json"


def log(message: str) -> None:
    print(f"progress: {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# THE DOCUMENTS
# -----------------------------------------------------------------------------


def sha256_with_progress(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    last = time.perf_counter()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
            done += len(chunk)
            if time.perf_counter() - last >= PROGRESS_EVERY_S:
                last = time.perf_counter()
                log(f"sha256 {path.name} {100 * done / max(size, 1):.0f}%")
    return h.hexdigest()


def _stamp_matches(path: Path, digest: str) -> bool:
    stamp = path.with_name(path.name + STAMP_SUFFIX)
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    stat = path.stat()
    return recorded == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def _write_stamp(path: Path, digest: str) -> None:
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    write_bytes_atomic(path.with_name(path.name + STAMP_SUFFIX), json.dumps(stamp).encode())


def fetch_documents(local_dir: Path, source) -> tuple[Path, str]:
    """docs_selected.jsonl under local_dir, checked against its source manifest's docs_sha256;
    returns (path, sha256)."""
    staging = local_dir / ".download"
    staging.mkdir(parents=True, exist_ok=True)
    kept_manifest = local_dir / DOCS_MANIFEST_NAME
    try:
        got_manifest = source.fetch(_remote(DOCS_MANIFEST_NAME), staging)
    except RuntimeError:
        if not kept_manifest.is_file():
            raise
        # Offline, a resumed build goes on with the source manifest the first run fetched.
        log(f"cannot fetch {DOCS_MANIFEST_NAME}: using {kept_manifest}")
        got_manifest = staging / DOCS_MANIFEST_NAME
        got_manifest.write_bytes(kept_manifest.read_bytes())
    try:
        docs_manifest = json.loads(got_manifest.read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{_remote(DOCS_MANIFEST_NAME)}: not a JSON document") from None
    digest = docs_manifest.get("docs_sha256") if isinstance(docs_manifest, dict) else None
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{_remote(DOCS_MANIFEST_NAME)}: no docs_sha256 to check the documents by")
    os.replace(got_manifest, kept_manifest)
    docs_path = local_dir / DOCS_NAME
    if docs_path.is_file():
        if _stamp_matches(docs_path, digest):
            return docs_path, digest
        actual = sha256_with_progress(docs_path)
        if actual != digest:
            raise ValueError(
                f"{docs_path}: sha256 {actual}, but {DOCS_MANIFEST_NAME} says {digest}; "
                "remove the file to download it again"
            )
        _write_stamp(docs_path, digest)
        return docs_path, digest
    log(f"fetching {DOCS_NAME} from {source.describe()} (about 48 GB for the official file)")
    got = source.fetch(_remote(DOCS_NAME), staging)
    actual = sha256_with_progress(got)
    if actual != digest:
        got.unlink()
        raise ValueError(
            f"{_remote(DOCS_NAME)}: sha256 {actual}, but {DOCS_MANIFEST_NAME} says {digest}; "
            f"the download was discarded, nothing was written to {docs_path}"
        )
    os.replace(got, docs_path)
    _write_stamp(docs_path, digest)
    return docs_path, digest


def read_chunks(docs_path: Path, start_doc: int, start_offset: int, num_val_docs: int, size: int):
    """(split, first document index, [line byte offsets], [lines]) from the document at
    start_offset on; a chunk never mixes val and train documents. Blank lines are skipped."""
    with open(docs_path, "rb") as f:
        f.seek(start_offset)
        offset = start_offset
        doc = start_doc
        lines: list[bytes] = []
        offsets: list[int] = []
        first = doc
        for line in f:
            if line.strip():
                if lines and (len(lines) >= size or doc == num_val_docs):
                    yield ("val" if first < num_val_docs else "train"), first, offsets, lines
                    lines = []
                    offsets = []
                    first = doc
                lines.append(line)
                offsets.append(offset)
                doc += 1
            offset += len(line)
        if lines:
            yield ("val" if first < num_val_docs else "train"), first, offsets, lines


# -----------------------------------------------------------------------------
# WORKERS
# -----------------------------------------------------------------------------

_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    _SP = caseops.load_caseops_tokenizer(model_path)


def encode_chunk(task: tuple) -> tuple:
    """(per-document token counts, tokens, sidecar or None) of one chunk, in document order."""
    split, first, lines, where = task
    texts = [document_text(line, f"{where}: document {first + i}") for i, line in enumerate(lines)]
    if split == "val":
        parts = [caseops.tokenize_document(_SP, text) for text in texts]
        tokens = [p[0] for p in parts]
        sidecar = np.concatenate([p[1] for p in parts])
    else:
        # One thread per worker: the parallelism is the processes'.
        transformed = [caseops.encode(text) for text in texts]
        encoded = _SP.encode(transformed, out_type=int, num_threads=1)
        tokens = [np.array([caseops.BOS_ID, *ids], dtype=np.uint16) for ids in encoded]
        sidecar = None
    lengths = np.array([t.size for t in tokens], dtype=np.int64)
    return lengths, np.concatenate(tokens), sidecar


def ordered_results(tasks, workers: int, model_path: Path):
    """encode_chunk over tasks, in order, with at most 2 x workers chunks in flight (Pool.imap
    would read the whole 48 GB ahead)."""
    if workers <= 1:
        _init_worker(str(model_path))
        for head, args in tasks:
            yield head, encode_chunk(args)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        pending = []
        for head, args in tasks:
            pending.append((head, pool.apply_async(encode_chunk, (args,))))
            if len(pending) >= 2 * workers:
                head, result = pending.pop(0)
                yield head, result.get()
        for head, result in pending:
            yield head, result.get()


# -----------------------------------------------------------------------------
# CUTTING THE STREAMS INTO FILES
# -----------------------------------------------------------------------------


class _Stream:
    """One split's buffered tokens (and sidecar) with the table of where each buffered document
    starts, so that a cut at any token knows the stream point right after it."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.sidecar: list[np.ndarray] = []
        self.size = 0
        self.starts = np.zeros(0, dtype=np.int64)  # buffer position of each document's start
        self.docs = np.zeros(0, dtype=np.int64)
        self.offsets = np.zeros(0, dtype=np.int64)

    def add(self, first, offsets, lengths, tokens, sidecar, skip):
        starts = self.size + np.concatenate([[0], np.cumsum(lengths)[:-1]]) - skip
        if skip:
            tokens = tokens[skip:]
            sidecar = None if sidecar is None else sidecar[skip:]
        self.starts = np.concatenate([self.starts, starts])
        self.docs = np.concatenate([self.docs, first + np.arange(len(lengths))])
        self.offsets = np.concatenate([self.offsets, offsets])
        self.tokens.append(tokens)
        if sidecar is not None:
            self.sidecar.append(sidecar)
        self.size += tokens.size

    def point(self, position: int, next_doc: int, next_offset: int) -> list[int]:
        """[document, byte offset of its line, tokens of it already taken] of the stream point at
        buffer position `position`; (next_doc, next_offset) is the first document not read yet."""
        if position >= self.size:
            return [next_doc, next_offset, 0]
        j = int(np.searchsorted(self.starts, position, side="right")) - 1
        return [int(self.docs[j]), int(self.offsets[j]), position - int(self.starts[j])]

    def end_of_doc_at(self, position: int) -> int:
        """Buffer position where the document holding token `position` ends. A chunk holds
        whole documents, so that document is always in the buffer."""
        j = int(np.searchsorted(self.starts, position, side="right")) - 1
        return int(self.starts[j + 1]) if j + 1 < self.starts.size else self.size

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The first `count` tokens (and sidecar counts); the document the cut falls inside
        stays in the table, at a negative start."""
        tokens = np.concatenate(self.tokens)
        sidecar = np.concatenate(self.sidecar) if self.sidecar else None
        self.tokens = [tokens[count:]]
        self.sidecar = [] if sidecar is None else [sidecar[count:]]
        self.size -= count
        first_kept = max(int(np.searchsorted(self.starts, count, side="right")) - 1, 0)
        if self.size == 0:
            first_kept = self.starts.size
        self.starts = self.starts[first_kept:] - count
        self.docs = self.docs[first_kept:]
        self.offsets = self.offsets[first_kept:]
        return tokens[:count], None if sidecar is None else sidecar[:count]


def config_of(docs_sha: str, tokenizer_sha: str, num_val_docs, shard_size, train_files) -> dict:
    return {
        "docs_sha256": docs_sha,
        "tokenizer_sha256": tokenizer_sha,
        "text_transform": caseops.TRANSFORM_NAME,
        "shard_size": shard_size,
        "num_val_docs": num_val_docs,
        "train_files": train_files,
    }


def _present_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("fineweb_*.bin") if SHARD_NAME.fullmatch(p.name))


def resume_state(out_dir: Path, config: dict) -> tuple[list[dict], dict, bool]:
    """(verified records to keep, their resume points, complete) after refusing foreign shards
    and deleting what is not verified (see the module docstring)."""
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink()
    present = _present_shards(out_dir)
    manifest = read_folder_manifest(out_dir)
    source = (manifest or {}).get("source") or {}
    if manifest is None or source.get("kind") != "docs":
        if present:
            why = "no manifest.json" if manifest is None else "its manifest.json says otherwise"
            raise ValueError(
                f"{present[0]}: not made by --from-docs ({why}); remove the folder's shards or "
                "use another --local-dir"
            )
        return [], {}, False
    recorded = source.get("config") or {}
    for key, value in config.items():
        if recorded.get(key) != value:
            named = present[0] if present else out_dir / "manifest.json"
            raise ValueError(
                f"{named}: built with {key}={recorded.get(key)!r}, this build has {value!r}; "
                "remove the folder's shards or use another --local-dir"
            )
    points = source.get("resume") or {}
    kept: list[dict] = []
    by_name = {f["name"]: f for f in manifest.get("files", [])}
    for entry in manifest.get("files", []):
        path = out_dir / entry["name"]
        record = None
        if path.is_file() and path.stat().st_size == entry["bytes"]:
            record = file_record(path)
        if record is None or record["sha256"] != entry["sha256"]:
            log(f"{path.name} missing or not the one manifest.json records: rebuilding from it")
            break
        kept.append(record)
    # a val shard is kept only with its sidecar
    while kept and kept[-1]["split"] == "val":
        kept.pop()
    kept_names = {r["name"] for r in kept}
    for path in _present_shards(out_dir):
        if path.name not in kept_names:
            path.unlink()
    complete = bool(source.get("complete")) and len(kept) == len(by_name)
    return kept, {k: v for k, v in points.items() if k in kept_names}, complete


def build_from_docs(
    train_shards: int = TRAIN_FILES,
    local_dir: str | os.PathLike = "data",
    hub_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    num_val_docs: int = NUM_VAL_DOCS,
    shard_size: int = SHARD_SIZE,
    train_files: int = TRAIN_FILES,
    chunk_docs: int = CHUNK_DOCS,
    docs_repo_id: str = DOCS_REPO_ID,
    repo_id: str = CASEOPS_REPO_ID,
) -> dict:
    """Fetch and check the documents and the tokenizer, then build (or resume) the shards."""
    if num_val_docs < 1 or shard_size < 1:
        raise ValueError(f"num_val_docs={num_val_docs}, shard_size={shard_size}: must be >= 1")
    if not 0 <= train_shards <= train_files:
        raise ValueError(f"--train-shards {train_shards}: must be in 0..{train_files}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    out_dir, tokenizer_path = local_paths(local_dir)
    try:
        docs_path, docs_sha = fetch_documents(local_dir, make_source(docs_repo_id, hub_dir))
    except BaseException:
        remove_if_empty(local_dir / ".download")
        raise
    if not tokenizer_path.is_file():
        staging = local_dir / ".download"
        got = make_source(repo_id, hub_dir).fetch(_remote(f"tokenizers/{TOKENIZER_NAME}"), staging)
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, tokenizer_path)
    caseops.load_caseops_tokenizer(tokenizer_path)
    tokenizer_sha = file_sha(tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_of(docs_sha, tokenizer_sha, num_val_docs, shard_size, train_files)
    summary = build_shards(
        docs_path, tokenizer_path, out_dir, config, train_shards, workers, chunk_docs
    )
    return {"docs": str(docs_path), "docs_sha256": docs_sha, "tokenizer": str(tokenizer_path)} | (
        summary
    )


def file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Builder:
    """The files of one build: numbering, the manifest rewritten after each file, progress."""

    def __init__(self, out_dir, tokenizer_path, config, records, points, complete, goal):
        self.out_dir = out_dir
        self.tokenizer_path = tokenizer_path
        self.config = config
        self.records = records
        self.points = points
        self.complete = complete
        self.goal = goal
        self.counts = {
            split: sum(1 for r in records if r["split"] == split) for split in ("val", "train")
        }
        self.kept = len(records)
        self.t0 = time.perf_counter()

    def resume_point(self) -> list[int]:
        last = [r for r in self.records if r["split"] != "val_bytes"]
        return self.points[last[-1]["name"]] if last else [0, 0, 0]

    def save(self) -> None:
        source = {
            "kind": "docs",
            "docs": DOCS_NAME,
            "config": self.config,
            "complete": self.complete,
            "resume": self.points,
        }
        shard_size = self.config["shard_size"]
        write_export_manifest(self.out_dir, self.tokenizer_path, self.records, source, shard_size)

    def emit(self, split: str, tokens, sidecar, point: list[int]) -> None:
        """Write one file (and its sidecar), then record it and the stream point after it."""
        index = self.counts[split]
        name = f"fineweb_{split}_{index:06d}.bin"
        write_shard(self.out_dir / name, tokens)
        self.records.append(file_record(self.out_dir / name))
        if sidecar is not None:
            side = f"fineweb_val_bytes_{index:06d}.bin"
            write_shard(self.out_dir / side, sidecar)
            self.records.append(file_record(self.out_dir / side))
        self.points[name] = point
        self.counts[split] += 1
        self.save()
        elapsed = time.perf_counter() - self.t0
        done = f"{self.counts['train']}/{self.goal} train files" if split == "train" else "val"
        log(f"from-docs wrote {name} ({done}, next document {point[0]:,}, {elapsed:.0f}s)")

    def finish(self) -> dict:
        vocab = caseops.load_caseops_tokenizer(self.tokenizer_path).vocab_size()
        write_binding(self.out_dir, self.tokenizer_path, vocab)

        def total(split: str, key: str) -> int:
            return sum(r[key] for r in self.records if r["split"] == split)

        return {
            "dataset": str(self.out_dir),
            "val_shards": self.counts["val"],
            "train_shards": self.counts["train"],
            "kept": self.kept,
            "written": len(self.records) - self.kept,
            "complete": self.complete,
            "val_docs": total("val", "docs"),
            "val_tokens": total("val", "num_tokens"),
            "train_tokens": total("train", "num_tokens"),
            "val_original_bytes": total("val_bytes", "original_bytes"),
        }


def build_shards(
    docs_path: Path,
    tokenizer_path: Path,
    out_dir: Path,
    config: dict,
    train_shards: int,
    workers: int,
    chunk_docs: int = CHUNK_DOCS,
) -> dict:
    """Build or resume the files of `config` from docs_path into out_dir (module docstring)."""
    shard_size = config["shard_size"]
    num_val_docs = config["num_val_docs"]
    train_files = config["train_files"]
    records, points, complete = resume_state(out_dir, config)
    builder = _Builder(out_dir, tokenizer_path, config, records, points, complete, train_shards)
    start = builder.resume_point()
    if not records:
        builder.save()  # from here on the folder is this build's
    val_done = start[0] >= num_val_docs and start[2] == 0 and builder.counts["val"] > 0
    if complete or (val_done and builder.counts["train"] >= train_shards):
        return builder.finish()

    streams = {"val": _Stream(), "train": _Stream()}
    skip = start[2]
    next_doc = start[0]
    next_offset = start[1]
    chunks = read_chunks(docs_path, start[0], start[1], num_val_docs, chunk_docs)
    tasks = ((c, (c[0], c[1], c[3], str(docs_path))) for c in chunks)
    last_log = time.perf_counter()
    results = ordered_results(tasks, workers, tokenizer_path)
    for (split, first, offsets, lines), (lengths, tokens, sidecar) in results:
        next_doc = first + len(lines)
        next_offset = offsets[-1] + len(lines[-1])
        if split == "train" and streams["val"].size:  # the val split ends here
            part, side = streams["val"].take(streams["val"].size)
            builder.emit("val", part, side, [first, offsets[0], 0])
        if split == "train" and train_shards == 0:
            break
        stream = streams[split]
        stream.add(first, np.array(offsets, dtype=np.int64), lengths, tokens, sidecar, skip)
        skip = 0
        while (
            stream.size >= shard_size
            and not builder.complete
            and not (split == "train" and builder.counts["train"] >= train_shards)
        ):
            last_file = split == "train" and builder.counts["train"] == train_files - 1
            # The last train file ends with the document that crosses the train budget.
            cut = stream.end_of_doc_at(shard_size - 1) if last_file else shard_size
            point = stream.point(cut, next_doc, next_offset)
            part, side = stream.take(cut)
            builder.emit(split, part, side, point)
            builder.complete = last_file
        if builder.complete or (split == "train" and builder.counts["train"] >= train_shards):
            break
        if time.perf_counter() - last_log >= PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            log(f"from-docs read {next_doc:,} documents")
    else:  # the documents ran out: the last files hold the rest
        for split in ("val", "train"):
            if streams[split].size:
                part, side = streams[split].take(streams[split].size)
                builder.emit(split, part, side, [next_doc, next_offset, 0])
        builder.complete = True
    results.close()
    builder.save()
    return builder.finish()
