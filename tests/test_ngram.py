"""The token-only n-gram tilt (issue 23 item 1, #2130/#2135): the vectorized hints against the plain
token-by-token reference (tests/ngram_reference.py) on a million real tokens, the record's tie rule,
causality (prefix invariance) and normalization, the audit catching a hint that reads its target,
every eval mode looking hints up at the targets' own val positions, the knobs, and a tiny run whose
summary records the tilt and whose artifact eval_bpb.py re-scores with it."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, TINY_ENV, load_script, run_script, summary_of
from ngram_reference import reference_hints

from golf import ngram
from golf.ngram import audit_ngram_tilt, ngram_hints, tilt_mass_error, tilted_nll

SP8192 = SHARED_DATA / "shards" / "realtext_sp8192"
MILLION = 1_000_000


def real_tokens(count):
    """The first `count` real sp8192 tokens: the val shard, then the train shard."""
    files = [SP8192 / "fineweb_val_000000.bin", SP8192 / "fineweb_train_000000.bin"]
    if not all(f.is_file() for f in files):
        pytest.skip("../shared/data (real FineWeb shards) is not present beside the checkout")
    tokens = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in files])
    assert tokens.size >= count
    return tokens[:count]


@pytest.fixture(scope="module")
def million():
    """A million real tokens and the reference's hints at order 16 (plain Python: ~10-30 s)."""
    tokens = real_tokens(MILLION)
    return tokens, reference_hints(tokens, 16, 0.8)


def test_hints_equal_the_reference_on_a_million_real_tokens(million):
    tokens, (ref_hint, ref_gate) = million
    hint, gate = ngram_hints(tokens, 16, 0.8)
    assert gate.sum() > 1000 and len(np.unique(hint[gate])) > 100  # not a trivial comparison
    assert np.array_equal(hint, ref_hint) and np.array_equal(gate, ref_gate)


def test_the_general_pair_count_path_equals_the_reference(million, monkeypatch):
    """Counting pairs by their record key (taken when two pairs could share a key) gives the same
    hints as the fast path by context and token."""
    tokens, (ref_hint, ref_gate) = million
    monkeypatch.setattr(ngram, "_pair_counts_in_contexts", lambda *args: None)
    hint, gate = ngram_hints(tokens, 16, 0.8)
    assert np.array_equal(hint, ref_hint) and np.array_equal(gate, ref_gate)


@pytest.mark.parametrize("order,threshold", [(1, 0.5), (2, 0.8), (3, 0.6), (5, 1.0), (33, 0.8)])
def test_other_orders_and_thresholds_equal_the_reference(order, threshold):
    tokens = real_tokens(60_000)
    hint, gate = ngram_hints(tokens, order, threshold)
    ref_hint, ref_gate = reference_hints(tokens, order, threshold)
    assert np.array_equal(hint, ref_hint) and np.array_equal(gate, ref_gate)


def test_repetitive_streams_with_many_ties_equal_the_reference():
    rng = np.random.default_rng(3)
    for vocab, order in ((3, 2), (4, 3), (2, 6)):
        tokens = rng.integers(0, vocab, 5000).astype(np.uint16)
        ref = reference_hints(tokens, order, 0.4)
        got = ngram_hints(tokens, order, 0.4)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_the_first_token_to_reach_the_top_count_keeps_the_hint():
    """Order 2 (the context is the previous token), worked by hand from the record's rule: the
    top token changes only on a strictly larger pair count. Context 5 is followed by 1, then 2
    (a tie: 1 stays), then 2 (2 leads), then 1 (a tie again: 2 stays)."""
    tokens = np.array([0, 0, 5, 1, 5, 2, 5, 2, 5, 1, 5, 9], dtype=np.uint16)
    hint, gate = ngram_hints(tokens, 2, 0.5)
    assert hint.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 5, 2, 5, 2]
    assert gate.tolist() == [False, False, True, False, False, True, False, True] + [True] * 4
    _, strict = ngram_hints(tokens, 2, 0.6)  # shares 1/2 at positions 7 and 11
    assert strict.tolist() == gate.tolist()[:7] + [False, True, True, True, False]


def test_hints_of_a_prefix_do_not_move_when_the_suffix_changes():
    tokens = real_tokens(80_000)
    hint, gate = ngram_hints(tokens, 16, 0.8)
    rng = np.random.default_rng(0)
    for cut in (1, 15, 16, 17, 1000, 40_000, 79_998):
        changed = tokens.copy()
        changed[cut:] = rng.integers(0, 8192, tokens.size - cut)
        h2, g2 = ngram_hints(changed, 16, 0.8)
        assert np.array_equal(h2[: cut + 1], hint[: cut + 1])
        assert np.array_equal(g2[: cut + 1], gate[: cut + 1])
    assert audit_ngram_tilt(
        tokens[:20_000], hint[:20_000], gate[:20_000], lambda t: ngram_hints(t), 2.625, 8192
    )["passed"]


