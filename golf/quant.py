"""Quantization: per-row int-k with Triton kernels and their torch reference, clip selection,
GPTQ, late QAT, bit allocation to the byte budget, LQER corrections, dequantization.
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from golf.config import QUANT_INT_BITS
from golf.contract import is_control_tensor
from golf.data import random_calibration_windows
from golf.runtime import Progress, dist_sum

# dtype name in the header -> (torch dtype, numpy dtype of a "raw" tensor or None for float dtypes)
ARTIFACT_DTYPES = {
    "float32": (torch.float32, None),
    "float16": (torch.float16, None),
    "bfloat16": (torch.bfloat16, None),
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "int16": (torch.int16, np.int16),
    "int8": (torch.int8, np.int8),
    "uint8": (torch.uint8, np.uint8),
    "bool": (torch.bool, np.bool_),
}


# LQER parts of a corrected int tensor: numpy dtype of each
LQER_PARTS = {
    "lqer_a": np.int8,
    "lqer_a_scale": np.float16,
    "lqer_b": np.int8,
    "lqer_b_scale": np.float16,
}


# The byte spans an entry may have, in payload order. awq_scale: the fp16 row scales of an int
# tensor's AWQ-lite column groups (their codes sit in "data" with the others).
ENTRY_PARTS = ("data", "scale", "awq_scale", *LQER_PARTS)


LQER_MAX_RANK = 64


LQER_MAX_GROUP = 4096


CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite candidates (PR #414)
ALLOC_MIN_BITS = (
    5  # the narrowest width the allocator gives a matrix: no record shipped int4 weights
)
TRITON_BLOCK = 1024
_TRITON = None  # the kernels, built on first use
_TRITON_FAILED = False  # a kernel failed to compile or launch: the torch path from then on


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is stored: per-row int-k ("int", 4..8) or a float width ("float", 16 or 32).
    Written as text in the artifact header: "int6", "fp16", "fp32" (tensors that are not floating
    point are stored raw, scheme "raw", and have no QuantScheme)."""

    kind: str
    bits: int

    @classmethod
    def parse(cls, text):
        text = str(text)
        if text in ("fp16", "fp32"):
            return cls("float", int(text[2:]))
        if text.startswith("int") and text[3:] in {str(b) for b in QUANT_INT_BITS}:
            return cls("int", int(text[3:]))
        raise ValueError(f"quant scheme {text!r}: expected one of int4..int8, fp16, fp32")

    def __str__(self):
        return f"int{self.bits}" if self.kind == "int" else f"fp{self.bits}"

    @property
    def is_int(self):
        return self.kind == "int"


# --- per-row int-k: the torch maths is the reference and the CPU path; Triton runs it on GPU ---


def _row_scales(clip, qmax):
    """fp16 c / qmax, or 1 where that is 0 (then every |w| <= c rounds to 0). Rounding divides by
    this stored s."""
    scale = (clip / qmax).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_clamp(w, c, s, qmax):
    """q = round(clamp(w, -c, c) / s) in [-qmax, qmax]: the one rounding rule of this block."""
    return torch.clamp(w, -c, c).div_(s).round_().clamp_(-qmax, qmax)


