"""The record stack of train_gpt.py: every technique toggles on and off, the BOS-safe embedding,
XSA's orthogonality, depth recurrence's weight sharing and single recompile, causality with every
flag on, the EMA in the artifact, the benchmark script, and the parameter counts of the two
real presets."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, perturbed_model, random_tokens

# A baseline-shaped model small enough for a 2-core CPU, with GQA (4 heads over 2 KV heads).
SMALL = {
    "PRESET": "baseline",
    "NUM_LAYERS": "3",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "4096",
    "EVAL_STRIDE": "16",
}
FLAGS = {
    "leaky_relu2": {"MLP_ACTIVATION": "leaky_relu2"},
    "partial_rope": {"ROPE_DIMS": "8"},
    "ln_scale": {"LN_SCALE": "1"},
    "xsa": {"XSA_LAST_N": "3"},
    "skip_gates": {"SKIP_GATES": "1"},
    "smear_gate": {"SMEAR_GATE": "1"},
    "bigram": {"BIGRAM_VOCAB_SIZE": "97", "BIGRAM_DIM": "16"},
    "value_residual": {"VALUE_RESIDUAL": "1"},
    "attn_gate": {"ATTN_GATE": "1", "ATTN_GATE_WINDOW": "8"},
    "parallel_residual": {"PARALLEL_RESIDUAL_START": "1"},
    "recurrence": {"RECUR_LAYERS": "1", "RECUR_LOOPS": "2"},
    "flow_matcher": {"FLOW_MATCHER": "1", "FLOW_DIM": "32"},
    "qk_gain_softcap": {"QK_GAIN_INIT": "5.0", "LOGIT_SOFTCAP": "15"},
}
ALL_ON = {k: v for flags in FLAGS.values() for k, v in flags.items()}


def small_model(gpt, seed=0, **env):
    return perturbed_model(gpt, {**SMALL, **env}, seed)


tokens = random_tokens


@pytest.mark.parametrize("flag", ["none", *FLAGS, "all", "all_vocab4096"])
def test_each_technique_runs_forward_and_backward(gpt, flag):
    env = {"none": {}, "all": ALL_ON, "all_vocab4096": {**ALL_ON, "VOCAB_SIZE": "4096"}, **FLAGS}[
        flag
    ]
    model, h = small_model(gpt, **env)
    x = tokens(h)
    loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.forward_logits(x).shape == (2, 32, h.vocab_size)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_new_flags_are_off_by_default_and_validated(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    assert (h.mlp_activation, h.rope_dims, h.xsa_last_n, h.bigram_vocab_size) == ("relu2", 0, 0, 0)
    assert h.recur_layers == "" and h.parallel_residual_start == -1
    assert not (
        h.ln_scale
        or h.skip_gates
        or h.smear_gate
        or h.value_residual
        or h.attn_gate
        or h.flow_matcher
    )
    for name, value in (
        ("MLP_ACTIVATION", "gelu"),
        ("RECUR_LAYERS", "7"),
        ("RECUR_LAYERS", "a,b"),
        ("ROPE_DIMS", "7"),
    ):
        with pytest.raises(ValueError, match=name):
            gpt.build_model(gpt.Hyperparameters.from_env({**SMALL, name: value}))


def test_bos_embedding_does_not_depend_on_the_previous_document(gpt):
    model, h = small_model(gpt, SMEAR_GATE="1", BIGRAM_VOCAB_SIZE="97", BIGRAM_DIM="16")
    x = tokens(h)
    x[:, 10] = 1  # BOS: a new document starts here
    other = x.clone()
    other[:, :10] = tokens(h, seed=7)[:, :10]
    with torch.no_grad():
        a, b = model.embed(x), model.embed(other)
        assert torch.equal(a[:, 10:], b[:, 10:])
        assert not torch.equal(a[:, :10], b[:, :10])
        x[:, 10] = other[:, 10] = (
            5  # the same change with no BOS: the smear and bigram do reach across
        )
        assert not torch.equal(model.embed(x)[:, 10], model.embed(other)[:, 10])


@pytest.mark.parametrize("gates", [False, True])
def test_xsa_output_is_orthogonal_to_the_tokens_own_value(gpt, gates):
    env = {"XSA_LAST_N": "3", "VALUE_RESIDUAL": "1", **({"ATTN_GATE": "1"} if gates else {})}
    model, h = small_model(gpt, **env)
    x = torch.randn(2, 32, h.model_dim)
    attn = model.blocks[2].attn
    with torch.no_grad():
        v_first = model.blocks[0].attn.attend(x)[1]
        y, v = attn.attend(x, v_first)
        group = h.num_heads // h.num_kv_heads
        yg = y.reshape(2, h.num_kv_heads, group, 32, -1)
        dots = (yg * F.normalize(v, dim=-1)[:, :, None]).sum(-1)
        assert dots.abs().max() < 1e-5 * yg.norm(dim=-1).max()
        attn.xsa = False
        y_plain, _ = attn.attend(x, v_first)
        plain = (y_plain.reshape(yg.shape) * F.normalize(v, dim=-1)[:, :, None]).sum(-1)
        assert plain.abs().max() > 1e-2


def test_depth_recurrence_reuses_the_same_parameters(gpt):
    model, h = small_model(gpt, RECUR_LAYERS="1", RECUR_LOOPS="2")
    params = [id(p) for p in model.parameters()]
    calls = [0] * h.num_layers
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, b in enumerate(model.blocks)
    ]
    x = tokens(h)
    with torch.no_grad():
        model.set_recurrence(False)
        off = model.forward_logits(x)
        assert calls == [1, 1, 1]
        model.set_recurrence(True)
        on = model.forward_logits(x)
        assert calls == [2, 4, 2]
    for hook in hooks:
        hook.remove()
    assert [id(p) for p in model.parameters()] == params
    assert not torch.allclose(on, off)


def test_switching_recurrence_recompiles_once(gpt):
    from torch._dynamo.testing import CompileCounter

    model, h = small_model(gpt, RECUR_LAYERS="1")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    x = tokens(h)
    model.set_recurrence(False)
    before = [compiled(x, x).item() for _ in range(2)]
    model.set_recurrence(True)
    after = [compiled(x, x).item() for _ in range(2)]
    assert counter.frame_count == 2
    assert before[0] == before[1] and after[0] == after[1] and before[0] != after[0]


def test_causality_audit_passes_on_the_record_model_with_every_flag_on(gpt):
    env = {
        "PRESET": "record",
        "NUM_LAYERS": "4",
        "MODEL_DIM": "128",
        "NUM_HEADS": "4",
        "NUM_KV_HEADS": "2",
        "RECUR_LAYERS": "1,2",
        "PARALLEL_RESIDUAL_START": "2",
        "BIGRAM_VOCAB_SIZE": "97",
        "BIGRAM_DIM": "16",
        "VALUE_RESIDUAL": "1",
        "FLOW_MATCHER": "1",
        "FLOW_DIM": "32",
    }
    h = gpt.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    model = gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.recur_active and model.flow is not None and model.bigram is not None
    result = gpt.audit_causality(model, 64, h.vocab_size)
    assert result["passed"], result["failures"]


def test_flow_loss_is_added_only_in_training(gpt):
    model, h = small_model(gpt, FLOW_MATCHER="1", FLOW_DIM="32")
    x = tokens(h)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        model.eval()
        ce = F.cross_entropy(model.forward_logits(x).reshape(-1, h.vocab_size), y.reshape(-1))
        assert torch.allclose(model(x, y), ce)
        model.train()
        assert model(x, y) > ce


def test_the_artifact_holds_the_ema_weights(gpt, tmp_path):
    model, h = small_model(gpt, **ALL_ON)
    ema = gpt.EMA(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema_state = ema.state_dict(model)
    model.load_state_dict(ema_state)
    gpt.save_artifact(model, h, str(tmp_path / "ema.pga"))
    loaded, _ = gpt.load_artifact(str(tmp_path / "ema.pga"))
    expected = gpt.dequantize_entries(*gpt.quantize_state_dict(ema_state, h))
    raw_q = gpt.dequantize_entries(*gpt.quantize_state_dict(raw, h))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not torch.equal(
        loaded.state_dict()["blocks.0.attn.c_q.weight"], raw_q["blocks.0.attn.c_q.weight"]
    )
    assert loaded.recur_active


def test_record_and_baseline_parameter_counts(gpt):
    counts = {}
    for preset in ("record", "frontier", "record_1855", "baseline"):
        with torch.device("meta"):
            model = gpt.build_model(gpt.Hyperparameters.from_env({"PRESET": preset}))
        counts[preset] = sum(p.numel() for p in model.parameters())
    # record: #2135's logged count (#1855's 35,945,671 plus the two AsymLogit caps); the frontier
    # adds no parameter to it.
    assert counts == {
        "record": 35_945_673,
        "frontier": 35_945_673,
        "record_1855": 35_945_671,
        "baseline": 17_059_912,
    }


def test_bench_script_runs_on_cpu_in_a_tiny_configuration():
    env = {
        "NUM_LAYERS": "6",
        "MODEL_DIM": "64",
        "TRAIN_SEQ_LEN": "64",
        "TRAIN_BATCH_TOKENS": "4096",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--compare",
            "baseline",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    for preset in ("record", "baseline"):
        r = res[preset]
        assert r["ms_per_step"] > 0 and r["tokens_per_s_rank"] > 0 and r["peak_memory_mib"] > 0
        assert r["mfu"] == "n/a" and r["tokens_per_step_rank"] == 4096 // 8 and r["threads"] == 1
    # layers 3-5 loop twice
    assert res["record"]["layer_passes"] == 12 and res["baseline"]["layer_passes"] == 6


def test_training_progress_switches_recurrence_on_at_its_fraction(gpt):
    h = gpt.Hyperparameters.from_env(
        {
            "PRESET": "record",
            "NUM_LAYERS": "4",
            "MODEL_DIM": "64",
            "NUM_HEADS": "2",
            "NUM_KV_HEADS": "1",
            "RECUR_LAYERS": "1,2",
            "RECUR_START_FRAC": "0.4",
            "BIGRAM_VOCAB_SIZE": "64",
            "BIGRAM_DIM": "16",
        }
    )
    model = gpt.build_model(h)
    model.set_training_progress(0.1)
    assert not model.recur_active
    model.set_training_progress(0.4)
    assert model.recur_active
