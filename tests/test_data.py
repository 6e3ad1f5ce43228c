"""Specification of data/: the shard format, the tokenizer + shard builder, the embedded corpus,
the downloader.

No network: the downloader's hub call is replaced by a stand-in serving a temporary directory laid
out like the hub. Real FineWeb data is read from ../shared/data beside the checkout when present.
"""

import gzip
import hashlib
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data import build, download, embedded, shards  # noqa: E402
from data.build import export_shards, iter_documents, train_tokenizer  # noqa: E402
from data.shards import HEADER_BYTES, MAGIC, read_shard, shard_info, write_shard  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
spm = pytest.importorskip("sentencepiece")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Real English technical prose that ships with every Python: the pydoc topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:40]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, docs) -> Path:
    return train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok") / "t_400_bpe.model")


# -----------------------------------------------------------------------------
# shards
# -----------------------------------------------------------------------------


def test_shard_roundtrip_keeps_tokens_and_writes_official_header(tmp_path):
    tokens = [1, 0, 65535, 42, 1024]
    path = write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, 5] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    out = read_shard(path)
    assert out.dtype == np.uint16 and out.tolist() == tokens


def test_read_rejects_bad_magic(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(123).tobytes()
    path.write_bytes(raw)
    with pytest.raises(
        ValueError, match=r"fineweb_val_000000\.bin: bad magic 123 \(expected 20240520\)"
    ):
        read_shard(path)


def test_read_rejects_wrong_version(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 2, 3])
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.int32(2).tobytes()
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"s\.bin: unsupported version 2"):
        read_shard(path)


def test_read_rejects_truncated_body(tmp_path):
    path = write_shard(tmp_path / "s.bin", list(range(10)))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"s\.bin: truncated: header says 10 tokens, file holds 8"):
        read_shard(path)


def test_read_rejects_trailing_bytes(tmp_path):
    path = write_shard(tmp_path / "s.bin", list(range(10)))
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match=r"s\.bin: 2 trailing bytes"):
        read_shard(path)


def test_read_rejects_file_shorter_than_header(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(
        ValueError, match=r"s\.bin: file is 100 bytes, shorter than the 1024-byte header"
    ):
        read_shard(path)


def test_write_refuses_token_id_above_65535(tmp_path):
    with pytest.raises(
        ValueError, match=r"big\.bin: token id 65536 .*vocab above 65,535 is refused"
    ):
        write_shard(tmp_path / "big.bin", [1, 65536])
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_negative_token_id(tmp_path):
    with pytest.raises(ValueError, match=r"neg\.bin: token id -1"):
        write_shard(tmp_path / "neg.bin", np.array([5, -1]))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_shard_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write_shard(tmp_path / "s.bin", [7, 8, 9])

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, list(range(1000)))
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]
    assert read_shard(path).tolist() == [7, 8, 9]


def test_shard_info_reports_tokens_bytes_and_sha256(tmp_path):
    path = write_shard(tmp_path / "s.bin", [3, 4])
    assert shard_info(path) == {"num_tokens": 2, "bytes": HEADER_BYTES + 4, "sha256": sha256(path)}


# -----------------------------------------------------------------------------
# documents
# -----------------------------------------------------------------------------


