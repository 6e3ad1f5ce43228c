"""Manifold token-graph LM for Parameter Golf: a frozen token manifold built from training
statistics steers causal sparsemax message passing, scored in bits per byte.

Before training (inside the 600 s budget, train shards only) the script counts co-occurrences and
builds the token manifold of PR #663 ("V18 Manifold-Guided Architecture", raahilg): PPMI springs,
directional torsion, entropic mass, directed springs, syntactic bigram coordinates, a seeded physics
simulation, then spectral coordinates (eigenvectors of the coupling matrix) and 12 static cosine
neighbours per token. Both tables ship in the artifact. The model is a looped gated hop cell with
spectral FiLM, sparsemax routing over causal top-k candidates (Martins & Astudillo 2016),
static-neighbour routing, manifold-guided attention, Householder transport between hops and a capped
geodesic mixer, with the corrections of docs/manifold.md (the token itself is always a valid
candidate, masks after any clamp, recent tokens dominate the velocity).

Memory at large vocabularies: counts are three V x V float64 matrices and the build holds about a
dozen V x V float32 transients (V = 8192: ~6 GB on the GPU, est.); eigendecompositions run in
float64 up to V = 4096 and float32 above, so no frequent-token subset is needed up to 8192.

Credits: the official naive baseline (openai/parameter-golf) and the record stack (the shared
blocks), modded-nanogpt (Muon, Newton-Schulz), PR #663 (the manifold ideas; none of its code),
Martins & Astudillo 2016 (sparsemax), docs/manifold.md (the fixes).

Run:
  torchrun --standalone --nproc_per_node=8 train_manifold.py   # 8xH100, PRESET=record (default)
  torchrun --standalone --nproc_per_node=1 train_manifold.py   # one GPU, same maths
  PRESET=smoke python train_manifold.py                        # CPU, embedded corpus, minutes
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from golf.config import SMOKE_PRESET, BaseHyperparameters
from golf.contract import register_model
from golf.data import SHARD_HEADER_BYTES, load_data_shard, shard_files
from golf.runtime import Progress, dist_sum
from golf.train import run_main, run_script

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Every knob is an UPPER_SNAKE environment variable named as in the records (ITERATIONS,
# MATRIX_LR, ...). PRESET picks a group of defaults first; explicit variables override it. Nothing
# is read at import time: `Hyperparameters.from_env(env)` reads a dict (tests) or os.environ
# (runs), converts types and names the variable in every error.


@dataclass
class Hyperparameters(BaseHyperparameters):
    # Model: the manifold hop network (record shape). NUM_LAYERS = hops, MODEL_DIM = hidden width,
    # NUM_HEADS = manifold-attention heads; NUM_KV_HEADS only satisfies the shared validate().
    num_layers: int = 4
    model_dim: int = 500
    num_heads: int = 2
    num_kv_heads: int = 2
    mlp_mult: float = 2.0
    hop_cells: int = 1  # distinct hop cells, used round-robin over the hops (1: one shared cell)
    route_topk: int = 32  # causal top-k candidates per row before the sparsemax (B.2 item 4)
    velocity_tau: float = 16.0  # recency scale of the velocity weights exp(-(i - j) / tau)
    tie_embeddings: bool = False
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    # Manifold: the frozen token geometry, built from train shards inside the training budget.
    manifold_tokens: int = 800_000_000
    manifold_modes: int = 256
    manifold_coords: int = 32
    manifold_neighbours: int = 12
    manifold_physics_steps: int = 5000
    manifold_physics_dim: int = 300
    manifold_pairs: int = 80_000
    manifold_seed: int = 12372

    def validate_model(self):
        for name in (
            "num_layers",
            "model_dim",
            "num_heads",
            "route_topk",
            "manifold_modes",
            "manifold_coords",
        ):
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        if self.model_dim % self.num_heads:
            self.bad("MODEL_DIM", f"must be divisible by NUM_HEADS={self.num_heads}")


# Named groups of defaults. `record` is the 8xH100 configuration (the dataclass defaults are its
# model shape); `smoke` trains a small model on a laptop CPU in a few minutes. The seed's AdamW
# schedule (warmup, cosine to 0.1, hold, linear to 0) is mapped onto the shared one: flat, then
# linear over WARMDOWN_FRAC.
PRESETS = {
    "record": {
        "embed_lr": 0.05,
        "ema_decay": 0.999,
        "muon_wd": 0.04,
        "warmdown_frac": 0.75,
        "grad_clip_norm": 1.0,
        "eval_mode": "sliding",
        "eval_stride": 128,
        # The artifact (issue 24), as train_gpt.py's record stores it: int6 matrices clipped by
        # SD-clip, int8 embedding, bit allocation fitting the widths to SIZE_BUDGET - SIZE_MARGIN
        # with the code counted, the smallest compressor, a compressed header, the compact code
        # form.
        "quant_bits": 6,
        "embed_bits": 8,
        "clip_method": "sdclip",
        "bit_alloc": True,
        "compressor": "auto",
        "header_compress": True,
        "code_form": "compact",
    },
    "smoke": {
        **SMOKE_PRESET,
        "num_layers": 2,
        "model_dim": 128,
        "route_topk": 16,
        "manifold_modes": 64,
        "manifold_coords": 16,
        "manifold_physics_steps": 50,
        "manifold_physics_dim": 64,
        "manifold_pairs": 4000,
        "embed_lr": 0.05,
        "grad_clip_norm": 1.0,
        "compressor": "zlib",
    },
}

# Small control tensors (score scales, score biases, the neighbour gate): the artifact keeps them in
# fp32 rather than fp16.
CONTROL_TENSOR_PATTERNS = ("route_scale", "manifold_bias", "rel_bias", "nb_gate")


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# The manifold (PR #663 "V18" ideas, docs/manifold.md, rewritten): co-occurrence counts of train
# shards -> springs, torsion, mass, directed springs, syntactic coordinates -> a seeded physics
# layout -> spectral coordinates `sc` (V x S) and static neighbours `static_nb` (V x K). Both are
# frozen state that ships in the artifact (zeros until `prepare_training` builds them).
# The network: h0 = Linear([MLP(sc[x]); emb(x)]) with no position embedding (recency terms carry
# order, so any window length works), then NUM_LAYERS hops of one shared gated cell with per-hop
# spectral FiLM. Every score over positions is masked to j <= i before its top-k or softmax, and the
# token itself is always a valid candidate (B.2 items 1-5). No KV cache: like attention, the routing
# and attention scores are dense T x T per hop, so their cost grows with seq_len squared (the
# sparsemax sorts only the k candidates of each row).

RECENCY_BUCKETS = 16  # learned score bias per log2(1 + i - j) bucket


def manifold_dims(h):
    """(spectral modes, directional and syntactic coordinates each, total width S) for the
    vocabulary: modes = min(MANIFOLD_MODES, V / 4), coordinates = min(MANIFOLD_COORDS, V / 8), so
    V = 1024 gives S = 256 + 32 + 32 = 320."""
    modes = min(h.manifold_modes, h.vocab_size // 4)
    coords = min(h.manifold_coords, h.vocab_size // 8)
    return modes, coords, modes + 2 * coords


def count_cooccurrence(shards, V, device, chunk=1 << 24):
    """float64 (V, V) counts: n1 of offset 1, r5 of offsets 1..5, c10 of offsets 1..10 weighted
    1/offset, by torch.bincount of prev * V + next over chunks of `chunk` first positions."""
    n1 = torch.zeros(V * V, dtype=torch.float64, device=device)
    r5 = torch.zeros(V * V, dtype=torch.float64, device=device)
    c10 = torch.zeros(V * V, dtype=torch.float64, device=device)
    for shard in shards:
        Progress.advance_active()  # prepare_training's progress: one unit per shard
        t = shard.to(device=device, dtype=torch.int64)
        for s in range(0, t.numel(), chunk):
            a = t[s : s + chunk + 10]
            for o in range(1, min(11, a.numel())):
                m = min(chunk, a.numel() - o)
                c = torch.bincount(a[:m] * V + a[o : o + m], minlength=V * V).double()
                c10 += c / o
                if o <= 5:
                    r5 += c
                if o == 1:
                    n1 += c
    return [c.view(V, V) for c in (n1, r5, c10)]


def top_modes(sym, k):
    """Top-k eigenpairs of a symmetric matrix as eigenvectors x sqrt|eigenvalue|: torch on the
    GPU (float64 up to V = 4096, float32 above), numpy's LAPACK on the CPU (torch's CPU eigh was
    about 5x slower here)."""
    if sym.is_cuda:
        evals, evecs = torch.linalg.eigh(sym.double() if sym.size(0) <= 4096 else sym.float())
    else:
        evals, evecs = (torch.from_numpy(a) for a in np.linalg.eigh(sym.double().numpy()))
    return (evecs[:, -k:] * evals[-k:].abs().sqrt()).flip(-1).float().to(sym.device)


def row_norm(m):
    """Each row divided by its sum: counts -> conditional distributions (empty rows stay zero)."""
    return m / m.sum(1, keepdim=True).clamp_min(1e-12)


def edge_list(w, cap, gen):
    """Upper-triangle edges (i, j, weight) of a weighted adjacency; a seeded subsample of `cap` if
    larger."""
    i, j = torch.triu(w, 1).nonzero(as_tuple=True)
    if i.numel() > cap:
        keep = torch.randperm(i.numel(), generator=gen, device=w.device)[:cap]
        i = i[keep]
        j = j[keep]
    return i, j, w[i, j]


def physics_layout(ws, wd, asym, mass, h, gen):
    """Positions (V x MANIFOLD_PHYSICS_DIM) minimizing the B.1 energy, and the final energy.

    Energy: springs w_s |d|^2 (2.5 P sampled edges) + 0.3 w_d |d|^2 (1.25 P directed edges), both
    over fixed seeded samples; (1 - 0.1 m_i m_j) / |d| over P fresh random pairs per step and
    0.5 a_i a_j / |d| over the first P/40 of them (P = MANIFOLD_PAIRS). Init N(0, 0.1^2); Adam lr
    0.05 cosine to 5e-4, gradient clip 10. One generator draws everything, in a fixed order.
    """
    V = ws.size(0)
    dev = ws.device
    P = h.manifold_pairs
    steps = h.manifold_physics_steps
    si, sj, sw = edge_list(ws, int(2.5 * P), gen)
    di, dj, dw = edge_list(wd, int(1.25 * P), gen)
    pos = (0.1 * torch.randn(V, h.manifold_physics_dim, generator=gen, device=dev)).requires_grad_()
    opt = torch.optim.Adam([pos], lr=0.05)
    energy = torch.zeros(())
    n_asym = max(1, P // 40)

    def sq(a, b):
        # Squared distances through F.embedding lookups: a much faster backward on the CPU than
        # fancy indexing.
        return (F.embedding(a, pos) - F.embedding(b, pos)).square().sum(-1)

    for step in range(steps):
        cosine = 1 + math.cos(math.pi * step / steps)
        opt.param_groups[0]["lr"] = 5e-4 + 0.5 * (0.05 - 5e-4) * cosine
        ri = torch.randint(0, V, (P,), generator=gen, device=dev)
        rj = (ri + torch.randint(1, V, (P,), generator=gen, device=dev)) % V  # never a self pair
        d = (sq(ri, rj) + 1e-6).sqrt()
        # One expression, so the autograd graph (and the order its gradients add up) stays fixed.
        energy = (
            (sw * sq(si, sj)).sum()  # springs
            + 0.3 * (dw * sq(di, dj)).sum()  # directed springs
            + ((1 - 0.1 * mass[ri] * mass[rj]) / d).sum()  # repulsion, less for heavy pairs
            + 0.5 * (asym[ri[:n_asym]] * asym[rj[:n_asym]] / d[:n_asym]).sum()  # asymmetry
        )
        opt.zero_grad(set_to_none=True)
        energy.backward()
        torch.nn.utils.clip_grad_norm_([pos], 10.0)
        opt.step()
    stats = {"springs": si.numel(), "directed": di.numel(), "energy": float(energy.detach())}
    return pos.detach(), stats


def build_manifold(counts, h):
    """(sc float32 (V, S), static_nb int32 (V, K), stats) from the counts (n1, r5, c10 of
    `count_cooccurrence`); the same bytes for the same seed on the CPU (a test hashes it twice).
    The numbered steps are those of docs/manifold.md."""
    n1, r5, c10 = (c.float() for c in counts)
    V = n1.size(0)
    modes, coords, _ = manifold_dims(h)
    gen = torch.Generator(device=n1.device).manual_seed(h.manifold_seed)

    # 1. Springs: sqrt PPMI > 0.5 of the symmetric windowed co-occurrence, zero diagonal.
    c = c10 + c10.T
    c.fill_diagonal_(0)
    row = c.sum(1)
    ppmi = torch.log(c * c.sum() / (row[:, None] * row[None, :]).clamp_min(1e-12)).clamp_min(0)
    ws = torch.where(ppmi > 0.5, ppmi.sqrt(), 0.0)

    # 2. Torsion: left minus right context distributions (offsets 1..5); the asymmetry is its row
    # norm, and U S of its SVD (through the Gram matrix) gives the directional coordinates.
    tors = row_norm(r5.T) - row_norm(r5)
    asym = tors.norm(dim=1)
    dirc = top_modes(tors @ tors.T, coords)

    # 3. Mass: 1 / (successor entropy + 1), divided by its max; below 10 successors the entropy is
    # the maximum, ln V.
    pf = row_norm(n1)
    pb = row_norm(n1.T)
    ent = torch.where(n1.sum(1) < 10, math.log(V), -(pf * pf.clamp_min(1e-12).log()).sum(1))
    mass = 1 / (ent + 1)
    mass = mass / mass.max()

    # 4. Directed springs: abs(P_fwd - P_bwd), symmetrized, above the 90th percentile of its nonzero
    # values.
    dd = ((pf - pb).abs() + (pf - pb).abs().T) / 2
    nz = dd[dd > 0]
    threshold = 0
    if nz.numel():
        threshold = nz.kthvalue(max(1, int(0.9 * nz.numel()))).values
    wd = torch.where(dd > threshold, dd, 0.0)

    # 5. Syntactic coordinates: U S of the SVD of [left bigram | right bigram].
    syn = top_modes(pb @ pb.T + pf @ pf.T, coords)

    # 6. Physics: a seeded layout of the tokens under the springs, mass and asymmetry.
    pos, stats = physics_layout(ws, wd, asym, mass, h, gen)

    # 7. Spectral coordinates: the top modes of the coupling 2 w_s + 0.1 m m^T + 0.3 w_d + 1/d^3,
    # then the directional (x 0.5 std ratio) and syntactic (x 0.3 std ratio) coordinates appended.
    inv = torch.cdist(pos, pos).clamp_min(1e-3).pow(-3)
    inv.fill_diagonal_(0)
    spec = top_modes(2 * ws + 0.1 * mass[:, None] * mass[None, :] + 0.3 * wd + inv, modes)
    parts = [spec]
    for factor, coordinates in ((0.5, dirc), (0.3, syn)):
        parts.append(factor * spec.std() / coordinates.std().clamp_min(1e-12) * coordinates)
    sc = torch.cat(parts, 1)
    sc = sc / sc.std().clamp_min(1e-12)  # unit scale for the network's inputs

    # Static neighbours: the MANIFOLD_NEIGHBOURS nearest other tokens by cosine of sc.
    cos = F.normalize(sc, dim=1) @ F.normalize(sc, dim=1).T
    cos.fill_diagonal_(-2.0)
    return sc, cos.topk(h.manifold_neighbours, dim=1).indices.int(), stats


class CastedLinear(nn.Linear):
    """fp32 weights cast at use (bf16 autocast on GPU); `zero=True` starts the layer at exactly zero
    (after the usual init, so the RNG stream does not depend on it)."""

    def __init__(self, n_in, n_out, bias=True, zero=False):
        super().__init__(n_in, n_out, bias=bias)
        if zero:
            for p in self.parameters():
                nn.init.zeros_(p)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def sparsemax(z):
    """Sparsemax over the last dim (Martins & Astudillo 2016), tau from the valid entries only: -inf
    entries are masked and come out exactly 0. Every row must hold one finite entry (the caller's
    always-valid candidate); a fully masked row is never normalized."""
    zs = z.sort(dim=-1, descending=True).values
    cs = zs.cumsum(-1)
    r = torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype)
    k = (1 + r * zs > cs).sum(-1, keepdim=True)
    return (z - (cs.gather(-1, k - 1) - 1) / k).clamp_min(0)


def route(score, blocked, k):
    """Sparsemax over each row's top-k unblocked candidates (masked before the top-k, B.2 item 4),
    scattered back to a dense (..., T, T) weight matrix whose blocked entries are exactly 0."""
    masked = score.masked_fill(blocked, float("-inf"))
    val, idx = masked.topk(min(k, score.size(-1)), dim=-1)
    return torch.zeros_like(score).scatter(-1, idx, sparsemax(val))


class HopCell(nn.Module):
    """One hop: messages routed by sparsemax (causal top-k, plus static neighbours behind a gate)
    into a gated update MLP, manifold-guided attention, then the geodesic mixer capped at 0.2 |h|.
    FiLM comes from the caller (one FiLM per hop, so a shared cell still knows its hop)."""

    def __init__(self, h, S):
        super().__init__()
        D = h.model_dim
        hidden = int(h.mlp_mult * h.model_dim)
        H = h.num_heads
        self.heads = H
        self.topk = h.route_topk
        self.nb_k = h.manifold_neighbours + 1  # the static neighbours plus the token itself
        # Creation order is the RNG order of the init and the state_dict order: keep it.
        self.msg = CastedLinear(D, D)
        self.up = CastedLinear(2 * D, hidden)
        self.c_q = CastedLinear(D + 2 * S, D)
        self.c_k = CastedLinear(D + S, D)
        self.c_v = CastedLinear(D, D)
        self.mix_in = CastedLinear(D, hidden)
        self.mix_gate = CastedLinear(S, hidden)
        # Zero-initialized outputs: each branch starts as a no-op (the attention projection replaces
        # the seed's sigmoid(-5) gate).
        self.down = CastedLinear(hidden, D, zero=True)
        self.proj = CastedLinear(D, D, zero=True)
        self.mix_out = CastedLinear(hidden, D, zero=True)
        # seed: 5 (endpoint_sim * H + 0.5 msg_sim)
        self.route_scale = nn.Parameter(torch.tensor([5.0, 2.5]))
        # w_m in the attention score w_m scn_i . scn_j
        self.manifold_bias = nn.Parameter(torch.ones(H))
        # recency bias per bucket: the attention heads, then the router
        self.rel_bias = nn.Parameter(torch.zeros(H + 1, RECENCY_BUCKETS))
        # the static-neighbour route starts nearly shut (seed)
        self.nb_gate = nn.Parameter(torch.tensor(-4.0))

    def attention(self, z, c):
        """Q from [z; scn; velocity], K from [z; scn]; score q.k / sqrt(d) + w_m scn_i . scn_j plus
        the recency bias; no clamp, the causal mask with -inf last, softmax in fp32 (B.2 item 2)."""
        B, T, D = z.shape
        H = self.heads
        dh = D // H
        scn = c["scn"].to(z.dtype)
        vel = c["vel"].to(z.dtype)
        q = self.c_q(torch.cat([z, scn, vel], -1)).view(B, T, H, dh).transpose(1, 2)
        q = F.rms_norm(q, (dh,))
        k = self.c_k(torch.cat([z, scn], -1)).view(B, T, H, dh).transpose(1, 2)
        k = F.rms_norm(k, (dh,))
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(dh)
        s = s + self.manifold_bias[:, None, None] * c["sim"][:, None]
        s = s + self.rel_bias[:H][:, c["bucket"]]
        p = torch.softmax(s.masked_fill(c["future"], float("-inf")), dim=-1)
        y = p.to(z.dtype) @ self.c_v(z).view(B, T, H, dh).transpose(1, 2)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, h, film, sc, c, entropy):
        """(new h, A), A being the causal top-k routing weights the next hop's transport reads."""
        scale, shift, gate = film.chunk(3, dim=-1)
        z = F.rms_norm(h, (h.size(-1),)) * (1 + scale) + shift
        # Routing score: a (scn_i . scn_j) H_i + b cos(msg_i, msg_j) + recency bias.
        msg = self.msg(z)
        mn = F.normalize(msg.float(), dim=-1)
        score = (
            self.route_scale[0] * c["sim"] * entropy[..., None]
            + self.route_scale[1] * (mn @ mn.transpose(1, 2))
            + self.rel_bias[-1][c["bucket"]]
        )
        A = route(score, c["future"], self.topk)
        weights = A + torch.sigmoid(self.nb_gate) * route(score, c["not_nb"], self.nb_k)
        routed = weights.to(msg.dtype) @ msg
        update = torch.sigmoid(gate) * self.down(F.gelu(self.up(torch.cat([z, routed], -1))))
        h = h + update + self.attention(z, c)
        # Geodesic mixer, its update scaled down to at most 0.2 |h| per position (the scale is a
        # constant in backward).
        mixed = F.gelu(self.mix_in(F.rms_norm(h, (h.size(-1),))))
        mix = self.mix_out(mixed * torch.sigmoid(self.mix_gate(sc)))
        cap = 0.2 * h.norm(dim=-1, keepdim=True) / mix.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return h + mix * cap.clamp(max=1.0).detach(), A