def _triton_kernels():
    """(triton, quantize kernel, dequantize kernel), built on first use and not at import:
    @triton.jit reads the source file, which an exec'd or minified script lacks. None where
    Triton is missing."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl

            @triton.jit
            def quant(w_ptr, clip_ptr, scale_ptr, q_ptr, n_cols, qmax, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                c = tl.load(clip_ptr + row)
                s = tl.load(scale_ptr + row).to(tl.float32)
                w = tl.load(w_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
                x = tl.math.div_rn(tl.minimum(tl.maximum(w, -c), c), s)  # IEEE division, as torch
                # Adding and subtracting 1.5 * 2^23 rounds half to even, as torch.round (|x| <
                # 2^22).
                x = (x + 12582912.0) - 12582912.0
                q = tl.minimum(tl.maximum(x, -qmax), qmax)
                tl.store(q_ptr + row * n_cols + cols, q.to(tl.int8), mask=cols < n_cols)

            @triton.jit
            def dequant(q_ptr, scale_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
                q = tl.load(q_ptr + row * n_cols + cols, mask=cols < n_cols, other=0).to(tl.float32)
                s = tl.load(scale_ptr + row).to(tl.float32)
                tl.store(out_ptr + row * n_cols + cols, q * s, mask=cols < n_cols)

            _TRITON = (triton, quant, dequant)
        except ImportError:
            _TRITON = False
        except Exception as exc:  # Triton present but broken: one line, then the torch path
            _kernel_failed(exc)
    return _TRITON or None


def _use_triton(use_triton, t):
    """An explicit choice, or (None) the kernel for CUDA tensors when Triton is present."""
    if use_triton is not None:
        return use_triton
    return t.is_cuda and _triton_kernels() is not None


def _kernel_failed(exc):
    """Triton compiles a kernel on its first launch, so a GPU, driver or Triton version it does not
    support fails there: say so in one line, once, and use the torch path from then on."""
    global _TRITON, _TRITON_FAILED
    if not _TRITON_FAILED:
        print(
            f"quant: Triton kernel failed ({type(exc).__name__}: {exc}); using the torch path",
            file=sys.stderr,
        )
    _TRITON_FAILED = True
    _TRITON = False


def _launch_quant(w, clip, scale, qmax):
    triton, quant, _ = _triton_kernels()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    quant[(w.shape[0], triton.cdiv(w.shape[1], TRITON_BLOCK))](
        w, clip, scale, q, w.shape[1], qmax, BLOCK=TRITON_BLOCK
    )
    return q


def _launch_dequant(q, scale):
    triton, _, dequant = _triton_kernels()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dequant[(q.shape[0], triton.cdiv(q.shape[1], TRITON_BLOCK))](
        q.contiguous(), scale.contiguous(), out, q.shape[1], BLOCK=TRITON_BLOCK
    )
    return out


def quantize_rows(w, bits, clip, use_triton=None):
    """Per-row symmetric int-k: q = round(clamp(w, -c, c) / s), s = c / qmax stored as fp16. Returns
    (q int8, s fp16). An explicit use_triton=True (the kernel tests) lets a kernel failure raise;
    the automatic choice falls back to the torch maths (_kernel_failed)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float().contiguous()
    clip = clip.float().clamp_min(0).contiguous()
    scale = _row_scales(clip, qmax)
    if _use_triton(use_triton, w) and not (use_triton is None and _TRITON_FAILED):
        try:
            return _launch_quant(w, clip, scale, qmax), scale
        except Exception as exc:
            if use_triton:
                raise
            _kernel_failed(exc)
    return _round_clamp(w, clip[:, None], scale.float()[:, None], qmax).to(torch.int8), scale


def dequantize_rows(q, scale, use_triton=None):
    if _use_triton(use_triton, q) and not (use_triton is None and _TRITON_FAILED):
        try:
            return _launch_dequant(q, scale)
        except Exception as exc:
            if use_triton:
                raise
            _kernel_failed(exc)
    return q.float() * scale.float()[:, None]


# --- clip selection -----------------------------------------------------------------------------


def tensor_role(name):
    """embed, mlp, attn or other: which SD-clip k and which default width a tensor gets."""
    if "emb" in name or "lm_head" in name:
        return "embed"
    if "mlp" in name:
        return "mlp"
    if "attn" in name:
        return "attn"
    return "other"


def sdclip_k(name, h):
    """SD-clip k by role (#1855: MLP 11.5, attention 13.0, other 12.85, embedding 14.0)."""
    return {
        "embed": h.sdclip_k_embed,
        "mlp": h.sdclip_k_mlp,
        "attn": h.sdclip_k_attn,
    }.get(tensor_role(name), h.sdclip_k_other)


def is_gate(name, t, h):
    """A 2-D control gate stored int8 per row under GATE_INT8 (#1736/#1855 ship their gates so)."""
    return (
        h.gate_int8
        and t.ndim == 2
        and is_control_tensor(name, h.spec.control_patterns)
        and "gate" in name
    )


