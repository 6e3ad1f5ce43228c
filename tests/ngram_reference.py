"""A plain token-by-token reference of the token-only n-gram hints, written from the record's state
machine (#2135's online_ngram_state.c and online_ngram_tilt.py: a ring of the last L tokens seeded
with the first target, a context table and a pair table keyed by 64-bit hashes, a top token that
changes only on a strictly larger pair count) and not from golf/ngram.py's vectorized code. Tests
compare the two. Plain Python: about 10-20 s per million tokens."""

import numpy as np

MASK = (1 << 64) - 1
COEFFS = (
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
    2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
)  # fmt: skip
PAIR_MIX = 1000003


def reference_hints(tokens, order=16, threshold=0.8):
    """(hint, gate) per val position j (the target tokens[j]), as the record's single pass over
    the targets tokens[1:] computes them."""
    tokens = [int(t) for t in np.asarray(tokens)]
    n = len(tokens)
    hint = np.zeros(n, dtype=np.int32)
    gate = np.zeros(n, dtype=bool)
    if n < 2:
        return hint, gate
    ctx_len = order - 1
    limit = np.float32(threshold)
    contexts = {}  # key -> [total, top count, top token]
    pairs = {}  # pair key -> count
    ring = [tokens[1]]  # the record seeds the ring with the first target
    pair_coeff = COEFFS[ctx_len % len(COEFFS)]
    for j in range(1, n):  # target j is the record's target j - 1
        tok = tokens[j]
        if len(ring) >= ctx_len:
            key = 0
            for k, t in enumerate(ring[len(ring) - ctx_len :]):  # oldest first
                key ^= (t * COEFFS[k]) & MASK
            entry = contexts.get(key)
            if entry is not None:
                hint[j] = entry[2]
                gate[j] = np.float32(entry[1]) / np.float32(entry[0]) >= limit
            pair_key = ((key * PAIR_MIX) & MASK) ^ ((tok * pair_coeff) & MASK)
            count = pairs.get(pair_key, 0) + 1
            pairs[pair_key] = count
            if entry is None:
                contexts[key] = [1, count, tok]
            else:
                entry[0] += 1
                if count > entry[1]:
                    entry[1] = count
                    entry[2] = tok
        ring.append(tok)
        if len(ring) > max(ctx_len, 1):
            del ring[0]
    return hint, gate
