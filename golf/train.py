"""The training pipeline every model runs, in named stages: open the run, build the model, train,
calibrate, serialize and reload, audit, final eval, summarize.
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from golf.bpb import (
    SidecarBytes,
    audit_bytes,
    build_sentencepiece_luts,
    byte_source,
    load_tokenizer,
    target_bytes,
    val_byte_counter,
)
from golf.config import (
    BaseHyperparameters,
    scheduled_seq_len,
    size_smoke_batch,
    size_smoke_evals,
    smoke_batch_bounds,
    smoke_eval_counts,
    smoke_probe_batch,
    smoke_sizing_off,
    train_seq_plan,
)
from golf.container import (
    artifact_state,
    compact_builder,
    compact_running,
    load_artifact,
    readable_size,
    running_source,
    save_artifact,
)
from golf.contract import model_hook
from golf.data import (
    DistributedTokenLoader,
    check_data_present,
    load_checked_val_tokens,
    load_data_shard,
    random_calibration_windows,
    shard_files,
    val_token_count,
)
from golf.evaluation import _autocast, adapted_scalars, audit_causality, eval_val
from golf.modes import EVAL_MODES
from golf.optim import EMA, Muon, lr_multiplier, muon_momentum_at, zeropower_via_newtonschulz5
from golf.quant import (
    QuantScheme,
    calibration_batch_rows,
    collect_hessians,
    enable_qat,
    gptq_calibrate,
    qat_step_hook,
    quantize_state_dict,
)
from golf.report import (
    PRE_QUANT_LABEL,
    TRAIN_LIMIT_S,
    TimeLedger,
    describe_tilt,
    reserve_overrun,
    summarize,
)
from golf.runtime import (
    RunLogger,
    Runtime,
    device_description,
    dist_max,
    remove_stale_temps,
    seed_everything,
    set_progress_logger,
    setup_runtime,
)
from golf.telemetry import (
    ShardMixer,
    Smma,
    coherence_score,
    embedding_probes,
    generate_sample,
)

# The training pipeline every script runs, in named stages (run_main is their table of contents):
# open the run (tokenizer, val data, loader: made once) -> build the model -> train
# (warmup-then-restore for compile priming outside the clock, the wallclock-capped loop with the
# stop decision all-reduced, EMA, periodic validation with a coherence sample) -> calibrate (GPTQ)
# -> serialize and re-read from disk -> audits -> final eval -> summary. Each stage writes its time
# to the TimeLedger. Models plug in through the hooks of the model contract (golf/contract.py);
# the run's telemetry (smoothed losses, samples, probes, the shard mixer) is golf/telemetry.py.


def build_optimizers(model, h, device):
    """Muon for the model's matrices, AdamW for everything else (`param_groups` decides)."""
    matrices, adam_groups = h.spec.param_groups(model, h)
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


# Issue 25: the smoke sizing's measurements; its decisions are in golf/config.py.


def time_train_step(train_step, step, tokens, device, seq_len=None):
    """Seconds that one training step of `tokens` (rows of `seq_len`, default TRAIN_SEQ_LEN) takes
    here (the smoke sizing's measurement; tests replace it to simulate a slower CPU)."""
    started = time.perf_counter()
    train_step(step, 1.0, tokens, seq_len)
    _sync(device)
    return time.perf_counter() - started


@dataclass
class RunContext:
    """What the stages share, made once by `open_run`: the tokenizer, the val tokens with their byte
    lookup tables, and the training token loader are loaded once and passed on."""

    h: BaseHyperparameters
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
        # The periodic val loss is a training curve: untilted (the tilt is a scoring rule of the
        # final evals, and its precompute would rerun at every validation).
        self.h = dataclasses.replace(run.h, ngram_tilt_enabled=False)

    def __call__(self, step, train_ms):
        h = self.run.h
        logger = self.run.logger
        res = eval_val(self.h, self.model, self.run.val_tokens, self.run.luts)
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


