"""Issue 23's levers in train_gpt.py: AsymLogit Rescale (#1923 via #1945: two learned caps that
train, adapt in global TTT and stay fp32), the SmearGate BOS rule as a flag (#2135 runs it off),
QK gain 5.25 (#1953) and progressive sequence length (#2014). Each toggles and trains on the CPU,
and all of them together pass the causality audit."""

import json
import textwrap

import pytest
import torch
from conftest import (
    REPO,
    TINY_ENV,
    TINY_RUN,
    perturbed_model,
    random_tokens,
    run_interpreted,
    run_script,
    summary_of,
)
from test_eval import FakeSP, V, small_h
from test_lora_ttt import make_docs, stream

RECORD_PARAMS = 35_945_671  # #1855's count: the record preset without AsymLogit

SMALL = {
    "PRESET": "baseline",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "4096",
    "EVAL_STRIDE": "16",
}


def small_model(gpt, seed=0, **env):
    return perturbed_model(gpt, {**SMALL, **env}, seed)


tokens = random_tokens


# --- AsymLogit Rescale ---------------------------------------------------------------------------


@pytest.mark.parametrize("asym, expected", [("0", RECORD_PARAMS), ("1", RECORD_PARAMS + 2)])
def test_asym_logit_adds_exactly_two_parameters_to_the_record(gpt, asym, expected):
    h = gpt.Hyperparameters.from_env({"PRESET": "record", "ASYM_LOGIT_RESCALE": asym})
    with torch.device("meta"):
        model = gpt.build_model(h)
    assert sum(p.numel() for p in model.parameters()) == expected
    names = {n for n, _ in model.named_parameters()}
    assert ({"softcap_pos", "softcap_neg"} <= names) == (asym == "1")


