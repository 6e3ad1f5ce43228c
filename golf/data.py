"""Data: the official shard format, token streams and the distributed loader, the val split and its
checks against the tokenizer that made it.
"""

import glob
import hashlib
import json
import os
import re

import numpy as np
import torch

from golf.runtime import file_sha256

# Data: the official shard format (256 little-endian int32 header: magic 20240520, version 1, token
# count; then uint16 tokens). Training reads only fineweb_train_*; the val split is opened by the
# eval paths alone.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4
BOS_ID = 1
SHARDS_BINDING = "shards.json"  # written by data/: the sha256 of the tokenizer the shards need
REENCODE_MAX_DOCS = 4
REENCODE_MAX_TOKENS = 20_000


def shard_token_count(path):
    """The header's token count after checking magic, version and the file size it implies."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the 1024-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC:
        raise ValueError(
            f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard"
        )
    if header[1] != SHARD_VERSION:
        raise ValueError(
            f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})"
        )
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ValueError(
            f"{path}: truncated or padded: header says {num_tokens} tokens "
            f"({expected} bytes) but the file has {size} bytes"
        )
    return num_tokens


def load_data_shard(path):
    num_tokens = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def how_to_get(path):
    """The command that makes a default dataset or tokenizer path of the presets, for the error
    that says it is missing ("" for a path of the user's own)."""
    name = os.path.basename(os.path.normpath(path))
    if "caseops" in name:
        return (
            "the record preset's CaseOps SP8192 data: download it with "
            "`python -m data.download --variant sp8192_caseops` (or build it from the official "
            "documents: add --from-docs; README, Data)"
        )
    if "pydoc" in name:
        return "make it with `python -m data.embedded` (offline, seconds)"
    m = re.fullmatch(r"fineweb10B_sp(\d+)|fineweb_(\d+)_bpe\.model", name)
    if m:
        return f"download it with `python -m data.download --variant sp{m[1] or m[2]}`"
    return ""


def check_data_present(h):
    """Before a run writes anything: DATA_PATH has val and train shards and TOKENIZER_PATH is a
    file; else one line naming the variable and, for the presets' paths, the command that makes
    them (issue 25: `PRESET=record` without data printed ~140 lines before its error)."""
    for name, path, present in (
        ("TOKENIZER_PATH", h.tokenizer_path, os.path.isfile(h.tokenizer_path)),
        ("DATA_PATH", h.data_path, bool(glob.glob(os.path.join(h.data_path, "fineweb_val_*")))),
    ):
        if not present:
            hint = how_to_get(path)
            raise FileNotFoundError(f"{name}={path!r}: not found" + (f"; {hint}" if hint else ""))


def shard_files(data_path, split):
    """Sorted shard paths of one split (`fineweb_val_bytes_*.bin` sidecars are not val shards);
    an error naming DATA_PATH when there are none."""
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    name_rule = re.compile(rf"fineweb_{split}_\d{{6}}\.bin")
    files = sorted(p for p in glob.glob(pattern) if name_rule.fullmatch(os.path.basename(p)))
    if not files:
        raise FileNotFoundError(f"DATA_PATH={data_path!r}: no {split} shards matching {pattern}")
    return files


class TokenStream:
    """Reads shards in order, wrapping around (each file from token `start` on), in contiguous
    spans. With vocab_size, each shard is checked as it is opened (a max on the host, milliseconds
    per shard): an id >= VOCAB_SIZE is a one-line error naming the shard before any of its tokens
    reach the model."""

    def __init__(self, files, start=0, vocab_size=0):
        self.files = list(files)
        self.start = start
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.tokens = self._open(0)
        self.pos = start

    def _open(self, idx):
        path = self.files[idx]
        tokens = load_data_shard(path)
        top = int(tokens.numpy().max()) if self.vocab_size and tokens.numel() else 0
        if top >= self.vocab_size > 0:
            raise ValueError(
                f"{path}: token id {top} >= VOCAB_SIZE={self.vocab_size}; the shard was not "
                "made with this tokenizer"
            )
        return tokens

    def take(self, n):
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = self._open(self.file_idx)
                self.pos = self.start
                continue
            k = min(n, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def state(self):
        return (self.file_idx, self.pos)

    def restore(self, state):
        if state[0] != self.file_idx:
            self.tokens = self._open(state[0])
        self.file_idx, self.pos = state


class DistributedTokenLoader:
    """Each micro-step takes (global_tokens / (world * accum) + 1) x world contiguous tokens; rank r
    gets the r-th span, so every world size sees the same tokens per step (the same maths on 1 to
    8 processes). With `shard=k` (the shard mixer) the span comes from shard k's own stream
    instead of the sequential one."""

    def __init__(self, data_path, rank, world_size, device, vocab_size=0):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.vocab_size = vocab_size
        self.files = shard_files(data_path, "train")
        self.stream = TokenStream(self.files, vocab_size=vocab_size)
        self.shard_streams = {}
        self.skip = 0  # tokens of shard 0 held out for the mixer's reward

    def next_batch(self, global_tokens, seq_len, grad_accum_steps, shard=None):
        span = global_tokens // (self.world_size * grad_accum_steps) + 1
        if shard is not None and shard not in self.shard_streams:
            self.shard_streams[shard] = TokenStream(
                [self.files[shard]],
                start=self.skip if shard == 0 else 0,
                vocab_size=self.vocab_size,
            )
        stream = self.stream if shard is None else self.shard_streams[shard]
        chunk = stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def heldout(self, n_tokens, seq_len):
        """The first n tokens of shard 0 as (x, y); the mixer's shard-0 stream then skips them."""
        tokens = load_data_shard(self.files[0])[: n_tokens + 1].to(torch.int64)
        n = (tokens.numel() - 1) // seq_len * seq_len
        self.skip = n
        x = tokens[:n].view(-1, seq_len)
        y = tokens[1 : n + 1].view(-1, seq_len)
        return x.to(self.device), y.to(self.device)

    def state(self):
        return self.stream.state(), {k: s.state() for k, s in self.shard_streams.items()}

    def restore(self, state):
        self.stream.restore(state[0])
        self.shard_streams = {k: s for k, s in self.shard_streams.items() if k in state[1]}
        for k, st in state[1].items():
            self.shard_streams[k].restore(st)


def shard_memmap(path):
    """A shard's tokens as a read-only uint16 memmap (the header checked first): reading a window
    pages in its bytes alone, not the whole ~200 MB file."""
    num_tokens = shard_token_count(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def _shuffled_windows(rng, num_tokens, seq_len):
    """One shard's (phase, window count, window order) for one pass: a random phase in
    [0, seq_len) (less where the shard is short) and a random order of the seq_len-token windows
    that start at it, each read with its next token."""
    max_phase = min(seq_len - 1, max(0, num_tokens - seq_len - 1))
    phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
    count = max(0, (num_tokens - 1 - phase) // seq_len)
    return phase, count, rng.permutation(count)


def random_calibration_windows(data_path, n, seq_len, rank=0, world=1, vocab_size=0, seed=0):
    """GPTQ_CALIB_SOURCE=random (#2135's GPTQ_CALIBRATION_MODE=random): `n` windows of seq_len + 1
    training tokens as an int64 [n, seq_len + 1] tensor (x = [:, :-1], y = [:, 1:]), drawn as
    #2135's fresh calibration loader draws them. The rank reads its own train shards
    (files[rank::world]; a rank past the shard count reads files[rank % count]), never val. Each
    shard gets a random phase and a random order of its windows; each draw picks a shard with
    probability proportional to the windows it has left and takes its next window, so no window
    repeats until every one of the rank's windows has been read (then a fresh pass begins).
    Windows are read through a memmap, and an id >= vocab_size (when given) is a one-line error
    naming the shard."""
    files = shard_files(data_path, "train")
    mine = files[rank::world] or [files[rank % len(files)]]
    counts = [shard_token_count(path) for path in mine]
    # PCG64 seeded by the rank, as #2135's loader is: SeedSequence pads its entropy with zeros, so
    # [rank, 0] seeds exactly as rank alone does. Calibration passes no seed, so the windows do not
    # depend on SEED (as in #2135): every seed of a run calibrates on the same windows.
    rng = np.random.Generator(np.random.PCG64([rank, seed]))
    offsets = np.arange(seq_len + 1)
    out = np.empty((n, seq_len + 1), dtype=np.int64)
    filled = 0
    while filled < n:
        passes = [_shuffled_windows(rng, count, seq_len) for count in counts]
        left = np.array([count for _, count, _ in passes], dtype=np.float64)
        if not left.any():
            raise ValueError(
                f"DATA_PATH={data_path!r}: the train shards of rank {rank} ({len(mine)} files) "
                f"hold no window of TRAIN_SEQ_LEN + 1 = {seq_len + 1} tokens"
            )
        take = min(n - filled, int(left.sum()))
        # Each draw's odds depend on the draws before it, so this stays a loop; its uniforms are
        # drawn at once (the same doubles one rng.choice(p=...) per window would draw, so the
        # stream is #2135's) and the loop does one small cumsum and search per window.
        uniforms = rng.random(take)
        picks = np.empty(take, dtype=np.int64)
        for i, u in enumerate(uniforms):
            cdf = (left / left.sum()).cumsum()
            cdf /= cdf[-1]
            shard = int(cdf.searchsorted(u, side="right"))
            picks[i] = shard
            left[shard] -= 1
        for shard in np.unique(picks):
            rows = np.flatnonzero(picks == shard)
            phase, count, order = passes[shard]
            # A shard's windows are taken from the end of its order, as #2135 pops them.
            starts = phase + order[count - 1 - np.arange(rows.size)] * seq_len
            block = shard_memmap(mine[shard])[starts[:, None] + offsets]
            top = int(block.max())
            if top >= vocab_size > 0:
                raise ValueError(
                    f"{mine[shard]}: token id {top} >= VOCAB_SIZE={vocab_size}; the shard was not "
                    "made with this tokenizer"
                )
            out[filled + rows] = block
        filled += take
    return torch.from_numpy(out)


def val_token_count(data_path):
    """Number of val tokens from the file sizes alone, so a too-short split fails before training
    without opening a val file."""
    return sum(
        (os.path.getsize(p) - SHARD_HEADER_BYTES) // 2 for p in shard_files(data_path, "val")
    )


def load_validation_tokens(data_path, seq_len, max_tokens=0, vocab_size=0):
    """All val tokens, or the first max_tokens + 1 (VAL_MAX_TOKENS: quick looks, never an official
    score). With vocab_size, every val shard is checked as it is read (check_val_shard)."""
    shards = []
    for i, path in enumerate(shard_files(data_path, "val")):
        shard = load_data_shard(path)
        if vocab_size:
            check_val_shard(path, shard, vocab_size, first=i == 0)
        shards.append(shard)
    tokens = torch.cat(shards).to(torch.int64)
    tokens = tokens[: max_tokens + 1] if max_tokens > 0 else tokens
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"DATA_PATH={data_path!r}: the val split has {tokens.numel()} tokens, "
            f"shorter than one sequence of {seq_len} + 1"
        )
    return tokens


def check_val_shard(path, tokens, vocab_size, first):
    """A val shard's ids lie below VOCAB_SIZE, and the split opens with BOS (id 1): an id out of
    range fails at the first eval, after the whole training run, and a stream without BOS has no
    document boundaries for the byte audit and TTT."""
    ids = tokens.numpy()
    if ids.size == 0:
        raise ValueError(f"{path}: val shard holds no tokens")
    top = int(ids.max())
    if top >= vocab_size:
        where = int(np.argmax(ids >= vocab_size))
        raise ValueError(
            f"{path}: token id {top} >= VOCAB_SIZE={vocab_size} (first at position {where})"
        )
    if first and int(ids[0]) != BOS_ID:
        raise ValueError(
            f"{path}: val split starts with token {int(ids[0])}, not BOS (id {BOS_ID}); "
            "documents must be written as [BOS] + tokens"
        )


def read_shards_binding(data_path):
    """DATA_PATH/shards.json as a dict (None when absent), after checking its format."""
    path = os.path.join(data_path, SHARDS_BINDING)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            binding = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable shard binding ({exc})") from None
    if not isinstance(binding, dict) or binding.get("format") != "pgolf-shards":
        raise ValueError(f"{path}: not a pgolf-shards binding (format must be 'pgolf-shards')")
    if binding.get("version") != 1:
        raise ValueError(f"{path}: unsupported binding version {binding.get('version')!r}")
    digest = binding.get("tokenizer_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{path}: tokenizer_sha256 {digest!r} is not a sha256 hex digest")
    if not isinstance(binding.get("vocab_size"), int):
        raise ValueError(f"{path}: vocab_size {binding.get('vocab_size')!r} is not an integer")
    return binding


def check_shards_binding(h, binding):
    """The tokenizer must be the one the shards were written with (same sha256, same vocab)."""
    got = file_sha256(h.tokenizer_path)
    if got != binding["tokenizer_sha256"]:
        raise ValueError(
            f"TOKENIZER_PATH={h.tokenizer_path!r} (sha256 {got}) is not the tokenizer the shards "
            f"of DATA_PATH={h.data_path!r} were made with (sha256 {binding['tokenizer_sha256']}, "
            f"{binding.get('tokenizer', '?')}, recorded in {SHARDS_BINDING})"
        )
    if binding["vocab_size"] != h.vocab_size:
        raise ValueError(
            f"DATA_PATH={h.data_path!r}: {SHARDS_BINDING} records vocab_size "
            f"{binding['vocab_size']} but VOCAB_SIZE={h.vocab_size}"
        )


def reencode_sample(sp, tokens):
    """The first documents of the val stream (split at BOS, at most REENCODE_MAX_DOCS documents
    and REENCODE_MAX_TOKENS tokens), each as a list of ids. The last one, maybe cut, ends before
    its last word-initial piece, so re-encoding its text cannot merge across the cut."""
    sample = tokens[: REENCODE_MAX_TOKENS + 1].tolist()
    starts = [i for i, t in enumerate(sample) if t == BOS_ID] + [len(sample)]
    docs = []
    for a, b in zip(starts[:-1], starts[1:]):
        doc = sample[a + 1 : b]
        if b == len(sample):  # the last document may run on past the sample (or VAL_MAX_TOKENS)
            word_starts = [i for i, t in enumerate(doc) if sp.id_to_piece(t).startswith("\u2581")]
            doc = doc[: word_starts[-1]] if word_starts else []
        if doc:
            docs.append(doc)
    return docs[:REENCODE_MAX_DOCS]


def check_reencode(h, sp, tokens):
    """Without shards.json: decoding the first val documents and encoding the text again must give
    back the same ids. The official export wrote encode(text), and decode(encode(text)) encodes to
    the same ids (nmt_nfkc normalization is idempotent); a different tokenizer of the same
    vocabulary size decodes the ids to other text that encodes differently."""
    docs = reencode_sample(sp, tokens)
    if not docs:
        raise ValueError(f"DATA_PATH={h.data_path!r}: no val document to check the tokenizer on")
    disagree = []
    for doc in docs:
        again = sp.encode(sp.decode(doc))
        if again != doc:
            pos = next((i for i, (a, b) in enumerate(zip(doc, again)) if a != b), len(doc))
            disagree.append((len(doc), pos))
    if 2 * len(disagree) >= len(docs):
        n_tokens, pos = disagree[0]
        raise ValueError(
            f"TOKENIZER_PATH={h.tokenizer_path!r} does not reproduce the val tokens of "
            f"DATA_PATH={h.data_path!r}: {len(disagree)} of the first {len(docs)} documents "
            f"re-encode differently (the first from token {pos} of {n_tokens}); use the tokenizer "
            f"the shards were made with, or write {SHARDS_BINDING} beside them"
        )


def load_checked_val_tokens(h, sp, seq_len, max_tokens=0):
    """load_validation_tokens after the data checks that must pass before training or scoring: the
    tokenizer belongs to the shards (shards.json, else the re-encode check), every val shard holds
    ids < VOCAB_SIZE and starts the split with BOS, and every train shard's header matches its file
    size. Each failure is a one-line ValueError naming the file or variable."""
    binding = read_shards_binding(h.data_path)
    if binding is not None:
        check_shards_binding(h, binding)
    for path in sorted(glob.glob(os.path.join(h.data_path, "fineweb_train_*.bin"))):
        shard_token_count(path)
    tokens = load_validation_tokens(h.data_path, seq_len, max_tokens, h.vocab_size)
    if binding is None:
        check_reencode(h, sp, tokens)
    return tokens


MAX_MANIFEST_BYTES = 16 << 20


def read_manifest(data_path):
    """The shards' manifest.json as a dict, or None where there is none. A manifest that cannot be
    read, is too large or is not a JSON object is an error, never ignored: a text transform or a
    sidecar binding it declares must not vanish with it."""
    path = os.path.join(data_path, "manifest.json")
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: over {MAX_MANIFEST_BYTES} bytes, not a shard manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object")
    return manifest


def data_text_transform(data_path):
    """The text transform the shards' manifest.json declares (e.g. "lossless_caps_caseops_v1"),
    or None (no manifest, or plain text)."""
    manifest = read_manifest(data_path)
    if manifest is None:
        return None
    transform = manifest.get("text_transform")
    if transform is not None and not isinstance(transform, str):
        path = os.path.join(data_path, "manifest.json")
        raise ValueError(f"{path}: text_transform must be a string, not {transform!r}")
    return transform


def _manifest_files(data_path, manifest):
    """{file name: sha256} the manifest records, or {} when it lists no files."""
    path = os.path.join(data_path, "manifest.json")
    files = manifest.get("files", [])
    if not isinstance(files, list):
        raise ValueError(f"{path}: files must be a list")
    out = {}
    for entry in files:
        name = entry.get("name") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(sha, str):
            raise ValueError(f"{path}: a files entry without a name and a sha256: {entry!r:.80}")
        out[name] = sha
    return out


def check_sidecars_against_manifest(data_path, sidecars, total_bytes):
    """The sidecar files ({path: sha256}) against what the manifest recorded when the shards were
    built: each file's sha256, and the original bytes of the whole val split (exact, tolerance
    0). Returns "verified", or "none" where the split has no manifest; ValueError naming the file
    otherwise."""
    manifest = read_manifest(data_path)
    if manifest is None:
        return "none"
    path = os.path.join(data_path, "manifest.json")
    recorded = _manifest_files(data_path, manifest)
    if not recorded:
        raise ValueError(f"{path}: lists no files, so it cannot bind the val byte sidecars")
    for side, sha in sidecars.items():
        name = os.path.basename(side)
        if name not in recorded:
            raise ValueError(f"{side}: a byte sidecar that {path} does not list")
        if sha != recorded[name]:
            raise ValueError(f"{side}: sha256 differs from the one {path} records")
    want = manifest.get("original_bytes_val")
    if want is not None and want != total_bytes:
        raise ValueError(
            f"{path}: original_bytes_val {want!r}, but the sidecars count {total_bytes} bytes"
        )
    return "verified"


def sidecar_path(val_shard):
    """The byte sidecar of a val shard: fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin."""
    folder, name = os.path.split(val_shard)
    return os.path.join(folder, name.replace("_val_", "_val_bytes_", 1))


def load_val_byte_sidecar(data_path, n_tokens):
    """The val split's per-token original byte counts (int64, the first n_tokens), or None when
    the split has no `fineweb_val_bytes_*.bin` (val_byte_sidecar says where they come from)."""
    found = val_byte_sidecar(data_path, n_tokens)
    return None if found is None else found[0]


def val_byte_sidecar(data_path, n_tokens):
    """(per-token original byte counts, int64, the first n_tokens; their source: the sha256 of the
    sidecar files' sha256 digests in order, the file count and the manifest check), or None when
    the split has no
    `fineweb_val_bytes_*.bin`. Once any sidecar exists, every val shard must have one of its exact
    length: a missing or short sidecar is an error, never a silent fallback to the lookup tables
    (they would count the transformed text). Where the split has a manifest, the sidecars must be
    the files it records (check_sidecars_against_manifest)."""
    pattern = os.path.join(data_path, "fineweb_val_bytes_*.bin")
    present = sorted(glob.glob(pattern))
    val_files = shard_files(data_path, "val")
    if not present:
        transform = data_text_transform(data_path)
        if transform:
            missing = sidecar_path(val_files[0])
            raise ValueError(
                f"{missing}: missing; DATA_PATH={data_path!r} holds {transform} text, whose bytes "
                "only the sidecars count"
            )
        return None
    expected = {sidecar_path(p) for p in val_files}
    strays = [p for p in present if p not in expected]
    if strays:
        raise ValueError(f"{strays[0]}: a byte sidecar with no val shard of the same number")
    parts = []
    shas = {}  # sidecar path -> sha256, in val order
    for val_file in val_files:
        side = sidecar_path(val_file)
        if not os.path.isfile(side):
            raise ValueError(f"{side}: missing byte sidecar of {os.path.basename(val_file)}")
        shas[side] = file_sha256(side)
        counts = load_data_shard(side)
        n_val = shard_token_count(val_file)
        if counts.numel() != n_val:
            raise ValueError(
                f"{side}: {counts.numel()} byte counts for the {n_val} tokens of "
                f"{os.path.basename(val_file)}"
            )
        parts.append(counts)
    per_token = torch.cat(parts).to(torch.int64)
    manifest = check_sidecars_against_manifest(data_path, shas, int(per_token.sum()))
    digest = hashlib.sha256(b"".join(bytes.fromhex(sha) for sha in shas.values())).hexdigest()
    source = {"sha256": digest, "files": len(shas), "manifest": manifest}
    return per_token[:n_tokens], source
