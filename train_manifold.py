"""Manifold token-graph LM for Parameter Golf: a frozen token manifold built from training
statistics steers causal sparsemax message passing, scored in bits per byte.

Before training (inside the 600 s budget, train shards only) the script counts co-occurrences and
builds the token manifold of PR #663 ("V18 Manifold-Guided Architecture", raahilg): PPMI springs,
directional torsion, entropic mass, directed springs, syntactic bigram coordinates, a seeded physics
simulation, then spectral coordinates (eigenvectors of the coupling matrix) and 12 static cosine
neighbours per token. Both tables ship in the artifact. The model is a looped gated hop cell with
spectral FiLM, sparsemax routing over causal top-k candidates (Martins & Astudillo 2016),
static-neighbour routing, manifold-guided attention, Householder transport between hops and a capped
geodesic mixer, with the corrections of TECHNIQUES.md B.2 (the token itself is always a valid
candidate, masks after any clamp, recent tokens dominate the velocity).

Memory at large vocabularies: counts are three V x V float64 matrices and the build holds about a
dozen V x V float32 transients (V = 8192: ~6 GB on the GPU, est.); eigendecompositions run in
float64 up to V = 4096 and float32 above, so no frequent-token subset is needed up to 8192.

Credits: the official naive baseline (openai/parameter-golf) and the record stack (the shared
blocks), modded-nanogpt (Muon, Newton-Schulz), PR #663 (the manifold ideas; none of its code),
Martins & Astudillo 2016 (sparsemax), TECHNIQUES.md B.2 (the fixes).

Run:
  torchrun --standalone --nproc_per_node=8 train_manifold.py   # 8xH100, PRESET=record (default)
  torchrun --standalone --nproc_per_node=1 train_manifold.py   # one GPU, same maths
  PRESET=smoke python train_manifold.py                        # CPU, embedded corpus, minutes
"""

import contextlib
import copy
import dataclasses
import glob
import hashlib
import inspect
import json
import lzma
import math
import os
import platform
import re
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

# OpenMP reads its wait policy once, when torch loads it, so a run sets PASSIVE before `import
# torch`: waiting threads then sleep instead of spinning on a busy CPU (issue 18; set after the
# import it has no effect, BENCHMARKS.md). Imported as a module (tests, eval_bpb.py) it sets nothing.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import zstandard
except ImportError:  # zstd is optional: zlib and lzma are in the standard library
    zstandard = None
try:
    import brotli
except ImportError:  # Brotli is optional: the per-group compressor uses it where installed
    brotli = None

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Every knob is an UPPER_SNAKE environment variable named as in the records (ITERATIONS,
# MATRIX_LR, ...). PRESET picks a group of defaults first; explicit variables override it. Nothing
# is read at import time: `Hyperparameters.from_env(env)` reads a dict (tests) or os.environ
# (runs), converts types and names the variable in every error.


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
    # The 10-minute track (PRESET=record, or any run with RECORD_ATTEMPT=1): the score is valid only
    # with training and evaluation each within 600 s (TimeLedger.train_s and eval_s).
    record_attempt: bool = False
    log_dir: str = "logs"
    artifact_path: str = ""
    val_batch_size: int = 524288
    val_max_tokens: int = 0
    val_loss_every: int = 1000
    train_log_every: int = 200
    status_every: int = 50
    compile: bool = True
    # Telemetry: sample audits at each validation, the optional UCB1 shard mixer (TECHNIQUES.md part
    # E).
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
    # Per-document LoRA TTT and phased global SGD (issue 16; EVAL_MODE=ttt_lora or ttt_phased):
    # #1530's batched LoRA with #1855's values in the record preset.
    ttt_lora_rank: int = 8
    ttt_lora_lr: float = 0.0001
    ttt_lora_chunk: int = 48
    ttt_lora_beta1: float = 0.0
    ttt_lora_beta2: float = 0.99
    ttt_lora_wd: float = 0.5
    ttt_lora_batch_docs: int = 64
    ttt_lora_head: bool = True
    ttt_phases: str = "833,1666,2500"
    ttt_phase_lr: float = 0.001
    ttt_phase_momentum: float = 0.9
    ttt_phase_epochs: int = 1
    # Issue 15, the artifact frontier: SD-clip k of tensors that are neither MLP, attention nor
    # embedding (#1855: 12.85); GPTQ on the tied embedding; LQER low-rank corrections; int8
    # gates; rows sorted in per-group compression; the compressed header; the compact code form.
    sdclip_k_other: float = 13.0
    gptq_embed: bool = False
    lqer_rank: int = 0
    lqer_top_k: int = 3
    lqer_group: int = 64
    gate_int8: bool = False
    pergroup_sort: bool = True
    header_compress: bool = False
    code_form: str = "readable"
    # Issue 18 (the laptop loop): the evals besides the final score. PRE_QUANT_EVAL scores the float
    # model before quantization; ROUNDTRIP_EVAL the artifact in standard windows when the final
    # mode is another (sliding, TTT). The smoke preset turns both off and scores a val prefix
    # (VAL_MAX_TOKENS); every other preset keeps them and the whole val split.
    pre_quant_eval: bool = True
    roundtrip_eval: bool = True

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        preset = env.get("PRESET", "record")
        if preset not in PRESETS:
            raise ValueError(
                f"PRESET={preset!r}: unknown preset (choose one of {', '.join(sorted(PRESETS))})"
            )
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
            if kind is bool and text.lower() in (
                "1",
                "true",
                "yes",
                "on",
                "0",
                "false",
                "no",
                "off",
                "",
            ):
                return text.lower() in ("1", "true", "yes", "on")
            if kind is int:
                digits = text.replace("_", "")
                if digits.lstrip("+-").isdigit():
                    number = int(digits)
                else:
                    number = float(text)  # accepts 5e5; 0.5 is rejected below
                if isinstance(number, int) or number.is_integer():
                    return int(number)
            if kind in (bool, int):
                raise ValueError
            if kind is not float:
                return text
            number = float(text)
            if not math.isfinite(number):  # nan and inf parse as floats but mean nothing here
                raise ValueError
            return number
        except ValueError:
            expected = {bool: "0 or 1", int: "an integer", float: "a finite number"}.get(
                kind, "a string"
            )
            raise ValueError(f"{name}={raw!r}: expected {expected}") from None

    def bad(self, name, why):
        raise ValueError(f"{name.upper()}={getattr(self, name.lower())!r}: {why}")

    def validate(self):
        """Checks of the shared fields, then the script's own `validate_model`."""
        for f in dataclasses.fields(self):  # every float knob, the model's too: finite
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                self.bad(f.name, "must be a finite number")
        for f in dataclasses.fields(self):
            if f.name.endswith("_lr") and getattr(self, f.name) < 0:
                self.bad(f.name, "a learning rate must not be negative")
        self.validate_run_id()
        for name in (
            "iterations",
            "train_batch_tokens",
            "train_seq_len",
            "vocab_size",
            "val_batch_size",
            "eval_stride",
            "ttt_chunk_tokens",
            "size_budget",
            "sdclip_k_mlp",
            "sdclip_k_attn",
            "sdclip_k_embed",
            "sdclip_k_other",
            "lqer_top_k",
            "lqer_group",
            "gptq_calib_seqs",
        ):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.vocab_size > 65536:
            self.bad(
                "VOCAB_SIZE", "shards store uint16 token ids, so the vocabulary is at most 65,536"
            )
        if self.train_batch_tokens % (8 * self.train_seq_len):
            self.bad(
                "TRAIN_BATCH_TOKENS",
                f"must be a multiple of 8 x TRAIN_SEQ_LEN={8 * self.train_seq_len}",
            )
        if self.eval_stride > self.eval_len:
            self.bad("EVAL_STRIDE", f"must not exceed the eval window EVAL_SEQ_LEN={self.eval_len}")
        for name, allowed in (
            ("EVAL_MODE", tuple(EVAL_MODES)),
            ("QUANT_BITS", QUANT_INT_BITS),
            ("EMBED_BITS", QUANT_INT_BITS),
            ("QAT_BITS", (0, *QUANT_INT_BITS)),
            ("CLIP_METHOD", ("percentile", "search", "sdclip")),
            ("GPTQ_CALIB_SOURCE", ("train", "self")),
            ("COMPRESSOR", ("auto", "pergroup", *COMPRESSORS)),
            ("CODE_FORM", ("readable", "compact")),
            ("LQER_RANK", tuple(range(65))),
        ):
            if getattr(self, name.lower()) not in allowed:
                self.bad(name, f"must be one of {', '.join(map(str, allowed))}")
        for name, lo, hi in (
            ("ema_decay", 0.0, 0.999999),
            ("warmdown_frac", 0.0, 1.0),
            ("min_lr", 0.0, 1.0),
            ("qat_start_frac", 0.0, 0.999999),
        ):
            if not lo <= getattr(self, name) <= hi:
                self.bad(name, f"must be in [{lo}, {round(hi, 3)}]")
        for name in ("size_margin", "gptq_reserve_seconds", "max_wallclock_seconds"):
            if getattr(self, name) < 0:
                self.bad(name, "must not be negative")
        self.validate_lora_ttt()
        self.validate_model()

    def validate_lora_ttt(self):
        """The issue-16 knobs: LoRA TTT and its phases."""
        for name in ("ttt_lora_rank", "ttt_lora_chunk", "ttt_lora_batch_docs", "ttt_phase_epochs"):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        for name in ("ttt_lora_beta1", "ttt_lora_beta2", "ttt_phase_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self.bad(name, "must be in [0, 1)")
        if self.ttt_lora_wd < 0:
            self.bad("ttt_lora_wd", "must not be negative")
        ttt_phase_bounds(self)

    def validate_run_id(self):
        """RUN_ID names files in LOG_DIR: a plain name (letters, digits, `._-`), never a path."""
        run_id = self.run_id
        plain = all(c.isascii() and (c.isalnum() or c in "._-") for c in run_id)
        if not plain or run_id.startswith(".") or len(run_id) > 128:
            self.bad(
                "run_id",
                "must be a plain name of at most 128 letters, digits, '.', '_' or '-', "
                "not starting with '.' (no path separators)",
            )

    @property
    def eval_len(self):
        return self.eval_seq_len or self.train_seq_len

    @property
    def record_track(self):
        """Whether the run competes on the 10-minute track (PRESET=record or RECORD_ATTEMPT=1)."""
        return self.preset == "record" or self.record_attempt

    # ===== END SHARED BLOCK: hparams v1 =====
    # Model: the manifold hop network (record shape). NUM_LAYERS = hops, MODEL_DIM = hidden width,
    # NUM_HEADS = manifold-attention heads; NUM_KV_HEADS only satisfies the shared validate().
    num_layers: int = 4
    model_dim: int = 500
    num_heads: int = 2
    num_kv_heads: int = 2
    mlp_mult: float = 2.0
    hop_cells: int = 1  # distinct hop cells, used round-robin over the hops (1: one shared cell)
    route_topk: int = 32  # causal top-k candidates per row before the sparsemax (B.2 item 4)
    velocity_tau: float = 16.0  # recency scale of the velocity weights exp(-(i - j) / tau)
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
        for name in (
            "num_layers",
            "model_dim",
            "num_heads",
            "route_topk",
            "manifold_modes",
            "manifold_coords",
        ):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.model_dim % self.num_heads:
            self.bad("MODEL_DIM", f"must be divisible by NUM_HEADS={self.num_heads}")


# Named groups of defaults. `record` is the 8xH100 configuration (the dataclass defaults are its
# model shape); `smoke` trains a small model on a laptop CPU in a few minutes. The seed's AdamW
# schedule (warmup, cosine to 0.1, hold, linear to 0) is mapped onto the shared one: flat, then
# linear over WARMDOWN_FRAC.
PRESETS = {
    "record": {
        "embed_lr": 0.05,
        "ema_decay": 0.999,
        "muon_wd": 0.04,
        "warmdown_frac": 0.75,
        "grad_clip_norm": 1.0,
        "eval_mode": "sliding",
        "eval_stride": 128,
        "quant_bits": 8,
        "compressor": "zlib",
    },
    "smoke": {
        "data_path": "data/datasets/pydoc_sp1024",
        "tokenizer_path": "data/tokenizers/pydoc_1024_bpe.model",
        "iterations": 2000,
        "warmup_steps": 2,
        "warmdown_frac": 0.3,
        "max_wallclock_seconds": 150.0,
        "train_batch_tokens": 16384,
        "train_seq_len": 256,
        "num_layers": 2,
        "model_dim": 128,
        "route_topk": 16,
        "manifold_modes": 64,
        "manifold_coords": 16,
        "manifold_physics_steps": 50,
        "manifold_physics_dim": 64,
        "manifold_pairs": 4000,
        "val_batch_size": 32768,
        "val_loss_every": 100,
        "train_log_every": 25,
        "status_every": 10,
        "compile": False,
        "matrix_lr": 0.03,
        "embed_lr": 0.05,
        "grad_clip_norm": 1.0,
        "ema_decay": 0.99,
        "muon_momentum_warmup_steps": 50,
        "eval_mode": "sliding",
        # Issue 18: a quick look (a fixed val prefix, never an official score) and only the
        # final figure on the artifact; PRE_QUANT_EVAL=1, ROUNDTRIP_EVAL=1, VAL_MAX_TOKENS=0 ask
        # for the rest.
        "val_max_tokens": 65536,
        "pre_quant_eval": False,
        "roundtrip_eval": False,
        "eval_stride": 64,
        "compressor": "zlib",
    },
}

CODE_PATH = os.path.abspath(__file__)
# Small control tensors (score scales, score biases, the neighbour gate): the artifact keeps them in
# fp32 rather than fp16.
CONTROL_TENSOR_PATTERNS = ("route_scale", "manifold_bias", "rel_bias", "nb_gate")

# ===== BEGIN SHARED BLOCK: runtime v1 =====
# The model contract: what the shared blocks need from the MODEL section of each script.
#
# Required, at module level (MODEL_CONTRACT_REQUIRED; a test checks every script):
#   Hyperparameters - the dataclass of the shared fields (hparams block) and the model's own; its
#       `validate_model()` checks the model's fields, naming the variable.
#   PRESETS - {name: {field: value}}: `record`, `smoke` (and `baseline` in train_gpt.py).
#   CODE_PATH - this file: its bytes are the counted code, its sha256 binds the artifact.
#   CONTROL_TENSOR_PATTERNS - parameter-name components of control tensors (scales, mixes, gates):
#       Adam, fp32 in the artifact. `is_control_tensor` matches them against whole dotted
#       components, so "attn_gate" does not catch "attn_gate_proj".
#   build_model(h) - the model on CPU in fp32. `forward(input_ids, target_ids)` returns the mean
#       token cross-entropy (training); `forward_logits(input_ids)` returns (batch, seq, vocab)
#       logits after any softcap (every eval and audit).
#   param_groups(model, h) - (Muon matrices, Adam param groups with `base_lr`).
#   main() - the entry point, called under `if __name__ == "__main__":`.
#
# Optional attributes of the model (MODEL_HOOKS), read only through `model_hook(model, name)`:
#   prepare_training(h, rt, logger) - statistics built from train shards before the loop, timed
#       inside the training budget (TimeLedger.precompute_s).
#   set_training_progress(frac) - called every step with the budget fraction used (0..1), and
#       with 0 and 1 during warmup so that both graphs of a schedule get compiled.
#   validation_probes() - a dict shown on the dashboard at each periodic validation.
#   training_only_prefixes - state_dict prefixes of training-only heads, left out of the artifact.
#   blocks - the layer list: score-first TTT freezes the first TTT_FREEZE_BLOCKS of them.
#   tok_emb - the token embedding, probed before and after quantization.
#   lora_targets() - {name: module} that LoRA TTT adapts (default: nn.Linear under `blocks`, an
#       `lm_head` module, else `final_norm` in front of a tied head).
#
# Runtime: one code path for CUDA + NCCL under torchrun, CPU + gloo under torchrun, and a plain
# process. `grad_accum_steps = 8 // world_size` keeps the maths of 8 GPUs on 1, 2 or 4. Rank 0 alone
# writes files.

MODEL_CONTRACT_REQUIRED = (
    "Hyperparameters",
    "Hyperparameters.validate_model",
    "PRESETS",
    "CODE_PATH",
    "CONTROL_TENSOR_PATTERNS",
    "build_model",
    "param_groups",
    "main",
)
MODEL_HOOKS = (
    "prepare_training",
    "set_training_progress",
    "validation_probes",
    "training_only_prefixes",
    "blocks",
    "tok_emb",
    "lora_targets",
)


def model_hook(model, name):
    """The model's optional attribute `name` (one of MODEL_HOOKS), or None where it has none."""
    if name not in MODEL_HOOKS:
        raise ValueError(f"{name!r} is not a model hook (known: {', '.join(MODEL_HOOKS)})")
    return getattr(model, name, None)


def is_control_tensor(name):
    """Whether one of a parameter name's dotted components is in CONTROL_TENSOR_PATTERNS."""
    return any(part in CONTROL_TENSOR_PATTERNS for part in name.split("."))


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    grad_accum_steps: int
    threads: str = ""  # the CPU thread choice and why, logged by open_run

    @property
    def is_main(self):
        return self.rank == 0


def setup_runtime(env=None):
    env = os.environ if env is None else env
    ints = {
        name: Hyperparameters.parse_env_value(name, env.get(name, default), int)
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))
    }
    world_size = ints["WORLD_SIZE"]
    if world_size < 1 or 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size}: must divide 8 (1, 2, 4 or 8 processes)")
    distributed = "RANK" in env and "WORLD_SIZE" in env
    use_cuda = torch.cuda.is_available() and env.get("FORCE_CPU", "0") != "1"
    threads = ""
    if use_cuda:
        device = torch.device("cuda", ints["LOCAL_RANK"])
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)  # denormal weights (EMA tails) slow CPU matmuls several-fold
        threads = set_cpu_threads(env, ints["WORLD_SIZE"] if distributed else 1)
    if distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
        )
    return Runtime(
        rank=ints["RANK"],
        world_size=world_size,
        local_rank=ints["LOCAL_RANK"],
        device=device,
        distributed=distributed,
        grad_accum_steps=8 // world_size,
        threads=threads,
    )


def physical_cores():
    """Physical cores (distinct physical id / core id pairs of /proc/cpuinfo), else logical ones:
    a second hyper-thread adds little to a matmul and competes with the first."""
    pairs = set()
    package = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                pairs.add((package, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def busy_cores_now(interval=0.25):
    """How many cores other processes keep busy right now: two /proc/stat samples `interval` apart
    (this process sleeps between them). The 1-minute load average, the fallback where /proc is
    missing, lags: the install and corpus build that run just before a run would count against it
    and halve a laptop's threads."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies, idle + iowait

    try:
        total_before, idle_before = sample()
        time.sleep(interval)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    total = total_after - total_before
    if total <= 0:
        return 0.0
    idle = idle_after - idle_before
    return (os.cpu_count() or 1) * (1.0 - idle / total)


def choose_cpu_threads(env, cores, load, physical, local_procs=1):
    """(threads or None, why). OMP_NUM_THREADS set: None (torch already follows it). Otherwise the
    free cores (usable cores minus the cores other processes keep busy, `load`, at least 1), at
    most the physical cores, shared by this node's processes: a busy machine does not collapse a
    run whose threads would wait on each other (issue 18)."""
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (set by the caller)"
    free = max(1, round(cores - load))
    threads = max(1, min(free, physical) // max(1, local_procs))
    why = f"free cores {free} (cores {cores} - busy {load:.2f}), physical cores {physical}"
    if local_procs > 1:
        why += f", {local_procs} processes on this node"
    return threads, why


# torch's own thread count when this module was imported, and the one set_cpu_threads chose: a
# count different from both was set by the caller (a test, an embedding program) and is kept.
_THREADS_AT_IMPORT = torch.get_num_threads()
_THREADS_CHOSEN = [None]


def set_cpu_threads(env, world_size=1):
    """Set torch's CPU threads by choose_cpu_threads; returns the logged note. The OpenMP wait
    policy is read once, when torch loads its OpenMP library, so it is set before `import torch`
    in each script's header (OMP_WAIT_POLICY=PASSIVE unless given); the note says which it is."""
    current = torch.get_num_threads()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP spins before sleeping)")
    if current not in (_THREADS_AT_IMPORT, _THREADS_CHOSEN[0]) and not env.get("OMP_NUM_THREADS"):
        return f"{current} (set by the caller), OMP_WAIT_POLICY={policy}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    load = busy_cores_now()
    local = Hyperparameters.parse_env_value(
        "LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", world_size), int
    )
    threads, why = choose_cpu_threads(env, cores, load, physical_cores(), local)
    if threads is None:
        return f"{torch.get_num_threads()}: {why}, OMP_WAIT_POLICY={policy}"
    torch.set_num_threads(threads)
    _THREADS_CHOSEN[0] = threads
    return f"{threads}: {why}, OMP_WAIT_POLICY={policy}"


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
    """Write through a temporary file (`<path>.tmp<PID>`) and a rename: a concurrent reader sees
    the old file or the new one, never half of one. On any failure (a full disk, an interrupt) the
    temporary file is removed before the error goes on. Returns the bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            f.write(blob)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise
    return len(blob)


def remove_stale_temps(paths):
    """Remove the atomic writer's leftovers (`<path>.tmp<PID>`) of these paths, from an earlier run
    of the same RUN_ID that died mid-write. Returns the removed paths."""
    removed = []
    for path in paths:
        for tmp in glob.glob(glob.escape(path) + ".tmp*"):
            if tmp[len(path) + 4 :].isdigit() and os.path.isfile(tmp):
                os.remove(tmp)
                removed.append(tmp)
    return removed


def write_json_atomic(path, obj):
    write_bytes_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


class RunLogger:
    """The text log (source first, then baseline-format lines), the JSONL events and the status
    file."""

    def __init__(self, log_dir, run_id, enabled):
        self.enabled = enabled
        self._status_written = 0.0
        self.text_path = os.path.join(log_dir, f"{run_id}.txt")
        self.events_path = os.path.join(log_dir, f"{run_id}.jsonl")
        self.status_path = os.path.join(log_dir, f"{run_id}.status.json")
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

    def record_failure(self, exc):
        """An exception that ends the run, where people look: `error: <one line>` in the text log
        (with the traceback after it), an `error` event, and the status file's `state: failed`.
        Returns the one-line message."""
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (ValueError, FileNotFoundError)):
            message = f"{type(exc).__name__}: {message}"
        if not self.enabled:
            return message
        import traceback

        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with contextlib.suppress(OSError):  # a full disk must not hide the original error
            self.log0(f"error: {message}", console=False)
            self.log0(trace.rstrip(), console=False)
            self.event("error", message=message)
            self.update_status(force=True, state="failed", error=message)
        return message


# Progress of the long steps (evals, GPTQ calibration, serialization, the manifold build): a tqdm
# bar on an interactive terminal, else a plain line at most every PROGRESS_EVERY_S seconds for logs
# and CI (`progress: eval sliding 37% 1234/3300 eta 42s`), and the same in the status file's
# `progress` for the dashboard. Rank 0 alone shows it (issue 18).
PROGRESS_EVERY_S = 10.0
_PROGRESS_LOGGER = [None]  # the run's RunLogger, set by open_run; None: lines go to stderr
_OPEN_PROGRESS = []  # the open Progress instances, innermost last


def set_progress_logger(logger):
    """Send progress lines to this RunLogger (console and text log) and its status file."""
    _PROGRESS_LOGGER[0] = logger


def _is_rank0():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _short_time(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 100:
        return f"{seconds / 60:.1f}min"
    return f"{seconds:.0f}s"


class Progress:
    """One long step's progress: `advance(n)` after each batch or chunk, `close()` at the end (or
    use it as a context manager). The estimate of the time left is the elapsed time per unit done
    times the units left. `Progress.advance_active(n)` advances the innermost open one, so a helper
    deep inside a loop (a batch scorer) counts without being handed it. interactive=None: a tqdm
    bar when stderr is a terminal and CI is not set."""

    def __init__(
        self, stage, total, state=None, every_s=None, interactive=None, logger=None, stream=None
    ):
        self.stage = stage
        self.total = max(int(total), 0)
        self.state = state
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.logger = logger or (None if stream else _PROGRESS_LOGGER[0])
        self.stream = stream
        self.done = 0
        self.lines = 0
        self.shown = _is_rank0()
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._bar = None
        if interactive is None:
            err = sys.stderr
            interactive = bool(err and err.isatty()) and not os.environ.get("CI")
        if self.shown and interactive:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=stage, leave=False, dynamic_ncols=True)
        _OPEN_PROGRESS.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def advance_active(cls, n=1):
        if _OPEN_PROGRESS:
            _OPEN_PROGRESS[-1].advance(n)

    def eta_s(self):
        """Seconds left at the rate so far; None before the first unit."""
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.t0
        return elapsed / self.done * max(self.total - self.done, 0)

    def fields(self):
        """What the status file's `progress` holds: stage, fraction, units, eta and elapsed time."""
        eta = self.eta_s()
        return {
            "stage": self.stage,
            "fraction": round(self.done / self.total, 4) if self.total else 1.0,
            "done": self.done,
            "total": self.total,
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
        }

    def line(self):
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_s()
        eta_text = "?" if eta is None else _short_time(eta)
        return f"progress: {self.stage} {pct:.0f}% {self.done}/{self.total} eta {eta_text}"

    def advance(self, n=1):
        self.done = min(self.done + int(n), self.total)
        if not self.shown:
            return
        if self._bar is not None:
            self._bar.update(int(n))
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(self.line())

    def _emit(self, text):
        self.lines += 1
        logger = self.logger
        if logger is not None and logger.enabled:
            # The tqdm bar is the console's view; the text log always gets the plain line.
            logger.log0(text, console=self._bar is None)
            fields = {"progress": self.fields()}
            if self.state:
                fields["state"] = self.state
            logger.update_status(force=True, **fields)
        elif self._bar is None:
            print(text, file=self.stream or sys.stderr, flush=True)

    def close(self):
        if self in _OPEN_PROGRESS:
            _OPEN_PROGRESS.remove(self)
        if not self.shown:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.lines:  # a step long enough to have shown progress also shows its end
            took = _short_time(time.perf_counter() - self.t0)
            self._emit(f"progress: {self.stage} done {self.done}/{self.total} in {took}")


# ===== END SHARED BLOCK: runtime v1 =====

# ===== BEGIN SHARED BLOCK: data v1 =====
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
    """The first documents of the val stream (split at BOS, at most REENCODE_MAX_DOCS documents and
    REENCODE_MAX_TOKENS tokens), each as a list of ids. The last one, maybe cut, ends before its last
    word-initial piece, so re-encoding its text cannot merge across the cut."""
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


