"""GPU readiness proven on CPU (issue 17): torch.compile, bf16 autocast, kernel dispatch, baseline
numerics, the full-shape dry run and the device check's dry run.

What runs where:
- Compile: dynamo with fullgraph=True and the aot_eager backend always runs (graph breaks, the
  number of graphs and the joint forward/backward graph are dynamo's and AOT autograd's, the same
  under every backend). Inductor adds C++ codegen and takes 2.5-5 minutes per graph on a 2-core
  CPU, so on CPU it runs on request (PG_TEST_INDUCTOR=1, needs g++); the `_on_cuda` tests run it
  on a GPU (scripts/gpu_check.sh).
- bf16: CPU autocast stands in for CUDA's (train_gpt.py enables autocast on CUDA only, so the
  tests switch `_autocast` on for the CPU).
- Kernels: the torch path on CPU, the Triton kernels under TRITON_INTERPRET=1 in a subprocess.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_interpreted

# The record preset at tiny shapes, every model flag of the preset on (2 layers: layer 1 looped
# twice more, so 2 then 4 layer passes; parallel residuals from layer 1; XSA on both), plus late
# QAT from half the budget. Dynamo unrolls the passes, so depth is what compile time scales with.
RECORD_TINY = {
    "PRESET": "record",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "32",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "RECUR_LAYERS": "1",
    "PARALLEL_RESIDUAL_START": "1",
    "XSA_LAST_N": "2",
    "ROPE_DIMS": "8",
    "BIGRAM_VOCAB_SIZE": "61",
    "BIGRAM_DIM": "8",
    "VOCAB_SIZE": "128",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "512",
    "EVAL_SEQ_LEN": "32",
    "EVAL_STRIDE": "8",
    "VAL_BATCH_SIZE": "2048",
    "TTT_CHUNK_TOKENS": "128",
    "TTT_EPOCHS": "1",
    "TTT_BATCH_SEQS": "2",
    "QAT_START_FRAC": "0.5",
    "QAT_BITS": "6",
    "KEEP_FLOAT_MAX_NUMEL": "0",
}
# Relative L2 error of the compiled loss and gradients against eager.
COMPILE_TOL = {"aot_eager": 1e-5, "inductor": 1e-3, "inductor_cuda_bf16": 5e-2}
GRAPH_BOUND = 2  # one graph per layer order (recurrence off, on); QAT and the restore add none


def record_tiny(gpt, **env):
    return gpt.Hyperparameters.from_env({**RECORD_TINY, **env})


def perturbed_model(gpt, h, seed=0):
    """Zero-initialized projections and gates would make every layer order compute the same loss;
    a small perturbation makes each switch visible."""
    torch.manual_seed(seed)
    model = gpt.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(h, seed=1, seqs=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, h.vocab_size, (seqs, h.train_seq_len + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / (b.float().norm() + 1e-12))


def loss_and_grads(step_model, model, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = step_model(x, y)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compile_scenario(gpt, backend, device):
    """The compile life of a training run, in train_model's order: QAT enabled, compile, warmup of
    both halves of the recurrence schedule with optimizer steps, restore of the initial state, then
    the real schedule (recurrence joins at RECUR_START_FRAC, QAT at QAT_START_FRAC). Compiled losses
    and gradients are compared with an eager copy at every state."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    h = record_tiny(gpt)
    device = torch.device(device)
    autocast = device.type == "cuda"
    model = perturbed_model(gpt, h).to(device)
    gpt.enable_qat(model, h)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    optimizers = gpt.build_optimizers(model, h, device)
    initial = copy.deepcopy(model.state_dict())
    opt_states = copy.deepcopy([opt.state_dict() for opt in optimizers])
    x, y = batch(h, device=device)
    for frac in (0.0, 1.0):  # warmup, as train_model: both layer orders get compiled
        model.set_training_progress(frac)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            compiled(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    model.load_state_dict(initial)
    for opt, state in zip(optimizers, opt_states):
        opt.load_state_dict(state)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    errors = []
    for frac in (0.1, 0.3, 0.4, 0.6, 0.9):  # recurrence joins at 0.35, QAT at 0.5
        for m in (model, eager):
            m.set_training_progress(frac)
            gpt.qat_step_hook(m, h, frac)
        loss_c, grads_c = loss_and_grads(compiled, model, x, y, autocast)
        loss_e, grads_e = loss_and_grads(eager, eager, x, y, autocast)
        errors.append(
            {
                "frac": frac,
                "recurrence": model.recur_active,
                "loss": rel_err(loss_c, loss_e),
                "grads": max(rel_err(a, b) for a, b in zip(grads_c, grads_e)),
                "loss_value": float(loss_e),
            }
        )
    return {
        "graphs_after_warmup": graphs_after_warmup,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "errors": errors,
    }


def inductor_on_cpu_requested():
    if os.environ.get("PG_TEST_INDUCTOR") != "1" or not shutil.which("g++"):
        pytest.skip("inductor on CPU: set PG_TEST_INDUCTOR=1 (needs g++; minutes per graph)")


@pytest.fixture(scope="module", params=["aot_eager", "inductor"])
def compiled_run(request, gpt):
    if request.param == "inductor":
        inductor_on_cpu_requested()
        import torch._inductor.config

        # inductor skips the fp16 rounding of QAT's scales unless told to emulate it
        with torch._inductor.config.patch(emulate_precision_casts=True):
            return request.param, compile_scenario(gpt, request.param, "cpu")
    return request.param, compile_scenario(gpt, request.param, "cpu")


# --- torch.compile: the record training step ------------------------------------------------------


def test_record_step_compiles_as_one_graph_with_no_breaks(compiled_run):
    _, run = compiled_run
    assert run["graph_breaks"] == 0  # fullgraph=True would also have raised


def test_recompiles_are_bounded_by_the_layer_orders(compiled_run):
    _, run = compiled_run
    assert run["graphs_after_warmup"] == GRAPH_BOUND
    assert run["graphs"] == GRAPH_BOUND  # recurrence and QAT switches, restore: no new graph


def test_compiled_losses_and_gradients_equal_eager(compiled_run):
    backend, run = compiled_run
    assert {e["recurrence"] for e in run["errors"]} == {False, True}
    for e in run["errors"]:
        assert e["loss"] <= COMPILE_TOL[backend], e
        assert e["grads"] <= COMPILE_TOL[backend], e
    assert len({round(e["loss_value"], 6) for e in run["errors"]}) >= 3  # each switch is seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_record_step_compiles_with_inductor_on_cuda(gpt):
    run = compile_scenario(gpt, "inductor", "cuda")
    assert run["graph_breaks"] == 0 and run["graphs"] == GRAPH_BOUND
    for e in run["errors"]:
        assert e["loss"] <= COMPILE_TOL["inductor_cuda_bf16"], e
        assert e["grads"] <= COMPILE_TOL["inductor_cuda_bf16"], e


# --- torch.compile: the Newton-Schulz step --------------------------------------------------------


def muon_shapes(h):
    """The shapes Muon orthogonalizes in the tiny record model (q/proj, k/v, fc, mlp proj,
    bigram proj), wide and tall."""
    d = h.model_dim
    kv = h.num_kv_heads * (d // h.num_heads)
    hidden = int(h.mlp_mult * d)
    return [(d, d), (kv, d), (hidden, d), (d, hidden), (d, h.bigram_dim)]


def check_newton_schulz(gpt, backend, device, tol):
    """Compiled NS on each Muon shape, twice; returns the number of graphs compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    h = record_tiny(gpt)
    torch._dynamo.reset()
    counters.clear()
    # as the official script: compiled once at start, default dynamic (shapes go symbolic on the
    # first recompile)
    ns = torch.compile(gpt.zeropower_via_newtonschulz5, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    shapes = muon_shapes(h)
    for _ in range(2):
        for shape in shapes:
            grad = torch.randn(shape, generator=g).to(device)
            assert rel_err(ns(grad), gpt.zeropower_via_newtonschulz5(grad)) <= tol, shape
    assert sum(counters["graph_break"].values()) == 0
    graphs = counters["stats"]["unique_graphs"]
    # Bound: at most one graph per distinct shape (the second pass over the shapes adds none), and
    # under dynamo's recompile limit, past which it would silently run eager. The full record has
    # 5 Muon shapes (512x512, 256x512, 1536x512, 512x1536, 512x112), so 5 graphs at most.
    assert graphs <= min(len(set(shapes)), torch._dynamo.config.recompile_limit)
    return graphs


def test_newton_schulz_compiles_without_breaks_and_matches_eager(gpt):
    check_newton_schulz(gpt, "aot_eager", "cpu", 1e-6)


def test_newton_schulz_compiles_with_inductor_on_cpu(gpt):
    inductor_on_cpu_requested()
    check_newton_schulz(gpt, "inductor", "cpu", 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_newton_schulz_compiles_with_inductor_on_cuda(gpt):
    check_newton_schulz(gpt, "inductor", "cuda", 2e-2)  # bf16 on CUDA


# --- bf16 autocast --------------------------------------------------------------------------------


@pytest.fixture
def bf16_cpu(gpt, monkeypatch):
    """train_gpt.py's `_autocast` with bf16 on the CPU too, as it is on CUDA."""
    monkeypatch.setattr(
        gpt, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    return gpt


def test_record_training_step_under_bf16_is_near_fp32(gpt):
    h = record_tiny(gpt)
    model = perturbed_model(gpt, h)
    gpt.enable_qat(model, h)
    gpt.set_qat(model, True)
    x, y = batch(h)
    loss32, grads32 = loss_and_grads(model, model, x, y, autocast=False)
    loss16, grads16 = loss_and_grads(model, model, x, y, autocast=True)
    assert loss16.dtype == torch.float32
    assert abs(float(loss16) - float(loss32)) <= 0.01 * float(loss32)
    # The whole gradient within 5 %, and every tensor that carries a visible share of it. A tensor
    # whose gradient is a few 1e-4 (a fresh q_gain: 2 numbers) is all bf16 rounding noise in
    # relative terms (11 % measured on the #1855 model), so it is held to the global bound only.
    assert (
        rel_err(
            torch.cat([g.flatten() for g in grads16]), torch.cat([g.flatten() for g in grads32])
        )
        <= 0.05
    )
    total = torch.cat([g.flatten() for g in grads32]).norm()
    visible = [(a, b) for a, b in zip(grads16, grads32) if b.norm() >= 0.01 * total]
    assert visible and max(rel_err(a, b) for a, b in visible) <= 0.05


def test_softcap_and_cross_entropy_see_fp32_logits_under_bf16(gpt, monkeypatch):
    seen = {"tanh": [], "cross_entropy": []}
    tanh = torch.tanh
    cross_entropy = F.cross_entropy

    def spy_tanh(t, *args, **kwargs):
        seen["tanh"].append(t.dtype)
        return tanh(t, *args, **kwargs)

    def spy_cross_entropy(t, *args, **kwargs):
        seen["cross_entropy"].append(t.dtype)
        return cross_entropy(t, *args, **kwargs)

    monkeypatch.setattr(torch, "tanh", spy_tanh)
    monkeypatch.setattr(F, "cross_entropy", spy_cross_entropy)
    h = record_tiny(gpt)
    model = perturbed_model(gpt, h)
    x, y = batch(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, y)  # training: forward -> logits -> softcap -> CE
    monkeypatch.setattr(gpt, "_autocast", lambda device: torch.autocast("cpu", torch.bfloat16))
    gpt.token_nll(model, x, y)  # every eval path scores through token_nll
    assert seen["tanh"] == [torch.float32, torch.float32]
    assert seen["cross_entropy"] == [torch.float32, torch.float32]


def tiny_val(h, n_seqs=8):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, h.vocab_size, (n_seqs * h.train_seq_len + 1,), generator=g)
    tokens[:: h.train_seq_len // 2] = 1  # a BOS now and then, as in the shards
    base_bytes = torch.randint(1, 4, (h.vocab_size,), generator=g).to(torch.int16)
    space = torch.arange(h.vocab_size) % 3 == 0
    boundary = torch.arange(h.vocab_size) < 2
    return tokens.to(torch.uint16), (base_bytes, space, boundary)


@pytest.mark.parametrize("mode", ["standard", "sliding", "ttt"])
def test_every_eval_path_under_bf16_is_near_fp32(gpt, monkeypatch, mode):
    h = record_tiny(gpt, TTT_LR="0.01")
    model = perturbed_model(gpt, h)
    val, luts = tiny_val(h)
    evaluate = gpt.EVAL_MODES[mode].evaluate
    fp32 = evaluate(h, model, val, luts)
    monkeypatch.setattr(gpt, "_autocast", lambda device: torch.autocast("cpu", torch.bfloat16))
    bf16 = evaluate(h, model, val, luts)
    assert bf16["tokens"] == fp32["tokens"] and bf16["bytes"] == fp32["bytes"]
    assert abs(bf16["val_loss"] - fp32["val_loss"]) <= 0.01 * fp32["val_loss"]
    if mode != "standard":
        assert bf16["score_first"]["passed"]


# --- kernel dispatch ------------------------------------------------------------------------------


def quant_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 200, generator=g)
    return w, w.abs().amax(dim=1) * 0.9


def test_cpu_tensors_take_the_torch_path_without_building_kernels(gpt, monkeypatch):
    def no_kernels():
        raise AssertionError("the kernel builder was called for a CPU tensor")

    monkeypatch.setattr(gpt, "_triton_kernels", no_kernels)
    w, clip = quant_inputs()
    q, s = gpt.quantize_rows(w, 6, clip)
    expected = torch.clamp(w, -clip[:, None], clip[:, None]) / s.float()[:, None]
    assert torch.equal(q, expected.round().clamp(-31, 31).to(torch.int8))
    assert torch.equal(gpt.dequantize_rows(q, s), q.float() * s.float()[:, None])


INTERPRETED = """
import sys, torch
sys.path.insert(0, {repo!r})
import train_gpt as tg
assert tg._triton_kernels() is not None, "Triton kernels were not built"
g = torch.Generator().manual_seed(0)
for bits in (4, 6, 8):
    w = torch.randn(7, 300, generator=g)
    clip = w.abs().amax(dim=1) * 0.8
    q, s = tg.quantize_rows(w, bits, clip, use_triton=True)
    tq, ts = tg.quantize_rows(w, bits, clip, use_triton=False)
    assert torch.equal(q, tq) and torch.equal(s, ts), bits
    assert torch.equal(tg.dequantize_rows(q, s, use_triton=True), tg.dequantize_rows(q, s, False))
print("kernels agree")
"""


def test_triton_kernels_run_and_agree_under_triton_interpret(gpt):
    assert "kernels agree" in run_interpreted(INTERPRETED.format(repo=str(REPO)), timeout=300)


def test_a_kernel_builder_that_raises_never_crashes_the_dispatch(monkeypatch):
    from conftest import load_script

    pytest.importorskip("triton")
    import triton

    def broken_jit(*args, **kwargs):
        raise RuntimeError("simulated: the Triton kernel failed to build")

    fresh = load_script("train_gpt.py")
    monkeypatch.setattr(triton, "jit", broken_jit)
    assert fresh._triton_kernels() is None  # the builder swallowed the failure
    w, clip = quant_inputs()
    q, s = fresh.quantize_rows(w, 6, clip)  # default dispatch: the torch path
    assert torch.equal(fresh.dequantize_rows(q, s), q.float() * s.float()[:, None])


def test_a_kernel_that_fails_to_compile_falls_back_with_one_logged_line(monkeypatch, capsys):
    from conftest import load_script

    fresh = load_script("train_gpt.py")

    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("simulated: PTX compilation failed")

            return launch

    class FakeTriton:
        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    monkeypatch.setattr(fresh, "_triton_kernels", lambda: (FakeTriton, FailingKernel(), None))
    monkeypatch.setattr(fresh, "_use_triton", lambda use_triton, t: True)  # as on a CUDA tensor
    w, clip = quant_inputs()
    for _ in range(3):
        q, s = fresh.quantize_rows(w, 6, clip)
    tq, ts = fresh.quantize_rows(w, 6, clip, use_triton=False)
    assert torch.equal(q, tq) and torch.equal(s, ts)
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if "triton" in ln.lower()]
    assert len(lines) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_equal_the_torch_maths_on_cuda(gpt):
    w, clip = quant_inputs()
    for bits in (4, 6, 8):
        q, s = gpt.quantize_rows(w.cuda(), bits, clip.cuda())
        tq, ts = gpt.quantize_rows(w, bits, clip)
        assert torch.equal(q.cpu(), tq) and torch.equal(s.cpu(), ts)


# The model's own Triton kernels (fused LeakyReLU^2 MLP, softcapped cross-entropy) run in CUDA
# training only; tests/test_frontier_model.py proves their maths under the interpreter, this
# proves the compiled kernels on the GPU (scripts/gpu_check.sh, stage gpu_tests). Bounds, relative
# L2 against the fp32 torch maths of the same inputs: fp32 inputs may go through TF32 in tl.dot
# and cuBLAS (10-bit mantissa, errors ~1e-3); bf16 is the training dtype (8-bit mantissa, a few
# rounding steps, ~5e-3). An indexing or masking bug is an O(1) error, far above either bound.
# bf16 can only be checked here: the Triton interpreter's tl.dot on bf16 returns garbage (a 16x16
# product off by 2.5e10 on dev-cpu, Triton 3.6.0), so the interpreter test is fp32 only.
MODEL_KERNEL_TOL = {
    torch.float32: {"mlp": 1e-2, "ce_loss": 1e-5, "ce_grad": 1e-4},
    torch.bfloat16: {"mlp": 3e-2, "ce_loss": 1e-5, "ce_grad": 1e-2},
}


def model_kernel_errors(gpt, device, dtype, rows=512, dim=512, hidden=2048, vocab=8192):
    """Relative L2 errors of the fused MLP (output and the three gradients) and the softcapped CE
    (losses and the logits' gradient) against their torch references, at the record's widths by
    default; the references see the same (rounded) inputs in fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g).to(device, dtype).requires_grad_()
    w_up = (torch.randn(hidden, dim, generator=g) / dim**0.5).to(device, dtype).requires_grad_()
    w_down = (torch.randn(dim, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w_down.requires_grad_()
    fused = gpt.FusedLeakyReLU2MLP.apply(x, w_up, w_down)
    inputs32 = [t.detach().float().requires_grad_() for t in (x, w_up, w_down)]
    ref = gpt.leaky_relu2_mlp_reference(*inputs32)
    g_out = torch.randn(ref.shape, generator=g).to(device)
    grads = torch.autograd.grad(fused, (x, w_up, w_down), g_out.to(dtype))
    grads_ref = torch.autograd.grad(ref, inputs32, g_out)
    errors = {"mlp_forward": rel_err(fused, ref)}
    for name, a, b in zip(("mlp_grad_x", "mlp_grad_up", "mlp_grad_down"), grads, grads_ref):
        errors[name] = rel_err(a, b)
    logits = (8 * torch.randn(rows // 8, vocab, generator=g)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows // 8,), generator=g).to(device)
    logits32 = logits.detach().float().requires_grad_()
    loss = gpt.SoftcappedCrossEntropy.apply(logits, targets, 30.0)
    ref_loss = gpt.softcapped_ce_reference(logits32, targets, 30.0)
    weights = torch.rand(rows // 8, generator=g).to(device)
    errors["ce_loss"] = rel_err(loss, ref_loss)
    grad = torch.autograd.grad((loss * weights).sum(), logits)[0]
    grad_ref = torch.autograd.grad((ref_loss * weights).sum(), logits32)[0]
    errors["ce_grad"] = rel_err(grad, grad_ref)
    return errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_kernels_equal_the_torch_maths_on_cuda(gpt, dtype):
    errors = model_kernel_errors(gpt, "cuda", dtype)
    print(f"\n{dtype} fused kernels vs torch on {torch.cuda.get_device_name(0)}: {errors}")
    tol = MODEL_KERNEL_TOL[dtype]
    for name, err in errors.items():
        assert err <= tol["mlp" if name.startswith("mlp") else name], (name, err)


# --- baseline numerics: the official bf16 embedding against our fp32 one --------------------------

BASELINE_TINY = {
    "PRESET": "baseline",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "VOCAB_SIZE": "256",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "256",
    "EVAL_STRIDE": "16",
}
BASELINE_STEPS = 20


def markov_tokens(vocab, n, seed=0):
    """A learnable stream: each token is followed by one of 4 fixed successors."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(2, vocab, (vocab, 4), generator=g)
    picks = torch.randint(0, 4, (n,), generator=g).tolist()
    ids = [2]
    for i in range(1, n):
        ids.append(int(successors[ids[-1], picks[i]]))
    return torch.tensor(ids)


def as_official(gpt, model):
    """The official main()'s casts: the model to bf16, then CastedLinear weights and
    low-dimensional or control parameters back to fp32, so the tied embedding (and its Adam
    state) stays bf16."""
    model.bfloat16()
    for m in model.modules():
        if isinstance(m, gpt.CastedLinear):
            m.float()
    for name, p in model.named_parameters():
        if p.ndim < 2 or gpt.is_control_tensor(name, gpt.CONTROL_TENSOR_PATTERNS):
            p.data = p.data.float()
    return model


def baseline_losses(gpt, official, seed=0):
    """BASELINE_STEPS training steps of the tiny baseline under bf16 autocast, with the shared
    block's optimizers; the same data for every variant."""
    h = gpt.Hyperparameters.from_env(BASELINE_TINY)
    torch.manual_seed(seed)
    model = gpt.build_model(h)
    if official:
        as_official(gpt, model)
    optimizers = gpt.build_optimizers(model, h, torch.device("cpu"))
    seqs = h.train_batch_tokens // h.train_seq_len
    data = markov_tokens(h.vocab_size, BASELINE_STEPS * h.train_batch_tokens + 1)
    losses = []
    for step in range(BASELINE_STEPS):
        chunk = data[step * h.train_batch_tokens : (step + 1) * h.train_batch_tokens + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(chunk[:-1].view(seqs, -1), chunk[1:].view(seqs, -1))
        loss.backward()
        for g in optimizers[0].param_groups:
            g["momentum"] = gpt.muon_momentum_at(h, step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model.tok_emb.weight.dtype


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread avoids OpenMP spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_official_bf16_embedding_differs_from_fp32_by_less_than_seed_noise(gpt, one_thread):
    ours, ours_dtype = baseline_losses(gpt, official=False)
    official, official_dtype = baseline_losses(gpt, official=True)
    other_seed, _ = baseline_losses(gpt, official=False, seed=1)
    assert (ours_dtype, official_dtype) == (torch.float32, torch.bfloat16)
    assert ours[-1] < ours[0] - 1.0  # it learns
    gap = max(abs(a - b) for a, b in zip(ours, official))
    noise = max(abs(a - b) for a, b in zip(ours, other_seed))
    print(f"max |loss fp32 emb - loss bf16 emb| {gap:.4f}, seed 0 vs 1 {noise:.4f}")
    assert gap < 0.25 * noise


# --- the full-shape dry run and the device check's dry run ----------------------------------------

DRY_RUN_FIELDS = (
    "params",
    "flops_per_token",
    "activation_gib_per_gpu",
    "gpus1.grad_accum_steps",
    "gpus8.ms_per_step",
    "gpus8.steps_in_600s",
    "pr1855.ms_per_step",
    "pr1855.steps",
    "pr1855.implied_mfu",
)


def run_tool(args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        args, check=False, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_bench_dry_run_prints_the_full_shape_figures():
    out = run_tool([sys.executable, "scripts/bench.py", "--dry-run"])
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    for key in DRY_RUN_FIELDS:
        assert key in fields, key
    assert fields["seq_len"] == "2048" and fields["batch_tokens"] == "786432"
    assert fields["micro_batch_seqs_per_gpu"] == "48"
    assert [fields[f"gpus{n}.grad_accum_steps"] for n in (1, 2, 4, 8)] == ["8", "4", "2", "1"]
    assert 20e6 < int(fields["params"]) < 40e6


def test_bench_dry_run_counts_the_parameters_of_the_real_model(gpt):
    env = {k: v for k, v in RECORD_TINY.items() if k != "PRESET"}
    out = run_tool([sys.executable, "scripts/bench.py", "--dry-run", "--json"], env=env)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)["record"]
    model = gpt.build_model(record_tiny(gpt))
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert figures["layer_passes"] == len(model.orders[True])


# --- scripts/gpu_check.sh: the plan within 8 minutes, the flag coverage, the stages, the checker --

# The flags of issue 23 the device check must name, and the existing ones the frontier records set.
FRONTIER_FLAGS = (
    "NGRAM_TILT_ENABLED TOKEN_ORDER TOKEN_THRESHOLD TOKEN_BOOST ASYM_LOGIT_RESCALE "
    "TRAIN_SEQ_SCHEDULE TRAIN_SEQ_SCHEDULE_MODE SEQ_CHANGE_WARMUP_STEPS SMEAR_GATE_BOS_FIX "
    "AWQ_LITE_ENABLED AWQ_LITE_BITS AWQ_LITE_GROUP_SIZE AWQ_LITE_GROUP_TOP_K GPTQ_CALIB_SEQS "
    "GPTQ_CALIB_SOURCE TTT_LORA_ALPHA TTT_WARM_START_A TTT_LORA_EPS TTT_LORA_FORM "
    "TTT_EVAL_SEQ_LEN TTT_MASK "
    "TTT_K_LORA "
    "TTT_LOCAL_LR_MULT TTT_DOC_ORDER "
    "TTT_SHORT_SCORE_FIRST_ENABLED TTT_SHORT_SCORE_FIRST_STEPS EVAL_INCLUDE_TAIL QK_GAIN_INIT "
    "MATRIX_LR LQER_GROUP TTT_PHASES TTT_LORA_LR TTT_LORA_WD TTT_LORA_RANK EVAL_SEQ_LEN"
).split()
DEVICE_MINUTES_S = 480  # the check's share of a 15-minute lease (issue 23)


def gpu_check_plan():
    """`gpu_check.sh --plan` read back: {stage: (estimate, limit)}, the total line's figures and
    {flag: (state, stages)}."""
    out = run_tool(["bash", "scripts/gpu_check.sh", "--plan"], env={"PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    stages = {}
    total = None
    coverage = {}
    for line in out.stdout.splitlines():
        words = line.split()
        if words[0] == "plan:" and words[2].endswith("s") and words[1] != "stage":
            figures = (int(words[2][:-1]), int(words[3][:-1]))
            if words[1] == "total":
                total = (*figures, int(words[5][:-2]), int(words[6][:-1]))
            else:
                stages[words[1]] = figures
        elif words[0] == "coverage:":
            coverage[words[1]] = (words[2], " ".join(words[3:]))
    return stages, total, coverage


def test_gpu_check_plan_fits_eight_minutes_with_every_stage_within_its_limit():
    stages, total, _ = gpu_check_plan()
    assert list(stages) == [
        "gpu_tests",
        "record_shape",
        "frontier_tiny",
        "official_15s",
        "ours_baseline_15s",
    ]
    est_total, limit_total, budget, reserve = total
    assert est_total == sum(e for e, _ in stages.values())
    assert limit_total == sum(lim for _, lim in stages.values())
    assert budget <= DEVICE_MINUTES_S and limit_total <= budget - reserve
    for name, (estimate, limit) in stages.items():
        assert 0 < estimate <= limit, name


def test_gpu_check_names_every_frontier_flag_and_which_this_checkout_lacks(gpt):
    import dataclasses

    _, _, coverage = gpu_check_plan()
    assert sorted(coverage) == sorted(FRONTIER_FLAGS)
    fields = {f.name.upper() for f in dataclasses.fields(gpt.Hyperparameters)}
    for flag, (state, stages) in coverage.items():
        assert state == ("present" if flag in fields else "PENDING"), flag
        assert state == "present" and stages != "not passed", flag
    # the frontier's existing knobs are fields today; the TTT mask's two forms go to two stages
    for flag in ("QK_GAIN_INIT", "MATRIX_LR", "LQER_GROUP", "TTT_PHASES", "EVAL_SEQ_LEN"):
        assert coverage[flag][0] == "present"
    assert (
        coverage["TTT_MASK"][1] == "frontier_tiny" and coverage["TTT_K_LORA"][1] == "record_shape"
    )


def test_gpu_check_dry_run_checks_every_stage(tmp_path):
    shared = REPO.parent / "shared"
    if not (shared / "anchors" / "official_baseline_train_gpt.py").exists():
        pytest.skip("../shared (the official script and the shards) is not beside the checkout")
    out = run_tool(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        env={"OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    stages, _, _ = gpu_check_plan()
    for name in stages:
        assert f"[dry-run] {name}: ok" in out.stdout, out.stdout[-3000:]
    # the record stage runs the full shape: the preset's 11 x 512 at vocab 8192, no shrinking
    settings = next(ln for ln in out.stdout.splitlines() if "record_shape settings:" in ln)
    assert "PRESET=record" in settings and "realtext_sp8192" in settings
    assert "NUM_LAYERS" not in settings and "MODEL_DIM" not in settings
    assert out.returncode == 0 and "gpu_check: dry run ok" in out.stdout


# A finished run as the checker reads it: the summary line of the text log and the start event.
def fake_run(
    tmp_path, *, artifact_len=1000, code=300, extra=0, audits=None, logged=None, reasons=()
):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "x.pga").write_bytes(b"\0" * artifact_len)
    summary = {
        "val_bpb": 1.5,
        "eval_mode": "ttt_phased",
        "tokens": 100,
        "steps": 3,
        "step_avg_ms": 12.0,
        "time_ledger": {"warmup_excluded_s": 1.0, "serialize_s": 1.0, "eval_s": 1.0},
        "total_bytes": 1000 + code + extra,
        "artifact_bytes": 1000,
        "code_bytes": code,
        "budget_bytes": 16_000_000,
        "artifact_path": "logs/x.pga",
        "model_params": 10,
        "audits": audits or {"bytes": {"passed": True}, "score_first": {"passed": True}},
        "invalid_reasons": list(reasons),
    }
    (tmp_path / "logs" / "x.txt").write_text(f"step:3/3\nsummary: {json.dumps(summary)}\n")
    start = {"event": "start", "hparams": logged or {"matrix_lr": 0.028, "ttt_phases": "8"}}
    (tmp_path / "logs" / "x.jsonl").write_text(json.dumps(start) + "\n")
    return tmp_path


def run_checker(tmp_path, *args):
    checker = tmp_path / "check_run.py"
    made = run_tool(["bash", "scripts/gpu_check.sh", "--write-checker", str(checker)])
    assert made.returncode == 0, made.stderr
    out = subprocess.run(
        [sys.executable, str(checker), "logs/x.txt", "logs/x.jsonl", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("check: "))
    result = json.loads(line[len("check: ") :])
    assert (out.returncode == 0) == result["ok"]
    return result


def test_gpu_check_checker_passes_a_consistent_run_and_lists_pending_flags(tmp_path):
    (tmp_path / "rescore.json").write_text(json.dumps({"val_bpb": 1.5}))
    res = run_checker(
        fake_run(tmp_path),
        "--rescore",
        "rescore.json",
        "--env",
        "MATRIX_LR=0.028",
        "TTT_PHASES=8",
        "TTT_MASK=no_qv",
    )
    assert res["ok"], res["problems"]
    assert res["rescore_diff"] == 0 and res["pending_flags_ignored"] == ["TTT_MASK"]


@pytest.mark.parametrize(
    "case, run, args, problem",
    [
        ("setting not applied", {}, ("--env", "MATRIX_LR=0.026"), "MATRIX_LR=0.026 given"),
        ("short artifact file", {"artifact_len": 999}, (), "not artifact_bytes long"),
        ("bytes do not add up", {"extra": 1}, (), "not artifact_bytes + code_bytes"),
        ("over budget", {"code": 16_000_000}, (), "over budget"),
        (
            "score-first audit failed",
            {"audits": {"score_first": {"passed": False}}, "reasons": ["failed score_first"]},
            (),
            "audits failed",
        ),
        (
            "byte audit failed",
            {"audits": {"bytes": {"passed": False}}, "reasons": ["failed bytes"]},
            (),
            "audits failed",
        ),
        ("re-score disagrees", {}, ("--rescore", "far.json"), "re-score differs"),
    ],
)
def test_gpu_check_checker_names_what_is_wrong(tmp_path, case, run, args, problem):
    (tmp_path / "far.json").write_text(json.dumps({"val_bpb": 1.6}))
    res = run_checker(fake_run(tmp_path, **run), *args)
    assert not res["ok"], case
    assert any(problem in p for p in res["problems"]), (case, res["problems"])
