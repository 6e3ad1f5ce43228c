"""Fault injection on the real code path of every audit: each audit is run once as shipped (it must
pass) and once with one fault rigged into the code it watches (it must fail, naming the fault).

- score-first (C3): the evaluator's chunk-range choice rigged to let the TTT trainer read one chunk
  ahead; the audit is built from the positions the trainer read through RecordedTokens;
- single pass (C4): `sliding_windows` rigged to score a target twice, or to skip one;
- byte accounting: the lookup tables passed to `run_audits` rigged one byte off for one token;
- causality (C1): a model whose `forward_logits` sees the next token, through `run_audits`;
- and a whole run whose TTT reads ahead ends `score INVALID` with exit status 3;
- the fault table over all five eval modes (issue 24): a dropped rank share in every mode; LoRA
  train-then-score, a skipped adapter reset and overlapping documents in both LoRA modes; the
  base moving inside a phase.
"""

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from conftest import TINY_ENV, load_script, summary_of
from test_eval import FakeSP
from torch import nn

V = 64


def small_h(gpt, **overrides):
    env = {
        **TINY_ENV,
        "VOCAB_SIZE": str(V),
        "TRAIN_SEQ_LEN": "32",
        "EVAL_SEQ_LEN": "32",
        "EVAL_STRIDE": "8",
        "VAL_BATCH_SIZE": "2048",
        "TTT_CHUNK_TOKENS": "64",
        "TTT_BATCH_SEQS": "2",
        "TTT_EPOCHS": "1",
        "TTT_LR": "0.05",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return gpt.Hyperparameters.from_env(env)


@pytest.fixture(scope="module")
def gpt():
    return load_script("train_gpt.py")


@pytest.fixture(scope="module")
def setup(gpt):
    h = small_h(gpt)
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(4, V, (301,), generator=torch.Generator().manual_seed(5))
    tokens[0] = 1
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return h, model, tokens, luts


# --- score-first (C3): the TTT trainer's reads ---------------------------------------------------


def test_score_first_audit_passes_the_shipped_ttt(gpt, setup):
    h, model, tokens, luts = setup
    audit = gpt.eval_val_ttt(h, model, tokens, luts)["score_first"]
    assert audit["passed"], audit["failures"]
    assert audit["updates"] > 0 and audit["chunks_scored"] == 5


def test_ttt_reading_one_chunk_ahead_is_caught(gpt, setup, monkeypatch):
    h, model, tokens, luts = setup

    def one_chunk_ahead(chunk_index, chunk_tokens, scored_upto):
        lo = (chunk_index + 1) * chunk_tokens
        return lo, min(lo + chunk_tokens, tokens.numel())

    monkeypatch.setattr(gpt, "ttt_train_range", one_chunk_ahead)
    res = gpt.eval_val_ttt(h, model, tokens, luts)
    audit = res["score_first"]
    assert audit["updates"] > 0  # the rigged trainer did train
    assert not audit["passed"]
    assert "before it was scored" in audit["failures"][0]
    assert audit["scored_twice"] == 0 and audit["never_scored"] == 0  # only C3 is broken


def test_a_trainer_reading_past_its_range_is_caught(gpt, setup, monkeypatch):
    """The audit does not trust the range the evaluator hands over:
    it sees what the trainer reads."""
    h, model, tokens, luts = setup
    honest = gpt._TTTTrainer.train_chunk

    def greedy(self, view, lo, hi, n):
        yield from honest(self, view, lo, min(hi + h.ttt_chunk_tokens, len(view)), n)

    monkeypatch.setattr(gpt._TTTTrainer, "train_chunk", greedy)
    audit = gpt.eval_val_ttt(h, model, tokens, luts)["score_first"]
    assert not audit["passed"] and "before it was scored" in audit["failures"][0]


def test_recorded_tokens_log_every_read(gpt):
    view = gpt.RecordedTokens(torch.arange(100))
    assert view.read(10, 20).tolist() == list(range(10, 20))
    view.read(30, 41)
    assert view.take_reads() == (2, 40)
    assert view.take_reads() == (0, -1)
    with pytest.raises(IndexError, match="outside"):
        view.read(90, 101)


# --- single pass (C4): the windows the scorer is given --------------------------------------------


def rigged_windows(gpt, shift):
    """sliding_windows with the first scored target of one middle window moved by `shift`: -1 scores
    one target twice, +1 skips one."""
    shipped = gpt.sliding_windows

    def windows(num_tokens, seq_len, stride):
        starts, firsts, lasts = shipped(num_tokens, seq_len, stride)
        firsts = firsts.copy()
        firsts[len(firsts) // 2] += shift
        return starts, firsts, lasts

    return windows


@pytest.mark.parametrize("mode", ["sliding", "ttt"])
def test_unrigged_windows_score_every_target_once(gpt, setup, mode):
    h, model, tokens, luts = setup
    audit = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)["score_first"]
    assert audit["passed"] and audit["scored_twice"] == 0 and audit["never_scored"] == 0


@pytest.mark.parametrize("mode", ["sliding", "ttt"])
def test_a_double_scored_target_is_caught(gpt, setup, monkeypatch, mode):
    h, model, tokens, luts = setup
    monkeypatch.setattr(gpt, "sliding_windows", rigged_windows(gpt, -1))
    audit = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)["score_first"]
    assert not audit["passed"] and audit["scored_twice"] == 1
    assert any("scored more than once" in f for f in audit["failures"])