def train_model(h, rt, model, logger, ledger=None, validator=None, loader=None, after_warmup=None):
    """Train `model` in place. Returns (EMA or None, loop statistics). Writes the warmup and loop
    times to `ledger` (a TimeLedger; a scratch one when none is given) and reads its
    precompute_s, which the wallclock cap subtracts along with the loop's own setup. `loader`: the
    run's training token loader (made here when None). A smoke run bound by the wallclock sizes
    its batch from the timed warmup steps (size_smoke_batch; h.train_batch_tokens is set);
    `after_warmup(model, expected_steps)`, when given, runs inside the excluded warmup, before the
    model is restored (the run's eval sizing, told how many steps the loop should make)."""
    entered = time.perf_counter()
    ledger = ledger or TimeLedger()
    device = rt.device
    if h.qat_start_frac > 0:
        n = enable_qat(model, h)
        qat_scheme = QuantScheme("int", h.qat_bits or h.quant_bits)
        logger.log0(f"qat: {n} matrices fake-quantized to {qat_scheme} from {h.qat_start_frac:.2f}")
    step_model = model
    if h.compile and device.type == "cuda":  # `compiled` below: the same test
        # dynamic=False: one graph per input shape. A TRAIN_SEQ_SCHEDULE (#2014) therefore
        # recompiles once per sequence length (times the two recurrence states); warmup below
        # primes every one of them outside the clock.
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
    seq_plan = train_seq_plan(h)
    seq_len = seq_plan[0][1]
    if h.train_seq_schedule:
        stages = ",".join(f"{length}@{until:.3f}" for until, length in seq_plan)
        logger.log0(
            f"train_seq_schedule: {stages} mode:{h.train_seq_schedule_mode} "
            f"seq_change_warmup_steps:{h.seq_change_warmup_steps} "
            f"batch:{h.train_batch_tokens} tokens at every length"
        )

    def train_step(step, lr_scale, batch_tokens=None, seq_len=None):
        total = torch.zeros((), device=device)
        for micro in range(rt.grad_accum_steps):
            # TRAIN_BATCH_TOKENS at every length: the rows per batch follow seq_len.
            x, y = loader.next_batch(
                batch_tokens or h.train_batch_tokens,
                seq_len or h.train_seq_len,
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
    # to compile, so it keeps one step (allocator and kernel first-use costs) and says so (issue
    # 18).
    compiled = h.compile and device.type == "cuda"
    warmup_steps = h.warmup_steps if compiled else min(h.warmup_steps, 1)
    if warmup_steps < h.warmup_steps:
        logger.log0(
            f"warmup: {warmup_steps} step instead of WARMUP_STEPS={h.warmup_steps}: an eager run "
            "compiles nothing (WARMUP_STEPS primes torch.compile on CUDA)"
        )
    sizing_off = smoke_sizing_off(h, "train_batch_tokens")
    if sizing_off is None or after_warmup is not None:
        warmup_steps = max(warmup_steps, 1)  # the sizing times a warmup step
    elif h.smoke_autosize and h.max_wallclock_seconds > 0:
        logger.log0(f"smoke_sizing: batch not sized ({sizing_off})")
    if warmup_steps > 0 or after_warmup is not None:
        # Prime compile and kernels (and time the steps for the sizing), then restore the model,
        # the optimizers and the loader.
        t0 = time.perf_counter()
        loader_state = loader.state()
        initial, opt_states = copy.deepcopy(
            (model.state_dict(), [opt.state_dict() for opt in optimizers])
        )
        shapes = warmup_shapes(seq_plan, warmup_steps, progress_hook is not None)
        # The largest batch the sizing may choose is timed, never a larger preset value.
        first_batch = h.train_batch_tokens
        if sizing_off is None:
            first_batch = min(h.train_batch_tokens, smoke_batch_bounds(h)[1])
        timings = []
        for step in range(warmup_steps):
            length, progress = shapes[step]
            if progress_hook:
                # Both halves of a schedule that changes the graph (recurrence) get compiled.
                progress_hook(progress)
            seconds = time_train_step(train_step, step, first_batch, device, seq_len=length)
            timings.append((first_batch, seconds))
        unprimed = sorted({length for _, length in seq_plan} - {n for n, _ in shapes})
        if compiled and unprimed:
            logger.log0(
                f"warmup: WARMUP_STEPS={warmup_steps} leaves sequence lengths {unprimed} of "
                "TRAIN_SEQ_SCHEDULE unprimed: they compile on the clock"
            )
        timings = timings[-1:]  # the last step at that size: the first has first-use costs
        before_s = t0 - entered  # the setup that the wallclock cap also subtracts
        reserve_s = h.gptq_reserve_seconds if h.gptq_enabled else 0.0
        loop_s = h.max_wallclock_seconds - ledger.precompute_s - before_s - reserve_s
        expected_steps = h.iterations
        if sizing_off is None:
            small = smoke_probe_batch(h, first_batch)
            if small < first_batch:  # a second size: the fixed cost of a step (Muon, overheads)
                timings.append((small, time_train_step(train_step, warmup_steps, small, device)))
            choice = size_smoke_batch(h, timings, loop_s)
            choice = _broadcast(rt, choice)  # every rank trains with rank 0's choice
            h.train_batch_tokens = choice["tokens"]
            logger.log0(choice["line"])
            logger.event("smoke_sizing", part="batch", **choice)
            expected_steps = choice["expected_steps"]
        elif timings:
            expected_steps = int(max(loop_s, 0.0) / max(timings[0][1], 1e-9))
        if after_warmup is not None:
            after_warmup(model, min(expected_steps, h.iterations))
        model.load_state_dict(initial)
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        loader.restore(loader_state)
        ledger.warmup_excluded_s = time.perf_counter() - t0
        sized = " and the smoke sizing" if sizing_off is None or after_warmup else ""
        logger.log0(
            f"warmup: {warmup_steps} steps{sized} in {ledger.warmup_excluded_s:.1f}s "
            "(excluded from the clock)"
        )
    ema = EMA(model, h.ema_decay) if h.ema_decay > 0 else None
    last_log_ms = 0.0  # train time of the last step line
    smmas = {n: Smma(n) for n in (10, 100, 1000)}
    # GPTQ calibrates inside the training budget (#1001): the loop leaves it time. The loop gets
    # what the precompute and its own setup have not used.
    reserve = h.gptq_reserve_seconds if h.gptq_enabled else 0.0
    if h.gptq_enabled and h.gptq_reserve_measured:
        reserve = measured_gptq_reserve(h, rt, model, loader, logger)
    ledger.gptq_reserve_s = reserve
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
    rewarm_from = None  # the step of the last sequence-length switch, while its LR re-warms
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
        if h.train_seq_schedule:
            seq_frac = step / h.iterations
            if h.train_seq_schedule_mode == "wallclock" and cap_ms > 0:
                seq_frac = elapsed_ms / cap_ms
            new_len = scheduled_seq_len(seq_plan, seq_frac)
            if new_len != seq_len:
                logger.log0(
                    f"seq_len_switch: step:{step} seq_len:{new_len} (was {seq_len}) "
                    f"progress:{seq_frac:.3f} train_time:{elapsed_ms:.0f}ms"
                )
                logger.event("seq_len", step=step, seq_len=new_len, train_time_ms=elapsed_ms)
                seq_len = new_len
                if h.seq_change_warmup_steps > 0 and step > 0:
                    rewarm_from = step
            if rewarm_from is not None:
                # #2014's re-warmup: the LR ramps linearly back over SEQ_CHANGE_WARMUP_STEPS.
                ramp = (step - rewarm_from + 1) / h.seq_change_warmup_steps
                lr_scale *= min(ramp, 1.0)
                if ramp >= 1.0:
                    rewarm_from = None
        loss = train_step(step, lr_scale, seq_len=seq_len)
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
        log_now = h.train_log_every > 0 and (
            step <= 10
            or step % h.train_log_every == 0
            or approx_ms - last_log_ms >= 1000.0 * TRAIN_LOG_MAX_GAP_S
        )
        if log_now:
            last_log_ms = approx_ms
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


def measured_gptq_reserve(h, rt, model, loader, logger):
    """GPTQ_RESERVE_MEASURED: one calibration batch as calibrate reads it (a training-loader batch,
    or with GPTQ_CALIB_SOURCE=random the first batch of random windows, read by the same function
    from the same shards), its Hessians collected, summed over ranks, timed before the loop, x the
    batches each rank will read, x GPTQ_RESERVE_SAFETY; the slowest rank's time. The loader is
    restored, so training sees the same tokens; the probe's time counts in the loop's setup
    (inside the training clock)."""
    per_rank = max(1, h.gptq_calib_seqs // rt.world_size)
    rows = calibration_batch_rows(h)
    state = loader.state()
    _sync(rt.device)
    t0 = time.perf_counter()  # the batch's read counts too: calibrate reads its batches
    if h.gptq_calib_source == "random":
        # A fresh draw each call (no loader state): the probe reads the windows calibrate reads
        # first, each pass's shard headers, phases and orders included.
        windows = random_calibration_windows(
            h.data_path, min(rows, per_rank), h.train_seq_len, rt.rank, rt.world_size, h.vocab_size
        )
        x = windows[:, :-1].contiguous()
    else:
        x = loader.next_batch(h.train_batch_tokens, h.train_seq_len, rt.grad_accum_steps)[0]
        x = x[:per_rank]
    collect_hessians(model, [x], embed=h.gptq_embed)
    _sync(rt.device)
    elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=rt.device)
    loader.restore(state)
    batches = -(-per_rank // rows)
    per_batch_s = float(dist_max(elapsed))
    reserve = per_batch_s * batches * h.gptq_reserve_safety
    logger.log0(
        f"gptq:reserve measured {per_batch_s:.3f}s/batch x {batches} batches x "
        f"GPTQ_RESERVE_SAFETY={h.gptq_reserve_safety:g} = {reserve:.2f}s"
    )
    return reserve


def warmup_shapes(seq_plan, warmup_steps, recurrence):
    """(sequence length, recurrence progress 0.0 or 1.0) of each warmup step: every length of the
    schedule in order, each with both recurrence states when the model has a progress hook, spread
    evenly over the steps, so that each graph torch.compile will meet is compiled in warmup. One
    length: the first half of the steps at progress 0, the rest at 1 (as before schedules)."""
    lengths = list(dict.fromkeys(length for _, length in seq_plan))
    if len(lengths) == 1:
        return [(lengths[0], float(step >= warmup_steps // 2)) for step in range(warmup_steps)]
    combos = [
        (length, frac) for length in lengths for frac in ((0.0, 1.0) if recurrence else (0.0,))
    ]
    return [combos[step * len(combos) // max(warmup_steps, 1)] for step in range(warmup_steps)]


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


TRAIN_LOG_MAX_GAP_S = 20.0  # a step line at least this often, whatever TRAIN_LOG_EVERY (issue 25)


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


EVAL_WARMUP_SEQS = 8  # eval windows of training tokens the warm-up scores


def warm_up_eval(run, model, mode, force=False):
    """Before the eval clock, on CUDA: the final eval mode once over a few windows of TRAINING
    tokens (the first train shard; never val), so that compilation, Triton autotuning and the
    kernels' first use are not timed, as the records do; its time is logged as excluded. The
    result is thrown away; a TTT mode adapts copies and fresh adapters only, so the model scored
    next is unchanged. On the CPU nothing compiles: skipped, and the log says so (`force` runs it
    anyway, for tests). Returns the seconds it took."""
    h = run.h
    if not force and not (h.compile and run.rt.device.type == "cuda"):
        run.logger.log0("eval_warmup: skipped (CPU or COMPILE=0: nothing to compile or prime)")
        return 0.0
    t0 = time.perf_counter()
    files = shard_files(h.data_path, "train")
    n_tokens = EVAL_WARMUP_SEQS * max(h.eval_len, h.ttt_eval_len) + 1
    tokens = load_data_shard(files[0])[:n_tokens].to(device=run.rt.device, dtype=torch.int64)
    # training shards carry no byte sidecar: the tables count them (the figure is not used)
    luts = build_sentencepiece_luts(run.sp, h.vocab_size, run.rt.device)
    EVAL_MODES[mode].evaluate(h, model, tokens, luts)
    _sync(run.rt.device)
    seconds = time.perf_counter() - t0
    run.ledger.eval_warmup_excluded_s = seconds
    run.logger.log0(
        f"eval_warmup: {mode} on {tokens.numel()} training tokens in {seconds:.1f}s "
        "(excluded from the eval clock)"
    )
    return seconds


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
    if "ngram_tilt" in res:
        run.logger.log0(describe_tilt(label, res["ngram_tilt"]))
    run.logger.event("eval", label=label, **{k: v for k, v in res.items() if k != "score_first"})
    if res.get("adapted_scalars"):  # a TTT mode's adapted copy: did its learned scalars move?
        before = adapted_scalars(model)
        moved = " ".join(
            f"{name}:{before[name]:.9g}->{value:.9g}"
            for name, value in res["adapted_scalars"].items()
        )
        run.logger.log0(f"{label} adapted_scalars: {moved}")
    return res


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
    check_data_present(h)
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
    if h.code_form == "compact" and not compact_running():
        compact_builder()  # a missing builder fails the run now, not after its training
    logger.log0(running_source(h.spec).decode("utf-8") + "\n" + "=" * 100, console=False)
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
    if smoke_sizing_off(h, "val_max_tokens") is None:
        # The prefix is sized after the warmup (size_val_prefix): its floor is printed then.
        logger.log0(
            f"val_tokens: first {val_tokens.numel()} of {n_val} loaded; the smoke sizing "
            "chooses the prefix scored after the warmup"
        )
    elif h.val_max_tokens:
        unigram = log_quick_look(h, logger, val_tokens, luts, n_val)
    if isinstance(luts, SidecarBytes):
        source = luts.source
        logger.log0(
            "val_bytes: per-token original UTF-8 counts from fineweb_val_bytes_*.bin "
            f"({source['files']} files, sha256 {source['sha256'][:16]}..., manifest "
            f"{source['manifest']})"
        )
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


def log_quick_look(h, logger, val_tokens, luts, n_val):
    """The lines of a VAL_MAX_TOKENS run: which prefix is scored, and its unigram floor (returned)
    on the very targets scored."""
    logger.log0(
        f"val_tokens: first {val_tokens.numel()} of {n_val} (VAL_MAX_TOKENS): "
        "a quick look, not an official score"
    )
    unigram = unigram_bpb(h, val_tokens, luts)
    logger.log0(
        f"unigram_bpb: {unigram:.4f} (train-shard unigram counts, add-one, on the first "
        f"{max(val_tokens.numel() - 1, 0):,} val targets, the ones scored below; not the "
        "whole split): a trained model must land clearly below it"
    )
    return unigram


def probe_eval_seconds(h, model, mode, tokens, luts):
    """Seconds per target of eval `mode` on `tokens` (training tokens: never val), measured: the
    smoke sizing's probe (tests replace it to simulate a slower CPU)."""
    res = EVAL_MODES[mode].evaluate(h, model, tokens, luts)
    return res["eval_time_ms"] / 1000.0 / max(res["tokens"], 1)


def probe_validation_seconds(run, model):
    """Seconds of a periodic validation besides its eval: the coherence sample and the model's
    probes, measured once."""
    h = run.h
    t0 = time.perf_counter()
    generate_sample(model, run.sp, h.sample_prompt, h.sample_tokens, h.train_seq_len)
    probes_hook = model_hook(model, "validation_probes")
    if probes_hook is not None:
        probes_hook()
    return time.perf_counter() - t0


def size_val_prefix(run, model, expected_steps):
    """Issue 25: the val prefix of a wallclock-bound smoke run, sized so that its evals cost at most
    SMOKE_EVAL_SHARE of the training time (size_smoke_evals) from probe evals on a few windows of
    training tokens; every rank takes rank 0's choice. Sets h.val_max_tokens, cuts the loaded
    prefix (and a byte sidecar) to it, then logs the quick look's lines and its unigram floor."""
    h = run.h
    device = run.rt.device
    n_tokens = EVAL_WARMUP_SEQS * h.eval_len + 1
    files = shard_files(h.data_path, "train")
    tokens = load_data_shard(files[0])[:n_tokens].to(device=device, dtype=torch.int64)
    luts = build_sentencepiece_luts(run.sp, h.vocab_size, device)
    counts, periodic = smoke_eval_counts(h, h.final_eval_mode, expected_steps)
    per_target_s = {m: probe_eval_seconds(h, model, m, tokens, luts) for m in counts}
    periodic_fixed_s = probe_validation_seconds(run, model) if periodic else 0.0
    available = run.val_tokens.numel() - 1
    choice = size_smoke_evals(h, per_target_s, periodic_fixed_s, expected_steps, available)
    choice = _broadcast(run.rt, choice)
    h.val_max_tokens = choice["tokens"]
    run.val_tokens = run.val_tokens[: h.val_max_tokens + 1]
    if isinstance(run.luts, SidecarBytes):  # per-token counts parallel to the val tokens
        run.luts = SidecarBytes(run.luts.per_token[: h.val_max_tokens + 1], run.luts.source)
    run.logger.log0(choice["line"])
    run.logger.event("smoke_sizing", part="evals", **choice)
    run.unigram_bpb = log_quick_look(h, run.logger, run.val_tokens, run.luts, run.val_total)


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
    model = h.spec.build_model(h).to(run.rt.device)
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
        script=h.spec.script,
        preset=h.preset,
        device=run.ledger.hardware,
        state="starting",
        step=0,
        iterations=h.iterations,
        code_bytes=readable_size(h.spec),
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
    sized = smoke_sizing_off(run.h, "val_max_tokens") is None  # the val prefix, after the warmup
    after_warmup = functools.partial(size_val_prefix, run) if sized else None
    ema, stats = train_model(
        run.h, run.rt, model, run.logger, run.ledger, validator, run.loader, after_warmup
    )
    if ema is not None:
        model.load_state_dict(ema.state_dict(model))
    ledger = run.ledger
    excluded_s = ledger.warmup_excluded_s + ledger.validation_excluded_s
    counted_s = ledger.precompute_s + ledger.train_loop_s
    ledger.train_setup_s = time.perf_counter() - started - excluded_s - counted_s
    return stats


def calibrate(run, model):
    """GPTQ Hessians (GPTQ_ENABLED) on training data (the loader continued, or random windows of
    the training shards) or self-samples, never val; the time counts against the training
    budget. Closes the training clock with its `training_budget` line."""
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
        overrun = reserve_overrun(h, run.ledger)
        if overrun:
            run.logger.log0(f"warning: {overrun}")
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
        sizes = save_artifact(
            model, h, run.artifact_path, hessians=hessians, byte_source=byte_source(run.luts)
        )
    sizes = _broadcast(run.rt, sizes)
    run.ledger.serialize_s = time.perf_counter() - t0
    model = load_artifact(run.artifact_path, h.spec)[0].to(run.rt.device)
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
    lora_ttt = h.final_eval_mode in ("ttt_lora", "ttt_phased")
    if lora_ttt and h.ttt_eval_len not in (audit_len, h.eval_len):
        # TTT_EVAL_SEQ_LEN: the LoRA TTT forwards run at their own length, audited there too
        audits["causality_ttt"] = audit_causality(model, h.ttt_eval_len, h.vocab_size)
    audits["bytes"] = audit_bytes(run.sp, run.val_tokens, run.luts)
    if not audits["bytes"]["passed"] and "lut_bytes" in audits["bytes"]:
        res = audits["bytes"]  # the tables' audit (a sidecar's names its own failures)
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
    mode = h.final_eval_mode
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
        warm_up_eval(run, model, mode)
        final = timed_eval(run, model, mode)
        context = f"stride:{h.eval_stride} seq_len:{h.eval_len}"
        if mode in ("ttt_lora", "ttt_phased") and h.ttt_eval_len != h.eval_len:
            context += f" ttt_seq_len:{h.ttt_eval_len}"  # the LoRA windows (TTT_EVAL_SEQ_LEN)
        logger.log0(
            f"{label}_exact val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f} "
            + context
        )
    sf = final["score_first"]  # every mode's coverage; the TTT modes' order too
    audits["score_first"] = sf
    if "ngram_tilt" in final:  # the tilt's causality and normalization (golf/ngram.py)
        audits["ngram_tilt"] = final["ngram_tilt"]
    logger.log0(
        f"audit:score_first passed:{sf['passed']} chunks:{sf['chunks_scored']} "
        f"updates:{sf['updates']} targets:{sf['targets']} "
        f"scored_twice:{sf['scored_twice']} never_scored:{sf['never_scored']}"
    )
    if not sf["passed"]:
        logger.log0(f"audit:score_first failures:{sf['failures']}")
    run.ledger.final_eval_s = final["eval_time_ms"] / 1000.0
    return roundtrip, final, mode


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
        # Every rank past its last collective before any closes its connections: a rank that
        # tears down while another still receives makes gloo abort the other (seen once in a
        # 2-process CPU test under load, after the standard eval gained a coverage all-reduce).
        dist.barrier()
        dist.destroy_process_group()
    return status


def run_script(main):
    """The body of every bundle's `if __name__ == "__main__":`: main()'s exit status, or 2 with a
    one-line `error: ...` on stderr for bad input (a bad variable, a missing file), 1 with one
    line where the system refuses a write (a full disk, a file-size limit)."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a file-size limit: one line, nothing half-written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
