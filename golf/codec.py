"""Compression of the artifact payload: single-stream compressors, the per-group layout with row
sorting, the rANS entropy coder, the compressed header; every decoder bounded.
"""

import lzma
import os
import struct
import zlib

import numpy as np
import torch

from golf.quant import ENTRY_PARTS, tensor_role
from golf.runtime import sha256_hex

try:
    import brotli
except ImportError:  # Brotli is optional: the per-group compressor uses it where installed
    brotli = None
try:
    import zstandard
except ImportError:  # zstd is optional: zlib and lzma are in the standard library
    zstandard = None


ARTIFACT_MAX_RAW_BYTES = 1 << 30  # the most any payload may inflate to (a 16 MB artifact: ~30 MB)


ARTIFACT_MAX_TENSORS = 65536


ARTIFACT_MAX_RANK = 8


ZSTD_MAX_WINDOW = 1 << 27  # zstd -22 uses at most a 128 MiB window


LZMA_MEMLIMIT = 1 << 28  # preset 9e needs ~65 MiB to decode


MAX_HEADER_BYTES = 16 << 20


def _is_count(value):
    """A non-negative int (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bounded(decompressor, data, limit):
    """At most limit + 1 bytes out of a zlib or lzma stream: a longer stream is refused, not
    inflated. limit is a validated raw_bytes (0 <= limit <= ARTIFACT_MAX_RAW_BYTES)."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    out = decompressor.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    return out