@pytest.mark.parametrize("mode", ["sliding", "ttt"])
def test_a_skipped_target_is_caught(gpt, setup, monkeypatch, mode):
    h, model, tokens, luts = setup
    monkeypatch.setattr(gpt, "sliding_windows", rigged_windows(gpt, +1))
    audit = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)["score_first"]
    assert not audit["passed"] and audit["never_scored"] == 1
    assert any("never scored" in f for f in audit["failures"])


# --- run_audits: byte accounting and causality on the model about to be scored --------------------


class NextTokenLeak(nn.Module):
    """Causal but for one leak: each position's features include the next token's embedding."""

    def __init__(self, vocab):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def forward_logits(self, ids):
        x = self.tok_emb(ids)
        return self.head(x + 0.5 * torch.roll(x, -1, dims=1))


@pytest.fixture(scope="module")
def real_run(gpt, embedded):
    """What run_audits reads from a run: real tokenizer, real val tokens and their byte tables."""
    h = gpt.Hyperparameters.from_env({**TINY_ENV, **embedded})
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    val_tokens = gpt.load_validation_tokens(h.data_path, h.train_seq_len, h.val_max_tokens)
    luts = gpt.build_sentencepiece_luts(sp, h.vocab_size, torch.device("cpu"))
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    return h, sp, val_tokens, luts, model


def audit_run(gpt, h, sp, val_tokens, luts, tmp_path):
    return types.SimpleNamespace(
        h=h,
        sp=sp,
        val_tokens=val_tokens,
        luts=luts,
        logger=gpt.RunLogger(str(tmp_path), "audit", enabled=True),
        ledger=gpt.TimeLedger(),
    )


def test_run_audits_pass_the_shipped_model_and_tables(gpt, real_run, tmp_path):
    h, sp, val_tokens, luts, model = real_run
    audits = gpt.run_audits(audit_run(gpt, h, sp, val_tokens, luts, tmp_path), model)
    assert all(a["passed"] for a in audits.values()), audits


def test_a_byte_table_off_by_one_is_caught(gpt, real_run, tmp_path):
    h, sp, val_tokens, luts, model = real_run
    common = int(np.bincount(val_tokens[:10_000].numpy()).argmax())
    base_bytes = luts[0].clone()
    base_bytes[common] += 1
    rigged = (base_bytes, luts[1], luts[2])
    run = audit_run(gpt, h, sp, val_tokens, rigged, tmp_path)
    res = gpt.run_audits(run, model)["bytes"]
    assert not res["passed"] and res["lut_bytes"] > res["decoded_bytes"]
    assert res["failures"][0].startswith("byte table:") and str(common) in res["failures"][0]
    assert common in res["first_mismatch_ids"]
    assert "audit:bytes passed:False failures:['byte table:" in (tmp_path / "audit.txt").read_text()


def test_a_future_token_leak_is_caught(gpt, real_run, tmp_path):
    h, sp, val_tokens, luts, _ = real_run
    torch.manual_seed(0)
    run = audit_run(gpt, h, sp, val_tokens, luts, tmp_path)
    res = gpt.run_audits(run, NextTokenLeak(h.vocab_size))["causality"]
    assert not res["passed"]
    assert any("changing tokens after position" in f for f in res["failures"])


# --- a whole run ----------------------------------------------------------------------------------


