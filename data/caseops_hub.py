"""The CaseOps SP8192 data of the `record` preset in one command: the canonical hub export.

    python -m data.download --variant sp8192_caseops [--train-shards 80]
    python -m data.download --variant sp8192_caseops --from-docs [--workers 16]

The records (PR #1729 onwards; PR #1855 is the `record` preset) train on the CaseOps export hosted
as the dataset repo `romeerp/parameter-golf-caseops-v1`:

    datasets/manifest.json  (the official exporter's format: stats per dataset, shard_size)
    datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/
        fineweb_val_000000.bin, fineweb_val_bytes_000000.bin, fineweb_train_000000.bin ...
    datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model

Its manifest reports 50,000 val docs, 80 train files and 8,000,000,058 train tokens (PR #1953's
README), so its shards hold 1e8 tokens like the official export's, the val split is one file, and
the last train file ends with the document that crosses 8e9 train tokens. It is written locally
where the preset looks: data/datasets/fineweb10B_sp8192_caseops/ and data/tokenizers/.

A download is verified file by file: the shard header and the token count the manifest implies,
and the size and sha256 the hub publishes for each file (a local hub folder publishes none); then
our own builder must reproduce the first val documents byte for byte: the first CHECK_DOCS
documents of the official docs_selected.jsonl (read from its head, a few hundred KB), transformed
and tokenized by data/caseops.py, must equal the start of the fetched val tokens and of their
byte sidecar. Only then are manifest.json (every file's sha256, the counts, the original bytes of
the val split; golf/data.py checks the sidecars against it) and shards.json (the tokenizer
binding) written. --from-docs builds the same folder from docs_selected.jsonl (data/fromdocs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data import caseops
from data.hub import expected_shard_tokens, make_source
from data.shards import (
    HEADER_BYTES,
    check_shard,
    document_text,
    progress,
    read_shard,
    write_binding,
    write_bytes_atomic,
)

CASEOPS_REPO_ID = "romeerp/parameter-golf-caseops-v1"
DOCS_REPO_ID = "willdepueoai/parameter-golf"
REMOTE_PREFIX = "datasets"
VARIANT = "sp8192_caseops"
HUB_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
TOKENIZER_NAME = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
# Where the record preset looks (golf/models/gpt.py PRESETS["record"]).
LOCAL_DATASET = "fineweb10B_sp8192_caseops"
DOCS_NAME = "docs_selected.jsonl"
DOCS_MANIFEST_NAME = "docs_selected.source_manifest.json"
# The canonical layout (the hub manifest's figures): the first 50,000 documents are val, files of
# 1e8 tokens, 80 train files.
NUM_VAL_DOCS = 50_000
SHARD_SIZE = 10**8
TRAIN_FILES = 80
CHECK_DOCS = 16


def local_paths(local_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(dataset folder, tokenizer path) of the CaseOps data under local_dir."""
    local_dir = Path(local_dir)
    return local_dir / "datasets" / LOCAL_DATASET, local_dir / "tokenizers" / TOKENIZER_NAME


def _remote(relative: str) -> str:
    return f"{REMOTE_PREFIX}/{relative}" if REMOTE_PREFIX else relative


# -----------------------------------------------------------------------------
# THE FOLDER'S MANIFEST (both routes write the same one)
# -----------------------------------------------------------------------------


def split_of(name: str) -> str:
    """fineweb_val_bytes_* -> val_bytes, fineweb_val_* -> val, else train."""
    if "_val_bytes_" in name:
        return "val_bytes"
    if "_val_" in name:
        return "val"
    return "train"


