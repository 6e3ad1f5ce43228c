"""The eval/TTT levers of the 1.0565 frontier (issue 23 item 4; #1953, #2014, #2135): the LoRA TTT
context apart from the eval window (TTT_EVAL_SEQ_LEN), adapter roles (TTT_MASK, TTT_*_LORA), the
local lr multiplier, short-document score-first chunks, one phase over a prefix, and the standard
eval's tail (EVAL_INCLUDE_TAIL). Each against an independent reference or the score-first audit,
with a rig the audit must catch."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY_ENV, load_script, summary_of
from test_eval import FakeSP, V, small_h
from test_lora_ttt import DOCS, lora_h, make_docs, stream


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    h = small_h(gpt)
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, model, luts


def reference_per_document(model, tokens, window, chunk_of):
    """Mean NLL with target j of a document scored from the tokens of its document before it,
    starting `window` tokens before the last target of its chunk; a document of n targets is cut
    into chunks of chunk_of(n) targets from its first one."""
    nll = 0.0
    bos = [i for i in range(tokens.numel()) if tokens[i] == 1]
    ends = [*bos[1:], tokens.numel() - 1]
    for start, end in zip(bos, ends):
        size = chunk_of(end - start)
        for j in range(start + 1, end + 1):
            last = min(start + 1 + ((j - start - 1) // size + 1) * size - 1, end)
            lo = max(start, last - window)
            with torch.no_grad():
                logits = model.forward_logits(tokens[lo:j][None])[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[tokens[j]].item()
    return nll / (tokens.numel() - 1)


# --- TTT_EVAL_SEQ_LEN -----------------------------------------------------------------------------


def test_ttt_eval_seq_len_sets_the_lora_context_and_not_the_sliding_window(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    h = lora_h(gpt, ttt_lora_lr=0.0, ttt_eval_seq_len=16)
    res = gpt.eval_val_ttt_lora(h, model, tokens, luts)
    assert res["seq_len"] == 16 and res["score_first"]["passed"]
    assert res["val_loss"] == pytest.approx(
        reference_per_document(model, tokens, 16, lambda n: 8), rel=1e-6
    )
    default = gpt.eval_val_ttt_lora(lora_h(gpt, ttt_lora_lr=0.0), model, tokens, luts)
    assert default["seq_len"] == 32 and default["val_loss"] != res["val_loss"]
    sliding = gpt.eval_val_sliding(h, model, tokens, luts)
    assert sliding["val_loss"] == gpt.eval_val_sliding(lora_h(gpt), model, tokens, luts)["val_loss"]


def test_a_ttt_context_beyond_train_seq_len_is_scored_and_causal(setup):
    """TRAIN_SEQ_LEN=32, LoRA windows of 80 tokens: RoPE runs past the trained length (plain RoPE:
    the tiny model has no YaRN) and document attention holds at any length."""
    gpt, model, luts = setup
    tokens = stream(make_docs([120, 30, 95], seed=3))
    h = lora_h(gpt, ttt_lora_lr=0.0, ttt_eval_seq_len=80, ttt_lora_chunk=16)
    assert h.train_seq_len == 32 and h.ttt_eval_len == 80
    res = gpt.eval_val_ttt_lora(h, model, tokens, luts)
    assert res["val_loss"] == pytest.approx(
        reference_per_document(model, tokens, 80, lambda n: 16), rel=1e-6
    )
    assert gpt.audit_causality(model, 80, V)["passed"]
    learning = gpt.eval_val_ttt_phased(
        lora_h(gpt, ttt_eval_seq_len=80, ttt_lora_chunk=16, ttt_phases="1"), model, tokens, luts
    )
    assert learning["score_first"]["passed"] and learning["tokens"] == tokens.numel() - 1


# --- TTT_MASK and the per-role switches -----------------------------------------------------------


def roles(gpt, h, model):
    return sorted({gpt.lora_role(n) for n in gpt.masked_lora_targets(model, h)})


def test_the_mask_and_switches_choose_the_adapted_roles(setup):
    gpt, model, luts = setup
    assert roles(gpt, lora_h(gpt), model) == ["head", "k", "mlp", "o", "q", "v"]
    for kw, gone in (
        ({"ttt_mask": "no_qv"}, {"q", "v"}),
        ({"ttt_mask": "no_q"}, {"q"}),
        ({"ttt_mask": "no_v"}, {"v"}),
        ({"ttt_mask": "all"}, set()),
        ({"ttt_k_lora": False}, {"k"}),
        ({"ttt_o_lora": False}, {"o"}),
        ({"ttt_mlp_lora": False}, {"mlp"}),
        ({"ttt_mask": "no_qv", "ttt_k_lora": False}, {"q", "k", "v"}),
    ):
        kept = roles(gpt, lora_h(gpt, **kw), model)
        assert set(kept) == {"head", "k", "mlp", "o", "q", "v"} - gone, kw
    names = gpt.masked_lora_targets(model, lora_h(gpt, ttt_mask="no_qv", ttt_k_lora=False))
    assert not any(n.endswith((".c_q", ".c_k", ".c_v")) for n in names)
    assert any(n.endswith("attn.proj") for n in names)


def test_a_masked_run_scores_first_and_differs(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    full = gpt.eval_val_ttt_phased(lora_h(gpt), model, tokens, luts)
    for kw in ({"ttt_mask": "no_qv"}, {"ttt_k_lora": False}):
        res = gpt.eval_val_ttt_phased(lora_h(gpt, **kw), model, tokens, luts)
        assert res["score_first"]["passed"] and res["val_loss"] != full["val_loss"]
        assert res["lora_targets"] < full["lora_targets"]


def test_bad_masks_and_switches_are_one_line_errors(setup):
    gpt, model, _ = setup
    with pytest.raises(ValueError, match="TTT_MASK='no_k': must be one of"):
        lora_h(gpt, ttt_mask="no_k")
    off = {f: False for f in ("ttt_q_lora", "ttt_k_lora", "ttt_v_lora", "ttt_o_lora")}
    h = lora_h(gpt, ttt_mlp_lora=False, ttt_lora_head=False, **off)
    with pytest.raises(ValueError, match="leave no module to adapt"):
        gpt.masked_lora_targets(model, h)
    manifold = load_script("train_manifold.py")
    mh = manifold.Hyperparameters.from_env({**TINY_ENV, "TTT_K_LORA": "0", "MODEL_DIM": "32"})
    with pytest.raises(ValueError, match="TTT_K_LORA=0 .*no k module"):
        manifold.masked_lora_targets(manifold.build_model(mh), mh)


# --- TTT_LOCAL_LR_MULT ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_the_local_lr_mult_scales_the_lora_lr_and_not_the_phase_lr(setup, mode):
    """lr 0.02 x 0.5 is lr 0.01 exactly; in phased mode that holds only if the phase SGD's lr is
    left alone (a multiplied phase lr would halve it on one side only)."""
    gpt, model, luts = setup
    tokens = stream(DOCS)
    run = gpt.EVAL_MODES[mode].evaluate
    half = run(lora_h(gpt, ttt_lora_lr=0.02, ttt_local_lr_mult=0.5), model, tokens, luts)
    plain = run(lora_h(gpt, ttt_lora_lr=0.01), model, tokens, luts)
    assert half["val_loss"] == plain["val_loss"]
    full = run(lora_h(gpt, ttt_lora_lr=0.02), model, tokens, luts)
    assert full["val_loss"] != half["val_loss"]
    with pytest.raises(ValueError, match="TTT_LOCAL_LR_MULT"):
        lora_h(gpt, ttt_local_lr_mult=-1.0)


# --- short-document score-first chunks ------------------------------------------------------------


def test_the_short_chunk_schedule_follows_the_record(setup):
    """#2014: a group's chunk comes from its longest document, whose length counts BOS..closing
    BOS (targets + 1), against each step's limit inclusively; past the last step TTT_LORA_CHUNK."""
    gpt = setup[0]
    h = lora_h(
        gpt,
        ttt_lora_chunk=48,
        ttt_short_score_first_enabled=True,
        ttt_short_score_first_steps="2000:24, 256:8",
    )
    assert gpt.ttt_short_chunk_steps(h) == [(256, 8), (2000, 24)]
    got = {n: gpt.lora_chunk_for(h, n) for n in (1, 255, 256, 1999, 2000, 10**6)}
    assert got == {1: 8, 255: 8, 256: 24, 1999: 24, 2000: 48, 10**6: 48}
    off = dataclasses.replace(h, ttt_short_score_first_enabled=False)
    assert {gpt.lora_chunk_for(off, n) for n in got} == {48}