def test_a_run_whose_ttt_reads_ahead_ends_invalid(gpt, embedded, tmp_path, monkeypatch):
    n_val = 8193  # VAL_MAX_TOKENS + 1

    def one_chunk_ahead(chunk_index, chunk_tokens, scored_upto):
        lo = (chunk_index + 1) * chunk_tokens
        return lo, min(lo + chunk_tokens, n_val)

    monkeypatch.setattr(gpt, "ttt_train_range", one_chunk_ahead)
    env = {
        **TINY_ENV,
        **embedded,
        "ITERATIONS": "2",
        "TTT_ENABLED": "1",
        "TTT_EPOCHS": "1",
        "VAL_MAX_TOKENS": "8192",
        "TTT_CHUNK_TOKENS": "2048",
        "LOG_DIR": str(tmp_path),
        "RUN_ID": "ahead",
    }
    assert gpt.run_main(gpt.Hyperparameters.from_env(env)) == 3
    log = (tmp_path / "ahead.txt").read_text()
    assert "audit:score_first passed:False" in log
    assert "score INVALID: failed score_first" in log
    summary = summary_of(log)
    assert not summary["valid"] and summary["invalid_reasons"] == ["failed score_first"]
    assert "before it was scored" in summary["audits"]["score_first"]["failures"][0]
    status = json.loads((tmp_path / "ahead.status.json").read_text())
    assert status["state"] == "failed" and status["invalid_reasons"] == ["failed score_first"]


# --- the fault table: every eval mode, one rig per fault (issue 24) -------------------------------
# Per-document LoRA TTT logs each optimizer step from the optimizer's own step hook, before the
# step runs, and each scored chunk with the steps its adapters and the phase trainer had taken by
# then: a rig that trains on a chunk before scoring it is caught whatever the scoring code writes
# in the ledger.

ALL_MODES = ["standard", "sliding", "ttt", "ttt_lora", "ttt_phased"]


@pytest.fixture(scope="module")
def docs_setup(gpt):
    """Eight documents of 40-90 tokens and LoRA settings that make several groups, chunks and
    phases on them."""
    h = small_h(
        gpt,
        ttt_lora_chunk=8,
        ttt_lora_batch_docs=2,
        ttt_lora_rank=4,
        ttt_lora_lr=0.05,
        ttt_phases="3,6",
        ttt_phase_lr=0.05,
    )
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(7)
    parts = []
    for n in (90, 41, 77, 52, 64, 45, 83, 58):
        doc = torch.randint(4, V, (n,), generator=gen)
        doc[0] = 1
        parts.append(doc)
    tokens = torch.cat([*parts, torch.ones(1, dtype=torch.int64)])
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return h, model, tokens, luts


def evaluate(gpt, docs_setup, mode):
    h, model, tokens, luts = docs_setup
    return gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_passes_its_score_first_audit_as_shipped(gpt, docs_setup, mode):
    audit = evaluate(gpt, docs_setup, mode)["score_first"]
    assert audit["passed"], audit["failures"]
    assert audit["scored_twice"] == 0 and audit["never_scored"] == 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_dropped_rank_share_is_caught_in_every_mode(gpt, docs_setup, monkeypatch, mode):
    """A sharding fault: this process believes it is rank 0 of 2 with no process group, so half
    of the windows (documents, sequences) are never scored by anyone."""
    monkeypatch.setattr(gpt, "_dist_info", lambda: (0, 2))
    audit = evaluate(gpt, docs_setup, mode)["score_first"]
    assert not audit["passed"] and audit["never_scored"] > 0
    assert any("never scored" in f for f in audit["failures"])


def train_then_score(gpt):
    """_LoraEval.score_group rigged to take each chunk's optimizer step first and score a second
    forward afterwards, writing the ledger as the honest code does (adapter_steps claimed = k)."""

    def score_group(self, docs, doc_ids):
        h = self.h
        chunk = gpt.lora_chunk_for(h, int((docs[:, 2] - docs[:, 1]).max()) + 1)
        n_chunks = (docs[:, 2] - docs[:, 1]) // chunk + 1
        self.adapters.reset()
        self.ledger.append({"event": "reset", "fresh": self.adapters.fresh(), "docs": len(docs)})
        doc_nll = torch.zeros(len(docs), dtype=torch.float64, device=self.device)
        for k in range(int(n_chunks.max())):
            self.chunk = k
            n = int((n_chunks > k).sum())
            rows = docs[:n]
            firsts = rows[:, 1] + k * chunk
            lasts = np.minimum(firsts + chunk - 1, rows[:, 2])
            spans = [
                gpt.ttt_lora_span(int(d), int(f), int(last), h.ttt_eval_len)
                for d, f, last in zip(rows[:, 0], firsts, lasts)
            ]
            first_t = torch.as_tensor(firsts)[:, None]
            last_t = torch.as_tensor(lasts)[:, None]
            nll, x, y, pos = self._forward(spans, n)
            trained = (pos >= first_t) & (y >= 0)
            per_doc = (nll * trained).sum(1) / trained.sum(1).clamp(min=1)
            self.adapters.opt.zero_grad(set_to_none=False)
            per_doc.sum().backward()
            self.adapters.opt.step()  # the fault: the chunk trains its own scorer
            nll, x, y, pos = self._forward(spans, n)
            scored = (pos >= first_t) & (pos <= last_t)
            self._score(nll.detach(), x, y, pos, scored, doc_nll[:n])
            self.scored_upto = max(self.scored_upto, int(lasts.max()))
            self.ledger.append(
                {
                    "event": "score",
                    "chunk": k,
                    "scored_upto": self.scored_upto,
                    "adapter_steps": k,  # a lie: the hook-logged step says otherwise
                    "phase": self.phase,
                    "phase_steps": self.trainer.steps if self.trainer else 0,
                }
            )

    return score_group