def data_text_transform(data_path):
    """The text transform the shards' manifest.json declares (e.g. "lossless_caps_caseops_v1"),
    or None (no manifest, or plain text)."""
    path = os.path.join(data_path, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object")
    transform = manifest.get("text_transform")
    if transform is not None and not isinstance(transform, str):
        raise ValueError(f"{path}: text_transform must be a string, not {transform!r}")
    return transform


MAX_MANIFEST_BYTES = 16 << 20


def sidecar_path(val_shard):
    """The byte sidecar of a val shard: fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin."""
    folder, name = os.path.split(val_shard)
    return os.path.join(folder, name.replace("_val_", "_val_bytes_", 1))


def load_val_byte_sidecar(data_path, n_tokens):
    """The val split's per-token original byte counts (int64, the first n_tokens), or None when
    the split has no `fineweb_val_bytes_*.bin`. Once any sidecar exists, every val shard must have
    one of its exact length: a missing or short sidecar is an error, never a silent fallback to the
    lookup tables (they would count the transformed text)."""
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
    for val_file in val_files:
        side = sidecar_path(val_file)
        if not os.path.isfile(side):
            raise ValueError(f"{side}: missing byte sidecar of {os.path.basename(val_file)}")
        counts = load_data_shard(side)
        n_val = shard_token_count(val_file)
        if counts.numel() != n_val:
            raise ValueError(
                f"{side}: {counts.numel()} byte counts for the {n_val} tokens of "
                f"{os.path.basename(val_file)}"
            )
        parts.append(counts)
    per_token = torch.cat(parts).to(torch.int64)
    return per_token[:n_tokens]


# ===== END SHARED BLOCK: data v1 =====

# ===== BEGIN SHARED BLOCK: bpb v1 =====
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


def sha256_hex(data):
    """The sha256 of bytes, as 64 hex digits: the one hash of artifacts, headers, scripts,
    tokenizers."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    """sha256_hex of a file's bytes, read in 1 MiB blocks."""
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
    return tuple(
        torch.tensor(a, device=device) for a in (base_bytes, has_leading_space, is_boundary_token)
    )


class SidecarBytes:
    """Per-token ORIGINAL UTF-8 byte counts of the val split (`fineweb_val_bytes_*.bin`, parallel
    to the val tokens), written for CaseOps data (PR #1729): the tokens spell a transformed text,
    so the lookup tables would count operator characters and lowercase text, not the bytes of the
    document. With a sidecar, target j counts `per_token[j]` whatever the token before it."""

    def __init__(self, per_token):
        self.per_token = per_token

    def to(self, device):
        return SidecarBytes(self.per_token.to(device))


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
    official lookup tables."""
    per_token = load_val_byte_sidecar(h.data_path, val_tokens.numel())
    if per_token is None:
        return build_sentencepiece_luts(sp, h.vocab_size, device)
    return SidecarBytes(per_token.to(device))


# CaseOps operator characters (PR #1729): TITLE, ALLCAPS, CAPNEXT stand for no original byte; ESC
# makes the character after it literal.
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003")
CASEOPS_ESCAPE = "\ue004"
SIDECAR_TOLERANCE = 0.005  # decoded text is normalized (NFKC, whitespace): allow 0.5 %


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


def audit_sidecar_bytes(sp, tokens, counter, sample_tokens=10_000, bos_id=1):
    """The sidecar against an independent recount on a val sample: BOS counts 0, and each
    document's sidecar total equals the original bytes of its decoded text up to the tokenizer's
    normalization (SIDECAR_TOLERANCE; the difference is reported)."""
    tokens = tokens.detach().cpu().to(torch.int64)
    per_token = counter.per_token.detach().cpu()
    start = next(iter((tokens == bos_id).nonzero().flatten().tolist()), 0)
    stop = min(tokens.numel(), start + sample_tokens)
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
            f"(off by more than {SIDECAR_TOLERANCE:.1%})"
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
    start = next(iter((tokens == bos_id).nonzero().flatten().tolist()), 0)
    sample = tokens[start : min(tokens.numel(), start + sample_tokens)]
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


# ===== END SHARED BLOCK: bpb v1 =====

# ===== BEGIN SHARED BLOCK: optim v1 =====
# Muon (modded-nanogpt; Keller Jordan): momentum, Nesterov, then orthogonalize the update with a
# quintic Newton-Schulz iteration. Decoupled weight decay (PR #65 lineage) and MuonEq-R row
# normalization of the update before orthogonalization (PR #1260) are options. Parameters are split
# round-robin over ranks and the updates all-reduced, so each rank orthogonalizes only its share.
# EMA of weights (PR #287).

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932; PR #1344, used by #1787 and #1855): one
# minimax-optimal (a, b, c) per iteration instead of one fixed triple. The first steps grow small
# singular values fast, the last ones settle them near 1. Values as published in PR #1344.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz_coeffs(steps, polar_express=False):
    """The (a, b, c) of each of `steps` iterations. Polar Express past its 5 tuples repeats the
    last one, which only keeps converged singular values near 1."""
    if not polar_express:
        return [NS_COEFFS] * steps
    table = list(POLAR_EXPRESS_COEFFS[:steps])
    return table + [POLAR_EXPRESS_COEFFS[-1]] * (steps - len(table))


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, polar_express=False):
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for a, b, c in newton_schulz_coeffs(steps, polar_express):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """`polar_express` may also be set per parameter group (the model's `param_groups` does)."""

    def __init__(
        self,
        params,
        lr,
        momentum,
        backend_steps=5,
        nesterov=True,
        weight_decay=0.0,
        row_norm=False,
        polar_express=False,
        orthogonalize=None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            row_norm=row_norm,
            polar_express=polar_express,
        )
        super().__init__(params, defaults)
        # zeropower_via_newtonschulz5, or its torch.compile'd form on CUDA (the official script
        # compiles it: one graph per matrix shape).
        self.orthogonalize = orthogonalize or zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(
                sum(p.numel() for p in params),
                device=params[0].device,
                dtype=torch.bfloat16 if params[0].is_cuda else torch.float32,
            )
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(group["momentum"]).add_(g)
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if group["row_norm"]:
                        g = g / (g.norm(dim=-1, keepdim=True) + 1e-7)
                    g = self.orthogonalize(
                        g, steps=group["backend_steps"], polar_express=group["polar_express"]
                    )
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    updates[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(
                    updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"]
                )
                offset += p.numel()


def lr_multiplier(h, step, elapsed_ms):
    """LR scale in [MIN_LR, 1]. WARMDOWN_FRAC > 0: linear decay over the last fraction of the
    wallclock budget (or of ITERATIONS when uncapped). Otherwise the baseline: the warmdown lasts
    WARMDOWN_ITERS x the mean step time so far. MIN_LR is a floor, max(schedule, MIN_LR), as the
    records define it (#1787, #1855): the decay keeps its slope and stops at the floor. With
    MIN_LR=0 (the baseline) the schedule is unchanged."""
    cap_ms = 1000.0 * h.max_wallclock_seconds
    if h.warmdown_frac > 0:
        progress = elapsed_ms / cap_ms if cap_ms > 0 else step / h.iterations
        progress = max(progress, step / h.iterations)
        x = min(1.0, max(0.0, (1.0 - progress) / h.warmdown_frac))
    elif cap_ms <= 0:
        start = max(h.iterations - h.warmdown_iters, 0)
        x = 1.0 if step < start else max(h.iterations - step, 0) / max(h.warmdown_iters, 1)
    else:
        warmdown_ms = h.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        x = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(x, h.min_lr)


def muon_momentum_at(h, step):
    """Linear warmup of Muon's momentum from MUON_MOMENTUM_WARMUP_START over its warmup steps."""
    frac = 1.0
    if h.muon_momentum_warmup_steps > 0:
        frac = min(step / h.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


class EMA:
    """theta_bar <- d_t * theta_bar + (1 - d_t) * theta after every step, in fp32; the EMA is what
    gets saved. d_t = min(d, (1 + t) / (10 + t)) so that a short run is not dominated by its
    random initialization."""

    def __init__(self, model, decay):
        self.decay = decay
        self.updates = 0
        state = model.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.shadow = [state[k].detach().float().clone() for k in self.names]

    @torch.no_grad()
    def update(self, model):
        state = model.state_dict()
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(
            self.shadow, [state[k].detach().float() for k in self.names], 1.0 - decay
        )

    def state_dict(self, model):
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for k, v in zip(self.names, self.shadow):
            out[k] = v.to(out[k].dtype)
        return out


# ===== END SHARED BLOCK: optim v1 =====

# ===== BEGIN SHARED BLOCK: quant v1 =====
# Quantization and the artifact container. Large 2-D tensors are stored as per-row symmetric int-k
# (k = 4..8) with fp16 scales (Triton kernels on GPU, the same maths in torch as reference and CPU
# path), small tensors as fp16, control tensors as fp32. Clips: CLIP_METHOD; GPTQ where a
# calibration Hessian is given; late QAT through a straight-through fake quant; BIT_ALLOC fits
# per-tensor widths to the byte budget. The container is ours: magic, version, a JSON header (script
# and its sha256, hyperparameters, tokenizer, every tensor's scheme), one compressed payload of raw
# little-endian arrays. No pickle.

ARTIFACT_MAGIC = b"PGOLFART"
ARTIFACT_VERSION = 1
ARTIFACT_PREFIX = struct.Struct("<8sII")
MAX_HEADER_BYTES = 16 << 20
RUN_ONLY_FIELDS = ("run_id", "log_dir", "artifact_path")
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite candidates (PR #414)
QUANT_INT_BITS = (4, 5, 6, 7, 8)  # the widths of per-row int-k
ALLOC_MIN_BITS = (
    5  # the narrowest width the allocator gives a matrix: no record shipped int4 weights
)
TRITON_BLOCK = 1024
_TRITON = None  # the kernels, built on first use
_TRITON_FAILED = False  # a kernel failed to compile or launch: the torch path from then on


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is stored: per-row int-k ("int", 4..8) or a float width ("float", 16 or 32).
    Written as text in the artifact header: "int6", "fp16", "fp32" (tensors that are not floating
    point are stored raw, scheme "raw", and have no QuantScheme)."""

    kind: str
    bits: int

    @classmethod
    def parse(cls, text):
        text = str(text)
        if text in ("fp16", "fp32"):
            return cls("float", int(text[2:]))
        if text.startswith("int") and text[3:] in {str(b) for b in QUANT_INT_BITS}:
            return cls("int", int(text[3:]))
        raise ValueError(f"quant scheme {text!r}: expected one of int4..int8, fp16, fp32")

    def __str__(self):
        return f"int{self.bits}" if self.kind == "int" else f"fp{self.bits}"

    @property
    def is_int(self):
        return self.kind == "int"


def _bounded(decompressor, data, limit):
    """At most limit + 1 bytes out of a zlib or lzma stream: a longer stream is refused, not
    inflated. limit is a validated raw_bytes (0 <= limit <= ARTIFACT_MAX_RAW_BYTES)."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    out = decompressor.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    return out


def _zstd_bounded(data, limit):
    """zstd streamed in 1 MiB reads that stop at limit + 1 bytes: a frame that declares a huge
    content size is read, not trusted (one-shot decompress allocates what the frame declares)."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    chunks = []
    got = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    with dctx.stream_reader(data, read_across_frames=True) as reader:
        while got <= limit:
            chunk = reader.read(min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    return b"".join(chunks)


# name: (compress(data, level), decompress(data, limit)); zstd needs the zstandard package.
COMPRESSORS = {
    "zstd": (
        lambda d, level: zstandard.ZstdCompressor(level=level).compress(d),
        _zstd_bounded,
    ),
    "lzma": (
        lambda d, level: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
        lambda d, limit: _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), d, limit),
    ),
    "zlib": (
        lambda d, level: zlib.compress(d, 9),
        lambda d, limit: _bounded(zlib.decompressobj(), d, limit),
    ),
}


def compress_payload(raw, compressor, zstd_level=22):
    """The named compressor, or ('auto') each available one in threads (they release the GIL);
    smallest wins."""
    from concurrent.futures import ThreadPoolExecutor

    if compressor == "zstd" and zstandard is None:
        raise RuntimeError("COMPRESSOR=zstd: the zstandard package is not installed")
    if compressor == "auto":
        names = [n for n in COMPRESSORS if n != "zstd" or zstandard]
    else:
        names = [compressor]
    with ThreadPoolExecutor(len(names)) as pool:
        blobs = list(pool.map(lambda n: COMPRESSORS[n][0](raw, zstd_level), names))
    return min(zip(names, blobs), key=lambda nb: len(nb[1]))


# --- per-row int-k: the torch maths is the reference and the CPU path; Triton runs it on GPU ---


def _row_scales(clip, qmax):
    """fp16 c / qmax, or 1 where that is 0 (then every |w| <= c rounds to 0). Rounding divides by
    this stored s."""
    scale = (clip / qmax).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_clamp(w, c, s, qmax):
    """q = round(clamp(w, -c, c) / s) in [-qmax, qmax]: the one rounding rule of this block."""
    return torch.clamp(w, -c, c).div_(s).round_().clamp_(-qmax, qmax)


def _triton_kernels():
    """(triton, quantize kernel, dequantize kernel), built on first use and not at import:
    @triton.jit reads the source file, which an exec'd or minified script lacks. None where
    Triton is missing."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl

            @triton.jit
            def quant(w_ptr, clip_ptr, scale_ptr, q_ptr, n_cols, qmax, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                c = tl.load(clip_ptr + row)
                s = tl.load(scale_ptr + row).to(tl.float32)
                w = tl.load(w_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
                x = tl.math.div_rn(tl.minimum(tl.maximum(w, -c), c), s)  # IEEE division, as torch
                # Adding and subtracting 1.5 * 2^23 rounds half to even, as torch.round (|x| <
                # 2^22).
                x = (x + 12582912.0) - 12582912.0
                q = tl.minimum(tl.maximum(x, -qmax), qmax)
                tl.store(q_ptr + row * n_cols + cols, q.to(tl.int8), mask=cols < n_cols)

            @triton.jit
            def dequant(q_ptr, scale_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                q = tl.load(q_ptr + row * n_cols + cols, mask=cols < n_cols, other=0).to(tl.float32)
                s = tl.load(scale_ptr + row).to(tl.float32)
                tl.store(out_ptr + row * n_cols + cols, q * s, mask=cols < n_cols)

            _TRITON = (triton, quant, dequant)
        except ImportError:
            _TRITON = False
        except Exception as exc:  # Triton present but broken: one line, then the torch path
            _kernel_failed(exc)
    return _TRITON or None


def _use_triton(use_triton, t):
    """An explicit choice, or (None) the kernel for CUDA tensors when Triton is present."""
    if use_triton is not None:
        return use_triton
    return t.is_cuda and _triton_kernels() is not None


def _kernel_failed(exc):
    """Triton compiles a kernel on its first launch, so a GPU, driver or Triton version it does not
    support fails there: say so in one line, once, and use the torch path from then on."""
    global _TRITON, _TRITON_FAILED
    if not _TRITON_FAILED:
        print(
            f"quant: Triton kernel failed ({type(exc).__name__}: {exc}); using the torch path",
            file=sys.stderr,
        )
    _TRITON_FAILED = True
    _TRITON = False


def _launch_quant(w, clip, scale, qmax):
    triton, quant, _ = _triton_kernels()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    quant[(w.shape[0], triton.cdiv(w.shape[1], TRITON_BLOCK))](
        w, clip, scale, q, w.shape[1], qmax, BLOCK=TRITON_BLOCK
    )
    return q


def _launch_dequant(q, scale):
    triton, _, dequant = _triton_kernels()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dequant[(q.shape[0], triton.cdiv(q.shape[1], TRITON_BLOCK))](
        q.contiguous(), scale.contiguous(), out, q.shape[1], BLOCK=TRITON_BLOCK
    )
    return out


def quantize_rows(w, bits, clip, use_triton=None):
    """Per-row symmetric int-k: q = round(clamp(w, -c, c) / s), s = c / qmax stored as fp16. Returns
    (q int8, s fp16). An explicit use_triton=True (the kernel tests) lets a kernel failure raise;
    the automatic choice falls back to the torch maths (_kernel_failed)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float().contiguous()
    clip = clip.float().clamp_min(0).contiguous()
    scale = _row_scales(clip, qmax)
    if _use_triton(use_triton, w) and not (use_triton is None and _TRITON_FAILED):
        try:
            return _launch_quant(w, clip, scale, qmax), scale
        except Exception as exc:
            if use_triton:
                raise
            _kernel_failed(exc)
    return _round_clamp(w, clip[:, None], scale.float()[:, None], qmax).to(torch.int8), scale


def dequantize_rows(q, scale, use_triton=None):
    if _use_triton(use_triton, q) and not (use_triton is None and _TRITON_FAILED):
        try:
            return _launch_dequant(q, scale)
        except Exception as exc:
            if use_triton:
                raise
            _kernel_failed(exc)
    return q.float() * scale.float()[:, None]


# --- clip selection -----------------------------------------------------------------------------


def tensor_role(name):
    """embed, mlp, attn or other: which SD-clip k and which default width a tensor gets."""
    if "emb" in name or "lm_head" in name:
        return "embed"
    if "mlp" in name:
        return "mlp"
    if "attn" in name:
        return "attn"
    return "other"


def sdclip_k(name, h):
    """SD-clip k by role (#1855: MLP 11.5, attention 13.0, other 12.85, embedding 14.0)."""
    return {
        "embed": h.sdclip_k_embed,
        "mlp": h.sdclip_k_mlp,
        "attn": h.sdclip_k_attn,
    }.get(tensor_role(name), h.sdclip_k_other)


def is_gate(name, t, h):
    """A 2-D control gate stored int8 per row under GATE_INT8 (#1736/#1855 ship their gates so)."""
    return h.gate_int8 and t.ndim == 2 and is_control_tensor(name) and "gate" in name


def row_clip(w, bits, h, name=""):
    """Per-row clip by CLIP_METHOD. sdclip: c = k * std(row), uncapped, so k sets the bits a row
    costs (PR #1394); search: per row, the quantile of |w| whose int-k roundtrip has the least
    squared error."""
    if h.clip_method == "sdclip":
        return sdclip_k(name, h) * w.std(dim=1, correction=0)
    if h.clip_method == "percentile":  # the baseline's INT8_CLIP_PERCENTILE
        return torch.quantile(w.abs(), min(h.int8_clip_percentile / 100.0, 1.0), dim=1)
    cands = torch.quantile(w.abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1)
    errs = torch.stack(
        [(dequantize_rows(*quantize_rows(w, bits, c)) - w).square().sum(1) for c in cands]
    )
    return cands.gather(0, errs.argmin(0, keepdim=True))[0]


# --- GPTQ (Frantar et al. 2022): calibration Hessians, then error-compensated rounding ----------


def _block_linears(model):
    return [
        (f"{n}.weight", m)
        for n, m in model.named_modules()
        if n.startswith("blocks.") and isinstance(m, nn.Linear)
    ]


def _head_input(model):
    """(param name, module, whether the head's input is the module's output) of the output head:
    an untied lm_head reads its input; a tied embedding is read by the head on the output of
    final_norm. None where the model has neither (then the embedding gets no Hessian)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        return "lm_head.weight", head, False
    norm = getattr(model, "final_norm", None)
    if isinstance(norm, nn.Module) and hasattr(model, "tok_emb"):
        return "tok_emb.weight", norm, True
    return None


@torch.no_grad()
def collect_hessians(model, batches, embed=False):
    """{param name: H = X^T X / tokens} for every nn.Linear under `blocks.` (and, with embed, for
    the output head's weight from the head's input: GPTQ on the tied embedding, #1394/#1855),
    from forward hooks while the model reads `batches` (input id tensors); summed over ranks.
    Pass the bare model, not a compiled or DDP wrapper."""
    sums = {}
    count = torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device

    def hook(module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[module] = x.T @ x + sums.get(module, 0.0)

    def out_hook(module, inputs, output):
        x = output.detach().reshape(-1, output.shape[-1]).float()
        sums[module] = x.T @ x + sums.get(module, 0.0)

    linears = _block_linears(model)
    hooks = [m.register_forward_hook(hook) for _, m in linears]
    head = _head_input(model) if embed else None
    if head is not None:
        linears.append(head[:2])
        hooks.append(head[1].register_forward_hook(out_hook if head[2] else hook))
    progress = Progress("gptq calibration", len(batches), state="calibrating")
    try:
        for x in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model.forward_logits(x.to(device))
            count += x.numel()
            progress.advance()
    finally:
        progress.close()
        for hk in hooks:
            hk.remove()
    count = float(dist_sum(count.to(device)))
    return {name: dist_sum(sums[m]) / count for name, m in linears if m in sums}


@torch.no_grad()
def generate_calibration_tokens(model, n_seqs, seq_len, vocab_size, temperature=0.8, seed=0):
    """Sample from the model itself, from a random first token (self-generated calibration: legal
    and about as good as training data, PR #1019). No KV cache: the cost grows with seq_len
    squared."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n_seqs, 1), generator=g, device=device)
    for _ in range(seq_len - 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.forward_logits(tokens)[:, -1].float()
        tokens = torch.cat(
            [tokens, torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)], 1
        )
    return tokens


def gptq_calibrate(model, h, next_batch=None):
    """Hessians from GPTQ_CALIB_SEQS sequences split over the ranks: training data (`next_batch()`
    returns an (x, y) batch) or self-generated samples (GPTQ_CALIB_SOURCE=self). It counts
    against the 600 s training clock (RULES.md 3): run it inside GPTQ_RESERVE_SECONDS."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = max(1, h.gptq_calib_seqs // world)
    seqs = []
    if h.gptq_calib_source == "self":
        seqs = list(
            generate_calibration_tokens(
                model, n, h.train_seq_len, h.vocab_size, 0.8, h.seed + rank
            ).split(8)
        )
    while sum(x.shape[0] for x in seqs) < n:
        seqs.append(next_batch()[0][: n - sum(x.shape[0] for x in seqs)])
    return collect_hessians(model, seqs, embed=h.gptq_embed)


def gptq_quantize(w, H, bits, clip, block=128, damp=0.01):
    """Columns in order of decreasing Hessian diagonal; each one's rounding error / pivot goes onto
    the columns not yet rounded through the upper Cholesky factor of the damped inverse Hessian
    (lazy batch updates: blocks of `block` columns, the rest of the matrix updated once per block
    by one matmul). Row scales are fixed from `clip`."""
    W = w.float().clone()
    H = H.float().clone()
    c = clip.float().clamp_min(0)
    qmax = 2 ** (bits - 1) - 1
    scale = _row_scales(c, qmax)
    s = scale.float()
    diag = torch.diagonal(H)
    diag[diag <= 0] = (
        1.0  # a column never seen in calibration: plain rounding, no error spread onto it
    )
    order = torch.argsort(diag, descending=True, stable=True)
    W = W[:, order]
    H = H[order][:, order]
    H += torch.eye(H.shape[0], device=H.device) * (damp * diag.mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i0 in range(0, W.shape[1], block):
        i1 = min(i0 + block, W.shape[1])
        Wb = W[:, i0:i1].clone()
        Eb = torch.zeros(W.shape[0], i1 - i0, device=W.device)
        for j in range(i1 - i0):
            q = _round_clamp(Wb[:, j], c, s, qmax)
            err = (Wb[:, j] - q * s) / U[i0 + j, i0 + j]
            Q[:, i0 + j] = q
            Eb[:, j] = err
            Wb[:, j:] -= err[:, None] * U[i0 + j, i0 + j : i1][None, :]
        W[:, i1:] -= Eb @ U[i0:i1, i1:]
    return Q[:, torch.argsort(order)].to(torch.int8).contiguous(), scale


# --- late QAT: a straight-through fake quant in the forward of every quantized block matrix -----


def _qat_linear_forward(self, x):
    """Per-row int-k roundtrip with fp16 scales, clipped at max |w| (or k * std(row) under SD-clip);
    the forward sees it when qat_on is 1 and the gradient passes straight through to the fp32
    weight."""
    w = self.weight
    wd = self.weight.detach().float()
    if self.qat_k > 0:
        c = (self.qat_k * wd.std(dim=1, correction=0))[:, None]
    else:
        c = wd.abs().amax(dim=1)[:, None]
    s = _row_scales(c, self.qat_qmax).float()
    w = w + self.qat_on * (_round_clamp(wd, c, s, self.qat_qmax) * s - wd).to(w.dtype)
    return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def enable_qat(model, h):
    """Fake-quant forward for every quantized nn.Linear under `blocks.`, off until set_qat. Switch
    and width are buffers: torch.compile constant-folded #315's class-attribute flag. Call before
    compile; state_dict keys are unchanged."""
    qmax = 2 ** ((h.qat_bits or h.quant_bits) - 1) - 1
    mods = [(n, m) for n, m in _block_linears(model) if m.weight.numel() > h.keep_float_max_numel]
    for name, m in mods:
        m.register_buffer("qat_on", torch.zeros((), device=m.weight.device), persistent=False)
        m.register_buffer(
            "qat_qmax", torch.tensor(float(qmax), device=m.weight.device), persistent=False
        )
        m.qat_k = sdclip_k(name, h) if h.clip_method == "sdclip" else 0.0
        m.forward = _qat_linear_forward.__get__(m)
    return len(mods)


def set_qat(model, on):
    """Switch the fake quant of enable_qat on or off: a buffer write, no recompile. Returns `on`."""
    for m in model.modules():
        if hasattr(m, "qat_on"):
            m.qat_on.fill_(float(on))
    return on


def qat_step_hook(model, h, progress):
    """Switch QAT on (and return True) once training progress (0..1) reaches QAT_START_FRAC > 0."""
    return h.qat_start_frac > 0 and progress >= h.qat_start_frac and set_qat(model, True)


# --- bit allocation -----------------------------------------------------------------------------


def tensor_plan(name, t, h, bits=None):
    """The QuantScheme of one tensor, or None for a tensor stored raw (not floating point). Large
    matrices: int-k with k = bits[name], else EMBED_BITS (embeddings) or QUANT_BITS; control tensors
    fp32; every other float tensor fp16."""
    if not t.is_floating_point():
        return None
    if is_gate(name, t, h):
        return QuantScheme("int", 8)
    if t.ndim == 2 and t.numel() > h.keep_float_max_numel:
        default = h.embed_bits if tensor_role(name) == "embed" else h.quant_bits
        return QuantScheme("int", (bits or {}).get(name) or default)
    return QuantScheme("float", 32 if is_control_tensor(name) else 16)


def _is_int(scheme):
    return scheme is not None and scheme.is_int


def width_table(state, h, hessians=None, cache=None):
    """{name: {bits: (est. bytes, est. error)}}, bits from ALLOC_MIN_BITS (EMBED_BITS for the
    embedding) to 8. Bytes: order-0 entropy of the codes + 2 per row scale (zstd-22 within ~1%, lzma
    ~3-7%). Error: the squared roundtrip error; tr(E H E^T) / mean diag(H) where a Hessian is known,
    to keep sum-of-squares units."""
    table = {}
    for name in sorted(state):
        t = state[name].detach().float()
        if not _is_int(tensor_plan(name, t, h)):
            continue
        H = (hessians or {}).get(name)
        table[name] = {}
        clip = None if h.clip_method == "search" else row_clip(t, 8, h, name)
        min_bits = h.embed_bits if tensor_role(name) == "embed" else ALLOC_MIN_BITS
        if is_gate(name, t, h):
            min_bits = 8  # a few hundred bytes: never worth a narrower width
        for bits in range(min_bits, 9):
            q, scale = quantize_rows(t, bits, row_clip(t, bits, h, name) if clip is None else clip)
            if cache is not None and H is None:
                cache[(name, QuantScheme("int", bits))] = (q, scale)
            e = t - dequantize_rows(q, scale)
            if H is not None:
                err = ((e @ H) * e).sum() / torch.diagonal(H).mean().clamp_min(1e-12)
            else:
                err = e.square().sum()
            p = torch.bincount(q.flatten().view(torch.uint8), minlength=256).double() / q.numel()
            entropy_bits = float(-(p * p.clamp_min(1e-30).log2()).sum())
            table[name][bits] = (entropy_bits * q.numel() / 8 + 2 * len(t), float(err))
    return table


def _fixed_bytes(state, h, code_bytes):
    """Bytes the allocator cannot trade: the code, the header (estimated) and the float tensors."""
    float_bytes = 0
    for name, t in state.items():
        scheme = tensor_plan(name, t, h)
        if scheme is None:
            float_bytes += t.numel() * t.element_size()
        elif not scheme.is_int:
            float_bytes += t.numel() * scheme.bits // 8
    lqer_bytes = 0
    if h.lqer_rank > 0:  # at most top_k factor pairs, their int8 containers as the upper bound
        sides = [sum(t.shape) for n, t in state.items() if _is_int(tensor_plan(n, t, h))]
        lqer_bytes = h.lqer_top_k * h.lqer_rank * max(sides, default=0)
    return code_bytes + 4096 + 200 * len(state) + float_bytes + lqer_bytes


def plan_bits(state, h, code_bytes, hessians=None, table=None, ratio=1.0):
    """Widths that fit SIZE_BUDGET - SIZE_MARGIN, code counted: from 8 bits, lower step by step the
    tensor whose step adds the least error per byte saved. ratio: compressed bytes per estimated
    byte. Returns [{name, bits, bytes, est_error}]."""
    table = width_table(state, h, hessians) if table is None else table
    budget = h.size_budget - h.size_margin - _fixed_bytes(state, h, code_bytes)
    bits = {n: max(row) for n, row in table.items()}
    total = ratio * sum(table[n][b][0] for n, b in bits.items())
    while total > budget:
        steps = []  # (added error per byte saved, name) of every tensor that can go one bit lower
        for n, row in table.items():
            if bits[n] - 1 in row:
                added_error = row[bits[n] - 1][1] - row[bits[n]][1]
                saved_bytes = max(row[bits[n]][0] - row[bits[n] - 1][0], 1.0)
                steps.append((added_error / saved_bytes, n))
        if not steps:
            raise RuntimeError(
                f"SIZE_BUDGET={h.size_budget}: the model does not fit even at the narrowest widths "
                f"({int(total)} estimated bytes for {int(budget)} available)"
            )
        n = min(steps)[1]
        total -= ratio * (table[n][bits[n]][0] - table[n][bits[n] - 1][0])
        bits[n] -= 1
    return [
        {"name": n, "bits": b, "bytes": int(ratio * table[n][b][0]), "est_error": table[n][b][1]}
        for n, b in sorted(bits.items())
    ]


def _quantized(name, t, scheme, h, hessians, cache):
    """(q, scale) of one int tensor, from cache or made: the CLIP_METHOD clip, then GPTQ given a
    Hessian, else plain rounding."""
    if (name, scheme) not in cache:
        H = (hessians or {}).get(name)
        clip = row_clip(t.float(), scheme.bits, h, name)
        if H is not None:
            cache[(name, scheme)] = gptq_quantize(t, H, scheme.bits, clip)
        else:
            cache[(name, scheme)] = quantize_rows(t, scheme.bits, clip)
    return cache[(name, scheme)]


def quantize_state_dict(state, h, bits=None, hessians=None, cache=None):
    """Returns (tensor entries for the header, raw payload bytes). `bits` overrides widths per
    tensor; tensors with a Hessian go through GPTQ; `cache` keeps quantized tensors across calls."""
    entries = []
    chunks = []
    offset = 0
    cache = {} if cache is None else cache
    quantized = {}
    for name in sorted(state):
        scheme = tensor_plan(name, state[name], h, bits)
        if scheme is not None and scheme.is_int:
            quantized[name] = _quantized(name, state[name].detach(), scheme, h, hessians, cache)
    lqer = lqer_corrections(state, h, quantized)
    for name in sorted(state):
        t = state[name].detach()
        scheme = tensor_plan(name, t, h, bits)
        entry = {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "scheme": "raw" if scheme is None else str(scheme),
        }
        if scheme is None:
            parts = {"data": t}
        elif scheme.is_int:
            H = (hessians or {}).get(name)
            entry["method"] = "gptq" if H is not None else h.clip_method
            parts = dict(zip(("data", "scale"), quantized[name]))
        else:
            parts = {"data": t.to(torch.float16 if scheme.bits == 16 else torch.float32)}
        if scheme is not None and scheme.is_int and name in lqer:
            entry["lqer_rank"] = h.lqer_rank
            entry["lqer_group"] = h.lqer_group
            parts.update(lqer[name])
        for key, part in parts.items():
            blob = part.detach().cpu().contiguous().numpy().tobytes()
            entry[key] = [offset, len(blob)]
            chunks.append(blob)
            offset += len(blob)
        entries.append(entry)
    return entries, b"".join(chunks)


# --- LQER asym (#1797/#1851/#1855): a low-rank correction of the worst quantization residuals ----


def lqer_factors(err, rank, group):
    """E ~ A B with A (rows x rank) INT2 in [-2, 1] with one fp16 scale and B (rank x cols) INT4
    in [-8, 7] with an fp16 scale per `group` columns. A comes from the rank-r SVD (U sqrt(S));
    B is refitted by least squares to the quantized A before it is quantized itself, so B absorbs
    A's coarse rounding. Returns {part: tensor} as stored."""
    U, S, _ = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(rank, len(S))
    a = (U[:, :r] * S[:r].sqrt()).float()
    a_scale = (a.abs().amax() / 2).clamp_min(1e-8).to(torch.float16)
    qa = torch.clamp(torch.round(a / a_scale.float()), -2, 1)
    a_hat = qa * a_scale.float()
    b = torch.linalg.lstsq(a_hat.double(), err.double()).solution.float()
    if r < rank:  # a matrix narrower than the rank: pad with zero factors
        qa = F.pad(qa, (0, rank - r))
        b = F.pad(b, (0, 0, 0, rank - r))
    cols = b.shape[1]
    n_groups = -(-cols // group)
    bp = F.pad(b, (0, n_groups * group - cols)).reshape(rank, n_groups, group)
    b_scale = (bp.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.float16)
    qb = torch.clamp(torch.round(bp / b_scale.float()[..., None]), -8, 7)
    return {
        "lqer_a": qa.to(torch.int8).contiguous(),
        "lqer_a_scale": a_scale.reshape(1),
        "lqer_b": qb.reshape(rank, -1)[:, :cols].to(torch.int8).contiguous(),
        "lqer_b_scale": b_scale.contiguous(),
    }


def lqer_product(parts, rank, group, shape):
    """A_hat B_hat (float32, `shape`) of stored LQER parts."""
    rows, cols = shape
    a = parts["lqer_a"].float().reshape(rows, rank) * parts["lqer_a_scale"].float()
    n_groups = -(-cols // group)
    b = F.pad(parts["lqer_b"].float().reshape(rank, cols), (0, n_groups * group - cols))
    b = b.reshape(rank, n_groups, group) * parts["lqer_b_scale"].float().reshape(rank, n_groups, 1)
    return a @ b.reshape(rank, -1)[:, :cols]


def lqer_corrections(state, h, quantized):
    """{name: LQER parts} for the LQER_TOP_K int tensors with the largest ||W - W_hat||_F.
    quantized: {name: (q, scale)} of the int tensors."""
    if h.lqer_rank <= 0:
        return {}
    errs = {}
    for name, (q, scale) in quantized.items():
        errs[name] = state[name].detach().float().cpu() - dequantize_rows(q.cpu(), scale.cpu())
    top = sorted(errs, key=lambda n: -float(errs[n].norm()))[: h.lqer_top_k]
    return {n: lqer_factors(errs[n], h.lqer_rank, h.lqer_group) for n in top}


def dequantize_entries(entries, raw):
    """The state dict of the header's tensor entries over the decompressed payload (entries checked
    by check_artifact_header, or made by quantize_state_dict)."""
    state = {}
    for e in entries:
        off, n = e["data"]
        dtype, raw_np_dtype = ARTIFACT_DTYPES[e["dtype"]]
        scheme = None if e["scheme"] == "raw" else QuantScheme.parse(e["scheme"])
        if scheme is None:
            np_dtype = raw_np_dtype
        elif scheme.is_int:
            np_dtype = np.int8
        else:
            np_dtype = np.float16 if scheme.bits == 16 else np.float32
        t = torch.from_numpy(np.frombuffer(raw[off : off + n], np_dtype).copy())
        if _is_int(scheme):
            scale_off, scale_n = e["scale"]
            scale_raw = raw[scale_off : scale_off + scale_n]
            scale = torch.from_numpy(np.frombuffer(scale_raw, np.float16).copy())
            t = dequantize_rows(t.reshape(e["shape"]), scale)
            if "lqer_rank" in e:
                parts = {}
                for part, np_type in LQER_PARTS.items():
                    p_off, p_n = e[part]
                    parts[part] = torch.from_numpy(
                        np.frombuffer(raw[p_off : p_off + p_n], np_type).copy()
                    )
                t = t + lqer_product(parts, e["lqer_rank"], e["lqer_group"], e["shape"])
        state[e["name"]] = t.reshape(e["shape"]).to(dtype)
    return state


# --- per-group compression (PR #1855): tensors bucketed by role, rows sorted, best back end ------
# The logical payload (the tensor entries' offsets) is the same as for one stream; only its
# storage differs: each group's parts are concatenated (int rows in a stored order), compressed by
# whichever back end makes the group smallest, and the streams follow one another. The header's
# "groups" names each group, its back end, its compressed length and whether its rows are sorted;
# a reader recomputes the groups from the checked entries, so it trusts none of their sizes.

PERGROUP_SAMPLE_BYTES = 1 << 19  # bytes of each group on which the back ends are compared
PERGROUP_AUTO_MIN_RAW = 4 << 20  # "auto" uses per-group from this raw size (overheads below)
PERGROUP_SEGMENT_BYTES = 4 << 20  # groups are compressed in segments of this many raw bytes, in
# parallel (one Brotli-11 stream of the 17 MB MLP group alone took minutes); each segment restarts
# its back end's model, which costs a few hundred bytes
SORT_MIN_BYTES = 1 << 16  # smaller groups keep their row order
SORT_MAX_ROWS = 8192  # the row order is uint16, and the greedy tour costs rows^2
SORT_SAMPLE_ROWS = 256  # rows of a group's largest tensor on which sorting is tried first


def _brotli_bounded(data, limit):
    """Brotli with an output ceiling of limit + 1 bytes; a stream that is not finished there (or
    that is cut short) is refused."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    dec = brotli.Decompressor()
    out = dec.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    if not dec.is_finished():
        raise ValueError("brotli stream is truncated or has trailing data")
    return out


def _zstd_long(data, level):
    """zstd with a 128 MiB window and long-distance matching (what `zstd --long=27` does)."""
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=27, enable_ldm=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


# --- rANS: an entropy coder for the int code groups ---------------------------------------------
# Quantized weights are close to independent draws from one distribution per group: a general
# compressor's Huffman or LZ modelling stays about 1% above their order-0 entropy, an arithmetic
# coder with the group's own frequency table gets within a few hundredths of a percent of it.
# Range asymmetric numeral systems (Duda 2013, arXiv:1311.2540) with many interleaved states
# (Giesen 2014) so numpy codes a whole row of lanes per step. One static table per segment.
# Layout, little-endian: n (u32), lanes (u32), lowest and highest byte value (u8, u8), the
# frequencies of lowest..highest (u16 each, summing to 2^RANS_PROB_BITS), each lane's final state
# (u32), then the 16-bit renormalization words in the order the decoder reads them. The decoder
# checks that every lane ends in the state the encoder started from: a corrupt stream is refused.

RANS_PROB_BITS = 14
RANS_LOW = 1 << 16  # states live in [RANS_LOW, 2^32); renormalization moves 16 bits
RANS_STEPS = 8192  # symbols per lane: lanes = ceil(n / RANS_STEPS), each costs ~2 bytes of state


def _rans_lanes(n):
    return max(1, -(-n // RANS_STEPS))


def _rans_table(counts):
    """Frequencies summing to 2^RANS_PROB_BITS, at least 1 for every symbol that occurs: the
    counts scaled down, the remainder given to (or taken from) the commonest symbols."""
    total = 1 << RANS_PROB_BITS
    freqs = np.floor(counts * (total / max(int(counts.sum()), 1))).astype(np.int64)
    freqs[(counts > 0) & (freqs == 0)] = 1
    by_count = np.argsort(-counts, kind="stable")
    used = int((counts > 0).sum())
    k = 0
    while freqs.sum() != total:
        j = by_count[k % used]
        if freqs.sum() < total:
            freqs[j] += 1
        elif freqs[j] > 1:
            freqs[j] -= 1
        k += 1
    return freqs


def rans_compress(data):
    """The rANS stream of data (bytes), order 0 with its own frequency table."""
    sym = np.frombuffer(data, np.uint8)
    n = len(sym)
    if n == 0:
        return struct.pack("<IIBB", 0, 0, 0, 0)
    counts = np.bincount(sym, minlength=256)
    lo = int(np.flatnonzero(counts)[0])
    hi = int(np.flatnonzero(counts)[-1])
    freqs = np.zeros(256, np.int64)
    freqs[lo : hi + 1] = _rans_table(counts[lo : hi + 1])
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    lanes = _rans_lanes(n)
    steps = -(-n // lanes)
    padded = np.full(steps * lanes, int(np.argmax(counts)), np.uint8)  # the tail pads with the
    padded[:n] = sym  # commonest symbol; the decoder drops it
    grid = padded.reshape(steps, lanes)
    x = np.full(lanes, RANS_LOW, np.uint64)
    renorm_at = np.uint64((RANS_LOW >> RANS_PROB_BITS) << 16)
    chunks = []
    for t in range(steps - 1, -1, -1):  # rANS encodes backwards so that decoding runs forwards
        f = freqs[grid[t]].astype(np.uint64)
        full = x >= renorm_at * f
        chunks.append((x[full] & np.uint64(0xFFFF)).astype("<u2"))
        x[full] >>= np.uint64(16)
        x = ((x // f) << np.uint64(RANS_PROB_BITS)) + x % f + starts[grid[t]].astype(np.uint64)
    head = struct.pack("<IIBB", n, lanes, lo, hi) + freqs[lo : hi + 1].astype("<u2").tobytes()
    words = b"".join(c.tobytes() for c in reversed(chunks))
    return head + x.astype("<u4").tobytes() + words


def rans_decompress(blob, limit):
    """The bytes of a rANS stream, at most `limit` of them; ValueError for a stream that is
    malformed, truncated, has trailing words or does not return every lane to its start."""
    if len(blob) < 10:
        raise ValueError("rans stream is truncated")
    n, lanes, lo, hi = struct.unpack_from("<IIBB", blob)
    if n > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    if n == 0:
        if len(blob) != 10:
            raise ValueError("rans stream has trailing data")
        return b""
    if lanes != _rans_lanes(n) or hi < lo:
        raise ValueError("rans stream header is inconsistent")
    at = 10 + 2 * (hi - lo + 1)
    if len(blob) < at + 4 * lanes or (len(blob) - at) % 2:
        raise ValueError("rans stream is truncated")
    freqs = np.zeros(256, np.int64)
    freqs[lo : hi + 1] = np.frombuffer(blob, "<u2", hi - lo + 1, 10)
    if int(freqs.sum()) != 1 << RANS_PROB_BITS:
        raise ValueError("rans frequency table does not add up")
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    slot_symbol = np.repeat(np.arange(256, dtype=np.uint8), freqs)
    x = np.frombuffer(blob, "<u4", lanes, at).astype(np.uint64)
    if (x < RANS_LOW).any():
        raise ValueError("rans stream has a lane state out of range")
    words = np.frombuffer(blob, "<u2", offset=at + 4 * lanes).astype(np.uint64)
    steps = -(-n // lanes)
    out = np.empty((steps, lanes), np.uint8)
    mask = np.uint64((1 << RANS_PROB_BITS) - 1)
    read = 0
    for t in range(steps):
        slot = x & mask
        s = slot_symbol[slot.astype(np.int64)]
        out[t] = s
        x = freqs[s].astype(np.uint64) * (x >> np.uint64(RANS_PROB_BITS)) + slot
        x -= starts[s].astype(np.uint64)
        low = x < RANS_LOW
        k = int(low.sum())
        if read + k > len(words):
            raise ValueError("rans stream is truncated")
        x[low] = (x[low] << np.uint64(16)) | words[read : read + k]
        read += k
    if read != len(words) or (x != RANS_LOW).any():
        raise ValueError("rans stream is corrupt (its lanes do not end where they started)")
    return out.reshape(-1)[:n].tobytes()


# name: (compress(data), decompress(data, limit)) of the per-group back ends that are installed.
PERGROUP_CODECS = {
    "brotli": (
        lambda d: brotli.compress(d, quality=11, lgwin=24),
        _brotli_bounded,
    ),
    "lzma": (lambda d: COMPRESSORS["lzma"][0](d, 9), COMPRESSORS["lzma"][1]),
    "zstd": (lambda d: _zstd_long(d, 22), _zstd_bounded),
    "rans": (rans_compress, rans_decompress),
}


def pergroup_codecs():
    """The back ends this process can write and read (brotli and zstd are optional packages)."""
    return [
        n
        for n in PERGROUP_CODECS
        if not (n == "brotli" and brotli is None) and not (n == "zstd" and zstandard is None)
    ]


def _group_key(e, part):
    """Int codes and float values are bucketed by role and scheme (their statistics differ);
    scales, row orders and other side parts each form one group."""
    if part != "data":
        return part
    role = "control" if is_control_tensor(e["name"]) else tensor_role(e["name"])
    return f"{role}.{e['scheme']}"


def payload_groups(entries):
    """[(group name, [(tensor index, part)])] in a fixed order, from the tensor entries alone."""
    groups = {}
    for i, e in enumerate(entries):
        for part in ENTRY_PARTS:
            if part in e:
                groups.setdefault(_group_key(e, part), []).append((i, part))
    return sorted(groups.items())


def _sortable(e, part):
    """Int codes of a 2-D tensor with at most SORT_MAX_ROWS rows: those a sorted group reorders."""
    return (
        part == "data"
        and e["scheme"].startswith("int")
        and len(e["shape"]) == 2
        and 1 < e["shape"][0] <= SORT_MAX_ROWS
    )


def l1_row_order(q):
    """A greedy nearest-neighbour tour over the rows of q under L1 distance, from row 0: similar
    rows end up next to each other, which a back end with a long window can exploit (#1855)."""
    x = torch.from_numpy(np.asarray(q, np.float32))
    dist_l1 = torch.cdist(x, x, p=1)
    dist_l1.fill_diagonal_(float("inf"))
    seen = torch.zeros(len(x), dtype=torch.bool)
    order = [0]
    seen[0] = True
    for _ in range(len(x) - 1):
        nxt = int(dist_l1[order[-1]].masked_fill(seen, float("inf")).argmin())
        order.append(nxt)
        seen[nxt] = True
    return np.asarray(order, np.uint16)


def _best_codec(data, codecs, cache):
    """(name, blob) of the smallest compression of data among codecs, kept in `cache` under
    (sha256 of data, None): a bit-allocation try asks again about the samples of groups it did
    not change."""
    key = (sha256_hex(data), None)
    if key not in cache:
        tries = ((n, PERGROUP_CODECS[n][0](data)) for n in codecs)
        cache[key] = min(tries, key=lambda nb: len(nb[1]))
    return cache[key]


def _sample(data):
    """Up to PERGROUP_SAMPLE_BYTES of data: 8 evenly spaced slices, so a long group is sampled
    all along, not only at its start."""
    if len(data) <= PERGROUP_SAMPLE_BYTES:
        return data
    step = PERGROUP_SAMPLE_BYTES // 8
    starts = np.linspace(0, len(data) - step, 8).astype(np.int64)
    return b"".join(data[s : s + step] for s in starts)


def _sort_pays(entries, members, raw, codecs, cache):
    """Whether sorting rows pays on a sample: SORT_SAMPLE_ROWS rows from the middle of the
    largest sortable tensor, sorted, compressed by their best back end and their order added,
    against unsorted by its best back end (an entropy coder unsorted can beat an LZ coder
    sorted). Not the first rows: an embedding's are its byte and special tokens, rarely trained
    and alike, which overstate what sorting gains (measured on a CPU-trained model: the first
    rows said +2.5%, the whole embedding lost 0.8% to its stored order)."""
    cands = [(i, p) for i, p in members if _sortable(entries[i], p)]
    if not cands:
        return False
    i = max(cands, key=lambda ip: entries[ip[0]]["data"][1])[0]
    off, _ = entries[i]["data"]
    rows, cols = entries[i]["shape"][0], entries[i]["shape"][1]
    n = min(rows, SORT_SAMPLE_ROWS)
    start = (rows - n) // 2
    q = np.frombuffer(raw, np.int8, n * cols, off + start * cols).reshape(n, cols)
    order = l1_row_order(q)
    plain = len(_best_codec(q.tobytes(), codecs, cache)[1])
    sorted_bytes = len(_best_codec(q[order].tobytes(), codecs, cache)[1]) + 2 * n
    return sorted_bytes < plain


def _group_stream(entries, members, raw, orders):
    """The group's bytes: its parts in order, int rows in `orders[i]` order where given."""
    out = []
    for i, part in members:
        off, n = entries[i][part]
        if i in orders and _sortable(entries[i], part):
            rows = entries[i]["shape"][0]
            q = np.frombuffer(raw, np.int8, n, off).reshape(rows, -1)
            out.append(q[orders[i]].tobytes())
        else:
            out.append(raw[off : off + n])
    return b"".join(out)


def compress_pergroup(entries, raw, cache=None, sort_rows=True):
    """(payload, groups): every group compressed by the back end that made its sample smallest,
    rows of large groups sorted where a sample says it pays (the order stored in group "order").
    cache: {sha256 of a group's bytes: (codec, blob)}, kept across bit-allocation tries so
    unchanged groups are not compressed again."""
    from concurrent.futures import ThreadPoolExecutor

    cache = {} if cache is None else cache
    codecs = pergroup_codecs()
    plan = []  # (name, stream, sorted)
    orders = {}
    for name, members in payload_groups(entries):
        stream = _group_stream(entries, members, raw, {})
        do_sort = (
            sort_rows
            and len(stream) >= SORT_MIN_BYTES
            and _sort_pays(entries, members, raw, codecs, cache)
        )
        if do_sort:
            for i, part in members:
                if _sortable(entries[i], part):
                    off, _ = entries[i]["data"]
                    rows = entries[i]["shape"][0]
                    q = np.frombuffer(raw, np.int8, entries[i]["data"][1], off).reshape(rows, -1)
                    orders[i] = l1_row_order(q)
            stream = _group_stream(entries, members, raw, orders)
        codec = _best_codec(_sample(stream), codecs, cache)[0]
        plan.append((name, stream, do_sort, codec))
    if orders:
        order_stream = b"".join(orders[i].tobytes() for i in sorted(orders))
        plan.append(("order", order_stream, False, None))

    def work(item):
        segment, codec = item
        if codec is None:  # a group of one segment no larger than a sample: try them all
            return _best_codec(segment, codecs, cache)
        key = (sha256_hex(segment), codec)
        if key not in cache:  # the sample chose the back end; only that one compresses it
            cache[key] = (codec, PERGROUP_CODECS[codec][0](segment))
        return cache[key]

    items = []
    for _, stream, _, codec in plan:
        step = PERGROUP_SEGMENT_BYTES
        segments = [stream[a : a + step] for a in range(0, len(stream), step)] or [b""]
        use = None if len(stream) <= PERGROUP_SAMPLE_BYTES else codec
        items += [(seg, use) for seg in segments]
    with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
        done = iter(list(pool.map(work, items)))
    groups = []
    blobs = []
    for name, stream, do_sort, _ in plan:
        parts = [next(done) for _ in range(_segment_count(len(stream)))]
        groups.append(
            {
                "name": name,
                "codec": parts[0][0],
                "bytes": sum(len(b) for _, b in parts),
                "sorted": do_sort,
                "segments": [len(b) for _, b in parts],
            }
        )
        blobs += [b for _, b in parts]
    return b"".join(blobs), groups


def _segment_count(raw_len):
    return max(1, -(-raw_len // PERGROUP_SEGMENT_BYTES))


def _check_groups(path, header, entries, payload_bytes):
    """The header's groups against the groups its entries imply: names, order, back ends,
    lengths (summing to the payload); ValueError naming the file and the field otherwise."""
    groups = header.get("groups")
    expected = [name for name, _ in payload_groups(entries)]
    if not isinstance(groups, list) or len(groups) > len(expected) + 1:
        raise ValueError(f"{path}: artifact header groups: expected a list of group objects")
    names = []
    for k, g in enumerate(groups):
        if not isinstance(g, dict) or set(g) != {"name", "codec", "bytes", "sorted", "segments"}:
            raise ValueError(
                f"{path}: artifact header groups[{k}]: expected name, codec, bytes, sorted, "
                "segments"
            )
        segs = g["segments"]
        if (
            not isinstance(segs, list)
            or not segs
            or len(segs) > ARTIFACT_MAX_RAW_BYTES // PERGROUP_SEGMENT_BYTES + 1
            or not all(_is_count(n) for n in segs)
            or sum(segs) != g["bytes"]
        ):
            raise ValueError(
                f"{path}: artifact header groups[{k}].segments: expected compressed lengths "
                "adding up to its bytes"
            )
        if g["codec"] not in pergroup_codecs():
            raise ValueError(
                f"{path}: artifact header groups[{k}].codec {str(g['codec'])[:40]!r} is unknown "
                "or not installed (brotli and zstd are optional packages)"
            )
        if not _is_count(g["bytes"]) or not isinstance(g["sorted"], bool):
            raise ValueError(f"{path}: artifact header groups[{k}]: bad bytes or sorted field")
        names.append(g["name"])
    any_sorted = any(g["sorted"] for g in groups)
    if names != expected + (["order"] if any_sorted else []):
        raise ValueError(
            f"{path}: artifact header groups {str(names)[:120]} are not the groups its tensors "
            f"imply {str(expected)[:120]}"
        )
    if groups and groups[-1]["name"] == "order" and groups[-1]["sorted"]:
        raise ValueError(f"{path}: artifact header group 'order' cannot itself be sorted")
    if sum(g["bytes"] for g in groups) != payload_bytes:
        raise ValueError(
            f"{path}: artifact header groups add up to {sum(g['bytes'] for g in groups)} bytes, "
            f"the payload has {payload_bytes}"
        )


def decompress_pergroup(header, payload):
    """The logical payload (raw_bytes) of a per-group payload whose header passed
    check_artifact_header: each stream inflates, bounded, to exactly the bytes its members need;
    row orders are checked to be permutations before they are applied."""
    entries = header["tensors"]
    members = dict(payload_groups(entries))
    groups = header["groups"]
    sorted_ids = sorted(
        i
        for g in groups
        if g["sorted"]
        for i, part in members[g["name"]]
        if _sortable(entries[i], part)
    )
    streams = {}
    at = 0
    for g in groups:
        if g["name"] == "order":
            want = sum(2 * entries[i]["shape"][0] for i in sorted_ids)
        else:
            want = sum(entries[i][part][1] for i, part in members[g["name"]])
        if len(g["segments"]) != _segment_count(want):
            raise ValueError(
                f"group {g['name']!r} has {len(g['segments'])} segments, its {want} bytes need "
                f"{_segment_count(want)}"
            )
        out = []
        for k, n in enumerate(g["segments"]):
            limit = min(PERGROUP_SEGMENT_BYTES, want - k * PERGROUP_SEGMENT_BYTES)
            piece = PERGROUP_CODECS[g["codec"]][1](payload[at : at + n], limit)
            if len(piece) != limit:
                raise ValueError(f"group {g['name']!r} inflates to a short segment")
            out.append(piece)
            at += n
        streams[g["name"]] = b"".join(out)
    orders = {}
    order_at = 0
    for i in sorted_ids:
        rows = entries[i]["shape"][0]
        order = np.frombuffer(streams["order"], np.uint16, rows, order_at).astype(np.int64)
        order_at += 2 * rows
        if not np.array_equal(np.sort(order), np.arange(rows)):
            raise ValueError(
                f"row order of tensor {entries[i]['name'][:80]!r} is not a permutation"
            )
        orders[i] = order
    raw = bytearray(header["raw_bytes"])
    for g in groups:
        if g["name"] == "order":
            continue
        at = 0
        stream = streams[g["name"]]
        for i, part in members[g["name"]]:
            off, n = entries[i][part]
            chunk = stream[at : at + n]
            at += n
            if i in orders and _sortable(entries[i], part):
                rows = entries[i]["shape"][0]
                stored = np.frombuffer(chunk, np.int8).reshape(rows, -1)
                restored = np.empty_like(stored)
                restored[orders[i]] = stored
                chunk = restored.tobytes()
            raw[off : off + n] = chunk
    return bytes(raw)


# --- the compressed header (HEADER_COMPRESS) ---------------------------------------------------
# Version 2 of the container: after the prefix, the sha256 of the stored header bytes, then one
# codec byte and the header JSON compressed. The digest is checked before anything is inflated,
# and the inflated header still carries its mandatory header_sha256.

ARTIFACT_VERSION_PACKED_HEADER = 2
HEADER_CODECS = {b"x": "lzma", b"b": "brotli"}


def _pack_head(head):
    """One codec byte and head compressed: Brotli where installed (it wins on JSON), else LZMA."""
    if brotli is not None:
        return b"b" + brotli.compress(head, quality=11)
    return b"x" + lzma.compress(head, preset=9 | lzma.PRESET_EXTREME)


def _unpack_head(path, stored):
    """The header JSON bytes of a version-2 head (digest already checked), at most
    MAX_HEADER_BYTES."""
    codec = HEADER_CODECS.get(stored[:1])
    if codec is None or (codec == "brotli" and brotli is None):
        raise ValueError(
            f"{path}: artifact header codec {stored[:1]!r} is unknown or not installed"
        )
    try:
        if codec == "brotli":
            return _brotli_bounded(stored[1:], MAX_HEADER_BYTES)
        return _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), stored[1:], MAX_HEADER_BYTES)
    except Exception as exc:
        why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: artifact header does not decompress ({why})") from None


# --- the compact counted code (CODE_FORM=compact) ------------------------------------------------
# As the records ship it (#1394's train_gpt.py beside train_gpt_human.py): a few-line script that
# holds a minified form of the readable source, compressed, in one latin-1 string literal (a
# base-253 number: 0.3% overhead, where base85 costs 25%), expands it and runs it under the
# readable file's name.
# linecache gets the running source, so inspect (and @triton.jit, which reads its kernel's source)
# work as for the file. The minified form is a deterministic function of the readable source:
# comments and docstrings dropped, function-local names shortened, one space per indent level,
# lines joined inside brackets. The builder below is left out of it (between the two marker
# comments): a compact form never builds another. Checking a compact form re-derives the minified
# source from the readable one and compares; the header binds the readable sha256 as before.

COMPACT_MAX_SOURCE = 4 << 20
COMPACT_OMIT_BEGIN = "# compact form: omit from here"
COMPACT_OMIT_END = "# compact form: omit to here"


def compact_running():
    """Whether this process runs a compact form (its wrapper set COMPACT_PATH)."""
    return globals().get("COMPACT_PATH") is not None


def readable_sha256():
    """sha256 of the readable script: the one the artifact header binds as script_sha256."""
    if compact_running():
        return globals()["READABLE_SHA256"]
    return sha256_hex(code_bytes_of())


def readable_size():
    """Bytes of the readable script (the compact form carries the figure)."""
    if compact_running():
        return globals()["READABLE_BYTES"]
    return len(code_bytes_of())


def running_source():
    """The source this process runs: the readable file, or the minified one a compact form
    expanded."""
    if compact_running():
        return globals()["RUNNING_SOURCE"].encode("utf-8")
    return code_bytes_of()


def counted_code(h, code=None):
    """The bytes that count against SIZE_BUDGET: the readable script `code` (this file by
    default; CODE_FORM=readable) or its compact form (CODE_FORM=compact). A compact form counts
    its own file."""
    if code is None and compact_running():
        if h.code_form != "compact":
            raise ValueError(
                "CODE_FORM=readable: this process runs the compact form; run the readable "
                f"{os.path.basename(CODE_PATH)} to count it"
            )
        with open(globals()["COMPACT_PATH"], "rb") as f:
            return f.read()
    code = code_bytes_of() if code is None else code
    if h.code_form == "compact":
        return compact_code(code, os.path.basename(CODE_PATH))
    return code


def code_bytes_of(path=None):
    """The readable script's bytes: this file (CODE_PATH) or `path`. A compact form has only its
    minified source: there, use readable_sha256 / running_source."""
    if path is None and compact_running():
        raise ValueError("the readable source is not part of a compact form (readable_sha256)")
    with open(path or CODE_PATH, "rb") as f:
        return f.read()


# compact form: omit from here


def _docstring_starts(tree):
    """{(line, column): whether it is its body's only statement} of every docstring."""
    import ast

    out = {}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, kinds) or not body:
            continue
        first = body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            out[(first.lineno, first.col_offset)] = len(body) == 1
    return out


def _short_names():
    """a, b, ..., z, aa, ab, ...: names that are neither keywords nor builtins."""
    import builtins
    import itertools
    import keyword
    import string

    for size in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=size):
            name = "".join(letters)
            if not keyword.iskeyword(name) and not hasattr(builtins, name):
                yield name


def _scope_nodes(fn):
    """The nodes of a function's body, not descending into nested functions, lambdas or classes
    (those are yielded themselves). Defaults, annotations and decorators are left out: they are
    evaluated in the enclosing scope."""
    import ast

    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _renamable_locals(fn, fixed_params, segment):
    """(names a function binds that can be renamed, {name: its Name nodes}, {param: its arg
    node}). A parameter qualifies unless it is in fixed_params (passed by keyword or spelled as a
    string somewhere in the file) or annotated (Triton's constexprs); a local qualifies unless
    it is declared global or nonlocal, bound by an import, an except clause or a match, bound
    anywhere in a nested function, lambda or class (reading it there is fine: those uses are
    renamed too), or used inside an f-string that may use the `{name=}` form. A function that
    calls locals(), vars(), eval() or exec() keeps all its names. segment(node) is a node's
    source text."""
    import ast

    args = fn.args
    arg_nodes = {a.arg: a for a in args.posonlyargs + args.args + args.kwonlyargs}
    params = set(arg_nodes)
    for star in (args.vararg, args.kwarg):
        if star is not None:
            params.add(star.arg)
    renamable_params = {
        name
        for name, node in arg_nodes.items()
        if name not in fixed_params and node.annotation is None
    }
    keep = params - renamable_params
    uses = {}
    stored = set()
    for node in _scope_nodes(fn):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            keep.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            keep.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            keep.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            if not isinstance(node, ast.Lambda):
                keep.add(node.name)
            for inner in ast.walk(node):
                if inner is not node and _binds_or_hides(inner, segment):
                    return set(), {}, {}
                keep.update(_bound_names(inner))
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load):
                    uses.setdefault(inner.id, []).append(inner)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
            return set(), {}, {}
        elif isinstance(node, ast.JoinedStr) and re.search(r"=\s*[}!:]", segment(node)):
            keep.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("locals", "vars", "eval", "exec")
        ):
            return set(), {}, {}
        if isinstance(node, ast.Name):
            uses.setdefault(node.id, []).append(node)
            if not isinstance(node.ctx, ast.Load):
                stored.add(node.id)
    names = (stored | renamable_params) - keep
    return names, uses, arg_nodes


def _bound_names(node):
    """The names a node binds in its own scope (for a nested scope: any of them)."""
    import ast

    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        return {node.id}
    if isinstance(node, ast.arg):
        return {node.arg}
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return set(node.names)
    if isinstance(node, ast.ExceptHandler) and node.name:
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    return set()


def _binds_or_hides(node, segment):
    """Whether a node inside a nested scope makes its names unsafe to rename at all: a match
    pattern, a self-documenting f-string or a call of locals(), vars(), eval() or exec()."""
    import ast

    if isinstance(node, (ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
        return True
    if isinstance(node, ast.JoinedStr):
        return re.search(r"=\s*[}!:]", segment(node)) is not None
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("locals", "vars", "eval", "exec")
    )


def _rename_edits(text, tree):
    """[(line, start column, end column, old, new)] (columns in UTF-8 bytes) that give each
    function's renamable names the shortest names unused in that function, the most used
    first."""
    import ast
    import io
    import tokenize

    fixed_params = {
        kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
    }
    fixed_params |= {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value not in ("self", "cls")  # bound by the call's object, never from a dict
    }
    lines = [line.encode("utf-8") for line in text.splitlines(True)]

    def segment(node):
        """The node's source text (ast.get_source_segment splits the whole file each call)."""
        rows = lines[node.lineno - 1 : node.end_lineno]
        if len(rows) == 1:
            return rows[0][node.col_offset : node.end_col_offset].decode("utf-8")
        rows = [rows[0][node.col_offset :], *rows[1:-1], rows[-1][: node.end_col_offset]]
        return b"".join(rows).decode("utf-8")

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    edits = []
    given = {}  # id of a nested function: new names its enclosing functions gave names it reads
    for fn in ast.walk(tree):  # outer functions first
        if not isinstance(fn, functions):
            continue
        names, uses, arg_nodes = _renamable_locals(fn, fixed_params, segment)
        if not names:
            continue
        reader = io.StringIO(segment(fn)).readline
        taken = {t.string for t in tokenize.generate_tokens(reader) if t.type == tokenize.NAME}
        taken |= given.get(id(fn), set())
        nested = [n for n in ast.walk(fn) if n is not fn and isinstance(n, functions)]
        fresh = (name for name in _short_names() if name not in taken)
        for old in sorted(names, key=lambda n: (-len(uses.get(n, ())), n)):
            new = next(fresh)
            if len(new) >= len(old):
                continue
            nodes = list(uses.get(old, ()))
            if old in arg_nodes:
                nodes.append(arg_nodes[old])
            for node in nodes:
                edits.append((node.lineno, node.col_offset, node.end_col_offset, old, new))
            for inner in nested:
                given.setdefault(id(inner), set()).add(new)
    return edits


def rename_locals(source):
    """source (bytes) with each function's renamable parameters and locals shortened
    (_renamable_locals); ValueError where the AST's positions do not point at the name."""
    import ast

    text = source.decode("utf-8")
    lines = [line.encode("utf-8") for line in text.splitlines(True)]
    for row, start, end, old, new in sorted(_rename_edits(text, ast.parse(text)), reverse=True):
        line = lines[row - 1]
        if line[start:end] != old.encode():
            raise ValueError(f"rename_locals: line {row} has no {old!r} at column {start}")
        lines[row - 1] = line[:start] + new.encode() + line[end:]
    return b"".join(lines)


def rename_globals(source):
    """source (bytes) with module-level functions and assigned names shortened, where that is
    safe: the name is bound nowhere else in the file (so no local shadows it), never declared
    global, and never spelled inside a string (getattr, globals() and the contract's name lists
    read names from strings). The new names are unused anywhere in the file."""
    return _global_renames(source)[0]


def compact_names(source):
    """{readable name: its name in the compact form} of the module-level names rename_globals
    shortens in a readable script (bytes): for tracebacks and tests of a compact form."""
    return _global_renames(rename_locals(source))[1]


def _global_renames(source):
    """(renamed source, {old: new}) of rename_globals."""
    import ast
    import io
    import tokenize

    text = source.decode("utf-8")
    tree = ast.parse(text)
    defined = {}  # name: the positions of its module-level binding
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defined[node.name] = node
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            defined[node.targets[0].id] = node.targets[0]
    bindings = {}
    strings = set()
    for node in ast.walk(tree):
        for name in _bound_names(node):
            bindings[name] = bindings.get(name, 0) + 1
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    names = {n for n in defined if bindings.get(n) == 1 and n not in strings}
    uses = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            uses.setdefault(node.id, []).append(node)
    reader = io.StringIO(text).readline
    taken = {t.string for t in tokenize.generate_tokens(reader) if t.type == tokenize.NAME}
    fresh = (name for name in _short_names() if name not in taken)
    lines = [line.encode("utf-8") for line in text.splitlines(True)]
    edits = []
    mapping = {}
    for old in sorted(names, key=lambda n: (-len(uses.get(n, ())), n)):
        new = next(fresh)
        if len(new) >= len(old):
            continue
        mapping[old] = new
        node = defined[old]
        if isinstance(node, ast.FunctionDef):
            start = node.col_offset + len("def ")
            edits.append((node.lineno, start, start + len(old.encode()), old, new))
        for use in uses.get(old, ()):
            edits.append((use.lineno, use.col_offset, use.end_col_offset, old, new))
    for row, start, end, old, new in sorted(edits, reverse=True):
        line = lines[row - 1]
        if line[start:end] != old.encode():
            raise ValueError(f"rename_globals: line {row} has no {old!r} at column {start}")
        lines[row - 1] = line[:start] + new.encode() + line[end:]
    return b"".join(lines), mapping


def _word_char(c):
    """Whether c can continue a name or number (two such tokens need a space between them)."""
    return c.isalnum() or c == "_"


def _joined_literals(first, second):
    """One literal for two adjacent ones with the same prefix and the same single quote, or
    None: triple quotes, and a first literal ending in an octal escape (a digit after it would
    join the escape), are left alone."""
    pattern = r"([A-Za-z]*)([\"'])(.*)\2"
    a = re.fullmatch(pattern, first, re.DOTALL)
    b = re.fullmatch(pattern, second, re.DOTALL)
    if a is None or b is None or a[1].lower() != b[1].lower() or a[2] != b[2]:
        return None
    if a[3].startswith(a[2] * 2) or b[3].startswith(b[2] * 2) or re.search(r"\\[0-7]{1,2}$", a[3]):
        return None
    return first[:-1] + b[3] + second[-1]


class _Minifier:
    """Re-emits a token stream: no comments, docstrings or blank lines, one space per indent
    level, one logical line per statement, a space only where two tokens would otherwise merge,
    trailing commas dropped where that cannot change a tuple. f-strings are copied as written
    (Python 3.12 splits them into several tokens)."""

    def __init__(self, text, docstrings):
        import io
        import tokenize

        self.tokenize = tokenize
        self.lines = text.splitlines(True)
        self.docstrings = docstrings
        self.tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        self.out = []
        self.line = []
        self.kinds = []  # the token type of each piece of self.line
        self.brackets = []  # [opener, whether a call or subscript, top-level commas]

    def span(self, start, end):
        """The source text from one (row, col) to another, as written."""
        (r0, c0), (r1, c1) = start, end
        if r0 == r1:
            return self.lines[r0 - 1][c0:c1]
        middle = "".join(self.lines[r0 : r1 - 1])
        return self.lines[r0 - 1][c0:] + middle + self.lines[r1 - 1][:c1]

    def emit(self, text, kind):
        tok = self.tokenize
        if self.line and kind == tok.STRING and self.kinds[-1] == tok.STRING:
            merged = _joined_literals(self.line[-1], text)
            if merged is not None:  # "ab" "cd" -> "abcd": implicit concatenation done here
                self.line[-1] = merged
                return
        if self.line:
            prev = self.line[-1]
            prev_kind = self.kinds[-1]
            joins = _word_char(prev[-1]) or prev_kind in (tok.NUMBER, tok.STRING)
            starts = _word_char(text[0]) or (prev_kind == tok.NUMBER and text[0] == ".")
            if joins and starts:
                self.line.append(" ")
                self.kinds.append(None)
        if text in ("(", "[", "{"):
            self.brackets.append([text, text != "{" and self._after_callee(), 0])
        elif text in (")", "]", "}") and self.brackets:
            opener, call, commas = self.brackets.pop()
            # a set, dict, call or a tuple of two or more stays what it is without a trailing comma
            droppable = opener == "{" or commas >= 2 or (call and opener == "(")
            if self.line and self.line[-1] == "," and droppable:
                self.line.pop()
                self.kinds.pop()
        elif text == "," and self.brackets:
            self.brackets[-1][2] += 1
        self.line.append(text)
        self.kinds.append(kind)

    def _after_callee(self):
        """Whether the bracket being opened calls or subscripts what precedes it (a name that is
        not a keyword, or a closing bracket), rather than starting a tuple, list or group."""
        import keyword

        prev = next((p for p in reversed(self.line) if p != " "), "")
        if prev in (")", "]"):
            return True
        soft = prev in ("match", "case", "type", "_")
        return (
            _word_char(prev[-1:])
            and not prev[0].isdigit()
            and not soft
            and not keyword.iskeyword(prev)
        )

    def run(self, depth=0):
        tok = self.tokenize
        skip = False
        fstring_from = None
        fstring_depth = 0
        for t in self.tokens:
            if t.type == tok.COMMENT:
                if t.string.strip() == COMPACT_OMIT_BEGIN:
                    skip = True
                elif t.string.strip() == COMPACT_OMIT_END:
                    skip = False
                continue
            if skip:
                continue
            name = tok.tok_name[t.type]
            if name == "FSTRING_START":
                if fstring_depth == 0:
                    fstring_from = t.start
                fstring_depth += 1
                continue
            if name == "FSTRING_END":
                fstring_depth -= 1
                if fstring_depth == 0:
                    self.emit(self.span(fstring_from, t.end), tok.STRING)
                continue
            if fstring_depth:
                continue
            if t.type == tok.INDENT:
                depth += 1
            elif t.type == tok.DEDENT:
                depth -= 1
            elif t.type == tok.NEWLINE:
                if self.line:
                    self.out.append(" " * depth + "".join(self.line))
                self.line = []
                self.kinds = []
            elif t.type == tok.STRING and not self.line and t.start in self.docstrings:
                if self.docstrings[t.start]:
                    self.emit("0", tok.NUMBER)
            elif t.type not in (tok.NL, tok.ENCODING, tok.ENDMARKER):
                self.emit(self.span(t.start, t.end), t.type)
        return "\n".join(self.out) + "\n"


def minify_source(source):
    """The minified form of a readable script (bytes): rename_locals, then _Minifier; the code
    between the omit markers is left out. Deterministic, and checked to compile."""
    import ast

    renamed = rename_globals(rename_locals(source)).decode("utf-8")
    text = _Minifier(renamed, _docstring_starts(ast.parse(renamed))).run()
    compile(text, "<minified>", "exec")
    return text.encode("utf-8")


# name: (import line, decompress expression) of the back ends a compact form may use.
COMPACT_CODECS = {
    "brotli": (b"import brotli,linecache,os\n", b"brotli.decompress"),
    "lzma": (b"import linecache,lzma,os\n", b"lzma.decompress"),
}


def _compact_pack(data, codec):
    if codec == "brotli":
        return brotli.compress(data, quality=11, lgwin=24)
    return lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=9 | lzma.PRESET_EXTREME
    )


def _compact_unpack(data, codec):
    if codec == "brotli":
        return _brotli_bounded(data, COMPACT_MAX_SOURCE)
    return _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), data, COMPACT_MAX_SOURCE)


# The compressed source is written as a number in base 253, one latin-1 character per digit: every
# byte value but NUL (not allowed in source), carriage return (read as a newline) and backslash
# (an escape). That costs 0.3%, where escaping those three bytes cost 1.2%. Decoding it is one
# line of the wrapper (Horner's rule, about a second on a slow CPU).
COMPACT_DIGITS = bytes(c for c in range(256) if c not in (0x00, 0x0D, 0x5C))
COMPACT_DECODE = b"_c-(_c>0)-(_c>13)-(_c>92)"  # COMPACT_DIGITS.index(_c), as the wrapper spells it


def _base253_literal(data):
    """data as the body of a \"\"\"...\"\"\" literal: the big-endian number it spells, in base
    253 digits drawn from COMPACT_DIGITS, with a quote that another quote follows (or that ends
    the literal) escaped."""
    n = int.from_bytes(data, "big")
    digits = []
    chunk = 253**16
    while n:  # 16 digits per long division: linear in the length, not quadratic
        n, part = divmod(n, chunk)
        for _ in range(16):
            part, d = divmod(part, 253)
            digits.append(d)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
    text = bytes(COMPACT_DIGITS[d] for d in reversed(digits or [0]))
    return re.sub(rb'"(?="|\Z)', rb'\\"', text)


def _base253_value(digits, size):
    """The `size` bytes a base-253 literal's characters (latin-1 encoded) spell; ValueError for
    a character outside COMPACT_DIGITS or more digits than `size` bytes need. Split in halves
    (value = high * 253^len(low) + low), so a long literal does not take quadratic time."""
    if len(digits) > size * 8 / math.log2(253) + 2:
        raise ValueError("compact form: its literal is longer than the bytes it declares")
    table = np.full(256, -1, np.int64)
    table[np.frombuffer(COMPACT_DIGITS, np.uint8)] = np.arange(253)
    values = table[np.frombuffer(digits, np.uint8)].tolist()
    if min(values, default=0) < 0:
        raise ValueError("compact form: its literal has a character outside the digits")
    powers = {}

    def value(lo, hi):
        if hi - lo <= 64:
            n = 0
            for d in values[lo:hi]:
                n = n * 253 + d
            return n
        mid = (lo + hi) // 2
        if hi - mid not in powers:
            powers[hi - mid] = 253 ** (hi - mid)
        return value(lo, mid) * powers[hi - mid] + value(mid, hi)

    try:
        return value(0, len(values)).to_bytes(size, "big")
    except OverflowError:
        raise ValueError("compact form: its literal spells more bytes than it declares") from None


def _compact_wrapper(literal, size, codec, readable_sha, readable_bytes, name):
    import_line, decompress = COMPACT_CODECS[codec]
    return b"".join(
        [
            b"# coding: latin-1\n",
            import_line,
            b'_D="""' + literal + b'"""\n',
            b'READABLE_SHA256="' + readable_sha.encode() + b'"\n',
            b"READABLE_BYTES=" + str(readable_bytes).encode() + b"\n",
            b"COMPACT_PATH=os.path.abspath(__file__)\n",
            b"__file__=os.path.join(os.path.dirname(COMPACT_PATH)," + repr(name).encode() + b")\n",
            b"_N=0\n",
            b'for _c in _D.encode("latin-1"):_N=_N*253+' + COMPACT_DECODE + b"\n",
            b"RUNNING_SOURCE=" + decompress + b"(_N.to_bytes(" + str(size).encode(),
            b',"big")).decode()\n',
            b"_S=RUNNING_SOURCE\n",
            b"linecache.cache[__file__]=(len(_S),None,_S.splitlines(True),__file__)\n",
            b'exec(compile(_S,__file__,"exec"))\n',
        ]
    )


def compact_code(source, name):
    """The compact form of the readable script `source` (bytes) named `name`: its minified form
    compressed by Brotli where installed (smaller on source code), else LZMA."""
    if not valid_script_name(name):
        raise ValueError(f"compact_code name {name!r}: expected a bare .py file name")
    codec = "lzma" if brotli is None else "brotli"
    packed = _compact_pack(minify_source(source), codec)
    literal = _base253_literal(packed)
    return _compact_wrapper(literal, len(packed), codec, sha256_hex(source), len(source), name)


def expand_compact(blob):
    """(minified source, readable sha256, readable bytes, script name) of a compact form, read
    without running it: the literal is parsed by ast.literal_eval and decoded as the wrapper
    would, and the file must be exactly the wrapper around it. ValueError for anything else."""
    import ast

    m = re.fullmatch(
        rb"# coding: latin-1\nimport (brotli,linecache,os|linecache,lzma,os)\n"
        rb'_D=(""".*?""")\nREADABLE_SHA256="([0-9a-f]{64})"\n'
        rb"READABLE_BYTES=([0-9]{1,9})\nCOMPACT_PATH=.*\n__file__=os\.path\.join\(os\.path\."
        rb"dirname\(COMPACT_PATH\),('[A-Za-z0-9_.-]{1,128}')\)\n.*\.to_bytes\(([0-9]{1,9}),.*",
        blob,
        re.DOTALL,
    )
    if m is None:
        raise ValueError("not a compact form of a training script (its wrapper differs)")
    codec = "brotli" if m[1].startswith(b"brotli") else "lzma"
    if codec == "brotli" and brotli is None:
        raise ValueError("compact form: it is Brotli-compressed and brotli is not installed")
    digits = ast.literal_eval(m[2].decode("latin-1")).encode("latin-1")
    readable_sha = m[3].decode()
    readable_bytes = int(m[4])
    name = ast.literal_eval(m[5].decode("ascii"))
    size = int(m[6])
    if size > COMPACT_MAX_SOURCE:
        raise ValueError(f"compact form: {size} compressed bytes is more than a script")
    packed = _base253_value(digits, size)
    literal = _base253_literal(packed)
    if _compact_wrapper(literal, size, codec, readable_sha, readable_bytes, name) != blob:
        raise ValueError("compact form: the wrapper around its source differs from ours")
    try:
        source = _compact_unpack(packed, codec)
    except Exception as exc:
        raise ValueError(f"compact form: its source does not decompress ({exc})") from None
    return source, readable_sha, readable_bytes, name


def check_compact(blob, readable, name):
    """ValueError unless `blob` is a compact form of exactly `readable` (bytes) named `name`:
    the sha256 and size it binds are the readable file's, and its source is the minified form
    of that file, re-derived here."""
    source, readable_sha, readable_bytes, inner = expand_compact(blob)
    if inner != name:
        raise ValueError(f"compact form runs as {inner!r}, not {name!r}")
    if readable_sha != sha256_hex(readable) or readable_bytes != len(readable):
        raise ValueError(f"compact form binds another {name} (sha256 {readable_sha})")
    if source != minify_source(readable):
        raise ValueError(f"compact form: its source is not the minified form of {name}")


# compact form: omit to here


def _header_sha256(header):
    """sha256 of the canonical header JSON without its own checksum: header bit flips are caught."""
    body = json.dumps(
        {k: v for k, v in header.items() if k != "header_sha256"},
        sort_keys=True,
        separators=(",", ":"),
    )
    return sha256_hex(body.encode("utf-8"))


def _artifact_prefix_and_head(header, packed=False):
    """The bytes before the payload: version 1 with the header as JSON, or (packed) version 2
    with its sha256 and the compressed JSON."""
    head = json.dumps(
        {**header, "header_sha256": _header_sha256(header)}, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")
    if not packed:
        return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(head)) + head
    stored = _pack_head(head)
    version = ARTIFACT_VERSION_PACKED_HEADER
    digest = hashlib.sha256(stored).digest()
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, version, len(stored)) + digest + stored


def write_artifact(path, header, payload, packed=False):
    return write_bytes_atomic(path, _artifact_prefix_and_head(header, packed) + payload)


# --- reading an artifact: every header field is checked before anything is allocated or run ---

ARTIFACT_MAX_RAW_BYTES = 1 << 30  # the most any payload may inflate to (a 16 MB artifact: ~30 MB)
ARTIFACT_MAX_TENSORS = 65536
ARTIFACT_MAX_RANK = 8
ZSTD_MAX_WINDOW = 1 << 27  # zstd -22 uses at most a 128 MiB window
LZMA_MEMLIMIT = 1 << 28  # preset 9e needs ~65 MiB to decode
# dtype name in the header -> (torch dtype, numpy dtype of a "raw" tensor or None for float dtypes)
ARTIFACT_DTYPES = {
    "float32": (torch.float32, None),
    "float16": (torch.float16, None),
    "bfloat16": (torch.bfloat16, None),
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "int16": (torch.int16, np.int16),
    "int8": (torch.int8, np.int8),
    "uint8": (torch.uint8, np.uint8),
    "bool": (torch.bool, np.bool_),
}
_HEX = frozenset("0123456789abcdef")


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _is_count(value):
    """A non-negative int (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def valid_script_name(name):
    """A bare training-script file name: no folder, no '..', ends in .py."""
    if not isinstance(name, str) or not name.endswith(".py") or len(name) > 128:
        return False
    if ".." in name or name.startswith("."):
        return False
    return all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)


# LQER parts of a corrected int tensor: numpy dtype of each
LQER_PARTS = {
    "lqer_a": np.int8,
    "lqer_a_scale": np.float16,
    "lqer_b": np.int8,
    "lqer_b_scale": np.float16,
}
ENTRY_PARTS = ("data", "scale", *LQER_PARTS)  # the byte spans an entry may have, in payload order
LQER_MAX_RANK = 64
LQER_MAX_GROUP = 4096


def _entry_parts(e, scheme, numel):
    """{part: expected byte length} of one tensor entry (lqer_rank / lqer_group already
    checked)."""
    if scheme is None:
        itemsize = np.dtype(ARTIFACT_DTYPES[e["dtype"]][1]).itemsize
        return {"data": numel * itemsize}
    if scheme.is_int:
        parts = {"data": numel, "scale": 2 * e["shape"][0]}
        if "lqer_rank" in e:
            rows, cols = e["shape"]
            rank = e["lqer_rank"]
            parts["lqer_a"] = rows * rank
            parts["lqer_a_scale"] = 2
            parts["lqer_b"] = rank * cols
            parts["lqer_b_scale"] = 2 * rank * (-(-cols // e["lqer_group"]))
        return parts
    return {"data": numel * scheme.bits // 8}


def _check_entry(path, i, e, names):
    """The byte spans [(offset, length, what)] of one valid tensor entry; ValueError otherwise."""
    where = f"{path}: artifact header tensors[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{where}: expected an object, got {type(e).__name__}")  # noqa: TRY004
    name = e.get("name")
    if not isinstance(name, str) or not name or len(name) > 256 or name in names:
        raise ValueError(f"{where}.name {name!r}: expected a new non-empty tensor name")
    names.add(name)
    where = f"{path}: artifact header tensor {name[:80]!r}"
    dtype = e.get("dtype")
    if not isinstance(dtype, str) or dtype not in ARTIFACT_DTYPES:
        raise ValueError(
            f"{where}: dtype {str(dtype)[:40]!r} is not one of {', '.join(ARTIFACT_DTYPES)}"
        )
    shape = e.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > ARTIFACT_MAX_RANK
        or not all(_is_count(n) for n in shape)
    ):
        raise ValueError(
            f"{where}: shape {str(shape)[:80]}: expected at most {ARTIFACT_MAX_RANK} "
            "non-negative integers"
        )
    numel = math.prod(shape)
    if numel > ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"{where}: shape {shape} holds {numel} elements, beyond the ceiling")
    text = e.get("scheme")
    if not isinstance(text, str):
        raise ValueError(f"{where}: scheme {str(text)[:40]!r}: expected text")
    if text == "raw":
        scheme = None
        if ARTIFACT_DTYPES[dtype][1] is None:
            raise ValueError(f"{where}: scheme 'raw' is for integer tensors, not {dtype}")
    else:
        try:
            scheme = QuantScheme.parse(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if ARTIFACT_DTYPES[dtype][1] is not None:
            raise ValueError(f"{where}: scheme {text!r} is for float tensors, not {dtype}")
        if scheme.is_int and len(shape) != 2:
            raise ValueError(f"{where}: scheme {text!r} needs a 2-D shape, got {shape}")
    if "lqer_rank" in e or "lqer_group" in e:
        rank = e.get("lqer_rank")
        group = e.get("lqer_group")
        if scheme is None or not scheme.is_int:
            raise ValueError(f"{where}: LQER factors on a tensor that is not int-k ({text})")
        if not (_is_count(rank) and 1 <= rank <= LQER_MAX_RANK):
            raise ValueError(f"{where}: lqer_rank {str(rank)[:40]}: expected 1..{LQER_MAX_RANK}")
        if not (_is_count(group) and 1 <= group <= LQER_MAX_GROUP):
            raise ValueError(f"{where}: lqer_group {str(group)[:40]}: expected 1..{LQER_MAX_GROUP}")
    parts = _entry_parts(e, scheme, numel)
    extra = set(ENTRY_PARTS) - set(parts)
    if any(k in e for k in extra):
        raise ValueError(f"{where}: unexpected {sorted(k for k in extra if k in e)} for {text}")
    spans = []
    for part, want in parts.items():
        span = e.get(part)
        if not (isinstance(span, list) and len(span) == 2 and all(_is_count(v) for v in span)):
            raise ValueError(f"{where}.{part} {str(span)[:80]}: expected [offset, length]")
        if span[1] != want:
            raise ValueError(
                f"{where}.{part}: length {span[1]}, but shape {shape} as {text} needs {want}"
            )
        spans.append((span[0], span[1], f"{name[:80]!r}.{part}"))
    return spans


def check_artifact_header(path, header, payload_bytes):
    """ValueError naming the file and the field for anything a reader should not act on: the
    checksum is mandatory, then every field is checked (see DESIGN.md, Artifact)."""
    if not isinstance(header, dict) or "tensors" not in header or "payload_sha256" not in header:
        raise ValueError(f"{path}: artifact header lacks its tensor table")
    if "header_sha256" not in header:
        raise ValueError(f"{path}: artifact header has no header_sha256 (it is mandatory)")
    if header["header_sha256"] != _header_sha256(header):
        raise ValueError(
            f"{path}: header is corrupted (its sha256 differs from the one it records)"
        )
    if header.get("format") != "pgolf-artifact":
        raise ValueError(f"{path}: artifact header format {header.get('format')!r}")
    if not valid_script_name(header.get("script")):
        raise ValueError(
            f"{path}: artifact header script {str(header.get('script'))[:80]!r}: expected a bare "
            "file name ending in .py"
        )
    if "code_sha256" in header and not (
        _is_sha256(header["code_sha256"]) and _is_count(header.get("code_bytes"))
    ):
        raise ValueError(f"{path}: artifact header code_sha256 / code_bytes: bad values")
    for key in ("script_sha256", "payload_sha256"):
        if not _is_sha256(header.get(key)):
            raise ValueError(f"{path}: artifact header {key}: expected 64 lowercase hex digits")
    if header.get("tokenizer_sha256") is not None and not _is_sha256(header["tokenizer_sha256"]):
        raise ValueError(f"{path}: artifact header tokenizer_sha256: expected 64 hex digits")
    name = header.get("compressor")
    if name == "pergroup":
        pass  # its groups are checked against the tensor entries below
    elif "groups" in header:
        raise ValueError(f"{path}: artifact header groups given for compressor {name!r}")
    elif name not in COMPRESSORS or (name == "zstd" and zstandard is None):
        raise ValueError(
            f"{path}: compressor {str(name)[:40]!r} is unknown or not installed "
            "(zstd needs zstandard)"
        )
    raw_bytes = header.get("raw_bytes")
    if not _is_count(raw_bytes) or raw_bytes > ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(
            f"{path}: artifact header raw_bytes {str(raw_bytes)[:40]}: expected an integer in "
            f"[0, {ARTIFACT_MAX_RAW_BYTES}]"
        )
    if header.get("payload_bytes") != payload_bytes:
        raise ValueError(
            f"{path}: payload is truncated or corrupted ({payload_bytes} bytes after the header, "
            f"the header says {str(header.get('payload_bytes'))[:40]})"
        )
    if not isinstance(header.get("hparams"), dict):
        raise ValueError(f"{path}: artifact header hparams: expected an object")  # noqa: TRY004
    tensors = header["tensors"]
    if not isinstance(tensors, list) or len(tensors) > ARTIFACT_MAX_TENSORS:
        raise ValueError(
            f"{path}: artifact header tensors: expected a list of at most "
            f"{ARTIFACT_MAX_TENSORS} entries"
        )
    names = set()
    spans = []
    for i, e in enumerate(tensors):
        spans += _check_entry(path, i, e, names)
    end = 0
    for offset, length, what in sorted(spans):
        if offset < end:
            raise ValueError(f"{path}: artifact header {what} overlaps the tensor before it")
        end = offset + length
        if end > raw_bytes:
            raise ValueError(
                f"{path}: artifact header {what} ends at {end}, beyond raw_bytes {raw_bytes}"
            )
    if sum(length for _, length, _ in spans) != raw_bytes:
        raise ValueError(
            f"{path}: artifact header raw_bytes {raw_bytes} is not the "
            f"{sum(length for _, length, _ in spans)} bytes its tensor shapes imply"
        )
    if name == "pergroup":
        _check_groups(path, header, tensors, payload_bytes)


def artifact_hparams(path, header):
    """The header's hyperparameters through the checks of Hyperparameters.from_env: only this
    script's fields (run-only ones excluded), each of its declared type, then validate()."""
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    values = {}
    for key, value in header["hparams"].items():
        f = fields.get(key)
        if f is None or key in RUN_ONLY_FIELDS:
            raise ValueError(
                f"{path}: artifact header hparams.{str(key)[:60]}: not a field this script reads"
            )
        kind = f.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and kind is float and not math.isfinite(value):
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: artifact header hparams.{key} {str(value)[:40]!r}: expected a finite "
                f"{kind.__name__}"
            )
        values[key] = value
    if values.get("preset", "record") not in PRESETS:
        raise ValueError(f"{path}: artifact header hparams.preset {values['preset']!r} is unknown")
    try:
        h = Hyperparameters(**values)
        h.validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: artifact header hparams: {exc}") from None
    return h


def read_artifact_header(path):
    """(header, payload offset) of a checked header (check_artifact_header). ValueError naming the
    file for anything else."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(ARTIFACT_PREFIX.size)
        if len(prefix) < ARTIFACT_PREFIX.size:
            raise ValueError(f"{path}: {size} bytes is too short to be an artifact")
        magic, version, head_len = ARTIFACT_PREFIX.unpack(prefix)
        if magic != ARTIFACT_MAGIC:
            raise ValueError(f"{path}: not a Parameter Golf artifact (magic {magic!r})")
        if version not in (ARTIFACT_VERSION, ARTIFACT_VERSION_PACKED_HEADER):
            raise ValueError(
                f"{path}: artifact format version {version}, this script reads "
                f"{ARTIFACT_VERSION} and {ARTIFACT_VERSION_PACKED_HEADER}"
            )
        digest_len = 32 if version == ARTIFACT_VERSION_PACKED_HEADER else 0
        if head_len + digest_len > min(MAX_HEADER_BYTES, size - ARTIFACT_PREFIX.size):
            raise ValueError(f"{path}: truncated or corrupt header (declares {head_len} bytes)")
        digest = f.read(digest_len)
        head = f.read(head_len)
        if digest_len:
            if hashlib.sha256(head).digest() != digest:
                raise ValueError(
                    f"{path}: header is corrupted (its sha256 differs from the one it records)"
                )
            head = _unpack_head(path, head)
        try:
            header = json.loads(head.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: corrupt artifact header ({why})") from None
    offset = ARTIFACT_PREFIX.size + digest_len + head_len
    check_artifact_header(path, header, size - offset)
    return header, offset


def read_artifact(path):
    """(checked header, decompressed payload): the payload's length and sha256 are the header's,
    and it inflates, streamed, to exactly raw_bytes (never beyond)."""
    header, offset = read_artifact_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        payload = f.read(header["payload_bytes"] + 1)
    if len(payload) != header["payload_bytes"] or sha256_hex(payload) != header["payload_sha256"]:
        raise ValueError(
            f"{path}: payload is truncated or corrupted (sha256 or length differs from the header)"
        )
    try:
        if header["compressor"] == "pergroup":
            raw = decompress_pergroup(header, payload)
        else:
            raw = COMPRESSORS[header["compressor"]][1](payload, header["raw_bytes"])
    except Exception as exc:  # zlib.error, lzma.LZMAError, ValueError, zstandard's own error type
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: payload does not decompress ({why})") from None
    if len(raw) != header["raw_bytes"]:
        raise ValueError(
            f"{path}: payload inflates to {len(raw)} bytes, header says {header['raw_bytes']}"
        )
    return header, raw


def artifact_state(model):
    """The state that ships: training-only heads (prefixes listed by the model) are left out."""
    drop = tuple(model_hook(model, "training_only_prefixes") or ())
    return {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}


def save_artifact(model, h, path, state=None, hessians=None):
    """Quantize (GPTQ for tensors with a Hessian), compress, write; returns the byte accounting.
    BIT_ALLOC: plan widths, measure the compression ratio, re-plan until the total fits and uses
    >= 99% of SIZE_BUDGET - SIZE_MARGIN (at most 4 tries; the largest fitting one is written)."""
    state = artifact_state(model) if state is None else state
    code = counted_code(h)
    cache = {}
    group_cache = {}  # per-group streams already compressed, by content
    ratio = 1.0  # compressed bytes per estimated byte, measured after each try
    compressor = h.compressor  # "auto" picks on the first try; later tries keep the winner
    plan = None
    tries = []  # (total bytes, header, payload, plan)
    table = width_table(state, h, hessians, cache) if h.bit_alloc else None
    progress = Progress("serialize", 4 if h.bit_alloc else 1, state="serializing")
    for _ in range(4 if h.bit_alloc else 1):
        progress.advance()
        if h.bit_alloc:
            previous = plan
            plan = plan_bits(state, h, len(code), hessians, table, ratio)
            if plan == previous:
                break
        widths = {r["name"]: r["bits"] for r in plan or []}
        entries, raw = quantize_state_dict(state, h, widths, hessians, cache)
        compressor, payload, groups = compress_artifact(entries, raw, compressor, h, group_cache)
        header = _artifact_header(h, code, compressor, raw, payload, entries, groups)
        head_bytes = len(_artifact_prefix_and_head(header, h.header_compress))
        total = head_bytes + len(payload) + len(code)
        tries.append((total, header, payload, plan))
        target = 0.99 * (h.size_budget - h.size_margin)
        if not h.bit_alloc or h.size_budget >= total >= target:
            break
        planned_bytes = max(sum(r["bytes"] for r in plan), 1)
        ratio *= (total - _fixed_bytes(state, h, len(code))) / planned_bytes
    progress.close()
    fitting = [t for t in tries if t[0] <= h.size_budget]
    if fitting:
        _, header, payload, plan = max(fitting, key=lambda t: t[0])
    else:
        _, header, payload, plan = min(tries, key=lambda t: t[0])
    artifact_bytes = write_artifact(path, header, payload, h.header_compress)
    return {
        "artifact_bytes": artifact_bytes,
        "header_bytes": artifact_bytes - len(payload),
        "code_bytes": len(code),
        "code_bytes_readable": readable_size(),
        "groups": group_table(header),
        "total_bytes": artifact_bytes + len(code),
        "payload_bytes": len(payload),
        "raw_bytes": header["raw_bytes"],
        "compressor": header["compressor"],
        "budget_bytes": h.size_budget,
        "margin_bytes": h.size_budget - artifact_bytes - len(code),
        "plan": plan,
        "tries": len(tries),
    }


def compress_artifact(entries, raw, compressor, h, group_cache=None):
    """(compressor name, payload, groups or None). "auto": per-group from PERGROUP_AUTO_MIN_RAW
    raw bytes (it picks the best back end for every group, so the whole-payload compressors are
    not run too), below that the smallest single stream."""
    if compressor == "auto" and len(raw) >= PERGROUP_AUTO_MIN_RAW:
        compressor = "pergroup"
    if compressor == "pergroup":
        payload, groups = compress_pergroup(entries, raw, group_cache, h.pergroup_sort)
        return "pergroup", payload, groups
    name, payload = compress_payload(raw, compressor, h.zstd_level)
    return name, payload, None


def group_table(header):
    """[{name, codec, sorted, raw_bytes, bytes}] of a per-group header ([] for one stream)."""
    if header.get("compressor") != "pergroup":
        return []
    members = dict(payload_groups(header["tensors"]))
    rows = []
    for g in header["groups"]:
        if g["name"] == "order":
            raw = sum(
                2 * header["tensors"][i]["shape"][0]
                for grp in header["groups"]
                if grp["sorted"]
                for i, part in members[grp["name"]]
                if _sortable(header["tensors"][i], part)
            )
        else:
            raw = sum(header["tensors"][i][part][1] for i, part in members[g["name"]])
        rows.append({**g, "raw_bytes": raw})
    return rows


def _artifact_header(h, code, compressor, raw, payload, entries, groups=None):
    """Everything a reader needs to rebuild the model from the payload, and to check it. The
    script binding is the readable source's sha256; code_sha256 / code_bytes are those of the
    counted code (the compact form under CODE_FORM=compact)."""
    has_tokenizer = os.path.isfile(h.tokenizer_path)
    extra = {} if groups is None else {"groups": groups}
    return {
        **extra,
        "code_sha256": sha256_hex(code),
        "code_bytes": len(code),
        "format": "pgolf-artifact",
        "script": os.path.basename(CODE_PATH),
        "script_sha256": readable_sha256(),
        "tokenizer_sha256": file_sha256(h.tokenizer_path) if has_tokenizer else None,
        "hparams": {k: v for k, v in dataclasses.asdict(h).items() if k not in RUN_ONLY_FIELDS},
        "vocab_size": h.vocab_size,
        "compressor": compressor,
        "raw_bytes": len(raw),
        "payload_bytes": len(payload),
        "payload_sha256": sha256_hex(payload),
        "tensors": entries,
    }


def load_artifact(path, allow_script_mismatch=False):
    """The dequantized model (on CPU, eval mode) and its hyperparameters, from the bytes on disk.
    The header, the script binding and the hyperparameters are checked before the payload is read
    or the model allocated."""
    header, _ = read_artifact_header(path)
    own_sha = readable_sha256()
    if header["script_sha256"] != own_sha and not allow_script_mismatch:
        raise ValueError(
            f"{path}: written by {header['script']} sha256 {header['script_sha256']}, "
            f"not by this script ({os.path.basename(CODE_PATH)} sha256 {own_sha})"
        )
    h = artifact_hparams(path, header)
    header, raw = read_artifact(path)
    model = build_model(h)
    state = dequantize_entries(header["tensors"], raw)
    missing = [k for k in artifact_state(model) if k not in state]
    if missing:
        raise ValueError(f"{path}: artifact lacks tensors {missing[:4]} of the model it names")
    model.load_state_dict(state, strict=not model_hook(model, "training_only_prefixes"))
    return model.eval(), h


# ===== END SHARED BLOCK: quant v1 =====

# ===== BEGIN SHARED BLOCK: eval v1 =====
# Evaluation. Every mode scores per-token NLL with a full softmax over the vocabulary, sums in
# float64, counts bytes with the lookup tables and all-reduces. Standard: non-overlapping
# TRAIN_SEQ_LEN windows (the baseline). Sliding (PR #50): windows every EVAL_STRIDE tokens, each
# target scored once, in the first window that holds it. Score-first TTT (PR #461/#549): windows
# grouped in chunks; a chunk is scored under inference mode, then trained on; the last chunk never
# is. Sliding is TTT without training, so the two share one code path and agree exactly at TTT_LR=0.
# The score-first audit is built from what the code did, not from what it meant to do: the scorer
# counts every target it scores (coverage), and the TTT trainer sees the val tokens only through a
# RecordedTokens view that logs every position it reads.
# EVAL_MODES is the one registry of the modes (name -> function and final log label) that the
# scripts, eval_bpb.py and pack.py read. The causality audit (RULES.md C1) runs on any model with
# `forward_logits`.


def _dist_info():
    return (
        (dist.get_rank(), dist.get_world_size())
        if dist.is_available() and dist.is_initialized()
        else (0, 1)
    )


def _model_device(model):
    return next(model.parameters()).device


def _autocast(device):  # bf16 on CUDA, plain fp32 on CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def token_nll(model, x, y):
    """Per-token NLL (fp32) under the full softmax of `forward_logits`."""
    with _autocast(x.device):
        logits = model.forward_logits(x)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
    ).view_as(y)


def _eval_result(sums, t0, mode, **extra):
    nll, tokens, nbytes = (float(v) for v in sums.tolist())
    return {
        "mode": mode,
        "val_loss": nll / tokens,
        "val_bpb": nll / (math.log(2) * nbytes),
        "tokens": int(tokens),
        "bytes": int(nbytes),
        "nll_sum": nll,
        "eval_time_ms": 1000.0 * (time.perf_counter() - t0),
        **extra,
    }


def eval_val(h, model, val_tokens, luts):
    """Standard eval: non-overlapping TRAIN_SEQ_LEN windows, this rank's share of them."""
    t0 = time.perf_counter()
    rank, world = _dist_info()
    device = _model_device(model)
    seq = h.train_seq_len
    n_seqs = (val_tokens.numel() - 1) // seq
    if n_seqs < 1:
        raise ValueError(
            f"val split has {val_tokens.numel()} tokens, shorter than TRAIN_SEQ_LEN={seq} + 1"
        )
    lo = n_seqs * rank // world
    hi = n_seqs * (rank + 1) // world
    batch = max(1, h.val_batch_size // (8 * seq))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, tokens, bytes
    was_training = model.training
    model.eval()
    progress = Progress("eval standard", hi - lo, state="evaluating")
    with torch.inference_mode():
        for s in range(lo, hi, batch):
            chunk = val_tokens[s * seq : min(s + batch, hi) * seq + 1].to(
                device=device, dtype=torch.int64
            )
            x = chunk[:-1].view(-1, seq)
            y = chunk[1:].view(-1, seq)
            positions = torch.arange(1, y.numel() + 1, device=device).view(-1, seq) + s * seq
            sums[0] += token_nll(model, x, y).double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts, positions).sum()
            progress.advance(min(s + batch, hi) - s)
    progress.close()
    model.train(was_training)
    dist_sum(sums)
    return _eval_result(sums, t0, "standard")


def sliding_windows(num_tokens, seq_len, stride):
    """Windows as (start, first scored target, last scored target) over tokens 0..num_tokens-1.
    Target j (1 <= j <= N-1) is scored in the first window holding it, with tokens start..j-1 as
    context."""
    n_targets = num_tokens - 1
    if n_targets < 1:
        raise ValueError(f"val split has {num_tokens} tokens: nothing to score")
    starts = np.arange(0, n_targets, stride, dtype=np.int64)
    firsts = np.where(starts == 0, 1, starts + seq_len - stride + 1)
    inside = firsts <= n_targets
    starts = starts[inside]
    firsts = firsts[inside]
    return starts, firsts, np.minimum(starts + seq_len, n_targets)


def _score_windows(model, tokens, windows, luts, batch, sums, coverage):
    """Score a list of (starts, firsts, lasts) windows, all on this rank, into sums; count every
    scored target in coverage. Returns the highest target position scored (-1 if none)."""
    device = sums.device
    top = torch.full((), -1, dtype=torch.int64, device=device)
    for i in range(0, len(windows[0]), batch):
        s, f, l = (w[i : i + batch] for w in windows)
        for length in np.unique(l - s):
            sel = (l - s) == length
            ws = torch.as_tensor(s[sel], device=device)
            win = tokens[ws[:, None] + torch.arange(int(length) + 1, device=device)[None, :]]
            x = win[:, :-1]
            y = win[:, 1:]
            pos = torch.arange(int(length), device=device)[None, :]
            mask = pos >= torch.as_tensor(f[sel], device=device)[:, None] - ws[:, None] - 1
            sums[0] += (token_nll(model, x, y).double() * mask).sum()
            sums[1] += mask.sum()
            positions = ws[:, None] + 1 + pos
            sums[2] += (target_bytes(x, y, luts, positions) * mask).sum()
            targets = positions[mask]
            coverage.index_add_(0, targets, torch.ones_like(targets, dtype=coverage.dtype))
            if targets.numel():
                top = torch.maximum(top, targets.max())
        Progress.advance_active(len(s))  # the windowed eval's progress, one call per batch
    return top


class RecordedTokens:
    """The TTT trainer's only view of the val tokens: `read(lo, hi)` gives tokens lo..hi-1 and
    records the span, so the score-first audit checks the positions actually read."""

    def __init__(self, tokens):
        self._tokens = tokens
        self._spans = []

    def __len__(self):
        return self._tokens.numel()

    def read(self, lo, hi):
        lo = int(lo)
        hi = int(hi)
        if not 0 <= lo <= hi <= self._tokens.numel():
            raise IndexError(f"val tokens {lo}..{hi - 1}: outside 0..{self._tokens.numel() - 1}")
        self._spans.append((lo, hi))
        return self._tokens[lo:hi]

    def take_reads(self):
        """(number of reads, highest position read or -1) since the last call."""
        spans = self._spans
        self._spans = []
        return len(spans), max((hi - 1 for lo, hi in spans if hi > lo), default=-1)


def ttt_train_range(chunk_index, chunk_tokens, scored_upto):
    """The val positions [lo, hi) the trainer may adapt on after scoring chunk `chunk_index`: the
    chunk's own tokens, never past the last scored target."""
    lo = chunk_index * chunk_tokens
    return lo, min(lo + chunk_tokens, scored_upto + 1)


def _windowed_eval(h, model, val_tokens, luts, train_chunks):
    """Sliding-window scoring in chunks of TTT_CHUNK_TOKENS; with train_chunks, score-first TTT."""
    t0 = time.perf_counter()
    rank, world = _dist_info()
    device = _model_device(model)
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    seq_len = h.eval_len
    stride = h.eval_stride
    chunk = h.ttt_chunk_tokens
    starts, firsts, lasts = sliding_windows(tokens.numel(), seq_len, stride)
    # firsts are sorted, so each chunk's windows are one contiguous range
    chunk_ids, bounds = np.unique(firsts // chunk, return_index=True)
    bounds = np.append(bounds, len(firsts))
    batch = max(1, h.val_batch_size // (8 * seq_len))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, tokens, bytes
    ledger = []  # score and update events, in order, for the score-first audit
    coverage = torch.zeros(tokens.numel(), dtype=torch.int32, device=device)
    trainer = _TTTTrainer(h, model, len(chunk_ids)) if train_chunks else None
    scorer = trainer.model if trainer else model
    view = RecordedTokens(tokens)
    scored_upto = -1
    progress = Progress(f"eval {'ttt' if train_chunks else 'sliding'}", len(starts) // world)
    for n, ci in enumerate(chunk_ids):
        sel = np.arange(bounds[n], bounds[n + 1])
        mine = sel[len(sel) * rank // world : len(sel) * (rank + 1) // world]
        scorer.eval()
        with torch.inference_mode():
            top = _score_windows(
                scorer,
                tokens,
                (starts[mine], firsts[mine], lasts[mine]),
                luts,
                batch,
                sums,
                coverage,
            )
        if trainer is not None and world > 1:
            top = dist_max(top.clone())
        scored_upto = max(scored_upto, int(top))  # what was scored, on every rank
        ledger.append({"event": "score", "chunk": int(ci), "scored_upto": scored_upto})
        if trainer is not None and n < len(chunk_ids) - 1:
            lo, hi = ttt_train_range(int(ci), chunk, scored_upto)
            for step in trainer.train_chunk(view, lo, hi, n):
                reads, max_read = view.take_reads()
                if world > 1:
                    max_read = int(dist_max(torch.tensor(max_read, device=device)))
                update = {"event": "update", "chunk": int(ci), "step": step, "reads": reads}
                ledger.append({**update, "max_target": max_read})
    progress.close()
    dist_sum(sums)
    dist_sum(coverage)
    return _eval_result(
        sums,
        t0,
        "ttt" if train_chunks else "sliding",
        chunks=len(chunk_ids),
        windows=len(starts),
        seq_len=seq_len,
        stride=stride,
        score_first=audit_score_first(ledger, coverage),
    )


def eval_val_sliding(h, model, val_tokens, luts):
    return _windowed_eval(h, model, val_tokens, luts, train_chunks=False)


def eval_val_ttt(h, model, val_tokens, luts):
    return _windowed_eval(h, model, val_tokens, luts, train_chunks=True)


class _TTTTrainer:
    """SGD with momentum on a copy of the model; lr cosine-decays over chunks; the first
    TTT_FREEZE_BLOCKS blocks stay fixed; gradients are the mean over the global batch of sequences
    (all ranks)."""

    def __init__(self, h, model, num_chunks):
        self.h = h
        self.num_chunks = num_chunks
        self.model = copy.deepcopy(model)
        self.steps = 0
        blocks = list(model_hook(self.model, "blocks") or [])
        frozen = {id(p) for b in blocks[: h.ttt_freeze_blocks] for p in b.parameters()}
        # Parameters the model itself keeps fixed (e.g. a fixed manifold) stay fixed here too.
        frozen |= {id(p) for p in self.model.parameters() if not p.requires_grad}
        self.params = [p for p in self.model.parameters() if id(p) not in frozen]
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        self.opt = torch.optim.SGD(self.params, lr=h.ttt_lr, momentum=h.ttt_momentum)

    def train_chunk(self, view, lo, hi, n):
        """Adapt on val positions lo..hi-1, read through `view` (a RecordedTokens); yields the
        running step count after each optimizer step."""
        h = self.h
        rank, world = _dist_info()
        seq = h.eval_len
        for g in self.opt.param_groups:  # cosine over the chunks
            g["lr"] = h.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * n / max(self.num_chunks - 1, 1)))
        n_seqs = (hi - lo - 1) // seq
        if n_seqs < 1:
            return
        self.model.train()
        for _ in range(h.ttt_epochs):
            for b0 in range(0, n_seqs, h.ttt_batch_seqs):
                ids = list(range(b0, min(b0 + h.ttt_batch_seqs, n_seqs)))
                mine = ids[rank::world]
                self.opt.zero_grad(set_to_none=False)
                if mine:
                    starts = [lo + i * seq for i in mine]
                    win = torch.stack([view.read(s, s + seq + 1) for s in starts])
                    nll = token_nll(self.model, win[:, :-1], win[:, 1:])
                    (nll.sum() / (len(ids) * seq)).backward()
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
    """C3 and C4 from what the evaluator did: every update read only positions already scored (its
    `max_target` is the highest position the trainer read through RecordedTokens; a score's
    `scored_upto` the highest target the scorer counted), and every target 1..N-1 was scored
    exactly once (`coverage`, counted by the scorer)."""
    scored_upto = 0
    failures = []
    updates = 0
    for entry in ledger:
        if entry["event"] == "score":
            scored_upto = max(scored_upto, entry["scored_upto"])
        elif entry["event"] == "update":
            updates += 1
            if entry["max_target"] > scored_upto:
                failures.append(
                    f"update {entry['step']} on chunk {entry['chunk']} used target "
                    f"{entry['max_target']} before it was scored (scored up to {scored_upto})"
                )
            if entry.get("unscored_reads"):  # per position, where documents run in parallel
                failures.append(
                    f"update {entry['step']} on chunk {entry['chunk']} read "
                    f"{entry['unscored_reads']} positions before they were scored"
                )
    counts = coverage[1:]
    twice = int((counts > 1).sum())
    missing = int((counts == 0).sum())
    failures += [
        msg
        for bad, msg in (
            (twice, f"{twice} targets scored more than once"),
            (missing, f"{missing} targets never scored"),
            (int(coverage[0]), "token 0 has no context and was scored"),
        )
        if bad
    ]
    return {
        "passed": not failures,
        "failures": failures[:5],
        "chunks_scored": sum(e["event"] == "score" for e in ledger),
        "updates": updates,
        "targets": int(counts.numel()),
        "scored_twice": twice,
        "never_scored": missing,
    }


def audit_causality(model, seq_len, vocab_size, batch=3, chunk=64, tol=1e-5, seed=0):
    """C1 and C2 on the model about to be scored, in eval mode and fp32: logits at positions <= p do
    not move when tokens after p change (several cuts), zero gradient from later embedding
    outputs (catches 1e-22 leaks such as a clamp after the mask), independent batch rows, and a
    full finite distribution over the vocabulary."""
    device = _model_device(model)
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    model.eval()

    def rand_tokens(*shape):
        return torch.randint(0, vocab_size, shape, generator=gen).to(device)

    def logits_of(x):
        with torch.no_grad():
            return model.forward_logits(x).float()

    failures = []
    max_diff = 0.0
    x = rand_tokens(batch, seq_len)
    base = logits_of(x)
    if base.shape != (batch, seq_len, vocab_size):
        failures.append(f"logits shape {tuple(base.shape)} is not (batch, seq, vocab={vocab_size})")
    elif not torch.isfinite(base).all():
        failures.append("logits are not all finite")
    elif (torch.softmax(base.double(), dim=-1).sum(-1) - 1).abs().max() > 1e-4:
        failures.append("softmax over the vocabulary does not sum to 1")
    cuts = sorted(
        {
            p
            for p in (0, 1, 2, chunk - 1, chunk, chunk + 1, seq_len // 2, seq_len - 2)
            if 0 <= p < seq_len - 1
        }
    )
    for p in cuts:
        for kind in ("suffix", "next"):
            x2 = x.clone()
            if kind == "suffix":
                x2[:, p + 1 :] = rand_tokens(batch, seq_len - p - 1)
            else:
                x2[:, p + 1] = (x2[:, p + 1] + 1 + rand_tokens(batch)) % vocab_size
            diff = (logits_of(x2)[:, : p + 1] - base[:, : p + 1]).abs().max().item()
            max_diff = max(max_diff, diff)
            if not diff <= tol:
                failures.append(
                    f"prefix: changing tokens after position {p} ({kind}) "
                    f"moved its logits by {diff:.3g}"
                )
    if batch > 1:
        others_changed = torch.cat([x[:1], rand_tokens(batch - 1, seq_len)])
        diff = (logits_of(others_changed)[0] - base[0]).abs().max().item()
        if not diff <= tol:
            failures.append(f"batch: changing other rows moved row 0 by {diff:.3g}")
    failures += _audit_jacobian(
        model, x, sorted({0, 1, seq_len // 2, seq_len - 2} & set(range(seq_len - 1)))
    )
    model.train(was_training)
    return {
        "passed": not failures,
        "failures": failures[:8],
        "seq_len": seq_len,
        "cuts": cuts,
        "max_prefix_diff": max_diff,
    }


def _audit_jacobian(model, x, positions):
    """Gradients of the logits at each position w.r.t. every embedding output: zero beyond it."""
    outputs = []

    def capture(module, inputs, out):
        if out.dim() >= 2 and tuple(out.shape[:2]) == tuple(x.shape):
            outputs.append(out.detach().requires_grad_(True))
            return outputs[-1]

    handles = [
        m.register_forward_hook(capture) for m in model.modules() if isinstance(m, nn.Embedding)
    ]
    try:
        with torch.enable_grad():
            logits = model.forward_logits(x).float()
    finally:
        for handle in handles:
            handle.remove()
    if not outputs:
        return ["jacobian: no embedding output found to differentiate through"]
    failures = []
    gen = torch.Generator().manual_seed(1)
    for i in positions:
        r = torch.randn(logits.shape[0], logits.shape[-1], generator=gen).to(logits.device)
        grads = torch.autograd.grad(
            (logits[:, i] * r).sum(), outputs, retain_graph=True, allow_unused=True
        )
        leak = max(
            (
                g[:, i + 1 :].abs().max().item()
                for g in grads
                if g is not None and g[:, i + 1 :].numel()
            ),
            default=0.0,
        )
        if leak != 0:
            failures.append(
                f"jacobian: position {i} depends on later inputs (max |grad| {leak:.3g})"
            )
    return failures


# --- Per-document LoRA TTT and phased global SGD (issue 16) ------------------------------------
# Batched per-document LoRA (#1530; rank 80, 48-token chunks, AdamW beta2 0.99 and weight decay
# 0.5 in #1855): the val stream is cut into documents at BOS; every document gets its own rank-r
# adapters on Q/K/V/O, the MLP and the head, reset to the same initial values at its start. A
# document is scored chunk by chunk: one forward of the chunk with up to EVAL_SEQ_LEN tokens of the
# document before it accumulates the chunk's loss, then one AdamW step trains the adapters on that
# same loss, so every chunk is scored by adapters that have seen only the chunks before it. Many
# documents share each forward (one batch row each). Phased global SGD (#1610 -> #1626 -> #1855):
# after the first TTT_PHASES documents (cumulative counts) are fully scored, scoring pauses and the
# base weights train by SGD on exactly the documents scored since the last pause; scoring goes on
# with the updated base. LoRA is applied by forward hooks on the model's own modules, so the TTT
# forward is the model's forward (SmearGate's BOS mask, gates, recurrence: all of it) and the two
# cannot drift (#1787 skipped a gate in a separate TTT forward and scored 1.908).


def ttt_lora_span(doc_lo, first, last, window):
    """The val positions [lo, hi) the LoRA trainer reads for the chunk of targets first..last of
    the document that starts at doc_lo: the chunk and up to `window` tokens of context before its
    last target, inside the document; never past the chunk's last target."""
    return max(doc_lo, last - window), last + 1


def ttt_phase_range(lo, last_target):
    """The val positions [lo, hi) the phase trainer reads: the documents scored since the last
    pause, from the first one's BOS to the last scored target."""
    return lo, last_target + 1


def ttt_phase_bounds(h):
    """TTT_PHASES as a sorted list of cumulative document counts."""
    try:
        counts = [int(s) for s in h.ttt_phases.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"TTT_PHASES={h.ttt_phases!r}: expected comma-separated document counts"
        ) from None
    if any(c <= 0 for c in counts) or counts != sorted(set(counts)):
        raise ValueError(f"TTT_PHASES={h.ttt_phases!r}: counts must be positive and increasing")
    return counts


def val_documents(tokens, bos_id=1):
    """Documents as (first token, first target, last target) rows of an int64 array: a document
    runs from its BOS to the next BOS, which is its last target (the end of the document is
    predicted from its own context), so targets 1..N-1 belong to exactly one document."""
    n = tokens.numel()
    starts = torch.nonzero(tokens == bos_id).flatten().cpu().numpy().astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    ends = np.minimum(np.append(starts[1:], n - 1), n - 1)
    docs = np.stack((starts, starts + 1, ends), axis=1)
    return docs[docs[:, 2] >= docs[:, 1]]


def lora_targets(model, head=True):
    """{name: module} to adapt: the model's `lora_targets()` hook, else every nn.Linear under
    `blocks` (Q/K/V/O and the MLP) and an `lm_head` module. A tied head (F.linear on the
    embedding) has no module: its adapter sits on the module that feeds it, `final_norm`, as
    x <- x + x A B, i.e. the head's logits move by (x A B) W_emb^T, rank r."""
    hook = model_hook(model, "lora_targets")
    if hook is not None:
        return dict(hook())
    modules = dict(model.named_modules())
    found = {
        name: m
        for name, m in modules.items()
        if isinstance(m, nn.Linear) and (name.startswith("blocks.") or name == "lm_head")
    }
    if head and "lm_head" not in found and "final_norm" in modules:
        found["final_norm"] = modules["final_norm"]
    if not found:
        raise ValueError(
            "LoRA TTT: the model has no `lora_targets` hook and no nn.Linear in blocks"
        )
    return found


class LoraAdapters:
    """Rank-r adapters for up to `rows` documents on each target module, applied by forward hooks:
    an nn.Linear's output gains x A_b B_b (x its input), any other module's output y gains
    y A_b B_b, for batch row b. A starts at one shared random draw (so a document's adapters do
    not depend on its batch row), B at zero (so the model starts exactly as scored without TTT)."""

    def __init__(self, model, h, rows, device):
        self.h = h
        self.rows = rows
        self.device = device
        self.targets = lora_targets(model, h.ttt_lora_head)
        dims = self._dims(model, device)
        gen = torch.Generator().manual_seed(h.seed)
        r = h.ttt_lora_rank
        self.init_a = {
            name: ((torch.rand(d_in, r, generator=gen) * 2 - 1) / math.sqrt(d_in)).to(device)
            for name, (d_in, _) in dims.items()
        }
        self.dims = dims
        self.active = 0
        self.reset()

    def _dims(self, model, device):
        """(in, out) features per target; a forward on two tokens finds those of non-Linear
        modules."""
        dims = {}
        other = {}
        for name, m in self.targets.items():
            if isinstance(m, nn.Linear):
                dims[name] = (m.in_features, m.out_features)
            else:
                other[name] = m
        if other:

            def record(name):
                def hook(module, args, out):
                    dims.setdefault(name, (out.size(-1), out.size(-1)))

                return hook

            handles = [m.register_forward_hook(record(name)) for name, m in other.items()]
            try:
                with torch.no_grad():
                    model.forward_logits(torch.ones(1, 2, dtype=torch.int64, device=device))
            finally:
                for handle in handles:
                    handle.remove()
        return dims

    def reset(self):
        """Fresh adapters for every row (a new group of documents) and a fresh AdamW."""
        h = self.h
        self.a = {
            n: a[None].repeat(self.rows, 1, 1).requires_grad_(True) for n, a in self.init_a.items()
        }
        self.b = {
            n: torch.zeros(self.rows, h.ttt_lora_rank, d_out, device=self.device).requires_grad_(
                True
            )
            for n, (_, d_out) in self.dims.items()
        }
        self.opt = torch.optim.AdamW(
            [*self.a.values(), *self.b.values()],
            lr=h.ttt_lora_lr,
            betas=(h.ttt_lora_beta1, h.ttt_lora_beta2),
            weight_decay=h.ttt_lora_wd,
        )

    def _hook(self, name, linear):
        def add_delta(module, args, out):
            n = self.active
            x = args[0] if linear else out
            flat = x.reshape(n, -1, x.size(-1))
            a = self.a[name][:n].to(flat.dtype)
            b = self.b[name][:n].to(flat.dtype)
            return out + torch.bmm(torch.bmm(flat, a), b).reshape(out.shape).to(out.dtype)

        return add_delta

    @contextlib.contextmanager
    def applied(self, n_rows):
        """Hooks on while the first n_rows adapters serve a batch of n_rows documents."""
        self.active = n_rows
        handles = [
            m.register_forward_hook(self._hook(name, isinstance(m, nn.Linear)))
            for name, m in self.targets.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class _SpanRecorder(RecordedTokens):
    def take_spans(self):
        """The (lo, hi) spans read since the last call."""
        spans = self._spans
        self._spans = []
        return spans


def _unscored_reads(spans, coverage, starts):
    """How many positions the spans read that the scorer has not yet counted (a device tensor: no
    sync). Document starts (`starts`, a bool mask; position 0 is one) are exempt: a BOS is
    structure, not content; the segmentation reads every BOS up front (as #1530's batching does),
    so a document's trainer may read its own BOS before the previous document's last target is
    scored."""
    idx = [np.arange(lo, hi) for lo, hi in spans if hi > lo]
    if not idx:
        return torch.zeros((), dtype=torch.int64, device=coverage.device)
    pos = torch.as_tensor(np.concatenate(idx), device=coverage.device)
    return ((coverage[pos] == 0) & ~starts[pos]).sum()


class _LoraEval:
    """One LoRA-TTT evaluation (phases optional): state shared by the group loop and the pauses."""

    def __init__(self, h, model, val_tokens, luts, phased, doc_scores):
        self.h = h
        self.device = _model_device(model)
        self.tokens = val_tokens.to(device=self.device, dtype=torch.int64)
        self.luts = luts
        self.doc_scores = doc_scores
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.coverage = torch.zeros(self.tokens.numel(), dtype=torch.int32, device=self.device)
        self.ledger = []
        self.view = _SpanRecorder(self.tokens)
        self.phase_view = _SpanRecorder(self.tokens)
        self.docs = val_documents(self.tokens)
        self.starts = torch.zeros(self.tokens.numel(), dtype=torch.bool, device=self.device)
        self.starts[torch.as_tensor(self.docs[:, 0], device=self.device)] = True
        self.scored_upto = -1
        self.steps = 0
        self.trainer = _TTTTrainer(self._phase_h(), model, 1) if phased else None
        self.model = self.trainer.model if phased else model
        self.adapters = LoraAdapters(self.model, h, h.ttt_lora_batch_docs, self.device)

    def _phase_h(self):
        h = self.h
        return dataclasses.replace(
            h,
            ttt_lr=h.ttt_phase_lr,
            ttt_momentum=h.ttt_phase_momentum,
            ttt_epochs=h.ttt_phase_epochs,
        )

    def score_group(self, docs, doc_ids):
        """LoRA TTT over a group of documents (rows of val_documents, longest first)."""
        h = self.h
        chunk = h.ttt_lora_chunk
        n_chunks = (docs[:, 2] - docs[:, 1]) // chunk + 1
        self.adapters.reset()
        doc_nll = torch.zeros(len(docs), dtype=torch.float64, device=self.device)
        for k in range(int(n_chunks.max())):
            n = int((n_chunks > k).sum())  # longest first: the active documents are a prefix
            rows = docs[:n]
            firsts = rows[:, 1] + k * chunk
            lasts = np.minimum(firsts + chunk - 1, rows[:, 2])
            spans = [
                ttt_lora_span(int(d), int(f), int(l), h.eval_len)
                for d, f, l in zip(rows[:, 0], firsts, lasts)
            ]
            nll, x, y, pos = self._forward(spans, n)
            first_t = torch.as_tensor(firsts, device=self.device)[:, None]
            last_t = torch.as_tensor(lasts, device=self.device)[:, None]
            scored = (pos >= first_t) & (pos <= last_t)
            trained = (pos >= first_t) & (y >= 0)
            self._score(nll.detach(), x, y, pos, scored, doc_nll[:n])
            self.scored_upto = max(self.scored_upto, int(lasts.max()))
            self.ledger.append({"event": "score", "chunk": k, "scored_upto": self.scored_upto})
            per_doc = (nll * trained).sum(1) / trained.sum(1).clamp(min=1)
            self.adapters.opt.zero_grad(set_to_none=False)
            per_doc.sum().backward()
            self.adapters.opt.step()
            self.steps += 1
            spans_read = self.view.take_spans()
            self.ledger.append(
                {
                    "event": "update",
                    "chunk": k,
                    "step": self.steps,
                    "reads": len(spans_read),
                    "max_target": max(hi - 1 for _, hi in spans_read),
                    "unscored_reads": _unscored_reads(spans_read, self.coverage, self.starts),
                }
            )
        if self.doc_scores is not None:
            self.doc_scores.update(zip(doc_ids, doc_nll.tolist()))

    def _forward(self, spans, n):
        """Per-token NLL of the spans (right-padded: causal, so padding never reaches a real
        position) under the first n adapters; y is -1 at padding; pos the absolute target
        positions."""
        reads = [self.view.read(lo, hi) for lo, hi in spans]
        length = max(r.numel() for r in reads) - 1
        x = torch.zeros(n, length, dtype=torch.int64, device=self.device)
        y = torch.full((n, length), -1, dtype=torch.int64, device=self.device)
        for i, r in enumerate(reads):
            x[i, : r.numel() - 1] = r[:-1]
            y[i, : r.numel() - 1] = r[1:]
        lo = torch.as_tensor([s[0] for s in spans], device=self.device)[:, None]
        pos = lo + 1 + torch.arange(length, device=self.device)[None, :]
        with self.adapters.applied(n), torch.enable_grad():
            nll = token_nll(self.model, x, y.clamp(min=0))
        return nll, x, y, pos

    def _score(self, nll, x, y, pos, mask, doc_nll):
        y = y.clamp(min=0)
        self.sums[0] += (nll.double() * mask).sum()
        self.sums[1] += mask.sum()
        # Padding positions can run past the split: clamp them (the mask zeroes their bytes).
        positions = pos.clamp(max=self.coverage.numel() - 1)
        self.sums[2] += (target_bytes(x, y, self.luts, positions) * mask).sum()
        doc_nll += (nll.double() * mask).sum(1)
        targets = pos[mask]
        self.coverage.index_add_(0, targets, torch.ones_like(targets, dtype=self.coverage.dtype))

    def pause(self, lo, last_target, phase):
        """Global SGD on the base weights over the documents scored since the last pause."""
        _, world = _dist_info()
        lo, hi = ttt_phase_range(lo, last_target)
        scored = self.coverage
        if world > 1:  # every rank's documents of this phase are scored by now
            scored = self.coverage.clone()
            dist_sum(scored)
            upto = dist_max(torch.tensor(self.scored_upto, device=self.device))
            self.scored_upto = int(upto)
            self.ledger.append(
                {"event": "score", "chunk": f"phase {phase}", "scored_upto": self.scored_upto}
            )
        for p in self.trainer.params:
            p.requires_grad_(True)
        for step in self.trainer.train_chunk(self.phase_view, lo, hi, 0):
            spans = self.phase_view.take_spans()
            self.ledger.append(
                {
                    "event": "update",
                    "chunk": f"phase {phase}",
                    "step": step,
                    "reads": len(spans),
                    "max_target": max((b - 1 for _, b in spans), default=-1),
                    "unscored_reads": _unscored_reads(spans, scored, self.starts),
                }
            )
        self._freeze_base()

    def _freeze_base(self):
        for p in self.model.parameters():
            p.requires_grad_(False)


def _lora_ttt_eval(h, model, val_tokens, luts, phased, doc_scores=None):
    """Per-document LoRA TTT, with phased global SGD when `phased`; this rank scores every
    world-th document of each phase, longest first in groups of TTT_LORA_BATCH_DOCS."""
    t0 = time.perf_counter()
    rank, world = _dist_info()
    run = _LoraEval(h, model, val_tokens, luts, phased, doc_scores)
    docs = run.docs
    bounds = [b for b in ttt_phase_bounds(h) if b < len(docs)] if phased else []
    edges = [0, *bounds, len(docs)]
    was_training = model.training
    grads = {id(p): p.requires_grad for p in run.model.parameters()}
    run.model.eval()
    run._freeze_base()
    try:
        for phase in range(len(edges) - 1):
            d0 = edges[phase]
            d1 = edges[phase + 1]
            mine = np.arange(d0, d1)[rank::world]
            mine = mine[np.argsort(-(docs[mine, 2] - docs[mine, 1]), kind="stable")]
            for g in range(0, len(mine), h.ttt_lora_batch_docs):
                ids = mine[g : g + h.ttt_lora_batch_docs]
                run.score_group(docs[ids], ids.tolist())
            if d1 < len(docs) and phased:
                run.pause(int(docs[d0, 0]), int(docs[d1 - 1, 2]), phase)
    finally:
        for p in run.model.parameters():
            p.requires_grad_(grads[id(p)])
        model.train(was_training)
    unscored = torch.stack(
        [
            torch.as_tensor(e["unscored_reads"], device=run.device)
            for e in run.ledger
            if e["event"] == "update"
        ]
        or [torch.zeros((), device=run.device)]
    ).long()
    local = int(unscored.sum())
    for e, u in zip([e for e in run.ledger if e["event"] == "update"], unscored.tolist()):
        e["unscored_reads"] = u
    total = torch.tensor(local, device=run.device)
    dist_sum(run.sums)
    dist_sum(run.coverage)
    dist_sum(total)
    if int(total) > local:
        run.ledger.append(
            {
                "event": "update",
                "chunk": "other ranks",
                "step": "all",
                "reads": 0,
                "max_target": -1,
                "unscored_reads": int(total) - local,
            }
        )
    return _eval_result(
        run.sums,
        t0,
        "ttt_phased" if phased else "ttt_lora",
        docs=len(docs),
        phases=len(bounds),
        lora_steps=run.steps,
        lora_rank=h.ttt_lora_rank,
        lora_targets=len(run.adapters.targets),
        seq_len=h.eval_len,
        chunk=h.ttt_lora_chunk,
        score_first=audit_score_first(run.ledger, run.coverage),
    )


def eval_val_ttt_lora(h, model, val_tokens, luts, doc_scores=None):
    return _lora_ttt_eval(h, model, val_tokens, luts, phased=False, doc_scores=doc_scores)


def eval_val_ttt_phased(h, model, val_tokens, luts, doc_scores=None):
    return _lora_ttt_eval(h, model, val_tokens, luts, phased=True, doc_scores=doc_scores)


@dataclass(frozen=True)
class EvalMode:
    """An eval mode: its EVAL_MODE name, `evaluate(h, model, val_tokens, luts)`, and the label of
    its final log lines (`<label> val_loss:... val_bpb:...` and `<label>_exact ...`)."""

    name: str
    evaluate: Callable
    label: str


EVAL_MODES = {
    mode.name: mode
    for mode in (
        EvalMode("standard", eval_val, "final_int8_zlib_roundtrip"),
        EvalMode("sliding", eval_val_sliding, "final_sliding_window"),
        EvalMode("ttt", eval_val_ttt, "legal_ttt"),
        EvalMode("ttt_lora", eval_val_ttt_lora, "quantized_ttt_lora"),
        EvalMode("ttt_phased", eval_val_ttt_phased, "quantized_ttt_phased"),
    )
}


# ===== END SHARED BLOCK: eval v1 =====

# ===== BEGIN SHARED BLOCK: train v1 =====
# The training pipeline every script runs, in named stages (run_main is their table of contents):
# open the run (tokenizer, val data, loader: made once) -> build the model -> train
# (warmup-then-restore for compile priming outside the clock, the wallclock-capped loop with the
# stop decision all-reduced, EMA, periodic validation with a coherence sample) -> calibrate (GPTQ)
# -> serialize and re-read from disk -> audits -> final eval -> summary. Each stage writes its time
# to the TimeLedger. Models plug in through the hooks of the model contract (runtime block).
# Telemetry (TECHNIQUES.md part E): SMMA 10/100/1000, cliff flag, status file, sample audits,
# embedding probes, and an optional UCB1 shard mixer.


class Smma:
    """SMMA_t = (SMMA_{t-1} (N - 1) + x_t) / N, seeded with the first value."""

    def __init__(self, n):
        self.n = n
        self.value = None

    def update(self, x):
        self.value = x if self.value is None else (self.value * (self.n - 1) + x) / self.n
        return self.value


def coherence_score(text):
    """0-100: word bigram diversity (35) + trigram diversity (35) + English-looking words (20) +
    distinct characters (10). "region region ..." scores about 23, ordinary prose 70 or more."""
    words = text.split()
    if not words:
        return 0.0

    def diversity(n):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0

    english = sum(
        w.isalpha() and len(w) <= 20 and any(c in "aeiouyAEIOUY" for c in w) for w in words
    )
    return (
        35 * diversity(2)
        + 35 * diversity(3)
        + 20 * english / len(words)
        + 10 * min(1.0, len(set(text)) / 25)
    )


@torch.no_grad()
def generate_sample(model, sp, prompt, n_tokens, seq_len, temperature=0.0, seed=0):
    """Greedy (temperature 0) or sampled continuation of a fixed prompt, for the sample audit."""
    device = _model_device(model)
    prompt_ids = sp.encode(prompt)
    was_training = model.training
    ids = [1] + prompt_ids  # BOS first, as every document in the shards
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    for _ in range(n_tokens):
        x = torch.tensor([ids[-seq_len:]], device=device)
        with _autocast(device):
            logits = model.forward_logits(x)[0, -1].float().cpu()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        else:
            ids.append(int(logits.argmax()))
    model.train(was_training)
    return sp.decode(ids[1 + len(prompt_ids) :])


def embedding_probes(
    weight, sp, other=None, words=("the", "and", "of", "in", "is", "for", "with", "not")
):
    """Anisotropy (mean cosine of random pairs), effective rank at 90/95% variance, top-5 cosine
    neighbours of a fixed probe list, and (with `other`, e.g. the dequantized copy) neighbour
    overlap@5."""
    w = F.normalize(weight.detach().float().cpu(), dim=-1)
    i, j = torch.randint(0, w.size(0), (2, 4096), generator=torch.Generator().manual_seed(0))
    s2 = torch.linalg.svdvals(weight.detach().float().cpu()).square()
    cum = torch.cumsum(s2, 0) / s2.sum()
    probes = [
        p
        for p in (sp.piece_to_id("\u2581" + t) for t in words)
        if 0 < p < w.size(0) and not sp.is_unknown(p)
    ]

    def top5(m):
        sim = m[probes] @ m.T
        sim[torch.arange(len(probes)), probes] = -2.0
        return sim.topk(5, dim=-1).indices

    nb = top5(w) if probes else torch.zeros(0, 5, dtype=torch.long)
    out = {
        "anisotropy": float((w[i] * w[j]).sum(-1).mean()),
        "rank90": int((cum < 0.90).sum()) + 1,
        "rank95": int((cum < 0.95).sum()) + 1,
        "neighbours": {
            sp.id_to_piece(p): [sp.id_to_piece(int(q)) for q in row] for p, row in zip(probes, nb)
        },
    }
    if other is not None and probes:
        nb2 = top5(F.normalize(other.detach().float().cpu(), dim=-1))
        out["neighbour_overlap"] = float(
            sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nb, nb2)) / (5 * len(probes))
        )
    return out


def project_capped_simplex(w, lo, hi, iters=100):
    """argmin ||x - w|| s.t. lo <= x <= hi, sum x = 1: x = clip(w + tau, lo, hi) with tau by
    bisection."""
    w = np.asarray(w, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12 or (lo > hi).any():
        raise ValueError(
            f"shard mixer: infeasible bounds (sum of floors {lo.sum():.3f}, of caps {hi.sum():.3f})"
        )
    a = (lo - w).min() - 1  # tau bracket: the sum is below 1 at a, above 1 at b
    b = (hi - w).max() + 1
    for _ in range(iters):
        tau = (a + b) / 2
        if np.clip(w + tau, lo, hi).sum() < 1:
            a = tau
        else:
            b = tau
    return np.clip(w + (a + b) / 2, lo, hi)


class ShardMixer:
    """UCB1 over training shards (optional, off by default; evidence for it is weak, PR #737). Each
    phase plays the arm with the best upper confidence bound: its one-hot, projected onto {floor
    <= w <= cap, sum w = 1}, gives the sampling weights. The reward of a phase is the loss drop
    on a held-out slice of *training* data, never val."""

    def __init__(self, h, n_shards):
        self.h = h
        self.k = n_shards
        self.arm = 0
        self.last_loss = None
        self.counts = np.zeros(n_shards)
        self.rewards = np.zeros(n_shards)
        self.rng = np.random.default_rng(h.seed)
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
        n = self.counts.sum()
        plays = np.maximum(self.counts, 1)
        ucb = self.rewards / plays + self.h.mixer_ucb_c * np.sqrt(np.log(max(n, 1)) / plays)
        self.arm = int(np.argmax(np.where(self.counts == 0, np.inf, ucb)))
        self.weights = project_capped_simplex(np.eye(self.k)[self.arm], self.lo, self.hi)
        return self.weights


def build_optimizers(model, h, device):
    """Muon for the model's matrices, AdamW for everything else (`param_groups` decides)."""
    matrices, adam_groups = param_groups(model, h)
    orthogonalize = None
    if h.compile and device.type == "cuda":
        orthogonalize = torch.compile(zeropower_via_newtonschulz5)
    muon = Muon(
        matrices,
        lr=h.matrix_lr,
        momentum=h.muon_momentum,
        backend_steps=h.muon_backend_steps,
        weight_decay=h.muon_wd,
        row_norm=h.muon_row_norm,
        orthogonalize=orthogonalize,
    )
    for g in muon.param_groups:
        g["base_lr"] = h.matrix_lr
    adam = torch.optim.AdamW(
        adam_groups,
        betas=(h.beta1, h.beta2),
        eps=h.adam_eps,
        weight_decay=h.adam_wd,
        fused=device.type == "cuda",
    )
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


# The 10-minute track's two clocks (RULES.md section 3), enforced in `summarize` when
# Hyperparameters.record_track.
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0


@dataclass
class TimeLedger:
    """Where the run's time went, in seconds: the one source of every time figure of the summary,
    submission.json and pack.py's compliance. Two clocks count against the rules. `train_s`: all
    that uses training data or shapes the weights once the clock starts (the model's precompute,
    the loop's setup and wind-down - optimizers, QAT modules, the mixer's held-out slice, EMA -,
    the loop itself with its QAT, and GPTQ calibration and Hessians): 600 s. `eval_s`: the final
    eval: 600 s. Excluded and logged as such: warmup (compile priming, model, optimizers and
    loader restored after it) and the periodic validations inside the loop."""

    hardware: str = ""
    warmup_excluded_s: float = 0.0
    validation_excluded_s: float = 0.0
    precompute_s: float = 0.0
    train_setup_s: float = 0.0
    train_loop_s: float = 0.0
    gptq_s: float = 0.0
    serialize_s: float = 0.0
    audit_s: float = 0.0
    evals_s: dict = field(default_factory=dict)  # log label -> seconds, every timed eval
    final_eval_s: float = 0.0

    @property
    def train_s(self):
        return self.precompute_s + self.train_setup_s + self.train_loop_s + self.gptq_s

    @property
    def eval_s(self):
        return self.final_eval_s

    def as_dict(self):
        return {**dataclasses.asdict(self), "train_s": self.train_s, "eval_s": self.eval_s}


def time_violations(h, ledger):
    """Why the run breaks the 10-minute track's clocks: one reason per clock over its limit; empty
    within them or off the track."""
    if not h.record_track:
        return []
    reasons = []
    for clock, seconds, limit in (
        ("training", ledger.train_s, TRAIN_LIMIT_S),
        ("evaluation", ledger.eval_s, EVAL_LIMIT_S),
    ):
        if not seconds <= limit:
            reasons.append(f"{clock} took {seconds:.1f}s, over the {limit:g}s limit")
    return reasons


@dataclass
class RunContext:
    """What the stages share, made once by `open_run`: the tokenizer, the val tokens with their byte
    lookup tables, and the training token loader are loaded once and passed on."""

    h: Hyperparameters
    rt: Runtime
    logger: RunLogger
    ledger: TimeLedger
    sp: object  # sentencepiece.SentencePieceProcessor
    val_tokens: torch.Tensor
    luts: object  # lookup tables (base_bytes, has_leading_space, is_boundary) or SidecarBytes
    loader: DistributedTokenLoader
    run_id: str
    artifact_path: str
    val_total: int = 0  # tokens in the whole val split (val_tokens may be a VAL_MAX_TOKENS prefix)
    unigram_bpb: float | None = None  # the floor of a quick look (VAL_MAX_TOKENS runs)
    evals: dict = field(default_factory=dict)  # log label -> targets scored, every timed eval


class Validator:
    """Periodic validation (paused clock): val loss, a coherence sample, the model's probes, the
    status."""

    def __init__(self, run, model):
        self.run = run
        self.model = model
        self.low_streak = 0  # consecutive samples under coherence 30

    def __call__(self, step, train_ms):
        h = self.run.h
        logger = self.run.logger
        res = eval_val(h, self.model, self.run.val_tokens, self.run.luts)
        logger.log0(
            f"step:{step}/{h.iterations} val_loss:{res['val_loss']:.4f} "
            f"val_bpb:{res['val_bpb']:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms"
        )
        sample = generate_sample(
            self.model, self.run.sp, h.sample_prompt, h.sample_tokens, h.train_seq_len
        )
        score = coherence_score(sample)
        self.low_streak = self.low_streak + 1 if score < 30 else 0
        collapsed = self.low_streak >= 5  # five low samples in a row
        collapse_flag = " COLLAPSE" if collapsed else ""
        logger.log0(f"sample:{step} coherence:{score:.1f}{collapse_flag} text:{sample[:160]!r}")
        probes_hook = model_hook(self.model, "validation_probes")
        probes = probes_hook() if probes_hook is not None else None
        logger.event(
            "eval",
            step=step,
            label="periodic",
            val_loss=res["val_loss"],
            val_bpb=res["val_bpb"],
            coherence=score,
            collapse=collapsed,
            sample=sample,
            probes=probes,
        )
        history = {
            "val_step": step,
            "val_bpb": res["val_bpb"],
            "coherence_step": step,
            "coherence": score,
        }
        if probes:
            history["geometry_step"] = step
            for key in ("analogy", "cluster_gap", "direction", "word_order"):
                if key in probes:
                    history[key] = probes[key]
        logger.update_status(
            force=True,
            val_loss=res["val_loss"],
            val_bpb=res["val_bpb"],
            coherence=score,
            collapse=collapsed,
            sample=sample,
            geometry=probes,
            history=history,
            artifact_bytes=estimate_artifact_bytes(self.model, h),
            artifact_bytes_exact=False,
        )
        return collapsed and h.halt_on_collapse


def estimate_artifact_bytes(model, h):
    """Fast estimate for the dashboard (default widths, zlib level 1); the exact figure comes at the
    end."""
    _, raw = quantize_state_dict(artifact_state(model), h)
    return len(zlib.compress(raw, 1))


def train_model(h, rt, model, logger, ledger=None, validator=None, loader=None):
    """Train `model` in place. Returns (EMA or None, loop statistics). Writes the warmup and loop
    times to `ledger` (a TimeLedger; a scratch one when none is given) and reads its
    precompute_s, which the wallclock cap subtracts along with the loop's own setup. `loader`: the
    run's training token loader (made here when None)."""
    entered = time.perf_counter()
    ledger = ledger or TimeLedger()
    device = rt.device
    if h.qat_start_frac > 0:
        n = enable_qat(model, h)
        qat_scheme = QuantScheme("int", h.qat_bits or h.quant_bits)
        logger.log0(f"qat: {n} matrices fake-quantized to {qat_scheme} from {h.qat_start_frac:.2f}")
    step_model = model
    if h.compile and device.type == "cuda":  # `compiled` below: the same test
        step_model = torch.compile(model, dynamic=False)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # torch 2.13 deprecates broadcast_buffers (a FutureWarning on every rank) for
        # forward_sync_buffers, which still syncs buffers once at init: ours are equal on every
        # rank then (same seed; a model's precompute broadcasts rank 0's), so the two agree.
        no_buffer_sync = {"broadcast_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters:
            no_buffer_sync = {"forward_sync_buffers": False}
        step_model = DDP(
            step_model,
            device_ids=[rt.local_rank] if device.type == "cuda" else None,
            **no_buffer_sync,
        )
    optimizers = build_optimizers(model, h, device)
    if loader is None:
        loader = DistributedTokenLoader(h.data_path, rt.rank, rt.world_size, device, h.vocab_size)
    mixer = ShardMixer(h, len(loader.files)) if h.data_mixer else None
    heldout = loader.heldout(h.mixer_heldout_tokens, h.train_seq_len) if mixer else None
    progress_hook = model_hook(model, "set_training_progress")

    def train_step(step, lr_scale):
        total = torch.zeros((), device=device)
        for micro in range(rt.grad_accum_steps):
            x, y = loader.next_batch(
                h.train_batch_tokens,
                h.train_seq_len,
                rt.grad_accum_steps,
                shard=mixer.pick() if mixer else None,
            )
            last_micro = micro == rt.grad_accum_steps - 1  # DDP all-reduces on the last one only
            if rt.distributed and not last_micro:
                ctx = step_model.no_sync()
            else:
                ctx = contextlib.nullcontext()
            with ctx, _autocast(device):
                loss = step_model(x, y)
            (loss / rt.grad_accum_steps).backward()
            total += loss.detach()
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale
        for g in optimizers[0].param_groups:
            g["momentum"] = muon_momentum_at(h, step)
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return total / rt.grad_accum_steps

    # Warmup primes torch.compile (CUDA): WARMUP_STEPS steps thrown away. An eager run has nothing
    # to compile, so it keeps one step (allocator and kernel first-use costs) and says so (issue 18).
    compiled = h.compile and device.type == "cuda"
    warmup_steps = h.warmup_steps if compiled else min(h.warmup_steps, 1)
    if warmup_steps < h.warmup_steps:
        logger.log0(
            f"warmup: {warmup_steps} step instead of WARMUP_STEPS={h.warmup_steps}: an eager run "
            "compiles nothing (WARMUP_STEPS primes torch.compile on CUDA)"
        )
    if warmup_steps > 0:  # prime compile and kernels, then restore model, optimizers and loader
        t0 = time.perf_counter()
        loader_state = loader.state()
        initial, opt_states = copy.deepcopy(
            (model.state_dict(), [opt.state_dict() for opt in optimizers])
        )
        for step in range(warmup_steps):
            if progress_hook:
                # Both halves of a schedule that changes the graph (recurrence) get compiled.
                progress_hook(float(step >= warmup_steps // 2))
            train_step(step, 1.0)
        model.load_state_dict(initial)
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        loader.restore(loader_state)
        ledger.warmup_excluded_s = time.perf_counter() - t0
        logger.log0(
            f"warmup: {warmup_steps} steps in {ledger.warmup_excluded_s:.1f}s "
            "(excluded from the clock)"
        )
    ema = EMA(model, h.ema_decay) if h.ema_decay > 0 else None
    smmas = {n: Smma(n) for n in (10, 100, 1000)}
    # GPTQ calibrates inside the training budget (#1001): the loop leaves it time. The loop gets
    # what the precompute and its own setup have not used.
    reserve = h.gptq_reserve_seconds if h.gptq_enabled else 0.0
    setup_s = time.perf_counter() - entered - ledger.warmup_excluded_s
    cap_ms = 0.0
    if h.max_wallclock_seconds > 0:
        spent_s = ledger.precompute_s + setup_s + reserve
        cap_ms = max(1000.0 * (h.max_wallclock_seconds - spent_s), 1.0)  # 1 ms: stop at once
    if reserve and cap_ms:
        logger.log0(f"gptq:reserving {reserve:.1f}s, effective={cap_ms:.0f}ms")
    cap_h = dataclasses.replace(h, max_wallclock_seconds=cap_ms / 1000.0)
    train_ms = 0.0
    step = 0
    stop_after = None  # the step at which every rank agreed the wallclock cap was reached
    halted = False
    qat_on = False
    _sync(device)
    t0 = time.perf_counter()
    while True:
        last = step == h.iterations or (stop_after is not None and step >= stop_after) or halted
        validate_now = h.val_loss_every > 0 and (last or step % h.val_loss_every == 0)
        if validator and step > 0 and validate_now:
            _sync(device)
            paused = time.perf_counter()
            train_ms += 1000.0 * (paused - t0)
            halted = validator(step, train_ms) or halted
            if halted and not last:
                logger.log0(f"halting: coherence collapse at step {step} (HALT_ON_COLLAPSE=1)")
            t0 = time.perf_counter()
            ledger.validation_excluded_s += t0 - paused
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
        loss = train_step(step, lr_scale)
        step += 1
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
            _log_train_step(h, logger, step, loss, smmas, lr_scale, approx_ms, log_now)
        reached = torch.tensor(float(cap_ms > 0 and approx_ms >= cap_ms), device=device)
        if stop_after is None and bool(dist_max(reached)):
            stop_after = step
            logger.log0(
                f"stopping_early: wallclock_cap train_time:{approx_ms:.0f}ms "
                f"step:{step}/{h.iterations}"
            )
            overshoot_warning(logger, approx_ms, cap_ms, approx_ms - elapsed_ms)
    ledger.train_loop_s = train_ms / 1000.0
    excluded_s = ledger.warmup_excluded_s + ledger.validation_excluded_s
    ledger.train_setup_s = time.perf_counter() - entered - excluded_s - ledger.train_loop_s
    logger.update_status(
        force=True, step=step, elapsed_s=train_ms / 1000, tokens_seen=step * h.train_batch_tokens
    )
    if device.type == "cuda":
        logger.log0(
            f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
        )
    stats = {
        "steps": step,
        "train_time_ms": train_ms,
        "step_avg_ms": train_ms / max(step, 1),
        "halted": halted,
    }
    return ema, stats


def overshoot_warning(logger, ended_ms, cap_ms, step_ms):
    """A warning when the step that crossed the wallclock cap ended more than 10 % past it (one slow
    step on a busy machine): the run trained longer than MAX_WALLCLOCK_SECONDS says. Returns
    whether it warned."""
    if cap_ms <= 0 or ended_ms <= 1.1 * cap_ms:
        return False
    logger.log0(
        f"warning: the wallclock cap was overshot: the step that crossed {cap_ms / 1000:.1f}s "
        f"ended at {ended_ms / 1000:.1f}s ({100 * (ended_ms / cap_ms - 1):.0f}% past the cap; "
        f"that step took {step_ms / 1000:.1f}s)"
    )
    return True


def _log_train_step(h, logger, step, loss, smmas, lr_scale, approx_ms, log_now):
    """The step line (when log_now), the train event, the cliff flag and the status file."""
    value = float(loss)
    smoothed = {f"smma{n}": float(s.value) for n, s in smmas.items()}
    step_ms = approx_ms / step
    tok_s = h.train_batch_tokens * step * 1000.0 / max(approx_ms, 1e-9)
    if value < 0.5 * smoothed["smma100"]:
        logger.event("cliff", step=step, train_loss=value, smma100=smoothed["smma100"])
    if log_now:
        logger.log0(
            f"step:{step}/{h.iterations} train_loss:{value:.4f} "
            f"train_time:{approx_ms:.0f}ms step_avg:{step_ms:.2f}ms tok/s:{tok_s:.0f}"
        )
        logger.event(
            "train",
            step=step,
            train_loss=value,
            lr_scale=lr_scale,
            train_time_ms=approx_ms,
            **smoothed,
        )
    logger.update_status(
        state="training",
        step=step,
        iterations=h.iterations,
        elapsed_s=approx_ms / 1000,
        tokens_seen=step * h.train_batch_tokens,
        lr_scale=lr_scale,
        train_loss=value,
        step_ms=step_ms,
        tokens_per_s=tok_s,
        **smoothed,
        history={
            "step": step,
            "train_loss": value,
            "smma100": smoothed["smma100"],
            "lr_scale": lr_scale,
            "tokens_per_s": tok_s,
        },
    )


def timed_eval(run, model, mode, label=None):
    """One eval by EVAL_MODES[mode], logged in one format: `<label> val_loss:... val_bpb:...
    eval_time:...ms` (label: the mode's final label unless given). Its time goes to the ledger."""
    eval_mode = EVAL_MODES[mode]
    label = label or eval_mode.label
    res = eval_mode.evaluate(run.h, model, run.val_tokens, run.luts)
    run.ledger.evals_s[label] = res["eval_time_ms"] / 1000.0
    run.evals[label] = res["tokens"]
    run.logger.log0(
        f"{label} val_loss:{res['val_loss']:.8f} val_bpb:{res['val_bpb']:.8f} "
        f"eval_time:{res['eval_time_ms']:.0f}ms"
    )
    run.logger.event("eval", label=label, **{k: v for k, v in res.items() if k != "score_first"})
    return res


# --- the pipeline: run_main calls these stages in order -----------------------------------------


@contextlib.contextmanager
def failures_recorded(logger):
    """An exception inside goes to the run's text log and status file (`state: failed`, the
    one-line message) before it propagates; `main` then exits non-zero."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        logger.record_failure(exc)
        raise


def open_run(h):
    """Runtime, run id, logger and the log's header (source, versions, hardware, hyperparameters);
    the tokenizer, val tokens, byte tables and training loader, each made once for every stage.
    Stale temporary files of an earlier run of the same RUN_ID are removed first."""
    h.validate_run_id()
    rt = setup_runtime()
    default_id = time.strftime("%Y%m%d_%H%M%S") + f"_{h.preset}_{uuid.uuid4().hex[:6]}"
    run_id = _broadcast(rt, h.run_id or default_id)
    artifact_path = h.artifact_path or os.path.join(h.log_dir, f"{run_id}.pga")
    logger = RunLogger(h.log_dir, run_id, rt.is_main)
    set_progress_logger(logger)
    if rt.is_main:
        remove_stale_temps(
            [logger.text_path, logger.events_path, logger.status_path, artifact_path]
        )
    with failures_recorded(logger):
        return _open_run(h, rt, logger, run_id, artifact_path)


def _open_run(h, rt, logger, run_id, artifact_path):
    """open_run after the logger exists, so that a failure here is recorded in the run's log."""
    device_name = device_description(rt.device)
    logger.log0(running_source().decode("utf-8") + "\n" + "=" * 100, console=False)
    logger.log0(
        f"versions: python {platform.python_version()} torch {torch.__version__} "
        f"numpy {np.__version__}"
    )
    logger.log0(
        f"hardware: {device_name} world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps}"
    )
    if rt.threads:
        logger.log0(f"threads: {rt.threads}")
    hparam_lines = [f"  {k}: {v}" for k, v in sorted(dataclasses.asdict(h).items())]
    logger.log0("\n".join(["Hyperparameters:"] + hparam_lines))
    if h.record_track and not 0 < h.max_wallclock_seconds <= TRAIN_LIMIT_S:
        logger.log0(
            f"record track: MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} does not stop "
            f"training within {TRAIN_LIMIT_S:g}s; the score is INVALID if training takes longer"
        )
    sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
    n_val = val_token_count(h.data_path)
    longest = max(h.train_seq_len, h.eval_len)
    if n_val < longest + 1:
        raise ValueError(
            f"DATA_PATH={h.data_path!r}: the val split has {n_val} tokens, shorter than one "
            f"sequence of {longest} + 1"
        )
    loader = DistributedTokenLoader(h.data_path, rt.rank, rt.world_size, rt.device, h.vocab_size)
    val_tokens = load_checked_val_tokens(h, sp, longest, h.val_max_tokens)
    luts = val_byte_counter(h, sp, val_tokens, rt.device)
    unigram = None
    if h.val_max_tokens:
        logger.log0(
            f"val_tokens: first {val_tokens.numel()} of {n_val} (VAL_MAX_TOKENS): "
            "a quick look, not an official score"
        )
        unigram = unigram_bpb(h, val_tokens, luts)
        logger.log0(
            f"unigram_bpb: {unigram:.4f} (train-shard unigram counts, add-one, on these val "
            "targets): a trained model must land clearly below it"
        )
    if isinstance(luts, SidecarBytes):
        logger.log0("val_bytes: per-token original UTF-8 counts from fineweb_val_bytes_*.bin")
    else:
        logger.log0("val_bytes: SentencePiece lookup tables")
    return RunContext(
        h=h,
        rt=rt,
        logger=logger,
        ledger=TimeLedger(hardware=device_name),
        sp=sp,
        val_tokens=val_tokens,
        luts=luts,
        loader=loader,
        run_id=run_id,
        artifact_path=artifact_path,
        val_total=n_val,
        unigram_bpb=unigram,
    )


def unigram_bpb(h, val_tokens, luts, max_train_tokens=20_000_000):
    """Bits per byte of the val targets under the add-one-smoothed unigram distribution of the
    first train tokens (at most max_train_tokens, whole shards in order): the floor that a trained
    model must beat clearly. Targets and bytes as in every eval (val[1:], the lookup tables)."""
    counts = np.zeros(h.vocab_size, dtype=np.float64)
    seen = 0
    for path in shard_files(h.data_path, "train"):
        tokens = load_data_shard(path).numpy()[: max_train_tokens - seen]
        counts += np.bincount(tokens, minlength=h.vocab_size)[: h.vocab_size]
        seen += tokens.size
        if seen >= max_train_tokens:
            break
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + h.vocab_size)
    targets = val_tokens[1:].to(torch.int64)
    nll = -float(log_p[targets.numpy()].sum())
    if isinstance(luts, SidecarBytes):
        device = luts.per_token.device
    else:
        device = luts[0].device
    positions = torch.arange(1, val_tokens.numel(), device=device)
    prev = val_tokens[:-1].to(device)
    nbytes = int(target_bytes(prev, targets.to(device), luts, positions).sum())
    return nll / (math.log(2) * max(nbytes, 1))


def build_run_model(run):
    """Seed, build the model on the run's device, log its size and the start event."""
    h = run.h
    seed_everything(h.seed)
    model = build_model(h).to(run.rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = len(run.loader.files)
    n_val = val_token_count(h.data_path)
    run.logger.log0(f"model_params:{n_params}\ntrain_shards:{n_train} val_tokens:{n_val}")
    run.logger.event(
        "start",
        run_id=run.run_id,
        preset=h.preset,
        device=run.ledger.hardware,
        world_size=run.rt.world_size,
        model_params=n_params,
        hparams=dataclasses.asdict(h),
    )
    run.logger.update_status(
        force=True,
        script=os.path.basename(CODE_PATH),
        preset=h.preset,
        device=run.ledger.hardware,
        state="starting",
        step=0,
        iterations=h.iterations,
        code_bytes=readable_size(),
    )
    return model, n_params


def train(run, model):
    """The model's precompute (inside the budget), the training loop, then the EMA weights. The
    training clock starts here: all of this stage but the ledger's excluded warmup and periodic
    validation is in TimeLedger.train_s."""
    started = time.perf_counter()
    prepare = model_hook(model, "prepare_training")
    if prepare is not None:
        t0 = time.perf_counter()
        prepare(run.h, run.rt, run.logger)
        run.ledger.precompute_s = time.perf_counter() - t0
        run.logger.log0(
            f"precompute: {run.ledger.precompute_s:.1f}s from train shards "
            "(inside the training budget)"
        )
    validator = Validator(run, model)
    ema, stats = train_model(
        run.h, run.rt, model, run.logger, run.ledger, validator, loader=run.loader
    )
    if ema is not None:
        model.load_state_dict(ema.state_dict(model))
    ledger = run.ledger
    excluded_s = ledger.warmup_excluded_s + ledger.validation_excluded_s
    counted_s = ledger.precompute_s + ledger.train_loop_s
    ledger.train_setup_s = time.perf_counter() - started - excluded_s - counted_s
    return stats


def calibrate(run, model):
    """GPTQ Hessians (GPTQ_ENABLED) on training data or self-samples, never val; the time counts
    against the training budget. Closes the training clock with its `training_budget` line."""
    h = run.h
    hessians = None
    if h.gptq_enabled:
        t0 = time.perf_counter()

        def next_batch():
            return run.loader.next_batch(
                h.train_batch_tokens, h.train_seq_len, run.rt.grad_accum_steps
            )

        hessians = gptq_calibrate(model, h, next_batch)
        run.ledger.gptq_s = time.perf_counter() - t0
        run.logger.log0(f"GPTQ:collected {len(hessians)} Hessians in {run.ledger.gptq_s:.1f}s")
    run.logger.log0(
        f"training_budget: {run.ledger.train_s:.1f}s (precompute + setup + loop + GPTQ) of "
        f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} on {run.ledger.hardware}"
    )
    run.logger.update_status(force=True, state="evaluating")
    return hessians


def serialize_and_reload(run, model, hessians):
    """Write the artifact (rank 0), read it back from disk: the scored model is the bytes on disk.
    Logs the byte accounting and the embedding probes (before vs after quantization)."""
    h = run.h
    logger = run.logger
    embedding = model_hook(model, "tok_emb")
    embed_before = embedding.weight.detach().clone() if embedding is not None else None
    t0 = time.perf_counter()
    sizes = None
    if run.rt.is_main:
        sizes = save_artifact(model, h, run.artifact_path, hessians=hessians)
    sizes = _broadcast(run.rt, sizes)
    run.ledger.serialize_s = time.perf_counter() - t0
    model = load_artifact(run.artifact_path)[0].to(run.rt.device)
    for row in sizes.get("plan") or []:
        logger.log0(
            f"quant_plan: {row['name']} {QuantScheme('int', row['bits'])} "
            f"est_bytes:{row['bytes']} est_error:{row['est_error']:.4g}"
        )
    widths = "mixed" if sizes.get("plan") else str(QuantScheme("int", h.quant_bits))
    code_lines = f"Code size: {sizes['code_bytes_readable']} bytes\n"
    if h.code_form == "compact":
        code_lines += f"Code size (compressed): {sizes['code_bytes']} bytes\n"
    logger.log0(
        f"Serialized model {widths}+{sizes['compressor']}: {sizes['artifact_bytes']} bytes "
        f"(payload:{sizes['raw_bytes']} compressed:{sizes['payload_bytes']})\n"
        + code_lines
        + f"Total submission size int8+zlib: {sizes['total_bytes']} bytes\n"
        # The line above keeps the baseline's label for its parsers; this one names what was done.
        + f"Total submission size {widths}+{sizes['compressor']}: {sizes['total_bytes']} bytes "
        "(the true widths and compressor)"
    )
    for g in sizes.get("groups") or []:
        logger.log0(
            f"artifact_group: {g['name']} {g['codec']}{' sorted' if g['sorted'] else ''} "
            f"raw:{g['raw_bytes']} bytes:{g['bytes']}"
        )
    over = sizes["total_bytes"] > h.size_budget
    logger.log0(
        f"budget: total {sizes['total_bytes']} of {h.size_budget} bytes, margin "
        f"{h.size_budget - sizes['total_bytes']}{' OVER BUDGET' if over else ''}"
    )
    logger.event("artifact", path=run.artifact_path, **sizes)
    probes = None
    if embed_before is not None:
        probes = embedding_probes(embed_before, run.sp, model_hook(model, "tok_emb").weight)
    logger.update_status(
        force=True, artifact_bytes=sizes["artifact_bytes"], artifact_bytes_exact=True, probes=probes
    )
    if probes:
        logger.log0(f"embedding_probes: {json.dumps(probes)}")
    return model, sizes


def run_audits(run, model):
    """Causality at the train length and at the eval window, and the byte accounting on a val
    sample, on the model about to be scored."""
    h = run.h
    t0 = time.perf_counter()
    audit_len = h.audit_seq_len or h.train_seq_len
    audits = {"causality": audit_causality(model, audit_len, h.vocab_size)}
    if h.eval_len != audit_len:
        audits["causality_eval"] = audit_causality(model, h.eval_len, h.vocab_size)
    audits["bytes"] = audit_bytes(run.sp, run.val_tokens, run.luts)
    if not audits["bytes"]["passed"]:
        res = audits["bytes"]
        message = (
            f"byte table: the lookup tables count {res['lut_bytes']} bytes of a val sample whose "
            f"decoded text has {res['decoded_bytes']} (token ids {res['first_mismatch_ids']})"
        )
        res["failures"] = [message]
    for name, res in audits.items():
        detail = ""
        if not res["passed"]:
            detail = f" failures:{res.get('failures') or res.get('first_mismatch_ids')}"
        run.logger.log0(f"audit:{name} passed:{res['passed']}{detail}")
        run.logger.event("audit", name=name, **res)
    run.ledger.audit_s = time.perf_counter() - t0
    return audits


def final_eval(run, model, audits):
    """The int8+zlib roundtrip eval (standard; when EVAL_MODE is another mode, only with
    ROUNDTRIP_EVAL), then the EVAL_MODE score, with its score-first audit added to `audits`.
    Returns (roundtrip result or None, final result, mode name)."""
    h = run.h
    logger = run.logger
    mode = "ttt" if h.ttt_enabled else h.eval_mode
    roundtrip = None
    if mode == "standard" or h.roundtrip_eval:
        roundtrip = timed_eval(run, model, "standard")
        logger.log0(
            f"{EVAL_MODES['standard'].label}_exact val_loss:{roundtrip['val_loss']:.8f} "
            f"val_bpb:{roundtrip['val_bpb']:.8f}"
        )
    final = roundtrip
    if mode != "standard":
        label = EVAL_MODES[mode].label
        final = timed_eval(run, model, mode)
        logger.log0(
            f"{label}_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f} "
            f"stride:{h.eval_stride} seq_len:{h.eval_len}"
        )
        sf = final["score_first"]
        audits["score_first"] = sf
        logger.log0(
            f"audit:score_first passed:{sf['passed']} chunks:{sf['chunks_scored']} "
            f"updates:{sf['updates']} targets:{sf['targets']} "
            f"scored_twice:{sf['scored_twice']} never_scored:{sf['never_scored']}"
        )
    run.ledger.final_eval_s = final["eval_time_ms"] / 1000.0
    return roundtrip, final, mode


def summarize(run, *, model_params, stats, sizes, audits, pre, roundtrip, final, mode):
    """Validity (audits, the byte budget, and on the 10-minute track the two clocks), the time
    ledger, the `summary: {json}` line, the end event and the final status. Every time figure of
    the summary comes from the TimeLedger. Returns the exit status: 0 valid, 3 score INVALID."""
    h = run.h
    logger = run.logger
    over = sizes["total_bytes"] > h.size_budget
    failed = [name for name, a in audits.items() if not a["passed"]]
    reasons = []
    if failed:
        reasons.append(f"failed {', '.join(failed)}")
    if over:
        reasons.append(f"over budget ({sizes['total_bytes']} > {h.size_budget} bytes)")
    reasons += time_violations(h, run.ledger)
    valid = not reasons
    if not valid:
        logger.log0(f"score INVALID: {'; '.join(reasons)}")
    ledger = run.ledger.as_dict()
    logger.log0(describe_evals(run, mode))
    logger.log0(f"time_ledger: {json.dumps(_rounded(ledger))}")
    summary = {
        "run_id": run.run_id,
        "script": os.path.basename(CODE_PATH),
        "preset": h.preset,
        "valid": valid,
        "artifact_path": run.artifact_path,
        "artifact_bytes": sizes["artifact_bytes"],
        "code_bytes": sizes["code_bytes"],
        "total_bytes": sizes["total_bytes"],
        "budget_bytes": h.size_budget,
        "eval_mode": mode,
        "val_loss": final["val_loss"],
        "val_bpb": final["val_bpb"],
        "tokens": final["tokens"],
        "bytes": final["bytes"],
        "pre_quant_val_bpb": pre["val_bpb"] if pre else None,
        "roundtrip_val_bpb": roundtrip["val_bpb"] if roundtrip else None,
        "val_truncated": bool(h.val_max_tokens),
        "quick_look": bool(h.val_max_tokens),
        "unigram_bpb": run.unigram_bpb,
        "val_targets_total": max(run.val_total - 1, 0),
        "evals": dict(run.evals),
        "model_params": model_params,
        "seed": h.seed,
        "world_size": run.rt.world_size,
        "hardware": run.ledger.hardware,
        "record_track": h.record_track,
        "invalid_reasons": reasons,
        "audits": {
            k: {"passed": v["passed"], **({} if v["passed"] else {"failures": v.get("failures")})}
            for k, v in audits.items()
        },
        "steps": stats["steps"],
        "halted": stats["halted"],
        # Time: the ledger's figures only.
        "time_ledger": ledger,
        "train_budget_s": ledger["train_s"],
        "train_time_ms": 1000.0 * ledger["train_loop_s"],
        "step_avg_ms": 1000.0 * ledger["train_loop_s"] / max(stats["steps"], 1),
        "eval_time_ms": 1000.0 * ledger["eval_s"],
    }
    logger.event("end", **summary)
    logger.update_status(
        force=True,
        state="done" if valid else "failed",
        invalid_reasons=reasons,
        val_loss=final["val_loss"],
        val_bpb=final["val_bpb"],
        audits=summary["audits"],
    )
    logger.log0(f"summary: {json.dumps(summary, sort_keys=True)}")
    if logger.enabled:  # the console's last lines; the text log keeps `summary:` as its last line
        print(result_block(run, summary), flush=True)
    return 0 if valid else 3


def result_block(run, summary):
    """The last lines of a run, short enough to read at a glance under the long summary line:
    val_bpb (and what it was measured on), the bytes against the budget, validity, the paths."""
    h = run.h
    scope = "the whole val split"
    if h.val_max_tokens:
        scope = f"val prefix of {summary['tokens']:,} targets: a quick look, not an official score"
    unigram = ""
    if summary.get("unigram_bpb") is not None:
        unigram = f" (unigram {summary['unigram_bpb']:.4f})"
    reasons = "; ".join(summary["invalid_reasons"])
    return "\n".join(
        [
            "=" * 60,
            f"val_bpb:     {summary['val_bpb']:.4f}{unigram}  [{summary['eval_mode']}, {scope}]",
            (
                f"total bytes: {summary['total_bytes']:,} of {summary['budget_bytes']:,} "
                f"(artifact {summary['artifact_bytes']:,} + code {summary['code_bytes']:,})"
            ),
            f"valid:       {summary['valid']}" + (f" ({reasons})" if reasons else ""),
            f"log:         {run.logger.text_path}",
            f"artifact:    {run.artifact_path}",
            "=" * 60,
        ]
    )


def _rounded(obj):
    """Floats to 3 decimals, through dicts: the time ledger as logged."""
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return round(obj, 3) if isinstance(obj, float) else obj


PRE_QUANT_LABEL = "pre-quantization post-ema"


def describe_evals(run, mode):
    """One line: which evals ran on how many val targets, which were skipped and by which knob,
    and whether the figures are a VAL_MAX_TOKENS quick look or the whole val split."""
    h = run.h
    parts = []
    planned = (
        (PRE_QUANT_LABEL, h.pre_quant_eval, "PRE_QUANT_EVAL=0"),
        (EVAL_MODES["standard"].label, mode == "standard" or h.roundtrip_eval, "ROUNDTRIP_EVAL=0"),
        (EVAL_MODES[mode].label, mode != "standard", ""),
    )
    for label, wanted, knob in planned:
        if label in run.evals:
            parts.append(f"{label} on {run.evals[label]:,} targets")
        elif not wanted and knob:
            parts.append(f"{label} skipped ({knob})")
    total = max(run.val_total - 1, 0)
    if h.val_max_tokens:
        scope = (
            f"val prefix of {h.val_max_tokens:,} of {total:,} targets (VAL_MAX_TOKENS): a quick "
            "look, not an official score"
        )
    else:
        scope = f"the whole val split ({total:,} targets)"
    return f"evals: {'; '.join(parts)}; {scope}"


def run_main(h):
    """The whole run, stage by stage (#1394's `train_and_eval`); returns the process exit status
    (0 valid, 3 score INVALID). An exception is recorded in the run's log and status file, then
    raised (`main` exits 2 for bad input, 1 otherwise)."""
    run = open_run(h)
    with failures_recorded(run.logger):
        model, model_params = build_run_model(run)
        stats = train(run, model)
        hessians = calibrate(run, model)
        pre = None
        if h.pre_quant_eval:
            pre = timed_eval(run, model, "standard", label=PRE_QUANT_LABEL)
        model, sizes = serialize_and_reload(run, model, hessians)
        audits = run_audits(run, model)
        roundtrip, final, mode = final_eval(run, model, audits)
        status = summarize(
            run,
            model_params=model_params,
            stats=stats,
            sizes=sizes,
            audits=audits,
            pre=pre,
            roundtrip=roundtrip,
            final=final,
            mode=mode,
        )
    set_progress_logger(None)  # the run is over: later progress (a re-score) goes to stderr
    if run.rt.distributed:
        dist.destroy_process_group()
    return status


# ===== END SHARED BLOCK: train v1 =====

# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# The manifold (PR #663 "V18" ideas, TECHNIQUES.md B.1, rewritten): co-occurrence counts of train
# shards -> springs, torsion, mass, directed springs, syntactic coordinates -> a seeded physics
# layout -> spectral coordinates `sc` (V x S) and static neighbours `static_nb` (V x K). Both are
# frozen state that ships in the artifact (zeros until `prepare_training` builds them).
# The network: h0 = Linear([MLP(sc[x]); emb(x)]) with no position embedding (recency terms carry
# order, so any window length works), then NUM_LAYERS hops of one shared gated cell with per-hop
# spectral FiLM. Every score over positions is masked to j <= i before its top-k or softmax, and the
# token itself is always a valid candidate (B.2 items 1-5). No KV cache: like attention, the routing
# and attention scores are dense T x T per hop, so their cost grows with seq_len squared (the
# sparsemax sorts only the k candidates of each row).

RECENCY_BUCKETS = 16  # learned score bias per log2(1 + i - j) bucket


def manifold_dims(h):
    """(spectral modes, directional and syntactic coordinates each, total width S) for the
    vocabulary: modes = min(MANIFOLD_MODES, V / 4), coordinates = min(MANIFOLD_COORDS, V / 8), so
    V = 1024 gives S = 256 + 32 + 32 = 320."""
    modes = min(h.manifold_modes, h.vocab_size // 4)
    coords = min(h.manifold_coords, h.vocab_size // 8)
    return modes, coords, modes + 2 * coords


def count_cooccurrence(shards, V, device, chunk=1 << 24):
    """float64 (V, V) counts: n1 of offset 1, r5 of offsets 1..5, c10 of offsets 1..10 weighted
    1/offset, by torch.bincount of prev * V + next over chunks of `chunk` first positions."""
    n1 = torch.zeros(V * V, dtype=torch.float64, device=device)
    r5 = torch.zeros(V * V, dtype=torch.float64, device=device)
    c10 = torch.zeros(V * V, dtype=torch.float64, device=device)
    for shard in shards:
        Progress.advance_active()  # prepare_training's progress: one unit per shard
        t = shard.to(device=device, dtype=torch.int64)
        for s in range(0, t.numel(), chunk):
            a = t[s : s + chunk + 10]
            for o in range(1, min(11, a.numel())):
                m = min(chunk, a.numel() - o)
                c = torch.bincount(a[:m] * V + a[o : o + m], minlength=V * V).double()
                c10 += c / o
                if o <= 5:
                    r5 += c
                if o == 1:
                    n1 += c
    return [c.view(V, V) for c in (n1, r5, c10)]


def top_modes(sym, k):
    """Top-k eigenpairs of a symmetric matrix as eigenvectors x sqrt|eigenvalue|: torch on the
    GPU (float64 up to V = 4096, float32 above), numpy's LAPACK on the CPU (torch's CPU eigh was
    about 5x slower here)."""
    if sym.is_cuda:
        evals, evecs = torch.linalg.eigh(sym.double() if sym.size(0) <= 4096 else sym.float())
    else:
        evals, evecs = (torch.from_numpy(a) for a in np.linalg.eigh(sym.double().numpy()))
    return (evecs[:, -k:] * evals[-k:].abs().sqrt()).flip(-1).float().to(sym.device)


def row_norm(m):
    """Each row divided by its sum: counts -> conditional distributions (empty rows stay zero)."""
    return m / m.sum(1, keepdim=True).clamp_min(1e-12)


def edge_list(w, cap, gen):
    """Upper-triangle edges (i, j, weight) of a weighted adjacency; a seeded subsample of `cap` if
    larger."""
    i, j = torch.triu(w, 1).nonzero(as_tuple=True)
    if i.numel() > cap:
        keep = torch.randperm(i.numel(), generator=gen, device=w.device)[:cap]
        i = i[keep]
        j = j[keep]
    return i, j, w[i, j]


def physics_layout(ws, wd, asym, mass, h, gen):
    """Positions (V x MANIFOLD_PHYSICS_DIM) minimizing the B.1 energy, and the final energy.

    Energy: springs w_s |d|^2 (2.5 P sampled edges) + 0.3 w_d |d|^2 (1.25 P directed edges), both
    over fixed seeded samples; (1 - 0.1 m_i m_j) / |d| over P fresh random pairs per step and
    0.5 a_i a_j / |d| over the first P/40 of them (P = MANIFOLD_PAIRS). Init N(0, 0.1^2); Adam lr
    0.05 cosine to 5e-4, gradient clip 10. One generator draws everything, in a fixed order.
    """
    V = ws.size(0)
    dev = ws.device
    P = h.manifold_pairs
    steps = h.manifold_physics_steps
    si, sj, sw = edge_list(ws, int(2.5 * P), gen)
    di, dj, dw = edge_list(wd, int(1.25 * P), gen)
    pos = (0.1 * torch.randn(V, h.manifold_physics_dim, generator=gen, device=dev)).requires_grad_()
    opt = torch.optim.Adam([pos], lr=0.05)
    energy = torch.zeros(())
    n_asym = max(1, P // 40)

    def sq(a, b):
        # Squared distances through F.embedding lookups: a much faster backward on the CPU than
        # fancy indexing.
        return (F.embedding(a, pos) - F.embedding(b, pos)).square().sum(-1)

    for step in range(steps):
        cosine = 1 + math.cos(math.pi * step / steps)
        opt.param_groups[0]["lr"] = 5e-4 + 0.5 * (0.05 - 5e-4) * cosine
        ri = torch.randint(0, V, (P,), generator=gen, device=dev)
        rj = (ri + torch.randint(1, V, (P,), generator=gen, device=dev)) % V  # never a self pair
        d = (sq(ri, rj) + 1e-6).sqrt()
        # One expression, so the autograd graph (and the order its gradients add up) stays fixed.
        energy = (
            (sw * sq(si, sj)).sum()  # springs
            + 0.3 * (dw * sq(di, dj)).sum()  # directed springs
            + ((1 - 0.1 * mass[ri] * mass[rj]) / d).sum()  # repulsion, less for heavy pairs
            + 0.5 * (asym[ri[:n_asym]] * asym[rj[:n_asym]] / d[:n_asym]).sum()  # asymmetry
        )
        opt.zero_grad(set_to_none=True)
        energy.backward()
        torch.nn.utils.clip_grad_norm_([pos], 10.0)
        opt.step()
    stats = {"springs": si.numel(), "directed": di.numel(), "energy": float(energy.detach())}
    return pos.detach(), stats


def build_manifold(counts, h):
    """(sc float32 (V, S), static_nb int32 (V, K), stats) from the counts (n1, r5, c10 of
    `count_cooccurrence`); the same bytes for the same seed on the CPU (a test hashes it twice).
    The numbered steps are those of TECHNIQUES.md B.1 and docs/manifold.md."""
    n1, r5, c10 = (c.float() for c in counts)
    V = n1.size(0)
    modes, coords, _ = manifold_dims(h)
    gen = torch.Generator(device=n1.device).manual_seed(h.manifold_seed)

    # 1. Springs: sqrt PPMI > 0.5 of the symmetric windowed co-occurrence, zero diagonal.
    c = c10 + c10.T
    c.fill_diagonal_(0)
    row = c.sum(1)
    ppmi = torch.log(c * c.sum() / (row[:, None] * row[None, :]).clamp_min(1e-12)).clamp_min(0)
    ws = torch.where(ppmi > 0.5, ppmi.sqrt(), 0.0)

    # 2. Torsion: left minus right context distributions (offsets 1..5); the asymmetry is its row
    # norm, and U S of its SVD (through the Gram matrix) gives the directional coordinates.
    tors = row_norm(r5.T) - row_norm(r5)
    asym = tors.norm(dim=1)
    dirc = top_modes(tors @ tors.T, coords)

    # 3. Mass: 1 / (successor entropy + 1), divided by its max; below 10 successors the entropy is
    # the maximum, ln V.
    pf = row_norm(n1)
    pb = row_norm(n1.T)
    ent = torch.where(n1.sum(1) < 10, math.log(V), -(pf * pf.clamp_min(1e-12).log()).sum(1))
    mass = 1 / (ent + 1)
    mass = mass / mass.max()

    # 4. Directed springs: abs(P_fwd - P_bwd), symmetrized, above the 90th percentile of its nonzero
    # values.
    dd = ((pf - pb).abs() + (pf - pb).abs().T) / 2
    nz = dd[dd > 0]
    threshold = 0
    if nz.numel():
        threshold = nz.kthvalue(max(1, int(0.9 * nz.numel()))).values
    wd = torch.where(dd > threshold, dd, 0.0)

    # 5. Syntactic coordinates: U S of the SVD of [left bigram | right bigram].
    syn = top_modes(pb @ pb.T + pf @ pf.T, coords)

    # 6. Physics: a seeded layout of the tokens under the springs, mass and asymmetry.
    pos, stats = physics_layout(ws, wd, asym, mass, h, gen)

    # 7. Spectral coordinates: the top modes of the coupling 2 w_s + 0.1 m m^T + 0.3 w_d + 1/d^3,
    # then the directional (x 0.5 std ratio) and syntactic (x 0.3 std ratio) coordinates appended.
    inv = torch.cdist(pos, pos).clamp_min(1e-3).pow(-3)
    inv.fill_diagonal_(0)
    spec = top_modes(2 * ws + 0.1 * mass[:, None] * mass[None, :] + 0.3 * wd + inv, modes)
    parts = [spec]
    for factor, coordinates in ((0.5, dirc), (0.3, syn)):
        parts.append(factor * spec.std() / coordinates.std().clamp_min(1e-12) * coordinates)
    sc = torch.cat(parts, 1)
    sc = sc / sc.std().clamp_min(1e-12)  # unit scale for the network's inputs

    # Static neighbours: the MANIFOLD_NEIGHBOURS nearest other tokens by cosine of sc.
    cos = F.normalize(sc, dim=1) @ F.normalize(sc, dim=1).T
    cos.fill_diagonal_(-2.0)
    return sc, cos.topk(h.manifold_neighbours, dim=1).indices.int(), stats


class CastedLinear(nn.Linear):
    """fp32 weights cast at use (bf16 autocast on GPU); `zero=True` starts the layer at exactly zero
    (after the usual init, so the RNG stream does not depend on it)."""

    def __init__(self, n_in, n_out, bias=True, zero=False):
        super().__init__(n_in, n_out, bias=bias)
        if zero:
            for p in self.parameters():
                nn.init.zeros_(p)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def sparsemax(z):
    """Sparsemax over the last dim (Martins & Astudillo 2016), tau from the valid entries only: -inf
    entries are masked and come out exactly 0. Every row must hold one finite entry (the caller's
    always-valid candidate); a fully masked row is never normalized."""
    zs = z.sort(dim=-1, descending=True).values
    cs = zs.cumsum(-1)
    r = torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype)
    k = (1 + r * zs > cs).sum(-1, keepdim=True)
    return (z - (cs.gather(-1, k - 1) - 1) / k).clamp_min(0)


def route(score, blocked, k):
    """Sparsemax over each row's top-k unblocked candidates (masked before the top-k, B.2 item 4),
    scattered back to a dense (..., T, T) weight matrix whose blocked entries are exactly 0."""
    masked = score.masked_fill(blocked, float("-inf"))
    val, idx = masked.topk(min(k, score.size(-1)), dim=-1)
    return torch.zeros_like(score).scatter(-1, idx, sparsemax(val))


class HopCell(nn.Module):
    """One hop: messages routed by sparsemax (causal top-k, plus static neighbours behind a gate)
    into a gated update MLP, manifold-guided attention, then the geodesic mixer capped at 0.2 |h|.
    FiLM comes from the caller (one FiLM per hop, so a shared cell still knows its hop)."""

    def __init__(self, h, S):
        super().__init__()
        D = h.model_dim
        hidden = int(h.mlp_mult * h.model_dim)
        H = h.num_heads
        self.heads = H
        self.topk = h.route_topk
        self.nb_k = h.manifold_neighbours + 1  # the static neighbours plus the token itself
        # Creation order is the RNG order of the init and the state_dict order: keep it.
        self.msg = CastedLinear(D, D)
        self.up = CastedLinear(2 * D, hidden)
        self.c_q = CastedLinear(D + 2 * S, D)
        self.c_k = CastedLinear(D + S, D)
        self.c_v = CastedLinear(D, D)
        self.mix_in = CastedLinear(D, hidden)
        self.mix_gate = CastedLinear(S, hidden)
        # Zero-initialized outputs: each branch starts as a no-op (the attention projection replaces
        # the seed's sigmoid(-5) gate).
        self.down = CastedLinear(hidden, D, zero=True)
        self.proj = CastedLinear(D, D, zero=True)
        self.mix_out = CastedLinear(hidden, D, zero=True)
        # seed: 5 (endpoint_sim * H + 0.5 msg_sim)
        self.route_scale = nn.Parameter(torch.tensor([5.0, 2.5]))
        # w_m in the attention score w_m scn_i . scn_j
        self.manifold_bias = nn.Parameter(torch.ones(H))
        # recency bias per bucket: the attention heads, then the router
        self.rel_bias = nn.Parameter(torch.zeros(H + 1, RECENCY_BUCKETS))
        # the static-neighbour route starts nearly shut (seed)
        self.nb_gate = nn.Parameter(torch.tensor(-4.0))

    def attention(self, z, c):
        """Q from [z; scn; velocity], K from [z; scn]; score q.k / sqrt(d) + w_m scn_i . scn_j plus
        the recency bias; no clamp, the causal mask with -inf last, softmax in fp32 (B.2 item 2)."""
        B, T, D = z.shape
        H = self.heads
        dh = D // H
        scn = c["scn"].to(z.dtype)
        vel = c["vel"].to(z.dtype)
        q = self.c_q(torch.cat([z, scn, vel], -1)).view(B, T, H, dh).transpose(1, 2)
        q = F.rms_norm(q, (dh,))
        k = self.c_k(torch.cat([z, scn], -1)).view(B, T, H, dh).transpose(1, 2)
        k = F.rms_norm(k, (dh,))
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(dh)
        s = s + self.manifold_bias[:, None, None] * c["sim"][:, None]
        s = s + self.rel_bias[:H][:, c["bucket"]]
        p = torch.softmax(s.masked_fill(c["future"], float("-inf")), dim=-1)
        y = p.to(z.dtype) @ self.c_v(z).view(B, T, H, dh).transpose(1, 2)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, h, film, sc, c, entropy):
        """(new h, A), A being the causal top-k routing weights the next hop's transport reads."""
        scale, shift, gate = film.chunk(3, dim=-1)
        z = F.rms_norm(h, (h.size(-1),)) * (1 + scale) + shift
        # Routing score: a (scn_i . scn_j) H_i + b cos(msg_i, msg_j) + recency bias.
        msg = self.msg(z)
        mn = F.normalize(msg.float(), dim=-1)
        score = (
            self.route_scale[0] * c["sim"] * entropy[..., None]
            + self.route_scale[1] * (mn @ mn.transpose(1, 2))
            + self.rel_bias[-1][c["bucket"]]
        )
        A = route(score, c["future"], self.topk)
        weights = A + torch.sigmoid(self.nb_gate) * route(score, c["not_nb"], self.nb_k)
        routed = weights.to(msg.dtype) @ msg
        update = torch.sigmoid(gate) * self.down(F.gelu(self.up(torch.cat([z, routed], -1))))
        h = h + update + self.attention(z, c)
        # Geodesic mixer, its update scaled down to at most 0.2 |h| per position (the scale is a
        # constant in backward).
        mixed = F.gelu(self.mix_in(F.rms_norm(h, (h.size(-1),))))
        mix = self.mix_out(mixed * torch.sigmoid(self.mix_gate(sc)))
        cap = 0.2 * h.norm(dim=-1, keepdim=True) / mix.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return h + mix * cap.clamp(max=1.0).detach(), A


class ManifoldLM(nn.Module):
    """The manifold token-graph LM: the frozen manifold tables, the input fusion, NUM_LAYERS hops of
    HOP_CELLS cells with per-hop FiLM and parallel transport, and the head."""

    def __init__(self, h):
        super().__init__()
        V = h.vocab_size
        D = h.model_dim
        _, _, S = manifold_dims(h)
        self.softcap = h.logit_softcap
        self.tau = h.velocity_tau
        self.tok_emb = nn.Embedding(V, D)
        # The manifold: zeros of the right shapes until `prepare_training` builds it, so that
        # `load_artifact` loads strictly. sc is a frozen Embedding, so the causality audit hooks it.
        self.sc_emb = nn.Embedding.from_pretrained(torch.zeros(V, S), freeze=True)
        self.register_buffer("static_nb", torch.zeros(V, h.manifold_neighbours, dtype=torch.int32))
        self.sc_mlp = nn.Sequential(CastedLinear(S, D), nn.GELU(), CastedLinear(D, D))
        self.in_proj = CastedLinear(2 * D, D)
        # One FiLM per hop from sc: scale, shift and the update gate.
        self.films = nn.ModuleList(CastedLinear(S, 3 * D, zero=True) for _ in range(h.num_layers))
        self.cells = nn.ModuleList(HopCell(h, S) for _ in range(min(h.hop_cells, h.num_layers)))
        self.transport = None
        if h.num_layers > 1:
            self.transport = CastedLinear(S, D, bias=False)
        # Untied head with bias (the seed's): the input embedding is fused with sc through in_proj,
        # so its geometry is not the output's; the bias holds the unigram. TIE_EMBEDDINGS=1 shares
        # tok_emb.
        self.lm_head = None
        if not h.tie_embeddings:
            self.lm_head = CastedLinear(D, V, bias=False, zero=True)
        self.lm_bias = nn.Parameter(torch.zeros(V))
        if h.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)

    @torch.no_grad()
    def prepare_training(self, h, rt, logger):
        """Count the first MANIFOLD_TOKENS train tokens (whole shards split over ranks, counts
        all-reduced), build the manifold, and give every rank rank 0's bytes (GPU atomics may differ
        in the last bit). Runs inside the training budget (B.2 item 6)."""
        t0 = time.perf_counter()
        files = shard_files(h.data_path, "train")
        if any("_val_" in os.path.basename(p) for p in files):
            raise RuntimeError(
                f"DATA_PATH={h.data_path!r}: a validation shard is in the manifold's train list"
            )
        sizes = np.cumsum([(os.path.getsize(p) - SHARD_HEADER_BYTES) // 2 for p in files])
        files = files[: int(np.searchsorted(sizes, h.manifold_tokens)) + 1]
        mine = (load_data_shard(p) for p in files[rt.rank :: rt.world_size])
        counts = []
        # Progress (issue 18): the count's shards, then the build as one unit.
        progress = Progress("manifold build", len(files[rt.rank :: rt.world_size]) + 1)
        for c in count_cooccurrence(mine, h.vocab_size, rt.device):
            counts.append(dist_sum(c))
        t1 = time.perf_counter()
        with torch.enable_grad():
            sc, nb, stats = build_manifold(counts, h)
        progress.advance()
        progress.close()
        self.sc_emb.weight.copy_(sc)
        self.static_nb.copy_(nb)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.sc_emb.weight.data, 0)
            dist.broadcast(self.static_nb, 0)
        logger.log0(
            f"manifold: bigrams:{int(counts[0].sum())} shards:{len(files)} sc:{tuple(sc.shape)} "
            f"{stats} count:{t1 - t0:.1f}s build:{time.perf_counter() - t1:.1f}s"
        )

    def context(self, x, scn):
        """Causal tables shared by the hops of one forward.

        - masks: `future` (j > i) and `not_nb` (everything but the static-neighbour candidates);
        - recency buckets log2(1 + i - j);
        - velocity v_i = scn_i - sum_{j<i} w_ij scn_j, w_ij ~ exp(-(i - j) / tau) normalized over
          j < i, so recent tokens dominate (B.2 item 3; V18 had the sign reversed), v_0 = 0;
        - manifold similarity scn_i . scn_j;
        - static-neighbour candidates: j < i holding a static neighbour of x_i, each neighbour token
          at its most recent occurrence before i (its next occurrence is at or after i: a causal
          test), plus i itself.
        """
        T = x.size(1)
        i = torch.arange(T, device=x.device)
        gap = i[:, None] - i[None, :]
        past = gap > 0
        w = torch.exp(-gap.clamp_min(0).float() / self.tau) * past
        # Row 0 has no past: its weights are all zero, and its velocity is set to 0 below.
        vel = scn - (w / w.sum(-1, keepdim=True).clamp_min(1e-30)) @ scn
        # nxt[j]: the next occurrence of token x_j after j (T if none), from one sort by token.
        key = (x * T + i).sort(dim=-1).values
        tok = key // T
        p = key % T
        same = tok[:, 1:] == tok[:, :-1]
        nxt = torch.full_like(x, T).scatter(1, p[:, :-1], torch.where(same, p[:, 1:], T))
        V = self.sc_emb.num_embeddings
        adj = torch.zeros(V, V, dtype=torch.bool, device=x.device)
        adj = adj.scatter_(1, self.static_nb.long(), True)
        latest = nxt[:, None, :] >= i[:, None]
        nb = (adj[x[:, :, None], x[:, None, :]] & past & latest) | (gap == 0)
        bucket = torch.log2(1 + gap.clamp_min(0).float()).long().clamp_max(RECENCY_BUCKETS - 1)
        return {
            "future": gap < 0,
            "not_nb": ~nb,
            "scn": scn,
            "vel": vel * past.any(-1)[:, None],
            "bucket": bucket,
            "sim": scn @ scn.transpose(1, 2),
        }

    def logits(self, h):
        """Softcapped logits of the head (tied or not) with its bias, in fp32."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        normed = F.rms_norm(h, (h.size(-1),))
        logits = F.linear(normed, w.to(h.dtype), self.lm_bias.to(h.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward_logits(self, input_ids):
        sc = self.sc_emb(input_ids)
        c = self.context(input_ids, F.normalize(sc.float(), dim=-1))
        h = self.in_proj(torch.cat([self.sc_mlp(sc), self.tok_emb(input_ids)], -1))
        A = None
        for layer, film in enumerate(self.films):
            if A is not None:
                # Parallel transport, blend 0.2: h <- 0.8 h + 0.2 (I - 2 u u^T) h, with u pointing
                # from the token's point p to its routed context's point A p (unit length, or
                # shorter when the two nearly coincide).
                p = self.transport(sc)
                d = (p - A.to(p.dtype) @ p).float()
                u = (d * torch.rsqrt(d.square().sum(-1, keepdim=True) + 1e-6)).to(h.dtype)
                h = h - 0.4 * u * (u * h).sum(-1, keepdim=True)
            with torch.no_grad():  # the normalized output entropy steers the router (seed)
                lp = self.logits(h).log_softmax(-1)
                entropy = -(lp.exp() * lp).sum(-1) / math.log(lp.size(-1))
            cell = self.cells[layer % len(self.cells)]
            h, A = cell(h, film(sc), sc, c, entropy)
        return self.logits(h)

    def forward(self, input_ids, target_ids):
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def build_model(h):
    if h.route_topk < 1 or h.hop_cells < 1:
        raise ValueError(f"ROUTE_TOPK={h.route_topk} and HOP_CELLS={h.hop_cells} must be positive")
    return ManifoldLM(h)


def param_groups(model, h):
    """Muon for the 2-D weights of linear layers; Adam for the embedding, the head, biases, gates
    and tables; the frozen manifold goes to neither. Gradients are averaged the standard DDP way
    (no V18 "selective gradient", B.2 item 7)."""
    head = [model.tok_emb.weight]
    if model.lm_head is not None:
        head.append(model.lm_head.weight)
    matrices = []
    scalars = []
    for name, p in model.named_parameters():
        if not p.requires_grad or any(p is q for q in head):
            continue
        if p.ndim == 2 and name.endswith(".weight"):
            matrices.append(p)
        else:
            scalars.append(p)
    embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
    groups = [
        {"params": [model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr},
        {"params": scalars, "lr": h.scalar_lr, "base_lr": h.scalar_lr},
    ]
    if model.lm_head is not None:
        groups.append({"params": [model.lm_head.weight], "lr": h.head_lr, "base_lr": h.head_lr})
    return matrices, groups


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
# The loop, serialization, audits and final eval are the shared train block; this script adds
# nothing.


def main():
    return run_main(Hyperparameters.from_env())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
