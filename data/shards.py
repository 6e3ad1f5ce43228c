"""The official shard format (docs/rules.md, Data).

A shard is a 1,024-byte header of 256 little-endian int32 ([0]=20240520 magic, [1]=1 version,
[2]=num_tokens, the rest zero) followed by num_tokens little-endian uint16 token ids. Every reader
check fails with a one-line ValueError naming the file, because a bad shard found at step 5,000 of a
paid run is the most expensive way to learn about a truncated download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_SIZE = 10**8  # tokens per file in the official export
MAX_TOKEN_ID = 2**16 - 1
# The binding of a shard folder to its tokenizer, read by the training scripts' data block.
BINDING_NAME = "shards.json"
BINDING_FORMAT = "pgolf-shards"
BINDING_VERSION = 1
PROGRESS_EVERY_S = 10.0  # plain progress lines (logs, CI): at most one per step every 10 s


def progress(items, desc, total=None, unit="it", every_s=None, stream=None, interactive=None):
    """Yield `items` while showing progress with an estimate of the time left: a tqdm bar on an
    interactive terminal, else a plain line at most every PROGRESS_EVERY_S seconds on stderr
    (`progress: export 37% 1234/3300 doc eta 42s`), the same format as the training scripts'
    Progress (issue 18). total: len(items) when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if interactive is None:
        interactive = sys.stderr.isatty() and not os.environ.get("CI")
    if interactive:
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)
        return
    every_s = PROGRESS_EVERY_S if every_s is None else every_s
    out = stream or sys.stderr
    t0 = time.perf_counter()
    last = t0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            print(_progress_line(desc, done, total, unit, now - t0), file=out, flush=True)


def _progress_line(desc, done, total, unit, elapsed):
    if not total:
        return f"progress: {desc} {done} {unit} in {elapsed:.0f}s"
    eta = elapsed / done * max(total - done, 0)
    return f"progress: {desc} {100 * done / total:.0f}% {done}/{total} {unit} eta {eta:.0f}s"


def check_shard(path: str | os.PathLike) -> int:
    """Validate the header and the file size without reading the body; return num_tokens.

    Cheap enough to run on every cached 200 MB shard before deciding to skip a download.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(
            f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header"
        )
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    return _check_header(path, header, size)


def _check_header(path: Path, header: np.ndarray, size: int) -> int:
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic {int(header[0])} (expected {MAGIC})")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported version {int(header[1])} (expected {VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ValueError(f"{path}: negative token count {num_tokens} in header")
    expected = HEADER_BYTES + 2 * num_tokens
    if size < expected:
        held = (size - HEADER_BYTES) // 2
        raise ValueError(f"{path}: truncated: header says {num_tokens} tokens, file holds {held}")
    if size > expected:
        raise ValueError(
            f"{path}: {size - expected} trailing bytes: header says {num_tokens} tokens "
            f"({expected} bytes), file is {size} bytes"
        )
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Read a whole shard into a writable uint16 array after validating header and size."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise ValueError(
                f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header"
            )
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        num_tokens = _check_header(path, header, size)
        tokens = np.fromfile(f, dtype="<u2", count=num_tokens)
    if tokens.size != num_tokens:  # the file shrank while we read it
        raise ValueError(
            f"{path}: truncated: header says {num_tokens} tokens, file holds {tokens.size}"
        )
    return tokens.astype(np.uint16, copy=False)


def write_shard(path: str | os.PathLike, tokens, vocab_size: int | None = None) -> Path:
    """Write tokens as one shard, atomically: a crash never leaves a half-written file behind.

    Ids outside 0..65535 are refused (a vocab above 65,535 does not fit the uint16 format), and so
    are ids >= vocab_size when it is given.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo = int(arr.min())
        hi = int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{path}: token id {bad} outside 0..{MAX_TOKEN_ID} (vocab above 65,535 is refused)"
            )
        if vocab_size is not None and hi >= vocab_size:
            raise ValueError(f"{path}: token id {hi} >= vocab size {vocab_size}")
    if arr.size > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: {arr.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, arr.size)
    body = arr.astype("<u2", copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, header.tobytes(), np.ascontiguousarray(body))
    return path


def write_bytes_atomic(path: str | os.PathLike, *chunks) -> None:
    """Write through a temporary file in the same directory, then os.replace.

    Readers see the old file or the whole new one, never a half-written one, and a failure leaves
    no temporary behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_export_args(num_val_docs: int, shard_size: int) -> None:
    """ValueError for a negative val document count or a shard size under one token."""
    if num_val_docs < 0:
        raise ValueError(f"num_val_docs={num_val_docs}: must be >= 0")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")


def remove_stale_shards(out_dir: Path, prefix: str, kinds: tuple[str, ...], written: set) -> None:
    """Remove `{prefix}_{kind}_NNNNNN.bin` files of an earlier export that this one did not write
    (a smaller export must not leave a longer one's tail behind)."""
    own_name = re.compile(rf"{re.escape(prefix)}_({'|'.join(kinds)})_\d{{6}}\.bin")
    for stale in sorted(Path(out_dir).glob(f"{prefix}_*.bin")):
        if own_name.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()


def sha256_file(path: str | os.PathLike) -> str:
    """The same digest as the training scripts' file_sha256; a copy, because the data tools need
    only numpy and sentencepiece (importing a training script would pull in torch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_info(path: str | os.PathLike) -> dict:
    """num_tokens, bytes and sha256 of a valid shard: what a manifest records per file."""
    path = Path(path)
    return {
        "num_tokens": check_shard(path),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def write_binding(
    out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, vocab_size: int
) -> Path:
    """Write out_dir/shards.json: the sha256 of the tokenizer the shards were made with.

    Training and eval refuse a TOKENIZER_PATH whose sha256 differs, so a tokenizer of the same
    vocabulary size but other pieces (whose byte counts would be wrong) cannot score these shards.
    """
    out_dir = Path(out_dir)
    binding = {
        "format": BINDING_FORMAT,
        "version": BINDING_VERSION,
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "tokenizer": Path(tokenizer_path).name,
        "vocab_size": int(vocab_size),
    }
    path = out_dir / BINDING_NAME
    write_bytes_atomic(path, (json.dumps(binding, indent=2) + "\n").encode("utf-8"))
    return path


def document_text(line: str, where: str) -> str:
    """The string "text" field of one JSON line of a document file (the official
    docs_selected.jsonl form); ValueError naming `where` (file and line or document) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON line ({e.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f'{where}: no string "text" field')
    return text
