"""Evaluation modes and score integrity: sliding coverage and value against an independent
reference, TTT equal to sliding when it cannot learn, and audits that catch leaky models, a
train-before-score TTT and a byte table that miscounts."""

import math

import pytest
import torch
from conftest import SCRIPTS, TINY_ENV, load_script
from torch import nn

V = 64


def small_h(module, **kw):
    env = {
        **TINY_ENV,
        "VOCAB_SIZE": str(V),
        "EVAL_SEQ_LEN": "32",
        "EVAL_STRIDE": "8",
        "VAL_BATCH_SIZE": "2048",
        "TTT_CHUNK_TOKENS": "64",
        "TTT_BATCH_SEQS": "2",
        "TTT_EPOCHS": "1",
        "TRAIN_SEQ_LEN": "32",
    }
    env.update({k.upper(): str(v) for k, v in kw.items()})
    return module.Hyperparameters.from_env(env)


class FakeSP:
    """Enough of a SentencePiece model for the byte tables: every id is a 1-byte piece,
    0-3 control."""

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


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    h = small_h(gpt)
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(4, V, (301,), generator=torch.Generator().manual_seed(5))
    tokens[0] = 1
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, h, model, tokens, luts


@pytest.mark.parametrize(
    "n,L,s", [(301, 32, 8), (300, 32, 8), (40, 32, 8), (33, 32, 32), (20, 32, 8), (257, 16, 5)]
)
def test_sliding_windows_cover_every_target_exactly_once(setup, n, L, s):
    gpt = setup[0]
    starts, firsts, lasts = gpt.sliding_windows(n, L, s)
    covered = [j for first, last in zip(firsts, lasts) for j in range(int(first), int(last) + 1)]
    assert covered == list(range(1, n))
    assert all(last - st <= L and st % s == 0 for st, last in zip(starts, lasts))


def reference_sliding(model, tokens, luts, L, s):
    """Each target j scored once, with tokens from the start of the first window
    holding it up to j - 1."""
    base, lead, boundary = luts
    nll, nbytes = 0.0, 0
    for j in range(1, tokens.numel()):
        start = max(0, math.ceil((j - L) / s)) * s
        with torch.no_grad():
            logits = model.forward_logits(tokens[start:j][None])[0, -1].double()
        nll -= torch.log_softmax(logits, -1)[tokens[j]].item()
        nbytes += int(base[tokens[j]]) + int(
            bool(lead[tokens[j]]) and not bool(boundary[tokens[j - 1]])
        )
    return nll, nbytes


