"""Issue 15, the rANS back end of per-group compression: exact roundtrips at every edge, the size
within a hair of the order-0 entropy (and below Brotli on quantized-weight-like codes), and
malformed streams refused with a ValueError, fast. pack.py reads artifacts through golf.container,
so this one decoder is the only one (issue 22)."""

import time

import numpy as np
import pytest

pytest.importorskip("torch")


def codes(n, seed=0, sigma=6.0, qmax=31):
    """int6-like codes: a rounded Gaussian with heavy-ish tails, clamped, as int8 bytes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, sigma, n) * (1 + 0.5 * np.abs(rng.normal(0, 1, n)))
    return np.clip(np.round(x), -qmax, qmax).astype(np.int8).tobytes()


def entropy_bytes(data):
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum() * len(data) / 8)


@pytest.mark.parametrize("n", [0, 1, 2, 8191, 8192, 8193, 3 * 8192 + 5, 200_003])
def test_roundtrip_at_every_size(gpt, n):
    data = codes(n, seed=n)
    blob = gpt.rans_compress(data)
    assert gpt.rans_decompress(blob, n) == data


@pytest.mark.parametrize(
    "data",
    [b"\x07" * 50_000, bytes(range(256)) * 300, b"\x00\xff" * 9000, b"\x80"],
    ids=["one symbol", "every byte", "two extremes", "single byte"],
)
def test_roundtrip_of_odd_alphabets(gpt, data):
    blob = gpt.rans_compress(data)
    assert gpt.rans_decompress(blob, len(data)) == data


def test_size_is_near_the_order0_entropy_and_below_brotli(gpt):
    data = codes(1 << 21)
    blob = gpt.rans_compress(data)
    lanes = gpt._rans_lanes(len(data))
    bound = entropy_bytes(data)
    # the 14-bit table rounding costs well under 0.1%; each lane carries ~2 bytes of start state
    assert bound < len(blob) < bound * 1.001 + 4 * lanes + 200
    if gpt.brotli is not None:
        assert len(blob) < 0.995 * len(gpt.PERGROUP_CODECS["brotli"][0](data))


def test_malformed_streams_are_refused_quickly(gpt):
    data = codes(100_000, seed=3)
    blob = gpt.rans_compress(data)
    n = len(data)
    bad = {
        "truncated": blob[:-2],
        "header only": blob[:10],
        "trailing word": blob + b"\x00\x00",
        "odd length": blob + b"\x00",
        "lanes changed": blob[:4] + (7).to_bytes(4, "little") + blob[8:],
        "table sum": blob[:10] + b"\x01\x00" + blob[12:],
    }
    rng = np.random.default_rng(0)
    for k, at in enumerate(rng.integers(10, len(blob), 40)):
        flipped = bytearray(blob)
        flipped[at] ^= 1 << int(rng.integers(0, 8))
        bad[f"flip {k} at {at}"] = bytes(flipped)
    for name, stream in bad.items():
        t0 = time.perf_counter()
        with pytest.raises(ValueError):
            gpt.rans_decompress(stream, n)
        assert time.perf_counter() - t0 < 5, name
    with pytest.raises(ValueError, match="beyond"):
        gpt.rans_decompress(blob, n - 1)  # refused from the header, before decoding


def test_pergroup_compression_picks_rans_for_int_codes(gpt):
    """Int code groups as large as a sample go to rANS, the float group does not, and the
    payload decodes back to the raw bytes."""
    n = gpt.PERGROUP_SAMPLE_BYTES * 2
    q = np.frombuffer(codes(n, seed=5), np.int8)
    f = np.random.default_rng(6).normal(0, 1, 4096).astype(np.float16)
    raw = q.tobytes() + f.tobytes()
    scale_at = len(raw)
    scales = np.full(n // 1024, 0.01, np.float16).tobytes()
    raw += scales
    entries = [
        {
            "name": "blocks.0.mlp.fc.weight",
            "scheme": "int6",
            "shape": [n // 1024, 1024],
            "data": [0, n],
            "scale": [scale_at, len(scales)],
        },
        {"name": "blocks.0.attn_scale", "scheme": "fp16", "shape": [4096], "data": [n, 8192]},
    ]
    payload, groups = gpt.compress_pergroup(entries, raw, sort_rows=False)
    codec = {g["name"]: g["codec"] for g in groups}
    assert codec["mlp.int6"] == "rans"
    header = {"tensors": entries, "groups": groups, "raw_bytes": len(raw)}
    assert gpt.decompress_pergroup(header, payload) == raw