def _zstd_bounded(data, limit):
    """zstd streamed in 1 MiB reads that stop at limit + 1 bytes: a frame that declares a huge
    content size is read, not trusted (one-shot decompress allocates what the frame declares)."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    chunks = []
    got = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    with dctx.stream_reader(data, read_across_frames=True) as reader:
        while got <= limit:
            chunk = reader.read(min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    return b"".join(chunks)


# name: (compress(data, level), decompress(data, limit)); zstd needs the zstandard package.
COMPRESSORS = {
    "zstd": (
        lambda d, level: zstandard.ZstdCompressor(level=level).compress(d),
        _zstd_bounded,
    ),
    "lzma": (
        lambda d, level: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
        lambda d, limit: _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), d, limit),
    ),
    "zlib": (
        lambda d, level: zlib.compress(d, 9),
        lambda d, limit: _bounded(zlib.decompressobj(), d, limit),
    ),
}


def compress_payload(raw, compressor, zstd_level=22):
    """The named compressor, or ('auto') each available one in threads (they release the GIL);
    smallest wins."""
    from concurrent.futures import ThreadPoolExecutor

    if compressor == "zstd" and zstandard is None:
        raise RuntimeError("COMPRESSOR=zstd: the zstandard package is not installed")
    if compressor == "auto":
        names = [n for n in COMPRESSORS if n != "zstd" or zstandard]
    else:
        names = [compressor]
    with ThreadPoolExecutor(len(names)) as pool:
        blobs = list(pool.map(lambda n: COMPRESSORS[n][0](raw, zstd_level), names))
    return min(zip(names, blobs), key=lambda nb: len(nb[1]))


# --- per-group compression (PR #1855): tensors bucketed by role, rows sorted, best back end ------
# The logical payload (the tensor entries' offsets) is the same as for one stream; only its
# storage differs: each group's parts are concatenated (int rows in a stored order), compressed by
# whichever back end makes the group smallest, and the streams follow one another. The header's
# "groups" names each group, its back end, its compressed length and whether its rows are sorted;
# a reader recomputes the groups from the checked entries, so it trusts none of their sizes.

PERGROUP_SAMPLE_BYTES = 1 << 19  # bytes of each group on which the back ends are compared
PERGROUP_AUTO_MIN_RAW = 4 << 20  # "auto" uses per-group from this raw size (overheads below)
PERGROUP_SEGMENT_BYTES = 4 << 20  # groups are compressed in segments of this many raw bytes, in
# parallel (one Brotli-11 stream of the 17 MB MLP group alone took minutes); each segment restarts
# its back end's model, which costs a few hundred bytes
SORT_MIN_BYTES = 1 << 16  # smaller groups keep their row order
SORT_MAX_ROWS = 8192  # the row order is uint16, and the greedy tour costs rows^2
SORT_SAMPLE_ROWS = 256  # rows of a group's largest tensor on which sorting is tried first


def _brotli_bounded(data, limit):
    """Brotli with an output ceiling of limit + 1 bytes; a stream that is not finished there (or
    that is cut short) is refused."""
    if not 0 <= limit <= ARTIFACT_MAX_RAW_BYTES:
        raise ValueError(f"decompression limit {limit} is outside [0, {ARTIFACT_MAX_RAW_BYTES}]")
    dec = brotli.Decompressor()
    out = dec.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    if not dec.is_finished():
        raise ValueError("brotli stream is truncated or has trailing data")
    return out


def _zstd_long(data, level):
    """zstd with a 128 MiB window and long-distance matching (what `zstd --long=27` does)."""
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=27, enable_ldm=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


# --- rANS: an entropy coder for the int code groups ---------------------------------------------
# Quantized weights are close to independent draws from one distribution per group: a general
# compressor's Huffman or LZ modelling stays about 1% above their order-0 entropy, an arithmetic
# coder with the group's own frequency table gets within a few hundredths of a percent of it.
# Range asymmetric numeral systems (Duda 2013, arXiv:1311.2540) with many interleaved states
# (Giesen 2014) so numpy codes a whole row of lanes per step. One static table per segment.
# Layout, little-endian: n (u32), lanes (u32), lowest and highest byte value (u8, u8), the
# frequencies of lowest..highest (u16 each, summing to 2^RANS_PROB_BITS), each lane's final state
# (u32), then the 16-bit renormalization words in the order the decoder reads them. The decoder
# checks that every lane ends in the state the encoder started from: a corrupt stream is refused.

RANS_PROB_BITS = 14
RANS_LOW = 1 << 16  # states live in [RANS_LOW, 2^32); renormalization moves 16 bits
RANS_STEPS = 8192  # symbols per lane: lanes = ceil(n / RANS_STEPS), each costs ~2 bytes of state


def _rans_lanes(n):
    return max(1, -(-n // RANS_STEPS))


def _rans_table(counts):
    """Frequencies summing to 2^RANS_PROB_BITS, at least 1 for every symbol that occurs: the
    counts scaled down, the remainder given to (or taken from) the commonest symbols."""
    total = 1 << RANS_PROB_BITS
    freqs = np.floor(counts * (total / max(int(counts.sum()), 1))).astype(np.int64)
    freqs[(counts > 0) & (freqs == 0)] = 1
    by_count = np.argsort(-counts, kind="stable")
    used = int((counts > 0).sum())
    k = 0
    while freqs.sum() != total:
        j = by_count[k % used]
        if freqs.sum() < total:
            freqs[j] += 1
        elif freqs[j] > 1:
            freqs[j] -= 1
        k += 1
    return freqs


def rans_compress(data):
    """The rANS stream of data (bytes), order 0 with its own frequency table."""
    sym = np.frombuffer(data, np.uint8)
    n = len(sym)
    if n == 0:
        return struct.pack("<IIBB", 0, 0, 0, 0)
    counts = np.bincount(sym, minlength=256)
    lo = int(np.flatnonzero(counts)[0])
    hi = int(np.flatnonzero(counts)[-1])
    freqs = np.zeros(256, np.int64)
    freqs[lo : hi + 1] = _rans_table(counts[lo : hi + 1])
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    lanes = _rans_lanes(n)
    steps = -(-n // lanes)
    padded = np.full(steps * lanes, int(np.argmax(counts)), np.uint8)  # the tail pads with the
    padded[:n] = sym  # commonest symbol; the decoder drops it
    grid = padded.reshape(steps, lanes)
    x = np.full(lanes, RANS_LOW, np.uint64)
    renorm_at = np.uint64((RANS_LOW >> RANS_PROB_BITS) << 16)
    chunks = []
    for t in range(steps - 1, -1, -1):  # rANS encodes backwards so that decoding runs forwards
        f = freqs[grid[t]].astype(np.uint64)
        full = x >= renorm_at * f
        chunks.append((x[full] & np.uint64(0xFFFF)).astype("<u2"))
        x[full] >>= np.uint64(16)
        x = ((x // f) << np.uint64(RANS_PROB_BITS)) + x % f + starts[grid[t]].astype(np.uint64)
    head = struct.pack("<IIBB", n, lanes, lo, hi) + freqs[lo : hi + 1].astype("<u2").tobytes()
    words = b"".join(c.tobytes() for c in reversed(chunks))
    return head + x.astype("<u4").tobytes() + words


def rans_decompress(blob, limit):
    """The bytes of a rANS stream, at most `limit` of them; ValueError for a stream that is
    malformed, truncated, has trailing words or does not return every lane to its start."""
    if len(blob) < 10:
        raise ValueError("rans stream is truncated")
    n, lanes, lo, hi = struct.unpack_from("<IIBB", blob)
    if n > limit:
        raise ValueError(f"payload inflates beyond the {limit} bytes its header declares")
    if n == 0:
        if len(blob) != 10:
            raise ValueError("rans stream has trailing data")
        return b""
    if lanes != _rans_lanes(n) or hi < lo:
        raise ValueError("rans stream header is inconsistent")
    at = 10 + 2 * (hi - lo + 1)
    if len(blob) < at + 4 * lanes or (len(blob) - at) % 2:
        raise ValueError("rans stream is truncated")
    freqs = np.zeros(256, np.int64)
    freqs[lo : hi + 1] = np.frombuffer(blob, "<u2", hi - lo + 1, 10)
    if int(freqs.sum()) != 1 << RANS_PROB_BITS:
        raise ValueError("rans frequency table does not add up")
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    slot_symbol = np.repeat(np.arange(256, dtype=np.uint8), freqs)
    x = np.frombuffer(blob, "<u4", lanes, at).astype(np.uint64)
    if (x < RANS_LOW).any():
        raise ValueError("rans stream has a lane state out of range")
    words = np.frombuffer(blob, "<u2", offset=at + 4 * lanes).astype(np.uint64)
    steps = -(-n // lanes)
    out = np.empty((steps, lanes), np.uint8)
    mask = np.uint64((1 << RANS_PROB_BITS) - 1)
    read = 0
    for t in range(steps):
        slot = x & mask
        s = slot_symbol[slot.astype(np.int64)]
        out[t] = s
        x = freqs[s].astype(np.uint64) * (x >> np.uint64(RANS_PROB_BITS)) + slot
        x -= starts[s].astype(np.uint64)
        low = x < RANS_LOW
        k = int(low.sum())
        if read + k > len(words):
            raise ValueError("rans stream is truncated")
        x[low] = (x[low] << np.uint64(16)) | words[read : read + k]
        read += k
    if read != len(words) or (x != RANS_LOW).any():
        raise ValueError("rans stream is corrupt (its lanes do not end where they started)")
    return out.reshape(-1)[:n].tobytes()


# name: (compress(data), decompress(data, limit)) of the per-group back ends that are installed.
PERGROUP_CODECS = {
    "brotli": (
        lambda d: brotli.compress(d, quality=11, lgwin=24),
        _brotli_bounded,
    ),
    "lzma": (lambda d: COMPRESSORS["lzma"][0](d, 9), COMPRESSORS["lzma"][1]),
    "zstd": (lambda d: _zstd_long(d, 22), _zstd_bounded),
    "rans": (rans_compress, rans_decompress),
}


def pergroup_codecs():
    """The back ends this process can write and read (brotli and zstd are optional packages)."""
    return [
        n
        for n in PERGROUP_CODECS
        if not (n == "brotli" and brotli is None) and not (n == "zstd" and zstandard is None)
    ]


def _group_key(e, part):
    """Int codes and float values are bucketed by role and scheme (their statistics differ);
    scales, row orders and other side parts each form one group."""
    if part != "data":
        return part
    role = "control" if e["scheme"] == "fp32" else tensor_role(e["name"])
    return f"{role}.{e['scheme']}"


def payload_groups(entries):
    """[(group name, [(tensor index, part)])] in a fixed order, from the tensor entries alone."""
    groups = {}
    for i, e in enumerate(entries):
        for part in ENTRY_PARTS:
            if part in e:
                groups.setdefault(_group_key(e, part), []).append((i, part))
    return sorted(groups.items())


def _sortable(e, part):
    """Int codes of a 2-D tensor with at most SORT_MAX_ROWS rows: those a sorted group reorders."""
    return (
        part == "data"
        and e["scheme"].startswith("int")
        and len(e["shape"]) == 2
        and 1 < e["shape"][0] <= SORT_MAX_ROWS
    )


def l1_row_order(q):
    """A greedy nearest-neighbour tour over the rows of q under L1 distance, from row 0: similar
    rows end up next to each other, which a back end with a long window can exploit (#1855)."""
    x = torch.from_numpy(np.asarray(q, np.float32))
    dist_l1 = torch.cdist(x, x, p=1)
    dist_l1.fill_diagonal_(float("inf"))
    seen = torch.zeros(len(x), dtype=torch.bool)
    order = [0]
    seen[0] = True
    for _ in range(len(x) - 1):
        nxt = int(dist_l1[order[-1]].masked_fill(seen, float("inf")).argmin())
        order.append(nxt)
        seen[nxt] = True
    return np.asarray(order, np.uint16)


def _best_codec(data, codecs, cache):
    """(name, blob) of the smallest compression of data among codecs, kept in `cache` under
    (sha256 of data, None): a bit-allocation try asks again about the samples of groups it did
    not change."""
    key = (sha256_hex(data), None)
    if key not in cache:
        tries = ((n, PERGROUP_CODECS[n][0](data)) for n in codecs)
        cache[key] = min(tries, key=lambda nb: len(nb[1]))
    return cache[key]


def _sample(data):
    """Up to PERGROUP_SAMPLE_BYTES of data: 8 evenly spaced slices, so a long group is sampled
    all along, not only at its start."""
    if len(data) <= PERGROUP_SAMPLE_BYTES:
        return data
    step = PERGROUP_SAMPLE_BYTES // 8
    starts = np.linspace(0, len(data) - step, 8).astype(np.int64)
    return b"".join(data[s : s + step] for s in starts)


def _sort_pays(entries, members, raw, codecs, cache):
    """Whether sorting rows pays on a sample: SORT_SAMPLE_ROWS rows from the middle of the
    largest sortable tensor, sorted, compressed by their best back end and their order added,
    against unsorted by its best back end (an entropy coder unsorted can beat an LZ coder
    sorted). Not the first rows: an embedding's are its byte and special tokens, rarely trained
    and alike, which overstate what sorting gains (measured on a CPU-trained model: the first
    rows said +2.5%, the whole embedding lost 0.8% to its stored order)."""
    cands = [(i, p) for i, p in members if _sortable(entries[i], p)]
    if not cands:
        return False
    i = max(cands, key=lambda ip: entries[ip[0]]["data"][1])[0]
    off, _ = entries[i]["data"]
    rows, cols = entries[i]["shape"][0], entries[i]["shape"][1]
    n = min(rows, SORT_SAMPLE_ROWS)
    start = (rows - n) // 2
    q = np.frombuffer(raw, np.int8, n * cols, off + start * cols).reshape(n, cols)
    order = l1_row_order(q)
    plain = len(_best_codec(q.tobytes(), codecs, cache)[1])
    sorted_bytes = len(_best_codec(q[order].tobytes(), codecs, cache)[1]) + 2 * n
    return sorted_bytes < plain


def _group_stream(entries, members, raw, orders):
    """The group's bytes: its parts in order, int rows in `orders[i]` order where given."""
    out = []
    for i, part in members:
        off, n = entries[i][part]
        if i in orders and _sortable(entries[i], part):
            rows = entries[i]["shape"][0]
            q = np.frombuffer(raw, np.int8, n, off).reshape(rows, -1)
            out.append(q[orders[i]].tobytes())
        else:
            out.append(raw[off : off + n])
    return b"".join(out)


def compress_pergroup(entries, raw, cache=None, sort_rows=True):
    """(payload, groups): every group compressed by the back end that made its sample smallest,
    rows of large groups sorted where a sample says it pays (the order stored in group "order").
    cache: {sha256 of a group's bytes: (codec, blob)}, kept across bit-allocation tries so
    unchanged groups are not compressed again."""
    from concurrent.futures import ThreadPoolExecutor

    cache = {} if cache is None else cache
    codecs = pergroup_codecs()
    plan = []  # (name, stream, sorted)
    orders = {}
    for name, members in payload_groups(entries):
        stream = _group_stream(entries, members, raw, {})
        do_sort = (
            sort_rows
            and len(stream) >= SORT_MIN_BYTES
            and _sort_pays(entries, members, raw, codecs, cache)
        )
        if do_sort:
            for i, part in members:
                if _sortable(entries[i], part):
                    off, _ = entries[i]["data"]
                    rows = entries[i]["shape"][0]
                    q = np.frombuffer(raw, np.int8, entries[i]["data"][1], off).reshape(rows, -1)
                    orders[i] = l1_row_order(q)
            stream = _group_stream(entries, members, raw, orders)
        codec = _best_codec(_sample(stream), codecs, cache)[0]
        plan.append((name, stream, do_sort, codec))
    if orders:
        order_stream = b"".join(orders[i].tobytes() for i in sorted(orders))
        plan.append(("order", order_stream, False, None))

    def work(item):
        segment, codec = item
        if codec is None:  # a group of one segment no larger than a sample: try them all
            return _best_codec(segment, codecs, cache)
        key = (sha256_hex(segment), codec)
        if key not in cache:  # the sample chose the back end; only that one compresses it
            cache[key] = (codec, PERGROUP_CODECS[codec][0](segment))
        return cache[key]

    items = []
    for _, stream, _, codec in plan:
        step = PERGROUP_SEGMENT_BYTES
        segments = [stream[a : a + step] for a in range(0, len(stream), step)] or [b""]
        use = None if len(stream) <= PERGROUP_SAMPLE_BYTES else codec
        items += [(seg, use) for seg in segments]
    with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
        done = iter(list(pool.map(work, items)))
    groups = []
    blobs = []
    for name, stream, do_sort, _ in plan:
        parts = [next(done) for _ in range(_segment_count(len(stream)))]
        groups.append(
            {
                "name": name,
                "codec": parts[0][0],
                "bytes": sum(len(b) for _, b in parts),
                "sorted": do_sort,
                "segments": [len(b) for _, b in parts],
            }
        )
        blobs += [b for _, b in parts]
    return b"".join(blobs), groups


def _segment_count(raw_len):
    return max(1, -(-raw_len // PERGROUP_SEGMENT_BYTES))


def _check_groups(path, header, entries, payload_bytes):
    """The header's groups against the groups its entries imply: names, order, back ends,
    lengths (summing to the payload); ValueError naming the file and the field otherwise."""
    groups = header.get("groups")
    expected = [name for name, _ in payload_groups(entries)]
    if not isinstance(groups, list) or len(groups) > len(expected) + 1:
        raise ValueError(f"{path}: artifact header groups: expected a list of group objects")
    names = []
    for k, g in enumerate(groups):
        if not isinstance(g, dict) or set(g) != {"name", "codec", "bytes", "sorted", "segments"}:
            raise ValueError(
                f"{path}: artifact header groups[{k}]: expected name, codec, bytes, sorted, "
                "segments"
            )
        segs = g["segments"]
        if (
            not isinstance(segs, list)
            or not segs
            or len(segs) > ARTIFACT_MAX_RAW_BYTES // PERGROUP_SEGMENT_BYTES + 1
            or not all(_is_count(n) for n in segs)
            or sum(segs) != g["bytes"]
        ):
            raise ValueError(
                f"{path}: artifact header groups[{k}].segments: expected compressed lengths "
                "adding up to its bytes"
            )
        if g["codec"] not in pergroup_codecs():
            raise ValueError(
                f"{path}: artifact header groups[{k}].codec {str(g['codec'])[:40]!r} is unknown "
                "or not installed (brotli and zstd are optional packages)"
            )
        if not _is_count(g["bytes"]) or not isinstance(g["sorted"], bool):
            raise ValueError(f"{path}: artifact header groups[{k}]: bad bytes or sorted field")
        names.append(g["name"])
    any_sorted = any(g["sorted"] for g in groups)
    if names != expected + (["order"] if any_sorted else []):
        raise ValueError(
            f"{path}: artifact header groups {str(names)[:120]} are not the groups its tensors "
            f"imply {str(expected)[:120]}"
        )
    if groups and groups[-1]["name"] == "order" and groups[-1]["sorted"]:
        raise ValueError(f"{path}: artifact header group 'order' cannot itself be sorted")
    if sum(g["bytes"] for g in groups) != payload_bytes:
        raise ValueError(
            f"{path}: artifact header groups add up to {sum(g['bytes'] for g in groups)} bytes, "
            f"the payload has {payload_bytes}"
        )


def decompress_pergroup(header, payload):
    """The logical payload (raw_bytes) of a per-group payload whose header passed
    check_artifact_header: each stream inflates, bounded, to exactly the bytes its members need;
    row orders are checked to be permutations before they are applied."""
    entries = header["tensors"]
    members = dict(payload_groups(entries))
    groups = header["groups"]
    sorted_ids = sorted(
        i
        for g in groups
        if g["sorted"]
        for i, part in members[g["name"]]
        if _sortable(entries[i], part)
    )
    streams = {}
    at = 0
    for g in groups:
        if g["name"] == "order":
            want = sum(2 * entries[i]["shape"][0] for i in sorted_ids)
        else:
            want = sum(entries[i][part][1] for i, part in members[g["name"]])
        if len(g["segments"]) != _segment_count(want):
            raise ValueError(
                f"group {g['name']!r} has {len(g['segments'])} segments, its {want} bytes need "
                f"{_segment_count(want)}"
            )
        out = []
        for k, n in enumerate(g["segments"]):
            limit = min(PERGROUP_SEGMENT_BYTES, want - k * PERGROUP_SEGMENT_BYTES)
            piece = PERGROUP_CODECS[g["codec"]][1](payload[at : at + n], limit)
            if len(piece) != limit:
                raise ValueError(f"group {g['name']!r} inflates to a short segment")
            out.append(piece)
            at += n
        streams[g["name"]] = b"".join(out)
    orders = {}
    order_at = 0
    for i in sorted_ids:
        rows = entries[i]["shape"][0]
        order = np.frombuffer(streams["order"], np.uint16, rows, order_at).astype(np.int64)
        order_at += 2 * rows
        if not np.array_equal(np.sort(order), np.arange(rows)):
            raise ValueError(
                f"row order of tensor {entries[i]['name'][:80]!r} is not a permutation"
            )
        orders[i] = order
    raw = bytearray(header["raw_bytes"])
    for g in groups:
        if g["name"] == "order":
            continue
        at = 0
        stream = streams[g["name"]]
        for i, part in members[g["name"]]:
            off, n = entries[i][part]
            chunk = stream[at : at + n]
            at += n
            if i in orders and _sortable(entries[i], part):
                rows = entries[i]["shape"][0]
                stored = np.frombuffer(chunk, np.int8).reshape(rows, -1)
                restored = np.empty_like(stored)
                restored[orders[i]] = stored
                chunk = restored.tobytes()
            raw[off : off + n] = chunk
    return bytes(raw)


# --- the compressed header (HEADER_COMPRESS) ---------------------------------------------------
# Version 2 of the container: after the prefix, the sha256 of the stored header bytes, then one
# codec byte and the header JSON compressed. The digest is checked before anything is inflated,
# and the inflated header still carries its mandatory header_sha256.

ARTIFACT_VERSION_PACKED_HEADER = 2
HEADER_CODECS = {b"x": "lzma", b"b": "brotli"}


def _pack_head(head):
    """One codec byte and head compressed: Brotli where installed (it wins on JSON), else LZMA."""
    if brotli is not None:
        return b"b" + brotli.compress(head, quality=11)
    return b"x" + lzma.compress(head, preset=9 | lzma.PRESET_EXTREME)


def _unpack_head(path, stored):
    """The header JSON bytes of a version-2 head (digest already checked), at most
    MAX_HEADER_BYTES."""
    codec = HEADER_CODECS.get(stored[:1])
    if codec is None or (codec == "brotli" and brotli is None):
        raise ValueError(
            f"{path}: artifact header codec {stored[:1]!r} is unknown or not installed"
        )
    try:
        if codec == "brotli":
            return _brotli_bounded(stored[1:], MAX_HEADER_BYTES)
        return _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), stored[1:], MAX_HEADER_BYTES)
    except Exception as exc:
        why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: artifact header does not decompress ({why})") from None
