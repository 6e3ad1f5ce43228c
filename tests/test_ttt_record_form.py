"""#2135's form of the per-document LoRA (#1767's levers): the output scale TTT_LORA_ALPHA / rank,
A kept across the resets of a phase (TTT_WARM_START_A) and the AdamW eps (TTT_LORA_EPS). Each
against an independent computation, with the reset audit still catching a leaked adapter."""

import dataclasses
import inspect

import pytest
import torch
from conftest import load_script
from test_eval import FakeSP, V, small_h
from test_lora_ttt import DOCS, lora_h, stream


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    torch.manual_seed(0)
    model = gpt.build_model(small_h(gpt)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, model, luts


# Two documents a group and a pause after the third: phase 0 has a full group and a group of
# one, phase 1 (five documents) two full groups and a group of one.
WARM = {"ttt_lora_batch_docs": 2, "ttt_phases": "3", "ttt_warm_start_a": True}


def test_defaults_keep_the_form_before_1767(setup):
    gpt, _, _ = setup
    h = lora_h(gpt)
    assert h.ttt_lora_alpha == 0 and not h.ttt_warm_start_a
    assert gpt.lora_scale(h) == 1.0
    torch_eps = inspect.signature(torch.optim.AdamW).parameters["eps"].default
    assert h.ttt_lora_eps == torch_eps


@pytest.mark.parametrize(
    ("env", "name"),
    [({"ttt_lora_alpha": -1}, "TTT_LORA_ALPHA"), ({"ttt_lora_eps": 0}, "TTT_LORA_EPS")],
)
def test_bad_values_are_refused_by_name(setup, env, name):
    gpt, _, _ = setup
    with pytest.raises(ValueError, match=name):
        lora_h(gpt, **env)


def adapter_logits(gpt, model, h, tokens, b_factor):
    """Logits of two rows under adapters whose B is a fixed random draw times b_factor."""
    adapters = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for b in adapters.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1 * b_factor)
    with adapters.applied(2), torch.no_grad():
        return model.forward_logits(tokens)


def test_alpha_scales_the_adapter_output_exactly(setup):
    gpt, model, _ = setup
    tokens = torch.stack([DOCS[1][:20], DOCS[3][:20]])
    rank = 4
    base = adapter_logits(gpt, model, lora_h(gpt, ttt_lora_rank=rank), tokens, 1.0)
    # alpha = 2 rank: scale 2, a power of two, so "output times 2" equals "B times 2" bit for bit.
    doubled = adapter_logits(
        gpt, model, lora_h(gpt, ttt_lora_rank=rank, ttt_lora_alpha=8), tokens, 1
    )
    b_doubled = adapter_logits(gpt, model, lora_h(gpt, ttt_lora_rank=rank), tokens, 2.0)
    assert torch.equal(doubled, b_doubled) and not torch.equal(doubled, base)
    # #2135's ratio 144/80 = 1.8: equal to B times 1.8 up to rounding.
    h_rec = lora_h(gpt, ttt_lora_rank=rank, ttt_lora_alpha=rank * 1.8)
    assert gpt.lora_scale(h_rec) == pytest.approx(1.8)
    rec = adapter_logits(gpt, model, h_rec, tokens, 1.0)
    b_rec = adapter_logits(gpt, model, lora_h(gpt, ttt_lora_rank=rank), tokens, 1.8)
    torch.testing.assert_close(rec, b_rec, rtol=1e-5, atol=1e-5)


