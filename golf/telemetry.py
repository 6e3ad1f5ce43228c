"""Run telemetry (docs/techniques.md, Telemetry): smoothed losses (SMMA 10/100/1000) and the cliff
flag, the coherence of a greedy sample at each validation, embedding probes, and the optional
UCB1 shard mixer whose reward is a held-out slice of training data."""

import numpy as np
import torch
import torch.nn.functional as F

from golf.evaluation import _autocast, _model_device


class Smma:
    """SMMA_t = (SMMA_{t-1} (N - 1) + x_t) / N, seeded with the first value."""

    def __init__(self, n):
        self.n = n
        self.value = None

    def update(self, x):
        self.value = x if self.value is None else (self.value * (self.n - 1) + x) / self.n
        return self.value


def coherence_score(text):
    """0-100: word bigram diversity (35) + trigram diversity (35) + English-looking words (20) +
    distinct characters (10). "region region ..." scores about 23, ordinary prose 70 or more."""
    words = text.split()
    if not words:
        return 0.0

    def diversity(n):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0

    english = sum(
        w.isalpha() and len(w) <= 20 and any(c in "aeiouyAEIOUY" for c in w) for w in words
    )
    return (
        35 * diversity(2)
        + 35 * diversity(3)
        + 20 * english / len(words)
        + 10 * min(1.0, len(set(text)) / 25)
    )


@torch.no_grad()
def generate_sample(model, sp, prompt, n_tokens, seq_len, temperature=0.0, seed=0):
    """Greedy (temperature 0) or sampled continuation of a fixed prompt, for the sample audit."""
    device = _model_device(model)
    prompt_ids = sp.encode(prompt)
    was_training = model.training
    ids = [1] + prompt_ids  # BOS first, as every document in the shards
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    for _ in range(n_tokens):
        x = torch.tensor([ids[-seq_len:]], device=device)
        with _autocast(device):
            logits = model.forward_logits(x)[0, -1].float().cpu()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        else:
            ids.append(int(logits.argmax()))
    model.train(was_training)
    return sp.decode(ids[1 + len(prompt_ids) :])


def embedding_probes(
    weight, sp, other=None, words=("the", "and", "of", "in", "is", "for", "with", "not")
):
    """Anisotropy (mean cosine of random pairs), effective rank at 90/95% variance, top-5 cosine
    neighbours of a fixed probe list, and (with `other`, e.g. the dequantized copy) neighbour
    overlap@5."""
    w = F.normalize(weight.detach().float().cpu(), dim=-1)
    i, j = torch.randint(0, w.size(0), (2, 4096), generator=torch.Generator().manual_seed(0))
    s2 = torch.linalg.svdvals(weight.detach().float().cpu()).square()
    cum = torch.cumsum(s2, 0) / s2.sum()
    probes = [
        p
        for p in (sp.piece_to_id("\u2581" + t) for t in words)
        if 0 < p < w.size(0) and not sp.is_unknown(p)
    ]

    def top5(m):
        sim = m[probes] @ m.T
        sim[torch.arange(len(probes)), probes] = -2.0
        return sim.topk(5, dim=-1).indices

    nb = top5(w) if probes else torch.zeros(0, 5, dtype=torch.long)
    out = {
        "anisotropy": float((w[i] * w[j]).sum(-1).mean()),
        "rank90": int((cum < 0.90).sum()) + 1,
        "rank95": int((cum < 0.95).sum()) + 1,
        "neighbours": {
            sp.id_to_piece(p): [sp.id_to_piece(int(q)) for q in row] for p, row in zip(probes, nb)
        },
    }
    if other is not None and probes:
        nb2 = top5(F.normalize(other.detach().float().cpu(), dim=-1))
        out["neighbour_overlap"] = float(
            sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nb, nb2)) / (5 * len(probes))
        )
    return out


def project_capped_simplex(w, lo, hi, iters=100):
    """argmin ||x - w|| s.t. lo <= x <= hi, sum x = 1: x = clip(w + tau, lo, hi) with tau by
    bisection."""
    w = np.asarray(w, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12 or (lo > hi).any():
        raise ValueError(
            f"shard mixer: infeasible bounds (sum of floors {lo.sum():.3f}, of caps {hi.sum():.3f})"
        )
    a = (lo - w).min() - 1  # tau bracket: the sum is below 1 at a, above 1 at b
    b = (hi - w).max() + 1
    for _ in range(iters):
        tau = (a + b) / 2
        if np.clip(w + tau, lo, hi).sum() < 1:
            a = tau
        else:
            b = tau
    return np.clip(w + (a + b) / 2, lo, hi)


class ShardMixer:
    """UCB1 over training shards (optional, off by default; evidence for it is weak, PR #737). Each
    phase plays the arm with the best upper confidence bound: its one-hot, projected onto {floor
    <= w <= cap, sum w = 1}, gives the sampling weights. The reward of a phase is the loss drop
    on a held-out slice of *training* data, never val."""

    def __init__(self, h, n_shards):
        self.h = h
        self.k = n_shards
        self.arm = 0
        self.last_loss = None
        self.counts = np.zeros(n_shards)
        self.rewards = np.zeros(n_shards)
        self.rng = np.random.default_rng(h.seed)
        self.lo = np.full(n_shards, min(h.mixer_floor, 1.0 / n_shards))
        self.hi = np.full(n_shards, max(h.mixer_cap, 1.0 / n_shards))
        self.weights = project_capped_simplex(np.eye(n_shards)[0], self.lo, self.hi)

    def pick(self):
        return int(self.rng.choice(self.k, p=self.weights))

    def end_phase(self, heldout_loss):
        if self.last_loss is not None:
            self.counts[self.arm] += 1
            self.rewards[self.arm] += self.last_loss - heldout_loss
        self.last_loss = heldout_loss
        n = self.counts.sum()
        plays = np.maximum(self.counts, 1)
        ucb = self.rewards / plays + self.h.mixer_ucb_c * np.sqrt(np.log(max(n, 1)) / plays)
        self.arm = int(np.argmax(np.where(self.counts == 0, np.inf, ucb)))
        self.weights = project_capped_simplex(np.eye(self.k)[self.arm], self.lo, self.hi)
        return self.weights
