"""Configuration: the shared hyperparameters every model has, read from UPPER_SNAKE environment
variables (named as in the records) after a PRESET's defaults, each converted and checked with the
variable named in the error.
"""

import dataclasses
import math
import os
from dataclasses import dataclass


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


def ttt_short_chunk_steps(h):
    """TTT_SHORT_SCORE_FIRST_STEPS ("256:8,2000:24") as [(longest document, chunk)] sorted by
    document length; "" gives []."""
    steps = []
    for item in h.ttt_short_score_first_steps.split(","):
        if not item.strip():
            continue
        doc_len, sep, chunk = item.partition(":")
        try:
            step = (int(doc_len), int(chunk))
        except ValueError:
            step = None
        if not sep or step is None or min(step) <= 0:
            raise ValueError(
                f"TTT_SHORT_SCORE_FIRST_STEPS={h.ttt_short_score_first_steps!r}: expected "
                "comma-separated doc_len:chunk pairs of positive integers, e.g. '256:8,2000:24'"
            )
        steps.append(step)
    steps.sort()
    lengths = [doc_len for doc_len, _ in steps]
    if len(set(lengths)) != len(lengths):
        raise ValueError(
            f"TTT_SHORT_SCORE_FIRST_STEPS={h.ttt_short_score_first_steps!r}: a document length "
            "is listed twice"
        )
    return steps


def ttt_short_chunk_schedule(h):
    """The [(longest document, chunk)] steps TTT_SHORT_SCORE_FIRST_ENABLED scores by: the
    TTT_SHORT_SCORE_FIRST_STEPS pairs, or where there are none #2014's single step,
    (TTT_SHORT_DOC_LEN, TTT_SHORT_CHUNK_SIZE; 0 = TTT_LORA_CHUNK)."""
    steps = ttt_short_chunk_steps(h)
    if steps:
        return steps
    chunk = h.ttt_short_chunk_size
    if chunk == 0:
        chunk = h.ttt_lora_chunk
    return [(h.ttt_short_doc_len, chunk)]


# TTT_LORA_FORM values: our per-module adapters, or #2135's per-pass ones.
TTT_LORA_FORMS = ("module", "record")

# TTT_DOC_ORDER values: the val file's order, or longest document first (#2135).
TTT_DOC_ORDERS = ("stream", "length")

# TTT_MASK values (#1953, #2014): the adapter roles each one removes ("all" and "baseline_all"
# are the records' spellings of "", every role).
TTT_MASKS = {
    "": (),
    "all": (),
    "baseline_all": (),
    "no_q": ("q",),
    "no_v": ("v",),
    "no_qv": ("q", "v"),
}


def train_seq_plan(h):
    """TRAIN_SEQ_SCHEDULE (progressive sequence length, #2014) as [(until, seq_len), ...] sorted by
    `until`, the fraction of the training budget up to which seq_len is used; the last stage runs
    to the end (1.0). Unset: [(1.0, TRAIN_SEQ_LEN)]. E.g. "1024@0.1,2048@0.7,3072@1.0"."""
    name = "TRAIN_SEQ_SCHEDULE"
    stages = [s.strip() for s in h.train_seq_schedule.split(",") if s.strip()]
    plan = []
    for stage in stages:
        length, _, until = stage.partition("@")
        try:
            plan.append((float(until), int(length)))
        except ValueError:
            raise ValueError(
                f"{name}={h.train_seq_schedule!r}: stage {stage!r} is not LEN@FRACTION "
                "(e.g. 1024@0.1)"
            ) from None
    if not plan:
        return [(1.0, h.train_seq_len)]
    plan.sort()
    for until, length in plan:
        if length <= 0 or not 0.0 < until <= 1.0:
            raise ValueError(
                f"{name}={h.train_seq_schedule!r}: lengths must be positive and fractions in (0, 1]"
            )
    if plan[-1][0] < 1.0:
        plan.append((1.0, plan[-1][1]))
    return plan


def scheduled_seq_len(plan, progress):
    """The sequence length of the first stage whose `until` is at or past `progress` (#2014)."""
    for until, length in plan:
        if progress <= until:
            return length
    return plan[-1][1]


QUANT_INT_BITS = (4, 5, 6, 7, 8)  # the widths of per-row int-k