def test_the_audit_catches_a_hint_that_reads_its_target():
    tokens = real_tokens(20_000)
    hint, gate = ngram_hints(tokens)

    def reads_the_target(t):
        return np.asarray(t).astype(np.int32), np.ones(len(t), dtype=bool)

    rigged = audit_ngram_tilt(tokens, *reads_the_target(tokens), reads_the_target, 2.625, 8192)
    assert not rigged["passed"] and any(f.startswith("prefix:") for f in rigged["failures"])
    # Honest hint code, but the scorer handed arrays that read the target: caught too.
    arrays = audit_ngram_tilt(tokens, *reads_the_target(tokens), ngram_hints, 2.625, 8192)
    assert not arrays["passed"] and "differ" in arrays["failures"][0]
    assert audit_ngram_tilt(tokens, hint, gate, ngram_hints, 2.625, 8192)["passed"]


@pytest.mark.parametrize("boost", [0.0, 2.625, 9.0])
def test_the_tilted_distribution_sums_to_one_over_the_vocabulary(boost):
    assert tilt_mass_error(8192, boost) < 1e-6


def test_tilted_nll_is_the_renormalized_boosted_softmax():
    gen = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, 7, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (3, 7), generator=gen)
    hint = torch.randint(0, vocab, (3, 7), generator=gen)
    hint[0, :4] = targets[0, :4]  # some hits
    gate = torch.rand(3, 7, generator=gen) < 0.6
    boost = 2.625
    got = tilted_nll(logits, targets, hint, gate, boost)
    boosted = logits.double() + boost * F.one_hot(hint, vocab).double()
    want_tilted = -torch.log_softmax(boosted, -1).gather(-1, targets[..., None])[..., 0]
    plain = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    plain = plain.view(3, 7)
    assert torch.allclose(got[gate].double(), want_tilted[gate], atol=1e-5)
    assert torch.equal(got[~gate], plain[~gate])  # ungated: exactly the untilted NLL


def test_the_tilt_adds_no_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 20, generator=gen, requires_grad=True)
    targets = torch.randint(0, 20, (2, 5), generator=gen)
    gate = torch.ones(2, 5, dtype=torch.bool)
    gate[0] = False
    tilted_nll(logits, targets, targets, gate, 2.625).sum().backward()
    assert logits.grad[1].abs().max() == 0  # gated rows: the tilt is scoring, not training
    assert logits.grad[0].abs().max() > 0


# --- the eval modes ------------------------------------------------------------------------------

V = 64


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    torch.manual_seed(0)
    h = small_h(gpt)
    model = gpt.build_model(h).eval()
    gen = torch.Generator().manual_seed(5)
    # Repetitive val tokens (a few phrases, BOS between documents) so that hints fire.
    phrases = [torch.randint(4, V, (9,), generator=gen) for _ in range(4)]
    parts = [torch.tensor([1])]
    for i in torch.randint(0, 4, (40,), generator=gen).tolist():
        parts.append(phrases[i])
        if i == 0:
            parts.append(torch.tensor([1]))
    tokens = torch.cat(parts)[:301]
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, model, tokens, luts


class FakeSP:
    """Every id a 1-byte piece, 0-3 control (as tests/test_eval.py)."""

    def vocab_size(self):
        return V

    def is_control(self, i):
        return i < 3

    def is_unknown(self, i):
        return i == 3

    def is_unused(self, i):
        return False

    def is_byte(self, i):
        return False

    def id_to_piece(self, i):
        return ("\u2581" if i % 3 == 0 else "") + chr(97 + i % 26)


def small_h(module, **kw):
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
        "TTT_LORA_RANK": "2",
        "TTT_LORA_CHUNK": "16",
        "TTT_LORA_BATCH_DOCS": "4",
        "TTT_PHASES": "2",
        "TOKEN_ORDER": "3",
    }
    env.update({k.upper(): str(v) for k, v in kw.items()})
    return module.Hyperparameters.from_env(env)


MODES = ("standard", "sliding", "ttt", "ttt_lora", "ttt_phased")


def reference_tilted_sliding(model, tokens, luts, L, s, hint, gate, boost):
    """Each target j once, in the first window holding it (as tests/test_eval.py's reference),
    its NLL tilted by hint[j] where gate[j]: -log of the boosted, renormalized softmax."""
    nll = 0.0
    for j in range(1, tokens.numel()):
        start = max(0, math.ceil((j - L) / s)) * s
        with torch.no_grad():
            logits = model.forward_logits(tokens[start:j][None])[0, -1].double()
        if gate[j]:
            logits = logits.clone()
            logits[int(hint[j])] += boost
        nll -= torch.log_softmax(logits, -1)[tokens[j]].item()
    return nll


