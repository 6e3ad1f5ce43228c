"""Per-document LoRA test-time training and phased global SGD, score-first."""

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch
from torch import nn

from golf.bpb import target_bytes
from golf.config import TTT_MASKS, ttt_phase_bounds, ttt_short_chunk_schedule
from golf.contract import model_hook
from golf.data import BOS_ID
from golf.evaluation import (
    RecordedTokens,
    _dist_info,
    _eval_result,
    _model_device,
    _TTTTrainer,
    adapted_scalars,
    audit_score_first,
    tilt_result,
    token_nll_scored,
)
from golf.ngram import build_ngram_tilt
from golf.runtime import dist_max, dist_sum

# --- Per-document LoRA TTT and phased global SGD (issue 16) ------------------------------------
# Batched per-document LoRA (#1530; rank 80, 48-token chunks, AdamW beta2 0.99 and weight decay
# 0.5 in #1855): the val stream is cut into documents at BOS; every document gets its own rank-r
# adapters on Q/K/V/O, the MLP and the head, reset to the same initial values at its start. A
# document is scored chunk by chunk: one forward of the chunk with up to TTT_EVAL_SEQ_LEN tokens
# of the document before it accumulates the chunk's loss, then one AdamW step trains the adapters
# on that same loss, so every chunk is scored by adapters that have seen only the chunks before
# it. Many documents share each forward (one batch row each). Phased global SGD (#1610 -> #1626
# -> #1855): after the first TTT_PHASES documents (cumulative counts) are fully scored, scoring
# pauses and the base weights train by SGD on exactly the documents scored since the last pause;
# scoring goes on with the updated base. LoRA is applied by forward hooks on the model's own
# modules, so the TTT forward is the model's forward (SmearGate's BOS mask, gates, recurrence: all
# of it) and the two cannot drift (#1787 skipped a gate in a separate TTT forward and scored 1.908).


def ttt_lora_span(doc_lo, first, last, window):
    """The val positions [lo, hi) the LoRA trainer reads for the chunk of targets first..last of
    the document that starts at doc_lo: the chunk and up to `window` tokens of context before its
    last target, inside the document; never past the chunk's last target."""
    return max(doc_lo, last - window), last + 1


def ttt_doc_order(h, docs):
    """The documents (rows of val_documents) in the order the LoRA TTT evals score them and
    TTT_PHASES counts them: the val file's (TTT_DOC_ORDER=stream) or longest first with ties in
    file order (length: #2135 sorts its documents by length and claims the batches of the longest
    first, so its phase prefix is the longest documents)."""
    if h.ttt_doc_order == "length":
        return np.argsort(-(docs[:, 2] - docs[:, 1]), kind="stable")
    return np.arange(len(docs))


def ttt_phase_docs(h, docs, ids):
    """The documents `ids` of a phase in the order the phase trainer reads them: stream order
    as scored; with TTT_DOC_ORDER=length shortest first (#2135 sorts its scored documents by
    their length-sorted batch before its global SGD)."""
    if h.ttt_doc_order == "length":
        lengths = docs[ids, 2] - docs[ids, 1]
        return ids[np.argsort(lengths, kind="stable")]
    return ids


def ttt_phase_pieces(docs, ids, ends_at_bos):
    """The val spans [lo, hi) the phase trainer reads, as one stream: documents `ids` (rows of
    val_documents) in that order, each from its BOS to its last target. A last target that is a
    BOS (`ends_at_bos`, per document) is left out, as the next piece brings its own BOS, except
    after the last piece; pieces that meet merge, so documents in file order are one span."""
    pieces = []
    for k, i in enumerate(ids.tolist()):
        lo = int(docs[i, 0])
        hi = int(docs[i, 2])
        if not ends_at_bos[i] or k == len(ids) - 1:
            hi += 1
        if pieces and pieces[-1][1] == lo:
            pieces[-1] = (pieces[-1][0], hi)
        else:
            pieces.append((lo, hi))
    return pieces