# The eval modes (golf.modes maps each to its function and log label) and the single-stream
# compressors (golf.codec.COMPRESSORS): named here, where the configuration checks them.
EVAL_MODE_NAMES = ("standard", "sliding", "ttt", "ttt_lora", "ttt_phased")
COMPRESSOR_NAMES = ("zstd", "lzma", "zlib")


# The most of each field that sets a model's size: an artifact header's hyperparameters go through
# `validate` too, so that no header makes a reader build an absurd model (load_artifact then builds
# it on the meta device and compares every shape with the header's tensors before allocating).
SHAPE_LIMITS = {
    "num_layers": 256,
    "model_dim": 16384,
    "num_heads": 256,
    "num_kv_heads": 256,
    "mlp_mult": 64.0,
}

# The laptop defaults every model's `smoke` preset starts from: the embedded corpus, ~150 s of CPU
# training, EMA and a short warmdown, and (issue 18) a quick look: a fixed val prefix, never an
# official score, with only the final figure of the artifact; PRE_QUANT_EVAL=1, ROUNDTRIP_EVAL=1
# and VAL_MAX_TOKENS=0 ask for the rest. Each model adds its shape.
SMOKE_PRESET = {
    "data_path": "data/datasets/pydoc_sp1024",
    "tokenizer_path": "data/tokenizers/pydoc_1024_bpe.model",
    "iterations": 2000,
    "warmup_steps": 2,
    "warmdown_frac": 0.3,
    "max_wallclock_seconds": 150.0,
    "train_batch_tokens": 16384,
    "train_seq_len": 256,
    "val_batch_size": 32768,
    "val_loss_every": 100,
    "train_log_every": 25,
    "status_every": 10,
    "compile": False,
    "matrix_lr": 0.03,
    "ema_decay": 0.99,
    "muon_momentum_warmup_steps": 50,
    "eval_mode": "sliding",
    "eval_stride": 64,
    "val_max_tokens": 65536,
    "pre_quant_eval": False,
    "roundtrip_eval": False,
    "smoke_autosize": True,
}

# Issue 25: a smoke run bound by MAX_WALLCLOCK_SECONDS sizes itself to the machine (SMOKE_AUTOSIZE;
# the decisions below, size_smoke_batch and size_smoke_evals; the measurements in golf.train). On a
# CPU 2.4x slower than ours a 60 s run made 10 steps of 6.1 s and barely learned, and the manifold's
# final eval took 0.64x its training minute. From the measured warmup steps the run picks
# TRAIN_BATCH_TOKENS within the bounds below so that the loop makes at least SMOKE_MIN_STEPS steps
# (aiming SMOKE_STEP_MARGIN above it, for the noise of a busy machine), and from a measured probe
# eval it picks VAL_MAX_TOKENS so that the evals cost at most SMOKE_EVAL_SHARE of the training time
# (aiming SMOKE_EVAL_AIM). An explicit TRAIN_BATCH_TOKENS or VAL_MAX_TOKENS wins over its sizing; an
# ITERATIONS-bound run (MAX_WALLCLOCK_SECONDS=0) is never sized, so its figures stay deterministic.
SMOKE_MIN_STEPS = 30
SMOKE_STEP_MARGIN = 1.2
# Tokens per step: at most the preset's batch (a fast machine makes more steps, not larger ones),
# at least 4096: 30 steps of the gpt smoke model (busy 2-core CPU, ITERATIONS=30) land 0.44 bpb
# below the unigram floor at 4096 tokens a step but only 0.19 below it at 2048.
SMOKE_BATCH_MIN = 4096
SMOKE_BATCH_MAX = 16384
SMOKE_EVAL_SHARE = 0.5
SMOKE_EVAL_AIM = 0.4
# The fewest val targets the sizing keeps (fewer say little); where even these cost more than
# SMOKE_EVAL_SHARE, the sizing's line warns.
SMOKE_VAL_MIN_TOKENS = 4096


def smoke_sizing_off(h, name):
    """Why the smoke sizing leaves the field `name` (train_batch_tokens or val_max_tokens) as it
    is, or None where it sizes it: only a SMOKE_AUTOSIZE run bound by MAX_WALLCLOCK_SECONDS whose
    environment did not give the variable itself."""
    if not h.smoke_autosize:
        return "SMOKE_AUTOSIZE=0"
    if h.max_wallclock_seconds <= 0:
        return "MAX_WALLCLOCK_SECONDS=0: an ITERATIONS-bound run is never sized"
    if name == "val_max_tokens" and h.val_max_tokens <= 0:
        return "VAL_MAX_TOKENS=0: the whole val split is scored"
    if name in h.given:
        return f"{name.upper()}={getattr(h, name)} given"
    return None


