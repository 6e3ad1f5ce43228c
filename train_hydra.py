"""Hydra: a causal chunk-concept LM scored in bits per byte (TECHNIQUES.md part C; docs/hydra.md). Every HYDRA_CHUNK
tokens pool into a 32x16 code that a causal predictor forecasts and later blocks read; training-only heads and six
geometry losses shape the codes. Credits: the seed "Lean Hydra" (ruapotato/Free-Language-Embeddings, ideas only),
InfoNCE (van den Oord 2018), VICReg (Bardes 2021), train_gpt.py's record stack. Run: torchrun --nproc_per_node=8."""

import contextlib
import copy
import dataclasses
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import random
import string
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
    # Model: a GPT trunk (its first NUM_LAYERS // 2 blocks encode), a HYDRA_SLOTS x HYDRA_SLOT_DIM code per HYDRA_CHUNK
    # tokens; HYDRA_MODE=record drops the aux losses for the last AUX_CUTOFF of the budget, research keeps them.
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    hydra_chunk: int = 64
    hydra_slots: int = 32
    hydra_slot_dim: int = 16
    hydra_aux: bool = True
    hydra_mode: str = "record"
    hydra_aux_every: int = 5
    def validate_model(self):
        if self.num_layers < 2:  # also covers NUM_LAYERS <= 0
            self.bad("NUM_LAYERS", "the hydra needs an encoder and a decoder block")
        for name in "model_dim num_heads num_kv_heads hydra_chunk hydra_slots hydra_slot_dim hydra_aux_every".split():
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.model_dim % (2 * self.num_heads) or self.num_heads % self.num_kv_heads:
            self.bad("MODEL_DIM", "must split into NUM_HEADS even heads, NUM_HEADS into NUM_KV_HEADS groups")
        if self.hydra_mode not in ("record", "research"):
            self.bad("HYDRA_MODE", "must be one of record, research")
# Rarely tuned: the predictor and the training-only heads scale with MODEL_DIM (TECHNIQUES.md C.2 sizes at 512).
ROPE_BASE, LOGIT_SOFTCAP, QK_GAIN_INIT, TIED_EMBED_INIT_STD = 10000.0, 30.0, 1.5, 0.005
AUX_CUTOFF, GEO_WARMUP = 0.3, 0.1  # fractions of the budget: record mode's aux-free tail, the geometry ramp
LAMBDA_AUX, LAMBDA_PRED, LAMBDA_GEO, AUX_CHUNKS = 0.1, 0.1, 0.05, 256  # AUX_CHUNKS: chunks/step for recon, parse
# record: train_gpt.py's record options, 8 blocks, T = 2048 (TECHNIQUES.md C.2); research keeps aux; smoke: CPU.
RECORD = {"ema_decay": 0.997, "muon_wd": 0.04, "muon_row_norm": True, "warmdown_frac": 0.75, "eval_mode": "sliding",
          "num_layers": 8, "train_seq_len": 2048}
PRESETS = {"record": RECORD, "research": {**RECORD, "hydra_mode": "research"}, "smoke": dict(
    data_path="data/datasets/pydoc_sp1024", tokenizer_path="data/tokenizers/pydoc_1024_bpe.model", iterations=2000,
    warmup_steps=2, warmdown_frac=0.3, max_wallclock_seconds=150.0, compile=False, train_batch_tokens=16384,
    train_seq_len=256, num_layers=4, model_dim=192, num_heads=4, num_kv_heads=2, val_batch_size=32768,
    val_loss_every=100, train_log_every=25, status_every=10, matrix_lr=0.03, ema_decay=0.99,
    muon_momentum_warmup_steps=50, eval_mode="sliding")}
