"""Independent numpy references for the quant block of the training scripts, written from the
definitions (per-row symmetric int-k with fp16 scales; GPTQ-lite clip search; SD-clip; GPTQ in its
original one-column-at-a-time form with the inverse Hessian downdated after each column, Frantar et
al. 2022) and not from the scripts' code. Tests compare the scripts against these."""

import numpy as np


def quantize_rows(w, bits, clip):
    """Per-row int-k: s = fp16(c / qmax) (1 where that is 0),
    q = round-half-even(clamp(w, -c, c) / s)."""
    w = np.asarray(w, dtype=np.float32)
    clip = np.maximum(np.asarray(clip, dtype=np.float32), np.float32(0))
    qmax = np.float32(2 ** (bits - 1) - 1)
    scale = (clip / qmax).astype(np.float16)
    scale[scale == 0] = 1  # c == 0, or c / qmax underflows fp16
    s = scale.astype(np.float32)[:, None]
    x = np.minimum(np.maximum(w, -clip[:, None]), clip[:, None]) / s
    q = np.clip(np.round(x), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_rows(q, scale):
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def clip_search(w, bits, quantiles):
    """Per row, the quantile of |w| (linear interpolation) whose roundtrip has the least
    squared error."""
    w = np.asarray(w, dtype=np.float32)
    best = np.empty(w.shape[0], dtype=np.float32)
    for r in range(w.shape[0]):
        row = w[r : r + 1]
        cands = [np.float32(np.quantile(np.abs(row[0]), q)) for q in quantiles]
        errs = [
            float(((dequantize_rows(*quantize_rows(row, bits, np.array([c]))) - row) ** 2).sum())
            for c in cands
        ]
        best[r] = cands[int(np.argmin(errs))]
    return best


def sdclip(w, k):
    return np.float32(k) * np.asarray(w, dtype=np.float64).std(axis=1).astype(np.float32)


def gptq(w, H, bits, clip, damp=0.01, wide=None, wide_bits=8):
    """GPTQ without blocks or Cholesky: visit columns by decreasing H diagonal; after quantizing
    column i, move its error onto the unquantized columns with the inverse Hessian, then remove i
    from the inverse Hessian (Gaussian elimination of one variable). float64 throughout. wide:
    a boolean per column, those rounded at wide_bits on the same clip with their own fp16 row
    scales (AWQ-lite); then the wide scales are returned too."""
    W = np.asarray(w, dtype=np.float64).copy()
    H = np.asarray(H, dtype=np.float64).copy()
    d = np.diag(H).copy()
    d[d <= 0] = 1.0
    np.fill_diagonal(H, d)
    H += np.eye(len(d)) * damp * d.mean()
    Hinv = np.linalg.inv(H)
    qmax = 2 ** (bits - 1) - 1
    scale = quantize_rows(W[:, :1], bits, clip)[1]
    s = scale.astype(np.float64)
    c = np.maximum(np.asarray(clip, dtype=np.float64), 0)
    wide = np.zeros(W.shape[1], dtype=bool) if wide is None else np.asarray(wide)
    wide_max = 2 ** (wide_bits - 1) - 1
    wide_scale = quantize_rows(W[:, :1], wide_bits, clip)[1]
    Q = np.zeros(W.shape, dtype=np.int8)
    left = list(np.argsort(-d, kind="stable"))
    while left:
        i, rest = left[0], left[1:]
        step = wide_scale.astype(np.float64) if wide[i] else s
        top = wide_max if wide[i] else qmax
        q = np.clip(np.round(np.clip(W[:, i], -c, c) / step), -top, top)
        Q[:, i] = q
        err = (W[:, i] - q * step) / Hinv[i, i]
        W[:, rest] -= np.outer(err, Hinv[i, rest])
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
        left = rest
    if wide.any():
        return Q, scale, wide_scale
    return Q, scale


def entropy_bytes(q):
    _, counts = np.unique(np.asarray(q).ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) * q.size / 8
