"""The run's accounting and report: the time ledger and the 10-minute track's clocks, the summary
that every figure of a run's last lines, submission.json and pack.py's compliance come from, and
the result block and eval descriptions printed at the end. Split from golf/train.py (the training
stages), which calls it; nothing here trains or evaluates."""

import dataclasses
import json
from dataclasses import dataclass, field

from golf.bpb import byte_source
from golf.modes import EVAL_MODES

# The 10-minute track's two clocks (docs/rules.md, Training clock), enforced in `summarize` when
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
    loader restored after it), the periodic validations inside the loop, and the final eval
    mode's warm-up on training tokens (warm_up_eval)."""

    hardware: str = ""
    warmup_excluded_s: float = 0.0
    validation_excluded_s: float = 0.0
    precompute_s: float = 0.0
    train_setup_s: float = 0.0
    train_loop_s: float = 0.0
    gptq_s: float = 0.0
    gptq_reserve_s: float = 0.0  # what the loop left GPTQ (fixed or measured), not a time spent
    serialize_s: float = 0.0
    audit_s: float = 0.0
    evals_s: dict = field(default_factory=dict)  # log label -> seconds, every timed eval
    eval_warmup_excluded_s: float = 0.0  # the final eval mode primed on training tokens
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
    overrun = reserve_overrun(h, ledger)  # the 600 s reason above already covers a longer run
    if overrun and not any(r.startswith("training took") for r in reasons):
        reasons.append(overrun)
    return reasons


def reserve_overrun(h, ledger):
    """Why training + GPTQ calibration ended past MAX_WALLCLOCK_SECONDS (the GPTQ reserve was too
    small), or None: the loop stops at the cap minus the reserve, so the two together must fit."""
    cap = h.max_wallclock_seconds
    if not (h.gptq_enabled and cap > 0 and ledger.train_s > cap):
        return None
    return (
        f"training + GPTQ calibration took {ledger.train_s:.1f}s, over "
        f"MAX_WALLCLOCK_SECONDS={cap:g} (GPTQ reserve {ledger.gptq_reserve_s:.2f}s, calibration "
        f"{ledger.gptq_s:.2f}s)"
    )


def describe_tilt(label, tilt):
    """One log line: the n-gram tilt an eval scored with, its hint precompute (inside the eval
    clock) and its audit."""
    failures = "" if tilt["passed"] else f" failures:{tilt['failures']}"
    return (
        f"ngram_tilt:{label} order:{tilt['order']} threshold:{tilt['threshold']} "
        f"boost:{tilt['boost']} gated:{tilt['gated']} of {tilt['targets']} targets "
        f"(hint = target at {tilt['gated_hits']}) precompute:{tilt['precompute_s']:.2f}s "
        f"audit:{tilt['audit_s']:.2f}s (both inside the eval clock) audit "
        f"passed:{tilt['passed']}{failures}"
    )


# --- the pipeline: run_main calls these stages in order -----------------------------------------


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
        "script": h.spec.script,
        "preset": h.preset,
        "valid": valid,
        "artifact_path": run.artifact_path,
        "artifact_bytes": sizes["artifact_bytes"],
        "code_bytes": sizes["code_bytes"],
        "total_bytes": sizes["total_bytes"],
        "budget_bytes": h.size_budget,
        "eval_mode": mode,
        "ngram_tilt": tilt_summary(h, final),
        "byte_source": byte_source(run.luts),
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


def tilt_summary(h, final):
    """The summary's record of the n-gram tilt: None when off; else its parameters, and how many
    targets the final eval tilted and how long its precompute took."""
    if not h.ngram_tilt_enabled:
        return None
    tilt = final.get("ngram_tilt", {})
    return {
        "order": h.token_order,
        "threshold": h.token_threshold,
        "boost": h.token_boost,
        "gated": tilt.get("gated"),
        "precompute_s": tilt.get("precompute_s"),
    }


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
    tilt = ""
    if h.ngram_tilt_enabled:
        tilt = (
            f"; scored with the n-gram tilt (TOKEN_ORDER={h.token_order} "
            f"TOKEN_THRESHOLD={h.token_threshold} TOKEN_BOOST={h.token_boost})"
        )
    return f"evals: {'; '.join(parts)}; {scope}{tilt}"
