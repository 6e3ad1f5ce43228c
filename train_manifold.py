"""Manifold token-graph LM for Parameter Golf: a frozen token manifold built from training statistics steers
causal sparsemax message passing, scored in bits per byte.

Inside the training budget, from train shards only, co-occurrence counts become the token manifold of PR #663
("V18 Manifold-Guided Architecture"): springs, torsion, mass, directed springs, syntactic coordinates, a seeded
physics layout, spectral coordinates and static neighbours, all shipped in the artifact. A looped gated hop
cell routes messages by sparsemax (Martins & Astudillo 2016) over causal top-k candidates, with the fixes of
TECHNIQUES.md B.2. Large vocabularies: counts are three V x V float64 matrices and the build holds about a dozen
V x V float32 transients (V = 8192: ~6 GB on the GPU, est.; eigh in float32 above V = 4096), so no token subset.

Run:
  torchrun --standalone --nproc_per_node=8 train_manifold.py     # 8xH100, PRESET=record (default)
  PRESET=smoke python train_manifold.py                           # laptop CPU, embedded corpus, minutes
"""

import contextlib
import copy
import dataclasses
import glob
import hashlib
import json
import lzma
import math
import os
import platform
import struct
import sys
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import zstandard
except ImportError:  # zstd is optional: zlib and lzma are in the standard library
    zstandard = None

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Every knob is an UPPER_SNAKE environment variable named as in the records (ITERATIONS, MATRIX_LR, ...).
# PRESET picks a group of defaults first; explicit variables override it. Nothing is read at import time:
# `Hyperparameters.from_env(env)` reads a dict (tests) or os.environ (runs), converts types and names the
# variable in every error.

@dataclass
class Hyperparameters:
# ===== BEGIN SHARED BLOCK: hparams v1 =====
    # Run: where the data lives, how the run is named and logged.
    preset: str = "record"
    data_path: str = "data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "data/tokenizers/fineweb_1024_bpe.model"
    vocab_size: int = 1024
    run_id: str = ""
    seed: int = 1337
    log_dir: str = "logs"
    artifact_path: str = ""
    val_batch_size: int = 524288
    val_max_tokens: int = 0
    val_loss_every: int = 1000
    train_log_every: int = 200
    status_every: int = 50
    compile: bool = True
    # Telemetry: sample audits at each validation, the optional UCB1 shard mixer (TECHNIQUES.md part E).
    sample_prompt: str = "The history of the city"
    sample_tokens: int = 64
    halt_on_collapse: bool = False
    data_mixer: bool = False
    mixer_phase_steps: int = 20
    mixer_ucb_c: float = 1.0
    mixer_floor: float = 0.02
    mixer_cap: float = 0.5
    mixer_heldout_tokens: int = 65536
    # Schedule: steps, batch and the wallclock budget.
    iterations: int = 20000
    warmup_steps: int = 20
    warmdown_iters: int = 1200
    warmdown_frac: float = 0.0
    min_lr: float = 0.0
    max_wallclock_seconds: float = 600.0
    train_batch_tokens: int = 524288
    train_seq_len: int = 1024
    # Optimizer: Muon for block matrices, Adam for embeddings and scalars.
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_wd: float = 0.0
    muon_row_norm: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0
    grad_clip_norm: float = 0.0
    ema_decay: float = 0.0
    # Evaluation: the final score's mode and windows.
    eval_mode: str = "standard"
    eval_seq_len: int = 0
    eval_stride: int = 64
    ttt_enabled: bool = False
    ttt_chunk_tokens: int = 32768
    ttt_lr: float = 0.002
    ttt_epochs: int = 3
    ttt_momentum: float = 0.9
    ttt_freeze_blocks: int = 0
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    audit_seq_len: int = 0
    # Artifact: quantization (widths, clipping, GPTQ, late QAT, bit allocation) and compression.
    quant_bits: int = 8
    embed_bits: int = 8
    int8_clip_percentile: float = 99.99984
    clip_method: str = "percentile"
    sdclip_k_mlp: float = 11.5
    sdclip_k_attn: float = 13.0
    sdclip_k_embed: float = 20.0
    keep_float_max_numel: int = 65536
    bit_alloc: bool = False
    size_margin: int = 20000
    compressor: str = "auto"
    zstd_level: int = 22
    size_budget: int = 16_000_000
    gptq_enabled: bool = False
    gptq_reserve_seconds: float = 8.0
    gptq_calib_seqs: int = 32
    gptq_calib_source: str = "train"
    qat_start_frac: float = 0.0
    qat_bits: int = 0
    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        preset = env.get("PRESET", "record")
        if preset not in PRESETS:
            raise ValueError(f"PRESET={preset!r}: unknown preset (choose one of {', '.join(sorted(PRESETS))})")
        values = {"preset": preset, **PRESETS[preset]}
        for f in dataclasses.fields(cls):
            name = f.name.upper()
            if name in env and f.name != "preset":
                values[f.name] = cls.parse_env_value(name, env[name], f.type)
        h = cls(**values)
        h.validate()
        return h
    @staticmethod
    def parse_env_value(name, raw, kind):
        text = str(raw).strip()
        try:
            if kind is bool and text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                return text.lower() in ("1", "true", "yes", "on")
            if kind is int:
                digits = text.replace("_", "")
                number = int(digits) if digits.lstrip("+-").isdigit() else float(text)  # accepts 5e5, not 0.5
                if isinstance(number, int) or number.is_integer():
                    return int(number)
            if kind in (bool, int):
                raise ValueError
            return float(text) if kind is float else text
        except ValueError:
            expected = {bool: "0 or 1", int: "an integer", float: "a number"}.get(kind, "a string")
            raise ValueError(f"{name}={raw!r}: expected {expected}") from None
    def bad(self, name, why):
        raise ValueError(f"{name.upper()}={getattr(self, name.lower())!r}: {why}")
    def validate(self):
        """Checks of the shared fields, then the script's own `validate_model`."""
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "vocab_size", "val_batch_size",
                     "eval_stride", "ttt_chunk_tokens", "size_budget", "sdclip_k_mlp", "sdclip_k_attn",
                     "sdclip_k_embed", "gptq_calib_seqs"):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.vocab_size > 65536:
            self.bad("VOCAB_SIZE", "shards store uint16 token ids, so the vocabulary is at most 65,536")
        if self.train_batch_tokens % (8 * self.train_seq_len):
            self.bad("TRAIN_BATCH_TOKENS", f"must be a multiple of 8 x TRAIN_SEQ_LEN={8 * self.train_seq_len}")
        if self.eval_stride > self.eval_len:
            self.bad("EVAL_STRIDE", f"must not exceed the eval window EVAL_SEQ_LEN={self.eval_len}")
        for name, allowed in (("EVAL_MODE", ("standard", "sliding", "ttt")), ("QUANT_BITS", (4, 5, 6, 7, 8)),
                              ("EMBED_BITS", (4, 5, 6, 7, 8)), ("QAT_BITS", (0, 4, 5, 6, 7, 8)),
                              ("CLIP_METHOD", ("percentile", "search", "sdclip")),
                              ("GPTQ_CALIB_SOURCE", ("train", "self")), ("COMPRESSOR", ("auto", *COMPRESSORS))):
            if getattr(self, name.lower()) not in allowed:
                self.bad(name, f"must be one of {', '.join(map(str, allowed))}")
        for name, lo, hi in (("ema_decay", 0.0, 0.999999), ("warmdown_frac", 0.0, 1.0), ("min_lr", 0.0, 1.0),
                             ("qat_start_frac", 0.0, 0.999999)):
            if not lo <= getattr(self, name) <= hi:
                self.bad(name, f"must be in [{lo}, {round(hi, 3)}]")
        if min(self.size_margin, self.gptq_reserve_seconds) < 0:
            self.bad("SIZE_MARGIN" if self.size_margin < 0 else "GPTQ_RESERVE_SECONDS", "must not be negative")
        self.validate_model()
    @property
    def eval_len(self):
        return self.eval_seq_len or self.train_seq_len
# ===== END SHARED BLOCK: hparams v1 =====
    # Model: the manifold hop network (record shape). NUM_LAYERS = hops, MODEL_DIM = hidden width,
    # NUM_HEADS = manifold-attention heads; NUM_KV_HEADS only satisfies the shared validate().
    num_layers: int = 4
    model_dim: int = 500
    num_heads: int = 2
    num_kv_heads: int = 2
    mlp_mult: float = 2.0
    hop_cells: int = 1
    route_topk: int = 32
    velocity_tau: float = 16.0
    tie_embeddings: bool = False
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    # Manifold: the frozen token geometry, built from train shards inside the training budget.
    manifold_tokens: int = 800_000_000
    manifold_modes: int = 256
    manifold_coords: int = 32
    manifold_neighbours: int = 12
    manifold_physics_steps: int = 5000
    manifold_physics_dim: int = 300
    manifold_pairs: int = 80_000
    manifold_seed: int = 12372
    def validate_model(self):
        for name in ("num_layers", "model_dim", "num_heads", "route_topk", "manifold_modes", "manifold_coords"):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.model_dim % self.num_heads:
            self.bad("MODEL_DIM", f"must be divisible by NUM_HEADS={self.num_heads}")

# Named groups of defaults. `record` is the 8xH100 configuration (the dataclass defaults are its model
# shape); `smoke` trains a small model on a laptop CPU in a few minutes. The seed's AdamW schedule (warmup,
# cosine to 0.1, hold, linear to 0) is mapped onto the shared one: flat, then linear over WARMDOWN_FRAC.
PRESETS = {
    "record": {"embed_lr": 0.05, "ema_decay": 0.999, "muon_wd": 0.04, "warmdown_frac": 0.75, "grad_clip_norm": 1.0,
               "eval_mode": "sliding", "eval_stride": 128, "quant_bits": 8, "compressor": "zlib"},
    "smoke": {
        "data_path": "data/datasets/pydoc_sp1024", "tokenizer_path": "data/tokenizers/pydoc_1024_bpe.model",
        "iterations": 2000, "warmup_steps": 2, "warmdown_frac": 0.3, "max_wallclock_seconds": 150.0,
        "train_batch_tokens": 16384, "train_seq_len": 256, "num_layers": 2, "model_dim": 128, "route_topk": 16,
        "manifold_modes": 64, "manifold_coords": 16, "manifold_physics_steps": 50, "manifold_physics_dim": 64,
        "manifold_pairs": 4000, "val_batch_size": 32768, "val_loss_every": 100, "train_log_every": 25,
        "status_every": 10, "compile": False, "matrix_lr": 0.03, "embed_lr": 0.05, "grad_clip_norm": 1.0,
        "ema_decay": 0.99, "muon_momentum_warmup_steps": 50, "eval_mode": "sliding", "eval_stride": 64,
        "compressor": "zlib",
    },
}

CODE_PATH = os.path.abspath(__file__)
CONTROL_TENSOR_PATTERNS = ("route_scale", "manifold_bias", "rel_bias", "nb_gate")

# ===== BEGIN SHARED BLOCK: runtime v1 =====
# Runtime: one code path for CUDA + NCCL under torchrun, CPU + gloo under torchrun, and a plain process.
# `grad_accum_steps = 8 // world_size` keeps the maths of 8 GPUs on 1, 2 or 4. Rank 0 alone writes files.

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    grad_accum_steps: int
    @property
    def is_main(self):
        return self.rank == 0

