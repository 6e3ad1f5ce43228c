"""TTT_LORA_FORM=record, #2135's adapter form: one adapter per layer pass (a looped layer's passes
adapt apart), the O and MLP adapters across the whole sublayer from its normed input, the head
adapter in logit space, A drawn per batch row. Each part against an independent computation (a
hand-written hook, the per-document reference), with the score-first and reset audits still
catching a rigged trainer."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import load_script
from test_eval import FakeSP, V, small_h
from test_lora_ttt import DOCS, L, read_one_chunk_ahead, reference_per_document, stream

# Three layers, layer 1 looped twice more: the forward runs 0, 1, 1, 1, 2 (five passes).
RECUR = {"num_layers": 3, "recur_layers": "1", "recur_loops": 2}
BASE = {
    "ttt_lora_chunk": 8,
    "ttt_lora_batch_docs": 3,
    "ttt_lora_rank": 4,
    "ttt_lora_lr": 0.01,
    "ttt_phases": "2,4",
    "ttt_phase_lr": 0.05,
    "ttt_batch_seqs": 2,
    "ttt_lora_form": "record",
}


def record_h(gpt, **kw):
    return small_h(gpt, **{**RECUR, **BASE, **kw})


def build(gpt, **kw):
    torch.manual_seed(0)
    model = gpt.build_model(record_h(gpt, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def setup():
    gpt = load_script("train_gpt.py")
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    return gpt, build(gpt), luts


def randomize_b(adapters, seed=11):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapters.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def tokens2():
    return torch.stack([DOCS[1][:20], DOCS[3][:20]])


def test_the_default_form_is_the_module_one_and_bad_forms_are_refused(setup):
    gpt, _, _ = setup
    assert small_h(gpt).ttt_lora_form == "module"
    with pytest.raises(ValueError, match="TTT_LORA_FORM='per_pass': must be one of"):
        record_h(gpt, ttt_lora_form="per_pass")


@pytest.mark.parametrize("tied", [True, False])
def test_one_slot_per_pass_and_the_records_placement(setup, tied):
    gpt, model, _ = setup
    if not tied:
        model = build(gpt, tie_embeddings=False)
    h = record_h(gpt, tie_embeddings=tied)
    adapters = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    order = model.orders[model.recur_active]
    assert len(order) == 5 and len(model.blocks) == 3
    roles = {"q": ".attn.c_q", "k": ".attn.c_k", "v": ".attn.c_v", "o": ".attn", "mlp": ".mlp"}
    for role, suffix in roles.items():
        slots = [k for k in adapters.dims if k.split("@")[0].endswith(suffix)]
        assert len(slots) == len(order), role  # one per executed layer, as #2135's 17
    for i in range(3):
        assert adapters.passes[f"blocks.{i}.attn"] == order.count(i)
    head = "tied_head" if tied else "lm_head"
    assert [k for k in adapters.dims if gpt.lora_role(k.split("@")[0]) == "head"] == [f"{head}@0"]
    dim = model.blocks[0].attn.c_q.in_features
    assert adapters.dims[f"{head}@0"] == (dim, V)  # logit space: B is rank x vocab
    assert adapters.dims["blocks.1.attn@2"] == (dim, dim)
    assert adapters.dims["blocks.1.mlp@1"] == (dim, dim)  # across the MLP, not its hidden width
    assert len(adapters.dims) == 5 * len(order) + 1


def hand_hooks(model, adapters, scale):
    """An independent form of the record's adapters: for pass p of each target, its input times
    A_b B_b added to its output (the attention's first output), counted here, not by the
    shipped hook."""
    calls = {}
    handles = []
    for name, m in adapters.targets.items():

        def hook(module, args, out, name=name):
            p = calls.get(name, 0)
            calls[name] = p + 1
            key = f"{name}@{p % adapters.passes[name]}"
            x = args[0]
            main = out[0] if isinstance(out, tuple) else out
            delta = torch.stack(
                [x[r] @ adapters.a[key][r] @ adapters.b[key][r] for r in range(x.size(0))]
            )
            main = main + scale * delta
            return (main, *out[1:]) if isinstance(out, tuple) else main

        handles.append(m.register_forward_hook(hook))
    return handles


def test_the_adapters_equal_a_hand_written_per_pass_form(setup):
    gpt, model, _ = setup
    h = record_h(gpt, ttt_lora_alpha=6.0)
    adapters = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    randomize_b(adapters)
    with torch.no_grad():
        plain = model.forward_logits(tokens2())
        with adapters.applied(2):
            shipped = model.forward_logits(tokens2())
        handles = hand_hooks(model, adapters, 1.5)
        try:
            hand = model.forward_logits(tokens2())
        finally:
            for handle in handles:
                handle.remove()
    assert not torch.allclose(shipped, plain, atol=1e-3)
    torch.testing.assert_close(shipped, hand, rtol=1e-5, atol=1e-5)


def test_a_looped_layers_passes_have_their_own_adapters(setup):
    """Only one pass's adapter of the looped layer non-zero: every pass's alone moves the logits,
    each differently (with one adapter shared by the passes, only pass 0's would be read)."""
    gpt, model, _ = setup
    adapters = gpt.LoraAdapters(model, record_h(gpt), 2, torch.device("cpu"))
    with torch.no_grad():
        plain = model.forward_logits(tokens2())
    seen = []
    for p in range(3):
        for role in ("attn.c_q", "mlp"):
            randomize_b(adapters)
            with torch.no_grad():
                for key, b in adapters.b.items():
                    if key != f"blocks.1.{role}@{p}":
                        b.zero_()
                with adapters.applied(2):
                    logits = model.forward_logits(tokens2())
            assert adapters.calls["blocks.1.mlp"] == 3  # one forward, three passes
            assert not torch.allclose(logits, plain, atol=1e-5), (role, p)
            assert not any(torch.allclose(logits, other, atol=1e-5) for other in seen)
            seen.append(logits)


def test_a_fresh_adapter_changes_no_logit_and_rows_draw_their_own_a(setup):
    gpt, model, _ = setup
    h = record_h(gpt)
    adapters = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    assert adapters.fresh()
    with torch.no_grad():
        plain = model.forward_logits(tokens2())
        with adapters.applied(2):
            assert torch.equal(model.forward_logits(tokens2()), plain)
    for key, (d_in, _) in adapters.dims.items():
        a = adapters.a[key]
        assert not torch.equal(a[0], a[1]), key  # a draw per batch row (#2135)
        assert float(a.detach().abs().max()) <= d_in**-0.5
    # Seeded: the same SEED draws the same A; the next cold reset draws anew.
    again = gpt.LoraAdapters(model, h, 2, torch.device("cpu"))
    assert all(torch.equal(adapters.a[k], again.a[k]) for k in adapters.a)
    other = gpt.LoraAdapters(model, dataclasses.replace(h, seed=h.seed + 1), 2, torch.device("cpu"))
    assert not any(torch.equal(adapters.a[k], other.a[k]) for k in adapters.a)
    first = {k: a.detach().clone() for k, a in again.a.items()}
    again.reset()
    assert again.fresh() and not any(torch.equal(first[k], again.a[k]) for k in first)


def test_lr_zero_equals_the_no_ttt_score_and_lr_moves_it(setup):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    still = gpt.eval_val_ttt_lora(record_h(gpt, ttt_lora_lr=0.0), model, tokens, luts)
    assert still["lora_form"] == "record" and still["tokens"] == tokens.numel() - 1
    assert still["val_loss"] == pytest.approx(reference_per_document(model, tokens, L, 8), rel=1e-6)
    module = gpt.eval_val_ttt_lora(
        record_h(gpt, ttt_lora_lr=0.0, ttt_lora_form="module"), model, tokens, luts
    )
    assert still["val_loss"] == module["val_loss"]  # B = 0 adds exactly nothing, either form
    learned = gpt.eval_val_ttt_lora(record_h(gpt), model, tokens, luts)
    assert learned["score_first"]["passed"], learned["score_first"]["failures"]
    assert learned["val_loss"] != still["val_loss"]
    assert learned["lora_slots"] > module["lora_slots"]  # the loop's passes have their own


def test_the_mask_and_switches_apply_to_the_record_slots(setup):
    gpt, model, luts = setup

    def kept_roles(**kw):
        adapters = gpt.LoraAdapters(model, record_h(gpt, **kw), 2, torch.device("cpu"))
        return {gpt.lora_role(k.split("@")[0]) for k in adapters.dims}

    every = {"head", "k", "mlp", "o", "q", "v"}
    assert kept_roles() == every
    for kw, gone in (
        ({"ttt_mask": "no_qv"}, {"q", "v"}),
        ({"ttt_k_lora": False}, {"k"}),
        ({"ttt_o_lora": False}, {"o"}),
        ({"ttt_mlp_lora": False}, {"mlp"}),
        ({"ttt_q_lora": False, "ttt_v_lora": False}, {"q", "v"}),
        ({"ttt_lora_head": False}, {"head"}),
    ):
        assert kept_roles(**kw) == every - gone, kw
    tokens = stream(DOCS)
    full = gpt.eval_val_ttt_lora(record_h(gpt), model, tokens, luts)
    masked = gpt.eval_val_ttt_lora(record_h(gpt, ttt_mask="no_qv"), model, tokens, luts)
    assert masked["score_first"]["passed"] and masked["val_loss"] != full["val_loss"]
    assert masked["lora_slots"] == full["lora_slots"] - 2 * 5


@pytest.mark.parametrize("mode", ["ttt_lora", "ttt_phased"])
def test_the_audits_catch_a_trainer_reading_ahead_with_the_record_form(setup, monkeypatch, mode):
    gpt, model, luts = setup
    tokens = stream(DOCS)
    audit = gpt.EVAL_MODES[mode].evaluate(record_h(gpt), model, tokens, luts)["score_first"]
    assert audit["passed"] and audit["scored_twice"] == 0 and audit["never_scored"] == 0
    read_one_chunk_ahead(gpt, monkeypatch, tokens)
    audit = gpt.EVAL_MODES[mode].evaluate(record_h(gpt), model, tokens, luts)["score_first"]
    assert not audit["passed"]
    assert any("positions before they were scored" in f for f in audit["failures"])


@pytest.mark.parametrize("leak", ["b", "no_reset"])
def test_the_reset_audit_catches_a_leaked_record_adapter(setup, monkeypatch, leak):
    gpt, model, luts = setup
    shipped = gpt.LoraAdapters.reset

    def leaky(self, docs=None):
        kept = {n: b.detach().clone() for n, b in getattr(self, "b", {}).items()}
        if leak == "no_reset" and kept:
            return  # the previous group's adapters and step count
        shipped(self, docs)
        if kept:
            self.b = {n: b.requires_grad_(True) for n, b in kept.items()}  # B carried over
            self.opt.param_groups[0]["params"][len(self.a) :] = list(self.b.values())

    monkeypatch.setattr(gpt.LoraAdapters, "reset", leaky)
    h = record_h(gpt, ttt_warm_start_a=True)
    audit = gpt.eval_val_ttt_phased(h, model, stream(DOCS), luts)["score_first"]
    assert not audit["passed"]
    assert any("not reset" in f for f in audit["failures"])


def test_a_phased_run_with_the_whole_record_form_passes_every_audit(setup, monkeypatch):
    gpt, model, luts = setup
    shipped = gpt.LoraAdapters.reset
    resets = []

    def spy(self, docs=None):
        shipped(self, docs)
        resets.append((self.warm, {k: a.detach().clone() for k, a in self.a.items()}))

    monkeypatch.setattr(gpt.LoraAdapters, "reset", spy)
    h = record_h(
        gpt,
        ttt_lora_batch_docs=2,
        ttt_phases="3",
        ttt_warm_start_a=True,
        ttt_lora_alpha=7.2,
        ttt_lora_eps=1e-10,
    )
    tokens = stream(DOCS)
    res = gpt.eval_val_ttt_phased(h, model, tokens, luts)
    audit = res["score_first"]
    assert audit["passed"], audit["failures"]
    assert audit["scored_twice"] == 0 and audit["never_scored"] == 0
    assert res["phases"] == 1 and res["warm_a_groups"] == 1 and res["lora_scale"] == 1.8
    # The constructor, then phase 0 (2, 1 documents), phase 1 (2, 2, 1): after the pause a cold
    # reset draws a new A (#2135 builds new adapters), unlike every A drawn before it.
    warm = [w for w, _ in resets]
    assert warm == [False, False, False, False, True, False]
    cold = [a for w, a in resets if not w]
    for i, a in enumerate(cold):
        for b in cold[:i]:
            assert not any(torch.equal(a[k], b[k]) for k in a)
    off = gpt.eval_val_ttt_phased(dataclasses.replace(h, ttt_lora_lr=0.0), model, tokens, luts)
    assert res["val_loss"] != off["val_loss"]
    assert np.isfinite(res["val_loss"])