def row_clip(w, bits, h, name=""):
    """Per-row clip by CLIP_METHOD. sdclip: c = k * std(row), uncapped, so k sets the bits a row
    costs (PR #1394); search: per row, the quantile of |w| whose int-k roundtrip has the least
    squared error."""
    if h.clip_method == "sdclip":
        return sdclip_k(name, h) * w.std(dim=1, correction=0)
    if h.clip_method == "percentile":  # the baseline's INT8_CLIP_PERCENTILE
        return torch.quantile(w.abs(), min(h.int8_clip_percentile / 100.0, 1.0), dim=1)
    cands = torch.quantile(w.abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1)
    errs = torch.stack(
        [(dequantize_rows(*quantize_rows(w, bits, c)) - w).square().sum(1) for c in cands]
    )
    return cands.gather(0, errs.argmin(0, keepdim=True))[0]


# --- GPTQ (Frantar et al. 2022): calibration Hessians, then error-compensated rounding ----------


def _block_linears(model):
    return [
        (f"{n}.weight", m)
        for n, m in model.named_modules()
        if n.startswith("blocks.") and isinstance(m, nn.Linear)
    ]


def _head_input(model):
    """(param name, module, whether the head's input is the module's output) of the output head:
    an untied lm_head reads its input; a tied embedding is read by the head on the output of
    final_norm. None where the model has neither (then the embedding gets no Hessian)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        return "lm_head.weight", head, False
    norm = getattr(model, "final_norm", None)
    if isinstance(norm, nn.Module) and hasattr(model, "tok_emb"):
        return "tok_emb.weight", norm, True
    return None


@torch.no_grad()
def collect_hessians(model, batches, embed=False):
    """{param name: H = X^T X / tokens} for every nn.Linear under `blocks.` (and, with embed, for
    the output head's weight from the head's input: GPTQ on the tied embedding, #1394/#1855),
    from forward hooks while the model reads `batches` (input id tensors); summed over ranks.
    Pass the bare model, not a compiled or DDP wrapper."""
    sums = {}
    count = torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device

    def hook(module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[module] = x.T @ x + sums.get(module, 0.0)

    def out_hook(module, inputs, output):
        x = output.detach().reshape(-1, output.shape[-1]).float()
        sums[module] = x.T @ x + sums.get(module, 0.0)

    linears = _block_linears(model)
    hooks = [m.register_forward_hook(hook) for _, m in linears]
    head = _head_input(model) if embed else None
    if head is not None:
        linears.append(head[:2])
        hooks.append(head[1].register_forward_hook(out_hook if head[2] else hook))
    progress = Progress("gptq calibration", len(batches), state="calibrating")
    try:
        for x in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model.forward_logits(x.to(device))
            count += x.numel()
            progress.advance()
    finally:
        progress.close()
        for hk in hooks:
            hk.remove()
    count = float(dist_sum(count.to(device)))
    return {name: dist_sum(sums[m]) / count for name, m in linears if m in sums}


@torch.no_grad()
def generate_calibration_tokens(model, n_seqs, seq_len, vocab_size, temperature=0.8, seed=0):
    """Sample from the model itself, from a random first token (self-generated calibration: legal
    and about as good as training data, PR #1019). No KV cache: the cost grows with seq_len
    squared."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n_seqs, 1), generator=g, device=device)
    for _ in range(seq_len - 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.forward_logits(tokens)[:, -1].float()
        tokens = torch.cat(
            [tokens, torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)], 1
        )
    return tokens


def calibration_batch_rows(h):
    """Sequences in one calibration batch: a training-loader batch's rows (TRAIN_BATCH_TOKENS / 8
    tokens; world size x grad accum is 8), so random windows run in batches of the size the
    `train` source reads and the measured reserve's batch count holds for both."""
    return max(1, h.train_batch_tokens // (8 * h.train_seq_len))


def gptq_calibrate(model, h, next_batch=None):
    """Hessians from GPTQ_CALIB_SEQS sequences split over the ranks (each takes
    max(1, GPTQ_CALIB_SEQS // world)): training data (`next_batch()` returns an (x, y) batch),
    self-generated samples (GPTQ_CALIB_SOURCE=self) or random windows of this rank's training
    shards (GPTQ_CALIB_SOURCE=random, #2135; golf/data.py random_calibration_windows). It counts
    against the 600 s training clock (docs/rules.md, Training clock): run it inside
    GPTQ_RESERVE_SECONDS."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = max(1, h.gptq_calib_seqs // world)
    seqs = []
    if h.gptq_calib_source == "self":
        seqs = list(
            generate_calibration_tokens(
                model, n, h.train_seq_len, h.vocab_size, 0.8, h.seed + rank
            ).split(8)
        )
    if h.gptq_calib_source == "random":
        windows = random_calibration_windows(
            h.data_path, n, h.train_seq_len, rank, world, h.vocab_size
        )
        seqs = list(windows[:, :-1].contiguous().split(calibration_batch_rows(h)))
    while sum(x.shape[0] for x in seqs) < n:
        seqs.append(next_batch()[0][: n - sum(x.shape[0] for x in seqs)])
    return collect_hessians(model, seqs, embed=h.gptq_embed)


def gptq_quantize(w, H, bits, clip, block=128, damp=0.01, protect=None, protect_bits=8):
    """Columns in order of decreasing Hessian diagonal; each one's rounding error / pivot goes onto
    the columns not yet rounded through the upper Cholesky factor of the damped inverse Hessian
    (lazy batch updates: blocks of `block` columns, the rest of the matrix updated once per block
    by one matmul). Row scales are fixed from `clip`. protect: (column starts, group size) of
    AWQ-lite groups, rounded at `protect_bits` on the same clip with their own row scales inside
    the same loop, so their (smaller) error still propagates (#1945). Returns (q, scale), plus
    the groups' row scales where protect is given."""
    W = w.float().clone()
    H = H.float().clone()
    c = clip.float().clamp_min(0)
    qmax = 2 ** (bits - 1) - 1
    scale = _row_scales(c, qmax)
    s = scale.float()
    wide = torch.zeros(W.shape[1], dtype=torch.bool)
    if protect:
        starts, size = protect
        for start in starts:
            wide[start : start + size] = True
        qmax_hi = 2 ** (protect_bits - 1) - 1
        scale_hi = _row_scales(c, qmax_hi)
        s_hi = scale_hi.float()
    diag = torch.diagonal(H)
    diag[diag <= 0] = (
        1.0  # a column never seen in calibration: plain rounding, no error spread onto it
    )
    order = torch.argsort(diag, descending=True, stable=True)
    wide = wide[order.cpu()].tolist()
    W = W[:, order]
    H = H[order][:, order]
    H += torch.eye(H.shape[0], device=H.device) * (damp * diag.mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i0 in range(0, W.shape[1], block):
        i1 = min(i0 + block, W.shape[1])
        Wb = W[:, i0:i1].clone()
        Eb = torch.zeros(W.shape[0], i1 - i0, device=W.device)
        for j in range(i1 - i0):
            if wide[i0 + j]:
                q = _round_clamp(Wb[:, j], c, s_hi, qmax_hi)
                err = (Wb[:, j] - q * s_hi) / U[i0 + j, i0 + j]
            else:
                q = _round_clamp(Wb[:, j], c, s, qmax)
                err = (Wb[:, j] - q * s) / U[i0 + j, i0 + j]
            Q[:, i0 + j] = q
            Eb[:, j] = err
            Wb[:, j:] -= err[:, None] * U[i0 + j, i0 + j : i1][None, :]
        W[:, i1:] -= Eb @ U[i0:i1, i1:]
    q = Q[:, torch.argsort(order)].to(torch.int8).contiguous()
    if protect:
        return q, scale, scale_hi
    return q, scale


# --- AWQ-lite (#1945): the most salient column groups of the model kept at int8 inside GPTQ ---


def awq_group_saliency(w, H, group):
    """Saliency of each whole `group`-column group: per input column the activation RMS (the
    calibration Hessian's diagonal is the mean x^2) times mean |W| over the column, summed over
    the group (float64). A tail narrower than a group is no candidate, as in #1945."""
    act_rms = torch.diagonal(H).double().clamp_min(0).sqrt()
    col = act_rms.cpu() * w.detach().double().abs().mean(0).cpu()
    n_groups = w.shape[1] // group
    return col[: n_groups * group].reshape(n_groups, group).sum(1)


def awq_select(state, h, hessians, bits=None):
    """{name: sorted column starts} of the AWQ_LITE_GROUP_TOP_K most salient groups over all int
    matrices with a Hessian stored narrower than AWQ_LITE_BITS. One ranking over the whole model,
    as #1945/#1953 rank their candidates (TOP_K=1: a single group in the model); ties go to the
    first name and column."""
    if not (h.awq_lite_enabled and hessians):
        return {}
    cands = []
    for name in sorted(state):
        t = state[name]
        scheme = tensor_plan(name, t, h, bits)
        if not _is_int(scheme) or name not in hessians or scheme.bits >= h.awq_lite_bits:
            continue
        scores = awq_group_saliency(t, hessians[name], h.awq_lite_group_size)
        cands += [(-float(v), name, g * h.awq_lite_group_size) for g, v in enumerate(scores)]
    chosen = {}
    for _, name, start in sorted(cands)[: h.awq_lite_group_top_k]:
        chosen.setdefault(name, []).append(start)
    return {name: sorted(starts) for name, starts in chosen.items()}


def dequantize_awq(q, scale, awq_scale=None, starts=(), group=0):
    """W_hat of per-row int codes whose AWQ-lite groups (columns start..start+group) use their
    own row scales."""
    t = dequantize_rows(q, scale)
    for start in starts:
        t[:, start : start + group] = (
            q[:, start : start + group].float() * awq_scale.float()[:, None]
        )
    return t


# --- late QAT: a straight-through fake quant in the forward of every quantized block matrix -----


def _qat_linear_forward(self, x):
    """Per-row int-k roundtrip with fp16 scales, clipped at max |w| (or k * std(row) under SD-clip);
    the forward sees it when qat_on is 1 and the gradient passes straight through to the fp32
    weight."""
    w = self.weight
    wd = self.weight.detach().float()
    if self.qat_k > 0:
        c = (self.qat_k * wd.std(dim=1, correction=0))[:, None]
    else:
        c = wd.abs().amax(dim=1)[:, None]
    s = _row_scales(c, self.qat_qmax).float()
    w = w + self.qat_on * (_round_clamp(wd, c, s, self.qat_qmax) * s - wd).to(w.dtype)
    return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def enable_qat(model, h):
    """Fake-quant forward for every quantized nn.Linear under `blocks.`, off until set_qat. Switch
    and width are buffers: torch.compile constant-folded #315's class-attribute flag. Call before
    compile; state_dict keys are unchanged."""
    qmax = 2 ** ((h.qat_bits or h.quant_bits) - 1) - 1
    mods = [(n, m) for n, m in _block_linears(model) if m.weight.numel() > h.keep_float_max_numel]
    for name, m in mods:
        m.register_buffer("qat_on", torch.zeros((), device=m.weight.device), persistent=False)
        m.register_buffer(
            "qat_qmax", torch.tensor(float(qmax), device=m.weight.device), persistent=False
        )
        m.qat_k = sdclip_k(name, h) if h.clip_method == "sdclip" else 0.0
        m.forward = _qat_linear_forward.__get__(m)
    return len(mods)


def set_qat(model, on):
    """Switch the fake quant of enable_qat on or off: a buffer write, no recompile. Returns `on`."""
    for m in model.modules():
        if hasattr(m, "qat_on"):
            m.qat_on.fill_(float(on))
    return on


def qat_step_hook(model, h, progress):
    """Switch QAT on (and return True) once training progress (0..1) reaches QAT_START_FRAC > 0."""
    return h.qat_start_frac > 0 and progress >= h.qat_start_frac and set_qat(model, True)


# --- bit allocation -----------------------------------------------------------------------------


def tensor_plan(name, t, h, bits=None):
    """The QuantScheme of one tensor, or None for a tensor stored raw (not floating point). Large
    matrices: int-k with k = bits[name], else EMBED_BITS (embeddings) or QUANT_BITS; control tensors
    fp32; every other float tensor fp16."""
    if not t.is_floating_point():
        return None
    if is_gate(name, t, h):
        return QuantScheme("int", 8)
    if t.ndim == 2 and t.numel() > h.keep_float_max_numel:
        default = h.embed_bits if tensor_role(name) == "embed" else h.quant_bits
        return QuantScheme("int", (bits or {}).get(name) or default)
    control = is_control_tensor(name, h.spec.control_patterns)
    return QuantScheme("float", 32 if control else 16)


def _is_int(scheme):
    return scheme is not None and scheme.is_int


def width_table(state, h, hessians=None, cache=None):
    """{name: {bits: (est. bytes, est. error)}}, bits from ALLOC_MIN_BITS (EMBED_BITS for the
    embedding) to 8. Bytes: order-0 entropy of the codes + 2 per row scale (zstd-22 within ~1%, lzma
    ~3-7%). Error: the squared roundtrip error; tr(E H E^T) / mean diag(H) where a Hessian is known,
    to keep sum-of-squares units."""
    table = {}
    for name in sorted(state):
        t = state[name].detach().float()
        if not _is_int(tensor_plan(name, t, h)):
            continue
        H = (hessians or {}).get(name)
        table[name] = {}
        clip = None if h.clip_method == "search" else row_clip(t, 8, h, name)
        min_bits = h.embed_bits if tensor_role(name) == "embed" else ALLOC_MIN_BITS
        if is_gate(name, t, h):
            min_bits = 8  # a few hundred bytes: never worth a narrower width
        for bits in range(min_bits, 9):
            q, scale = quantize_rows(t, bits, row_clip(t, bits, h, name) if clip is None else clip)
            if cache is not None and H is None:
                cache[(name, QuantScheme("int", bits))] = (q, scale)
            e = t - dequantize_rows(q, scale)
            if H is not None:
                err = ((e @ H) * e).sum() / torch.diagonal(H).mean().clamp_min(1e-12)
            else:
                err = e.square().sum()
            p = torch.bincount(q.flatten().view(torch.uint8), minlength=256).double() / q.numel()
            entropy_bits = float(-(p * p.clamp_min(1e-30).log2()).sum())
            table[name][bits] = (entropy_bits * q.numel() / 8 + 2 * len(t), float(err))
    return table


def _fixed_bytes(state, h, code_bytes):
    """Bytes the allocator cannot trade: the code, the header (estimated) and the float tensors."""
    float_bytes = 0
    for name, t in state.items():
        scheme = tensor_plan(name, t, h)
        if scheme is None:
            float_bytes += t.numel() * t.element_size()
        elif not scheme.is_int:
            float_bytes += t.numel() * scheme.bits // 8
    lqer_bytes = 0
    if h.lqer_rank > 0:  # at most top_k factor pairs, their int8 containers as the upper bound
        sides = [sum(t.shape) for n, t in state.items() if _is_int(tensor_plan(n, t, h))]
        lqer_bytes = h.lqer_top_k * h.lqer_rank * max(sides, default=0)
    awq_bytes = 0
    if h.awq_lite_enabled:  # each group: its codes at a full byte each (an upper bound on what
        # they add over the planned width) and an fp16 row scale
        rows = [t.shape[0] for n, t in state.items() if _is_int(tensor_plan(n, t, h))]
        awq_bytes = h.awq_lite_group_top_k * (h.awq_lite_group_size + 2) * max(rows, default=0)
    return code_bytes + 4096 + 200 * len(state) + float_bytes + lqer_bytes + awq_bytes


def plan_bits(state, h, code_bytes, hessians=None, table=None, ratio=1.0):
    """Widths that fit SIZE_BUDGET - SIZE_MARGIN, code counted: from 8 bits, lower step by step the
    tensor whose step adds the least error per byte saved. ratio: compressed bytes per estimated
    byte. Returns [{name, bits, bytes, est_error}]."""
    table = width_table(state, h, hessians) if table is None else table
    budget = h.size_budget - h.size_margin - _fixed_bytes(state, h, code_bytes)
    bits = {n: max(row) for n, row in table.items()}
    total = ratio * sum(table[n][b][0] for n, b in bits.items())
    while total > budget:
        steps = []  # (added error per byte saved, name) of every tensor that can go one bit lower
        for n, row in table.items():
            if bits[n] - 1 in row:
                added_error = row[bits[n] - 1][1] - row[bits[n]][1]
                saved_bytes = max(row[bits[n]][0] - row[bits[n] - 1][0], 1.0)
                steps.append((added_error / saved_bytes, n))
        if not steps:
            raise RuntimeError(
                f"SIZE_BUDGET={h.size_budget}: the model does not fit even at the narrowest widths "
                f"({int(total)} estimated bytes for {int(budget)} available)"
            )
        n = min(steps)[1]
        total -= ratio * (table[n][bits[n]][0] - table[n][bits[n] - 1][0])
        bits[n] -= 1
    return [
        {"name": n, "bits": b, "bytes": int(ratio * table[n][b][0]), "est_error": table[n][b][1]}
        for n, b in sorted(bits.items())
    ]


def _quantized(name, t, scheme, h, hessians, cache, protect=()):
    """(q, scale) of one int tensor, from cache or made: the CLIP_METHOD clip, then GPTQ given a
    Hessian, else plain rounding. protect: AWQ-lite column starts (then (q, scale, awq scale))."""
    key = (name, scheme, tuple(protect)) if protect else (name, scheme)
    if key not in cache:
        H = (hessians or {}).get(name)
        clip = row_clip(t.float(), scheme.bits, h, name)
        if protect:
            cache[key] = gptq_quantize(
                t,
                H,
                scheme.bits,
                clip,
                protect=(protect, h.awq_lite_group_size),
                protect_bits=h.awq_lite_bits,
            )
        elif H is not None:
            cache[key] = gptq_quantize(t, H, scheme.bits, clip)
        else:
            cache[key] = quantize_rows(t, scheme.bits, clip)
    return cache[key]


def quantize_state_dict(state, h, bits=None, hessians=None, cache=None):
    """Returns (tensor entries for the header, raw payload bytes). `bits` overrides widths per
    tensor; tensors with a Hessian go through GPTQ (with AWQ-lite groups under AWQ_LITE_ENABLED);
    `cache` keeps quantized tensors across calls."""
    entries = []
    chunks = []
    offset = 0
    cache = {} if cache is None else cache
    quantized = {}
    awq = awq_select(state, h, hessians, bits)
    for name in sorted(state):
        scheme = tensor_plan(name, state[name], h, bits)
        if scheme is not None and scheme.is_int:
            quantized[name] = _quantized(
                name, state[name].detach(), scheme, h, hessians, cache, awq.get(name, ())
            )
    lqer = lqer_corrections(state, h, quantized, awq)
    for name in sorted(state):
        t = state[name].detach()
        scheme = tensor_plan(name, t, h, bits)
        entry = {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "scheme": "raw" if scheme is None else str(scheme),
        }
        if scheme is None:
            parts = {"data": t}
        elif scheme.is_int:
            H = (hessians or {}).get(name)
            entry["method"] = "gptq" if H is not None else h.clip_method
            parts = dict(zip(("data", "scale", "awq_scale"), quantized[name]))
            if name in awq:
                entry["awq_bits"] = h.awq_lite_bits
                entry["awq_group"] = h.awq_lite_group_size
                entry["awq_starts"] = awq[name]
        else:
            parts = {"data": t.to(torch.float16 if scheme.bits == 16 else torch.float32)}
        if scheme is not None and scheme.is_int and name in lqer:
            entry["lqer_rank"] = h.lqer_rank
            entry["lqer_group"] = h.lqer_group
            parts.update(lqer[name])
        for key, part in parts.items():
            blob = part.detach().cpu().contiguous().numpy().tobytes()
            entry[key] = [offset, len(blob)]
            chunks.append(blob)
            offset += len(blob)
        entries.append(entry)
    return entries, b"".join(chunks)


# --- LQER asym (#1797/#1851/#1855): a low-rank correction of the worst quantization residuals ----


FP16_TINY = torch.finfo(torch.float16).tiny  # the smallest normal fp16 scale


def lqer_factors(err, rank, group):
    """E ~ A B with A (rows x rank) INT2 in [-2, 1] with one fp16 scale and B (rank x cols) INT4
    in [-8, 7] with an fp16 scale per `group` columns. A comes from the rank-r SVD (U sqrt(S));
    B is refitted by least squares to the quantized A before it is quantized itself, so B absorbs
    A's coarse rounding. Returns {part: tensor} as stored."""
    U, S, _ = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(rank, len(S))
    a = (U[:, :r] * S[:r].sqrt()).float()
    # Scales are stored fp16: clamp after the cast, where 1e-8 would round to 0 and a zero error
    # (an untrained zero-init matrix) would divide by it (issue 24, a shrunk record preset).
    a_scale = (a.abs().amax() / 2).to(torch.float16).clamp_min(FP16_TINY)
    qa = torch.clamp(torch.round(a / a_scale.float()), -2, 1)
    a_hat = qa * a_scale.float()
    b = torch.linalg.lstsq(a_hat.double(), err.double()).solution.float()
    if r < rank:  # a matrix narrower than the rank: pad with zero factors
        qa = F.pad(qa, (0, rank - r))
        b = F.pad(b, (0, 0, 0, rank - r))
    cols = b.shape[1]
    n_groups = -(-cols // group)
    bp = F.pad(b, (0, n_groups * group - cols)).reshape(rank, n_groups, group)
    b_scale = (bp.abs().amax(-1) / 7).to(torch.float16).clamp_min(FP16_TINY)
    qb = torch.clamp(torch.round(bp / b_scale.float()[..., None]), -8, 7)
    return {
        "lqer_a": qa.to(torch.int8).contiguous(),
        "lqer_a_scale": a_scale.reshape(1),
        "lqer_b": qb.reshape(rank, -1)[:, :cols].to(torch.int8).contiguous(),
        "lqer_b_scale": b_scale.contiguous(),
    }


def lqer_product(parts, rank, group, shape):
    """A_hat B_hat (float32, `shape`) of stored LQER parts."""
    rows, cols = shape
    a = parts["lqer_a"].float().reshape(rows, rank) * parts["lqer_a_scale"].float()
    n_groups = -(-cols // group)
    b = F.pad(parts["lqer_b"].float().reshape(rank, cols), (0, n_groups * group - cols))
    b = b.reshape(rank, n_groups, group) * parts["lqer_b_scale"].float().reshape(rank, n_groups, 1)
    return a @ b.reshape(rank, -1)[:, :cols]


def lqer_corrections(state, h, quantized, awq=None):
    """{name: LQER parts} for the LQER_TOP_K int tensors with the largest ||W - W_hat||_F, fitted
    on the final residual (AWQ-lite groups included). quantized: {name: (q, scale[, awq scale])}
    of the int tensors; awq: {name: column starts}."""
    if h.lqer_rank <= 0:
        return {}
    errs = {}
    for name, parts in quantized.items():
        starts = (awq or {}).get(name, ())
        w_hat = dequantize_awq(
            *(p.cpu() for p in parts), starts=starts, group=h.awq_lite_group_size
        )
        errs[name] = state[name].detach().float().cpu() - w_hat
    top = sorted(errs, key=lambda n: -float(errs[n].norm()))[: h.lqer_top_k]
    return {n: lqer_factors(errs[n], h.lqer_rank, h.lqer_group) for n in top}


def dequantize_entries(entries, raw):
    """The state dict of the header's tensor entries over the decompressed payload (entries checked
    by check_artifact_header, or made by quantize_state_dict)."""
    state = {}
    for e in entries:
        off, n = e["data"]
        dtype, raw_np_dtype = ARTIFACT_DTYPES[e["dtype"]]
        scheme = None if e["scheme"] == "raw" else QuantScheme.parse(e["scheme"])
        if scheme is None:
            np_dtype = raw_np_dtype
        elif scheme.is_int:
            np_dtype = np.int8
        else:
            np_dtype = np.float16 if scheme.bits == 16 else np.float32
        t = torch.from_numpy(np.frombuffer(raw[off : off + n], np_dtype).copy())
        if _is_int(scheme):
            scale_off, scale_n = e["scale"]
            scale_raw = raw[scale_off : scale_off + scale_n]
            scale = torch.from_numpy(np.frombuffer(scale_raw, np.float16).copy())
            awq_scale = None
            if "awq_starts" in e:
                awq_off, awq_n = e["awq_scale"]
                awq_raw = raw[awq_off : awq_off + awq_n]
                awq_scale = torch.from_numpy(np.frombuffer(awq_raw, np.float16).copy())
            t = dequantize_awq(
                t.reshape(e["shape"]),
                scale,
                awq_scale,
                e.get("awq_starts", ()),
                e.get("awq_group", 0),
            )
            if "lqer_rank" in e:
                parts = {}
                for part, np_type in LQER_PARTS.items():
                    p_off, p_n = e[part]
                    parts[part] = torch.from_numpy(
                        np.frombuffer(raw[p_off : p_off + p_n], np_type).copy()
                    )
                t = t + lqer_product(parts, e["lqer_rank"], e["lqer_group"], e["shape"])
        state[e["name"]] = t.reshape(e["shape"]).to(dtype)
    return state
