"""An independent, functional reference of the official naive baseline forward pass (the official
baseline), written from the specification and not from train_gpt.py: it reads a plain state_dict and
computes the mean cross-entropy. Tests check that train_gpt.py's `baseline` model loads such a
state_dict with strict=True and gives the same loss."""

import math

import torch
import torch.nn.functional as F

# parameter name pattern -> shape, for layers N = 0..8 (the official baseline's table)
BASELINE_SHAPES = {
    "tok_emb.weight": (1024, 512),
    "skip_weights": (4, 512),
    "blocks.{n}.attn.c_q.weight": (512, 512),
    "blocks.{n}.attn.c_k.weight": (256, 512),
    "blocks.{n}.attn.c_v.weight": (256, 512),
    "blocks.{n}.attn.proj.weight": (512, 512),
    "blocks.{n}.attn.q_gain": (8,),
    "blocks.{n}.mlp.fc.weight": (1024, 512),
    "blocks.{n}.mlp.proj.weight": (512, 1024),
    "blocks.{n}.attn_scale": (512,),
    "blocks.{n}.mlp_scale": (512,),
    "blocks.{n}.resid_mix": (2, 512),
}


def baseline_state_shapes(num_layers=9):
    shapes = {}
    for key, shape in BASELINE_SHAPES.items():
        for n in range(num_layers if "{n}" in key else 1):
            shapes[key.format(n=n)] = shape
    return shapes


def random_state(shapes, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(shape, generator=g) * scale + (1.0 if len(shape) == 1 else 0.0)
        for k, shape in shapes.items()
    }


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _rope(x, base=10000.0):
    T, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)


def _attention(x, sd, p, heads, kv_heads):
    B, T, D = x.shape
    hd = D // heads
    q = (x @ sd[p + "c_q.weight"].T).view(B, T, heads, hd).transpose(1, 2)
    k = (x @ sd[p + "c_k.weight"].T).view(B, T, kv_heads, hd).transpose(1, 2)
    v = (x @ sd[p + "c_v.weight"].T).view(B, T, kv_heads, hd).transpose(1, 2)
    q, k = _rope(_rms(q)), _rope(_rms(k))
    q = q * sd[p + "q_gain"].view(1, heads, 1, 1)
    rep = heads // kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, D) @ sd[p + "proj.weight"].T


def baseline_loss(sd, input_ids, target_ids, num_layers=9, heads=8, kv_heads=4, softcap=30.0):
    emb = sd["tok_emb.weight"]
    x = _rms(emb[input_ids])
    x0 = x
    n_enc = num_layers // 2
    skips = []
    for n in range(num_layers):
        if n >= n_enc and skips:
            x = x + sd["skip_weights"][n - n_enc] * skips.pop()
        p = f"blocks.{n}."
        mix = sd[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        x = x + sd[p + "attn_scale"] * _attention(_rms(x), sd, p + "attn.", heads, kv_heads)
        hdn = torch.relu(_rms(x) @ sd[p + "mlp.fc.weight"].T).square()
        x = x + sd[p + "mlp_scale"] * (hdn @ sd[p + "mlp.proj.weight"].T)
        if n < n_enc:
            skips.append(x)
    logits = _rms(x) @ emb.T
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target_ids.reshape(-1))
