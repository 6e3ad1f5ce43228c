"""Evaluation: standard and sliding-window scoring, chunked score-first TTT, and the audits
(score-first order, causality).
"""

import copy
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from golf.bpb import target_bytes
from golf.contract import model_hook
from golf.data import BOS_ID
from golf.ngram import build_ngram_tilt
from golf.runtime import Progress, dist_max, dist_sum

# Evaluation. Every mode scores per-token NLL with a full softmax over the vocabulary, sums in
# float64, counts bytes with the lookup tables and all-reduces. Standard: non-overlapping
# TRAIN_SEQ_LEN windows (the baseline). Sliding (PR #50): windows every EVAL_STRIDE tokens, each
# target scored once, in the first window that holds it. Score-first TTT (PR #461/#549): windows
# grouped in chunks; a chunk is scored under inference mode, then trained on; the last chunk never
# is. Sliding is TTT without training, so the two share one code path and agree exactly at TTT_LR=0.
# The score-first audit is built from what the code did, not from what it meant to do: the scorer
# counts every target it scores (coverage), and the TTT trainer sees the val tokens only through a
# RecordedTokens view that logs every position it reads. EVAL_MODES is the one registry of the modes
# (name -> function and final log label) that the scripts, eval_bpb.py and pack.py read. The
# causality audit (docs/rules.md, Legal scoring) runs on any model with `forward_logits`. With
# NGRAM_TILT_ENABLED every mode scores the n-gram tilted NLL (golf/ngram.py): the hints are computed
# inside the mode's clock, audited, and looked up by the targets' absolute val positions; the
# trainers still learn from the untilted NLL.


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


def token_nll_scored(model, x, y, tilt, positions):
    """(nll, scored) from one forward: the per-token NLL (fp32, under the full softmax of
    `forward_logits`) a trainer learns from, and the NLL scoring counts: the same tensor without a
    tilt, with `tilt` (an NgramTilt) the tilted one of the targets at val `positions`, from the
    same log-sum-exp and without gradient."""
    with _autocast(x.device):
        logits = model.forward_logits(x)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
    ).view_as(y)
    if tilt is None:
        return nll, nll
    with torch.no_grad():
        return nll, tilt.nll(logits.detach(), y, positions, nll.detach())


def token_nll(model, x, y, tilt=None, positions=None):
    """The per-token NLL that scoring counts (token_nll_scored's second; without a tilt, the NLL
    with its gradient)."""
    return token_nll_scored(model, x, y, tilt, positions)[1]


def tilt_result(tilt):
    """The eval result's `ngram_tilt` entry (parameters, precompute time, audit), when on."""
    return {} if tilt is None else {"ngram_tilt": tilt.info}


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


def standard_batches(n_tokens, seq, rank, world, batch, include_tail):
    """This rank's batches of the standard eval as (first token, rows, row length): `batch` whole
    TRAIN_SEQ_LEN windows at a time, and with include_tail (EVAL_INCLUDE_TAIL, #2014) the last
    rank also scores the targets after the last whole window, in one shorter window."""
    n_seqs = (n_tokens - 1) // seq
    lo = n_seqs * rank // world
    hi = n_seqs * (rank + 1) // world
    batches = [(s * seq, min(s + batch, hi) - s, seq) for s in range(lo, hi, batch)]
    tail = n_tokens - 1 - n_seqs * seq
    if include_tail and tail and rank == world - 1:
        batches.append((n_seqs * seq, 1, tail))
    return batches