def test_asym_caps_start_as_the_symmetric_softcap_and_split_by_sign(gpt):
    sym, h = small_model(gpt, LOGIT_SOFTCAP="20")
    asym, _ = small_model(gpt, LOGIT_SOFTCAP="20", ASYM_LOGIT_RESCALE="1")
    fresh = gpt.build_model(gpt.Hyperparameters.from_env({**SMALL, "ASYM_LOGIT_RESCALE": "1"}))
    assert fresh.softcap_pos.item() == fresh.softcap_neg.item() == 30.0  # LOGIT_SOFTCAP
    # The same weights and caps at LOGIT_SOFTCAP: the symmetric model's logits.
    missing = asym.load_state_dict(sym.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["softcap_neg", "softcap_pos"]
    with torch.no_grad():
        asym.softcap_pos.fill_(20.0)
        asym.softcap_neg.fill_(20.0)
        x = tokens(h)
        assert torch.allclose(sym.forward_logits(x), asym.forward_logits(x), atol=1e-6)
    z = torch.tensor([-50.0, -3.0, 0.0, 3.0, 50.0])
    out = gpt.asym_softcap(z, torch.tensor(10.0), torch.tensor(40.0))
    expected = torch.tensor(
        [40 * torch.tanh(torch.tensor(-50 / 40)), 40 * torch.tanh(torch.tensor(-3 / 40)), 0.0]
        + [10 * torch.tanh(torch.tensor(0.3)), 10 * torch.tanh(torch.tensor(5.0))]
    )
    assert torch.allclose(out, expected)


def test_asym_caps_train_as_fp32_control_scalars_without_decay(gpt):
    model, h = small_model(gpt, ASYM_LOGIT_RESCALE="1", ADAM_WD="0.1")
    for name in ("softcap_pos", "softcap_neg"):
        assert gpt.is_control_tensor(name, gpt.CONTROL_TENSOR_PATTERNS)
        assert getattr(model, name).dtype == torch.float32
    muon, adam = gpt.build_optimizers(model, h, torch.device("cpu"))
    cap_groups = [g for g in adam.param_groups if any(p is model.softcap_pos for p in g["params"])]
    assert len(cap_groups) == 1 and cap_groups[0]["weight_decay"] == 0.0
    assert any(p is model.softcap_neg for p in cap_groups[0]["params"])
    before = (model.softcap_pos.item(), model.softcap_neg.item())
    x = tokens(h)
    model(x, torch.roll(x, -1, dims=1)).backward()
    for name in ("softcap_pos", "softcap_neg"):
        grad = getattr(model, name).grad
        assert grad is not None and grad.abs().item() > 0, f"{name} gets no gradient in training"
    muon.step()
    adam.step()
    assert model.softcap_pos.item() != before[0] and model.softcap_neg.item() != before[1]
    # Stored fp32 in the artifact, never quantized (the record's GATE_INT8 included).
    record = gpt.Hyperparameters.from_env({"PRESET": "record", "ASYM_LOGIT_RESCALE": "1"})
    for name in ("softcap_pos", "softcap_neg"):
        scheme = gpt.tensor_plan(name, getattr(model, name).detach(), record)
        assert not scheme.is_int and scheme.bits == 32, (name, scheme)


ASYM_KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import train_gpt as g
    torch.manual_seed(0)
    out = {}
    logits = (8 * torch.randn(37, 1500)).requires_grad_()
    targets = torch.randint(0, 1500, (37,))
    caps = torch.tensor([7.0, 13.0], requires_grad=True)
    w = torch.rand(37)
    loss = g.SoftcappedCrossEntropy.apply(logits, targets, 30.0, caps)
    ref = g.softcapped_ce_reference(logits, targets, 30.0, caps)
    out["forward"] = (loss - ref).abs().max().item()
    gl, gc = torch.autograd.grad((loss * w).sum(), (logits, caps))
    rl, rc = torch.autograd.grad((ref * w).sum(), (logits, caps))
    out["logit_grad"] = (gl - rl).abs().max().item()
    out["logit_grad_scale"] = rl.abs().max().item()
    out["cap_grad"] = (gc - rc).abs().max().item()
    out["cap_grad_ref"] = rc.tolist()
    # Symmetric caps through the asym path: the one-cap kernel's losses.
    same = torch.tensor([30.0, 30.0])
    one = g.SoftcappedCrossEntropy.apply(logits, targets, 30.0)
    two = g.SoftcappedCrossEntropy.apply(logits, targets, 30.0, same)
    out["symmetric"] = (one - two).abs().max().item()
    out["interpreted"] = type(g.triton_model_kernels()["softcap_ce_fwd"]).__name__
    print(json.dumps(out))
""")


def test_fused_ce_kernel_takes_the_asym_caps_under_the_interpreter():
    """FUSED_CE with ASYM_LOGIT_RESCALE: the Triton kernel applies the two caps and returns their
    gradient (the CUDA training path), equal to torch's autograd of asym_softcap."""
    out = run_interpreted(ASYM_KERNEL_CHECK, str(REPO))
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\nasym softcapped CE, triton interpreter vs torch: {res}")
    assert "Interpreted" in res["interpreted"]
    assert res["forward"] < 1e-4 and res["symmetric"] < 1e-6
    assert res["logit_grad"] < 1e-6 + 1e-4 * res["logit_grad_scale"]
    assert all(abs(v) > 0 for v in res["cap_grad_ref"])
    assert res["cap_grad"] < 1e-4 * max(1.0, *(abs(v) for v in res["cap_grad_ref"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CE kernel runs on CUDA only")
def test_fused_ce_trains_the_asym_caps_on_cuda(gpt):
    model, h = small_model(gpt, ASYM_LOGIT_RESCALE="1", FUSED_CE="1")
    model = model.cuda().train()
    x = tokens(h).cuda()
    y = torch.roll(x, -1, dims=1)
    fused = model(x, y)
    fused.backward()
    grads = [model.softcap_pos.grad.clone(), model.softcap_neg.grad.clone()]
    model.zero_grad()
    model.fused_ce = False
    ref = model(x, y)
    ref.backward()
    assert torch.allclose(fused, ref, atol=1e-4)
    for got, want in zip(grads, (model.softcap_pos.grad, model.softcap_neg.grad)):
        assert got.abs().item() > 0 and torch.allclose(got, want, rtol=1e-3, atol=1e-6)


def ttt_model(gpt, **kw):
    """A small model with AsymLogit whose logits reach the caps' range (the tied embedding scaled
    up; caps 8 and 12), so the caps' gradient is not lost in fp32: at |z| << cap the softcap is
    linear and its gradient with respect to the cap is O((z / cap)^3)."""
    h = small_h(gpt, asym_logit_rescale=1, **kw)
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.tok_emb.weight.mul_(20.0)
        model.softcap_pos.fill_(8.0)
        model.softcap_neg.fill_(12.0)
    return h, model


def test_asym_caps_move_in_phased_global_ttt(gpt):
    h, model = ttt_model(
        gpt,
        ttt_lora_chunk=8,
        ttt_lora_batch_docs=3,
        ttt_lora_rank=4,
        ttt_phases="2,4",
        ttt_phase_lr=0.05,
        ttt_batch_seqs=2,
    )
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    val = stream(make_docs([30, 45, 2, 70, 9, 61, 25, 40]))
    res = gpt.eval_val_ttt_phased(h, model, val, luts)
    assert res["phases"] == 2 and res["score_first"]["passed"]
    adapted = res["adapted_scalars"]
    assert adapted["softcap_pos"] != 8.0 and adapted["softcap_neg"] != 12.0
    # The scored model is untouched: the phases adapt a copy.
    assert (model.softcap_pos.item(), model.softcap_neg.item()) == (8.0, 12.0)
    # Without phases (LoRA only) the base, caps included, does not move: nothing is reported.
    assert "adapted_scalars" not in gpt.eval_val_ttt_lora(h, model, val, luts)


def test_asym_caps_move_in_chunked_ttt(gpt):
    h, model = ttt_model(gpt, ttt_lr=0.05)
    luts = gpt.build_sentencepiece_luts(FakeSP(), V, torch.device("cpu"))
    val = torch.randint(2, V, (300,), generator=torch.Generator().manual_seed(3))
    res = gpt.eval_val_ttt(h, model, val, luts)
    assert res["score_first"]["passed"] and res["score_first"]["updates"] > 0
    adapted = res["adapted_scalars"]
    assert adapted["softcap_pos"] != 8.0 and adapted["softcap_neg"] != 12.0
    assert "adapted_scalars" not in gpt.eval_val_sliding(h, model, val, luts)


# --- SmearGate's BOS rule ------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["0", "12"])
def test_smear_gate_bos_fix_flag(gpt, window):
    assert gpt.Hyperparameters.from_env({"PRESET": "baseline"}).smear_gate_bos_fix
    assert gpt.Hyperparameters.from_env({"PRESET": "record_1855"}).smear_gate_bos_fix
    assert not gpt.Hyperparameters.from_env({"PRESET": "record"}).smear_gate_bos_fix  # #2135
    for fix in ("1", "0"):
        model, h = small_model(
            gpt, SMEAR_GATE="1", SMEAR_GATE_WINDOW=window, SMEAR_GATE_BOS_FIX=fix
        )
        x = tokens(h)
        x[:, 10] = 1  # a BOS
        other = x.clone()
        other[:, 9] = (x[:, 9] + 1) % h.vocab_size  # the previous document's last token
        with torch.no_grad():
            a = model.embed(x)
            b = model.embed(other)
        assert torch.equal(a[:, :9], b[:, :9])
        assert torch.equal(a[:, 11:], b[:, 11:])
        # Fixed: nothing crosses the BOS. Off (#2135): the BOS takes in the token before it.
        assert torch.equal(a[:, 10], b[:, 10]) == (fix == "1")


AUDIT = {
    "PRESET": "record",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "128",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "RECUR_LAYERS": "1,2",
    "PARALLEL_DECODER_START": "2",
    "VOCAB_SIZE": "1024",
    "TRAIN_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "4096",
    "EVAL_SEQ_LEN": "64",
    "ASYM_LOGIT_RESCALE": "1",
    "QK_GAIN_INIT": "5.25",
    "TRAIN_SEQ_SCHEDULE": "32@0.3,64@1.0",
    "SEQ_CHANGE_WARMUP_STEPS": "4",
}


@pytest.mark.parametrize("fix", ["1", "0"])
def test_causality_audit_passes_with_the_levers_on(gpt, fix):
    h = gpt.Hyperparameters.from_env({**AUDIT, "SMEAR_GATE_BOS_FIX": fix})
    torch.manual_seed(0)
    model = gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = gpt.audit_causality(model, 64, h.vocab_size)
    assert result["passed"], result["failures"]


def test_causality_audit_still_catches_a_smear_from_the_next_token(gpt, monkeypatch):
    """The audit's inputs hold BOS tokens: a SmearGate that read the NEXT token at a BOS (a leak
    only at document starts) fails it."""
    h = gpt.Hyperparameters.from_env({**AUDIT, "SMEAR_GATE_BOS_FIX": "0"})
    torch.manual_seed(0)
    model = gpt.build_model(h)
    real = model.embed

    def leaky(input_ids):
        x = real(input_ids)
        at_bos = (input_ids == 1)[..., None]
        return x + 0.5 * at_bos * torch.nn.functional.pad(x[:, 1:], (0, 0, 0, 1))

    monkeypatch.setattr(model, "embed", leaky)
    result = gpt.audit_causality(model, 64, h.vocab_size)
    assert not result["passed"]


# --- QK gain 5.25 --------------------------------------------------------------------------------


def test_qk_gain_525_initializes_every_head(gpt):
    model, h = small_model(gpt, QK_GAIN_INIT="5.25")
    assert h.qk_gain_init == 5.25
    fresh = gpt.build_model(h)
    for block in fresh.blocks:
        assert torch.equal(block.attn.q_gain, torch.full((h.num_heads,), 5.25))


# --- progressive sequence length -----------------------------------------------------------------


def test_seq_schedule_parses_and_picks_the_stage(gpt):
    h = gpt.Hyperparameters.from_env(
        {**SMALL, "TRAIN_SEQ_LEN": "64", "TRAIN_SEQ_SCHEDULE": "64@1.0, 16@0.1,32@0.7"}
    )
    plan = gpt.train_seq_plan(h)
    assert plan == [(0.1, 16), (0.7, 32), (1.0, 64)]
    picks = [gpt.scheduled_seq_len(plan, p) for p in (0.0, 0.1, 0.1001, 0.7, 0.95, 1.0, 1.2)]
    assert picks == [16, 16, 32, 32, 64, 64, 64]
    short = gpt.Hyperparameters.from_env(
        {**SMALL, "TRAIN_SEQ_LEN": "32", "TRAIN_SEQ_SCHEDULE": "16@0.5,32@0.8"}
    )
    assert gpt.train_seq_plan(short)[-1] == (1.0, 32)  # the last stage runs to the end
    unset = gpt.Hyperparameters.from_env(SMALL)
    assert gpt.train_seq_plan(unset) == [(1.0, 32)]


def test_rope_takes_the_longest_stage_as_its_training_length(gpt):
    """As #2014: RoPE/YaRN's training length is TRAIN_SEQ_LEN, the schedule's longest stage (its
    ROPE_TRAIN_SEQ_LEN is parsed but never read), so the shorter stages train with the same
    unscaled frequencies and YaRN rescales only past the longest."""
    h = gpt.Hyperparameters.from_env(
        {**SMALL, "TRAIN_SEQ_SCHEDULE": "16@0.5,32@1", "ROPE_DIMS": "8", "ROPE_YARN": "1"}
    )
    rotary = gpt.build_model(h).blocks[0].attn.rotary
    assert rotary.yarn and rotary.train_len == 32
    cos16, _ = rotary(16, torch.device("cpu"), torch.float32)
    cos32, _ = rotary(32, torch.device("cpu"), torch.float32)
    cos64, _ = rotary(64, torch.device("cpu"), torch.float32)
    assert torch.equal(cos16, cos32[:, :, :16])
    assert not torch.allclose(cos64[:, :, :32], cos32)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"TRAIN_SEQ_SCHEDULE": "16-0.5,32@1"}, "TRAIN_SEQ_SCHEDULE"),
        ({"TRAIN_SEQ_SCHEDULE": "16@1.5,32@1"}, "TRAIN_SEQ_SCHEDULE"),
        ({"TRAIN_SEQ_SCHEDULE": "16@0.5"}, "TRAIN_SEQ_SCHEDULE"),  # longest != TRAIN_SEQ_LEN
        ({"TRAIN_SEQ_SCHEDULE": "24@0.5,32@1"}, "TRAIN_BATCH_TOKENS"),  # 4096 % (8 x 24)
        ({"TRAIN_SEQ_SCHEDULE_MODE": "tokens"}, "TRAIN_SEQ_SCHEDULE_MODE"),
        ({"SEQ_CHANGE_WARMUP_STEPS": "-1"}, "SEQ_CHANGE_WARMUP_STEPS"),
    ],
)
def test_bad_seq_schedules_are_named(gpt, env, names):
    with pytest.raises(ValueError, match=names) as err:
        gpt.Hyperparameters.from_env({**SMALL, **env})
    assert "\n" not in str(err.value)