def test_alpha_equal_to_rank_is_the_default_run(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    default = gpt.eval_val_ttt_phased(lora_h(gpt), model, tokens, luts)
    same = gpt.eval_val_ttt_phased(lora_h(gpt, ttt_lora_alpha=4), model, tokens, luts)
    scaled = gpt.eval_val_ttt_phased(lora_h(gpt, ttt_lora_alpha=7.2), model, tokens, luts)
    assert same["val_loss"] == default["val_loss"]
    assert scaled["val_loss"] != default["val_loss"] and scaled["lora_scale"] == 1.8
    assert scaled["score_first"]["passed"], scaled["score_first"]["failures"]


def spy_resets(gpt, monkeypatch):
    """Wraps LoraAdapters.reset: per reset, the group size, A before and after, whether it was
    warm, and the largest adapter output on a random input right after it, through the shipped
    hook (a zero base output, so what comes back is the adapter's own output)."""
    shipped = gpt.LoraAdapters.reset
    seen = []

    def reset(self, docs=None):
        before = {n: a.detach().clone() for n, a in self.a.items()}
        shipped(self, docs)
        gen = torch.Generator().manual_seed(len(seen))
        self.active = self.rows
        out = 0.0
        for name, (d_in, d_out) in self.dims.items():
            x = torch.randn(self.rows, 5, d_in, generator=gen)
            with torch.no_grad():
                delta = self._hook(name, True)(None, (x,), torch.zeros(self.rows, 5, d_out))
            out = max(out, float(delta.abs().max()))
        after = {n: a.detach().clone() for n, a in self.a.items()}
        seen.append({"docs": docs, "before": before, "after": after, "warm": self.warm, "out": out})

    monkeypatch.setattr(gpt.LoraAdapters, "reset", reset)
    return seen


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_warm_a_keeps_a_within_a_phase_and_zeroes_b(setup, monkeypatch):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    cold = gpt.eval_val_ttt_phased(
        lora_h(gpt, **{**WARM, "ttt_warm_start_a": False}), model, tokens, luts
    )
    seen = spy_resets(gpt, monkeypatch)
    res = gpt.eval_val_ttt_phased(lora_h(gpt, **WARM), model, tokens, luts)
    assert res["score_first"]["passed"], res["score_first"]["failures"]
    assert res["score_first"]["scored_twice"] == 0 and res["score_first"]["never_scored"] == 0
    assert res["val_loss"] != cold["val_loss"]
    # The constructor's reset, then the groups: phase 0 (2, 1), phase 1 (2, 2, 1).
    groups = seen[1:]
    assert [g["docs"] for g in groups] == [2, 1, 2, 2, 1]
    assert [g["warm"] for g in groups] == [False, False, False, True, False]
    assert res["warm_a_groups"] == 1
    init = seen[0]["after"]  # the constructor's: the shared draw in every row
    for g in groups:
        assert g["out"] == 0.0  # B = 0: a reset adapter changes nothing, warm or not
        if g["warm"]:
            assert same(g["after"], g["before"]) and not same(g["after"], init)
        else:
            assert same(g["after"], init)  # the shared draw: phase start, partial group


def test_warm_a_off_redraws_a_at_every_reset(setup, monkeypatch):
    gpt, model, luts = setup
    seen = spy_resets(gpt, monkeypatch)
    gpt.eval_val_ttt_phased(
        lora_h(gpt, **{**WARM, "ttt_warm_start_a": False}), model, stream(DOCS), luts
    )
    init = seen[0]["after"]
    assert len(seen) == 6 and not any(g["warm"] for g in seen)
    assert all(same(g["after"], init) and g["out"] == 0.0 for g in seen)


@pytest.mark.parametrize("leak", ["b", "no_reset"])
def test_the_reset_audit_catches_a_leaked_adapter_with_warm_a(setup, monkeypatch, leak):
    gpt, model, luts = setup
    shipped = gpt.LoraAdapters.reset

    def leaky(self, docs=None):
        kept = {n: b.detach().clone() for n, b in getattr(self, "b", {}).items()}
        if leak == "no_reset" and kept:
            return  # the previous group's adapters, B included, and its step count
        shipped(self, docs)
        if self.warm:
            self.b = {n: b.requires_grad_(True) for n, b in kept.items()}  # B carried with A
            self.opt.param_groups[0]["params"][len(self.a) :] = list(self.b.values())

    monkeypatch.setattr(gpt.LoraAdapters, "reset", leaky)
    audit = gpt.eval_val_ttt_phased(lora_h(gpt, **WARM), model, stream(DOCS), luts)["score_first"]
    assert not audit["passed"]
    assert any("not reset" in f for f in audit["failures"])


def test_eps_reaches_the_optimizer(setup, monkeypatch):
    gpt, model, luts = setup
    h = lora_h(gpt, ttt_lora_eps=1e-10)
    adapters = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    assert {g["eps"] for g in adapters.opt.param_groups} == {1e-10}
    adapters.reset(2)
    assert {g["eps"] for g in adapters.opt.param_groups} == {1e-10}
    tokens = stream(DOCS)
    # A large eps damps every Adam step: the run moves off the default one.
    default = gpt.eval_val_ttt_phased(lora_h(gpt), model, tokens, luts)
    damped = gpt.eval_val_ttt_phased(lora_h(gpt, ttt_lora_eps=1.0), model, tokens, luts)
    assert damped["val_loss"] != default["val_loss"]


def test_record_form_runs_phased_with_every_flag_on(setup):
    gpt, model, luts = setup
    h = lora_h(gpt, **WARM, ttt_lora_alpha=7.2, ttt_lora_eps=1e-10)
    res = gpt.eval_val_ttt_phased(h, model, stream(DOCS), luts)
    assert res["score_first"]["passed"], res["score_first"]["failures"]
    assert res["phases"] == 1 and res["warm_a_groups"] == 1 and res["lora_scale"] == 1.8
    off = gpt.eval_val_ttt_phased(
        dataclasses.replace(h, ttt_lora_lr=0.0), model, stream(DOCS), luts
    )
    assert res["val_loss"] < off["val_loss"]  # the adapters learn: TTT helps on these documents