def setup_runtime(env=None):
    env = os.environ if env is None else env
    ints = {name: Hyperparameters.parse_env_value(name, env.get(name, default), int)
            for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    world_size = ints["WORLD_SIZE"]
    if world_size < 1 or 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size}: must divide 8 (1, 2, 4 or 8 processes)")
    distributed = "RANK" in env and "WORLD_SIZE" in env
    use_cuda = torch.cuda.is_available() and env.get("FORCE_CPU", "0") != "1"
    if use_cuda:
        device = torch.device("cuda", ints["LOCAL_RANK"])
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)  # denormal weights (EMA tails) slow CPU matmuls several-fold
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Runtime(rank=ints["RANK"], world_size=world_size, local_rank=ints["LOCAL_RANK"], device=device,
                   distributed=distributed, grad_accum_steps=8 // world_size)

def seed_everything(seed):
    torch.manual_seed(seed)  # seeds every CUDA device too
    np.random.seed(seed % (2**32))

def dist_sum(t, op=None):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t

def dist_max(t):
    return dist_sum(t, dist.ReduceOp.MAX)

def device_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{max(1, torch.cuda.device_count())}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

def write_bytes_atomic(path, blob):
    """A concurrent reader sees the old file or the new one, never half of one; returns the bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "wb") as f:
        f.write(blob)
    os.replace(f"{path}.tmp{os.getpid()}", path)
    return len(blob)

def write_json_atomic(path, obj):
    write_bytes_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))

class RunLogger:
    """The text log (source first, then baseline-format lines), the JSONL events and the status file."""
    def __init__(self, log_dir, run_id, enabled):
        self.enabled, self._status_written = enabled, 0.0
        self.text_path, self.events_path, self.status_path = (
            os.path.join(log_dir, f"{run_id}{ext}") for ext in (".txt", ".jsonl", ".status.json"))
        self.status = {"run_id": run_id, "budget_bytes": 16_000_000, "history": {}}
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            for path in (self.text_path, self.events_path):
                open(path, "w", encoding="utf-8").close()
    def log0(self, msg, console=True):
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        with open(self.text_path, "a", encoding="utf-8") as f:
            print(msg, file=f)
    def event(self, kind, **fields):
        if not self.enabled:
            return
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
    def update_status(self, force=False, history=None, **fields):
        """Merge fields into the status file; rewrite it when forced or every 10 s at least."""
        if not self.enabled:
            return
        self.status.update(fields)
        for key, value in (history or {}).items():
            series = self.status["history"].setdefault(key, [])
            series.append(value)
            if len(series) > 1000:  # thin out, keeping the whole run's shape
                del series[::2]
        now = time.time()
        if force or now - self._status_written >= 10.0:
            self.status["updated_at"] = round(now, 3)
            write_json_atomic(self.status_path, self.status)
            self._status_written = now

# ===== END SHARED BLOCK: runtime v1 =====

# ===== BEGIN SHARED BLOCK: data v1 =====
# Data: the official shard format (256 little-endian int32 header: magic 20240520, version 1, token count;
# then uint16 tokens). Training reads only fineweb_train_*; the val split is opened by the eval paths alone.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4

def load_data_shard(path):
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the 1024-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ValueError(f"{path}: truncated or padded: header says {num_tokens} tokens "
                         f"({expected} bytes) but the file has {size} bytes")
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))

def shard_files(data_path, split):
    """Sorted shard paths of one split; an error naming DATA_PATH when there are none."""
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"DATA_PATH={data_path!r}: no {split} shards matching {pattern}")
    return files

class TokenStream:
    """Reads shards in order, wrapping around (each file from token `start` on), in contiguous spans."""
    def __init__(self, files, start=0):
        self.files, self.start = list(files), start
        self.file_idx, self.tokens, self.pos = 0, load_data_shard(self.files[0]), start
    def take(self, n):
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), self.start
                continue
            k = min(n, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    def state(self):
        return (self.file_idx, self.pos)
    def restore(self, state):
        if state[0] != self.file_idx:
            self.tokens = load_data_shard(self.files[state[0]])
        self.file_idx, self.pos = state

class DistributedTokenLoader:
    """Each micro-step takes (global_tokens / (world * accum) + 1) x world contiguous tokens, rank r the r-th span:
    every world size sees the same tokens per step (the same maths on 1-8 processes). `shard=k`: shard k's stream."""
    def __init__(self, data_path, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.files = shard_files(data_path, "train")
        self.stream, self.shard_streams, self.skip = TokenStream(self.files), {}, 0
    def next_batch(self, global_tokens, seq_len, grad_accum_steps, shard=None):
        span = global_tokens // (self.world_size * grad_accum_steps) + 1
        if shard is not None and shard not in self.shard_streams:
            self.shard_streams[shard] = TokenStream([self.files[shard]], start=self.skip if shard == 0 else 0)
        stream = self.stream if shard is None else self.shard_streams[shard]
        chunk = stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].to(torch.int64)
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
    def heldout(self, n_tokens, seq_len):
        """The first n tokens of shard 0 as (x, y); the mixer's stream of shard 0 then skips them."""
        tokens = load_data_shard(self.files[0])[:n_tokens + 1].to(torch.int64)
        self.skip = n = (tokens.numel() - 1) // seq_len * seq_len
        return tokens[:n].view(-1, seq_len).to(self.device), tokens[1:n + 1].view(-1, seq_len).to(self.device)
    def state(self):
        return self.stream.state(), {k: s.state() for k, s in self.shard_streams.items()}
    def restore(self, state):
        self.stream.restore(state[0])
        self.shard_streams = {k: s for k, s in self.shard_streams.items() if k in state[1]}
        for k, st in state[1].items():
            self.shard_streams[k].restore(st)

def val_token_count(data_path):
    """Val tokens from the file sizes alone, so a too-short split fails before training without reading it."""
    return sum((os.path.getsize(p) - SHARD_HEADER_BYTES) // 2 for p in shard_files(data_path, "val"))

def load_validation_tokens(data_path, seq_len, max_tokens=0):
    """All val tokens, or the first max_tokens + 1 (VAL_MAX_TOKENS: quick looks, never an official score)."""
    tokens = torch.cat([load_data_shard(p) for p in shard_files(data_path, "val")]).to(torch.int64)
    tokens = tokens[:max_tokens + 1] if max_tokens > 0 else tokens
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"DATA_PATH={data_path!r}: the val split has {tokens.numel()} tokens, "
                         f"shorter than one sequence of {seq_len} + 1")
    return tokens

# ===== END SHARED BLOCK: data v1 =====

# ===== BEGIN SHARED BLOCK: bpb v1 =====
# Bits per byte: val_bpb = sum NLL / (ln 2 x sum bytes). Bytes come from the official SentencePiece lookup
# tables: base bytes of each piece, plus one byte for a leading "\u2581" unless the previous token is a
# boundary (control/unknown). Byte-fallback pieces are one byte, never three (the Scylla bug, PR #1271).

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
        raise ValueError(f"TOKENIZER_PATH={path!r}: tokenizer has {sp.vocab_size()} pieces "
                         f"but VOCAB_SIZE={vocab_size}")
    return sp

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

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
    return tuple(torch.tensor(a, device=device) for a in (base_bytes, has_leading_space, is_boundary_token))

def target_bytes(prev_ids, target_ids, luts):
    """Bytes of each target token given the token before it (the official formula)."""
    base_bytes, has_leading_space, is_boundary_token = luts
    leading_space = has_leading_space[target_ids] & ~is_boundary_token[prev_ids]
    return base_bytes[target_ids].to(torch.int64) + leading_space.to(torch.int64)

def audit_bytes(sp, tokens, luts, sample_tokens=10_000, bos_id=1):
    """Lookup-table bytes of a val sample must equal the UTF-8 bytes of its decoded documents."""
    tokens = tokens.detach().cpu().to(torch.int64)
    start = next(iter((tokens == bos_id).nonzero().flatten().tolist()), 0)
    sample, cpu_luts = tokens[start:min(tokens.numel(), start + sample_tokens)], tuple(t.cpu() for t in luts)
    lut_total = int(target_bytes(sample[:-1], sample[1:], cpu_luts).sum())
    doc_bounds = (sample == bos_id).nonzero().flatten().tolist() + [sample.numel()]
    decoded_total = sum(len(sp.decode(sample[a + 1:b].tolist()).encode("utf-8"))
                        for a, b in zip(doc_bounds[:-1], doc_bounds[1:]))
    if not doc_bounds[:-1] or doc_bounds[0] != 0:
        decoded_total += len(sp.decode(sample[1:doc_bounds[0]].tolist()).encode("utf-8"))
    result = {"passed": lut_total == decoded_total, "tokens": int(sample.numel()),
              "lut_bytes": lut_total, "decoded_bytes": decoded_total}
    if not result["passed"]:  # the token ids whose table bytes disagree with their own decoded bytes
        bad = []
        for prev, cur in zip(sample[:-1].tolist(), sample[1:].tolist()):
            want = len(sp.decode([prev, cur]).encode("utf-8")) - len(sp.decode([prev]).encode("utf-8"))
            if want != int(target_bytes(torch.tensor([prev]), torch.tensor([cur]), cpu_luts)) and cur not in bad:
                bad.append(cur)
        result["first_mismatch_ids"] = bad[:8]
    return result

# ===== END SHARED BLOCK: bpb v1 =====

# ===== BEGIN SHARED BLOCK: optim v1 =====
# Muon (modded-nanogpt; Keller Jordan): Nesterov momentum, then a quintic Newton-Schulz orthogonalization. Options:
# decoupled weight decay (PR #65 lineage), MuonEq-R row normalization (PR #1260). Parameters are split round-robin
# over ranks and the updates all-reduced. EMA of weights (PR #287).

NS_COEFFS = (3.4445, -4.7750, 2.0315)

def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7):
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum, backend_steps=5, nesterov=True, weight_decay=0.0, row_norm=False):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay, row_norm=row_norm)
        super().__init__(params, defaults)
    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                                  dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(group["momentum"]).add_(g)
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if group["row_norm"]:
                        g = g / (g.norm(dim=-1, keepdim=True) + 1e-7)
                    g = zeropower_via_newtonschulz5(g, steps=group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    updates[offset:offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

def lr_multiplier(h, step, elapsed_ms):
    """LR scale in [MIN_LR, 1]. WARMDOWN_FRAC > 0: linear decay over the last fraction of the wallclock
    budget (or of ITERATIONS when uncapped). Otherwise the baseline: WARMDOWN_ITERS x the mean step time."""
    cap_ms = 1000.0 * h.max_wallclock_seconds
    if h.warmdown_frac > 0:
        progress = elapsed_ms / cap_ms if cap_ms > 0 else step / h.iterations
        progress = max(progress, step / h.iterations)
        x = min(1.0, max(0.0, (1.0 - progress) / h.warmdown_frac))
    elif cap_ms <= 0:
        start = max(h.iterations - h.warmdown_iters, 0)
        x = 1.0 if step < start else max(h.iterations - step, 0) / max(h.warmdown_iters, 1)
    else:
        warmdown_ms, remaining_ms = h.warmdown_iters * elapsed_ms / max(step, 1), max(cap_ms - elapsed_ms, 0.0)
        x = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return h.min_lr + (1.0 - h.min_lr) * x

def muon_momentum_at(h, step):
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum

class EMA:
    """theta_bar <- d_t * theta_bar + (1 - d_t) * theta after every step, in fp32; the EMA is what gets saved.
    d_t = min(d, (1 + t) / (10 + t)) so that a short run is not dominated by its random initialization."""
    def __init__(self, model, decay):
        self.decay, self.updates, state = decay, 0, model.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.shadow = [state[k].detach().float().clone() for k in self.names]
    @torch.no_grad()
    def update(self, model):
        state, self.updates = model.state_dict(), self.updates + 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [state[k].detach().float() for k in self.names], 1.0 - decay)
    def state_dict(self, model):
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for k, v in zip(self.names, self.shadow):
            out[k] = v.to(out[k].dtype)
        return out

# ===== END SHARED BLOCK: optim v1 =====

# ===== BEGIN SHARED BLOCK: quant v1 =====
# Quantization and the artifact. Large matrices: per-row symmetric int-k (k = 4..8), fp16 scales (Triton on GPU,
# the same maths in torch on CPU); small tensors fp16, control tensors fp32. CLIP_METHOD clips, GPTQ given Hessians,
# late QAT (straight-through fake quant), BIT_ALLOC widths for the budget. Container: magic, version, a JSON header
# (script sha256, hparams, tokenizer, tensor schemes), one compressed payload of raw arrays; no pickle.

ARTIFACT_MAGIC = b"PGOLFART"
ARTIFACT_VERSION = 1
ARTIFACT_PREFIX = struct.Struct("<8sII")
MAX_HEADER_BYTES = 16 << 20
RUN_ONLY_FIELDS = ("run_id", "log_dir", "artifact_path")
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite candidates (PR #414)
ALLOC_MIN_BITS = 5  # the narrowest width the allocator gives a matrix: no record shipped int4 weights
TRITON_BLOCK = 1024
_TRITON = None  # the kernels, built on first use

def _bounded(decompressor, data, limit):
    out = decompressor.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    return out

COMPRESSORS = {  # name: (compress(data, level), decompress(data, limit)); zstd needs the zstandard package
    "zstd": (lambda d, level: zstandard.ZstdCompressor(level=level).compress(d),
             lambda d, limit: zstandard.ZstdDecompressor().decompress(d, max_output_size=limit)),
    "lzma": (lambda d, level: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
             lambda d, limit: _bounded(lzma.LZMADecompressor(), d, limit)),
    "zlib": (lambda d, level: zlib.compress(d, 9), lambda d, limit: _bounded(zlib.decompressobj(), d, limit)),
}

def compress_payload(raw, compressor, zstd_level=22):
    """The named compressor, or ('auto') each available one in threads (they release the GIL); smallest wins."""
    from concurrent.futures import ThreadPoolExecutor
    if compressor == "zstd" and zstandard is None:
        raise RuntimeError("COMPRESSOR=zstd: the zstandard package is not installed")
    names = [compressor] if compressor != "auto" else [n for n in COMPRESSORS if n != "zstd" or zstandard]
    with ThreadPoolExecutor(len(names)) as pool:
        blobs = list(pool.map(lambda n: COMPRESSORS[n][0](raw, zstd_level), names))
    return min(zip(names, blobs), key=lambda nb: len(nb[1]))

def _row_scales(clip, qmax):
    """fp16 c / qmax, or 1 where that is 0 (then every |w| <= c rounds to 0). Rounding divides by this stored s."""
    scale = (clip / qmax).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))

def _round_clamp(w, c, s, qmax):
    """q = round(clamp(w, -c, c) / s) in [-qmax, qmax]: the one rounding rule of this block."""
    return torch.clamp(w, -c, c).div_(s).round_().clamp_(-qmax, qmax)

