"""Hydra for Parameter Golf: a causal chunk-concept LM scored in bits per byte (docs/hydra.md).

A GPT trunk whose first blocks encode tokens causally; every HYDRA_CHUNK tokens are pooled into a
32x16 concept code, a small causal transformer predicts the next chunk's code, and the remaining
blocks read the codes of earlier chunks only. Training-only heads (reconstruction, bag of words +
InfoNCE, parse) and six geometry losses on template sentences shape the codes; they are not in the
artifact, and the score is the ordinary causal softmax. docs/hydra.md says what the script does
where the spec leaves a choice.

Credits: the seed "Lean Hydra" (ruapotato/Free-Language-Embeddings, ideas only), InfoNCE (van den
Oord et al. 2018), VICReg (Bardes et al. 2021), the record stack of train_gpt.py.

Run:
  torchrun --standalone --nproc_per_node=8 train_hydra.py                   # 8xH100, PRESET=record
  PRESET=research torchrun --standalone --nproc_per_node=8 train_hydra.py   # aux losses to the end
  HYDRA_AUX=0 torchrun --standalone --nproc_per_node=8 train_hydra.py       # same model, CE only
  PRESET=smoke DATA_PATH=data/datasets/pydoc_sp1024 \
    TOKENIZER_PATH=data/tokenizers/pydoc_1024_bpe.model python train_hydra.py   # CPU, minutes
"""