def eval_val(h, model, val_tokens, luts):
    """Standard eval: non-overlapping TRAIN_SEQ_LEN windows, this rank's share of them; the tail
    after the last whole window too with EVAL_INCLUDE_TAIL."""
    t0 = time.perf_counter()
    rank, world = _dist_info()
    device = _model_device(model)
    seq = h.train_seq_len
    n_seqs = (val_tokens.numel() - 1) // seq
    if n_seqs < 1:
        raise ValueError(
            f"val split has {val_tokens.numel()} tokens, shorter than TRAIN_SEQ_LEN={seq} + 1"
        )
    batch = max(1, h.val_batch_size // (8 * seq))
    batches = standard_batches(val_tokens.numel(), seq, rank, world, batch, h.eval_include_tail)
    tilt = build_ngram_tilt(h, val_tokens, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, tokens, bytes
    coverage = torch.zeros(val_tokens.numel(), dtype=torch.int32, device=device)
    was_training = model.training
    model.eval()
    progress = Progress("eval standard", sum(rows for _, rows, _ in batches), state="evaluating")
    with torch.inference_mode():
        for first, rows, width in batches:
            chunk = val_tokens[first : first + rows * width + 1].to(
                device=device, dtype=torch.int64
            )
            x = chunk[:-1].view(-1, width)
            y = chunk[1:].view(-1, width)
            positions = torch.arange(1, y.numel() + 1, device=device).view(-1, width) + first
            sums[0] += token_nll(model, x, y, tilt, positions).double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts, positions).sum()
            coverage.index_add_(0, positions.flatten(), torch.ones_like(coverage[: y.numel()]))
            progress.advance(rows)
    progress.close()
    model.train(was_training)
    dist_sum(sums)
    dist_sum(coverage)
    # Whole TRAIN_SEQ_LEN windows only (the baseline's eval): the tail after them is not scored,
    # unless EVAL_INCLUDE_TAIL asks for every target.
    last_target = None if h.eval_include_tail else n_seqs * seq
    audit = audit_score_first([], coverage, last_target=last_target)
    return _eval_result(sums, t0, "standard", score_first=audit, **tilt_result(tilt))


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


def _score_windows(model, tokens, windows, luts, batch, sums, coverage, tilt=None):
    """Score a list of (starts, firsts, lasts) windows, all on this rank, into sums (the n-gram
    tilted NLL with `tilt`); count every scored target in coverage. Returns the highest target
    position scored (-1 if none)."""
    device = sums.device
    top = torch.full((), -1, dtype=torch.int64, device=device)
    for i in range(0, len(windows[0]), batch):
        s, f, last = (w[i : i + batch] for w in windows)
        for length in np.unique(last - s):
            sel = (last - s) == length
            ws = torch.as_tensor(s[sel], device=device)
            win = tokens[ws[:, None] + torch.arange(int(length) + 1, device=device)[None, :]]
            x = win[:, :-1]
            y = win[:, 1:]
            pos = torch.arange(int(length), device=device)[None, :]
            mask = pos >= torch.as_tensor(f[sel], device=device)[:, None] - ws[:, None] - 1
            positions = ws[:, None] + 1 + pos
            sums[0] += (token_nll(model, x, y, tilt, positions).double() * mask).sum()
            sums[1] += mask.sum()
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
    tilt = build_ngram_tilt(h, tokens, device)
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
                tilt,
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
    extra = {"adapted_scalars": adapted_scalars(trainer.model)} if trainer else {}
    return _eval_result(
        sums,
        t0,
        "ttt" if train_chunks else "sliding",
        **extra,
        chunks=len(chunk_ids),
        windows=len(starts),
        seq_len=seq_len,
        stride=stride,
        score_first=audit_score_first(ledger, coverage),
        **tilt_result(tilt),
    )


def adapted_scalars(model):
    """{name: value} of the model's one-element parameters (learned caps, gates' lambdas): what a
    TTT mode reports of the copy it adapted, so a log or test sees whether they moved."""
    return {
        name: float(p.detach().float().reshape(-1)[0])
        for name, p in model.named_parameters()
        if p.numel() == 1
    }


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


def audit_score_first(ledger, coverage, last_target=None):
    """C3 and C4 from what the evaluator did: every update read only positions already scored (its
    `max_target` is the highest position the trainer read through RecordedTokens; a score's
    `scored_upto` the highest target the scorer counted), and every target 1..N-1 was scored
    exactly once (`coverage`, counted by the scorer); with `last_target` (standard windows drop the
    tail of the split), targets 1..last_target exactly once and none after it.

    LoRA TTT logs each optimizer step before it runs (the optimizer's step hook), and each scored
    chunk with the steps its group's adapters and the phase trainer had taken by then: chunk k
    must come after exactly k adapter steps (one per earlier chunk, none on itself), every group
    must start from freshly reset adapters, and the base weights must not move inside a phase."""
    scored_upto = 0
    failures = []
    updates = 0
    phase_steps = {}
    for entry in ledger:
        if entry["event"] == "reset" and not entry["fresh"]:
            failures.append(
                f"a group of {entry['docs']} documents started from adapters that were not reset"
            )
        elif entry["event"] == "score":
            scored_upto = max(scored_upto, entry["scored_upto"])
            steps = entry.get("adapter_steps")
            if steps is not None and steps != entry["chunk"]:
                failures.append(
                    f"chunk {entry['chunk']} was scored after {steps} adapter steps, not "
                    f"{entry['chunk']}: a step trained on it (or it was not reset) before it was "
                    "scored"
                )
            if "phase" in entry:
                phase_steps.setdefault(entry["phase"], set()).add(entry["phase_steps"])
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
    for phase, seen in sorted(phase_steps.items()):
        if len(seen) > 1:
            failures.append(f"the base weights moved while phase {phase} was being scored")
    counts = coverage[1:]
    tail = 0
    if last_target is not None:
        tail = int((coverage[last_target + 1 :] > 0).sum())
        counts = coverage[1 : last_target + 1]
    twice = int((counts > 1).sum())
    missing = int((counts == 0).sum())
    failures += [
        msg
        for bad, msg in (
            (twice, f"{twice} targets scored more than once"),
            (missing, f"{missing} targets never scored"),
            (int(coverage[0]), "token 0 has no context and was scored"),
            (tail, f"{tail} targets past the last full window were scored"),
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
    # Document starts, two of them at cuts and Jacobian positions (2, seq_len // 2), so the
    # checks cover what a model does at a BOS (attention within documents, SmearGate's BOS rule):
    # a BOS may read the tokens before it, never after.
    x[:, 3::17] = BOS_ID
    x[:, [p for p in (2, seq_len // 2) if p < seq_len]] = BOS_ID
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