class PieceView:
    """Spans of the val stream read as one stream: position t of the view, inside piece k (t in
    offsets[k]..offsets[k + 1] - 1), is val position pieces[k][0] + t - offsets[k]. Every read
    goes through `view` (a RecordedTokens), so the score-first audit sees the val positions
    actually read."""

    def __init__(self, view, pieces):
        self.view = view
        self.pieces = pieces
        self.offsets = np.cumsum([0] + [hi - lo for lo, hi in pieces])

    def __len__(self):
        return int(self.offsets[-1])

    def read(self, lo, hi):
        lo = int(lo)
        hi = int(hi)
        if not 0 <= lo <= hi <= len(self):
            raise IndexError(f"phase tokens {lo}..{hi - 1}: outside 0..{len(self) - 1}")
        k = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts = []
        while lo < hi:
            start = self.pieces[k][0] + lo - int(self.offsets[k])
            take = min(hi - lo, self.pieces[k][1] - start)
            parts.append(self.view.read(start, start + take))
            lo += take
            k += 1
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts)


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


# Adapter roles (#1953, #2014, #2135): TTT_MASK=no_qv (or TTT_Q_LORA=0, TTT_V_LORA=0) drops the Q
# and V adapters, TTT_K_LORA=0 the K ones, TTT_O_LORA=0 the attention output, TTT_MLP_LORA=0 the
# MLP's. A target's role comes from its module name: c_q / c_k / c_v / proj under an `attn`
# module, anything under an `mlp` module, the head (lm_head, or final_norm for a tied head); the
# records adapt the head always. The records' O and MLP adapters run from the block's normed input
# to the sublayer's output (TTT_LORA_FORM=record: the `attn` and `mlp` modules themselves); by
# default ours sit on the model's own Linear modules (the attention output projection, the MLP's
# layers), the same roles in our parametrisation.
LORA_ROLE_SWITCHES = {
    "q": "ttt_q_lora",
    "k": "ttt_k_lora",
    "v": "ttt_v_lora",
    "o": "ttt_o_lora",
    "mlp": "ttt_mlp_lora",
}
_ATTN_ROLES = {"c_q": "q", "c_k": "k", "c_v": "v", "proj": "o"}


def lora_role(name):
    """The role of a LoRA target from its module name: q, k, v, o, mlp, head or other. The record
    form's O and MLP targets are the `attn` and `mlp` modules themselves."""
    parts = name.split(".")
    if name in ("lm_head", "final_norm", "tied_head"):
        return "head"
    if len(parts) > 1 and parts[-1] == "attn":
        return "o"
    if len(parts) > 1 and parts[-1] == "mlp":
        return "mlp"
    if "attn" in parts[:-1] and parts[-1] in _ATTN_ROLES:
        return _ATTN_ROLES[parts[-1]]
    if "mlp" in parts[:-1]:
        return "mlp"
    return "other"


# TTT_LORA_FORM=record (#2135's BatchedTTTLoRA, its forward_ttt and _block_with_lora): Q, K and V
# adapters on the block's normed input n (as ours), but the O adapter maps n to the attention's
# output (added after the output projection, before attn_scale) and the MLP adapter maps the MLP's
# normed input to the MLP's output: one dim -> dim adapter across each sublayer, here a hook on the
# `attn` and `mlp` modules themselves. The head adapter maps final_norm's output to the logits
# (embed_dim -> vocab, B of rank x vocab, added before the softcap); ours with a tied head is
# x <- x + x A B in front of the head (B of rank x dim). The tied head's logit-space hook point is
# the model's parameterless `tied_head` module.
_RECORD_ATTN_LINEARS = ("c_q", "c_k", "c_v")


