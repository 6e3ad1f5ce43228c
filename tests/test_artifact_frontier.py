"""Issue 15, the artifact frontier: per-group compression (rows sorted, order stored), the
compressed header, the compact counted code form, GPTQ on the tied embedding, LQER corrections
and int8 gates. Tiny models only; each roundtrip is exact or its error is compared."""

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, TINY_ENV

from golf.compact import compact_code

FRONTIER = {
    **TINY_ENV,
    "KEEP_FLOAT_MAX_NUMEL": "1024",
    "QUANT_BITS": "6",
    "CLIP_METHOD": "sdclip",
    "COMPRESSOR": "pergroup",
    "HEADER_COMPRESS": "1",
    "CODE_FORM": "compact",
}


def hp(gpt, **over):
    return gpt.Hyperparameters.from_env(
        {**FRONTIER, **{k.upper(): str(v) for k, v in over.items()}}
    )


@pytest.fixture(scope="module")
def sorted_artifact(gpt, tmp_path_factory):
    """A tiny per-group artifact with every int group's rows sorted (sorting forced: on a tiny
    model the sample test would decline it)."""
    h = hp(gpt)
    torch.manual_seed(0)
    model = gpt.build_model(h)
    path = tmp_path_factory.mktemp("pg") / "pg.pga"
    mp = pytest.MonkeyPatch()
    mp.setattr(gpt, "SORT_MIN_BYTES", 0)
    mp.setattr(gpt, "_sort_pays", lambda *a: True)
    try:
        sizes = gpt.save_artifact(model, h, str(path))
    finally:
        mp.undo()
    return {"h": h, "model": model, "path": path, "sizes": sizes}


def test_pergroup_roundtrip_is_exact_with_rows_restored(gpt, sorted_artifact):
    path = str(sorted_artifact["path"])
    header, raw = gpt.read_artifact(path)
    assert header["compressor"] == "pergroup"
    assert any(g["sorted"] for g in header["groups"]) and header["groups"][-1]["name"] == "order"
    _, expected_raw = gpt.quantize_state_dict(
        gpt.artifact_state(sorted_artifact["model"]), sorted_artifact["h"]
    )
    assert raw == expected_raw  # every row back in its place
    loaded, _ = gpt.load_artifact(path)
    expected = gpt.dequantize_entries(header["tensors"], raw)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    table = sorted_artifact["sizes"]["groups"]
    assert sum(g["bytes"] for g in table) == header["payload_bytes"]
    assert {g["name"] for g in table} >= {"scale", "order"}


def test_l1_row_order_is_a_permutation_that_groups_similar_rows(gpt):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-8, 8, (4, 32), generator=g)
    rows = base.repeat(8, 1)[torch.randperm(32, generator=g)]  # 4 kinds of rows, shuffled
    order = gpt.l1_row_order(rows.numpy().astype(np.int8))
    assert sorted(order.tolist()) == list(range(32))
    kinds = [int((base == rows[i]).all(1).nonzero()) for i in order]
    assert sum(a != b for a, b in itertools.pairwise(kinds)) == 3  # each kind in one run


def test_header_is_compressed_and_verified_before_the_payload(gpt, sorted_artifact, tmp_path):
    blob = sorted_artifact["path"].read_bytes()
    _, version, head_len = gpt.ARTIFACT_PREFIX.unpack_from(blob)
    assert version == 2 and b'"model_dim"' not in blob  # the JSON is not stored as text
    at = gpt.ARTIFACT_PREFIX.size + 32 + head_len // 2
    flipped = tmp_path / "flip.pga"
    flipped.write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :])
    with pytest.raises(ValueError, match="header is corrupted"):
        gpt.read_artifact_header(str(flipped))
    header, _ = gpt.read_artifact_header(str(sorted_artifact["path"]))
    json_bytes = len(json.dumps(header, sort_keys=True, separators=(",", ":")))
    assert sorted_artifact["sizes"]["header_bytes"] < json_bytes / 2


def forge_packed(gpt, path, header, payload, change):
    header = json.loads(json.dumps(header))
    header.pop("header_sha256")
    change(header)
    header["payload_bytes"] = len(payload)
    header["payload_sha256"] = gpt.sha256_hex(payload)
    gpt.write_artifact(str(path), header, payload, packed=True)
    return path


def _fast_lzma(d):
    import lzma

    return lzma.compress(d, preset=0)


FAST = {  # the quickest level of each back end: a reader does not care which level wrote it
    "brotli": lambda d: __import__("brotli").compress(d, quality=1),
    "zstd": lambda d: __import__("zstandard").ZstdCompressor(level=1).compress(d),
    "lzma": _fast_lzma,
}