def test_bad_short_chunk_steps_are_one_line_errors(setup):
    gpt = setup[0]
    for steps in ("256", "256:0", "a:8", "256:8,256:16", "-5:8"):
        with pytest.raises(ValueError, match="TTT_SHORT_SCORE_FIRST_STEPS"):
            lora_h(gpt, ttt_short_score_first_steps=steps)
    for kw, name in (
        ({"ttt_short_doc_len": 0}, "TTT_SHORT_DOC_LEN"),
        ({"ttt_short_chunk_size": -1}, "TTT_SHORT_CHUNK_SIZE"),
    ):
        with pytest.raises(ValueError, match=name):
            lora_h(gpt, **kw)


def test_without_steps_the_short_chunk_is_2014s_single_step(setup):
    """#2014's fallback: with no TTT_SHORT_SCORE_FIRST_STEPS a group whose longest document is
    at most TTT_SHORT_DOC_LEN tokens (targets + 1) is cut at TTT_SHORT_CHUNK_SIZE; its default
    (0: TTT_LORA_CHUNK, as #2014's) leaves every chunk as it was."""
    gpt = setup[0]
    h = lora_h(
        gpt,
        ttt_lora_chunk=48,
        ttt_short_score_first_enabled=True,
        ttt_short_doc_len=2000,
        ttt_short_chunk_size=24,
    )
    assert gpt.ttt_short_chunk_schedule(h) == [(2000, 24)]
    got = {n: gpt.lora_chunk_for(h, n) for n in (1, 1999, 2000, 10**6)}
    assert got == {1: 24, 1999: 24, 2000: 48, 10**6: 48}
    default = lora_h(gpt, ttt_lora_chunk=48, ttt_short_score_first_enabled=True)
    assert gpt.ttt_short_chunk_schedule(default) == [(512, 48)]
    assert {gpt.lora_chunk_for(default, n) for n in got} == {48}
    # The steps string, when given, decides alone.
    both = dataclasses.replace(h, ttt_short_score_first_steps="256:8")
    assert gpt.ttt_short_chunk_schedule(both) == [(256, 8)]
    assert gpt.lora_chunk_for(both, 1999) == 48