class ManifoldLM(nn.Module):
    """The manifold token-graph LM: the frozen manifold tables, the input fusion, NUM_LAYERS hops of
    HOP_CELLS cells with per-hop FiLM and parallel transport, and the head."""

    def __init__(self, h):
        super().__init__()
        V = h.vocab_size
        D = h.model_dim
        _, _, S = manifold_dims(h)
        self.softcap = h.logit_softcap
        self.tau = h.velocity_tau
        self.tok_emb = nn.Embedding(V, D)
        # The manifold: zeros of the right shapes until `prepare_training` builds it, so that
        # `load_artifact` loads strictly. sc is a frozen Embedding, so the causality audit hooks it.
        self.sc_emb = nn.Embedding.from_pretrained(torch.zeros(V, S), freeze=True)
        self.register_buffer("static_nb", torch.zeros(V, h.manifold_neighbours, dtype=torch.int32))
        self.sc_mlp = nn.Sequential(CastedLinear(S, D), nn.GELU(), CastedLinear(D, D))
        self.in_proj = CastedLinear(2 * D, D)
        # One FiLM per hop from sc: scale, shift and the update gate.
        self.films = nn.ModuleList(CastedLinear(S, 3 * D, zero=True) for _ in range(h.num_layers))
        self.cells = nn.ModuleList(HopCell(h, S) for _ in range(min(h.hop_cells, h.num_layers)))
        self.transport = None
        if h.num_layers > 1:
            self.transport = CastedLinear(S, D, bias=False)
        # Untied head with bias (the seed's): the input embedding is fused with sc through in_proj,
        # so its geometry is not the output's; the bias holds the unigram. TIE_EMBEDDINGS=1 shares
        # tok_emb.
        self.lm_head = None
        if not h.tie_embeddings:
            self.lm_head = CastedLinear(D, V, bias=False, zero=True)
        self.lm_bias = nn.Parameter(torch.zeros(V))
        if h.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)

    @torch.no_grad()
    def prepare_training(self, h, rt, logger):
        """Count the first MANIFOLD_TOKENS train tokens (whole shards split over ranks, counts
        all-reduced), build the manifold, and give every rank rank 0's bytes (GPU atomics may differ
        in the last bit). Runs inside the training budget (B.2 item 6)."""
        t0 = time.perf_counter()
        files = shard_files(h.data_path, "train")
        if any("_val_" in os.path.basename(p) for p in files):
            raise RuntimeError(
                f"DATA_PATH={h.data_path!r}: a validation shard is in the manifold's train list"
            )
        sizes = np.cumsum([(os.path.getsize(p) - SHARD_HEADER_BYTES) // 2 for p in files])
        files = files[: int(np.searchsorted(sizes, h.manifold_tokens)) + 1]
        mine = (load_data_shard(p) for p in files[rt.rank :: rt.world_size])
        counts = []
        # Progress (issue 18): the count's shards, then the build as one unit.
        progress = Progress("manifold build", len(files[rt.rank :: rt.world_size]) + 1)
        for c in count_cooccurrence(mine, h.vocab_size, rt.device):
            counts.append(dist_sum(c))
        t1 = time.perf_counter()
        with torch.enable_grad():
            sc, nb, stats = build_manifold(counts, h)
        progress.advance()
        progress.close()
        self.sc_emb.weight.copy_(sc)
        self.static_nb.copy_(nb)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.sc_emb.weight.data, 0)
            dist.broadcast(self.static_nb, 0)
        logger.log0(
            f"manifold: bigrams:{int(counts[0].sum())} shards:{len(files)} sc:{tuple(sc.shape)} "
            f"{stats} count:{t1 - t0:.1f}s build:{time.perf_counter() - t1:.1f}s"
        )

    def context(self, x, scn):
        """Causal tables shared by the hops of one forward.

        - masks: `future` (j > i) and `not_nb` (everything but the static-neighbour candidates);
        - recency buckets log2(1 + i - j);
        - velocity v_i = scn_i - sum_{j<i} w_ij scn_j, w_ij ~ exp(-(i - j) / tau) normalized over
          j < i, so recent tokens dominate (B.2 item 3; V18 had the sign reversed), v_0 = 0;
        - manifold similarity scn_i . scn_j;
        - static-neighbour candidates: j < i holding a static neighbour of x_i, each neighbour token
          at its most recent occurrence before i (its next occurrence is at or after i: a causal
          test), plus i itself.
        """
        T = x.size(1)
        i = torch.arange(T, device=x.device)
        gap = i[:, None] - i[None, :]
        past = gap > 0
        w = torch.exp(-gap.clamp_min(0).float() / self.tau) * past
        # Row 0 has no past: its weights are all zero, and its velocity is set to 0 below.
        vel = scn - (w / w.sum(-1, keepdim=True).clamp_min(1e-30)) @ scn
        # nxt[j]: the next occurrence of token x_j after j (T if none), from one sort by token.
        key = (x * T + i).sort(dim=-1).values
        tok = key // T
        p = key % T
        same = tok[:, 1:] == tok[:, :-1]
        nxt = torch.full_like(x, T).scatter(1, p[:, :-1], torch.where(same, p[:, 1:], T))
        V = self.sc_emb.num_embeddings
        adj = torch.zeros(V, V, dtype=torch.bool, device=x.device)
        adj = adj.scatter_(1, self.static_nb.long(), True)
        latest = nxt[:, None, :] >= i[:, None]
        nb = (adj[x[:, :, None], x[:, None, :]] & past & latest) | (gap == 0)
        bucket = torch.log2(1 + gap.clamp_min(0).float()).long().clamp_max(RECENCY_BUCKETS - 1)
        return {
            "future": gap < 0,
            "not_nb": ~nb,
            "scn": scn,
            "vel": vel * past.any(-1)[:, None],
            "bucket": bucket,
            "sim": scn @ scn.transpose(1, 2),
        }

    def logits(self, h):
        """Softcapped logits of the head (tied or not) with its bias, in fp32."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        normed = F.rms_norm(h, (h.size(-1),))
        logits = F.linear(normed, w.to(h.dtype), self.lm_bias.to(h.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward_logits(self, input_ids):
        sc = self.sc_emb(input_ids)
        c = self.context(input_ids, F.normalize(sc.float(), dim=-1))
        h = self.in_proj(torch.cat([self.sc_mlp(sc), self.tok_emb(input_ids)], -1))
        A = None
        for layer, film in enumerate(self.films):
            if A is not None:
                # Parallel transport, blend 0.2: h <- 0.8 h + 0.2 (I - 2 u u^T) h, with u pointing
                # from the token's point p to its routed context's point A p (unit length, or
                # shorter when the two nearly coincide).
                p = self.transport(sc)
                d = (p - A.to(p.dtype) @ p).float()
                u = (d * torch.rsqrt(d.square().sum(-1, keepdim=True) + 1e-6)).to(h.dtype)
                h = h - 0.4 * u * (u * h).sum(-1, keepdim=True)
            with torch.no_grad():  # the normalized output entropy steers the router (seed)
                lp = self.logits(h).log_softmax(-1)
                entropy = -(lp.exp() * lp).sum(-1) / math.log(lp.size(-1))
            cell = self.cells[layer % len(self.cells)]
            h, A = cell(h, film(sc), sc, c, entropy)
        return self.logits(h)

    def forward(self, input_ids, target_ids):
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def build_model(h):
    if h.route_topk < 1 or h.hop_cells < 1:
        raise ValueError(f"ROUTE_TOPK={h.route_topk} and HOP_CELLS={h.hop_cells} must be positive")
    return ManifoldLM(h)


def param_groups(model, h):
    """Muon for the 2-D weights of linear layers; Adam for the embedding, the head, biases, gates
    and tables; the frozen manifold goes to neither. Gradients are averaged the standard DDP way
    (no V18 "selective gradient", B.2 item 7)."""
    head = [model.tok_emb.weight]
    if model.lm_head is not None:
        head.append(model.lm_head.weight)
    matrices = []
    scalars = []
    for name, p in model.named_parameters():
        if not p.requires_grad or any(p is q for q in head):
            continue
        if p.ndim == 2 and name.endswith(".weight"):
            matrices.append(p)
        else:
            scalars.append(p)
    embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
    groups = [
        {"params": [model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr},
        {"params": scalars, "lr": h.scalar_lr, "base_lr": h.scalar_lr},
    ]
    if model.lm_head is not None:
        groups.append({"params": [model.lm_head.weight], "lr": h.head_lr, "base_lr": h.head_lr})
    return matrices, groups


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
# The loop, serialization, audits and final eval are golf/train.py's pipeline; this model adds
# nothing to it.

MODEL = register_model(
    script="train_manifold.py",
    source_file=__file__,
    hyperparameters=Hyperparameters,
    presets=PRESETS,
    control_patterns=CONTROL_TENSOR_PATTERNS,
    build_model=build_model,
    param_groups=param_groups,
)


def main():
    return run_main(Hyperparameters.from_env())


if __name__ == "__main__":
    sys.exit(run_script(main))