CODE_PATH = os.path.abspath(__file__)
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
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
# MODEL (TECHNIQUES.md C.2): encoder chunk j pools into Z_j, a causal transformer predicts Zhat_k = P(Z_<k), decoder
# tokens of chunk k get U_a Z_{k-1} + U_b Zhat_k; memory resets at BOS (a null code); heads under `heads.` train only.
BOS_ID = 1  # <s>: every document of the shards starts with it (official tokenizers)
GEO_LAYOUT = (16, 2, 6, 4, 4)  # R base sentences (+ R word-order swaps), Q relations x P pairs, G x M clusters
GEO_ROWS = 2 * GEO_LAYOUT[0] + 2 * GEO_LAYOUT[1] * GEO_LAYOUT[2] + GEO_LAYOUT[3] * GEO_LAYOUT[4]
GEO_LEN = 20  # tokens per template sentence, BOS included (the longest takes 19 with the pydoc sp1024)
GEO_WEIGHTS = dict(word_order=2.0, hard_repulsion=1.0, batch_repulsion=0.3, analogy=2.0, direction=1.5, cluster=1.5)
STAT_KEYS = ("pred", "recon", "recon_acc", "recon_exact", "recon_exact_ema", "bow", "infonce", "parse", "geo")
class CastedLinear(nn.Linear):
    def __init__(self, fan_in, fan_out, zero_init=False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))
class Block(nn.Module):
    """train_gpt.py's block: GQA with QK-RMSNorm, RoPE and a learned query gain, relu^2 MLP; causal unless told."""
    def __init__(self, dim, heads, kv_heads, mlp_mult, causal=True):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.causal = heads, kv_heads, dim // heads, causal
        self.c_q, self.c_k, self.c_v = (CastedLinear(dim, n * dim // heads) for n in (heads, kv_heads, kv_heads))
        self.proj, self.mlp_proj = CastedLinear(dim, dim, True), CastedLinear(int(mlp_mult * dim), dim, True)
        self.mlp_fc, self.q_gain = CastedLinear(dim, int(mlp_mult * dim)), nn.Parameter(QK_GAIN_INIT * torch.ones(heads))
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
    def forward(self, x, x0, mask=None):
        (B, T, D), mix, norm = x.shape, self.resid_mix.to(x.dtype), lambda t: F.rms_norm(t, (t.size(-1),))
        x = mix[0] * x + mix[1] * x0
        q, k, v = (lin(norm(x)).view(B, T, -1, self.hd).transpose(1, 2) for lin in (self.c_q, self.c_k, self.c_v))
        inv = 1.0 / ROPE_BASE ** (torch.arange(0, self.hd, 2, device=x.device, dtype=torch.float32) / self.hd)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)
        cos, sin, half = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype), self.hd // 2
        rope = lambda t: torch.cat((t[..., :half] * cos + t[..., half:] * sin,  # noqa: E731
                                    t[..., half:] * cos - t[..., :half] * sin), dim=-1)
        q, k = rope(norm(q)) * self.q_gain.to(x.dtype)[:, None, None], rope(norm(k))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and self.causal,
                                           enable_gqa=self.kv_heads != self.heads)
        x = x + self.attn_scale.to(x.dtype) * self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp_scale.to(x.dtype) * self.mlp_proj(torch.relu(self.mlp_fc(norm(x))).square())
def run_stack(blocks, x, mask=None):
    x0 = x
    for block in blocks:
        x = block(x, x0, mask)
    return x
class ConceptPool(nn.Module):
    """Z[s] = sum_t softmax_t(q_s . W_k h_t) W_v h_t over the valid positions of one chunk; RMSNorm per slot."""
    def __init__(self, dim, h):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(h.hydra_slots, 64))
        self.key, self.value = CastedLinear(dim, 64), CastedLinear(dim, h.hydra_slot_dim)
    def forward(self, x, valid):  # (N, L, dim), (N, L) bool -> (N, slots, slot_dim)
        scores = self.queries.to(x.dtype) @ self.key(x).transpose(1, 2) / 64 ** 0.5
        w = torch.softmax(scores.float().masked_fill(~valid[:, None], float("-inf")), dim=-1)
        return F.rms_norm(w.to(x.dtype) @ self.value(x), (self.value.out_features,))
