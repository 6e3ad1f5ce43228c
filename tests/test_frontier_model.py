"""The 1.0611 model and optimizer of train_gpt.py (issue 14, PR #1855): every new flag toggles and
trains a step, attention and the SmearGate never cross a BOS, the Triton kernels equal their torch
references under TRITON_INTERPRET=1, Polar Express orthogonalizes with its published table, MIN_LR
is a floor, and the record_1855 preset has #1855's parameter count (`record` is #2135 now:
tests/test_record_preset.py)."""

import json
import textwrap

import pytest
import torch
from conftest import REPO, perturbed_model, random_tokens, run_interpreted

SMALL = {
    "PRESET": "baseline",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "4096",
    "EVAL_STRIDE": "16",
    "MLP_ACTIVATION": "leaky_relu2",
}
FLAGS = {
    "fused_mlp": {"FUSED_MLP": "1"},
    "fused_ce": {"FUSED_CE": "1"},
    "smear_window": {"SMEAR_GATE": "1", "SMEAR_GATE_WINDOW": "12"},
    "sparse_attn_gate": {
        "SPARSE_ATTN_GATE": "1",
        "SPARSE_ATTN_GATE_SCALE": "0.5",
        "ATTN_GATE_WINDOW": "12",
    },
    "parallel_decoder": {"PARALLEL_DECODER_START": "2"},
    "rope_yarn": {"ROPE_DIMS": "8", "ROPE_YARN": "1"},
    "doc_attention": {"DOC_ATTENTION": "1"},
    "ortho_init": {"ORTHO_INIT": "1"},
    "polar_express": {"MUON_POLAR_EXPRESS": "1"},
    "embed_wd": {"EMBED_WD": "0.085", "ADAM_WD": "0.02"},
}
ALL_ON = {k: v for flags in FLAGS.values() for k, v in flags.items()}
# The rest of the record stack too: recurrence, XSA, skip gates, LN scale.
STACK = {
    **ALL_ON,
    "RECUR_LAYERS": "1,2",
    "RECUR_LOOPS": "2",
    "XSA_LAST_N": "4",
    "SKIP_GATES": "1",
    "LN_SCALE": "1",
}


def small_model(gpt, seed=0, **env):
    return perturbed_model(gpt, {**SMALL, **env}, seed)


tokens = random_tokens