def _bomb_group(codec, size):
    def change(header):
        header["groups"][0]["codec"] = codec
        header["groups"][0]["bytes"] = size
        header["groups"][0]["segments"] = [size]

    return change


def _longer_group(header):
    header["groups"][0]["bytes"] += 1
    header["groups"][0]["segments"][-1] += 1


def _group(i, field, value):
    def change(header):
        header["groups"][i][field] = value

    return change


def test_forged_and_bomb_groups_are_refused(gpt, sorted_artifact, tmp_path):
    path = str(sorted_artifact["path"])
    header, offset = gpt.read_artifact_header(path)
    payload = sorted_artifact["path"].read_bytes()[offset:]
    cases = {
        "codec": (_group(0, "codec", "lrzip"), payload, "codec"),
        "bytes": (_longer_group, payload, "add up"),
        "segments": (_group(0, "segments", [1, 2]), payload, "segments"),
        "names": (_group(0, "name", "evil"), payload, "groups"),
        "extra_field": (_group(0, "x", 1), payload, "groups[0]"),
        "no_order": (lambda h: h["groups"].pop(), payload, "groups"),
    }
    # a bomb: the first group replaced by 64 MiB of zeros in each back end
    zeros = bytes(64 << 20)
    for codec in ("brotli", "zstd", "lzma"):
        if codec not in gpt.pergroup_codecs():
            continue
        bomb = FAST[codec](zeros)
        first = header["groups"][0]["bytes"]
        cases[f"bomb_{codec}"] = (_bomb_group(codec, len(bomb)), bomb + payload[first:], "inflates")

    # a row order that is not a permutation
    order_len = header["groups"][-1]["bytes"]
    dup = gpt.PERGROUP_CODECS["lzma"][0](
        bytes(
            2
            * sum(
                e["shape"][0]
                for i, e in enumerate(header["tensors"])
                if i
                in {
                    i
                    for g in header["groups"]
                    if g["sorted"]
                    for i, p in dict(gpt.payload_groups(header["tensors"]))[g["name"]]
                    if gpt._sortable(header["tensors"][i], p)
                }
            )
        )
    )

    dup_bytes = len(dup)

    def bad_order(h):
        h["groups"][-1]["codec"] = "lzma"
        h["groups"][-1]["bytes"] = dup_bytes
        h["groups"][-1]["segments"] = [dup_bytes]

    cases["order_not_permutation"] = (bad_order, payload[:-order_len] + dup, "permutation")
    for name, (change, body, words) in cases.items():
        p = forge_packed(gpt, tmp_path / f"{name}.pga", header, body, change)
        t0 = time.perf_counter()
        with pytest.raises(ValueError) as info:
            gpt.load_artifact(str(p))
        assert time.perf_counter() - t0 < 5
        msg = str(info.value)
        assert words in msg and "\n" not in msg, (name, msg)


def test_counted_code_is_the_compact_form_in_the_header(gpt, sorted_artifact):
    header, _ = gpt.read_artifact_header(str(sorted_artifact["path"]))
    compact = compact_code(gpt.code_bytes_of(gpt.MODEL), "train_gpt.py")
    assert header["code_sha256"] == gpt.sha256_hex(compact)
    assert sorted_artifact["sizes"]["code_bytes"] == header["code_bytes"] == len(compact)
    assert header["script_sha256"] == gpt.sha256_hex(gpt.code_bytes_of(gpt.MODEL))


def test_lqer_roundtrip_reduces_the_error(gpt, tmp_path):
    errs = {}
    for rank in (0, 4):
        h = hp(gpt, lqer_rank=rank, lqer_top_k=2, lqer_group=16, quant_bits=4)
        torch.manual_seed(0)
        model = gpt.build_model(h)
        state = gpt.artifact_state(model)
        path = tmp_path / f"lqer{rank}.pga"
        gpt.save_artifact(model, h, str(path), state=state)
        header, raw = gpt.read_artifact(str(path))
        loaded, _ = gpt.load_artifact(str(path))
        expected = gpt.dequantize_entries(header["tensors"], raw)
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
        corrected = [e["name"] for e in header["tensors"] if "lqer_rank" in e]
        assert len(corrected) == (2 if rank else 0)
        errs[rank] = (
            {
                n: float((expected[n].float() - state[n].float()).norm())
                for n in (corrected or errs[4])
            }
            if rank
            else None
        )
        if rank:
            base = gpt.dequantize_entries(
                [
                    {k: v for k, v in e.items() if not k.startswith("lqer")}
                    for e in header["tensors"]
                ],
                raw,
            )
            for n in corrected:
                assert errs[rank][n] < float((base[n].float() - state[n].float()).norm())