# Short-document chunks (#2014, TTT_SHORT_SCORE_FIRST_STEPS): the groups of the docs_setup
# (longest 90 targets) get chunks of 2, 4 and 8 tokens.
SHORT_CHUNKS = {"ttt_short_score_first_enabled": True, "ttt_short_score_first_steps": "60:2,85:4"}


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_lora_train_then_score_is_caught(gpt, docs_setup, monkeypatch, mode, short):
    if short:
        h, *rest = docs_setup
        docs_setup = (dataclasses.replace(h, **SHORT_CHUNKS), *rest)
    honest = evaluate(gpt, docs_setup, mode)
    assert honest["score_first"]["passed"], honest["score_first"]["failures"]
    if short:
        assert sorted(honest["chunk_groups"]) == [2, 4, 8], honest["chunk_groups"]
    monkeypatch.setattr(gpt._LoraEval, "score_group", train_then_score(gpt))
    rigged = evaluate(gpt, docs_setup, mode)
    assert rigged["val_loss"] != honest["val_loss"]  # the rig changed the scores
    audit = rigged["score_first"]
    assert audit["scored_twice"] == 0 and audit["never_scored"] == 0  # coverage is intact
    assert not audit["passed"]
    assert any("positions before they were scored" in f for f in audit["failures"])


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_lora_adapters_not_reset_between_groups_is_caught(gpt, docs_setup, monkeypatch, mode):
    shipped = gpt.LoraAdapters.reset

    def reset_once(self, docs=None):
        if not getattr(self, "was_reset", False):
            self.was_reset = True
            shipped(self, docs)

    monkeypatch.setattr(gpt.LoraAdapters, "reset", reset_once)
    audit = evaluate(gpt, docs_setup, mode)["score_first"]
    assert not audit["passed"]
    assert any("not reset" in f for f in audit["failures"])
    assert any("adapter steps, not 0" in f for f in audit["failures"])


def test_phase_base_moving_inside_a_phase_is_caught(gpt, docs_setup, monkeypatch):
    """A rig that takes a global SGD step on the base after each group, on documents already
    scored (reads that pass the per-position check), in the middle of a phase."""
    honest = gpt._LoraEval.score_group

    def score_then_step(self, docs, doc_ids):
        honest(self, docs, doc_ids)
        lo = int(docs[0, 0])
        hi = int(docs[0, 2]) + 1
        for p in self.trainer.params:
            p.requires_grad_(True)
        for _ in self.trainer.train_chunk(self.phase_view, lo, hi, 0):
            self.phase_view.take_spans()
        self._freeze_base()

    monkeypatch.setattr(gpt._LoraEval, "score_group", score_then_step)
    audit = evaluate(gpt, docs_setup, "ttt_phased")["score_first"]
    assert not audit["passed"]
    assert any("base weights moved while phase" in f for f in audit["failures"])


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_lora_overlapping_documents_score_a_target_twice(gpt, docs_setup, monkeypatch, mode):
    shipped = gpt.val_documents

    def overlapping(tokens, bos_id=1):
        docs = shipped(tokens, bos_id).copy()
        docs[:-1, 2] += 1  # each document also scores the next one's first target
        return docs

    monkeypatch.setattr(gpt, "val_documents", overlapping)
    audit = evaluate(gpt, docs_setup, mode)["score_first"]
    assert not audit["passed"] and audit["scored_twice"] > 0