import math
import random
import string
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from golf.bpb import load_tokenizer
from golf.config import SMOKE_PRESET, BaseHyperparameters
from golf.contract import register_model
from golf.data import BOS_ID, load_data_shard, shard_files
from golf.train import run_main, run_script

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Every knob is an UPPER_SNAKE environment variable named as in the records (ITERATIONS, MATRIX_LR,
# ...). PRESET picks a group of defaults first; explicit variables override it. Nothing is read at
# import time: `Hyperparameters.from_env(env)` reads a dict (tests) or os.environ (runs), converts
# types and names the variable in every error.


@dataclass
class Hyperparameters(BaseHyperparameters):
    # Model: a GPT trunk whose first NUM_LAYERS // 2 blocks encode, one HYDRA_SLOTS x HYDRA_SLOT_DIM
    # code per HYDRA_CHUNK tokens. HYDRA_AUX=0 trains the same model on CE alone; HYDRA_MODE=record
    # turns the auxiliary losses off for the last AUX_CUTOFF of the budget, research keeps them.
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    hydra_chunk: int = 64
    hydra_slots: int = 32
    hydra_slot_dim: int = 16
    hydra_aux: bool = True
    hydra_mode: str = "record"
    hydra_aux_every: int = 5

    def validate_model(self):
        if self.num_layers < 2:  # also covers NUM_LAYERS <= 0
            self.bad("NUM_LAYERS", "the hydra needs an encoder and a decoder block")
        positive = (
            "model_dim",
            "num_heads",
            "num_kv_heads",
            "hydra_chunk",
            "hydra_slots",
            "hydra_slot_dim",
            "hydra_aux_every",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                self.bad(name, "must be positive")
        # Even heads for RoPE, and whole groups of query heads per key/value head (GQA).
        if self.model_dim % (2 * self.num_heads) or self.num_heads % self.num_kv_heads:
            self.bad(
                "MODEL_DIM",
                "must split into NUM_HEADS even heads, NUM_HEADS into NUM_KV_HEADS groups",
            )
        if self.hydra_mode not in ("record", "research"):
            self.bad("HYDRA_MODE", "must be one of record, research")


# Rarely tuned, so constants rather than knobs. The predictor and the training-only heads scale with
# MODEL_DIM (docs/hydra.md gives the sizes at 512).
ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 30.0
QK_GAIN_INIT = 1.5
TIED_EMBED_INIT_STD = 0.005
AUX_CUTOFF = 0.3  # the last fraction of the budget, trained without auxiliary losses in record mode
GEO_WARMUP = 0.1  # fraction of the budget over which the geometry losses ramp in from 0 to 1
LAMBDA_AUX = 0.1  # reconstruction + (bag of words + InfoNCE, or parse)
LAMBDA_PRED = 0.1  # the code predictor's loss
LAMBDA_GEO = 0.05  # the six geometry losses, times the ramp
AUX_CHUNKS = 256  # chunks per step that feed the reconstruction and parse heads

# Named groups of defaults. `record` is the 8xH100 configuration: train_gpt.py's record options with
# 8 blocks (the concept path fits the same bytes) and T = 2048 (docs/hydra.md); `research` keeps
# the auxiliary losses through warmdown; `smoke` trains a small model on a laptop CPU in minutes.
RECORD = {
    "ema_decay": 0.997,
    "muon_wd": 0.04,
    "muon_row_norm": True,
    "warmdown_frac": 0.75,
    "eval_mode": "sliding",
    "num_layers": 8,
    "train_seq_len": 2048,
    # The artifact (issue 24), as train_gpt.py's record stores it: int6 matrices clipped by SD-clip,
    # int8 embedding, bit allocation fitting the widths to SIZE_BUDGET - SIZE_MARGIN with the code
    # counted, the smallest compressor, a compressed header, the compact code form.
    "quant_bits": 6,
    "embed_bits": 8,
    "clip_method": "sdclip",
    "bit_alloc": True,
    "compressor": "auto",
    "header_compress": True,
    "code_form": "compact",
}
PRESETS = {
    "record": RECORD,
    "research": {**RECORD, "hydra_mode": "research"},
    # CPU, ~150 s on the embedded corpus: train_gpt.py's smoke preset (EVAL_STRIDE 64 by default)
    "smoke": {
        **SMOKE_PRESET,
        "num_layers": 4,
        "model_dim": 192,
        "num_heads": 4,
        "num_kv_heads": 2,
    },
}

# The control tensors (per-channel scales, the residual mix, query gains, U-Net skip weights): fp32
# in the artifact. Whole names, as they match dotted name components (`blocks.0.attn.q_gain`).
CONTROL_TENSOR_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weights",
)


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# Causal chunk-concept LM (docs/hydra.md; docs/hydra.md). The first NUM_LAYERS // 2 trunk blocks
# encode tokens causally; chunk j (C = HYDRA_CHUNK tokens) is pooled into a code Z_j that only later
# chunks read; a causal transformer over the codes predicts Zhat_k = P(Z_<k); the decoder blocks get
# U_a Z_{k-1} + U_b Zhat_k added to every token of chunk k (the spec's cheaper variant of
# cross-attention). Memory resets at BOS: a token whose last BOS is at b reads Z_{k-1} only if
# (k-1)C >= b and Zhat_k only if kC > b, else a learned null code, and the predictor obeys the same
# rule. Training-only heads live under `heads.`: a state without them (an artifact) turns them into
# stubs that raise. Scoring is the causal softmax of `forward_logits` alone.

# A geometry batch: R base sentences (+ their R word-order swaps), Q relations x P (positive,
# negative) pairs, G clusters of M sentences: (R, Q, P, G, M).
GEO_LAYOUT = (16, 2, 6, 4, 4)
GEO_ROWS = 2 * GEO_LAYOUT[0] + 2 * GEO_LAYOUT[1] * GEO_LAYOUT[2] + GEO_LAYOUT[3] * GEO_LAYOUT[4]
# Tokens per template sentence, BOS included (the longest takes 19 with the pydoc sp1024).
GEO_LEN = 20
GEO_WEIGHTS = {  # the seed's weights of its six geometry losses
    "word_order": 2.0,
    "hard_repulsion": 1.0,
    "batch_repulsion": 0.3,
    "analogy": 2.0,
    "direction": 1.5,
    "cluster": 1.5,
}
# The auxiliary figures kept on the device (`Hydra.stats`) and reported by `validation_probes`.
STAT_KEYS = (
    "pred",
    "recon",
    "recon_acc",
    "recon_exact",
    "recon_exact_ema",
    "bow",
    "infonce",
    "parse",
    "geo",
)


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose fp32 weights are cast to the input's dtype at use."""

    def __init__(self, fan_in, fan_out, zero_init=False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_cos_sin(seq_len, head_dim, device, dtype):
    """RoPE tables (ROPE_BASE) of shape (seq_len, head_dim // 2)."""
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / ROPE_BASE ** (dims / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x, cos, sin):
    half = x.size(-1) // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    """GQA with QK-RMSNorm, RoPE and a learned query gain, as train_gpt.py; causal unless told
    otherwise, or masked by `mask` (the predictor's BOS rule). No KV cache: every call attends over
    the whole window, so the cost grows with seq_len squared."""

    def __init__(self, dim, heads, kv_heads, causal=True):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.causal = causal
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(QK_GAIN_INIT * torch.ones(heads))

    def forward(self, x, mask=None):
        """x is the block's residual stream; the RoPE tables take its dtype (fp32 in the trunk,
        bf16 in the predictor under autocast)."""
        B, T, D = x.shape
        # Each projection normalizes x on its own: the same values as one shared norm, and the
        # backward pass sums the gradients in the same order as before, so a seed reproduces a run
        # bit for bit.
        q = self.c_q(rms_norm(x)).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.c_k(rms_norm(x)).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.c_v(rms_norm(x)).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(T, self.head_dim, x.device, x.dtype)
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(x.dtype)[:, None, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and self.causal,
            enable_gqa=self.kv_heads != self.heads,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """relu^2 MLP on the RMS-normed input, as the baseline."""

    def __init__(self, dim, mult):
        super().__init__()
        hidden = int(mult * dim)
        # proj is built before fc: the order in which the initial weights have always been drawn,
        # so that a seed gives the same model.
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.fc = CastedLinear(dim, hidden)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(rms_norm(x))).square())


class Block(nn.Module):
    """train_gpt.py's block: a learned mix with the embedding x0, then the attention and MLP
    residuals (each scaled per channel)."""

    def __init__(self, dim, heads, kv_heads, mlp_mult, causal=True):
        super().__init__()
        self.attn = CausalSelfAttention(dim, heads, kv_heads, causal)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x, x0, mask=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(x, mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(x)


def run_stack(blocks, x, mask=None):
    x0 = x
    for block in blocks:
        x = block(x, x0, mask)
    return x


class ConceptPool(nn.Module):
    """Z[s] = sum_t softmax_t(q_s . W_k h_t) W_v h_t over the valid positions of one chunk, with 32
    learned queries q_s in R^64 (docs/hydra.md step 2); RMSNorm per slot."""

    def __init__(self, dim, h):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(h.hydra_slots, 64))
        self.key = CastedLinear(dim, 64)
        self.value = CastedLinear(dim, h.hydra_slot_dim)

    def forward(self, x, valid):  # (N, L, dim), (N, L) bool -> (N, slots, slot_dim)
        scores = self.queries.to(x.dtype) @ self.key(x).transpose(1, 2) / 64**0.5
        w = torch.softmax(scores.float().masked_fill(~valid[:, None], float("-inf")), dim=-1)
        return F.rms_norm(w.to(x.dtype) @ self.value(x), (self.value.out_features,))


class ChunkDecoder(nn.Module):
    """Training-only: one chunk code (its slots as tokens) plus C position queries through
    bidirectional blocks; `out` values per position (H1: the chunk's tokens; H3: its structural
    classes). Width 64 * max(2, MODEL_DIM // 128): 256 at d 512."""

    def __init__(self, h, out, layers):
        super().__init__()
        d = 64 * max(2, h.model_dim // 128)
        self.slots = h.hydra_slots
        self.inp = CastedLinear(h.hydra_slot_dim, d)
        self.out = CastedLinear(d, out)
        self.queries = nn.Parameter(0.02 * torch.randn(h.hydra_slots + h.hydra_chunk, d))
        self.blocks = nn.ModuleList(
            Block(d, d // 64, d // 64, 2.0, causal=False) for _ in range(layers)
        )

    def forward(self, z):  # (N, slots, slot_dim) -> (N, chunk, out)
        x = F.pad(self.inp(z), (0, 0, 0, self.queries.size(0) - self.slots))
        x = x + self.queries.to(z.dtype)
        return self.out(F.rms_norm(run_stack(self.blocks, x)[:, self.slots :], (x.size(-1),)))


class StrippedHead(nn.Module):
    """Stands in for a training-only head in a model loaded from an artifact."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "training-only head called on a model loaded without it (heads are not shipped)"
        )


# Template sentences for the geometry losses and probes (the seed's slot filling): every filler list
# is split into disjoint halves, train = even positions and test = odd ones, so the probes see only
# unseen words. A relation's fillers are "positive:negative" pairs.
WORDS = {
    "animal": (
        "cat dog horse bird frog goat lion bear duck cow "
        "pig rat owl hen seal crab ant bee snake tiger"
    ),
    "object": (
        "book cup lamp chair table pen key coin ball hat "
        "bag door clock shoe plate spoon car bike boat kite"
    ),
    "adj": (
        "red blue green old new warm cold soft hard dark "
        "bright loud quiet clean dirty heavy wet dry sharp round"
    ),
    "tense": (
        "opens:opened paints:painted climbs:climbed kicks:kicked pulls:pulled fixes:fixed "
        "carries:carried moves:moved lifts:lifted drops:dropped washes:washed watches:watched"
    ),
    "sentiment": (
        "good:bad great:awful happy:sad lovely:ugly kind:cruel nice:nasty pleasant:horrible "
        "fine:terrible"
    ),
    "size": (
        "big:small huge:tiny large:little tall:short wide:narrow thick:thin long:brief vast:slight"
    ),
    "manner": (
        "quickly:slowly loudly:quietly happily:sadly gently:roughly calmly:nervously "
        "carefully:carelessly eagerly:lazily boldly:shyly"
    ),
    "location": "above:below inside:outside over:under near:beyond beside:behind in:on",
}
# (positive, negative) per relation: {a} an animal, {o} an object, {j} an adjective, {x}:{y} a pair
RELATIONS = {
    "negation": ("the {a} is {j}", "the {a} is not {j}"),
    "plurality": ("the {a} sees the {o}", "the {a}s see the {o}"),
    "tense": ("the {a} {x} the {o}", "the {a} {y} the {o}"),
    "sentiment": ("the {a} found a {x} {o}", "the {a} found a {y} {o}"),
    "size": ("the {a} has a {x} {o}", "the {a} has a {y} {o}"),
    "manner": ("the {a} ate the {o} {x}", "the {a} ate the {o} {y}"),
    "location": ("the {a} sleeps {x} the {o}", "the {a} sleeps {y} the {o}"),
}


def vocabulary(split):
    return {k: v.split()[split == "test" :: 2] for k, v in WORDS.items()}


def template_batch(rng, split, layout=GEO_LAYOUT):
    """Sentences in the order `geometry` reads: R base sentences, their R word-order swaps (two
    adjacent words exchanged), Q relations x P (positive, negative) pairs sharing one word pair, G
    clusters of M sentences about one animal."""
    R, Q, P, G, M = layout
    voc = vocabulary(split)
    names = list(RELATIONS)

    def fill(rel, a=None, pair=None):
        x, y = (pair or rng.choice(voc.get(rel, ["-:-"]))).split(":")
        a = a or rng.choice(voc["animal"])
        return [
            t.format(a=a, o=rng.choice(voc["object"]), j=rng.choice(voc["adj"]), x=x, y=y)
            for t in RELATIONS[rel]
        ]

    out = [fill(rng.choice(names))[0] for _ in range(R)]
    for sentence in out[:R]:
        w = sentence.split()
        i = rng.randrange(len(w) - 1)
        out.append(" ".join(w[:i] + [w[i + 1], w[i]] + w[i + 2 :]))
    for rel in rng.sample(names, Q):
        pair = rng.choice(voc.get(rel, ["-:-"]))
        out += [s for _ in range(P) for s in fill(rel, pair=pair)]
    for a in rng.sample(voc["animal"], G):
        out += [fill(rel, a=a)[0] for rel in rng.sample(names, M)]
    return out


def encode_sentences(sp, sentences, length=GEO_LEN):
    """(ids, lengths): BOS + the first `length - 1` tokens of each sentence, padded with 0."""
    rows = [[BOS_ID] + t[: length - 1] for t in sp.encode(sentences)]
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    return ids, torch.tensor([len(r) for r in rows])


def geometry(f, layout=GEO_LAYOUT):
    """The seed's six losses and the probes on sentence embeddings f in template order
    (L2-normalized here). Analogy: a - b + c ~ d with (a, b) the pair i and (d, c) the pair i+1 of
    the same relation; the probe's trivial baseline is max(cos(c, d), cos(a, d)). Cluster gap: mean
    cos within groups minus between them."""
    R, Q, P, G, M = layout
    f = F.normalize(f.float(), dim=-1)

    def eye(n):
        return torch.eye(n, device=f.device)

    def mean(x, mask):
        return (x * mask).sum() / mask.expand_as(x).sum()

    base = f[:R]
    swap = f[R : 2 * R]
    pairs = f[2 * R : 2 * R + 2 * Q * P].view(Q, P, 2, -1)
    cl = f[2 * R + 2 * Q * P :]
    a = pairs[:, :, 0]
    b = pairs[:, :, 1]
    c = b.roll(-1, 1)
    d = a.roll(-1, 1)
    s = base @ base.T
    sc = cl @ cl.T
    order = (base * swap).sum(-1)
    group = torch.arange(G * M, device=f.device) // M
    same = (group[:, None] == group).float()
    delta = F.normalize(a - b, dim=-1)
    dd = delta @ delta.transpose(1, 2)
    analogy = (F.normalize(a - b + c, dim=-1) * d).sum(-1)
    losses = {
        "word_order": torch.relu(order - 0.5).mean(),
        # the top k = min(8, R - 1) similarities of each row, its own (lowered by 2) excluded
        "hard_repulsion": torch.relu(
            (s - 2 * eye(R)).topk(min(8, R - 1), dim=1).values - 0.10
        ).mean(),
        "batch_repulsion": mean(torch.relu(s - 0.3), 1 - eye(R)),
        "analogy": torch.relu(0.9 - analogy).mean(),
        "direction": mean(torch.relu(0.8 - dd), 1 - eye(P)),
        "cluster": mean(torch.relu(0.5 - sc), same - eye(G * M))
        + mean(torch.relu(sc - 0.2), 1 - same),
    }
    probes = {
        "analogy": analogy.mean(),
        "analogy_baseline": torch.maximum((c * d).sum(-1), (a * d).sum(-1)).mean(),
        "cluster_gap": mean(sc, same - eye(G * M)) - mean(sc, 1 - same),
        "direction": mean(dd, 1 - eye(P)),
        "word_order": order.mean(),
    }
    return losses, probes


def effective_rank(x, p):
    """rank_p of the centered rows of x: 1 + the first index with cumsum(s^2) / sum(s^2) >= p."""
    s2 = torch.linalg.svdvals(x.float() - x.float().mean(0)).square()
    return int((torch.cumsum(s2, 0) / s2.sum() < p).sum()) + 1


def variance_floor(v):
    """VICReg's variance term (Bardes et al. 2021): mean over dimensions of relu(1 - std)."""
    return torch.relu(1 - (v.flatten(0, 1).var(0, correction=0) + 1e-4).sqrt()).mean()


class Hydra(nn.Module):
    """The shipped model (trunk, pooling, predictor, memory) and the training-only heads. The
    auxiliary losses are scheduled by `set_training_progress` and need `prepare_training` first."""

    training_only_prefixes = ("heads.",)

    def __init__(self, h):
        super().__init__()
        D = h.model_dim
        S = h.hydra_slots
        sd = h.hydra_slot_dim
        V = h.vocab_size
        P = 32 * max(2, h.model_dim // 128)  # the predictor's width: 128 at d 512
        self.h = h
        self.chunk = h.hydra_chunk
        self.n_enc = h.num_layers // 2
        # The trunk (a GPT; tied with the output head), then the concept path, in the order the
        # initial weights are drawn.
        self.tok_emb = nn.Embedding(V, D, _weight=TIED_EMBED_INIT_STD * torch.randn(V, D))
        self.blocks = nn.ModuleList(
            Block(D, h.num_heads, h.num_kv_heads, h.mlp_mult) for _ in range(h.num_layers)
        )
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, h.num_layers - self.n_enc), D))
        self.pool = ConceptPool(D, h)
        self.null_code = nn.Parameter(torch.randn(S, sd))
        self.pred_in = CastedLinear(S * sd, P)
        self.pred_out = CastedLinear(P, S * sd)
        self.pred_blocks = nn.ModuleList(Block(P, P // 32, P // 32, 4.0) for _ in range(2))
        self.mem_prev = CastedLinear(S * sd, D, zero_init=True)
        self.mem_hat = CastedLinear(S * sd, D, zero_init=True)
        self.heads = nn.ModuleDict(
            {
                "recon": ChunkDecoder(h, V, max(1, h.num_layers // 4)),
                "parse": ChunkDecoder(h, 6 + 8, 1),
                "bow": CastedLinear(S * sd, V),
            }
        )
        # Training state, filled by prepare_training: never in the artifact.
        buffers = {
            "case_map": torch.arange(V),
            "digit_map": torch.arange(V),
            "flags": torch.zeros(V, 6),
            "bucket": torch.zeros(V, dtype=torch.long),
            "geo_scale": torch.zeros(()),
            "geo_ids": torch.zeros(GEO_ROWS, GEO_LEN, dtype=torch.long),
            "geo_len": torch.ones(GEO_ROWS, dtype=torch.long),
            "stats": torch.zeros(len(STAT_KEYS)),
        }
        for name, init in buffers.items():
            self.register_buffer(name, init, persistent=False)
        self.prepared = False
        self.priming = False
        self.aux_on = False
        self.heads_stripped = False
        self.aux_kind = None
        self.steps = 0
        self.unk_id = 0
        self.last_frac = 0.0
        self.aux_counts = {"para": 0, "parse": 0}
        self.rng = random.Random(h.seed)  # the same draws on every rank

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not any(k.startswith(self.training_only_prefixes) for k in state_dict):
            # An artifact: the heads are not in it, so they become stubs that raise.
            self.heads = nn.ModuleDict({k: StrippedHead() for k in self.heads})
            self.heads_stripped = True
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def encode(self, ids):
        """The encoder blocks: their output, the embedding x0, and each block's output (the U-Net
        skips)."""
        x = F.rms_norm(self.tok_emb(ids), (self.tok_emb.embedding_dim,))
        x0 = x
        skips = []
        for block in self.blocks[: self.n_enc]:
            x = block(x, x0)
            skips.append(x)
        return x, x0, skips

    def chunk_codes(self, x):
        """(B, T, D) -> (B, K, slots, slot_dim); the last chunk is padded and masked."""
        B, T, D = x.shape
        C = self.chunk
        K = -(-T // C)
        valid = (torch.arange(K * C, device=x.device) < T).view(K, C).repeat(B, 1)
        codes = self.pool(F.pad(x, (0, 0, 0, K * C - T)).view(B * K, C, D), valid)
        return codes.view(B, K, *self.null_code.shape)

    def memory(self, z, ids):
        """The additive concept memory of every token (B, T, D) and the predicted codes Zhat
        (B, K, S, sd)."""
        T = ids.size(1)
        K = z.size(1)
        C = self.chunk
        pos = torch.arange(T, device=ids.device)
        j = torch.arange(K, device=ids.device)
        last_bos = torch.where(ids == BOS_ID, pos, 0).cummax(dim=1).values
        null = F.rms_norm(self.null_code, (z.size(-1),)).to(z.dtype)
        # Predictor position p holds Z_{p-1} and outputs Zhat_p; it uses Z_{q-1} (q <= p, as input
        # or key) only if chunk q-1 starts at or after the last BOS before chunk p, else the null
        # code (always at p = 0).
        ok = (j - 1) * C >= last_bos[:, (j * C - 1).clamp(min=0), None]  # (B, p, q)
        inp = torch.where(
            ok.diagonal(dim1=1, dim2=2)[..., None, None], z[:, (j - 1).clamp(min=0)], null
        )
        mask = ((j[:, None] >= j) & (ok | (j == 0)))[:, None]
        y = run_stack(self.pred_blocks, self.pred_in(inp.flatten(2)), mask)
        zhat = F.rms_norm(self.pred_out(F.rms_norm(y, (y.size(-1),))).view_as(z), (z.size(-1),))
        # Token t of chunk k reads Z_{k-1} and Zhat_k, or the null code across a BOS.
        k = pos // C
        prev = self.mem_prev(z.flatten(2))[:, (k - 1).clamp(min=0)]
        hat = self.mem_hat(zhat.flatten(2))[:, k]
        prev = torch.where(
            ((k - 1) * C >= last_bos)[..., None], prev, self.mem_prev(null.flatten())
        )
        hat = torch.where((k * C > last_bos)[..., None], hat, self.mem_hat(null.flatten()))
        return prev + hat, zhat

    def trunk(self, ids, code_noise=None):
        x, x0, skips = self.encode(ids)
        z = self.chunk_codes(x)
        if code_noise is not None:  # the chunk-code audit perturbs Z here (tests/test_hydra.py)
            z = z + code_noise.to(z.dtype)
        mem, zhat = self.memory(z, ids)
        x = x + mem
        for i, block in enumerate(self.blocks[self.n_enc :]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        logits = F.linear(F.rms_norm(x, (x.size(-1),)), self.tok_emb.weight.to(x.dtype)).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP), z, zhat

    def forward_logits(self, input_ids, code_noise=None):
        return self.trunk(input_ids, code_noise)[0]

    def forward(self, input_ids, target_ids):
        logits, z, zhat = self.trunk(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))
        if self.training:
            # DDP needs every parameter in every backward: idle heads join with zero gradient.
            loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())
            if self.aux_on:
                loss = loss + self.aux_loss(input_ids, z, zhat)
        return loss

    def augment(self, ids):
        """aug(chunk): 12% token dropout (to <unk>), 10% first-letter case flips, every digit
        shifted by one."""
        r = torch.rand(ids.shape, device=ids.device)
        x = torch.where(r < 0.12, self.unk_id, torch.where(r < 0.22, self.case_map[ids], ids))
        return torch.where(ids == BOS_ID, ids, self.digit_map[x])

    def embed_sentences(self, ids, lengths):
        """f: the L2-normalized flattened concept code of each sentence, pooled over its tokens as
        one chunk."""
        valid = torch.arange(ids.size(1), device=ids.device) < lengths[:, None]
        return F.normalize(self.pool(self.encode(ids)[0], valid).flatten(1).float(), dim=-1)

    def aux_loss(self, ids, z, zhat):
        """The predictor loss; on an auxiliary step also reconstruction, one secondary head and
        geometry. Every term lands in `stats` for the probes."""
        st = {}
        C = self.chunk
        V = self.h.vocab_size
        zf = z.flatten(2).float()
        hf = zhat.flatten(2).float()
        # 1 - cos(Zhat_k, sg Z_k), plus the VICReg variance floor on Z and on Zhat
        cos = F.cosine_similarity(hf, zf.detach(), dim=-1)
        st["pred"] = (1 - cos).mean() + variance_floor(zf) + variance_floor(hf)
        total = LAMBDA_PRED * st["pred"]
        if self.aux_kind:
            # H1: reconstruct the tokens of chunk j from Z_j
            n = min(zf.size(0) * zf.size(1), AUX_CHUNKS)
            tgt = F.pad(ids, (0, z.size(1) * C - ids.size(1)), value=-100).view(-1, C)[:n]
            valid = tgt >= 0
            t = tgt.clamp(min=0)
            logits = self.heads["recon"](z.flatten(0, 1)[:n]).float()
            st["recon"] = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
            with torch.no_grad():
                hit = logits.argmax(-1) == tgt
                st["recon_acc"] = (hit & valid).sum() / valid.sum()
                st["recon_exact"] = (hit | ~valid).all(dim=1).float().mean()
                ema = self.stats[STAT_KEYS.index("recon_exact_ema")]
                st["recon_exact_ema"] = 0.99 * ema + 0.01 * st["recon_exact"]
            if self.aux_kind == "para":
                # H2: the bag of words of chunk k from Zhat_k, and InfoNCE on aug(chunk)
                bag = torch.zeros(n, V, device=ids.device).scatter_add_(1, t, valid.float())
                logp = F.log_softmax(self.heads["bow"](hf.flatten(0, 1)[:n]).float(), dim=-1)
                st["bow"] = -(bag / bag.sum(1, keepdim=True) * logp).sum(1).mean()
                za = self.chunk_codes(self.encode(self.augment(ids[:4]))[0])
                za = za.flatten(2).flatten(0, 1).float()
                sim = F.normalize(zf[:4].flatten(0, 1), dim=-1) @ F.normalize(za, dim=-1).T / 0.07
                lab = torch.arange(sim.size(0), device=sim.device)
                # InfoNCE (van den Oord et al. 2018), both directions
                st["infonce"] = 0.5 * (F.cross_entropy(sim, lab) + F.cross_entropy(sim.T, lab))
                second = st["bow"] + st["infonce"]
            else:
                # H3: six structural flags and the unigram log-rank bucket of each position
                out = self.heads["parse"](z.flatten(0, 1)[:n]).float()
                flag = F.binary_cross_entropy_with_logits(
                    out[..., :6], self.flags[t], reduction="none"
                ).mean(-1)
                flag_loss = (flag * valid).sum() / valid.sum()
                bucket_loss = F.cross_entropy(
                    out[..., 6:].flatten(0, 1),
                    self.bucket[t].masked_fill(~valid, -100).flatten(),
                    ignore_index=-100,
                )
                st["parse"] = flag_loss + bucket_loss
                second = st["parse"]
            geo = geometry(self.embed_sentences(self.geo_ids, self.geo_len))[0]
            st["geo"] = sum(GEO_WEIGHTS[k] * v for k, v in geo.items())
            total = (
                total
                + LAMBDA_AUX * (st["recon"] + second)
                + LAMBDA_GEO * self.geo_scale * st["geo"]
            )
        with torch.no_grad():
            for key, value in st.items():
                self.stats[STAT_KEYS.index(key)] = value.detach().float()
        return total

    def set_kind(self, kind):
        """The next step's auxiliary kind ("para", "parse" or None) and, for an auxiliary step, a
        fresh geometry batch from the pool."""
        self.aux_kind = kind
        if kind:
            self.aux_counts[kind] += 1
            i = self.rng.randrange(self.geo_pool[0].size(0))
            self.geo_ids.copy_(self.geo_pool[0][i])
            self.geo_len.copy_(self.geo_pool[1][i])

    def set_training_progress(self, frac):
        """The predictor loss every step; reconstruction + one of {bag of words + InfoNCE, parse}
        (50/50) + geometry (ramped in over GEO_WARMUP) every HYDRA_AUX_EVERY steps; none in record
        mode's last AUX_CUTOFF."""
        h = self.h
        if self.priming and frac < self.last_frac:
            # The warmup sent 0.0 then 1.0; the timed run starts again low.
            self.priming = False
            self.steps = 0
            self.aux_counts = {"para": 0, "parse": 0}
        self.last_frac = frac
        self.aux_on = (
            self.prepared and h.hydra_aux and (h.hydra_mode == "research" or frac < 1 - AUX_CUTOFF)
        )
        self.geo_scale.fill_(min(1.0, frac / GEO_WARMUP))
        # The warmup cycles para, parse and CE-only (and aux off at 1.0), so torch.compile builds
        # each graph of `forward` off the clock.
        kind = None
        if self.aux_on and (self.priming or self.steps % h.hydra_aux_every == 0):
            if self.priming:
                kind = ("para", "parse", None)[self.steps % 3]
            else:
                kind = self.rng.choice(("para", "parse"))
        self.steps += 1
        self.set_kind(kind)

    def prepare_training(self, h, rt, logger):
        """Inside the clock: structural classes and augmentation maps from the tokenizer's pieces,
        unigram log-rank buckets from the first 50M train tokens, template batches (train words for
        the losses, test words for the probes), and the tail of the last train shard for the rank
        probe."""
        sp = load_tokenizer(h.tokenizer_path, h.vocab_size)
        dev = self.tok_emb.weight.device
        V = h.vocab_size
        pieces = [sp.id_to_piece(i) for i in range(V)]
        index = {p: i for i, p in enumerate(pieces)}
        flags = []
        case_map = []
        for i, p in enumerate(pieces):
            if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
                t = ""
            else:
                t = p.replace("\u2581", "")
            flags.append(
                [
                    p.startswith("\u2581"),
                    any(c in string.punctuation for c in t),
                    any(c.isdigit() for c in t),
                    any(c.isupper() for c in t),
                    p == "<0x0A>" or "\n" in t,
                    sp.is_byte(i),
                ]
            )
            # the piece with its first letter's case flipped, if the vocabulary has it
            k = next((k for k, c in enumerate(p) if c.isalpha()), None)
            flipped = p if k is None else p[:k] + p[k].swapcase() + p[k + 1 :]
            case_map.append(index.get(flipped, i))
        self.flags.copy_(torch.tensor(flags, dtype=torch.float))
        self.case_map.copy_(torch.tensor(case_map))
        shift = str.maketrans("0123456789", "1234567890")
        self.digit_map.copy_(
            torch.tensor([index.get(p.translate(shift), i) for i, p in enumerate(pieces)])
        )
        # Unigram counts of the first 50M train tokens; bucket floor(8 log(1 + rank) / log(1 + V)).
        counts = torch.zeros(V, dtype=torch.float64)
        n = 0
        files = shard_files(h.data_path, "train")
        for path in files:
            tokens = load_data_shard(path)[: 50_000_000 - n].to(torch.int64)
            counts = counts + torch.bincount(tokens, minlength=V)[:V].double()
            n = n + tokens.numel()
            if n >= 50_000_000:
                break
        rank = counts.argsort(descending=True, stable=True).argsort()  # the inverse permutation
        self.bucket.copy_((8 * torch.log1p(rank.double()) / math.log1p(V)).long().clamp(max=7))
        tail = load_data_shard(files[-1])[-512 * self.chunk :].to(torch.int64)
        self.heldout = tail[: tail.numel() // self.chunk * self.chunk].view(-1, self.chunk).to(dev)
        rng = random.Random(h.seed)
        for name, split, count in (("geo_pool", "train", 128), ("probe_set", "test", 8)):
            batches = [encode_sentences(sp, template_batch(rng, split)) for _ in range(count)]
            ids = torch.stack([b[0] for b in batches]).to(dev)
            lengths = torch.stack([b[1] for b in batches]).to(dev)
            setattr(self, name, (ids, lengths))
        self.unk_id = sp.unk_id()
        self.prepared = True
        self.priming = h.warmup_steps > 0
        n_heads = sum(p.numel() for p in self.heads.parameters())
        n_shipped = sum(p.numel() for p in self.parameters()) - n_heads
        logger.log0(
            f"hydra: shipped_params:{n_shipped} training_only_params:{n_heads} "
            f"encoder_layers:{self.n_enc} chunk:{self.chunk} aux:{h.hydra_aux} "
            f"mode:{h.hydra_mode} unigram_tokens:{n} heldout_chunks:{self.heldout.size(0)}"
        )

    @torch.no_grad()
    def validation_probes(self):
        """Geometry probes on test-vocabulary templates, effective rank of held-out chunk codes, the
        last auxiliary losses (reconstruction accuracy, exact match and its EMA 0.99) and how many
        steps ran each secondary head."""
        if not self.prepared:
            return {}
        was_training = self.training
        ids, lengths = self.probe_set
        self.eval()
        f = self.embed_sentences(ids.flatten(0, 1), lengths.flatten()).view(*ids.shape[:2], -1)
        runs = [geometry(fb)[1] for fb in f]
        out = {k: float(sum(r[k] for r in runs)) / len(runs) for k in runs[0]}
        codes = self.chunk_codes(self.encode(self.heldout)[0]).flatten(2).flatten(0, 1)
        out.update(
            analogy_gap=out["analogy"] - out["analogy_baseline"],
            rank90=effective_rank(codes, 0.90),
            rank95=effective_rank(codes, 0.95),
            codes=codes.size(0),
            **dict(zip(STAT_KEYS, self.stats.tolist())),
        )
        for kind, steps in self.aux_counts.items():
            out[f"aux_{kind}_steps"] = steps
        self.train(was_training)
        return out


def build_model(h):
    # Checked here, not in validate_model: the shared env tests parse TIE_EMBEDDINGS=0.
    if not h.tie_embeddings:
        raise ValueError("TIE_EMBEDDINGS=False: the hydra's output head is its token embedding")
    return Hydra(h)


def param_groups(model, h):
    """Muon for the CastedLinear matrices of the shipped model (trunk, pooling, predictor, memory);
    Adam for the tied embedding, for vectors, queries and the null code, and (at HEAD_LR) for the
    training-only heads, which see a gradient only every HYDRA_AUX_EVERY steps and need no
    orthogonalized update."""
    heads = list(model.heads.parameters())
    matrices = [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, CastedLinear) and not n.startswith(model.training_only_prefixes)
    ]
    special = {id(p) for p in matrices + heads} | {id(model.tok_emb.weight)}
    others = [p for p in model.parameters() if id(p) not in special]
    adam_groups = [
        {"params": [model.tok_emb.weight], "lr": h.tied_embed_lr, "base_lr": h.tied_embed_lr},
        {"params": others, "lr": h.scalar_lr, "base_lr": h.scalar_lr},
    ]
    if heads:
        adam_groups.append({"params": heads, "lr": h.head_lr, "base_lr": h.head_lr})
    return matrices, adam_groups


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
# The loop, serialization, audits and final eval are golf/train.py's pipeline; this model adds
# nothing to it.

MODEL = register_model(
    script="train_hydra.py",
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
