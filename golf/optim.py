"""Optimizers: Muon (Newton-Schulz orthogonalized momentum), the learning-rate schedule, EMA."""

import torch
import torch.distributed as dist

# Muon (modded-nanogpt; Keller Jordan): momentum, Nesterov, then orthogonalize the update with a
# quintic Newton-Schulz iteration. Decoupled weight decay (PR #65 lineage) and MuonEq-R row
# normalization of the update before orthogonalization (PR #1260) are options. Parameters are split
# round-robin over ranks and the updates all-reduced, so each rank orthogonalizes only its share.
# EMA of weights (PR #287).

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932; PR #1344, used by #1787 and #1855): one
# minimax-optimal (a, b, c) per iteration instead of one fixed triple. The first steps grow small
# singular values fast, the last ones settle them near 1. Values as published in PR #1344.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz_coeffs(steps, polar_express=False):
    """The (a, b, c) of each of `steps` iterations. Polar Express past its 5 tuples repeats the
    last one, which only keeps converged singular values near 1."""
    if not polar_express:
        return [NS_COEFFS] * steps
    table = list(POLAR_EXPRESS_COEFFS[:steps])
    return table + [POLAR_EXPRESS_COEFFS[-1]] * (steps - len(table))


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, polar_express=False):
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for a, b, c in newton_schulz_coeffs(steps, polar_express):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """`polar_express` may also be set per parameter group (the model's `param_groups` does)."""

    def __init__(
        self,
        params,
        lr,
        momentum,
        backend_steps=5,
        nesterov=True,
        weight_decay=0.0,
        row_norm=False,
        polar_express=False,
        orthogonalize=None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            row_norm=row_norm,
            polar_express=polar_express,
        )
        super().__init__(params, defaults)
        # zeropower_via_newtonschulz5, or its torch.compile'd form on CUDA (the official script
        # compiles it: one graph per matrix shape).
        self.orthogonalize = orthogonalize or zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(
                sum(p.numel() for p in params),
                device=params[0].device,
                dtype=torch.bfloat16 if params[0].is_cuda else torch.float32,
            )
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(group["momentum"]).add_(g)
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if group["row_norm"]:
                        g = g / (g.norm(dim=-1, keepdim=True) + 1e-7)
                    g = self.orthogonalize(
                        g, steps=group["backend_steps"], polar_express=group["polar_express"]
                    )
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    updates[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(
                    updates[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"]
                )
                offset += p.numel()


def lr_multiplier(h, step, elapsed_ms):
    """LR scale in [MIN_LR, 1]. WARMDOWN_FRAC > 0: linear decay over the last fraction of the
    wallclock budget (or of ITERATIONS when uncapped). Otherwise the baseline: the warmdown lasts
    WARMDOWN_ITERS x the mean step time so far. MIN_LR is a floor, max(schedule, MIN_LR), as the
    records define it (#1787, #1855): the decay keeps its slope and stops at the floor. With
    MIN_LR=0 (the baseline) the schedule is unchanged."""
    cap_ms = 1000.0 * h.max_wallclock_seconds
    if h.warmdown_frac > 0:
        progress = elapsed_ms / cap_ms if cap_ms > 0 else step / h.iterations
        progress = max(progress, step / h.iterations)
        x = min(1.0, max(0.0, (1.0 - progress) / h.warmdown_frac))
    elif cap_ms <= 0:
        start = max(h.iterations - h.warmdown_iters, 0)
        x = 1.0 if step < start else max(h.iterations - step, 0) / max(h.warmdown_iters, 1)
    else:
        warmdown_ms = h.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        x = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(x, h.min_lr)


def muon_momentum_at(h, step):
    """Linear warmup of Muon's momentum from MUON_MOMENTUM_WARMUP_START over its warmup steps."""
    frac = 1.0
    if h.muon_momentum_warmup_steps > 0:
        frac = min(step / h.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


class EMA:
    """theta_bar <- d_t * theta_bar + (1 - d_t) * theta after every step, in fp32; the EMA is what
    gets saved. d_t = min(d, (1 + t) / (10 + t)) so that a short run is not dominated by its
    random initialization."""

    def __init__(self, model, decay):
        self.decay = decay
        self.updates = 0
        state = model.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.shadow = [state[k].detach().float().clone() for k in self.names]

    @torch.no_grad()
    def update(self, model):
        state = model.state_dict()
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(
            self.shadow, [state[k].detach().float() for k in self.names], 1.0 - decay
        )

    def state_dict(self, model):
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for k, v in zip(self.names, self.shadow):
            out[k] = v.to(out[k].dtype)
        return out