def record_lora_targets(model, head=True):
    """{name: module} of the record form: c_q / c_k / c_v under each block's `attn`, each block's
    `attn` (O) and `mlp` (MLP) module, and the head (`lm_head`, or `tied_head`)."""
    modules = dict(model.named_modules())
    found = {}
    for name, m in modules.items():
        parts = name.split(".")
        if parts[0] != "blocks":
            continue
        linear = isinstance(m, nn.Linear) and parts[-1] in _RECORD_ATTN_LINEARS
        if (linear and parts[-2] == "attn") or (len(parts) == 3 and parts[-1] in ("attn", "mlp")):
            found[name] = m
    if not any(lora_role(name) == "o" for name in found):
        raise ValueError(
            "TTT_LORA_FORM=record: the model has no blocks.N.attn / blocks.N.mlp modules to adapt"
        )
    if head:
        heads = [n for n in ("lm_head", "tied_head") if modules.get(n) is not None]
        if not heads:
            raise ValueError("TTT_LORA_FORM=record: the model has no lm_head or tied_head module")
        found[heads[0]] = modules[heads[0]]
    return found


def masked_lora_targets(model, h):
    """lora_targets (record_lora_targets with TTT_LORA_FORM=record) less the roles that TTT_MASK
    and the TTT_*_LORA switches turn off. A role turned off that the model does not have is an
    error: the switch would change nothing."""
    if h.ttt_lora_form == "record":
        targets = record_lora_targets(model, h.ttt_lora_head)
    else:
        targets = lora_targets(model, h.ttt_lora_head)
    dropped = set(TTT_MASKS[h.ttt_mask])
    dropped |= {role for role, field in LORA_ROLE_SWITCHES.items() if not getattr(h, field)}
    roles = {name: lora_role(name) for name in targets}
    for role in sorted(dropped):
        if role not in roles.values():
            switch = LORA_ROLE_SWITCHES[role].upper()
            raise ValueError(
                f"{switch}=0 (or TTT_MASK={h.ttt_mask!r}): the model has no {role} module among "
                f"its LoRA targets ({', '.join(sorted(set(roles.values())))})"
            )
    kept = {name: m for name, m in targets.items() if roles[name] not in dropped}
    if not kept:
        raise ValueError(
            f"TTT_MASK={h.ttt_mask!r} and the TTT_*_LORA switches leave no module to adapt"
        )
    return kept


def lora_chunk_for(h, longest_targets):
    """The score-first chunk of a group whose longest document has `longest_targets` targets:
    TTT_LORA_CHUNK, or with TTT_SHORT_SCORE_FIRST_ENABLED the chunk of the first step of
    TTT_SHORT_SCORE_FIRST_STEPS (else of TTT_SHORT_DOC_LEN:TTT_SHORT_CHUNK_SIZE) whose length
    the document does not exceed (#2014: its length counts the BOS and the closing BOS,
    targets + 1, and the group's longest document decides)."""
    if h.ttt_short_score_first_enabled:
        for doc_len, chunk in ttt_short_chunk_schedule(h):
            if longest_targets + 1 <= doc_len:
                return chunk
    return h.ttt_lora_chunk


def lora_scale(h):
    """The factor on every adapter's output: TTT_LORA_ALPHA / TTT_LORA_RANK (#1767, #2135), or 1
    when TTT_LORA_ALPHA is 0 (alpha = rank, the form before #1767)."""
    if h.ttt_lora_alpha == 0:
        return 1.0
    return h.ttt_lora_alpha / h.ttt_lora_rank


def slot_key(name, slot):
    """The adapter key of pass `slot` of target `name` (TTT_LORA_FORM=record)."""
    return f"{name}@{slot}"


