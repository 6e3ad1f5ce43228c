"""The model kernels of the record stack (CUDA training): the fused Triton up-projection with
LeakyReLU(0.5)^2 (#1530) and the fused softcapped cross-entropy (#1787; asymmetric caps for
AsymLogit, #1945), each with the torch reference it is tested against. train_gpt.py's model uses
them behind FUSED_MLP and FUSED_CE."""

import torch
import torch.nn.functional as F

# --- Fused Triton kernels (CUDA training) and their torch references ----------------------------
# Built on first use, so importing this file needs no Triton and a test can run them on the CPU
# under TRITON_INTERPRET=1 (set before the first call). Everywhere else the same maths runs in
# torch.

_KERNELS = {}


def triton_model_kernels():
    """{name: jitted kernel}: the fused MLP matmul and the softcapped cross-entropy pair. Loop
    bounds (K, the vocabulary) are constexpr: fixed per model, and Triton 3.6's interpreter cannot
    loop over a runtime bound with numpy 2.4."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_leaky2(
        a_ptr,
        b_ptr,
        out_ptr,
        aux_ptr,
        M,
        N,
        K: tl.constexpr,
        stride_am,
        stride_ak,
        stride_bn,
        stride_bk,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FORWARD: tl.constexpr,
    ):
        # C = A @ B^T with B read as (N, K) through its strides. Forward: out = C (the
        # pre-activation, kept for backward), aux = leaky_relu(C, 0.5)^2. Backward: out = C times
        # the activation's derivative at aux = the saved pre-activation (2u, or 0.5u below 0).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(
                a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=(rows[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                b_ptr + cols[None, :] * stride_bn + kk[:, None] * stride_bk,
                mask=(cols[None, :] < N) & (kk[:, None] < K),
                other=0.0,
            )
            acc = tl.dot(a, b, acc)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        if FORWARD:
            act = tl.where(acc > 0, acc, 0.5 * acc)
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(aux_ptr + offs, (act * act).to(aux_ptr.dtype.element_ty), mask=mask)
        else:
            pre = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad = acc * tl.where(pre > 0, 2.0 * pre, 0.5 * pre)
            tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def softcap_ce_fwd(
        logits_ptr,
        targets_ptr,
        loss_ptr,
        lse_ptr,
        caps_ptr,
        n_cols: tl.constexpr,
        stride_row,
        cap,
        BLOCK: tl.constexpr,
        ASYM: tl.constexpr,
    ):
        # One row per program, one streaming pass: z = c tanh(x / c) = c (2 sigmoid(2x / c) - 1)
        # in registers, an online logsumexp, loss = lse - z[target]. c = cap; with ASYM
        # (AsymLogit, #1923) c = caps[0] where x > 0, else caps[1], read from device memory.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        if ASYM:
            cap_pos = tl.load(caps_ptr).to(tl.float32)
            cap_neg = tl.load(caps_ptr + 1).to(tl.float32)
        run_max = -float("inf")
        run_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if ASYM:
                c = tl.where(x > 0, cap_pos, cap_neg)
            else:
                c = cap
            z = c * (2.0 * tl.sigmoid(2.0 * x / c) - 1.0)
            z = tl.where(mask, z, -float("inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        target = tl.load(targets_ptr + row)
        xt = tl.load(base + target).to(tl.float32)
        if ASYM:
            ct = tl.where(xt > 0, cap_pos, cap_neg)
        else:
            ct = cap
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - ct * (2.0 * tl.sigmoid(2.0 * xt / ct) - 1.0))

    @triton.jit
    def softcap_ce_bwd(
        logits_ptr,
        targets_ptr,
        lse_ptr,
        grad_loss_ptr,
        grad_ptr,
        caps_ptr,
        cap_grad_ptr,
        n_cols: tl.constexpr,
        stride_row,
        grad_stride_row,
        cap,
        BLOCK: tl.constexpr,
        ASYM: tl.constexpr,
    ):
        # d loss / dx = g (softmax(z) - onehot(target)) (1 - tanh^2(x / c)); nothing stored in
        # the forward but the row's lse. With ASYM also d loss / dc = g (softmax(z) -
        # onehot(target)) (t - (x / c)(1 - t^2)), summed over the row's positive and negative
        # logits apart into cap_grad[row, 0] and cap_grad[row, 1].
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_loss_ptr + row).to(tl.float32)
        target = tl.load(targets_ptr + row)
        if ASYM:
            cap_pos = tl.load(caps_ptr).to(tl.float32)
            cap_neg = tl.load(caps_ptr + 1).to(tl.float32)
            sum_pos = 0.0
            sum_neg = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if ASYM:
                c = tl.where(x > 0, cap_pos, cap_neg)
            else:
                c = cap
            t = 2.0 * tl.sigmoid(2.0 * x / c) - 1.0
            p = tl.exp(c * t - lse)
            dz = g * (p - tl.where(cols == target, 1.0, 0.0))
            d = dz * (1.0 - t * t)
            tl.store(
                grad_ptr + row * grad_stride_row + cols,
                d.to(grad_ptr.dtype.element_ty),
                mask=mask,
            )
            if ASYM:
                dc = tl.where(mask, dz * (t - (x / c) * (1.0 - t * t)), 0.0)
                sum_pos += tl.sum(tl.where(x > 0, dc, 0.0), axis=0)
                sum_neg += tl.sum(tl.where(x > 0, 0.0, dc), axis=0)
        if ASYM:
            tl.store(cap_grad_ptr + 2 * row, sum_pos)
            tl.store(cap_grad_ptr + 2 * row + 1, sum_neg)

    _KERNELS.update(
        matmul_leaky2=matmul_leaky2, softcap_ce_fwd=softcap_ce_fwd, softcap_ce_bwd=softcap_ce_bwd
    )
    return _KERNELS


def _blocks_for(t):
    """Tile sizes: large tiles on a GPU; small ones under the CPU interpreter (tests)."""
    return (128, 128, 64) if t.is_cuda else (32, 32, 32)


def leaky2_matmul(a, b, b_strides, n, pre=None):
    """Forward (pre=None): (a @ B^T, leaky_relu(a @ B^T, 0.5)^2). Backward: (a @ B^T) times the
    activation's derivative at `pre`. B is (n, K) as seen through `b_strides`."""
    m, k = a.shape
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    forward = pre is None
    aux = torch.empty_like(out) if forward else pre.contiguous()
    bm, bn, bk = _blocks_for(a)
    grid = ((m + bm - 1) // bm, (n + bn - 1) // bn)
    extra = {"num_warps": 8, "num_stages": 3} if a.is_cuda else {}
    triton_model_kernels()["matmul_leaky2"][grid](
        a, b, out, aux, m, n, k, a.stride(0), a.stride(1), *b_strides,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FORWARD=forward, **extra,
    )  # fmt: skip
    return (out, aux) if forward else out


class FusedLeakyReLU2MLP(torch.autograd.Function):
    """down(leaky_relu(up(x), 0.5)^2) with the up-projection and activation in one kernel, and in
    the backward the down-projection's input gradient fused with the activation's derivative
    (PR #1530)."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        x2 = x.reshape(-1, x.size(-1)).contiguous()
        pre, post = leaky2_matmul(x2, w_up, (w_up.stride(0), w_up.stride(1)), w_up.size(0))
        ctx.save_for_backward(x2, w_up, w_down, pre, post)
        ctx.x_shape = x.shape
        return F.linear(post, w_down).view(*x.shape[:-1], w_down.size(0))

    @staticmethod
    def backward(ctx, grad_out):
        x2, w_up, w_down, pre, post = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.size(-1)).contiguous()
        grad_down = g.T @ post
        # d hidden = g @ W_down: W_down (D, H) read as B (H, D) through swapped strides.
        grad_pre = leaky2_matmul(
            g, w_down, (w_down.stride(1), w_down.stride(0)), w_down.size(1), pre
        )
        return (grad_pre @ w_up).view(ctx.x_shape), grad_pre.T @ x2, grad_down


def leaky_relu2_mlp_reference(x, w_up, w_down):
    """The torch maths of FusedLeakyReLU2MLP."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), 0.5).square(), w_down)


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of cap * tanh(logits / cap) in one pass over the raw logits (PR
    #1787): the softcapped logits are never written out. `caps`: None, or AsymLogit's (cap_pos,
    cap_neg) as one fp32 tensor of 2 (#1923), which then replaces `cap` and gets its gradient
    (summed per row in the kernel, over rows here)."""

    @staticmethod
    def forward(ctx, logits, targets, cap, caps=None):
        logits = logits.contiguous()
        targets = targets.contiguous()
        rows, cols = logits.shape
        losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(losses)
        asym = caps is not None
        caps = caps.detach().float().contiguous() if asym else lse  # lse: an unread placeholder
        triton_model_kernels()["softcap_ce_fwd"][(rows,)](
            logits, targets, losses, lse, caps, cols, logits.stride(0), float(cap),
            BLOCK=1024, ASYM=asym,
        )  # fmt: skip
        ctx.save_for_backward(logits, targets, lse, caps)
        ctx.cap = float(cap)
        ctx.asym = asym
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, targets, lse, caps = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows, cols = logits.shape
        cap_grad = torch.zeros(rows, 2, device=logits.device, dtype=torch.float32)
        triton_model_kernels()["softcap_ce_bwd"][(rows,)](
            logits, targets, lse, grad_losses.float().contiguous(), grad, caps, cap_grad, cols,
            logits.stride(0), grad.stride(0), ctx.cap, BLOCK=1024, ASYM=ctx.asym,
        )  # fmt: skip
        return grad, None, None, cap_grad.sum(0) if ctx.asym else None


def softcapped_ce_reference(logits, targets, cap, caps=None):
    """The torch maths of SoftcappedCrossEntropy: per-row losses, fp32."""
    if caps is not None:
        z = asym_softcap(logits.float(), caps[0], caps[1])
    else:
        z = cap * torch.tanh(logits.float() / cap)
    return F.cross_entropy(z, targets, reduction="none")


def asym_softcap(logits, cap_pos, cap_neg):
    """AsymLogit Rescale (#1923): c tanh(z / c) with c = cap_pos where z > 0, else cap_neg; the
    caps are tensors, so both get a gradient (fp32 logits)."""
    cap = torch.where(logits > 0, cap_pos.to(logits.dtype), cap_neg.to(logits.dtype))
    return cap * torch.tanh(logits / cap)