def test_sliding_eval_with_the_tilt_matches_an_independent_reference(setup):
    gpt, model, tokens, luts = setup
    h = small_h(gpt, ngram_tilt_enabled=1)
    res = gpt.eval_val_sliding(h, model, tokens, luts)
    hint, gate = reference_hints(tokens.numpy(), 3, 0.8)
    assert gate.sum() > 20
    nll = reference_tilted_sliding(model, tokens, luts, 32, 8, hint, gate, 2.625)
    assert res["val_loss"] == pytest.approx(nll / (tokens.numel() - 1), rel=1e-5)
    tilt = res["ngram_tilt"]
    assert tilt["passed"] and tilt["gated"] == int(gate.sum()) and tilt["precompute_s"] >= 0
    plain = gpt.eval_val_sliding(small_h(gpt), model, tokens, luts)
    assert "ngram_tilt" not in plain and plain["val_loss"] != res["val_loss"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_looks_hints_up_at_the_targets_own_positions(setup, mode, monkeypatch):
    """A cheating hint (the target itself, always gated, boost 40) makes every scored NLL ~0 only
    if each mode looks the hint up at its target's own val position; the audit fails it."""
    gpt, model, tokens, luts = setup

    def cheat(t, order, threshold):
        return np.asarray(t).astype(np.int32), np.ones(len(t), dtype=bool)

    monkeypatch.setattr(gpt, "ngram_hints", cheat)
    h = small_h(gpt, ngram_tilt_enabled=1, token_boost=40, ttt_lr=0.01)
    res = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)
    assert res["val_loss"] < 1e-6 and res["tokens"] > 0
    assert not res["ngram_tilt"]["passed"]


@pytest.mark.parametrize("mode", MODES)
def test_a_zero_boost_scores_exactly_as_without_the_tilt(setup, mode):
    """Boost 0 multiplies by e^0: the tilted path must then give the untilted score to the bit,
    TTT training included (the trainers learn from the untilted NLL either way)."""
    gpt, model, tokens, luts = setup
    plain = gpt.EVAL_MODES[mode].evaluate(small_h(gpt, ttt_lr=0.01), model, tokens, luts)
    h = small_h(gpt, ngram_tilt_enabled=1, token_boost=0, ttt_lr=0.01)
    zero = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)
    assert zero["val_loss"] == plain["val_loss"] and zero["ngram_tilt"]["gated"] > 0
    tilted = gpt.EVAL_MODES[mode].evaluate(
        small_h(gpt, ngram_tilt_enabled=1, ttt_lr=0.01), model, tokens, luts
    )
    assert tilted["val_loss"] != plain["val_loss"] and tilted["score_first"]["passed"]


@pytest.mark.parametrize(
    "name,value,why",
    [
        ("TOKEN_ORDER", "0", "1..33"),
        ("TOKEN_ORDER", "34", "1..33"),
        ("TOKEN_THRESHOLD", "0", "(0, 1]"),
        ("TOKEN_THRESHOLD", "1.5", "(0, 1]"),
        ("TOKEN_BOOST", "-1", "negative"),
        ("NGRAM_TILT_ENABLED", "maybe", "0 or 1"),
    ],
)
def test_bad_knobs_are_refused_naming_the_variable(setup, name, value, why):
    gpt = setup[0]
    with pytest.raises(ValueError) as err:
        small_h(gpt, **{name: value})
    assert str(err.value).startswith(f"{name}=") and why in str(err.value)


def test_a_run_records_the_tilt_and_eval_bpb_rescores_with_it(embedded, tmp_path, capsys):
    env = {
        **TINY_ENV,
        **embedded,
        "LOG_DIR": str(tmp_path),
        "RUN_ID": "tilt",
        "NGRAM_TILT_ENABLED": "1",
        "TOKEN_ORDER": "4",
        "OMP_NUM_THREADS": "1",
    }
    out = run_script("train_gpt.py", env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = (tmp_path / "tilt.txt").read_text()
    summary = summary_of(log)
    tilt = summary["ngram_tilt"]
    assert summary["valid"] and summary["audits"]["ngram_tilt"]["passed"]
    assert (tilt["order"], tilt["threshold"], tilt["boost"]) == (4, 0.8, 2.625)
    assert tilt["gated"] > 0 and "ngram_tilt:final_sliding_window order:4" in log
    assert "scored with the n-gram tilt (TOKEN_ORDER=4" in log
    import eval_bpb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run: the same float operations in the same order
    try:
        code = eval_bpb.main([summary["artifact_path"]], env={})
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert code == 0, text
    exact = [line for line in log.splitlines() if line.startswith("final_sliding_window_exact")]
    assert exact[-1].split(" stride:")[0] in text
    assert f"{tilt['gated']} of" in text and "audit:ngram_tilt passed:True" in text


@pytest.mark.parametrize("name", ["train_gpt.py", "train_hydra.py", "train_manifold.py"])
def test_every_bundle_carries_the_tilt_off_by_default(name):
    script = load_script(name)
    assert callable(script.ngram_hints) and callable(script.build_ngram_tilt)
    presets = script.Hyperparameters.spec.presets
    for preset, values in presets.items():
        h = script.Hyperparameters.from_env({"PRESET": preset})
        assert h.ngram_tilt_enabled == values.get("ngram_tilt_enabled", False), preset
        if not h.ngram_tilt_enabled:
            assert script.build_ngram_tilt(h, None, None) is None
    # Off by default; only train_gpt.py's #2135 record and the frontier turn it on.
    tilted = {preset for preset, values in presets.items() if values.get("ngram_tilt_enabled")}
    assert tilted == ({"record", "frontier"} if name == "train_gpt.py" else set())
