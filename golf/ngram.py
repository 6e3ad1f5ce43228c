"""The token-only n-gram tilt (#2130/#2135, from #1145; legality precedent #1514): at scoring time
only, a hint computed from the val tokens before a target boosts one token of the model's
distribution for that target.
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

# --- The hints (issue 23, item 1) ----------------------------------------------------------------
# One left-to-right pass over the val stream in file order keeps, per hash of the previous
# TOKEN_ORDER - 1 tokens, how often the context was seen and its most frequent next token; at each
# target the hint is read before the target itself is counted, so a hint depends on earlier tokens
# only. Where the hint's share (its count / the context's count) reaches TOKEN_THRESHOLD, scoring
# tilts the distribution towards it (tilted_nll). The record (#2135's online_ngram_state.c) keeps
# the state in C hash tables and walks the stream token by token; here the same numbers come from
# sorts and running maxima over the whole stream at once, exactly equal (tests/ngram_reference.py
# is the token-by-token walk, and the tests compare the two on real tokens):
# - The context key is the record's: the XOR over the L = TOKEN_ORDER - 1 previous tokens of
#   token * ROLLING_COEFFS[j], j = 0 for the oldest, in wrapping uint64. Different contexts can
#   share a key (the products fit 38 bits): such contexts share one entry, as in the record.
# - A (context, next token) pair is counted under the key (ctx * PAIR_MIX) ^ (token * coefficient
#   L mod 32), again the record's; pairs sharing a key share a count.
# - A context's top token changes only when a pair's count strictly exceeds the top count: on a
#   tie the token that reached the count first keeps it.
# - The record's open-addressing tables store the full 64-bit keys and are sized for the stream
#   at a load factor of 0.55 (no knob sets them), so they never fill and act as exact maps: no
#   table-size knob exists, here or there.
# - The state runs across documents (BOS is a token like any other) and starts with the ring
#   seeded by the first target: the record's wrapper pushes target 0 (val token 1) before the pass,
#   so the hashed stream is the val tokens with token 0 replaced by token 1 (this touches only the
#   contexts that reach back to position 0). A target has a hint from position L on.

ROLLING_COEFFS = np.array(
    [
        36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433,
        917521, 1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169,
        2228243, 2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903,
        3538973,
    ],
    dtype=np.uint64,
)  # fmt: skip
PAIR_MIX = 1000003
MAX_TOKEN_ORDER = len(ROLLING_COEFFS) + 1  # one coefficient per context token


def hinted_stream(tokens):
    """The stream the record hashes: the val tokens (uint64) with token 0 replaced by token 1."""
    stream = np.asarray(tokens).astype(np.uint64)
    if stream.size > 1:
        stream[0] = stream[1]
    return stream


def _runs(sorted_keys, index):
    """Where each run of equal keys starts (a bool mask) and, per slot, its run's first slot;
    `index` is np.arange(len(sorted_keys)) (made once by the caller)."""
    starts = np.ones(sorted_keys.size, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    first = np.where(starts, index, 0)
    np.maximum.accumulate(first, out=first)
    return starts, first


def _bits(value):
    return max(int(value).bit_length(), 1)


def _key_position_order(keys):
    """(order, sorted keys): the indices that sort `keys` by (key, index), i.e. a stable argsort,
    built from fast unstable sorts (numpy's stable argsort of 48M keys takes ~3x longer): when a
    key and an index fit one uint64 together, one sort of the packed pairs; otherwise an argsort
    of the keys, then a sort of the packed (run of equal keys, index) pairs."""
    n = keys.size
    shift = np.uint64(_bits(n - 1))
    index_mask = np.uint64((1 << int(shift)) - 1)
    if n and _bits(keys.max()) + int(shift) <= 64:
        packed = keys << shift
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        order = (packed & index_mask).view(np.int64)
        packed >>= shift
        return order, packed
    order = np.argsort(keys)
    sorted_keys = keys[order]
    starts = np.ones(n, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    packed = np.cumsum(starts, dtype=np.uint64) << shift  # run numbers keep the key order
    packed |= order.view(np.uint64)
    packed.sort()
    return (packed & index_mask).view(np.int64), sorted_keys


def context_keys(stream, order, block=1 << 16):
    """The record's context key of every target position p >= L = order - 1 (the L tokens before
    it, oldest first), as uint64 for positions L..N-1; in blocks that stay in cache."""
    ctx_len = order - 1
    keys = np.zeros(max(stream.size - ctx_len, 0), dtype=np.uint64)
    product = np.empty(block, dtype=np.uint64)
    for lo in range(0, keys.size, block):
        out = keys[lo : lo + block]
        buf = product[: out.size]
        for j in range(ctx_len):  # token j of the context of position p is p - L + j
            np.multiply(stream[lo + j : lo + j + out.size], ROLLING_COEFFS[j], out=buf)
            out ^= buf
    return keys


def _pair_keys(ctx, targets, ctx_len):
    pair = ctx * np.uint64(PAIR_MIX)
    pair ^= targets * ROLLING_COEFFS[ctx_len % len(ROLLING_COEFFS)]
    return pair


def _pair_counts_by_key(ctx, targets, ctx_len, ctx_order, index):
    """Each position's pair count once it is counted (its rank among equal pair keys, in order),
    in the context order: the general way, one sort of every pair key."""
    pair_order, sorted_pairs = _key_position_order(_pair_keys(ctx, targets, ctx_len))
    _, first = _runs(sorted_pairs, index)
    del sorted_pairs
    pair_count = np.empty(targets.size, dtype=np.int64)
    pair_count[pair_order] = index - first + 1
    return pair_count[ctx_order]


def _pair_counts_in_contexts(sorted_ctx, tokens, ctx_len, starts, index):
    """The same counts from the context order, sorting only the positions whose context repeats:
    a pair's count is its (context, token) rank, exact when no two pairs of the stream share a
    pair key (checked: one sort of a key per distinct pair). None when that check fails or the
    packed sort does not fit 64 bits: the caller takes the general way."""
    m = sorted_ctx.size
    alone = starts.copy()  # a context seen once: its pair is counted once
    alone[:-1] &= starts[1:]
    repeated = np.nonzero(~alone)[0]
    run = np.cumsum(starts[repeated], dtype=np.uint64)
    index_bits = _bits(repeated.size)
    token_bits = _bits(tokens.max())
    if repeated.size and _bits(run[-1]) + token_bits + index_bits > 64:
        return None
    packed = run << np.uint64(token_bits)
    del run
    packed |= tokens[repeated]
    packed <<= np.uint64(index_bits)
    packed |= np.arange(repeated.size, dtype=np.uint64)
    packed.sort()
    slots = (packed & np.uint64((1 << index_bits) - 1)).view(np.int64)
    packed >>= np.uint64(index_bits)
    pair_starts, pair_first = _runs(packed, index[: packed.size])
    del packed
    counts = np.ones(m, dtype=np.int64)
    counts[repeated[slots]] = index[: slots.size] - pair_first + 1
    # One slot per distinct pair: every lone context's, and each repeated pair's first.
    distinct = np.concatenate([np.nonzero(alone)[0], repeated[slots[pair_starts]]])
    keys = _pair_keys(sorted_ctx[distinct], tokens[distinct], ctx_len)
    keys.sort()
    if (keys[1:] == keys[:-1]).any():
        return None
    return counts


def ngram_hints(tokens, order=16, threshold=0.8):
    """(hint, gate) for every position j of the val tokens, the target token j predicted from
    tokens before it: the n-gram hint (int32, 0 where there is none, as the record) and whether
    its share reaches `threshold` (bool). Position 0 is no target: never gated. Vectorized: no
    per-token Python loop."""
    if not 1 <= order <= MAX_TOKEN_ORDER:
        raise ValueError(f"TOKEN_ORDER={order}: must be in 1..{MAX_TOKEN_ORDER}")
    stream = hinted_stream(tokens)
    n = stream.size
    hint = np.zeros(n, dtype=np.int32)
    gate = np.zeros(n, dtype=bool)
    ctx_len = order - 1
    first_pos = max(ctx_len, 1)  # the first target with a full context (position 0 is none)
    if n <= first_pos:
        return hint, gate
    ctx = context_keys(stream, order)[first_pos - ctx_len :]
    targets = stream[first_pos:]
    m = targets.size
    index = np.arange(m)
    # Per context key, positions in order (slots): the count of the context before a slot is
    # its rank in its run; the top token is the running argmax of the pair counts (the first
    # slot to reach the max).
    ctx_order, sorted_ctx = _key_position_order(ctx)
    starts, first = _runs(sorted_ctx, index)
    sorted_targets = targets[ctx_order]
    counts = _pair_counts_in_contexts(sorted_ctx, sorted_targets, ctx_len, starts, index)
    del sorted_ctx
    if counts is None:
        counts = _pair_counts_by_key(ctx, targets, ctx_len, ctx_order, index)
    del ctx
    ranked = np.cumsum(starts, dtype=np.int64)
    ranked *= m + 1  # runs made increasing from one to the next: one running max serves all
    ranked += counts
    best = np.maximum.accumulate(ranked)
    record = np.ones(m, dtype=bool)
    np.greater(ranked[1:], best[:-1], out=record[1:])
    del ranked, best
    leader = np.where(record, index, 0)  # the slot holding the top token
    np.maximum.accumulate(leader, out=leader)
    del record
    # A slot reads the state its context had after the slot before it in the same run.
    slots = np.nonzero(~starts)[0]
    del starts
    lead = leader[slots - 1]
    del leader
    share = counts[lead].astype(np.float32) / (slots - first[slots]).astype(np.float32)
    del counts, first
    positions = first_pos + ctx_order[slots]
    hint[positions] = sorted_targets[lead]
    gate[positions] = share >= np.float32(threshold)  # float32, as the record divides
    return hint, gate


# --- The tilt ------------------------------------------------------------------------------------
# At a gated target the scored distribution is p'(a) = p(a) e^(b [a = h]) / Z with
# Z = 1 + p(h) (e^b - 1): a full distribution over the vocabulary (the tests sum it), so
# -log p'(y) = -log p(y) - b [y = h] + log(1 + p(h) (e^b - 1)). It enters scoring only: the TTT
# trainers learn from the untilted NLL, and the correction is computed without gradient.


def tilted_nll(logits, targets, hint, gate, boost, nll=None):
    """Per-token NLL (fp32, shaped like targets) of the targets under the tilted distribution: at
    positions where `gate` holds, the model's distribution boosted by e^boost on `hint` and
    renormalized in closed form; elsewhere exactly the untilted cross-entropy. `nll`: that
    cross-entropy when the caller has it already (the log-sum-exp over the vocabulary is the
    costly part, and it is done once)."""
    flat = logits.float().reshape(-1, logits.size(-1))
    y = targets.reshape(-1)
    if nll is None:
        nll = F.cross_entropy(flat, y, reduction="none")
    nll = nll.reshape(-1)
    with torch.no_grad():
        h = hint.reshape(-1).long()
        # -log p(h) = -log p(y) + z_y - z_h: the same log-sum-exp, no second pass.
        z_y = flat.detach().gather(1, y[:, None]).squeeze(1)
        z_h = flat.detach().gather(1, h[:, None]).squeeze(1)
        hint_nll = nll.detach() + z_y - z_h
        hit = y == h
        # log Z in float64: log1p(p(h) (e^b - 1)), p(h) = e^-hint_nll
        log_z = torch.log1p(torch.exp(-hint_nll.double()) * math.expm1(boost))
        tilted = (nll.detach().double() - boost * hit.double() + log_z).float()
    return torch.where(gate.reshape(-1), tilted, nll).view(targets.shape)


class NgramTilt:
    """The hints of one val stream on the scoring device, the boost, and what the precompute and
    its audit found (`info`, the eval result's `ngram_tilt`)."""

    def __init__(self, hint, gate, boost, info):
        self.hint = hint
        self.gate = gate
        self.boost = boost
        self.info = info

    def nll(self, logits, targets, positions, nll=None):
        """tilted_nll of targets at val `positions` (absolute target positions, same shape);
        `nll`: their untilted cross-entropy, when the caller has it."""
        hint = self.hint[positions]
        return tilted_nll(logits, targets, hint, self.gate[positions], self.boost, nll)


AUDIT_TOKENS = 1 << 16  # the val prefix the run-time audit recomputes
AUDIT_VOCAB_ROWS = 2  # random logit rows whose tilted distribution is summed over the vocabulary


def build_ngram_tilt(h, val_tokens, device):
    """The tilt for scoring val_tokens under h's NGRAM_TILT_ENABLED / TOKEN_* knobs, or None when it
    is off. Called inside an eval's clock: the precompute is part of the eval (as the record's
    NGRAM_HINT_PRECOMPUTE_OUTSIDE=0), timed in info["precompute_s"], then audited (info["audit_s"],
    also inside the eval's clock)."""
    if not h.ngram_tilt_enabled:
        return None
    t0 = time.perf_counter()
    tokens = val_tokens.cpu().numpy()
    hint, gate = ngram_hints(tokens, h.token_order, h.token_threshold)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    audit = audit_ngram_tilt(
        tokens[:AUDIT_TOKENS],
        hint[:AUDIT_TOKENS],
        gate[:AUDIT_TOKENS],
        lambda t: ngram_hints(t, h.token_order, h.token_threshold),
        h.token_boost,
        h.vocab_size,
    )
    info = {
        "order": h.token_order,
        "threshold": h.token_threshold,
        "boost": h.token_boost,
        "targets": max(tokens.size - 1, 0),
        "gated": int(gate.sum()),
        "gated_hits": int((gate[1:] & (hint[1:] == tokens[1:])).sum()),
        "precompute_s": seconds,
        "audit_s": time.perf_counter() - t1,
        **audit,
    }
    return NgramTilt(
        torch.from_numpy(hint).to(device), torch.from_numpy(gate).to(device), h.token_boost, info
    )


def tilt_mass_error(vocab_size, boost, seed=0, targets_per_call=512):
    """max |sum_a p'(a) - 1| over a few random logit rows, p'(a) = exp(-tilted_nll) of every token
    a of the vocabulary as the target (the row repeated, a block of targets per call)."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(AUDIT_VOCAB_ROWS):
        row = torch.randn(1, vocab_size, generator=gen) * 4
        hint = torch.randint(0, vocab_size, (1,), generator=gen)
        mass = 0.0
        for lo in range(0, vocab_size, targets_per_call):
            targets = torch.arange(lo, min(lo + targets_per_call, vocab_size))
            k = targets.numel()
            nll = tilted_nll(
                row.expand(k, vocab_size),
                targets,
                hint.expand(k),
                torch.ones(k, dtype=torch.bool),
                boost,
            )
            mass += float(torch.exp(-nll.double()).sum())
        worst = max(worst, abs(mass - 1.0))
    return worst


def audit_ngram_tilt(tokens, hint, gate, hint_fn, boost, vocab_size, seed=0):
    """C1 and C2 of the tilt, on a val sample (tokens) and the hints the scorer will use for it:
    hint_fn's hints at positions <= p do not move when tokens p.. change (several cuts: a hint
    that reads its own target moves at p), the scorer's hints are hint_fn's, and the tilted
    distribution of random logits sums to 1 over the vocabulary at every gated row."""
    failures = []
    tokens = np.asarray(tokens)
    n = tokens.size
    base_hint, base_gate = hint_fn(tokens)
    if not (np.array_equal(base_hint, hint) and np.array_equal(base_gate, gate)):
        wrong = int(((base_hint != hint) | (base_gate != gate)).sum())
        failures.append(f"{wrong} of the scorer's hints differ from a recomputation on the sample")
    rng = np.random.default_rng(seed)
    cuts = sorted({p for p in (1, 2, n // 3, n // 2, n - 2) if 0 < p < n})
    for p in cuts:
        changed = tokens.copy()
        changed[p:] = (changed[p:] + 1 + rng.integers(0, vocab_size - 1, n - p)) % vocab_size
        cut_hint, cut_gate = hint_fn(changed)
        moved = (cut_hint[: p + 1] != base_hint[: p + 1]) | (
            cut_gate[: p + 1] != base_gate[: p + 1]
        )
        if moved.any():
            failures.append(
                f"prefix: changing tokens {p}.. moved {int(moved.sum())} hints at positions <= {p}"
            )
    worst = tilt_mass_error(vocab_size, boost, seed)
    if not worst <= 1e-5:
        failures.append(f"normalization: the tilted distribution sums to 1 +- {worst:.3g}")
    return {
        "passed": not failures,
        "failures": failures[:5],
        "audit_tokens": int(n),
        "cuts": cuts,
        "max_mass_error": worst,
    }