def test_warmup_primes_every_length_and_recurrence_state(gpt):
    plan = [(0.1, 16), (0.7, 32), (1.0, 64)]
    shapes = gpt.warmup_shapes(plan, 12, recurrence=True)
    assert len(shapes) == 12 and set(shapes) == {(n, f) for n in (16, 32, 64) for f in (0.0, 1.0)}
    assert [n for n, _ in shapes] == sorted(n for n, _ in shapes)  # lengths in schedule order
    # One length: the split used before schedules existed.
    assert gpt.warmup_shapes([(1.0, 32)], 5, True) == [(32, float(s >= 2)) for s in range(5)]


def test_training_follows_the_schedule_with_constant_tokens(gpt, embedded, tmp_path):
    env = {
        **TINY_ENV,
        **embedded,
        "ITERATIONS": "6",
        "TRAIN_SEQ_LEN": "64",
        "TRAIN_SEQ_SCHEDULE": "32@0.34,64@1.0",
        "SEQ_CHANGE_WARMUP_STEPS": "2",
        "WARMDOWN_FRAC": "0",
        "WARMDOWN_ITERS": "0",
        "TRAIN_LOG_EVERY": "1",
    }
    h = gpt.Hyperparameters.from_env(env)
    rt = gpt.setup_runtime({})
    model = gpt.build_model(h)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    logger = gpt.RunLogger(str(tmp_path), "sched", enabled=True)
    gpt.train_model(h, rt, model, logger)
    micro = h.train_batch_tokens // rt.grad_accum_steps
    lengths = [s[1] for s in shapes[:: rt.grad_accum_steps]]
    # Step fraction (no wallclock cap): steps 0-2 are <= 0.34 of 6, then 64.
    assert lengths == [32, 32, 32, 64, 64, 64]
    assert all(rows * length == micro for rows, length in shapes)
    text = open(logger.text_path).read()
    assert "seq_len_switch: step:3 seq_len:64 (was 32)" in text
    events = [json.loads(line) for line in open(logger.events_path)]
    lr = {e["step"]: e["lr_scale"] for e in events if e.get("event") == "train"}
    # Re-warmup over 2 steps after the switch at step 3 (events count steps done).
    assert (lr[3], lr[4], lr[5]) == (1.0, 0.5, 1.0)