def test_sliding_eval_matches_an_independent_reference(setup):
    gpt, h, model, tokens, luts = setup
    res = gpt.eval_val_sliding(h, model, tokens, luts)
    nll, nbytes = reference_sliding(model, tokens, luts, 32, 8)
    assert res["tokens"] == tokens.numel() - 1 and res["bytes"] == nbytes
    assert res["val_bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    assert res["score_first"]["passed"] and res["score_first"]["scored_twice"] == 0


def test_standard_eval_truncates_to_whole_sequences(setup):
    gpt, h, model, tokens, luts = setup
    res = gpt.eval_val(h, model, tokens, luts)
    assert res["tokens"] == (tokens.numel() - 1) // 32 * 32


def test_ttt_equals_sliding_when_lr_is_zero(setup):
    gpt, h, model, tokens, luts = setup
    sliding = gpt.eval_val_sliding(h, model, tokens, luts)
    ttt = gpt.eval_val_ttt(small_h(gpt, ttt_lr=0.0), model, tokens, luts)
    assert ttt["score_first"]["updates"] > 0
    assert ttt["val_loss"] == sliding["val_loss"] and ttt["bytes"] == sliding["bytes"]


def test_ttt_equals_sliding_with_a_single_chunk(setup):
    gpt, h, model, tokens, luts = setup
    one = small_h(gpt, ttt_chunk_tokens=100000, ttt_lr=0.5)
    ttt = gpt.eval_val_ttt(one, model, tokens, luts)
    assert ttt["chunks"] == 1 and ttt["score_first"]["updates"] == 0
    assert ttt["val_loss"] == gpt.eval_val_sliding(one, model, tokens, luts)["val_loss"]


def test_ttt_learns_and_stays_score_first(setup):
    gpt, h, model, tokens, luts = setup
    before = [p.clone() for p in model.parameters()]
    res = gpt.eval_val_ttt(small_h(gpt, ttt_lr=0.05), model, tokens, luts)
    audit = res["score_first"]
    assert audit["passed"] and audit["updates"] > 0 and audit["chunks_scored"] == res["chunks"]
    assert res["val_loss"] != gpt.eval_val_sliding(h, model, tokens, luts)["val_loss"]
    # the scored model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ttt_rigged_to_train_before_scoring_is_caught(setup):
    gpt, h, model, tokens, luts = setup
    ledger = [
        {"event": "update", "chunk": 0, "step": 1, "max_target": 63},
        {"event": "score", "chunk": 0, "scored_upto": 64},
    ]
    coverage = torch.zeros(301, dtype=torch.int32)
    coverage[1:] = 1
    audit = gpt.audit_score_first(ledger, coverage)
    assert not audit["passed"] and "before it was scored" in audit["failures"][0]


def test_double_scoring_and_missing_targets_are_caught(setup):
    gpt = setup[0]
    coverage = torch.ones(10, dtype=torch.int32)
    coverage[0], coverage[4], coverage[7] = 0, 2, 0
    audit = gpt.audit_score_first([], coverage)
    assert not audit["passed"] and audit["scored_twice"] == 1 and audit["never_scored"] == 1


# --- leaky models the causality audit must catch --------------------------------------------------


class Leaky(nn.Module):
    """A one-layer model with a chosen leak, built on an nn.Embedding
    so the Jacobian check applies."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.tok_emb = nn.Embedding(V, 16)
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, V)

    def forward_logits(self, ids):
        x = self.tok_emb(ids)
        T = ids.size(1)
        if self.kind == "window_mean_at_0":  # PR #663: position 0 averages over the whole window
            x = torch.cat([x.mean(1, keepdim=True), x[:, 1:]], dim=1)
        elif self.kind == "next_token":
            x = x + 0.5 * torch.roll(x, -1, dims=1)
        elif self.kind == "clamp_after_mask":
            # masked with -1e4, then clamped to [-50, 50]: exp(-50) leaks
            scores = self.q(x) @ self.k(x).transpose(1, 2)
            future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            scores = scores.masked_fill(future, -1e4).clamp(-50, 50)
            x = torch.softmax(scores, -1) @ x
        elif self.kind == "batch_norm":
            x = x - x.mean(dim=0, keepdim=True)
        logits = self.head(x)
        if self.kind == "partial_vocab":
            return logits[..., : V // 2]
        return logits


@pytest.mark.parametrize(
    "kind", ["window_mean_at_0", "next_token", "clamp_after_mask", "batch_norm", "partial_vocab"]
)
def test_causality_audit_catches_leaky_models(setup, kind):
    gpt = setup[0]
    torch.manual_seed(0)
    result = gpt.audit_causality(Leaky(kind), 80, V)
    assert not result["passed"], kind


def test_causality_audit_passes_an_honest_attention_model(setup):
    gpt = setup[0]

    class Honest(Leaky):
        def forward_logits(self, ids):
            x = self.tok_emb(ids)
            T = ids.size(1)
            scores = (self.q(x) @ self.k(x).transpose(1, 2)).clamp(-50, 50)
            scores = scores.masked_fill(
                torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")
            )
            return self.head(torch.softmax(scores, -1) @ x)

    assert gpt.audit_causality(Honest("honest"), 80, V)["passed"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_audit_passes_on_every_preset(name):
    module = load_script(name)
    for preset in module.PRESETS:
        env = {
            "PRESET": preset,
            "NUM_LAYERS": "2",
            "MODEL_DIM": "64",
            "NUM_HEADS": "2",
            "NUM_KV_HEADS": "1",
            "VOCAB_SIZE": "128",
            "TRAIN_SEQ_LEN": "128",
            "TRAIN_SEQ_SCHEDULE": "",  # the frontier's schedule ends at its own TRAIN_SEQ_LEN
            "TRAIN_BATCH_TOKENS": "8192",
            "EVAL_SEQ_LEN": "128",
            "RECUR_LAYERS": "0,1",
            "BIGRAM_VOCAB_SIZE": "256",
            "BIGRAM_DIM": "16",
        }
        h = module.Hyperparameters.from_env(env)
        torch.manual_seed(0)
        model = module.build_model(h)
        if hasattr(model, "set_training_progress"):
            model.set_training_progress(1.0)
        result = module.audit_causality(model, 128, h.vocab_size)
        assert result["passed"], (preset, result["failures"])


# --- byte accounting ------------------------------------------------------------------------------


def test_byte_table_counting_byte_fallback_as_three_bytes_is_caught(embedded):
    gpt = load_script("train_gpt.py")
    sp = gpt.load_tokenizer(embedded["TOKENIZER_PATH"], 1024)
    ids = [1] + sp.encode("Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e text \u2603 and more words.")
    tokens = torch.tensor(ids * 3)
    luts = gpt.build_sentencepiece_luts(sp, 1024, torch.device("cpu"))
    assert gpt.audit_bytes(sp, tokens, luts)["passed"]
    rigged = luts[0].clone()
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    rigged[byte_ids] = 3
    result = gpt.audit_bytes(sp, tokens, (rigged, luts[1], luts[2]))
    assert not result["passed"] and result["lut_bytes"] > result["decoded_bytes"]
    assert result["first_mismatch_ids"] and all(sp.is_byte(i) for i in result["first_mismatch_ids"])


def test_byte_audit_window_never_cuts_a_byte_fallback_character(embedded):
    # A window cut between the byte pieces of one character decodes the orphan bytes as U+FFFD
    # (three bytes where the tables rightly count one): an honest table would fail. The audit's
    # window ends on a document boundary instead (the real SP8192 val shard hit this at 10,000).
    gpt = load_script("train_gpt.py")
    sp = gpt.load_tokenizer(embedded["TOKENIZER_PATH"], 1024)
    doc = [1] + sp.encode("text \u65e5\u672c\u8a9e \u2603 more")
    tokens = torch.tensor(doc * 4)
    luts = gpt.build_sentencepiece_luts(sp, 1024, torch.device("cpu"))
    cut = next(i for i in range(len(doc) + 1, 2 * len(doc)) if sp.is_byte(doc[i - len(doc) - 1]))
    sample = tokens[:cut]  # ends on the first byte piece of a character: the naive window
    naive_lut = int(gpt.target_bytes(sample[:-1], sample[1:], luts).sum())
    naive_decoded = sum(
        len(sp.decode(d).encode("utf-8")) for d in (doc[1:], sample[len(doc) + 1 :].tolist())
    )
    assert naive_lut != naive_decoded  # the failure the window avoids
    start, stop = gpt.audit_window(sp, tokens, cut)
    assert (start, stop) == (0, 2 * len(doc))
    result = gpt.audit_bytes(sp, tokens, luts, sample_tokens=cut)
    assert result["passed"] and result["tokens"] == 2 * len(doc)
    # One document longer than the stretch: cut before its trailing byte pieces.
    first_byte = next(i for i in range(1, len(doc)) if sp.is_byte(doc[i]))
    long_doc = torch.tensor([1] + doc[1:] * (10 * len(doc)))
    start, stop = gpt.audit_window(sp, long_doc, first_byte + 2)
    assert (start, stop) == (0, first_byte)
    assert gpt.audit_bytes(sp, long_doc, luts, sample_tokens=first_byte + 2)["passed"]