class ChunkDecoder(nn.Module):
    """Training-only: a code's slots as tokens plus C position queries, bidirectional; `out` values per position."""
    def __init__(self, h, out, layers):
        super().__init__()
        d, self.slots = 64 * max(2, h.model_dim // 128), h.hydra_slots  # 256 at d 512
        self.inp, self.out = CastedLinear(h.hydra_slot_dim, d), CastedLinear(d, out)
        self.queries = nn.Parameter(0.02 * torch.randn(h.hydra_slots + h.hydra_chunk, d))
        self.blocks = nn.ModuleList(Block(d, d // 64, d // 64, 2.0, causal=False) for _ in range(layers))
    def forward(self, z):  # (N, slots, slot_dim) -> (N, chunk, out)
        x = F.pad(self.inp(z), (0, 0, 0, self.queries.size(0) - self.slots)) + self.queries.to(z.dtype)
        return self.out(F.rms_norm(run_stack(self.blocks, x)[:, self.slots:], (x.size(-1),)))
class StrippedHead(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("training-only head called on a model loaded without it (heads are not shipped)")
# Template fillers (the seed's slot filling), split into disjoint halves: train = even positions, test = odd ones.
WORDS = dict(line.split("=") for line in (
    "animal=cat dog horse bird frog goat lion bear duck cow pig rat owl hen seal crab ant bee snake tiger|"
    "object=book cup lamp chair table pen key coin ball hat bag door clock shoe plate spoon car bike boat kite|"
    "adj=red blue green old new warm cold soft hard dark bright loud quiet clean dirty heavy wet dry sharp round|"
    "tense=opens:opened paints:painted climbs:climbed kicks:kicked pulls:pulled fixes:fixed carries:carried "
    "moves:moved lifts:lifted drops:dropped washes:washed watches:watched|sentiment=good:bad great:awful happy:sad "
    "lovely:ugly kind:cruel nice:nasty pleasant:horrible fine:terrible|size=big:small huge:tiny large:little "
    "tall:short wide:narrow thick:thin long:brief vast:slight|manner=quickly:slowly loudly:quietly happily:sadly "
    "gently:roughly calmly:nervously carefully:carelessly eagerly:lazily boldly:shyly|"
    "location=above:below inside:outside over:under near:beyond beside:behind in:on").split("|"))
# (positive, negative) per relation; {a} animal, {o} object, {j} adjective, {x}:{y} a pair of the relation
RELATIONS = {"negation": ("the {a} is {j}", "the {a} is not {j}"), "plurality": ("the {a} sees the {o}",
             "the {a}s see the {o}"), "tense": ("the {a} {x} the {o}", "the {a} {y} the {o}"),
             "sentiment": ("the {a} found a {x} {o}", "the {a} found a {y} {o}"),
             "size": ("the {a} has a {x} {o}", "the {a} has a {y} {o}"),
             "manner": ("the {a} ate the {o} {x}", "the {a} ate the {o} {y}"),
             "location": ("the {a} sleeps {x} the {o}", "the {a} sleeps {y} the {o}")}
def vocabulary(split):
    return {k: v.split()[split == "test"::2] for k, v in WORDS.items()}
def template_batch(rng, split, layout=GEO_LAYOUT):
    """R sentences, their R word-order swaps, Q relations x P (pos, neg) pairs, G clusters of M: `geometry`'s order."""
    R, Q, P, G, M = layout
    voc, names = vocabulary(split), list(RELATIONS)
    def fill(rel, a=None, pair=None):
        x, y = (pair or rng.choice(voc.get(rel, ["-:-"]))).split(":")
        a = a or rng.choice(voc["animal"])
        return [t.format(a=a, o=rng.choice(voc["object"]), j=rng.choice(voc["adj"]), x=x, y=y) for t in RELATIONS[rel]]
    out = [fill(rng.choice(names))[0] for _ in range(R)]
    for w, i in ((s.split(), rng.randrange(len(s.split()) - 1)) for s in out[:R]):
        out.append(" ".join(w[:i] + [w[i + 1], w[i]] + w[i + 2:]))
    for rel in rng.sample(names, Q):
        pair = rng.choice(voc.get(rel, ["-:-"]))
        out += [s for _ in range(P) for s in fill(rel, pair=pair)]
    return out + [fill(rel, a=a)[0] for a in rng.sample(voc["animal"], G) for rel in rng.sample(names, M)]
def geometry(f, layout=GEO_LAYOUT):
    """The seed's six losses and probes; analogy a - b + c ~ d (pairs i, i+1), baseline max(cos(c, d), cos(a, d))."""
    R, Q, P, G, M = layout
    f, eye = F.normalize(f.float(), dim=-1), lambda n: torch.eye(n, device=f.device)
    mean = lambda x, mask: (x * mask).sum() / mask.expand_as(x).sum()  # noqa: E731
    base, swap, pairs, cl = f[:R], f[R:2 * R], f[2 * R:2 * R + 2 * Q * P].view(Q, P, 2, -1), f[2 * R + 2 * Q * P:]
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    c, d, s, sc, order = b.roll(-1, 1), a.roll(-1, 1), base @ base.T, cl @ cl.T, (base * swap).sum(-1)
    same = (torch.arange(G * M, device=f.device)[:, None] // M == torch.arange(G * M, device=f.device) // M).float()
    delta = F.normalize(a - b, dim=-1)
    dd, analogy = delta @ delta.transpose(1, 2), (F.normalize(a - b + c, dim=-1) * d).sum(-1)
    losses = {"word_order": torch.relu(order - 0.5).mean(),
              "hard_repulsion": torch.relu((s - 2 * eye(R)).topk(min(8, R - 1), dim=1).values - 0.10).mean(),
              "batch_repulsion": mean(torch.relu(s - 0.3), 1 - eye(R)), "analogy": torch.relu(0.9 - analogy).mean(),
              "direction": mean(torch.relu(0.8 - dd), 1 - eye(P)),
              "cluster": mean(torch.relu(0.5 - sc), same - eye(G * M)) + mean(torch.relu(sc - 0.2), 1 - same)}
    probes = {"analogy": analogy.mean(), "analogy_baseline": torch.maximum((c * d).sum(-1), (a * d).sum(-1)).mean(),
              "cluster_gap": mean(sc, same - eye(G * M)) - mean(sc, 1 - same), "direction": mean(dd, 1 - eye(P)),
              "word_order": order.mean()}
    return losses, probes
def effective_rank(x, p):
    """rank_p over the centered rows of x: the first index with cumsum(s^2) / sum(s^2) >= p, plus 1."""
    s2 = torch.linalg.svdvals(x.float() - x.float().mean(0)).square()
    return int((torch.cumsum(s2, 0) / s2.sum() < p).sum()) + 1
class Hydra(nn.Module):
    training_only_prefixes = ("heads.",)
    def __init__(self, h):
        super().__init__()
        D, S, sd, V, P = h.model_dim, h.hydra_slots, h.hydra_slot_dim, h.vocab_size, 32 * max(2, h.model_dim // 128)
        self.h, self.chunk, self.n_enc = h, h.hydra_chunk, h.num_layers // 2  # predictor width P: 128 at d 512
        self.tok_emb = nn.Embedding(V, D, _weight=TIED_EMBED_INIT_STD * torch.randn(V, D))  # tied with the output head
        self.blocks = nn.ModuleList(Block(D, h.num_heads, h.num_kv_heads, h.mlp_mult) for _ in range(h.num_layers))
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, h.num_layers - self.n_enc), D))
        self.pool, self.null_code = ConceptPool(D, h), nn.Parameter(torch.randn(S, sd))
        self.pred_in, self.pred_out = CastedLinear(S * sd, P), CastedLinear(P, S * sd)
        self.pred_blocks = nn.ModuleList(Block(P, P // 32, P // 32, 4.0) for _ in range(2))
        self.mem_prev, self.mem_hat = CastedLinear(S * sd, D, zero_init=True), CastedLinear(S * sd, D, zero_init=True)
        self.heads = nn.ModuleDict({"recon": ChunkDecoder(h, V, max(1, h.num_layers // 4)),
                                    "parse": ChunkDecoder(h, 6 + 8, 1), "bow": CastedLinear(S * sd, V)})
        for name, init in (("case_map", torch.arange(V)), ("digit_map", torch.arange(V)), ("flags", torch.zeros(V, 6)),
                           ("bucket", torch.zeros(V, dtype=torch.long)), ("geo_scale", torch.zeros(())),
                           ("geo_ids", torch.zeros(GEO_ROWS, GEO_LEN, dtype=torch.long)),
                           ("geo_len", torch.ones(GEO_ROWS, dtype=torch.long)), ("stats", torch.zeros(len(STAT_KEYS)))):
            self.register_buffer(name, init, persistent=False)  # training state: never in the artifact
        self.prepared = self.priming = self.aux_on = self.heads_stripped = False
        self.aux_kind, self.steps, self.unk_id, self.last_frac, self.aux_counts = None, 0, 0, 0.0, dict(para=0, parse=0)
        self.rng = random.Random(h.seed)  # the same draws on every rank
    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not any(k.startswith(self.training_only_prefixes) for k in state_dict):  # an artifact: strip the heads
            self.heads, self.heads_stripped = nn.ModuleDict({k: StrippedHead() for k in self.heads}), True
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
    def encode(self, ids):
        x0 = x = F.rms_norm(self.tok_emb(ids), (self.tok_emb.embedding_dim,))
        skips = [x := block(x, x0) for block in self.blocks[:self.n_enc]]  # each encoder output, for the U-Net skips
        return x, x0, skips
    def chunk_codes(self, x):  # (B, T, D) -> (B, K, slots, slot_dim), the last chunk padded and masked
        (B, T, D), C, K = x.shape, self.chunk, -(-x.size(1) // self.chunk)
        valid = (torch.arange(K * C, device=x.device) < T).view(K, C).repeat(B, 1)
        return self.pool(F.pad(x, (0, 0, 0, K * C - T)).view(B * K, C, D), valid).view(B, K, *self.null_code.shape)
    def memory(self, z, ids):
        """The additive concept memory of every token (B, T, D) and the predicted codes Zhat (B, K, S, sd)."""
        (B, T), K, C = ids.shape, z.size(1), self.chunk
        pos, j = torch.arange(T, device=ids.device), torch.arange(K, device=ids.device)
        last_bos = torch.where(ids == BOS_ID, pos, 0).cummax(dim=1).values
        null = F.rms_norm(self.null_code, (z.size(-1),)).to(z.dtype)
        # predictor position p holds Z_{p-1} and outputs Zhat_p; it uses Z_{q-1} (q <= p, as input or key) only
        # if chunk q-1 starts at or after the last BOS before chunk p, else the null code (always at p = 0)
        ok = (j - 1) * C >= last_bos[:, (j * C - 1).clamp(min=0), None]  # (B, p, q)
        inp = torch.where(ok.diagonal(dim1=1, dim2=2)[..., None, None], z[:, (j - 1).clamp(min=0)], null)
        y = run_stack(self.pred_blocks, self.pred_in(inp.flatten(2)), ((j[:, None] >= j) & (ok | (j == 0)))[:, None])
        zhat = F.rms_norm(self.pred_out(F.rms_norm(y, (y.size(-1),))).view_as(z), (z.size(-1),))
        k = pos // C
        prev, hat = self.mem_prev(z.flatten(2))[:, (k - 1).clamp(min=0)], self.mem_hat(zhat.flatten(2))[:, k]
        return (torch.where(((k - 1) * C >= last_bos)[..., None], prev, self.mem_prev(null.flatten()))
                + torch.where((k * C > last_bos)[..., None], hat, self.mem_hat(null.flatten()))), zhat
    def trunk(self, ids, code_noise=None):
        x, x0, skips = self.encode(ids)
        z = self.chunk_codes(x)  # the chunk-code audit perturbs Z here (tests/test_hydra.py)
        z = z if code_noise is None else z + code_noise.to(z.dtype)
        mem, zhat = self.memory(z, ids)
        x = x + mem
        for i, block in enumerate(self.blocks[self.n_enc:]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        logits = F.linear(F.rms_norm(x, (x.size(-1),)), self.tok_emb.weight.to(x.dtype)).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP), z, zhat
    def forward_logits(self, input_ids, code_noise=None):
        return self.trunk(input_ids, code_noise)[0]
    def forward(self, input_ids, target_ids):
        logits, z, zhat = self.trunk(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))
        if self.training:  # DDP needs every parameter in every backward: idle heads join with zero gradient
            loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())
            loss = loss + self.aux_loss(input_ids, z, zhat) if self.aux_on else loss
        return loss
    def augment(self, ids):
        """aug(chunk): 12% token dropout (to <unk>), 10% first-letter case flips, every digit shifted by one."""
        r = torch.rand(ids.shape, device=ids.device)
        x = torch.where(r < 0.12, self.unk_id, torch.where(r < 0.22, self.case_map[ids], ids))
        return torch.where(ids == BOS_ID, ids, self.digit_map[x])
    def embed_sentences(self, ids, lengths):
        """f: the L2-normalized flattened concept code of each sentence, pooled over its tokens as one chunk."""
        valid = torch.arange(ids.size(1), device=ids.device) < lengths[:, None]
        return F.normalize(self.pool(self.encode(ids)[0], valid).flatten(1).float(), dim=-1)
    def aux_loss(self, ids, z, zhat):
        st, C, V, zf, hf = {}, self.chunk, self.h.vocab_size, z.flatten(2).float(), zhat.flatten(2).float()
        floor = lambda v: torch.relu(1 - (v.flatten(0, 1).var(0, correction=0) + 1e-4).sqrt()).mean()  # noqa: E731
        st["pred"] = (1 - F.cosine_similarity(hf, zf.detach(), dim=-1)).mean() + floor(zf) + floor(hf)  # VICReg floor
        total = LAMBDA_PRED * st["pred"]
        if self.aux_kind:
            n = min(zf.size(0) * zf.size(1), AUX_CHUNKS)
            tgt = F.pad(ids, (0, z.size(1) * C - ids.size(1)), value=-100).view(-1, C)[:n]
            valid, t = tgt >= 0, tgt.clamp(min=0)
            logits = self.heads["recon"](z.flatten(0, 1)[:n]).float()
            st["recon"] = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
            with torch.no_grad():
                hit = logits.argmax(-1) == tgt
                st["recon_acc"] = (hit & valid).sum() / valid.sum()
                st["recon_exact"] = (hit | ~valid).all(dim=1).float().mean()
                st["recon_exact_ema"] = 0.99 * self.stats[STAT_KEYS.index("recon_exact_ema")] + 0.01 * st["recon_exact"]
            if self.aux_kind == "para":  # H2: the bag of words of chunk k from Zhat_k, and InfoNCE on aug(chunk)
                bag = torch.zeros(n, V, device=ids.device).scatter_add_(1, t, valid.float())
                logp = F.log_softmax(self.heads["bow"](hf.flatten(0, 1)[:n]).float(), dim=-1)
                st["bow"] = -(bag / bag.sum(1, keepdim=True) * logp).sum(1).mean()
                za = self.chunk_codes(self.encode(self.augment(ids[:4]))[0]).flatten(2).flatten(0, 1).float()
                sim = F.normalize(zf[:4].flatten(0, 1), dim=-1) @ F.normalize(za, dim=-1).T / 0.07
                lab = torch.arange(sim.size(0), device=sim.device)
                st["infonce"] = 0.5 * (F.cross_entropy(sim, lab) + F.cross_entropy(sim.T, lab))  # van den Oord 2018
                second = st["bow"] + st["infonce"]
            else:  # H3: six structural flags and the unigram log-rank bucket of every position of chunk j
                out = self.heads["parse"](z.flatten(0, 1)[:n]).float()
                flag = F.binary_cross_entropy_with_logits(out[..., :6], self.flags[t], reduction="none").mean(-1)
                second = st["parse"] = (flag * valid).sum() / valid.sum() + F.cross_entropy(
                    out[..., 6:].flatten(0, 1), self.bucket[t].masked_fill(~valid, -100).flatten(), ignore_index=-100)
            geo = geometry(self.embed_sentences(self.geo_ids, self.geo_len))[0]
            st["geo"] = sum(GEO_WEIGHTS[k] * v for k, v in geo.items())
            total = total + LAMBDA_AUX * (st["recon"] + second) + LAMBDA_GEO * self.geo_scale * st["geo"]
        with torch.no_grad():
            for key, value in st.items():
                self.stats[STAT_KEYS.index(key)] = value.detach().float()
        return total
    def set_kind(self, kind):
        self.aux_kind = kind
        if kind:
            self.aux_counts[kind] += 1
            i = self.rng.randrange(self.geo_pool[0].size(0))
            self.geo_ids.copy_(self.geo_pool[0][i])
            self.geo_len.copy_(self.geo_pool[1][i])
    def set_training_progress(self, frac):
        """Predictor loss always; every HYDRA_AUX_EVERY steps recon + (bow + InfoNCE or parse) + ramped geometry."""
        h = self.h
        if self.priming and frac < self.last_frac:  # warmup sent 0.0 then 1.0; the timed run starts again low
            self.priming, self.steps, self.aux_counts = False, 0, {"para": 0, "parse": 0}
        self.last_frac = frac
        self.aux_on = self.prepared and h.hydra_aux and (h.hydra_mode == "research" or frac < 1 - AUX_CUTOFF)
        self.geo_scale.fill_(min(1.0, frac / GEO_WARMUP))
        # warmup cycles para, parse, CE-only (and aux off at 1.0) so torch.compile builds each graph off the clock
        kind = self.aux_on and (self.priming or self.steps % h.hydra_aux_every == 0) and (
            ("para", "parse", None)[self.steps % 3] if self.priming else self.rng.choice(("para", "parse"))) or None
        self.steps += 1
        self.set_kind(kind)
    def prepare_training(self, h, rt, logger):
        """On the clock: tokenizer classes and maps, unigram buckets (50M tokens), template batches, held-out chunks."""
        sp, dev, V = load_tokenizer(h.tokenizer_path, h.vocab_size), self.tok_emb.weight.device, h.vocab_size
        pieces = [sp.id_to_piece(i) for i in range(V)]
        index, flags, case_map = {p: i for i, p in enumerate(pieces)}, [], []
        for i, p in enumerate(pieces):
            t = "" if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) else p.replace("\u2581", "")
            flags.append([p.startswith("\u2581"), any(c in string.punctuation for c in t), any(c.isdigit() for c in t),
                          any(c.isupper() for c in t), p == "<0x0A>" or "\n" in t, sp.is_byte(i)])
            k = next((k for k, c in enumerate(p) if c.isalpha()), None)
            case_map.append(index.get(p if k is None else p[:k] + p[k].swapcase() + p[k + 1:], i))
        self.flags.copy_(torch.tensor(flags, dtype=torch.float))
        self.case_map.copy_(torch.tensor(case_map))
        shift = str.maketrans("0123456789", "1234567890")
        self.digit_map.copy_(torch.tensor([index.get(p.translate(shift), i) for i, p in enumerate(pieces)]))
        counts, n, files = torch.zeros(V, dtype=torch.float64), 0, shard_files(h.data_path, "train")
        for path in files:
            tokens = load_data_shard(path)[:50_000_000 - n].to(torch.int64)
            counts, n = counts + torch.bincount(tokens, minlength=V)[:V].double(), n + tokens.numel()
            if n >= 50_000_000:
                break
        rank = counts.argsort(descending=True, stable=True).argsort()  # the inverse permutation
        self.bucket.copy_((8 * torch.log1p(rank.double()) / math.log1p(V)).long().clamp(max=7))
        tail = load_data_shard(files[-1])[-512 * self.chunk:].to(torch.int64)
        self.heldout = tail[:tail.numel() // self.chunk * self.chunk].view(-1, self.chunk).to(dev)
        rng = random.Random(h.seed)
        for name, split, count in (("geo_pool", "train", 128), ("probe_set", "test", 8)):  # BOS + up to 19 tokens
            rows = [[[BOS_ID] + t[:GEO_LEN - 1] for t in sp.encode(template_batch(rng, split))] for _ in range(count)]
            setattr(self, name, (torch.tensor([[r + [0] * (GEO_LEN - len(r)) for r in b] for b in rows]).to(dev),
                                 torch.tensor([[len(r) for r in b] for b in rows]).to(dev)))
        self.unk_id, self.prepared, self.priming = sp.unk_id(), True, h.warmup_steps > 0
        n_heads = sum(p.numel() for p in self.heads.parameters())
        logger.log0(f"hydra: shipped_params:{sum(p.numel() for p in self.parameters()) - n_heads} "
                    f"training_only_params:{n_heads} encoder_layers:{self.n_enc} chunk:{self.chunk} aux:{h.hydra_aux} "
                    f"mode:{h.hydra_mode} unigram_tokens:{n} heldout_chunks:{self.heldout.size(0)}")
    @torch.no_grad()
    def validation_probes(self):
        """Geometry probes on test-vocabulary templates, effective rank of held-out codes, the last aux losses."""
        if not self.prepared:
            return {}
        was_training, (ids, lengths) = self.training, self.probe_set
        self.eval()
        f = self.embed_sentences(ids.flatten(0, 1), lengths.flatten()).view(*ids.shape[:2], -1)
        runs = [geometry(fb)[1] for fb in f]
        out = {k: float(sum(r[k] for r in runs)) / len(runs) for k in runs[0]}
        codes = self.chunk_codes(self.encode(self.heldout)[0]).flatten(2).flatten(0, 1)
        out.update(analogy_gap=out["analogy"] - out["analogy_baseline"], rank90=effective_rank(codes, 0.90),
                   rank95=effective_rank(codes, 0.95), codes=codes.size(0), **dict(zip(STAT_KEYS, self.stats.tolist())))
        self.train(was_training)
        return {**out, **{f"aux_{k}_steps": v for k, v in self.aux_counts.items()}}
def build_model(h):
    if not h.tie_embeddings:  # checked here, not in validate_model: the shared env tests parse TIE_EMBEDDINGS=0
        raise ValueError("TIE_EMBEDDINGS=False: the hydra's output head is its token embedding")
    return Hydra(h)
def param_groups(model, h):
    """Muon for the shipped CastedLinear matrices; Adam for the rest, with the training-only heads at HEAD_LR."""
    heads = list(model.heads.parameters())
    matrices = [m.weight for n, m in model.named_modules()
                if isinstance(m, CastedLinear) and not n.startswith(model.training_only_prefixes)]
    special = {id(p) for p in matrices + heads} | {id(model.tok_emb.weight)}
    adam = [{"params": [model.tok_emb.weight], "lr": h.tied_embed_lr, "base_lr": h.tied_embed_lr},
            {"params": [p for p in model.parameters() if id(p) not in special], "lr": h.scalar_lr,
             "base_lr": h.scalar_lr}]
    return matrices, adam + ([{"params": heads, "lr": h.head_lr, "base_lr": h.head_lr}] if heads else [])
# TRAINING: the loop, serialization, audits and final eval are the shared train block.
if __name__ == "__main__":
    try:
        sys.exit(run_main(Hyperparameters.from_env()))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