# --- every lever on the CPU, end to end ----------------------------------------------------------

LEVERS = {
    "asym_logit": {"ASYM_LOGIT_RESCALE": "1"},
    "smear_bos_fix_off": {"SMEAR_GATE": "1", "SMEAR_GATE_WINDOW": "12", "SMEAR_GATE_BOS_FIX": "0"},
    "qk_gain_525": {"QK_GAIN_INIT": "5.25"},
    "seq_schedule": {"TRAIN_SEQ_SCHEDULE": "32@0.34,64@1.0", "SEQ_CHANGE_WARMUP_STEPS": "2"},
}
ALL_LEVERS = {k: v for env in LEVERS.values() for k, v in env.items()} | {
    "DOC_ATTENTION": "1",
    "EVAL_MODE": "ttt_phased",
    "TTT_PHASES": "2,4",
    "WARMUP_STEPS": "2",
}


@pytest.mark.parametrize("lever", [*LEVERS, "all"])
def test_each_lever_trains_and_passes_the_audits(embedded, tmp_path, lever):
    env = {**TINY_ENV, **TINY_RUN["train_gpt.py"], **embedded, "LOG_DIR": str(tmp_path)}
    env.update(ALL_LEVERS if lever == "all" else LEVERS[lever])
    proc = run_script("train_gpt.py", env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc.stdout)
    assert summary["valid"] and summary["steps"] == 6
    assert all(a["passed"] for a in summary["audits"].values()), summary["audits"]
    if lever in ("all", "seq_schedule"):
        assert "seq_len_switch: step:3 seq_len:64 (was 32)" in proc.stdout
    if lever == "all":
        assert "quantized_ttt_phased adapted_scalars: softcap_pos:" in proc.stdout