def _triton_kernels():
    """(triton, quant, dequant), built on first use: @triton.jit reads the source file, which exec'd code lacks."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
            @triton.jit
            def quant(w_ptr, clip_ptr, scale_ptr, q_ptr, n_cols, qmax, BLOCK: tl.constexpr):
                row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                c = tl.load(clip_ptr + row)
                s = tl.load(scale_ptr + row).to(tl.float32)
                w = tl.load(w_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
                x = tl.math.div_rn(tl.minimum(tl.maximum(w, -c), c), s)  # IEEE division, as torch
                x = (x + 12582912.0) - 12582912.0  # 1.5 * 2^23: round half to even, as torch.round (|x| < 2^22)
                q = tl.minimum(tl.maximum(x, -qmax), qmax)
                tl.store(q_ptr + row * n_cols + cols, q.to(tl.int8), mask=cols < n_cols)
            @triton.jit
            def dequant(q_ptr, scale_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
                row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                q = tl.load(q_ptr + row * n_cols + cols, mask=cols < n_cols, other=0).to(tl.float32)
                s = tl.load(scale_ptr + row).to(tl.float32)
                tl.store(out_ptr + row * n_cols + cols, q * s, mask=cols < n_cols)
            _TRITON = (triton, quant, dequant)
        except Exception:
            _TRITON = False
    return _TRITON or None

def quantize_rows(w, bits, clip, use_triton=None):
    """(q int8, s fp16) by `_round_clamp`; use_triton None: the kernel for CUDA tensors when Triton is present."""
    qmax = 2 ** (bits - 1) - 1
    w, clip = w.float().contiguous(), clip.float().clamp_min(0).contiguous()
    scale = _row_scales(clip, qmax)
    if not (use_triton if use_triton is not None else w.is_cuda and _triton_kernels()):
        return _round_clamp(w, clip[:, None], scale.float()[:, None], qmax).to(torch.int8), scale
    triton, quant, _ = _triton_kernels()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    quant[(w.shape[0], triton.cdiv(w.shape[1], TRITON_BLOCK))](w, clip, scale, q, w.shape[1], qmax, BLOCK=TRITON_BLOCK)
    return q, scale

def dequantize_rows(q, scale, use_triton=None):
    if not (use_triton if use_triton is not None else q.is_cuda and _triton_kernels()):
        return q.float() * scale.float()[:, None]
    triton, _, dequant = _triton_kernels()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dequant[(q.shape[0], triton.cdiv(q.shape[1], TRITON_BLOCK))](q.contiguous(), scale.contiguous(), out, q.shape[1],
                                                                  BLOCK=TRITON_BLOCK)
    return out

def tensor_role(name):
    return "embed" if "emb" in name or "lm_head" in name else "mlp" if "mlp" in name else "attn"

def sdclip_k(name, h):
    return {"embed": h.sdclip_k_embed, "mlp": h.sdclip_k_mlp}.get(tensor_role(name), h.sdclip_k_attn)

def row_clip(w, bits, h, name=""):
    """Per-row clip. sdclip: c = k * std(row) (PR #1394); search: the quantile with the least roundtrip error."""
    if h.clip_method == "sdclip":
        return sdclip_k(name, h) * w.std(dim=1, correction=0)
    if h.clip_method == "percentile":  # the baseline's INT8_CLIP_PERCENTILE
        return torch.quantile(w.abs(), min(h.int8_clip_percentile / 100.0, 1.0), dim=1)
    cands = torch.quantile(w.abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1)
    errs = torch.stack([(dequantize_rows(*quantize_rows(w, bits, c)) - w).square().sum(1) for c in cands])
    return cands.gather(0, errs.argmin(0, keepdim=True))[0]

def _block_linears(model):
    return [(f"{n}.weight", m) for n, m in model.named_modules()
            if n.startswith("blocks.") and isinstance(m, nn.Linear)]

@torch.no_grad()
def collect_hessians(model, batches):
    """{name: X^T X / tokens} of every nn.Linear under `blocks.`, summed over ranks; pass the bare model."""
    sums, count, device = {}, torch.zeros((), dtype=torch.float64), next(model.parameters()).device
    def hook(module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[module] = x.T @ x + sums.get(module, 0.0)
    linears = _block_linears(model)
    hooks = [m.register_forward_hook(hook) for _, m in linears]
    try:
        for x in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model.forward_logits(x.to(device))
            count += x.numel()
    finally:
        for hk in hooks:
            hk.remove()
    count = float(dist_sum(count.to(device)))
    return {name: dist_sum(sums[m]) / count for name, m in linears if m in sums}

@torch.no_grad()
def generate_calibration_tokens(model, n_seqs, seq_len, vocab_size, temperature=0.8, seed=0):
    """Self-generated calibration (legal, about as good as training data, PR #1019); no KV cache."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n_seqs, 1), generator=g, device=device)
    for _ in range(seq_len - 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.forward_logits(tokens)[:, -1].float()
        tokens = torch.cat([tokens, torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)], 1)
    return tokens

def gptq_calibrate(model, h, next_batch=None):
    """Hessians from GPTQ_CALIB_SEQS sequences over the ranks (next_batch() or self-samples); it counts against
    the 600 s training clock (RULES.md 3), so it runs inside GPTQ_RESERVE_SECONDS."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, seqs = max(1, h.gptq_calib_seqs // world), []
    if h.gptq_calib_source == "self":
        seqs = list(generate_calibration_tokens(model, n, h.train_seq_len, h.vocab_size, 0.8, h.seed + rank).split(8))
    while sum(x.shape[0] for x in seqs) < n:
        seqs.append(next_batch()[0][:n - sum(x.shape[0] for x in seqs)])
    return collect_hessians(model, seqs)

def gptq_quantize(w, H, bits, clip, block=128, damp=0.01):
    """Columns by decreasing Hessian diagonal; each rounding error / pivot goes onto the later columns through
    the upper Cholesky factor of the damped inverse Hessian. Row scales are fixed from `clip`."""
    W, H, c, qmax = w.float().clone(), H.float().clone(), clip.float().clamp_min(0), 2 ** (bits - 1) - 1
    scale = _row_scales(c, qmax)
    s = scale.float()
    diag = torch.diagonal(H)
    diag[diag <= 0] = 1.0  # a column never seen in calibration: plain rounding, no error spread onto it
    order = torch.argsort(diag, descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    H += torch.eye(H.shape[0], device=H.device) * (damp * diag.mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i0 in range(0, W.shape[1], block):
        i1 = min(i0 + block, W.shape[1])
        Wb, Eb = W[:, i0:i1].clone(), torch.zeros(W.shape[0], i1 - i0, device=W.device)
        for j in range(i1 - i0):
            Q[:, i0 + j] = q = _round_clamp(Wb[:, j], c, s, qmax)
            Eb[:, j] = err = (Wb[:, j] - q * s) / U[i0 + j, i0 + j]
            Wb[:, j:] -= err[:, None] * U[i0 + j, i0 + j:i1][None, :]
        W[:, i1:] -= Eb @ U[i0:i1, i1:]
    return Q[:, torch.argsort(order)].to(torch.int8).contiguous(), scale

def _qat_linear_forward(self, x):
    """Late QAT: per-row int-k roundtrip (clip max |w| or k * std) when qat_on is 1, straight-through gradient."""
    w, wd = self.weight, self.weight.detach().float()
    c = (self.qat_k * wd.std(dim=1, correction=0) if self.qat_k > 0 else wd.abs().amax(dim=1))[:, None]
    s = _row_scales(c, self.qat_qmax).float()
    w = w + self.qat_on * (_round_clamp(wd, c, s, self.qat_qmax) * s - wd).to(w.dtype)
    return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

def enable_qat(model, h):
    """Fake-quant forward for every quantized nn.Linear under `blocks.`, off until set_qat. Switch and width are
    buffers: torch.compile constant-folded #315's class-attribute flag. Call before compile; keys are unchanged."""
    qmax = 2 ** ((h.qat_bits or h.quant_bits) - 1) - 1
    mods = [(n, m) for n, m in _block_linears(model) if m.weight.numel() > h.keep_float_max_numel]
    for name, m in mods:
        m.register_buffer("qat_on", torch.zeros((), device=m.weight.device), persistent=False)
        m.register_buffer("qat_qmax", torch.tensor(float(qmax), device=m.weight.device), persistent=False)
        m.qat_k = sdclip_k(name, h) if h.clip_method == "sdclip" else 0.0
        m.forward = _qat_linear_forward.__get__(m)
    return len(mods)

def set_qat(model, on):
    """A buffer write, no recompile. Returns `on`."""
    for m in model.modules():
        if hasattr(m, "qat_on"):
            m.qat_on.fill_(float(on))
    return on

def qat_step_hook(model, h, progress):
    """Switch QAT on (and return True) once training progress (0..1) reaches QAT_START_FRAC > 0."""
    return h.qat_start_frac > 0 and progress >= h.qat_start_frac and set_qat(model, True)

def tensor_plan(name, t, h, bits=None):
    """raw (non-float), int-k (large matrices: bits[name], EMBED_BITS, QUANT_BITS), fp32 (control) or fp16."""
    if not t.is_floating_point():
        return "raw"
    if t.ndim == 2 and t.numel() > h.keep_float_max_numel:
        return f"int{(bits or {}).get(name) or (h.embed_bits if tensor_role(name) == 'embed' else h.quant_bits)}"
    return "fp32" if any(p in name for p in CONTROL_TENSOR_PATTERNS) else "fp16"

def width_table(state, h, hessians=None, cache=None):
    """{name: {bits: (bytes, error)}}: bytes = order-0 entropy + 2 per scale (zstd-22 within ~1%, lzma ~3-7%);
    error = squared roundtrip error, or tr(E H E^T) / mean diag(H) where a Hessian is known."""
    table = {}
    for name in sorted(state):
        t = state[name].detach().float()
        if not tensor_plan(name, t, h).startswith("int"):
            continue
        H, table[name] = (hessians or {}).get(name), {}
        clip = None if h.clip_method == "search" else row_clip(t, 8, h, name)
        for bits in range(h.embed_bits if tensor_role(name) == "embed" else ALLOC_MIN_BITS, 9):
            q, scale = quantize_rows(t, bits, row_clip(t, bits, h, name) if clip is None else clip)
            if cache is not None and H is None:
                cache[(name, f"int{bits}")] = (q, scale)
            e = t - dequantize_rows(q, scale)
            err = ((e @ H) * e).sum() / torch.diagonal(H).mean().clamp_min(1e-12) if H is not None else e.square().sum()
            p = torch.bincount(q.flatten().view(torch.uint8), minlength=256).double() / q.numel()
            table[name][bits] = (float(-(p * p.clamp_min(1e-30).log2()).sum()) * q.numel() / 8 + 2 * len(t), float(err))
    return table

def _fixed_bytes(state, h, code_bytes):
    """Bytes the allocator cannot trade: the code, the header (estimated) and the float tensors (raw)."""
    size = {"fp16": 2, "fp32": 4}
    return code_bytes + 4096 + 200 * len(state) + sum(
        t.numel() * size.get(tensor_plan(n, t, h), t.element_size()) for n, t in state.items()
        if not tensor_plan(n, t, h).startswith("int"))

def plan_bits(state, h, code_bytes, hessians=None, table=None, ratio=1.0):
    """Greedy widths for SIZE_BUDGET - SIZE_MARGIN: lower the tensor with the least added error per byte saved."""
    table = width_table(state, h, hessians) if table is None else table
    budget = h.size_budget - h.size_margin - _fixed_bytes(state, h, code_bytes)
    bits = {n: max(row) for n, row in table.items()}
    total = ratio * sum(table[n][b][0] for n, b in bits.items())
    while total > budget:
        steps = [((row[bits[n] - 1][1] - row[bits[n]][1]) / max(row[bits[n]][0] - row[bits[n] - 1][0], 1.0), n)
                 for n, row in table.items() if bits[n] - 1 in row]
        if not steps:
            raise RuntimeError(f"SIZE_BUDGET={h.size_budget}: the model does not fit even at the narrowest widths "
                               f"({int(total)} estimated bytes for {int(budget)} available)")
        n = min(steps)[1]
        total -= ratio * (table[n][bits[n]][0] - table[n][bits[n] - 1][0])
        bits[n] -= 1
    return [{"name": n, "bits": b, "bytes": int(ratio * table[n][b][0]), "est_error": table[n][b][1]}
            for n, b in sorted(bits.items())]

def quantize_state_dict(state, h, bits=None, hessians=None, cache=None):
    """(header entries, raw payload); `bits` overrides widths, Hessians mean GPTQ, `cache` persists across calls."""
    entries, chunks, offset, cache = [], [], 0, {} if cache is None else cache
    for name in sorted(state):
        t = state[name].detach()
        scheme = tensor_plan(name, t, h, bits)
        entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                 "scheme": scheme}
        if scheme.startswith("int"):
            H, b = (hessians or {}).get(name), int(scheme[3:])
            if (name, scheme) not in cache:  # the CLIP_METHOD clip, then GPTQ given a Hessian, else rounding
                clip = row_clip(t.float(), b, h, name)
                cache[(name, scheme)] = gptq_quantize(t, H, b, clip) if H is not None else quantize_rows(t, b, clip)
            entry["method"] = "gptq" if H is not None else h.clip_method
            parts = dict(zip(("data", "scale"), cache[(name, scheme)]))
        else:
            parts = {"data": t if scheme == "raw" else t.to(torch.float16 if scheme == "fp16" else torch.float32)}
        for key, part in parts.items():
            blob = part.detach().cpu().contiguous().numpy().tobytes()
            entry[key] = [offset, len(blob)]
            chunks.append(blob)
            offset += len(blob)
        entries.append(entry)
    return entries, b"".join(chunks)

def dequantize_entries(entries, raw):
    state = {}
    for e in entries:
        (off, n), (so, sn), dtype, scheme = e["data"], e.get("scale", (0, 0)), getattr(torch, e["dtype"]), e["scheme"]
        np_dtype = {"fp16": np.float16, "fp32": np.float32}.get(scheme) or torch.empty(0, dtype=dtype).numpy().dtype
        t = torch.from_numpy(np.frombuffer(raw[off:off + n], np.int8 if scheme.startswith("int") else np_dtype).copy())
        if scheme.startswith("int"):
            scale = torch.from_numpy(np.frombuffer(raw[so:so + sn], np.float16).copy())
            t = dequantize_rows(t.reshape(e["shape"]), scale)
        state[e["name"]] = t.reshape(e["shape"]).to(dtype)
    return state

def code_bytes_of(path=None):
    with open(path or CODE_PATH, "rb") as f:
        return f.read()

def _header_sha256(header):  # the canonical header JSON without its own checksum: header bit flips are caught
    body = json.dumps({k: v for k, v in header.items() if k != "header_sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()

def _artifact_prefix_and_head(header):
    head = json.dumps({**header, "header_sha256": _header_sha256(header)}, sort_keys=True, separators=(",", ":"))
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(head.encode("utf-8"))) + head.encode("utf-8")

def write_artifact(path, header, payload):
    return write_bytes_atomic(path, _artifact_prefix_and_head(header) + payload)

def read_artifact_header(path):
    """(header, payload offset). ValueError naming the file for anything that is not our artifact."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(ARTIFACT_PREFIX.size)
        if len(prefix) < ARTIFACT_PREFIX.size:
            raise ValueError(f"{path}: {size} bytes is too short to be an artifact")
        magic, version, head_len = ARTIFACT_PREFIX.unpack(prefix)
        if magic != ARTIFACT_MAGIC:
            raise ValueError(f"{path}: not a Parameter Golf artifact (magic {magic!r})")
        if version != ARTIFACT_VERSION:
            raise ValueError(f"{path}: artifact format version {version}, this script reads {ARTIFACT_VERSION}")
        if head_len > min(MAX_HEADER_BYTES, size - ARTIFACT_PREFIX.size):
            raise ValueError(f"{path}: truncated or corrupt header (declares {head_len} bytes)")
        try:
            header = json.loads(f.read(head_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt artifact header ({exc})") from None
    if not isinstance(header, dict) or "tensors" not in header or "payload_sha256" not in header:
        raise ValueError(f"{path}: artifact header lacks its tensor table")
    if header.get("header_sha256", _header_sha256(header)) != _header_sha256(header):
        raise ValueError(f"{path}: header is corrupted (its sha256 differs from the one it records)")
    return header, ARTIFACT_PREFIX.size + head_len

def read_artifact(path):
    header, offset = read_artifact_header(path)
    with open(path, "rb") as f:
        payload = f.read()[offset:]
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"{path}: payload is truncated or corrupted (sha256 or length differs from the header)")
    name = header.get("compressor")
    if name not in COMPRESSORS or (name == "zstd" and zstandard is None):
        raise ValueError(f"{path}: compressor {name!r} is unknown or not installed (zstd needs zstandard)")
    try:
        raw = COMPRESSORS[name][1](payload, int(header["raw_bytes"]))
    except Exception as exc:  # zlib.error, lzma.LZMAError, ValueError, zstandard's own error type
        raise ValueError(f"{path}: payload does not decompress ({exc})") from None
    if len(raw) != header["raw_bytes"]:
        raise ValueError(f"{path}: payload inflates to {len(raw)} bytes, header says {header['raw_bytes']}")
    return header, raw

def artifact_state(model):
    """The state that ships: training-only heads (prefixes listed by the model) are left out."""
    drop = tuple(getattr(model, "training_only_prefixes", ()))
    return {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}

def save_artifact(model, h, path, state=None, hessians=None):
    """Quantize, compress, write; returns the byte accounting. BIT_ALLOC re-plans with the measured compression
    ratio until the total fits and uses >= 99% of SIZE_BUDGET - SIZE_MARGIN (4 tries, largest fitting wins)."""
    state = artifact_state(model) if state is None else state
    code = code_bytes_of()
    cache, ratio, compressor, plan, tries = {}, 1.0, h.compressor, None, []
    table = width_table(state, h, hessians, cache) if h.bit_alloc else None
    for _ in range(4 if h.bit_alloc else 1):
        if h.bit_alloc:
            previous, plan = plan, plan_bits(state, h, len(code), hessians, table, ratio)
            if plan == previous:
                break
        entries, raw = quantize_state_dict(state, h, {r["name"]: r["bits"] for r in plan or []}, hessians, cache)
        compressor, payload = compress_payload(raw, compressor, h.zstd_level)  # later tries keep the winner
        header = {"format": "pgolf-artifact", "script": os.path.basename(CODE_PATH),
                  "script_sha256": hashlib.sha256(code).hexdigest(), "tokenizer_sha256":
                  file_sha256(h.tokenizer_path) if os.path.isfile(h.tokenizer_path) else None,
                  "hparams": {k: v for k, v in dataclasses.asdict(h).items() if k not in RUN_ONLY_FIELDS},
                  "vocab_size": h.vocab_size, "compressor": compressor, "raw_bytes": len(raw),
                  "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                  "tensors": entries}
        tries.append((len(_artifact_prefix_and_head(header)) + len(payload) + len(code), header, payload, plan))
        if not h.bit_alloc or h.size_budget >= tries[-1][0] >= 0.99 * (h.size_budget - h.size_margin):
            break
        ratio *= (tries[-1][0] - _fixed_bytes(state, h, len(code))) / max(sum(r["bytes"] for r in plan), 1)
    fitting = [t for t in tries if t[0] <= h.size_budget]
    _, header, payload, plan = max(fitting, key=lambda t: t[0]) if fitting else min(tries, key=lambda t: t[0])
    artifact_bytes = write_artifact(path, header, payload)
    return {"artifact_bytes": artifact_bytes, "code_bytes": len(code), "total_bytes": artifact_bytes + len(code),
            "payload_bytes": len(payload), "raw_bytes": header["raw_bytes"], "compressor": header["compressor"],
            "budget_bytes": h.size_budget, "margin_bytes": h.size_budget - artifact_bytes - len(code), "plan": plan,
            "tries": len(tries)}

def load_artifact(path, allow_script_mismatch=False):
    """The dequantized model (on CPU, eval mode) and its hyperparameters, from the bytes on disk."""
    header, raw = read_artifact(path)
    own_sha = hashlib.sha256(code_bytes_of()).hexdigest()
    if header.get("script_sha256") != own_sha and not allow_script_mismatch:
        raise ValueError(f"{path}: written by {header.get('script')} sha256 {header.get('script_sha256')}, "
                         f"not by this script ({os.path.basename(CODE_PATH)} sha256 {own_sha})")
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    h = dataclasses.replace(Hyperparameters(), **{k: v for k, v in header["hparams"].items() if k in known})
    model = build_model(h)
    state = dequantize_entries(header["tensors"], raw)
    missing = [k for k in artifact_state(model) if k not in state]
    if missing:
        raise ValueError(f"{path}: artifact lacks tensors {missing[:4]} of the model it names")
    model.load_state_dict(state, strict=not getattr(model, "training_only_prefixes", ()))
    return model.eval(), h

# ===== END SHARED BLOCK: quant v1 =====

# ===== BEGIN SHARED BLOCK: eval v1 =====
# Evaluation: per-token NLL under the full softmax, float64 sums, bytes from the lookup tables, all-reduced.
# Standard: non-overlapping TRAIN_SEQ_LEN windows (the baseline). Sliding (PR #50): windows every EVAL_STRIDE,
# each target scored once, in the first window holding it. Score-first TTT (PR #461/#549): a chunk of windows is
# scored under inference mode, then trained on (the last never is); sliding is TTT without training, one code
# path. The causality audit (RULES.md C1) runs on any model with `forward_logits`.

def _dist_info():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

def _model_device(model):
    return next(model.parameters()).device

def _autocast(device):  # bf16 on CUDA, plain fp32 on CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def token_nll(model, x, y):
    """Per-token NLL (fp32) under the full softmax of `forward_logits`."""
    with _autocast(x.device):
        logits = model.forward_logits(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y)

def _eval_result(sums, t0, mode, **extra):
    nll, tokens, nbytes = (float(v) for v in sums.tolist())
    return {"mode": mode, "val_loss": nll / tokens, "val_bpb": nll / (math.log(2) * nbytes),
            "tokens": int(tokens), "bytes": int(nbytes), "nll_sum": nll,
            "eval_time_ms": 1000.0 * (time.perf_counter() - t0), **extra}

def eval_val(h, model, val_tokens, luts):
    t0, (rank, world), device, seq = time.perf_counter(), _dist_info(), _model_device(model), h.train_seq_len
    n_seqs = (val_tokens.numel() - 1) // seq
    if n_seqs < 1:
        raise ValueError(f"val split has {val_tokens.numel()} tokens, shorter than TRAIN_SEQ_LEN={seq} + 1")
    lo, hi, batch = n_seqs * rank // world, n_seqs * (rank + 1) // world, max(1, h.val_batch_size // (8 * seq))
    sums, was_training = torch.zeros(3, dtype=torch.float64, device=device), model.training
    model.eval()
    with torch.inference_mode():
        for s in range(lo, hi, batch):
            chunk = val_tokens[s * seq:min(s + batch, hi) * seq + 1].to(device=device, dtype=torch.int64)
            x, y = chunk[:-1].view(-1, seq), chunk[1:].view(-1, seq)
            sums[0] += token_nll(model, x, y).double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts).sum()
    model.train(was_training)
    dist_sum(sums)
    return _eval_result(sums, t0, "standard")

def sliding_windows(num_tokens, seq_len, stride):
    """Windows as (start, first scored target, last scored target) over tokens 0..num_tokens-1. Target j
    (1 <= j <= N-1) is scored in the first window holding it, with tokens start..j-1 as context."""
    n_targets = num_tokens - 1
    if n_targets < 1:
        raise ValueError(f"val split has {num_tokens} tokens: nothing to score")
    starts = np.arange(0, n_targets, stride, dtype=np.int64)
    firsts = np.where(starts == 0, 1, starts + seq_len - stride + 1)
    starts, firsts = starts[firsts <= n_targets], firsts[firsts <= n_targets]
    return starts, firsts, np.minimum(starts + seq_len, n_targets)

def _score_windows(model, tokens, windows, luts, batch, sums, coverage):
    """Score (starts, firsts, lasts) windows of this rank into sums; count every scored target in coverage."""
    device = sums.device
    for i in range(0, len(windows[0]), batch):
        s, f, l = (w[i:i + batch] for w in windows)
        for length in np.unique(l - s):
            sel = (l - s) == length
            ws = torch.as_tensor(s[sel], device=device)
            win = tokens[ws[:, None] + torch.arange(int(length) + 1, device=device)[None, :]]
            x, y = win[:, :-1], win[:, 1:]
            pos = torch.arange(int(length), device=device)[None, :]
            mask = pos >= torch.as_tensor(f[sel], device=device)[:, None] - ws[:, None] - 1
            sums[0] += (token_nll(model, x, y).double() * mask).sum()
            sums[1] += mask.sum()
            sums[2] += (target_bytes(x, y, luts) * mask).sum()
            targets = (ws[:, None] + 1 + pos)[mask]
            coverage.index_add_(0, targets, torch.ones_like(targets, dtype=coverage.dtype))

def _windowed_eval(h, model, val_tokens, luts, train_chunks):
    """Sliding-window scoring in chunks of TTT_CHUNK_TOKENS; with train_chunks, score-first TTT."""
    t0, (rank, world), device = time.perf_counter(), _dist_info(), _model_device(model)
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    seq_len, stride, chunk = h.eval_len, h.eval_stride, h.ttt_chunk_tokens
    starts, firsts, lasts = sliding_windows(tokens.numel(), seq_len, stride)
    chunk_ids, bounds = np.unique(firsts // chunk, return_index=True)  # firsts are sorted: contiguous chunks
    bounds = np.append(bounds, len(firsts))
    batch = max(1, h.val_batch_size // (8 * seq_len))
    sums, ledger = torch.zeros(3, dtype=torch.float64, device=device), []
    coverage = torch.zeros(tokens.numel(), dtype=torch.int32, device=device)
    trainer = _TTTTrainer(h, model, len(chunk_ids)) if train_chunks else None
    scorer = trainer.model if trainer else model
    for n, ci in enumerate(chunk_ids):
        sel = np.arange(bounds[n], bounds[n + 1])
        mine = sel[len(sel) * rank // world:len(sel) * (rank + 1) // world]
        scorer.eval()
        with torch.inference_mode():
            _score_windows(scorer, tokens, (starts[mine], firsts[mine], lasts[mine]), luts, batch, sums, coverage)
        scored_upto = int(lasts[sel].max())
        ledger.append({"event": "score", "chunk": int(ci), "scored_upto": scored_upto})
        if trainer is not None and n < len(chunk_ids) - 1:
            hi_tok = min(int(ci) * chunk + chunk, scored_upto + 1)
            for step in trainer.train_chunk(tokens[int(ci) * chunk:hi_tok], n):
                ledger.append({"event": "update", "chunk": int(ci), "step": step, "max_target": hi_tok - 1})
    dist_sum(sums)
    dist_sum(coverage)
    return _eval_result(sums, t0, "ttt" if train_chunks else "sliding", chunks=len(chunk_ids), windows=len(starts),
                        seq_len=seq_len, stride=stride, score_first=audit_score_first(ledger, coverage))

def eval_val_sliding(h, model, val_tokens, luts):
    return _windowed_eval(h, model, val_tokens, luts, train_chunks=False)

def eval_val_ttt(h, model, val_tokens, luts):
    return _windowed_eval(h, model, val_tokens, luts, train_chunks=True)

class _TTTTrainer:
    """SGD with momentum on a copy of the model; lr cosine-decays over chunks; the first TTT_FREEZE_BLOCKS
    blocks stay fixed; gradients are the mean over the global batch of sequences (all ranks)."""
    def __init__(self, h, model, num_chunks):
        self.h, self.num_chunks, self.model, self.steps = h, num_chunks, copy.deepcopy(model), 0
        frozen = {id(p) for b in list(getattr(self.model, "blocks", []))[:h.ttt_freeze_blocks] for p in b.parameters()}
        frozen |= {id(p) for p in self.model.parameters() if not p.requires_grad}  # e.g. a fixed manifold
        self.params = [p for p in self.model.parameters() if id(p) not in frozen]
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        self.opt = torch.optim.SGD(self.params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    def train_chunk(self, tokens, n):
        h, (rank, world), seq = self.h, _dist_info(), self.h.eval_len
        for g in self.opt.param_groups:  # cosine over the chunks
            g["lr"] = h.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * n / max(self.num_chunks - 1, 1)))
        n_seqs = (tokens.numel() - 1) // seq
        if n_seqs < 1:
            return
        seqs = tokens[:n_seqs * seq + 1]
        self.model.train()
        for _ in range(h.ttt_epochs):
            for b0 in range(0, n_seqs, h.ttt_batch_seqs):
                ids = list(range(b0, min(b0 + h.ttt_batch_seqs, n_seqs)))
                mine = torch.tensor(ids[rank::world], dtype=torch.long, device=seqs.device)
                self.opt.zero_grad(set_to_none=False)
                if len(mine):
                    win = seqs[mine[:, None] * seq + torch.arange(seq + 1, device=seqs.device)[None]]
                    (token_nll(self.model, win[:, :-1], win[:, 1:]).sum() / (len(ids) * seq)).backward()
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist_sum(p.grad)
                if h.ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, h.ttt_grad_clip)
                self.opt.step()
                self.steps += 1
                yield self.steps
        self.model.eval()

def audit_score_first(ledger, coverage):
    """C3 and C4 from the evaluator's own ledger: every update uses only targets already scored, and every
    target 1..N-1 was scored exactly once."""
    scored_upto, failures, updates = 0, [], 0
    for entry in ledger:
        if entry["event"] == "score":
            scored_upto = max(scored_upto, entry["scored_upto"])
        elif entry["event"] == "update":
            updates += 1
            if entry["max_target"] > scored_upto:
                failures.append(f"update {entry['step']} on chunk {entry['chunk']} used target "
                                f"{entry['max_target']} before it was scored (scored up to {scored_upto})")
    counts = coverage[1:]
    twice, missing = int((counts > 1).sum()), int((counts == 0).sum())
    failures += [msg for bad, msg in ((twice, f"{twice} targets scored more than once"),
                                      (missing, f"{missing} targets never scored"),
                                      (int(coverage[0]), "token 0 has no context and was scored")) if bad]
    return {"passed": not failures, "failures": failures[:5], "chunks_scored": sum(
        e["event"] == "score" for e in ledger), "updates": updates, "targets": int(counts.numel()),
        "scored_twice": twice, "never_scored": missing}

def audit_causality(model, seq_len, vocab_size, batch=3, chunk=64, tol=1e-5, seed=0):
    """C1 and C2 in eval mode, fp32: prefix invariance at several cuts, zero gradient from later embedding outputs
    (catches 1e-22 leaks such as a clamp after the mask), independent batch rows, a full finite distribution."""
    device, was_training, gen = _model_device(model), model.training, torch.Generator().manual_seed(seed)
    model.eval()
    def rand_tokens(*shape):
        return torch.randint(0, vocab_size, shape, generator=gen).to(device)
    def logits_of(x):
        with torch.no_grad():
            return model.forward_logits(x).float()
    failures, max_diff = [], 0.0
    x = rand_tokens(batch, seq_len)
    base = logits_of(x)
    if base.shape != (batch, seq_len, vocab_size):
        failures.append(f"logits shape {tuple(base.shape)} is not (batch, seq, vocab={vocab_size})")
    elif not torch.isfinite(base).all():
        failures.append("logits are not all finite")
    elif (torch.softmax(base.double(), dim=-1).sum(-1) - 1).abs().max() > 1e-4:
        failures.append("softmax over the vocabulary does not sum to 1")
    cuts = sorted({p for p in (0, 1, 2, chunk - 1, chunk, chunk + 1, seq_len // 2, seq_len - 2)
                   if 0 <= p < seq_len - 1})
    for p in cuts:
        for kind in ("suffix", "next"):
            x2 = x.clone()
            if kind == "suffix":
                x2[:, p + 1:] = rand_tokens(batch, seq_len - p - 1)
            else:
                x2[:, p + 1] = (x2[:, p + 1] + 1 + rand_tokens(batch)) % vocab_size
            diff = (logits_of(x2)[:, :p + 1] - base[:, :p + 1]).abs().max().item()
            max_diff = max(max_diff, diff)
            if not diff <= tol:
                failures.append(f"prefix: changing tokens after position {p} ({kind}) moved its logits by {diff:.3g}")
    if batch > 1:
        diff = (logits_of(torch.cat([x[:1], rand_tokens(batch - 1, seq_len)]))[0] - base[0]).abs().max().item()
        if not diff <= tol:
            failures.append(f"batch: changing other rows moved row 0 by {diff:.3g}")
    failures += _audit_jacobian(model, x, sorted({0, 1, seq_len // 2, seq_len - 2} & set(range(seq_len - 1))))
    model.train(was_training)
    return {"passed": not failures, "failures": failures[:8], "seq_len": seq_len, "cuts": cuts,
            "max_prefix_diff": max_diff}

def _audit_jacobian(model, x, positions):
    outputs = []
    def capture(module, inputs, out):
        if out.dim() >= 2 and tuple(out.shape[:2]) == tuple(x.shape):
            outputs.append(out.detach().requires_grad_(True))
            return outputs[-1]
    handles = [m.register_forward_hook(capture) for m in model.modules() if isinstance(m, nn.Embedding)]
    try:
        with torch.enable_grad():
            logits = model.forward_logits(x).float()
    finally:
        for handle in handles:
            handle.remove()
    if not outputs:
        return ["jacobian: no embedding output found to differentiate through"]
    failures, gen = [], torch.Generator().manual_seed(1)
    for i in positions:
        r = torch.randn(logits.shape[0], logits.shape[-1], generator=gen).to(logits.device)
        grads = torch.autograd.grad((logits[:, i] * r).sum(), outputs, retain_graph=True, allow_unused=True)
        leak = max((g[:, i + 1:].abs().max().item() for g in grads if g is not None and g[:, i + 1:].numel()),
                   default=0.0)
        if leak != 0:
            failures.append(f"jacobian: position {i} depends on later inputs (max |grad| {leak:.3g})")
    return failures

# ===== END SHARED BLOCK: eval v1 =====

# ===== BEGIN SHARED BLOCK: train v1 =====
# The pipeline every script runs: warmup-then-restore (compile priming off the clock), the wallclock-capped loop
# (stop decision all-reduced), EMA, periodic validation with a coherence sample, then serialize -> re-read from
# disk -> audits -> final eval -> summary. Optional model hooks: `prepare_training(h, rt, logger)` (timed inside
# the budget), `set_training_progress(frac)`, `validation_probes()` (dashboard). Telemetry (TECHNIQUES.md part E):
# SMMA 10/100/1000, cliff flag, status file, sample audits, embedding probes, an optional UCB1 shard mixer.

class Smma:
    """SMMA_t = (SMMA_{t-1} (N - 1) + x_t) / N, seeded with the first value."""
    def __init__(self, n):
        self.n, self.value = n, None
    def update(self, x):
        self.value = x if self.value is None else (self.value * (self.n - 1) + x) / self.n
        return self.value

def coherence_score(text):
    """0-100: word bigram diversity (35) + trigram diversity (35) + English-looking words (20) + distinct
    characters (10). "region region ..." scores about 23, ordinary prose 70 or more."""
    words = text.split()
    if not words:
        return 0.0
    def diversity(n):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0
    english = sum(w.isalpha() and len(w) <= 20 and any(c in "aeiouyAEIOUY" for c in w) for w in words)
    return 35 * diversity(2) + 35 * diversity(3) + 20 * english / len(words) + 10 * min(1.0, len(set(text)) / 25)

@torch.no_grad()
def generate_sample(model, sp, prompt, n_tokens, seq_len, temperature=0.0, seed=0):
    """Greedy (temperature 0) or sampled continuation of a fixed prompt, for the sample audit."""
    device, prompt_ids, was_training = _model_device(model), sp.encode(prompt), model.training
    ids, gen = [1] + prompt_ids, torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    for _ in range(n_tokens):
        x = torch.tensor([ids[-seq_len:]], device=device)
        with _autocast(device):
            logits = model.forward_logits(x)[0, -1].float().cpu()
        ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
                       if temperature > 0 else logits.argmax()))
    model.train(was_training)
    return sp.decode(ids[1 + len(prompt_ids):])

def embedding_probes(weight, sp, other=None, words=("the", "and", "of", "in", "is", "for", "with", "not")):
    """Anisotropy (mean cosine of random pairs), effective rank at 90/95% variance, top-5 cosine neighbours
    of a fixed probe list, and (with `other`, e.g. the dequantized copy) neighbour overlap@5."""
    w = F.normalize(weight.detach().float().cpu(), dim=-1)
    i, j = torch.randint(0, w.size(0), (2, 4096), generator=torch.Generator().manual_seed(0))
    s2 = torch.linalg.svdvals(weight.detach().float().cpu()).square()
    cum = torch.cumsum(s2, 0) / s2.sum()
    probes = [p for p in (sp.piece_to_id("\u2581" + t) for t in words) if 0 < p < w.size(0) and not sp.is_unknown(p)]
    def top5(m):
        sim = m[probes] @ m.T
        sim[torch.arange(len(probes)), probes] = -2.0
        return sim.topk(5, dim=-1).indices
    nb = top5(w) if probes else torch.zeros(0, 5, dtype=torch.long)
    out = {"anisotropy": float((w[i] * w[j]).sum(-1).mean()), "rank90": int((cum < 0.90).sum()) + 1,
           "rank95": int((cum < 0.95).sum()) + 1,
           "neighbours": {sp.id_to_piece(p): [sp.id_to_piece(int(q)) for q in row] for p, row in zip(probes, nb)}}
    if other is not None and probes:
        nb2 = top5(F.normalize(other.detach().float().cpu(), dim=-1))
        out["neighbour_overlap"] = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nb, nb2))
                                         / (5 * len(probes)))
    return out

def project_capped_simplex(w, lo, hi, iters=100):
    """argmin ||x - w|| s.t. lo <= x <= hi, sum x = 1: x = clip(w + tau, lo, hi) with tau by bisection."""
    w, lo, hi = (np.asarray(a, dtype=np.float64) for a in (w, lo, hi))
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12 or (lo > hi).any():
        raise ValueError(f"shard mixer: infeasible bounds (sum of floors {lo.sum():.3f}, of caps {hi.sum():.3f})")
    a, b = (lo - w).min() - 1, (hi - w).max() + 1
    for _ in range(iters):
        tau = (a + b) / 2
        a, b = (tau, b) if np.clip(w + tau, lo, hi).sum() < 1 else (a, tau)
    return np.clip(w + (a + b) / 2, lo, hi)

class ShardMixer:
    """UCB1 over training shards (off by default; weak evidence, PR #737): each phase plays the best-UCB arm, its
    one-hot projected onto {floor <= w <= cap, sum w = 1}; reward = loss drop on held-out *training* data."""
    def __init__(self, h, n_shards):
        self.h, self.k, self.arm, self.last_loss = h, n_shards, 0, None
        self.counts, self.rewards, self.rng = np.zeros(n_shards), np.zeros(n_shards), np.random.default_rng(h.seed)
        self.lo = np.full(n_shards, min(h.mixer_floor, 1.0 / n_shards))
        self.hi = np.full(n_shards, max(h.mixer_cap, 1.0 / n_shards))
        self.weights = project_capped_simplex(np.eye(n_shards)[0], self.lo, self.hi)
    def pick(self):
        return int(self.rng.choice(self.k, p=self.weights))
    def end_phase(self, heldout_loss):
        if self.last_loss is not None:
            self.counts[self.arm] += 1
            self.rewards[self.arm] += self.last_loss - heldout_loss
        self.last_loss = heldout_loss
        n, plays = self.counts.sum(), np.maximum(self.counts, 1)
        ucb = self.rewards / plays + self.h.mixer_ucb_c * np.sqrt(np.log(max(n, 1)) / plays)
        self.arm = int(np.argmax(np.where(self.counts == 0, np.inf, ucb)))
        self.weights = project_capped_simplex(np.eye(self.k)[self.arm], self.lo, self.hi)
        return self.weights

def build_optimizers(model, h, device):
    matrices, adam_groups = param_groups(model, h)
    muon = Muon(matrices, lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps,
                weight_decay=h.muon_wd, row_norm=h.muon_row_norm)
    for g in muon.param_groups:
        g["base_lr"] = h.matrix_lr
    adam = torch.optim.AdamW(adam_groups, betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd,
                             fused=device.type == "cuda")
    return [muon, adam]

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

def _broadcast(rt, obj):
    """Rank 0's value of obj on every rank."""
    holder = [obj]
    if rt.distributed:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]

class Validator:
    """Periodic validation (paused clock): val loss, a coherence sample, the model's probes, the status."""
    def __init__(self, h, rt, model, sp, logger):
        self.h, self.rt, self.model, self.sp, self.logger = h, rt, model, sp, logger
        self.val, self.low_streak = None, 0
    def __call__(self, step, train_ms):
        h, logger = self.h, self.logger
        if self.val is None:  # (tokens, lookup tables), loaded on first use
            self.val = (load_validation_tokens(h.data_path, h.train_seq_len, h.val_max_tokens),
                        build_sentencepiece_luts(self.sp, h.vocab_size, self.rt.device))
        res = eval_val(h, self.model, *self.val)
        logger.log0(f"step:{step}/{h.iterations} val_loss:{res['val_loss']:.4f} val_bpb:{res['val_bpb']:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
        sample = generate_sample(self.model, self.sp, h.sample_prompt, h.sample_tokens, h.train_seq_len)
        score = coherence_score(sample)
        self.low_streak = self.low_streak + 1 if score < 30 else 0
        collapsed = self.low_streak >= 5  # five low samples in a row
        logger.log0(f"sample:{step} coherence:{score:.1f}{' COLLAPSE' if collapsed else ''} text:{sample[:160]!r}")
        probes = self.model.validation_probes() if hasattr(self.model, "validation_probes") else None
        logger.event("eval", step=step, label="periodic", val_loss=res["val_loss"], val_bpb=res["val_bpb"],
                     coherence=score, collapse=collapsed, sample=sample, probes=probes)
        history = {"val_step": step, "val_bpb": res["val_bpb"], "coherence_step": step, "coherence": score}
        if probes:
            history.update({"geometry_step": step, **{k: probes[k] for k in
                            ("analogy", "cluster_gap", "direction", "word_order") if k in probes}})
        logger.update_status(force=True, val_loss=res["val_loss"], val_bpb=res["val_bpb"], coherence=score,
                             collapse=collapsed, sample=sample, geometry=probes, history=history,
                             artifact_bytes=estimate_artifact_bytes(self.model, h), artifact_bytes_exact=False)
        return collapsed and h.halt_on_collapse

def estimate_artifact_bytes(model, h):
    """Fast estimate for the dashboard (default widths, zlib level 1); the exact figure comes at the end."""
    _, raw = quantize_state_dict(artifact_state(model), h)
    return len(zlib.compress(raw, 1))

def train_model(h, rt, model, logger, ledger, validator=None):
    """Train in place; returns the EMA (or None), the loop statistics and the loader (GPTQ calibrates from it)."""
    device = rt.device
    if h.qat_start_frac > 0:
        n = enable_qat(model, h)
        logger.log0(f"qat: {n} matrices fake-quantized to int{h.qat_bits or h.quant_bits} from {h.qat_start_frac:.2f}")
    step_model = torch.compile(model, dynamic=False) if h.compile and device.type == "cuda" else model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        step_model = DDP(step_model, device_ids=[rt.local_rank] if device.type == "cuda" else None,
                         broadcast_buffers=False)
    optimizers = build_optimizers(model, h, device)
    loader = DistributedTokenLoader(h.data_path, rt.rank, rt.world_size, device)
    mixer = ShardMixer(h, len(loader.files)) if h.data_mixer else None
    heldout = loader.heldout(h.mixer_heldout_tokens, h.train_seq_len) if mixer else None
    progress_hook = getattr(model, "set_training_progress", None)
    def train_step(step, lr_scale):
        total = torch.zeros((), device=device)
        for micro in range(rt.grad_accum_steps):
            x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len, rt.grad_accum_steps,
                                     shard=mixer.pick() if mixer else None)
            last_micro = micro == rt.grad_accum_steps - 1  # DDP all-reduces on the last micro-step only
            ctx = step_model.no_sync() if rt.distributed and not last_micro else contextlib.nullcontext()
            with ctx, _autocast(device):
                loss = step_model(x, y)
            (loss / rt.grad_accum_steps).backward()
            total += loss.detach()
        for g in (g for opt in optimizers for g in opt.param_groups):
            g["lr"] = g["base_lr"] * lr_scale
        for g in optimizers[0].param_groups:
            g["momentum"] = muon_momentum_at(h, step)
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return total / rt.grad_accum_steps
    if h.warmup_steps > 0:  # prime compile and kernels, then restore model, optimizers and loader
        t0, loader_state = time.perf_counter(), loader.state()
        initial, opt_states = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
        for step in range(h.warmup_steps):
            if progress_hook:  # both halves of a schedule that changes the graph (recurrence) get compiled
                progress_hook(float(step >= h.warmup_steps // 2))
            train_step(step, 1.0)
        model.load_state_dict(initial)
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        loader.restore(loader_state)
        ledger["warmup_s_excluded"] = time.perf_counter() - t0
        logger.log0(f"warmup: {h.warmup_steps} steps in {ledger['warmup_s_excluded']:.1f}s (excluded from the clock)")
    ema, smmas = EMA(model, h.ema_decay) if h.ema_decay > 0 else None, {n: Smma(n) for n in (10, 100, 1000)}
    reserve = h.gptq_reserve_seconds if h.gptq_enabled else 0.0  # GPTQ calibrates inside the budget (#1001)
    cap_ms = 1000.0 * max(h.max_wallclock_seconds - ledger.get("precompute_s", 0.0) - reserve, 0.0) \
        if h.max_wallclock_seconds > 0 else 0.0
    if reserve and cap_ms:
        logger.log0(f"gptq:reserving {reserve:.1f}s, effective={cap_ms:.0f}ms")
    cap_h = dataclasses.replace(h, max_wallclock_seconds=cap_ms / 1000.0)
    train_ms, step, stop_after, halted, qat_on = 0.0, 0, None, False, False
    _sync(device)
    t0 = time.perf_counter()
    while True:
        last = step == h.iterations or (stop_after is not None and step >= stop_after) or halted
        if validator and h.val_loss_every > 0 and step > 0 and (last or step % h.val_loss_every == 0):
            _sync(device)
            train_ms += 1000.0 * (time.perf_counter() - t0)
            halted = validator(step, train_ms) or halted
            if halted and not last:
                logger.log0(f"halting: coherence collapse at step {step} (HALT_ON_COLLAPSE=1)")
            t0 = time.perf_counter()
        if last or halted:
            _sync(device)
            train_ms += 1000.0 * (time.perf_counter() - t0)
            break
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        frac = max(elapsed_ms / cap_ms if cap_ms > 0 else 0.0, step / h.iterations)
        if progress_hook:
            progress_hook(frac)
        if not qat_on and qat_step_hook(model, h, frac):
            qat_on = True
            logger.log0(f"qat:on step:{step} frac:{frac:.3f}")
        lr_scale = lr_multiplier(cap_h, step, elapsed_ms)
        loss, step = train_step(step, lr_scale), step + 1
        if ema is not None:
            ema.update(model)
        for s in smmas.values():  # every step, on the device: no host sync on the hot path
            s.update(loss)
        if mixer and step % h.mixer_phase_steps == 0:
            with torch.no_grad(), _autocast(device):
                weights = mixer.end_phase(float(model(*heldout)))
            logger.event("mixer", step=step, weights=[round(float(w), 4) for w in weights])
        approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        log_now = h.train_log_every > 0 and (step <= 10 or step % h.train_log_every == 0)
        if log_now or step % max(h.status_every, 1) == 0:
            value, smoothed = float(loss), {f"smma{n}": float(s.value) for n, s in smmas.items()}
            step_ms, tok_s = approx_ms / step, h.train_batch_tokens * step * 1000.0 / max(approx_ms, 1e-9)
            if value < 0.5 * smoothed["smma100"]:
                logger.event("cliff", step=step, train_loss=value, smma100=smoothed["smma100"])
            if log_now:
                logger.log0(f"step:{step}/{h.iterations} train_loss:{value:.4f} "
                            f"train_time:{approx_ms:.0f}ms step_avg:{step_ms:.2f}ms tok/s:{tok_s:.0f}")
                logger.event("train", step=step, train_loss=value, lr_scale=lr_scale, train_time_ms=approx_ms, **smoothed)
            logger.update_status(state="training", step=step, iterations=h.iterations, elapsed_s=approx_ms / 1000,
                                 tokens_seen=step * h.train_batch_tokens, lr_scale=lr_scale, train_loss=value,
                                 step_ms=step_ms, tokens_per_s=tok_s, **smoothed,
                                 history={"step": step, "train_loss": value, "smma100": smoothed["smma100"],
                                          "lr_scale": lr_scale, "tokens_per_s": tok_s})
        reached = torch.tensor(float(cap_ms > 0 and approx_ms >= cap_ms), device=device)
        if stop_after is None and bool(dist_max(reached)):
            stop_after = step
            logger.log0(f"stopping_early: wallclock_cap train_time:{approx_ms:.0f}ms step:{step}/{h.iterations}")
    ledger["train_loop_s"] = train_ms / 1000.0
    logger.update_status(force=True, step=step, elapsed_s=train_ms / 1000, tokens_seen=step * h.train_batch_tokens)
    if device.type == "cuda":
        logger.log0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    stats = {"steps": step, "train_time_ms": train_ms, "step_avg_ms": train_ms / max(step, 1), "halted": halted}
    return ema, stats, loader

def timed_eval(label, h, model, val_tokens, luts, mode, logger, ledger):
    """One eval, logged in one format: `<label> val_loss:... val_bpb:... eval_time:...ms`."""
    res = {"standard": eval_val, "sliding": eval_val_sliding, "ttt": eval_val_ttt}[mode](h, model, val_tokens, luts)
    ledger[f"eval_{label}_s"] = res["eval_time_ms"] / 1000.0
    logger.log0(f"{label} val_loss:{res['val_loss']:.8f} val_bpb:{res['val_bpb']:.8f} "
                f"eval_time:{res['eval_time_ms']:.0f}ms")
    logger.event("eval", label=label, **{k: v for k, v in res.items() if k != "score_first"})
    return res

def run_audits(h, model, sp, val_tokens, luts, logger):
    """Causality at the train length and at the eval window, and the byte accounting on a val sample."""
    audit_len = h.audit_seq_len or h.train_seq_len
    audits = {"causality": audit_causality(model, audit_len, h.vocab_size)}
    if h.eval_len != audit_len:
        audits["causality_eval"] = audit_causality(model, h.eval_len, h.vocab_size)
    audits["bytes"] = audit_bytes(sp, val_tokens, luts)
    for name, res in audits.items():
        detail = "" if res["passed"] else f" failures:{res.get('failures') or res.get('first_mismatch_ids')}"
        logger.log0(f"audit:{name} passed:{res['passed']}{detail}")
        logger.event("audit", name=name, **res)
    return audits

def run_main(h):
    """The whole run; returns the process exit status (0 valid, 3 score INVALID)."""
    rt = setup_runtime()
    run_id = _broadcast(rt, h.run_id or time.strftime("%Y%m%d_%H%M%S") + f"_{h.preset}_{uuid.uuid4().hex[:6]}")
    artifact_path = h.artifact_path or os.path.join(h.log_dir, f"{run_id}.pga")
    logger = RunLogger(h.log_dir, run_id, rt.is_main)
    code, device_name = code_bytes_of(), device_description(rt.device)
    logger.log0(code.decode("utf-8") + "\n" + "=" * 100, console=False)
    logger.log0(f"versions: python {platform.python_version()} torch {torch.__version__} numpy {np.__version__}")
    logger.log0(f"hardware: {device_name} world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps}")
    logger.log0("\n".join(["Hyperparameters:"] + [f"  {k}: {v}" for k, v in sorted(dataclasses.asdict(h).items())]))
    sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
    n_train, n_val = len(shard_files(h.data_path, "train")), val_token_count(h.data_path)
    if n_val < max(h.train_seq_len, h.eval_len) + 1:
        raise ValueError(f"DATA_PATH={h.data_path!r}: the val split has {n_val} tokens, shorter than one "
                         f"sequence of {max(h.train_seq_len, h.eval_len)} + 1")
    seed_everything(h.seed)
    model = build_model(h).to(rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.log0(f"model_params:{n_params}\ntrain_shards:{n_train} val_tokens:{n_val}")
    logger.event("start", run_id=run_id, preset=h.preset, device=device_name, world_size=rt.world_size,
                 model_params=n_params, hparams=dataclasses.asdict(h))
    logger.update_status(force=True, script=os.path.basename(CODE_PATH), preset=h.preset, device=device_name,
                         state="starting", step=0, iterations=h.iterations, code_bytes=len(code))
    ledger = {"hardware": device_name, "precompute_s": 0.0}
    if hasattr(model, "prepare_training"):
        t0 = time.perf_counter()
        model.prepare_training(h, rt, logger)
        ledger["precompute_s"] = time.perf_counter() - t0
        logger.log0(f"precompute: {ledger['precompute_s']:.1f}s from train shards (inside the training budget)")
    ema, stats, loader = train_model(h, rt, model, logger, ledger, Validator(h, rt, model, sp, logger))
    if ema is not None:
        model.load_state_dict(ema.state_dict(model))
    hessians = None
    if h.gptq_enabled:  # on training data (or self-samples), never val; timed against the training budget
        t0 = time.perf_counter()
        hessians = gptq_calibrate(model, h, lambda: loader.next_batch(h.train_batch_tokens, h.train_seq_len,
                                                                       rt.grad_accum_steps))
        ledger["gptq_calib_s"] = time.perf_counter() - t0
        logger.log0(f"GPTQ:collected {len(hessians)} Hessians in {ledger['gptq_calib_s']:.1f}s")
    train_total = ledger["train_loop_s"] + ledger["precompute_s"] + ledger.get("gptq_calib_s", 0.0)
    logger.log0(f"training_budget: {train_total:.1f}s (loop + precompute + GPTQ) of MAX_WALLCLOCK_SECONDS="
                f"{h.max_wallclock_seconds:g} on {device_name}")
    logger.update_status(force=True, state="evaluating")
    val_tokens = load_validation_tokens(h.data_path, max(h.train_seq_len, h.eval_len), h.val_max_tokens)
    if h.val_max_tokens:
        logger.log0(f"val_tokens: first {val_tokens.numel()} of {n_val} (VAL_MAX_TOKENS): not an official score")
    luts = build_sentencepiece_luts(sp, h.vocab_size, rt.device)
    pre = timed_eval("pre-quantization post-ema", h, model, val_tokens, luts, "standard", logger, ledger)
    embed_before = model.tok_emb.weight.detach().clone() if hasattr(model, "tok_emb") else None
    t0 = time.perf_counter()
    sizes = _broadcast(rt, save_artifact(model, h, artifact_path, hessians=hessians) if rt.is_main else None)
    ledger["serialize_s"] = time.perf_counter() - t0
    model = load_artifact(artifact_path)[0].to(rt.device)
    for row in sizes.get("plan") or []:
        logger.log0(f"quant_plan: {row['name']} int{row['bits']} est_bytes:{row['bytes']} est_error:{row['est_error']:.4g}")
    widths = "mixed" if sizes.get("plan") else f"int{h.quant_bits}"
    logger.log0(f"Serialized model {widths}+{sizes['compressor']}: {sizes['artifact_bytes']} bytes (payload:"
                f"{sizes['raw_bytes']} compressed:{sizes['payload_bytes']})\nCode size: {sizes['code_bytes']} bytes\n"
                f"Total submission size int8+zlib: {sizes['total_bytes']} bytes")
    over = sizes["total_bytes"] > h.size_budget
    logger.log0(f"budget: total {sizes['total_bytes']} of {h.size_budget} bytes, margin "
                f"{h.size_budget - sizes['total_bytes']}{' OVER BUDGET' if over else ''}")
    logger.event("artifact", path=artifact_path, **sizes)
    probes = embedding_probes(embed_before, sp, model.tok_emb.weight) if embed_before is not None else None
    logger.update_status(force=True, artifact_bytes=sizes["artifact_bytes"], artifact_bytes_exact=True, probes=probes)
    if probes:
        logger.log0(f"embedding_probes: {json.dumps(probes)}")
    t0 = time.perf_counter()
    audits = run_audits(h, model, sp, val_tokens, luts, logger)
    ledger["audit_s"] = time.perf_counter() - t0
    rt_res = timed_eval("final_int8_zlib_roundtrip", h, model, val_tokens, luts, "standard", logger, ledger)
    logger.log0(f"final_int8_zlib_roundtrip_exact val_loss:{rt_res['val_loss']:.8f} val_bpb:{rt_res['val_bpb']:.8f}")
    final, mode = rt_res, ("ttt" if h.ttt_enabled else h.eval_mode)
    if mode != "standard":
        label = {"sliding": "final_sliding_window", "ttt": "legal_ttt"}[mode]
        final = timed_eval(label, h, model, val_tokens, luts, mode, logger, ledger)
        logger.log0(f"{label}_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f} "
                    f"stride:{h.eval_stride} seq_len:{h.eval_len}")
        sf = audits["score_first"] = final["score_first"]
        logger.log0(f"audit:score_first passed:{sf['passed']} chunks:{sf['chunks_scored']} updates:{sf['updates']} "
                    f"targets:{sf['targets']} scored_twice:{sf['scored_twice']} never_scored:{sf['never_scored']}")
    valid = all(a["passed"] for a in audits.values()) and not over
    if not valid:
        why = [name for name, a in audits.items() if not a["passed"]] + (["over budget"] if over else [])
        logger.log0(f"score INVALID: failed {', '.join(why)}")
    logger.log0(f"time_ledger: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in ledger.items()})}")
    summary = {
        "run_id": run_id, "script": os.path.basename(CODE_PATH), "preset": h.preset, "valid": valid,
        "artifact_path": artifact_path, "artifact_bytes": sizes["artifact_bytes"], "code_bytes": sizes["code_bytes"],
        "total_bytes": sizes["total_bytes"], "budget_bytes": h.size_budget, "eval_mode": mode,
        "val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "tokens": final["tokens"], "bytes": final["bytes"],
        "eval_time_ms": final["eval_time_ms"], "pre_quant_val_bpb": pre["val_bpb"],
        "roundtrip_val_bpb": rt_res["val_bpb"], "val_truncated": bool(h.val_max_tokens), "model_params": n_params,
        "seed": h.seed, "world_size": rt.world_size, "hardware": device_name, "time_ledger": ledger,
        "train_budget_s": train_total,
        "audits": {k: {"passed": v["passed"], **({} if v["passed"] else {"failures": v.get("failures")})}
                   for k, v in audits.items()}, **stats,
    }
    logger.event("end", **summary)
    logger.update_status(force=True, state="done" if valid else "failed", val_loss=final["val_loss"],
                         val_bpb=final["val_bpb"], audits=summary["audits"])
    logger.log0(f"summary: {json.dumps(summary, sort_keys=True)}")
    if rt.distributed:
        dist.destroy_process_group()
    return 0 if valid else 3

# ===== END SHARED BLOCK: train v1 =====

# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# The manifold (PR #663 "V18" ideas, TECHNIQUES.md B.1, rewritten): co-occurrence counts of train shards ->
# springs, torsion, mass, directed springs, syntactic coordinates -> a seeded physics layout -> spectral
# coordinates `sc` (V x S) and static neighbours `static_nb` (V x K), frozen state that ships in the artifact
# (zeros until `prepare_training` builds them). The network: h0 = Linear([MLP(sc[x]); emb(x)]) with no position
# embedding (recency terms carry order, so any window length works), then NUM_LAYERS hops of one shared gated
# cell with per-hop spectral FiLM. Every score over positions is masked to j <= i before its top-k or softmax,
# and the token itself is always a valid candidate (B.2 items 1-5).

RECENCY_BUCKETS = 16  # learned score bias per log2(1 + i - j) bucket

def manifold_dims(h):
    """(spectral modes, directional and syntactic coordinates each, total width S) for the vocabulary."""
    modes, coords = min(h.manifold_modes, h.vocab_size // 4), min(h.manifold_coords, h.vocab_size // 8)
    return modes, coords, modes + 2 * coords

def count_cooccurrence(shards, V, device, chunk=1 << 24):
    """float64 (V, V) counts: n1 of offset 1, r5 of offsets 1..5, c10 of offsets 1..10 weighted 1/offset, by
    torch.bincount of prev * V + next over chunks of `chunk` first positions."""
    n1, r5, c10 = (torch.zeros(V * V, dtype=torch.float64, device=device) for _ in range(3))
    for shard in shards:
        t = shard.to(device=device, dtype=torch.int64)
        for s in range(0, t.numel(), chunk):
            a = t[s:s + chunk + 10]
            for o in range(1, min(11, a.numel())):
                m = min(chunk, a.numel() - o)
                c = torch.bincount(a[:m] * V + a[o:o + m], minlength=V * V).double()
                c10 += c / o
                r5 += c if o <= 5 else 0.0
                n1 += c if o == 1 else 0.0
    return [c.view(V, V) for c in (n1, r5, c10)]

def top_modes(sym, k):
    """Top-k eigenpairs of a symmetric matrix as eigenvectors x sqrt|eigenvalue|: torch on the GPU (float64 up to
    V = 4096), numpy's LAPACK on the CPU (several times faster than torch's eigh there)."""
    if sym.is_cuda:
        evals, evecs = torch.linalg.eigh(sym.double() if sym.size(0) <= 4096 else sym.float())
    else:
        evals, evecs = (torch.from_numpy(a) for a in np.linalg.eigh(sym.double().numpy()))
    return (evecs[:, -k:] * evals[-k:].abs().sqrt()).flip(-1).float().to(sym.device)

def build_manifold(counts, h):
    """(sc float32 (V, S), static_nb int32 (V, K), stats) from the counts; the same bytes for the same seed."""
    n1, r5, c10 = (c.float() for c in counts)
    V, (modes, coords, _), dev = n1.size(0), manifold_dims(h), n1.device
    gen = torch.Generator(device=dev).manual_seed(h.manifold_seed)
    row_norm = lambda m: m / m.sum(1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    c = c10 + c10.T  # 1. springs: sqrt PPMI > 0.5 of the symmetric windowed co-occurrence, zero diagonal
    c.fill_diagonal_(0)
    ppmi = torch.log(c * c.sum() / (c.sum(1)[:, None] * c.sum(1)[None, :]).clamp_min(1e-12)).clamp_min(0)
    ws = torch.where(ppmi > 0.5, ppmi.sqrt(), 0.0)
    tors = row_norm(r5.T) - row_norm(r5)  # 2. torsion: left minus right context; U S of its SVD (Gram eigh)
    asym, dirc = tors.norm(dim=1), top_modes(tors @ tors.T, coords)
    pf, pb = row_norm(n1), row_norm(n1.T)  # 3. mass: successor entropy (the maximum below 10 successors)
    ent = torch.where(n1.sum(1) < 10, math.log(V), -(pf * pf.clamp_min(1e-12).log()).sum(1))
    mass = (1 / (ent + 1)) / (1 / (ent + 1)).max()
    dd = ((pf - pb).abs() + (pf - pb).abs().T) / 2  # 4. directed springs above the 90th percentile
    nz = dd[dd > 0]
    wd = torch.where(dd > (nz.kthvalue(max(1, int(0.9 * nz.numel()))).values if nz.numel() else 0), dd, 0.0)
    syn = top_modes(pb @ pb.T + pf @ pf.T, coords)  # 5. U S of the SVD of [left bigram | right bigram]
    # 6. physics: springs w_s|d|^2 + 0.3 w_d|d|^2 over fixed seeded edge samples; (1 - 0.1 m_i m_j)/|d| over P
    # fresh random pairs per step and 0.5 a_i a_j/|d| over the first P/40 of them; Adam 0.05 cosine to 5e-4.
    P, steps = h.manifold_pairs, h.manifold_physics_steps
    edges = []
    for w, cap in ((ws, int(2.5 * P)), (wd, int(1.25 * P))):
        i, j = torch.triu(w, 1).nonzero(as_tuple=True)
        keep = torch.randperm(i.numel(), generator=gen, device=dev)[:cap] if i.numel() > cap else slice(None)
        edges.append((i[keep], j[keep], w[i[keep], j[keep]]))
    (si, sj, sw), (di, dj, dw) = edges
    pos = (0.1 * torch.randn(V, h.manifold_physics_dim, generator=gen, device=dev)).requires_grad_()
    opt, energy = torch.optim.Adam([pos], lr=0.05), torch.zeros(())
    sq = lambda a, b: (F.embedding(a, pos) - F.embedding(b, pos)).square().sum(-1)  # noqa: E731 (fast backward)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 5e-4 + 0.5 * (0.05 - 5e-4) * (1 + math.cos(math.pi * step / steps))
        ri = torch.randint(0, V, (P,), generator=gen, device=dev)
        rj = (ri + torch.randint(1, V, (P,), generator=gen, device=dev)) % V  # never a self pair
        d, na = (sq(ri, rj) + 1e-6).sqrt(), max(1, P // 40)
        energy = ((sw * sq(si, sj)).sum() + 0.3 * (dw * sq(di, dj)).sum() + ((1 - 0.1 * mass[ri] * mass[rj]) / d).sum()
                  + 0.5 * (asym[ri[:na]] * asym[rj[:na]] / d[:na]).sum())
        opt.zero_grad(set_to_none=True)
        energy.backward()
        torch.nn.utils.clip_grad_norm_([pos], 10.0)
        opt.step()
    inv = torch.cdist(pos.detach(), pos.detach()).clamp_min(1e-3).pow(-3)  # 7. spectral modes of the coupling
    inv.fill_diagonal_(0)
    spec = top_modes(2 * ws + 0.1 * mass[:, None] * mass[None, :] + 0.3 * wd + inv, modes)
    sc = torch.cat([spec] + [f * spec.std() / m.std().clamp_min(1e-12) * m for f, m in ((0.5, dirc), (0.3, syn))], 1)
    sc = sc / sc.std().clamp_min(1e-12)  # unit scale for the network's inputs
    cos = F.normalize(sc, dim=1) @ F.normalize(sc, dim=1).T
    cos.fill_diagonal_(-2.0)
    stats = {"springs": si.numel(), "directed": di.numel(), "energy": float(energy.detach())}
    return sc, cos.topk(h.manifold_neighbours, dim=1).indices.int(), stats

class CastedLinear(nn.Linear):
    """fp32 weights cast at use (bf16 autocast on GPU); `zero=True` starts the layer at exactly zero."""
    def __init__(self, n_in, n_out, bias=True, zero=False):
        super().__init__(n_in, n_out, bias=bias)
        for p in self.parameters() if zero else ():
            nn.init.zeros_(p)
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

def sparsemax(z):
    """Sparsemax over the last dim (Martins & Astudillo 2016), tau from the valid entries only: -inf entries are
    masked and come out exactly 0. Every row must hold one finite entry (the caller's always-valid candidate)."""
    zs = z.sort(dim=-1, descending=True).values
    cs = zs.cumsum(-1)
    k = (1 + torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype) * zs > cs).sum(-1, keepdim=True)
    return (z - (cs.gather(-1, k - 1) - 1) / k).clamp_min(0)

def route(score, blocked, k):
    """Sparsemax over each row's top-k unblocked candidates (masked before the top-k), scattered back to a dense
    (..., T, T) weight matrix whose blocked entries are exactly 0."""
    val, idx = score.masked_fill(blocked, float("-inf")).topk(min(k, score.size(-1)), dim=-1)
    return torch.zeros_like(score).scatter(-1, idx, sparsemax(val))

class HopCell(nn.Module):
    """One hop: messages routed by sparsemax (causal top-k, plus static neighbours behind a gate) into a gated
    update MLP, manifold-guided attention, then the geodesic mixer capped at 0.2 |h|. FiLM comes from the caller."""
    def __init__(self, h, S):
        super().__init__()
        D, hidden, H = h.model_dim, int(h.mlp_mult * h.model_dim), h.num_heads
        self.heads, self.topk, self.nb_k = H, h.route_topk, h.manifold_neighbours + 1
        self.msg, self.up = CastedLinear(D, D), CastedLinear(2 * D, hidden)
        self.c_q, self.c_k, self.c_v = CastedLinear(D + 2 * S, D), CastedLinear(D + S, D), CastedLinear(D, D)
        self.mix_in, self.mix_gate = CastedLinear(D, hidden), CastedLinear(S, hidden)
        self.down, self.proj, self.mix_out = (CastedLinear(n, D, zero=True) for n in (hidden, D, hidden))
        self.route_scale = nn.Parameter(torch.tensor([5.0, 2.5]))  # seed: 5 (endpoint_sim * H + 0.5 msg_sim)
        self.manifold_bias = nn.Parameter(torch.ones(H))  # w_m in the attention score w_m scn_i . scn_j
        self.rel_bias = nn.Parameter(torch.zeros(H + 1, RECENCY_BUCKETS))  # attention heads, then the router
        self.nb_gate = nn.Parameter(torch.tensor(-4.0))  # the static-neighbour route starts nearly shut (seed)
    def attention(self, z, c):
        """Q from [z; scn; velocity], K from [z; scn]; score bias w_m scn_i . scn_j; no clamp, the mask last, fp32."""
        B, T, D = z.shape
        H, dh = self.heads, D // self.heads
        scn, vel = c["scn"].to(z.dtype), c["vel"].to(z.dtype)
        q = F.rms_norm(self.c_q(torch.cat([z, scn, vel], -1)).view(B, T, H, dh).transpose(1, 2), (dh,))
        k = F.rms_norm(self.c_k(torch.cat([z, scn], -1)).view(B, T, H, dh).transpose(1, 2), (dh,))
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(dh) + self.manifold_bias[:, None, None] * c["sim"][:, None]
        p = torch.softmax((s + self.rel_bias[:H][:, c["bucket"]]).masked_fill(c["future"], float("-inf")), dim=-1)
        y = p.to(z.dtype) @ self.c_v(z).view(B, T, H, dh).transpose(1, 2)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))
    def forward(self, h, film, sc, c, entropy):
        scale, shift, gate = film.chunk(3, dim=-1)
        z = F.rms_norm(h, (h.size(-1),)) * (1 + scale) + shift
        msg = self.msg(z)
        mn = F.normalize(msg.float(), dim=-1)
        score = (self.route_scale[0] * c["sim"] * entropy[..., None] + self.route_scale[1] * (mn @ mn.transpose(1, 2))
                 + self.rel_bias[-1][c["bucket"]])
        A = route(score, c["future"], self.topk)
        routed = (A + torch.sigmoid(self.nb_gate) * route(score, c["not_nb"], self.nb_k)).to(msg.dtype) @ msg
        h = h + torch.sigmoid(gate) * self.down(F.gelu(self.up(torch.cat([z, routed], -1)))) + self.attention(z, c)
        mix = self.mix_out(F.gelu(self.mix_in(F.rms_norm(h, (h.size(-1),)))) * torch.sigmoid(self.mix_gate(sc)))
        cap = 0.2 * h.norm(dim=-1, keepdim=True) / mix.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return h + mix * cap.clamp(max=1.0).detach(), A

class ManifoldLM(nn.Module):
    def __init__(self, h):
        super().__init__()
        V, D, (_, _, S) = h.vocab_size, h.model_dim, manifold_dims(h)
        self.softcap, self.tau = h.logit_softcap, h.velocity_tau
        self.tok_emb = nn.Embedding(V, D)
        self.sc_emb = nn.Embedding.from_pretrained(torch.zeros(V, S), freeze=True)  # an Embedding: the audit hooks it
        self.register_buffer("static_nb", torch.zeros(V, h.manifold_neighbours, dtype=torch.int32))
        self.sc_mlp = nn.Sequential(CastedLinear(S, D), nn.GELU(), CastedLinear(D, D))
        self.in_proj = CastedLinear(2 * D, D)
        self.films = nn.ModuleList(CastedLinear(S, 3 * D, zero=True) for _ in range(h.num_layers))  # scale, shift, gate
        self.cells = nn.ModuleList(HopCell(h, S) for _ in range(min(h.hop_cells, h.num_layers)))
        self.transport = CastedLinear(S, D, bias=False) if h.num_layers > 1 else None
        # Untied head with bias (the seed's): the input embedding is fused with sc through in_proj, so its
        # geometry is not the output's; the bias holds the unigram. TIE_EMBEDDINGS=1 shares tok_emb.
        self.lm_head = None if h.tie_embeddings else CastedLinear(D, V, bias=False, zero=True)
        self.lm_bias = nn.Parameter(torch.zeros(V))
        if h.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
    @torch.no_grad()
    def prepare_training(self, h, rt, logger):
        """Count the first MANIFOLD_TOKENS train tokens (whole shards split over ranks, counts all-reduced), build
        the manifold, and give every rank rank 0's bytes (GPU atomics may differ in the last bit)."""
        t0 = time.perf_counter()
        files = shard_files(h.data_path, "train")
        if any("_val_" in os.path.basename(p) for p in files):
            raise RuntimeError(f"DATA_PATH={h.data_path!r}: a validation shard is in the manifold's train list")
        sizes = np.cumsum([(os.path.getsize(p) - SHARD_HEADER_BYTES) // 2 for p in files])
        files = files[:int(np.searchsorted(sizes, h.manifold_tokens)) + 1]
        mine = (load_data_shard(p) for p in files[rt.rank::rt.world_size])
        counts = [dist_sum(c) for c in count_cooccurrence(mine, h.vocab_size, rt.device)]
        t1 = time.perf_counter()
        with torch.enable_grad():
            sc, nb, stats = build_manifold(counts, h)
        self.sc_emb.weight.copy_(sc)
        self.static_nb.copy_(nb)
        for t in (self.sc_emb.weight.data, self.static_nb) if dist.is_available() and dist.is_initialized() else ():
            dist.broadcast(t, 0)
        logger.log0(f"manifold: bigrams:{int(counts[0].sum())} shards:{len(files)} sc:{tuple(sc.shape)} {stats} "
                    f"count:{t1 - t0:.1f}s build:{time.perf_counter() - t1:.1f}s")
    def context(self, x, scn):
        """Causal tables shared by the hops: masks, recency buckets, velocity (w_ij ~ exp(-(i-j)/tau) over j < i,
        recent tokens dominate), manifold similarity, and the static-neighbour candidates: j < i holding a static
        neighbour of x_i, each neighbour token at its most recent occurrence before i, plus i itself."""
        B, T = x.shape
        i = torch.arange(T, device=x.device)
        gap = i[:, None] - i[None, :]
        past = gap > 0
        w = torch.exp(-gap.clamp_min(0).float() / self.tau) * past
        vel = scn - (w / w.sum(-1, keepdim=True).clamp_min(1e-30)) @ scn  # row 0 has no past: velocity 0
        key = (x * T + i).sort(dim=-1).values  # nxt[j]: next occurrence of token x_j (T if none)
        tok, p = key // T, key % T
        nxt = torch.full_like(x, T).scatter(1, p[:, :-1], torch.where(tok[:, 1:] == tok[:, :-1], p[:, 1:], T))
        V = self.sc_emb.num_embeddings
        adj = torch.zeros(V, V, dtype=torch.bool, device=x.device).scatter_(1, self.static_nb.long(), True)
        nb = (adj[x[:, :, None], x[:, None, :]] & past & (nxt[:, None, :] >= i[:, None])) | (gap == 0)
        return {"future": gap < 0, "not_nb": ~nb, "scn": scn, "vel": vel * past.any(-1)[:, None],
                "bucket": torch.log2(1 + gap.clamp_min(0).float()).long().clamp_max(RECENCY_BUCKETS - 1),
                "sim": scn @ scn.transpose(1, 2)}
    def logits(self, h):
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(F.rms_norm(h, (h.size(-1),)), w.to(h.dtype), self.lm_bias.to(h.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap)
    def forward_logits(self, input_ids):
        sc = self.sc_emb(input_ids)
        c = self.context(input_ids, F.normalize(sc.float(), dim=-1))
        h = self.in_proj(torch.cat([self.sc_mlp(sc), self.tok_emb(input_ids)], -1))
        A = None
        for layer, film in enumerate(self.films):
            if A is not None:  # parallel transport, blend 0.2: h <- 0.8 h + 0.2 (I - 2 u u^T) h, u pointing from
                p = self.transport(sc)  # the token's point to its routed context's point (unit length or less)
                d = (p - A.to(p.dtype) @ p).float()
                u = (d * torch.rsqrt(d.square().sum(-1, keepdim=True) + 1e-6)).to(h.dtype)
                h = h - 0.4 * u * (u * h).sum(-1, keepdim=True)
            with torch.no_grad():  # the normalized output entropy steers the router (seed)
                lp = self.logits(h).log_softmax(-1)
                entropy = -(lp.exp() * lp).sum(-1) / math.log(lp.size(-1))
            h, A = self.cells[layer % len(self.cells)](h, film(sc), sc, c, entropy)
        return self.logits(h)
    def forward(self, input_ids, target_ids):
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))

def build_model(h):
    if h.route_topk < 1 or h.hop_cells < 1:
        raise ValueError(f"ROUTE_TOPK={h.route_topk} and HOP_CELLS={h.hop_cells} must be positive")
    return ManifoldLM(h)

def param_groups(model, h):
    """Muon for the 2-D weights of linear layers; Adam for the embedding, the head, biases, gates and tables;
    the frozen manifold goes to neither."""
    head = [model.tok_emb.weight] + ([model.lm_head.weight] if model.lm_head is not None else [])
    matrices, scalars = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and all(p is not q for q in head):
            (matrices if p.ndim == 2 and name.endswith(".weight") else scalars).append(p)
    embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
    groups = [{"params": [model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr},
              {"params": scalars, "lr": h.scalar_lr, "base_lr": h.scalar_lr}]
    if model.lm_head is not None:
        groups.append({"params": [model.lm_head.weight], "lr": h.head_lr, "base_lr": h.head_lr})
    return matrices, groups

# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
# The loop, serialization, audits and final eval are the shared train block; this script adds nothing.

def main():
    return run_main(Hyperparameters.from_env())

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