def file_record(path: str | os.PathLike) -> dict:
    """What the manifest records of one shard (name, split, num_tokens, bytes, sha256), plus what
    its counts need: the documents starting in it (BOS tokens) or, for a sidecar, its byte sum."""
    path = Path(path)
    num_tokens = check_shard(path)
    raw = path.read_bytes()
    body = np.frombuffer(raw, dtype="<u2", offset=HEADER_BYTES)
    split = split_of(path.name)
    record = {
        "name": path.name,
        "split": split,
        "num_tokens": num_tokens,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    if split == "val_bytes":
        record["original_bytes"] = int(body.sum(dtype=np.int64))
    else:
        record["docs"] = int(np.count_nonzero(body == caseops.BOS_ID))
    return record


def write_export_manifest(
    out_dir: Path, tokenizer_path: Path, records: list[dict], source: dict, shard_size: int
) -> dict:
    """out_dir/manifest.json in the format of data/caseops.py's export (transform, tokenizer,
    counts, per-file sha256), every figure counted from the files themselves, plus `source`:
    where the files came from. Written atomically."""
    sp = caseops.load_caseops_tokenizer(tokenizer_path)
    with open(tokenizer_path, "rb") as f:
        tokenizer_sha = hashlib.sha256(f.read()).hexdigest()

    def total(split: str, key: str) -> int:
        return sum(r[key] for r in records if r["split"] == split)

    manifest = {
        "text_transform": caseops.TRANSFORM_NAME,
        "tokenizer": {
            "model": tokenizer_path.name,
            "sha256": tokenizer_sha,
            "vocab_size": int(sp.vocab_size()),
            "bos_id": caseops.BOS_ID,
            "operator_ids": list(caseops.OPERATOR_IDS),
        },
        "append_eos": False,
        "shard_size": shard_size,
        "num_docs": total("val", "docs") + total("train", "docs"),
        "num_val_docs": total("val", "docs"),
        "num_train_docs": total("train", "docs"),
        "tokens_val": total("val", "num_tokens"),
        "tokens_train": total("train", "num_tokens"),
        "original_bytes_val": total("val_bytes", "original_bytes"),
        "files": [
            {k: r[k] for k in ("name", "split", "num_tokens", "bytes", "sha256")} for r in records
        ],
        "source": source,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_bytes_atomic(out_dir / "manifest.json", text.encode("utf-8"))
    return manifest


def read_folder_manifest(out_dir: Path) -> dict | None:
    """out_dir/manifest.json, or None; a ValueError naming it when unreadable."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object")
    return manifest


# -----------------------------------------------------------------------------
# REPRODUCING THE FIRST VAL DOCUMENTS
# -----------------------------------------------------------------------------


def read_first_documents(stream, count: int, where: str) -> list[str]:
    """The "text" of the first `count` non-blank JSON lines of a binary stream."""
    texts = []
    while len(texts) < count:
        line = stream.readline()
        if not line:
            break
        if not line.strip():
            continue
        texts.append(document_text(line, f"{where}: document {len(texts)}"))
    return texts


def check_reproduces(texts: list[str], out_dir: Path, tokenizer_path: Path, where: str) -> dict:
    """Our transform + tokenizer on `texts` must give exactly the start of the val tokens and of
    their sidecar in out_dir; a RuntimeError naming the document and token otherwise."""
    sp = caseops.load_caseops_tokenizer(tokenizer_path)
    parts = [caseops.tokenize_document(sp, text) for text in texts]
    want_tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint16)
    want_bytes = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint16)
    got_tokens = []
    got_bytes = []
    have = 0
    index = 0
    while have < want_tokens.size:
        val = out_dir / f"fineweb_val_{index:06d}.bin"
        if not val.is_file():
            break
        got_tokens.append(read_shard(val))
        got_bytes.append(read_shard(caseops.sidecar_path(val)))
        have += got_tokens[-1].size
        index += 1
    tokens = np.concatenate(got_tokens)[: want_tokens.size] if got_tokens else np.zeros(0)
    counts = np.concatenate(got_bytes)[: want_tokens.size] if got_bytes else np.zeros(0)
    if tokens.size < want_tokens.size:
        raise RuntimeError(
            f"{out_dir}: the val split holds {tokens.size} tokens, fewer than the "
            f"{want_tokens.size} of the first {len(texts)} documents of {where}"
        )
    starts = np.concatenate([[0], np.cumsum([p[0].size for p in parts])])
    for name, got, want in (("tokens", tokens, want_tokens), ("byte sidecar", counts, want_bytes)):
        differ = np.flatnonzero(got != want)
        if differ.size:
            at = int(differ[0])
            doc = int(np.searchsorted(starts, at, side="right")) - 1
            raise RuntimeError(
                f"{out_dir}: val {name} differ from our CaseOps builder on document {doc} of "
                f"{where} (token {at - int(starts[doc])}: {int(got[at])} != {int(want[at])})"
            )
    return {"docs": len(texts), "tokens": int(want_tokens.size)}


# -----------------------------------------------------------------------------
# DOWNLOAD
# -----------------------------------------------------------------------------


PlanEntry = tuple[str, str, int | None]


def plan_caseops(manifest: dict, train_shards: int) -> tuple[list[PlanEntry], dict]:
    """[(path in the repo under the prefix, local file name, expected tokens or None)] for the val
    shards, their sidecars and the first train_shards train shards, and the dataset entry."""
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == HUB_DATASET), None)
    if entry is None:
        names = ", ".join(d.get("name", "?") for d in manifest.get("datasets", [])) or "none"
        raise ValueError(f"the hub manifest has no dataset {HUB_DATASET} (it lists {names})")
    val, train = expected_shard_tokens(manifest, entry, VARIANT, train_shards)
    base = entry.get("path") or f"datasets/{HUB_DATASET}"
    plan = []
    for i, tokens in enumerate(val):
        plan.append((f"{base}/fineweb_val_{i:06d}.bin", f"fineweb_val_{i:06d}.bin", tokens))
        name = f"fineweb_val_bytes_{i:06d}.bin"
        plan.append((f"{base}/{name}", name, tokens))
    for i, tokens in enumerate(train):
        name = f"fineweb_train_{i:06d}.bin"
        plan.append((f"{base}/{name}", name, tokens))
    return plan, entry


def tokenizer_remote(manifest: dict, entry: dict) -> str:
    """The tokenizer model's path in the repo (under the prefix) that the dataset entry names."""
    tokenizer = next(
        (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")),
        {},
    )
    return tokenizer.get("model_path") or f"tokenizers/{TOKENIZER_NAME}"


def verify_download(path: Path, expected_tokens: int | None, published: dict | None) -> None:
    """ValueError when a file is not what the manifest and the source say it is: a bad header,
    another token count, another size, another sha256."""
    if path.suffix == ".bin":
        num_tokens = check_shard(path)
        if expected_tokens is not None and num_tokens != expected_tokens:
            raise ValueError(f"holds {num_tokens} tokens, the manifest implies {expected_tokens}")
    published = published or {}
    size = path.stat().st_size
    if published.get("size") is not None and size != published["size"]:
        raise ValueError(f"{size} bytes, the source publishes {published['size']}")
    if published.get("sha256"):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != published["sha256"]:
            raise ValueError(f"sha256 {digest}, the source publishes {published['sha256']}")


def download_caseops(
    train_shards: int = TRAIN_FILES,
    local_dir: str | os.PathLike = "data",
    hub_dir: str | os.PathLike | None = None,
    check_docs: int = CHECK_DOCS,
    repo_id: str = CASEOPS_REPO_ID,
    docs_repo_id: str = DOCS_REPO_ID,
) -> dict:
    """Fetch, verify and bind the canonical CaseOps export (see the module docstring). A failed
    run keeps its staging folder (local_dir/.download) so that the next one resumes from it."""
    staging = Path(local_dir) / ".download"
    try:
        return _download_caseops(
            train_shards, local_dir, hub_dir, check_docs, repo_id, docs_repo_id
        )
    except BaseException:
        remove_if_empty(staging)
        raise


def remove_if_empty(folder: Path) -> None:
    """Remove a staging folder that holds nothing to resume from."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _download_caseops(
    train_shards: int,
    local_dir: str | os.PathLike,
    hub_dir: str | os.PathLike | None,
    check_docs: int,
    repo_id: str,
    docs_repo_id: str,
) -> dict:
    local_dir = Path(local_dir)
    out_dir, tokenizer_path = local_paths(local_dir)
    existing = read_folder_manifest(out_dir)
    if existing is not None and (existing.get("source") or {}).get("kind") != "hub":
        raise ValueError(
            f"{out_dir / 'manifest.json'}: these shards were not downloaded from the hub "
            "(built with --from-docs or data.build): remove the folder or use another --local-dir"
        )
    source = make_source(repo_id, hub_dir)
    staging = local_dir / ".download"  # beside the outputs, so a finished file moves atomically
    staging.mkdir(parents=True, exist_ok=True)

    manifest_path = source.fetch(_remote("manifest.json"), staging)
    manifest_raw = manifest_path.read_bytes()
    manifest = json.loads(manifest_raw.decode("utf-8"))
    plan, entry = plan_caseops(manifest, train_shards)
    model_remote = tokenizer_remote(manifest, entry)
    remotes = [_remote(remote) for remote, _, _ in plan] + [_remote(model_remote)]
    published = source.expected(remotes)
    listed = {f.get("name"): f for f in entry.get("files", []) if isinstance(f, dict)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)

    jobs = [(_remote(r), out_dir / name, tokens) for r, name, tokens in plan]
    jobs.append((_remote(model_remote), tokenizer_path, None))
    downloaded = 0
    skipped = 0
    for remote, dest, tokens in progress(jobs, f"download {VARIANT}", unit="file"):
        expect = dict(published.get(remote) or {})
        listed_entry = listed.get(dest.name) or {}
        for key, manifest_key in (("size", "bytes"), ("sha256", "sha256")):
            if not expect.get(key) and listed_entry.get(manifest_key):
                expect[key] = listed_entry[manifest_key]
        if dest.is_file():
            try:
                verify_download(dest, tokens, expect)
                skipped += 1
                continue
            except ValueError:
                pass
        got = source.fetch(remote, staging)
        try:
            verify_download(got, tokens, expect)
        except ValueError as e:
            got.unlink()  # a corrupt transfer must not be resumed from
            raise RuntimeError(
                f"{remote}: the downloaded file failed verification ({e}); "
                f"nothing was written to {dest}"
            ) from None
        os.replace(got, dest)
        downloaded += 1
    caseops.load_caseops_tokenizer(tokenizer_path)

    reproduced = {"docs": 0, "tokens": 0}
    if check_docs > 0:
        docs_source = make_source(docs_repo_id, hub_dir)
        where = f"{docs_source.describe()}/{_remote(DOCS_NAME)}"
        with docs_source.open(_remote(DOCS_NAME)) as stream:
            texts = read_first_documents(stream, check_docs, where)
        reproduced = check_reproduces(texts, out_dir, tokenizer_path, where)

    records = [file_record(out_dir / name) for _, name, _ in plan]
    origin = {
        "kind": "hub",
        "repo_id": repo_id,
        "where": source.describe(),
        "dataset": HUB_DATASET,
        "hub_manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
        "reproduced_docs": reproduced["docs"],
    }
    shard_size = int(manifest.get("shard_size") or SHARD_SIZE)
    written = write_export_manifest(out_dir, tokenizer_path, records, origin, shard_size)
    write_binding(out_dir, tokenizer_path, written["tokenizer"]["vocab_size"])
    shutil.rmtree(staging, ignore_errors=True)
    return {
        "variant": VARIANT,
        "source": source.describe(),
        "dataset": str(out_dir),
        "tokenizer": str(tokenizer_path),
        "val_shards": sum(1 for r in records if r["split"] == "val"),
        "train_shards": train_shards,
        "downloaded": downloaded,
        "skipped": skipped,
        "val_docs": written["num_val_docs"],
        "val_tokens": written["tokens_val"],
        "train_tokens": written["tokens_train"],
        "val_original_bytes": written["original_bytes_val"],
        "reproduced_docs": reproduced["docs"],
    }