class LoraAdapters:
    """Rank-r adapters for up to `rows` documents on each target module, applied by forward hooks:
    an nn.Linear's output gains s x A_b B_b (x its input), any other module's output y gains
    s y A_b B_b, for batch row b, s = lora_scale(h). A starts at one shared random draw (so a
    document's adapters do not depend on its batch row), B at zero (so the model starts exactly as
    scored without TTT).

    TTT_WARM_START_A (#1767, #2135): a reset zeroes B and keeps each row's A as the group before
    left it, so A accumulates directions over the groups of a phase. As in #2135, A starts from a
    fresh draw at the first group of each phase (#2135 builds new adapters after every global SGD
    pause) and for a group smaller than `rows` (#2135 builds new adapters for a batch of another
    size; ours is the last group of a phase on its rank), and such a group's A is not carried.
    Score-first holds: the carried A holds only what AdamW steps on earlier groups' chunks put
    there, each logged and audited like any step (it may read scored positions only), and every
    document of a group is fully scored before the next group starts, so A carries information
    from scored documents alone, as the phase SGD does with the base weights (docs/rules.md C3).
    With B = 0 the adapters' output is exactly zero after every reset, warm or not.

    TTT_LORA_FORM=record (#2135's BatchedTTTLoRA): every target's output, input to output (a
    tuple output's first item: the attention's), gains s x A B, with one adapter per pass of the
    module in a forward (#2135: one slot per executed layer, 17 with its loop on): the hook counts
    the module's calls since the forward began and picks the slot, so a looped layer's passes
    adapt apart. A is drawn per batch row, uniform in +-1/sqrt(in) (#2135's
    torch.empty(bsz, rank, in).uniform_), at every reset that does not keep it, from a generator
    seeded by SEED on the adapters' device: one run, one sequence of draws."""

    def __init__(self, model, h, rows, device):
        self.h = h
        self.rows = rows
        self.device = device
        self.record = h.ttt_lora_form == "record"
        self.targets = masked_lora_targets(model, h)
        self.calls = dict.fromkeys(self.targets, 0)  # calls since the forward began (record)
        r = h.ttt_lora_rank
        self.init_a = None
        self.start_a = {}  # A as the last cold reset drew it (record)
        if self.record:
            self.passes, dims = self._probe(model, device)
            self.dims = {
                slot_key(name, p): dims[name]
                for name in self.targets
                for p in range(self.passes[name])
            }
            self.gen = torch.Generator(device=device).manual_seed(h.seed)
        else:
            self.passes = dict.fromkeys(self.targets, 1)
            dims = self._dims(model, device)
            gen = torch.Generator().manual_seed(h.seed)
            self.init_a = {
                name: ((torch.rand(d_in, r, generator=gen) * 2 - 1) / math.sqrt(d_in)).to(device)
                for name, (d_in, _) in dims.items()
            }
            self.dims = dims
        self.scale = lora_scale(h)
        self.active = 0
        self.carry_a = False  # whether the next reset may keep A (TTT_WARM_START_A)
        self.warm = False  # whether the last reset kept A
        self.a = {}
        self.on_step = None  # called before every optimizer step: the score-first ledger
        self.steps = 0  # optimizer steps since the last reset
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

            self._probe_forward(model, device, {n: record(n) for n in other})
        return dims

    def _probe(self, model, device):
        """(passes, dims) per target from a forward on two tokens: how often the module runs in
        one forward (a looped layer's modules more than once) and its (in, out) features."""
        passes = dict.fromkeys(self.targets, 0)
        dims = {}

        def record(name):
            def hook(module, args, out):
                main = out[0] if isinstance(out, tuple) else out
                dims[name] = (args[0].size(-1), main.size(-1))
                passes[name] += 1

            return hook

        self._probe_forward(model, device, {n: record(n) for n in self.targets})
        for name, count in passes.items():
            if count == 0:
                raise ValueError(f"TTT_LORA_FORM=record: {name} does not run in a forward")
        return passes, dims

    def _probe_forward(self, model, device, hooks):
        handles = [self.targets[name].register_forward_hook(hook) for name, hook in hooks.items()]
        try:
            with torch.no_grad():
                model.forward_logits(torch.ones(1, 2, dtype=torch.int64, device=device))
        finally:
            for handle in handles:
                handle.remove()

    def new_phase(self):
        """The next reset draws A afresh (the start of a phase: #2135 re-creates its adapters
        after each global SGD pause)."""
        self.carry_a = False

    def _draw_a(self):
        """A per batch row for every slot (record form): uniform in +-1/sqrt(in)."""
        r = self.h.ttt_lora_rank
        drawn = {}
        for key, (d_in, _) in self.dims.items():
            u = torch.rand(self.rows, d_in, r, generator=self.gen, device=self.device)
            drawn[key] = (u * 2 - 1) / math.sqrt(d_in)
        return drawn

    def reset(self, docs=None):
        """Fresh adapters for a new group of `docs` documents (None: every row) and a fresh
        AdamW: B zero, and A the shared draw (record form: a new draw per row), or with
        TTT_WARM_START_A each row's A as the previous full group of this phase left it."""
        h = self.h
        full = docs is None or docs == self.rows
        self.warm = h.ttt_warm_start_a and self.carry_a and full
        self.carry_a = h.ttt_warm_start_a and full
        if self.warm:
            self.a = {n: a.detach().requires_grad_(True) for n, a in self.a.items()}
        elif self.record:
            self.start_a = self._draw_a()
            self.a = {n: a.clone().requires_grad_(True) for n, a in self.start_a.items()}
        else:
            self.a = {
                n: a[None].repeat(self.rows, 1, 1).requires_grad_(True)
                for n, a in self.init_a.items()
            }
        self.b = {
            n: torch.zeros(self.rows, h.ttt_lora_rank, d_out, device=self.device).requires_grad_(
                True
            )
            for n, (_, d_out) in self.dims.items()
        }
        self.opt = torch.optim.AdamW(
            [*self.a.values(), *self.b.values()],
            lr=h.ttt_lora_lr * h.ttt_local_lr_mult,  # TTT_LOCAL_LR_MULT: the local lr only
            betas=(h.ttt_lora_beta1, h.ttt_lora_beta2),
            weight_decay=h.ttt_lora_wd,
            eps=h.ttt_lora_eps,  # TTT_LORA_EPS: #2135 hard-codes 1e-10
        )
        self.opt.register_step_pre_hook(self._before_step)
        self.steps = 0

    def _before_step(self, optimizer, args, kwargs):
        """Runs before every step of the adapters' optimizer, whichever code calls it: the ledger
        records what the step trains on against what is scored at that moment (issue 24)."""
        if self.on_step is not None:
            self.on_step()
        self.steps += 1

    def fresh(self):
        """Whether the adapters are as a reset must leave them: B zero and A the shared draw (the
        record form: the reset's own draw), or after a warm reset (TTT_WARM_START_A) B zero and A
        finite, so that the adapters' output x A B is exactly zero and a group starts from the
        model as scored without TTT."""
        with torch.no_grad():  # one host sync, not one per tensor
            moved = sum(b.abs().sum() for b in self.b.values())
            if self.warm:
                moved = moved + sum((~torch.isfinite(a)).sum() for a in self.a.values())
            elif self.record:
                moved = moved + sum((a - self.start_a[n]).abs().sum() for n, a in self.a.items())
            else:
                moved = moved + sum((a - self.init_a[n]).abs().sum() for n, a in self.a.items())
        return bool(moved == 0)

    def _hook(self, name, linear):
        passes = self.passes.get(name, 1)

        def add_delta(module, args, out):
            n = self.active
            key = name
            if self.record:  # the pass of this call within the forward picks the slot
                key = slot_key(name, self.calls[name] % passes)
                self.calls[name] += 1
            main = out[0] if isinstance(out, tuple) else out
            x = args[0] if linear else main
            flat = x.reshape(n, -1, x.size(-1))
            a = self.a[key][:n].to(flat.dtype)
            b = self.b[key][:n].to(flat.dtype)
            delta = torch.bmm(torch.bmm(flat, a), b)
            if self.scale != 1.0:  # TTT_LORA_ALPHA; scale 1 keeps the default's arithmetic
                delta = delta * self.scale
            main = main + delta.reshape(main.shape).to(main.dtype)
            if isinstance(out, tuple):
                return (main, *out[1:])
            return main

        return add_delta

    @contextlib.contextmanager
    def applied(self, n_rows):
        """Hooks on while the first n_rows adapters serve a batch of n_rows documents. The record
        form's pass counters start at zero and must end at whole forwards."""
        self.active = n_rows
        self.calls = dict.fromkeys(self.targets, 0)
        handles = [
            m.register_forward_hook(self._hook(name, self.record or isinstance(m, nn.Linear)))
            for name, m in self.targets.items()
        ]
        try:
            yield
            partial = [n for n, c in self.calls.items() if c % self.passes[n]]
            if partial:
                raise RuntimeError(
                    f"LoRA TTT: {partial[0]} ran {self.calls[partial[0]]} times, not a whole "
                    f"number of forwards ({self.passes[partial[0]]} passes each)"
                )
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
        last_targets = torch.as_tensor(self.docs[:, 2], device=self.device)
        self.ends_at_bos = (self.tokens[last_targets] == BOS_ID).cpu().numpy()
        self.scored_upto = -1
        self.steps = 0
        self.chunk = 0
        self.chunk_groups = {}  # score-first chunk size -> groups scored with it
        self.phase = 0
        self.trainer = _TTTTrainer(self._phase_h(), model, 1) if phased else None
        self.model = self.trainer.model if phased else model
        self.adapters = LoraAdapters(self.model, h, h.ttt_lora_batch_docs, self.device)
        self.adapters.on_step = self._log_adapter_step
        self.tilt = build_ngram_tilt(h, self.tokens, self.device)  # scoring only

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
        chunk = lora_chunk_for(h, int((docs[:, 2] - docs[:, 1]).max()) + 1)
        self.chunk_groups[chunk] = self.chunk_groups.get(chunk, 0) + 1
        n_chunks = (docs[:, 2] - docs[:, 1]) // chunk + 1
        self.adapters.reset(len(docs))
        self.ledger.append(
            {
                "event": "reset",
                "fresh": self.adapters.fresh(),
                "warm_a": self.adapters.warm,
                "docs": len(docs),
            }
        )
        doc_nll = torch.zeros(len(docs), dtype=torch.float64, device=self.device)
        for k in range(int(n_chunks.max())):
            self.chunk = k
            n = int((n_chunks > k).sum())  # longest first: the active documents are a prefix
            rows = docs[:n]
            firsts = rows[:, 1] + k * chunk
            lasts = np.minimum(firsts + chunk - 1, rows[:, 2])
            spans = [
                ttt_lora_span(int(d), int(f), int(last), h.ttt_eval_len)
                for d, f, last in zip(rows[:, 0], firsts, lasts)
            ]
            nll, score_nll, x, y, pos = self._forward_scored(spans, n)
            first_t = torch.as_tensor(firsts, device=self.device)[:, None]
            last_t = torch.as_tensor(lasts, device=self.device)[:, None]
            scored = (pos >= first_t) & (pos <= last_t)
            trained = (pos >= first_t) & (y >= 0)
            self._score(score_nll.detach(), x, y, pos, scored, doc_nll[:n])
            self.scored_upto = max(self.scored_upto, int(lasts.max()))
            # How many steps this group's adapters (and the phase trainer) had taken when the
            # chunk was scored: chunk k of a document must be scored after exactly k adapter
            # steps, one on each chunk before it, and the base must not move inside a phase.
            self.ledger.append(
                {
                    "event": "score",
                    "chunk": k,
                    "scored_upto": self.scored_upto,
                    "adapter_steps": self.adapters.steps,
                    "phase": self.phase,
                    "phase_steps": self.trainer.steps if self.trainer else 0,
                }
            )
            per_doc = (nll * trained).sum(1) / trained.sum(1).clamp(min=1)
            self.adapters.opt.zero_grad(set_to_none=False)
            per_doc.sum().backward()
            self.adapters.opt.step()  # logged before it runs, by _log_adapter_step
        if self.doc_scores is not None:
            self.doc_scores.update(zip(doc_ids, doc_nll.tolist()))

    def _log_adapter_step(self):
        """An adapter step is about to run: it trains on what the forwards since the last step
        read; the ledger counts those positions the scorer has not counted yet."""
        self.steps += 1
        spans_read = self.view.take_spans()
        self.ledger.append(
            {
                "event": "update",
                "chunk": self.chunk,
                "step": self.steps,
                "reads": len(spans_read),
                "max_target": max((hi - 1 for _, hi in spans_read), default=-1),
                "unscored_reads": _unscored_reads(spans_read, self.coverage, self.starts),
            }
        )

    def _forward(self, spans, n):
        """Per-token NLL of the spans (right-padded: causal, so padding never reaches a real
        position) under the first n adapters; y is -1 at padding; pos the absolute target
        positions."""
        nll, _, x, y, pos = self._forward_scored(spans, n)
        return nll, x, y, pos

    def _forward_scored(self, spans, n):
        """_forward's (nll, x, y, pos) with the NLL scoring counts second: the n-gram tilted one
        (no gradient) when the tilt is on, else nll itself."""
        reads = [self.view.read(lo, hi) for lo, hi in spans]
        length = max(r.numel() for r in reads) - 1
        x = torch.zeros(n, length, dtype=torch.int64, device=self.device)
        y = torch.full((n, length), -1, dtype=torch.int64, device=self.device)
        for i, r in enumerate(reads):
            x[i, : r.numel() - 1] = r[:-1]
            y[i, : r.numel() - 1] = r[1:]
        lo = torch.as_tensor([s[0] for s in spans], device=self.device)[:, None]
        pos = lo + 1 + torch.arange(length, device=self.device)[None, :]
        hints_at = pos.clamp(max=self.tokens.numel() - 1)  # padding may run past the split
        with self.adapters.applied(n), torch.enable_grad():
            nll, score_nll = token_nll_scored(self.model, x, y.clamp(min=0), self.tilt, hints_at)
        return nll, score_nll, x, y, pos

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

    def pause(self, ids, phase):
        """Global SGD on the base weights over the documents `ids` scored since the last pause."""
        _, world = _dist_info()
        ids = ttt_phase_docs(self.h, self.docs, ids)
        pieces = ttt_phase_pieces(self.docs, ids, self.ends_at_bos)
        stream = PieceView(self.phase_view, pieces)
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
        for step in self.trainer.train_chunk(stream, 0, len(stream), 0):
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
    order = ttt_doc_order(h, docs)
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
            mine = order[d0:d1][rank::world]
            mine = mine[np.argsort(-(docs[mine, 2] - docs[mine, 1]), kind="stable")]
            run.phase = phase
            run.adapters.new_phase()
            for g in range(0, len(mine), h.ttt_lora_batch_docs):
                ids = mine[g : g + h.ttt_lora_batch_docs]
                run.score_group(docs[ids], ids.tolist())
            if d1 < len(docs) and phased:
                run.pause(order[d0:d1], phase)
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
    extra = {"adapted_scalars": adapted_scalars(run.model)} if phased else {}
    return _eval_result(
        run.sums,
        t0,
        "ttt_phased" if phased else "ttt_lora",
        **extra,
        docs=len(docs),
        doc_order=h.ttt_doc_order,
        phases=len(bounds),
        lora_steps=run.steps,
        lora_rank=h.ttt_lora_rank,
        lora_scale=run.adapters.scale,
        warm_a_groups=sum(1 for e in run.ledger if e.get("warm_a")),  # this rank's groups
        lora_targets=len(run.adapters.targets),
        lora_form=h.ttt_lora_form,
        lora_slots=len(run.adapters.dims),  # adapters per row: one per pass with the record form
        seq_len=h.ttt_eval_len,
        chunk=h.ttt_lora_chunk,
        chunk_groups=dict(sorted(run.chunk_groups.items())),  # this rank's groups
        score_first=audit_score_first(run.ledger, run.coverage),
        **tilt_result(run.tilt),
    )


def eval_val_ttt_lora(h, model, val_tokens, luts, doc_scores=None):
    return _lora_ttt_eval(h, model, val_tokens, luts, phased=False, doc_scores=doc_scores)


def eval_val_ttt_phased(h, model, val_tokens, luts, doc_scores=None):
    return _lora_ttt_eval(h, model, val_tokens, luts, phased=True, doc_scores=doc_scores)