SHORT = {"ttt_short_score_first_enabled": True, "ttt_short_score_first_steps": "12:2,50:4"}


def short_chunk(n_targets):
    """The schedule of SHORT, written out: documents of n targets are n + 1 tokens long."""
    if n_targets + 1 <= 12:
        return 2
    if n_targets + 1 <= 50:
        return 4
    return 8


def test_short_chunks_equal_a_per_document_reference(setup):
    """One document per group: each is cut at its own schedule's chunk (DOCS: 2 to 70 targets)."""
    gpt, model, luts = setup
    tokens = stream(DOCS)
    h = lora_h(gpt, ttt_lora_lr=0.0, ttt_lora_batch_docs=1, **SHORT)
    res = gpt.eval_val_ttt_lora(h, model, tokens, luts)
    assert res["val_loss"] == pytest.approx(
        reference_per_document(model, tokens, 32, short_chunk), rel=1e-6
    )
    expected = {}
    for n in (len(d) for d in DOCS):
        expected[short_chunk(n)] = expected.get(short_chunk(n), 0) + 1
    assert res["chunk_groups"] == expected
    # the 48-token chunking scores the long documents differently: the reference can tell
    assert res["val_loss"] != pytest.approx(
        reference_per_document(model, tokens, 32, lambda n: 8), rel=1e-6
    )


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_short_chunks_score_first_and_a_one_token_lookahead_is_caught(setup, monkeypatch, mode):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    h = lora_h(gpt, **SHORT)
    res = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)
    audit = res["score_first"]
    assert audit["passed"], audit["failures"]
    assert audit["scored_twice"] == 0 and audit["never_scored"] == 0
    assert set(res["chunk_groups"]) - {8}, res["chunk_groups"]  # short chunks were used
    shipped = gpt.ttt_lora_span

    def one_token_ahead(doc_lo, first, last, window):
        lo, hi = shipped(doc_lo, first, last, window)
        return lo, min(hi + 1, tokens.numel())

    monkeypatch.setattr(gpt, "ttt_lora_span", one_token_ahead)
    audit = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)["score_first"]
    assert not audit["passed"]
    assert any("positions before they were scored" in f for f in audit["failures"])


# --- one phase over a prefix of documents ---------------------------------------------------------