def test_iter_documents_reads_text_field_of_jsonl_and_jsonl_gz(tmp_path):
    lines = [json.dumps({"text": "first doc"}), "", json.dumps({"text": "second\ndoc", "id": 2})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["first doc", "second\ndoc"]
    assert list(iter_documents(tmp_path / "b.jsonl.gz")) == ["first doc", "second\ndoc"]


def test_iter_documents_splits_plain_text_at_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("one\nstill one\n\ntwo\n\n\n  \nthree\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "c.txt")) == ["one\nstill one", "two", "three"]


def test_bad_json_line_names_file_and_line_number(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON line"):
        list(iter_documents(tmp_path / "bad.jsonl"))


# -----------------------------------------------------------------------------
# tokenizer
# -----------------------------------------------------------------------------


def test_tokenizer_uses_the_official_settings(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]  # byte fallback pieces
    assert sp.unk_id() not in sp.encode("ünïcödé ☃ 𝔘")  # unseen characters fall back to bytes
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert not sp.encode("Python", out_type=str)[0].startswith("▁")  # add_dummy_prefix=False
    assert (
        sp_model.with_suffix(".vocab")
        .read_text(encoding="utf-8")
        .startswith("<pad>\t0\n<s>\t0\n</s>\t0\n")
    )


def test_tokenizer_training_is_deterministic(tmp_path, docs, sp_model):
    again = train_tokenizer(docs, 400, tmp_path / "elsewhere" / "t_400_bpe.model")
    assert again.read_bytes() == sp_model.read_bytes()
    assert again.with_suffix(".vocab").read_bytes() == sp_model.with_suffix(".vocab").read_bytes()


# -----------------------------------------------------------------------------
# export
# -----------------------------------------------------------------------------


def split_at_bos(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert starts[0] == 0, "the stream must start with BOS"
    return [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_export_puts_bos_before_every_document_and_no_eos(tmp_path, docs, sp_model):
    export_shards(docs[:6], sp_model, tmp_path, num_val_docs=2)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    stream = np.concatenate(
        [read_shard(tmp_path / f"fineweb_{s}_000000.bin") for s in ("val", "train")]
    )
    assert split_at_bos(stream) == [[1] + sp.encode(d) for d in docs[:6]]
    assert 2 not in stream


def test_export_puts_the_first_documents_in_val(tmp_path, docs, sp_model):
    m = export_shards(docs[:6], sp_model, tmp_path, num_val_docs=2)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert split_at_bos(read_shard(tmp_path / "fineweb_val_000000.bin")) == [
        [1] + sp.encode(d) for d in docs[:2]
    ]
    assert (m["num_val_docs"], m["num_train_docs"], m["num_docs"]) == (2, 4, 6)


def test_export_cuts_files_at_the_shard_size_limit(tmp_path, docs, sp_model):
    m = export_shards(docs[:5], sp_model, tmp_path, num_val_docs=1, shard_size=1000)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for split, docs_in_split in (("val", docs[:1]), ("train", docs[1:5])):
        files = sorted(tmp_path.glob(f"fineweb_{split}_*.bin"))
        sizes = [read_shard(f).size for f in files]
        assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
        stream = np.concatenate([read_shard(f) for f in files])
        assert stream.tolist() == [t for d in docs_in_split for t in [1] + sp.encode(d)]
        assert m[f"tokens_{split}"] == stream.size
    assert len(m["files"]) > 2
    assert all(f["sha256"] == sha256(tmp_path / f["name"]) for f in m["files"])


def test_export_writes_a_manifest_and_removes_stale_shards(tmp_path, docs, sp_model):
    write_shard(tmp_path / "fineweb_train_000007.bin", [1, 2, 3])
    m = export_shards(docs[:3], sp_model, tmp_path, num_val_docs=1)
    assert not (tmp_path / "fineweb_train_000007.bin").exists()
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == m
    assert m["tokenizer"]["sha256"] == sha256(sp_model) and m["tokenizer"]["vocab_size"] == 400
    assert m["append_eos"] is False
    assert build.verify_manifest(tmp_path, sp_model) == []


def test_export_refuses_a_vocab_above_65535(tmp_path, docs, sp_model, monkeypatch):
    monkeypatch.setattr(spm.SentencePieceProcessor, "vocab_size", lambda self: 70000)
    with pytest.raises(ValueError, match=r"t_400_bpe\.model: vocab size 70000"):
        export_shards(docs[:2], sp_model, tmp_path, num_val_docs=1)


def test_build_cli_trains_a_tokenizer_and_exports_shards(tmp_path, docs, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]), encoding="utf-8")
    model = tmp_path / "tok" / "c_400_bpe.model"
    assert (
        build.main(
            ["tokenizer", "--input", str(corpus), "--vocab-size", "400", "--model", str(model)]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith(f"model: {model}\n")
    assert (
        build.main(
            [
                "shards",
                "--input",
                str(corpus),
                "--model",
                str(model),
                "--out-dir",
                str(tmp_path / "ds"),
                "--num-val-docs",
                "5",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (summary["val_docs"], summary["train_docs"], summary["files"]) == (5, 15, 2)


def test_build_cli_reports_errors_in_one_line(tmp_path, sp_model, capsys):
    rc = build.main(
        [
            "shards",
            "--input",
            str(tmp_path / "none.jsonl"),
            "--model",
            str(sp_model),
            "--out-dir",
            str(tmp_path),
            "--num-val-docs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "none.jsonl" in err and err.count("\n") == 1


# -----------------------------------------------------------------------------
# embedded corpus
# -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the embedded corpus must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_embedded_corpus_holds_pydoc_topics_and_stdlib_docstrings():
    docs = embedded.embedded_documents()
    from pydoc_data.topics import topics

    assert len(docs) > len(topics) + 100
    assert any(d.startswith("json\n\nJSON (JavaScript Object Notation)") for d in docs)
    assert not any(d.startswith(("tkinter\n", "antigravity\n", "this\n")) for d in docs)


def test_embedded_build_is_deterministic_and_offline(tmp_path, no_network):
    a = embedded.build_embedded(tmp_path / "a", vocab_size=512, max_docs=40)
    b = embedded.build_embedded(tmp_path / "b", vocab_size=512, max_docs=40)
    assert a["status"] == b["status"] == "built" and a["val_tokens"] > 0 and a["train_tokens"] > 0
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    # model, vocab, val, train, manifest, shards.json
    assert files_a == files_b and len(files_a) == 6
    for rel in files_a:
        assert sha256(tmp_path / "a" / rel) == sha256(tmp_path / "b" / rel), rel


def test_embedded_build_skips_verified_outputs_and_rebuilds_corrupted_ones(tmp_path):
    first = embedded.build_embedded(tmp_path, vocab_size=512, max_docs=30)
    assert embedded.build_embedded(tmp_path, vocab_size=512, max_docs=30)["status"] == "up to date"
    train = Path(first["dataset"]) / "fineweb_train_000000.bin"
    train.write_bytes(train.read_bytes()[:-2])
    again = embedded.build_embedded(tmp_path, vocab_size=512, max_docs=30)
    assert again["status"] == "built" and read_shard(train).size == first["train_tokens"]
    assert (
        embedded.build_embedded(tmp_path, vocab_size=512, max_docs=30, force=True)["status"]
        == "built"
    )


def test_default_embedded_build_has_enough_val_tokens_and_a_unigram_baseline(tmp_path, capsys):
    assert embedded.main(["--out-root", str(tmp_path)]) == 0
    summary = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert 70_000 <= int(summary["val_tokens"]) <= 250_000 < int(summary["train_tokens"])
    assert 1.0 < float(summary["unigram_bpb"]) < 8.0
    assert (tmp_path / "tokenizers" / "pydoc_1024_bpe.model").is_file()
    assert sorted(p.name for p in (tmp_path / "datasets" / "pydoc_sp1024").iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_val_000000.bin",
        "manifest.json",
        "shards.json",
    ]


# -----------------------------------------------------------------------------
# downloader (local stand-in for the hub)
# -----------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A directory laid out like the hub repo, served by a stand-in for download.fetch;
    returns (calls, hub root)."""
    root = tmp_path / "hub" / "datasets"
    ds = root / "datasets" / "fineweb10B_sp1024"
    write_shard(ds / "fineweb_val_000000.bin", np.arange(60) % 1024)
    for i, n in enumerate([100, 100, 100, 30]):
        write_shard(ds / f"fineweb_train_{i:06d}.bin", np.full(n, i, dtype=np.uint16))
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model bytes")
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"<pad>\t0\n")
    manifest = {
        "shard_size": 100,
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "path": "datasets/fineweb10B_sp1024",
                "stats": {"files_val": 1, "files_train": 4, "tokens_val": 60, "tokens_train": 330},
            }
        ],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    calls = []

    def fake_fetch(repo_id, filename, local_dir):
        calls.append(filename)
        src = tmp_path / "hub" / filename
        if not src.is_file():
            raise FileNotFoundError(src)
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return dst

    monkeypatch.setattr(download, "fetch", fake_fetch)
    return calls, root


def test_download_fetches_manifest_val_first_train_shards_and_tokenizer(tmp_path, hub):
    calls, root = hub
    local = tmp_path / "data"
    summary = download.download("sp1024", 2, local)
    assert sorted(calls) == sorted(
        [
            "datasets/manifest.json",
            "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
            "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
            "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
            "datasets/tokenizers/fineweb_1024_bpe.model",
            "datasets/tokenizers/fineweb_1024_bpe.vocab",
        ]
    )
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    binding = "datasets/fineweb10B_sp1024/shards.json"  # written after the download
    assert got == sorted([binding] + [c.removeprefix("datasets/") for c in calls])
    assert (summary["downloaded"], summary["skipped"], summary["val_shards"]) == (5, 0, 1)
    assert read_shard(local / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin").tolist() == list(
        range(60)
    )


def test_download_binds_the_shards_to_the_downloaded_tokenizer(tmp_path, hub):
    local = tmp_path / "data"
    download.download("sp1024", 1, local)
    binding = json.loads((local / "datasets/fineweb10B_sp1024/shards.json").read_text())
    assert binding == {
        "format": "pgolf-shards",
        "version": 1,
        "vocab_size": 1024,
        "tokenizer_sha256": sha256(local / "tokenizers/fineweb_1024_bpe.model"),
        "tokenizer": "fineweb_1024_bpe.model",
    }


def test_second_download_fetches_only_the_manifest(tmp_path, hub):
    calls, _ = hub
    download.download("sp1024", 2, tmp_path / "data")
    calls.clear()
    summary = download.download("sp1024", 2, tmp_path / "data")
    assert calls == ["datasets/manifest.json"]
    assert (summary["downloaded"], summary["skipped"]) == (0, 5)


def test_download_refetches_a_corrupted_shard(tmp_path, hub):
    calls, _ = hub
    download.download("sp1024", 2, tmp_path / "data")
    shard = tmp_path / "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    calls.clear()
    download.download("sp1024", 2, tmp_path / "data")
    assert calls == [
        "datasets/manifest.json",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
    ]
    assert read_shard(shard).tolist() == [1] * 100


def test_download_rejects_an_unknown_variant_naming_the_available_ones(tmp_path, hub, capsys):
    assert (
        download.main(["--variant", "sp999", "--train-shards", "1", "--local-dir", str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert err == "error: unknown variant 'sp999': the manifest lists sp1024\n"


def test_download_rejects_more_train_shards_than_published(tmp_path, hub):
    with pytest.raises(ValueError, match=r"--train-shards 9: sp1024 has only 4 train shards"):
        download.download("sp1024", 9, tmp_path)


def test_download_offline_exits_with_one_actionable_line(tmp_path, monkeypatch, capsys):
    def offline(repo_id, filename, local_dir):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(download, "fetch", offline)
    assert (
        download.main(["--variant", "sp1024", "--train-shards", "1", "--local-dir", str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Hugging Face hub (") and err.count("\n") == 1
    assert "check the network or use the embedded corpus" in err
    assert not (tmp_path / ".download").exists()


def test_plan_for_the_published_manifest_names_official_paths():
    path = SHARED / "manifests" / "manifest.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    plan = download.plan_files(json.loads(path.read_text()), "sp1024", 80)
    assert plan[0] == ("datasets/fineweb10B_sp1024/fineweb_val_000000.bin", 62_021_846)
    assert plan[80] == ("datasets/fineweb10B_sp1024/fineweb_train_000079.bin", 100_000_000)
    assert [p for p, _ in plan[-2:]] == [
        "tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_1024_bpe.vocab",
    ]


# -----------------------------------------------------------------------------
# real FineWeb data
# -----------------------------------------------------------------------------


def test_real_fineweb_docs_export_to_the_reference_val_shard(tmp_path):
    model = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
    text = SHARED / "text" / "fineweb_docs_sample200.jsonl"
    reference = SHARED / "shards" / "realtext_sp1024" / "fineweb_val_000000.bin"
    if not (model.is_file() and text.is_file() and reference.is_file()):
        pytest.skip("../shared/data is not present beside the checkout")
    m = export_shards(iter_documents(text), model, tmp_path, num_val_docs=200)
    assert m["num_val_docs"] == 200 and m["tokens_val"] == 628_457
    assert np.array_equal(read_shard(tmp_path / "fineweb_val_000000.bin"), read_shard(reference))
    assert not any(p.name.startswith("fineweb_train_") for p in tmp_path.iterdir())