def smoke_batch_bounds(h):
    """(smallest, largest) tokens per step the sizing may choose: multiples of 8 x TRAIN_SEQ_LEN
    (the loader's quantum: a whole sequence per rank and micro-step) from SMOKE_BATCH_MIN to
    SMOKE_BATCH_MAX."""
    quantum = 8 * h.train_seq_len
    low = max(math.ceil(SMOKE_BATCH_MIN / quantum), 1) * quantum
    return low, max(SMOKE_BATCH_MAX // quantum * quantum, low)


def smoke_probe_batch(h, batch):
    """The second batch the sizing times: a quarter of `batch` (a multiple of the loader's
    quantum), at least the smallest bound."""
    quantum = 8 * h.train_seq_len
    return max(smoke_batch_bounds(h)[0], batch // 4 // quantum * quantum)


def step_time_model(timings):
    """(fixed seconds, seconds per token) of a training step, from timed steps [(tokens,
    seconds)]: the line through two sizes (the fixed part is the optimizer's Newton-Schulz and the
    per-step overheads, ~0.5 s of hydra's 1.3 s at 2048 tokens on a busy CPU). Where noise makes
    that line absurd, the cautious proportional model: the larger of the two per-token rates."""
    tokens, seconds = timings[0]
    per_token = max(seconds, 1e-9) / tokens
    if len(timings) < 2:
        return 0.0, per_token
    small, small_s = timings[1]
    slope = (seconds - small_s) / (tokens - small)
    intercept = seconds - slope * tokens
    if slope > 0 and intercept >= 0:
        return intercept, slope
    return 0.0, max(per_token, small_s / small)


def size_smoke_batch(h, timings, loop_s):
    """TRAIN_BATCH_TOKENS for a smoke run: the largest multiple of 8 x TRAIN_SEQ_LEN within
    smoke_batch_bounds whose predicted step lets the `loop_s` seconds of the loop make
    SMOKE_MIN_STEPS x SMOKE_STEP_MARGIN steps. Returns {tokens, fixed_s, per_token_s, step_s,
    expected_steps, loop_s, line}: the choice, the step model and the one log line."""
    low, high = smoke_batch_bounds(h)
    fixed, per_token = step_time_model(timings)
    aim = SMOKE_MIN_STEPS * SMOKE_STEP_MARGIN
    loop_s = max(loop_s, 0.0)
    fits = (loop_s / aim - fixed) / per_token  # tokens whose step lasts loop_s / aim
    quantum = 8 * h.train_seq_len
    tokens = int(min(max(math.floor(fits / quantum) * quantum, low), high))
    step_s = fixed + per_token * tokens
    expected = int(loop_s / step_s)
    measured = ", ".join(f"{n} tokens in {sec:.2f}s" for n, sec in timings)
    short = ""
    if expected < SMOKE_MIN_STEPS:
        short = f" WARNING: fewer than {SMOKE_MIN_STEPS} steps even at the smallest batch;"
    line = (
        f"smoke_sizing: TRAIN_BATCH_TOKENS={tokens} (bounds {low}..{high}) from the timed "
        f"steps ({measured}; a step ~{fixed:.2f}s + {1e3 * per_token:.3f}s per 1000 tokens): "
        f"~{expected} steps of ~{step_s:.2f}s in the loop's {loop_s:.1f}s of "
        f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} (at least {SMOKE_MIN_STEPS} wanted);"
        f"{short} TRAIN_BATCH_TOKENS=N or SMOKE_AUTOSIZE=0 overrides"
    )
    return {
        "tokens": tokens,
        "fixed_s": fixed,
        "per_token_s": per_token,
        "step_s": step_s,
        "expected_steps": expected,
        "loop_s": loop_s,
        "line": line,
    }


def smoke_eval_counts(h, mode, expected_steps):
    """{eval mode: how many times the run scores the val prefix with it}: the periodic
    validations (every VAL_LOSS_EVERY steps and the last; standard windows), PRE_QUANT_EVAL, the
    roundtrip and the final mode."""
    periodic = 0
    if h.val_loss_every > 0:
        periodic = expected_steps // h.val_loss_every + 1
    standard = periodic + int(h.pre_quant_eval)
    if mode == "standard" or h.roundtrip_eval:
        standard += 1
    counts = {"standard": standard}
    if mode != "standard":
        counts[mode] = 1
    return counts, periodic


def size_smoke_evals(h, per_target_s, periodic_fixed_s, expected_steps, available):
    """VAL_MAX_TOKENS for a smoke run: the most val targets (a multiple of 1024, within
    [SMOKE_VAL_MIN_TOKENS, the preset's prefix `available`]) that the run's evals score in
    SMOKE_EVAL_AIM of MAX_WALLCLOCK_SECONDS (SMOKE_EVAL_SHARE is the promise), from the measured
    seconds per target of each mode (`per_target_s`) and the fixed cost of each periodic
    validation (the coherence sample and the model's probes). Returns {tokens, expected_s,
    counts, line}."""
    counts, periodic = smoke_eval_counts(h, h.final_eval_mode, expected_steps)
    budget_s = SMOKE_EVAL_AIM * h.max_wallclock_seconds - periodic * periodic_fixed_s
    rate = sum(n * per_target_s[m] for m, n in counts.items())  # seconds per val target
    low = min(max(SMOKE_VAL_MIN_TOKENS, h.eval_len), available)
    fits = math.floor(max(budget_s, 0.0) / max(rate, 1e-12) / 1024) * 1024
    tokens = int(min(max(fits, low), available))
    expected_s = periodic * periodic_fixed_s + rate * tokens
    share = expected_s / h.max_wallclock_seconds
    over = ""
    if share > SMOKE_EVAL_SHARE:
        over = f" WARNING: over {SMOKE_EVAL_SHARE:g} of the training time even at the fewest;"
    costs = ", ".join(f"{m} x{n} {1e3 * per_target_s[m]:.3f}ms" for m, n in counts.items())
    line = (
        f"smoke_sizing: VAL_MAX_TOKENS={tokens} (bounds {low}..{available}) from probe evals "
        f"({costs} per target; {periodic} periodic validations with {periodic_fixed_s:.2f}s of "
        f"sample and probes each): evals ~{expected_s:.1f}s, {share:.2f} of "
        f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g} (at most {SMOKE_EVAL_SHARE:g} "
        f"wanted);{over} VAL_MAX_TOKENS=N or SMOKE_AUTOSIZE=0 overrides"
    )
    return {"tokens": tokens, "expected_s": expected_s, "counts": counts, "line": line}


@dataclass
class BaseHyperparameters:
    """The fields every model shares; each model module subclasses it as `Hyperparameters` with
    its own fields and `validate_model()`. `spec` is the model's ModelSpec (golf.contract), set
    when the model registers: its presets, builder and script."""

    spec = None  # a class attribute, not a field
    # The fields whose variables the environment gave (from_env sets it): an explicit
    # TRAIN_BATCH_TOKENS or VAL_MAX_TOKENS wins over the smoke sizing. A class attribute, not a
    # field: it is neither logged nor stored in an artifact.
    given = frozenset()

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
    # Telemetry: sample audits at each validation, the optional UCB1 shard mixer
    # (docs/techniques.md, Telemetry).
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
    # Progressive sequence length (#2014): LEN@FRACTION stages (see train_seq_plan); the tokens
    # per batch stay TRAIN_BATCH_TOKENS, so the rows per batch change. TRAIN_SEQ_LEN must be the
    # longest stage (the length RoPE/YaRN and the evals take as the training length, as in
    # #2014). The fraction is of the wallclock budget (wallclock, as the record) or of ITERATIONS
    # (step, and wallclock runs without a cap). Each switch re-warms the LR linearly over
    # SEQ_CHANGE_WARMUP_STEPS steps (32 in #2014; 0 = off).
    train_seq_schedule: str = ""
    train_seq_schedule_mode: str = "wallclock"
    seq_change_warmup_steps: int = 0
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
    # EVAL_INCLUDE_TAIL (#2014): the standard eval scores the targets after its last whole
    # TRAIN_SEQ_LEN window too (a shorter last window), so every target of the split is scored.
    eval_include_tail: bool = False
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
    # GPTQ_CALIB_SEQS counts the sequences (TRAIN_SEQ_LEN tokens) in the Hessians, summed over
    # the ranks. #2135's GPTQ_CALIBRATION_BATCHES=B means B loader batches of TRAIN_BATCH_TOKENS /
    # 8 tokens (world size x grad accum is 8) read by each rank, with rank 0's Hessians alone
    # written: B x TRAIN_BATCH_TOKENS / (8 x TRAIN_SEQ_LEN) sequences, so its 32 at 786,432 x
    # 2,048 is GPTQ_CALIB_SEQS=1536 here (our ranks split them: 1/8 of the time on 8 GPUs).
    gptq_calib_seqs: int = 32
    # GPTQ_CALIB_SOURCE: "train" continues the training loader where the loop stopped; "self"
    # samples from the model; "random" (#2135's GPTQ_CALIBRATION_MODE=random) reads random
    # TRAIN_SEQ_LEN windows of the rank's own training shards, seeded by the rank, not SEED.
    gptq_calib_source: str = "train"
    # GPTQ_RESERVE_MEASURED: the reserve is one calibration batch timed before the loop x the
    # batches a rank will read x GPTQ_RESERVE_SAFETY, instead of GPTQ_RESERVE_SECONDS (an explicit
    # GPTQ_RESERVE_SECONDS overrides a preset's measured reserve; both set explicitly is refused).
    gptq_reserve_measured: bool = False
    gptq_reserve_safety: float = 1.5
    # AWQ-lite (#1945): the AWQ_LITE_GROUP_TOP_K most salient AWQ_LITE_GROUP_SIZE-column groups of
    # the model's GPTQ matrices kept at AWQ_LITE_BITS inside GPTQ (needs GPTQ_ENABLED).
    awq_lite_enabled: bool = False
    awq_lite_bits: int = 8
    awq_lite_group_size: int = 64
    awq_lite_group_top_k: int = 1
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
    # TTT_DOC_ORDER: the order the LoRA TTT evals score the documents in, and so which documents
    # each TTT_PHASES count takes. "stream": the val file's order, so a phase's prefix is its first
    # documents. "length": longest first (ties in file order), as #2135's scheduler claims its
    # batches, so the prefix is the longest documents and the phase SGD trains on them, shortest
    # first (#2135's order for its global SGD).
    ttt_doc_order: str = "stream"
    # The eval/TTT levers of the 1.0565 frontier (#1953, #2014, #2135; issue 23). TTT_EVAL_SEQ_LEN:
    # the per-document LoRA context (0 = EVAL_SEQ_LEN); the phase trainer keeps EVAL_SEQ_LEN, as
    # in the records. TTT_MASK and the TTT_*_LORA switches drop adapter roles (Q, K, V, the
    # attention output O, the MLP). TTT_LOCAL_LR_MULT scales the per-document LoRA lr only, not
    # the phase SGD. TTT_SHORT_SCORE_FIRST_*: smaller score-first chunks for groups of short
    # documents.
    ttt_eval_seq_len: int = 0
    ttt_mask: str = ""
    ttt_q_lora: bool = True
    ttt_k_lora: bool = True
    ttt_v_lora: bool = True
    ttt_o_lora: bool = True
    ttt_mlp_lora: bool = True
    ttt_local_lr_mult: float = 1.0
    ttt_short_score_first_enabled: bool = False
    ttt_short_score_first_steps: str = ""
    # #2014's fallback where TTT_SHORT_SCORE_FIRST_STEPS is empty: a group whose longest document
    # is at most TTT_SHORT_DOC_LEN tokens is scored in chunks of TTT_SHORT_CHUNK_SIZE (0 means
    # TTT_LORA_CHUNK, #2014's default, so the switch alone changes nothing).
    ttt_short_doc_len: int = 512
    ttt_short_chunk_size: int = 0
    # #2135's LoRA form (#1767's levers; hidden defaults in its script): TTT_LORA_ALPHA scales
    # the adapter output by alpha / TTT_LORA_RANK; 0 (the default) means alpha = rank, scale 1,
    # whatever the rank (#2135: 144 at rank 80, scale 1.8). TTT_WARM_START_A: a group's reset
    # zeroes only B and each batch row keeps its A from the group before it, within a phase.
    # TTT_LORA_EPS: the eps of the per-document AdamW (1e-8, torch's default; #2135: 1e-10).
    ttt_lora_alpha: float = 0.0
    ttt_warm_start_a: bool = False
    ttt_lora_eps: float = 1e-8
    # TTT_LORA_FORM (#2135's parametrisation, golf/ttt.py): "module" (the default) puts one adapter
    # on each adapted module, shared by a looped layer's passes; "record" puts one adapter per
    # layer pass, the O and MLP adapters across the whole sublayer from its normed input, the
    # head adapter in logit space, and A drawn per batch row.
    ttt_lora_form: str = "module"
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
    # Issue 23 item 1: the token-only n-gram tilt of #2130/#2135 (golf/ngram.py), named as there:
    # a hint from the previous TOKEN_ORDER - 1 val tokens boosts one token by e^TOKEN_BOOST where
    # its share reaches TOKEN_THRESHOLD. Scoring only (every final eval mode), never gradients.
    ngram_tilt_enabled: bool = False
    token_order: int = 16
    token_threshold: float = 0.8
    token_boost: float = 2.625
    # Issue 25: a wallclock-bound run sizes its batch and val prefix to the machine (the smoke
    # preset turns it on; see SMOKE_MIN_STEPS above).
    smoke_autosize: bool = False

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        preset = env.get("PRESET", "record")
        presets = cls.spec.presets
        if preset not in presets:
            raise ValueError(
                f"PRESET={preset!r}: unknown preset (choose one of {', '.join(sorted(presets))})"
            )
        values = {"preset": preset, **presets[preset]}
        for f in dataclasses.fields(cls):
            name = f.name.upper()
            if name in env and f.name != "preset":
                values[f.name] = cls.parse_env_value(name, env[name], f.type)
        if values.get("ttt_enabled"):
            # One way to choose the final mode (issue 24): TTT_ENABLED=1 is EVAL_MODE=ttt.
            if "EVAL_MODE" in env and values.get("eval_mode") != "ttt":
                raise ValueError(
                    f"TTT_ENABLED=1 means EVAL_MODE=ttt (chunked score-first TTT), but "
                    f"EVAL_MODE={values.get('eval_mode')!r} is set too: choose one of them"
                )
            values["eval_mode"] = "ttt"
        if "GPTQ_RESERVE_SECONDS" in env:
            # An explicit reserve wins over a preset's measured one; both explicit is ambiguous.
            if "GPTQ_RESERVE_MEASURED" in env and values.get("gptq_reserve_measured"):
                raise ValueError(
                    f"GPTQ_RESERVE_SECONDS={env['GPTQ_RESERVE_SECONDS']!r} and "
                    "GPTQ_RESERVE_MEASURED=1 are both set: choose a fixed or a measured reserve"
                )
            values["gptq_reserve_measured"] = False
        h = cls(**values)
        h.given = frozenset(f.name for f in dataclasses.fields(cls) if f.name.upper() in env)
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
            "gptq_reserve_safety",
            "awq_lite_group_size",
            "awq_lite_group_top_k",
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
        self.validate_seq_schedule()
        if self.eval_stride > self.eval_len:
            self.bad("EVAL_STRIDE", f"must not exceed the eval window EVAL_SEQ_LEN={self.eval_len}")
        for name, allowed in (
            ("EVAL_MODE", EVAL_MODE_NAMES),
            ("QUANT_BITS", QUANT_INT_BITS),
            ("EMBED_BITS", QUANT_INT_BITS),
            ("QAT_BITS", (0, *QUANT_INT_BITS)),
            ("CLIP_METHOD", ("percentile", "search", "sdclip")),
            ("GPTQ_CALIB_SOURCE", ("train", "self", "random")),
            ("COMPRESSOR", ("auto", "pergroup", *COMPRESSOR_NAMES)),
            ("CODE_FORM", ("readable", "compact")),
            ("LQER_RANK", tuple(range(65))),
            ("AWQ_LITE_BITS", QUANT_INT_BITS),
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
        for name, most in SHAPE_LIMITS.items():
            if hasattr(self, name) and getattr(self, name) > most:
                self.bad(name, f"must be at most {most}")
        for name in ("size_margin", "gptq_reserve_seconds", "max_wallclock_seconds"):
            if getattr(self, name) < 0:
                self.bad(name, "must not be negative")
        if self.awq_lite_enabled and not self.gptq_enabled:
            self.bad("awq_lite_enabled", "AWQ-lite runs inside GPTQ: it needs GPTQ_ENABLED=1")
        if self.gptq_reserve_measured and self.gptq_calib_source == "self":
            # The probe reads a batch of training data (the loader's or random windows) as
            # calibrate will; generating samples is a cost it does not time.
            self.bad(
                "gptq_reserve_measured",
                "the probe times a training-data batch: with GPTQ_CALIB_SOURCE=self set "
                "GPTQ_RESERVE_SECONDS",
            )
        self.validate_lora_ttt()
        self.validate_ngram_tilt()
        self.validate_model()

    def validate_seq_schedule(self):
        """TRAIN_SEQ_SCHEDULE parses; its longest stage is TRAIN_SEQ_LEN; each stage's length
        divides the batch as TRAIN_SEQ_LEN must (rows of whole sequences on up to 8 ranks)."""
        plan = train_seq_plan(self)
        longest = max(length for _, length in plan)
        if longest != self.train_seq_len:
            self.bad(
                "TRAIN_SEQ_SCHEDULE",
                f"its longest stage ({longest}) must equal TRAIN_SEQ_LEN={self.train_seq_len}",
            )
        for _, length in plan:
            if self.train_batch_tokens % (8 * length):
                self.bad(
                    "TRAIN_BATCH_TOKENS",
                    f"must be a multiple of 8 x every TRAIN_SEQ_SCHEDULE length ({8 * length} "
                    f"for {length})",
                )
        if self.train_seq_schedule_mode not in ("wallclock", "step"):
            self.bad("TRAIN_SEQ_SCHEDULE_MODE", "must be wallclock or step")
        if self.seq_change_warmup_steps < 0:
            self.bad("SEQ_CHANGE_WARMUP_STEPS", "must not be negative")

    def validate_ngram_tilt(self):
        """The tilt's knobs: a context of 0..32 tokens (the record's 32 hash coefficients), a
        share threshold in (0, 1] (at 0 every position without a hint would be tilted), and a
        boost that does not push the hint down."""
        if not 1 <= self.token_order <= 33:
            self.bad("token_order", "must be in 1..33 (a context of up to 32 tokens)")
        if not 0.0 < self.token_threshold <= 1.0:
            self.bad("token_threshold", "must be in (0, 1]")
        if self.token_boost < 0:
            self.bad("token_boost", "must not be negative")

    def validate_lora_ttt(self):
        """The issue-16 knobs: LoRA TTT and its phases."""
        for name in ("ttt_lora_rank", "ttt_lora_chunk", "ttt_lora_batch_docs", "ttt_phase_epochs"):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        for name in ("ttt_lora_beta1", "ttt_lora_beta2", "ttt_phase_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self.bad(name, "must be in [0, 1)")
        for name in ("ttt_lora_wd", "ttt_local_lr_mult", "ttt_eval_seq_len", "ttt_lora_alpha"):
            if getattr(self, name) < 0:
                self.bad(name, "must not be negative")
        if not self.ttt_lora_eps > 0:
            self.bad("ttt_lora_eps", "must be positive")
        if self.ttt_lora_form not in TTT_LORA_FORMS:
            self.bad("ttt_lora_form", f"must be one of {', '.join(TTT_LORA_FORMS)}")
        if self.ttt_doc_order not in TTT_DOC_ORDERS:
            self.bad("ttt_doc_order", f"must be one of {', '.join(TTT_DOC_ORDERS)}")
        if self.ttt_mask not in TTT_MASKS:
            self.bad("ttt_mask", f"must be one of {', '.join(repr(m) for m in TTT_MASKS)}")
        ttt_phase_bounds(self)
        ttt_short_chunk_steps(self)
        if self.ttt_short_doc_len <= 0:
            self.bad("ttt_short_doc_len", "must be positive")
        if self.ttt_short_chunk_size < 0:
            self.bad("ttt_short_chunk_size", "must not be negative (0 = TTT_LORA_CHUNK)")

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
    def ttt_eval_len(self):
        """The per-document LoRA TTT context: TTT_EVAL_SEQ_LEN, else the eval window."""
        return self.ttt_eval_seq_len or self.eval_len

    @property
    def final_eval_mode(self):
        """The mode of the final score, decided here alone (the pipeline and eval_bpb.py read it):
        TTT_ENABLED=1 is the records' spelling of EVAL_MODE=ttt (from_env sets both, and refuses
        it beside another EVAL_MODE given in the environment)."""
        return "ttt" if self.ttt_enabled else self.eval_mode

    @property
    def record_track(self):
        """Whether the run competes on the 10-minute track: PRESET=record, any preset that sets
        RECORD_ATTEMPT (train_gpt.py's frontier and record_1855), or RECORD_ATTEMPT=1."""
        return self.preset == "record" or self.record_attempt