def test_lqer_factors_approximate_a_low_rank_error(gpt):
    g = torch.Generator().manual_seed(0)
    err = torch.randn(96, 4, generator=g) @ torch.randn(4, 80, generator=g)
    parts = gpt.lqer_factors(err, 4, 16)
    approx = gpt.lqer_product(parts, 4, 16, (96, 80))
    assert parts["lqer_a"].min() >= -2 and parts["lqer_a"].max() <= 1
    assert parts["lqer_b"].min() >= -8 and parts["lqer_b"].max() <= 7
    assert float((err - approx).norm()) < 0.5 * float(err.norm())


def test_embedding_gptq_roundtrip(gpt, tmp_path):
    h = hp(gpt, gptq_embed=1, embed_bits=6)
    torch.manual_seed(0)
    model = gpt.build_model(h)
    batches = [
        torch.randint(0, h.vocab_size, (2, 64), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    hessians = gpt.collect_hessians(model, batches, embed=True)
    assert "tok_emb.weight" in hessians and hessians["tok_emb.weight"].shape == (64, 64)
    path = tmp_path / "emb.pga"
    gpt.save_artifact(model, h, str(path), hessians=hessians)
    header, raw = gpt.read_artifact(str(path))
    method = {e["name"]: e.get("method") for e in header["tensors"]}
    assert method["tok_emb.weight"] == "gptq"
    loaded, _ = gpt.load_artifact(str(path))
    expected = gpt.dequantize_entries(header["tensors"], raw)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_gates_are_int8_per_row(gpt, tmp_path):
    h = hp(gpt, gate_int8=1, skip_gates=1, attn_gate=1)
    torch.manual_seed(0)
    model = gpt.build_model(h)
    path = tmp_path / "gates.pga"
    gpt.save_artifact(model, h, str(path))
    header, _ = gpt.read_artifact_header(str(path))
    gates = {
        e["name"]: e["scheme"]
        for e in header["tensors"]
        if "gate" in e["name"] and len(e["shape"]) == 2
    }
    assert gates and set(gates.values()) == {"int8"}


# --- records: the compact form is written, checked and verified by eval_bpb ---------------------


@pytest.fixture(scope="module")
def compact_runs(request):
    fixtures = REPO / "tests" / "fixtures" / "pack"
    if str(fixtures) not in sys.path:
        sys.path.insert(0, str(fixtures))
    import runs

    base = request.getfixturevalue("tmp_path_factory").getbasetemp() / "pgolf_tiny"
    src = None if (base / "ws" / "ready").is_file() else runs.data_source()
    if src is None and not (base / "ws" / "ready").is_file():
        emb = request.getfixturevalue("embedded")
        src = (emb["DATA_PATH"], emb["TOKENIZER_PATH"])
    env = {
        "EVAL_MODE": "sliding",
        "CODE_FORM": "compact",
        "COMPRESSOR": "pergroup",
        "HEADER_COMPRESS": "1",
        "KEEP_FLOAT_MAX_NUMEL": "1024",
    }
    return [runs.tiny_run(base, f"compact{s}", s, src, **env) for s in (1, 2)]


def test_record_with_the_compact_form_passes_check_and_rescore(compact_runs, tmp_path, capsys):
    import eval_bpb
    import pack

    log = compact_runs[0]["log"].read_text()
    assert "Code size (compressed): " in log and "artifact_group: " in log
    args = pack.build_parser().parse_args(
        ["record", *(str(r["log"]) for r in compact_runs), "--name", "Compact", "--author", "T",
         "--github-id", "t", "--date", "2026-05-01", "--out", str(tmp_path / "records"),
         "--non-record", "--baseline-values", "6.7,6.71,6.72"]
    )  # fmt: skip
    folder, sub = pack.build_record(args)
    folder = Path(folder)
    compact = (folder / "train_gpt_compact.py").read_bytes()
    assert sub["bytes_code"] == len(compact) and sub["script_compact"] == "train_gpt_compact.py"
    table = json.loads((folder / "submission.json").read_text())["sha256"]
    assert "train_gpt_compact.py" in table
    assert pack.check_record(str(folder)) == []
    rep = pack.size_report(str(folder / "final_model_seed1.pga"), str(folder / "train_gpt.py"))
    assert rep["pergroup_payload_bytes"] == rep["artifact_bytes"] - rep["header_bytes"]
    assert rep["counted_code_bytes"] == len(compact) and rep["groups"]
    code = eval_bpb.main([str(folder / "final_model_seed1.pga"), "--json"], env={})
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["code_bytes"] == len(compact)
    # a compact form that does not expand to the bound source is refused by check and eval_bpb
    (folder / "train_gpt_compact.py").write_bytes(compact.replace(b"linecache,", b"sys,", 1))
    assert any("compact" in p for p in pack.check_record(str(folder)))
    assert eval_bpb.main([str(folder / "final_model_seed1.pga")], env={}) == 2