def test_one_phase_over_a_prefix_and_the_record_knobs(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    one = gpt.eval_val_ttt_phased(lora_h(gpt, ttt_phases="4"), model, tokens, luts)
    assert one["phases"] == 1 and one["score_first"]["passed"]
    # more prefix documents than the split holds: no pause, the LoRA-only score exactly
    none = gpt.eval_val_ttt_phased(lora_h(gpt, ttt_phases="2500"), model, tokens, luts)
    lora = gpt.eval_val_ttt_lora(lora_h(gpt), model, tokens, luts)
    assert none["phases"] == 0 and none["val_loss"] == lora["val_loss"]
    assert one["val_loss"] != none["val_loss"]
    # #2135's values are expressible: lr 8e-5, weight decay 2.0, no K LoRA, one 2500-doc phase
    h = gpt.Hyperparameters.from_env(
        {
            "TTT_LORA_LR": "8e-5",
            "TTT_LORA_WD": "2.0",
            "TTT_K_LORA": "0",
            "TTT_PHASES": "2500",
            "TTT_EVAL_SEQ_LEN": "2560",
            "EVAL_SEQ_LEN": "2560",
        }
    )
    assert (h.ttt_lora_lr, h.ttt_lora_wd, h.ttt_k_lora) == (8e-5, 2.0, False)
    assert gpt.ttt_phase_bounds(h) == [2500] and h.ttt_eval_len == 2560


# --- EVAL_INCLUDE_TAIL ----------------------------------------------------------------------------


def reference_standard(model, tokens, seq, tail):
    """NLL sum and target count of whole seq-token windows, then (tail) one shorter window."""
    n_targets = tokens.numel() - 1
    cut = n_targets // seq * seq
    bounds = [(s, s + seq) for s in range(0, cut, seq)]
    if tail and cut < n_targets:
        bounds.append((cut, n_targets))
    nll = 0.0
    for lo, hi in bounds:
        with torch.no_grad():
            logits = model.forward_logits(tokens[lo:hi][None])[0].double()
        nll -= torch.log_softmax(logits, -1).gather(1, tokens[lo + 1 : hi + 1, None]).sum().item()
    return nll, sum(hi - lo for lo, hi in bounds)


@pytest.mark.parametrize("n_tokens", [301, 289])
def test_the_tail_is_scored_with_the_flag_and_only_then(setup, n_tokens):
    """301 tokens: 300 targets, 288 in whole 32-token windows; 289 tokens: no tail at all."""
    gpt, model, luts = setup
    tokens = torch.randint(4, V, (n_tokens,), generator=torch.Generator().manual_seed(5))
    tokens[0] = 1
    for tail in (False, True):
        res = gpt.eval_val(lora_h(gpt, eval_include_tail=tail), model, tokens, luts)
        nll, count = reference_standard(model, tokens, 32, tail)
        assert res["tokens"] == count and res["score_first"]["passed"]
        assert res["score_first"]["never_scored"] == 0
        assert res["val_loss"] == pytest.approx(nll / count, rel=1e-6)
        assert res["score_first"]["targets"] == (n_tokens - 1 if tail else n_tokens // 32 * 32)
    assert count == n_tokens - 1


def test_the_tail_is_scored_once_across_ranks_and_a_dropped_tail_is_caught(setup, monkeypatch):
    gpt, model, luts = setup
    for n, world in ((301, 2), (301, 3), (289, 2), (40, 4)):
        covered = []
        for rank in range(world):
            for first, rows, width in gpt.standard_batches(n, 32, rank, world, 2, True):
                covered += range(first + 1, first + rows * width + 1)
        assert sorted(covered) == list(range(1, n)), (n, world)
    tokens = torch.randint(4, V, (301,), generator=torch.Generator().manual_seed(5))
    tokens[0] = 1
    shipped = gpt.standard_batches
    monkeypatch.setattr(gpt, "standard_batches", lambda *a: shipped(*a[:-1], False))
    audit = gpt.eval_val(lora_h(gpt, eval_include_tail=True), model, tokens, luts)["score_first"]
    assert not audit["passed"] and audit["never_scored"] == 300 - 288


def test_every_mode_scores_every_target_with_the_tail_flag(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    h = lora_h(gpt, eval_include_tail=True)
    for mode, ev in gpt.EVAL_MODES.items():
        res = ev.evaluate(h, model, tokens, luts)
        assert res["tokens"] == tokens.numel() - 1, mode
        assert res["score_first"]["passed"] and res["score_first"]["never_scored"] == 0, mode


# --- a tiny run with every lever on ---------------------------------------------------------------


def test_a_tiny_phased_run_with_every_lever(gpt, embedded, tmp_path):
    env = {
        **TINY_ENV,
        **embedded,
        "ITERATIONS": "2",
        "VAL_MAX_TOKENS": "3000",
        "EVAL_MODE": "ttt_phased",
        "TTT_LORA_RANK": "4",
        "TTT_LORA_BATCH_DOCS": "16",
        "TTT_PHASES": "5",
        "TTT_EVAL_SEQ_LEN": "128",
        "TTT_MASK": "no_qv",
        "TTT_K_LORA": "0",
        "TTT_LOCAL_LR_MULT": "0.75",
        "TTT_SHORT_SCORE_FIRST_ENABLED": "1",
        "TTT_SHORT_SCORE_FIRST_STEPS": "64:8,256:24",
        "EVAL_INCLUDE_TAIL": "1",
        "PRE_QUANT_EVAL": "0",
        "LOG_DIR": str(tmp_path),
        "RUN_ID": "levers",
    }
    assert gpt.run_main(gpt.Hyperparameters.from_env(env)) == 0
    log = (tmp_path / "levers.txt").read_text()
    assert "audit:causality_ttt passed:True" in log
    assert "seq_len:64 ttt_seq_len:128" in log
    assert "audit:score_first passed:True" in log
    summary = summary_of(log)
    assert summary["valid"], json.dumps(summary)[:2000]
    assert set(summary["evals"].values()) == {3000}, summary["evals"]  # the tail is scored too
    assert np.isfinite(summary["val_bpb"])