@pytest.mark.parametrize("flag", ["off", *FLAGS, "all", "stack"])
def test_each_flag_builds_and_trains_a_step(gpt, flag):
    env = {"off": {}, "all": ALL_ON, "stack": STACK, **FLAGS}[flag]
    model, h = small_model(gpt, **env)
    optimizers = gpt.build_optimizers(model, h, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = tokens(h)
    loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    for opt in optimizers:
        opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert model.forward_logits(x).shape == (2, 32, h.vocab_size)


def test_flags_are_off_by_default_and_validated(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    assert not (
        h.fused_mlp
        or h.fused_ce
        or h.sparse_attn_gate
        or h.rope_yarn
        or h.doc_attention
        or h.ortho_init
        or h.muon_polar_express
    )
    assert (h.smear_gate_window, h.parallel_decoder_start, h.embed_wd, h.min_lr) == (
        0,
        -1,
        -1.0,
        0.0,
    )
    for bad in (
        {"SMEAR_GATE_WINDOW": "4"},
        {"SPARSE_ATTN_GATE": "1", "ATTN_GATE": "1"},
        {"PARALLEL_DECODER_START": "-2"},
        {"EMBED_WD": "-0.5"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gpt.Hyperparameters.from_env({**SMALL, **bad})


def test_record_preset_is_the_1855_configuration(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "record_1855"})
    assert (h.vocab_size, h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (
        8192,
        11,
        512,
        8,
        4,
        4.0,
    )
    assert h.data_path == "data/datasets/fineweb10B_sp8192_caseops"
    assert (
        h.tokenizer_path
        == "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    )
    assert (h.mlp_activation, h.fused_mlp, h.fused_ce, h.xsa_last_n, h.rope_dims, h.rope_yarn) == (
        "leaky_relu2",
        True,
        True,
        11,
        16,
        True,
    )
    assert (
        h.smear_gate,
        h.smear_gate_window,
        h.sparse_attn_gate,
        h.sparse_attn_gate_scale,
        h.attn_gate_window,
    ) == (True, 12, True, 0.5, 12)
    assert not h.attn_gate and h.bigram_vocab_size == 0 and h.parallel_residual_start == -1
    assert (h.parallel_decoder_start, h.recur_layers, h.recur_loops, h.recur_start_frac) == (
        8,
        "3,4,5",
        2,
        0.35,
    )
    assert (
        h.doc_attention and h.ortho_init and h.skip_gates and h.ln_scale and h.qk_gain_init == 5.0
    )
    assert (
        h.matrix_lr,
        h.muon_wd,
        h.muon_momentum,
        h.muon_polar_express,
        h.muon_backend_steps,
    ) == (0.026, 0.095, 0.97, True, 5)
    assert (h.beta1, h.beta2, h.tied_embed_lr, h.scalar_lr, h.embed_wd, h.adam_wd) == (
        0.9,
        0.99,
        0.03,
        0.02,
        0.085,
        0.02,
    )
    assert (h.grad_clip_norm, h.ema_decay, h.warmdown_frac, h.min_lr) == (0.3, 0.9965, 0.85, 0.1)
    assert (h.train_batch_tokens, h.train_seq_len, h.warmup_steps) == (786432, 2048, 20)


def test_record_parameter_count_matches_1855(gpt):
    model = gpt.build_model(gpt.Hyperparameters.from_env({"PRESET": "record_1855"}))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nrecord_1855 preset: {params:,} parameters; #1855 logged 35,945,671 "
        f"(difference {params - 35_945_671:+,})"
    )
    assert params == 35_945_671  # same modules and shapes as #1855, so the count matches exactly
    names = dict(model.named_parameters())
    assert names["blocks.0.attn.attn_gate_w"].shape == (8, 12)
    assert names["smear_gate"].shape == (12,) and names["smear_lambda"].shape == (1,)
    assert names["parallel_post_lambdas"].shape == (11, 2, 2) and names[
        "parallel_resid_lambdas"
    ].shape == (11, 2)
    for name in (
        "blocks.0.attn.attn_gate_w",
        "smear_lambda",
        "parallel_post_lambdas",
        "parallel_resid_lambdas",
    ):
        assert gpt.is_control_tensor(name, gpt.CONTROL_TENSOR_PATTERNS), name


def test_a_token_never_sees_the_previous_document(gpt):
    for doc_attention, isolated in (("1", True), ("0", False)):
        model, h = small_model(gpt, **{**STACK, "DOC_ATTENTION": doc_attention})
        model.eval()
        x = tokens(h)
        x[:, 12] = 1  # BOS: a new document starts here
        other = x.clone()
        other[:, :12] = tokens(h, seed=9)[:, :12]
        with torch.no_grad():
            a, b = model.forward_logits(x), model.forward_logits(other)
        after = (a[:, 12:] - b[:, 12:]).abs().max().item()
        assert not torch.allclose(a[:, :12], b[:, :12])
        if isolated:
            assert after <= 1e-5, after
        else:  # without it the same change reaches the next document
            assert after > 1e-3, after


def test_causality_audit_passes_with_every_flag_on(gpt):
    env = {
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
    }
    h = gpt.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    model = gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = gpt.audit_causality(model, 64, h.vocab_size)
    assert result["passed"], result["failures"]


def test_smear_gate_is_masked_at_bos(gpt):
    model, h = small_model(gpt, SMEAR_GATE="1", SMEAR_GATE_WINDOW="12")
    assert model.smear_lambda.abs().item() > 0
    x = tokens(h)
    x[:, 10] = 1
    other = x.clone()
    other[:, 9] = (x[:, 9] + 1) % h.vocab_size  # the token just before the BOS
    with torch.no_grad():
        assert torch.equal(model.embed(x)[:, 10:], model.embed(other)[:, 10:])
        assert not torch.equal(model.embed(x)[:, 9], model.embed(other)[:, 9])
        x[:, 10] = other[:, 10] = 5  # no BOS: the smear carries the previous token into position 10
        assert not torch.equal(model.embed(x)[:, 10], model.embed(other)[:, 10])


def test_parallel_decoder_lanes_start_at_their_layer(gpt):
    model, h = small_model(gpt, PARALLEL_DECODER_START="3")
    model.eval()
    x = tokens(h)
    with torch.no_grad():
        base = model.forward_logits(x)
        model.parallel_post_lambdas[1].add_(1.0)  # layer 1: encoder, never a lane layer
        assert torch.equal(model.forward_logits(x), base)
        model.parallel_post_lambdas[3].add_(0.5)
        assert not torch.allclose(model.forward_logits(x), base)


def test_yarn_rescales_rope_only_past_the_training_length(gpt):
    plain = gpt.Rotary(16, 10000.0)
    yarn = gpt.Rotary(16, 10000.0, train_len=32, yarn=True)
    for a, b in zip(plain(32, "cpu", torch.float32), yarn(32, "cpu", torch.float32)):
        assert torch.equal(a, b)
    stretched = gpt.Rotary(16, 10000.0 * 2 ** (16 / 14))
    for a, b in zip(stretched(64, "cpu", torch.float32), yarn(64, "cpu", torch.float32)):
        assert torch.allclose(a, b, atol=1e-6)


# The coefficients as published in PR #1344 (typed here from the PR, not from the script).
PR1344 = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def test_polar_express_table_and_first_step(gpt):
    assert [tuple(c) for c in gpt.POLAR_EXPRESS_COEFFS] == PR1344
    assert gpt.newton_schulz_coeffs(5, True) == PR1344
    assert gpt.newton_schulz_coeffs(7, True) == [*PR1344, PR1344[-1], PR1344[-1]]
    assert gpt.newton_schulz_coeffs(3) == [gpt.NS_COEFFS] * 3
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    X = G / (G.norm() + 1e-7)
    a, b, c = PR1344[0]
    A = X @ X.T
    assert torch.allclose(
        gpt.zeropower_via_newtonschulz5(G, steps=1, polar_express=True),
        a * X + (b * A + c * A @ A) @ X,
        atol=1e-5,
    )


@pytest.mark.parametrize("shape", [(128, 64), (64, 256)])
def test_polar_express_orthogonalizes(gpt, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    pe = torch.linalg.svdvals(gpt.zeropower_via_newtonschulz5(G, steps=5, polar_express=True))
    quintic = torch.linalg.svdvals(gpt.zeropower_via_newtonschulz5(G, steps=5))
    assert 0.8 < pe.min() and pe.max() < 1.2, (pe.min(), pe.max())
    # closer to orthogonal than the fixed triple
    assert (pe - 1).abs().max() < (quintic - 1).abs().max()


def test_muon_uses_polar_express_per_group(gpt):
    model, h = small_model(gpt, MUON_POLAR_EXPRESS="1")
    muon = gpt.build_optimizers(model, h, torch.device("cpu"))[0]
    assert [g["polar_express"] for g in muon.param_groups] == [True]
    model, h = small_model(gpt)
    assert [
        g["polar_express"]
        for g in gpt.build_optimizers(model, h, torch.device("cpu"))[0].param_groups
    ] == [False]


def test_embedding_weight_decay_group(gpt):
    model, h = small_model(gpt, EMBED_WD="0.085", ADAM_WD="0.02")
    adam = gpt.build_optimizers(model, h, torch.device("cpu"))[1]
    assert [g["weight_decay"] for g in adam.param_groups] == [0.085, 0.02]
    model, h = small_model(gpt, ADAM_WD="0.02")
    adam = gpt.build_optimizers(model, h, torch.device("cpu"))[1]
    assert [g["weight_decay"] for g in adam.param_groups] == [0.02, 0.02]


def test_min_lr_is_a_floor_not_a_rescaled_ramp(gpt):
    h = gpt.Hyperparameters.from_env(
        {
            **SMALL,
            "ITERATIONS": "100",
            "WARMDOWN_FRAC": "0.85",
            "MIN_LR": "0.1",
            "MAX_WALLCLOCK_SECONDS": "0",
        }
    )
    assert gpt.lr_multiplier(h, 10, 0.0) == 1.0
    # a rescaled ramp would give 0.629
    assert gpt.lr_multiplier(h, 50, 0.0) == pytest.approx(0.5 / 0.85)
    assert gpt.lr_multiplier(h, 95, 0.0) == 0.1  # (1 - 0.95) / 0.85 = 0.059 is under the floor
    assert gpt.lr_multiplier(h, 100, 0.0) == 0.1
    base = gpt.Hyperparameters.from_env(
        {"PRESET": "baseline", "ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "0"}
    )
    # The baseline (MIN_LR=0, WARMDOWN_ITERS=1200 > ITERATIONS): the official ramp
    # (iterations - step) / 1200.
    assert [gpt.lr_multiplier(base, s, 0.0) for s in (0, 50, 100)] == [100 / 1200, 50 / 1200, 0.0]


def test_fused_kernels_step_aside_for_hooks(gpt):
    model, _ = small_model(gpt, FUSED_MLP="1")
    fc = model.blocks[0].mlp.fc
    assert gpt._no_hooks(fc)
    handle = fc.register_forward_hook(lambda m, i, o: o)
    assert not gpt._no_hooks(fc)
    handle.remove()
    fc.forward = lambda x: x  # a patched forward (QAT) also keeps the module path
    assert not gpt._no_hooks(fc)


KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import train_gpt as g
    torch.manual_seed(0)
    out = {}
    x = torch.randn(3, 13, 40, requires_grad=True)
    w_up = (0.2 * torch.randn(72, 40)).requires_grad_()
    w_down = (0.2 * torch.randn(40, 72)).requires_grad_()
    fused = g.FusedLeakyReLU2MLP.apply(x, w_up, w_down)
    ref = g.leaky_relu2_mlp_reference(x, w_up, w_down)
    g_out = torch.randn_like(ref)
    grads = torch.autograd.grad(fused, (x, w_up, w_down), g_out)
    grads_ref = torch.autograd.grad(ref, (x, w_up, w_down), g_out)
    out["mlp_forward"] = (fused - ref).abs().max().item()
    out["mlp_backward"] = max((a - b).abs().max().item() for a, b in zip(grads, grads_ref))
    out["mlp_scale"] = ref.abs().max().item()
    logits = (8 * torch.randn(37, 1500)).requires_grad_()
    targets = torch.randint(0, 1500, (37,))
    loss = g.SoftcappedCrossEntropy.apply(logits, targets, 30.0)
    ref_loss = g.softcapped_ce_reference(logits, targets, 30.0)
    w = torch.rand(37)
    out["ce_forward"] = (loss - ref_loss).abs().max().item()
    gl = torch.autograd.grad((loss * w).sum(), logits)[0]
    gr = torch.autograd.grad((ref_loss * w).sum(), logits)[0]
    out["ce_backward"] = (gl - gr).abs().max().item()
    out["ce_grad_scale"] = gr.abs().max().item()
    out["interpreted"] = type(g.triton_model_kernels()["matmul_leaky2"]).__name__
    print(json.dumps(out))
""")


def test_triton_kernels_match_torch_under_the_interpreter():
    out = run_interpreted(KERNEL_CHECK, str(REPO))
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\ntriton interpreter vs torch: {res}")
    assert "Interpreted" in res["interpreted"]
    assert res["mlp_forward"] < 1e-4 * max(1.0, res["mlp_scale"])
    assert res["mlp_backward"] < 1e-4
    assert res["ce_forward"] < 1e-4
    assert res["ce_backward"] < 1e-6 + 1e-4 * res["ce_grad_scale"]
