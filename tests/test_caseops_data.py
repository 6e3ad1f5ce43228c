"""The record preset's data in one command (issue 25): `python -m data.download --variant
sp8192_caseops` (the canonical hub export, verified) and `--from-docs` (built locally: parallel,
resumable, refusing to mix).

Offline: a fake hub (a folder laid out like the two dataset repos, read through --hub-dir) is made
from the 200 real FineWeb documents and the CaseOps tokenizer in ../shared/data. Its shards come
from data/caseops.py's sequential export, whose files equal the record's prepare_caseops_data.py
(tests/test_caseops.py pins them), so the parallel --from-docs builder is compared with an
independent builder, not with itself.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from data import caseops, caseops_hub, download, fromdocs, hub
from data.caseops_hub import HUB_DATASET, TOKENIZER_NAME
from data.shards import read_shard

DOCS = SHARED_DATA / "text" / "fineweb_docs_sample200.jsonl"
MODEL = SHARED_DATA / "tokenizers" / TOKENIZER_NAME
# A small layout of the canonical shape: 50 val documents, files of 40,000 tokens.
VAL_DOCS = 50
SHARD = 40_000
# More train files than the 200 documents fill: the documents run out first, as in data.build.
MANY_FILES = 50


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def shard_names(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("fineweb_*.bin"))


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """DIR/<owner>/<name>/... for the official repo (the documents) and the CaseOps repo (the
    sequential export of the same documents, the tokenizer, a manifest in the official format)."""
    if not (DOCS.is_file() and MODEL.is_file()):
        pytest.skip("../shared/data is not present beside the checkout")
    root = tmp_path_factory.mktemp("hub")
    docs_repo = root / "willdepueoai" / "parameter-golf" / "datasets"
    docs_repo.mkdir(parents=True)
    shutil.copyfile(DOCS, docs_repo / "docs_selected.jsonl")
    source_manifest = {"docs_sha256": sha(DOCS), "num_docs": 200, "docs_val": VAL_DOCS}
    (docs_repo / "docs_selected.source_manifest.json").write_text(json.dumps(source_manifest))

    repo = root / "romeerp" / "parameter-golf-caseops-v1" / "datasets"
    (repo / "tokenizers").mkdir(parents=True)
    shutil.copyfile(MODEL, repo / "tokenizers" / TOKENIZER_NAME)
    built = tmp_path_factory.mktemp("sequential")
    texts = [json.loads(line)["text"] for line in open(DOCS, encoding="utf-8") if line.strip()]
    m = caseops.export_caseops_shards(texts, MODEL, built, VAL_DOCS, shard_size=SHARD)
    dataset = repo / "datasets" / HUB_DATASET
    dataset.mkdir(parents=True)
    for name in shard_names(built):
        shutil.copyfile(built / name, dataset / name)
    files = {s: sum(1 for f in m["files"] if f["split"] == s) for s in ("val", "train")}
    manifest = {
        "shard_size": SHARD,
        "num_val_docs": VAL_DOCS,
        "tokenizers": [{"name": "caseops", "model_path": f"tokenizers/{TOKENIZER_NAME}"}],
        "datasets": [
            {
                "name": HUB_DATASET,
                "tokenizer_name": "caseops",
                "path": f"datasets/{HUB_DATASET}",
                "stats": {
                    "docs_val": VAL_DOCS,
                    "files_val": files["val"],
                    "files_train": files["train"],
                    "tokens_val": m["tokens_val"],
                    "tokens_train": m["tokens_train"],
                },
            }
        ],
    }
    (repo / "manifest.json").write_text(json.dumps(manifest))
    return root, dataset, files


@pytest.fixture(scope="module")
def downloaded(fake_hub, tmp_path_factory):
    root, _, files = fake_hub
    local = tmp_path_factory.mktemp("downloaded")
    summary = caseops_hub.download_caseops(files["train"], local, root, check_docs=8)
    return local, summary


@pytest.fixture(scope="module")
def built(fake_hub, tmp_path_factory):
    root, _, _ = fake_hub
    local = tmp_path_factory.mktemp("built")
    summary = fromdocs.build_from_docs(
        MANY_FILES, local, root, workers=2, num_val_docs=VAL_DOCS, shard_size=SHARD,
        train_files=MANY_FILES, chunk_docs=16,
    )  # fmt: skip
    return local, summary


def dataset_of(local):
    return local / "datasets" / "fineweb10B_sp8192_caseops"


# -----------------------------------------------------------------------------
# download
# -----------------------------------------------------------------------------


def test_download_fetches_verifies_and_binds_the_export(fake_hub, downloaded):
    _, hub_dataset, files = fake_hub
    local, summary = downloaded
    out = dataset_of(local)
    assert shard_names(out) == shard_names(hub_dataset)
    for name in shard_names(out):
        assert (out / name).read_bytes() == (hub_dataset / name).read_bytes(), name
    assert summary["reproduced_docs"] == 8
    assert (summary["val_shards"], summary["downloaded"]) == (
        files["val"],
        len(shard_names(out)) + 1,
    )
    assert (local / "tokenizers" / TOKENIZER_NAME).read_bytes() == MODEL.read_bytes()
    binding = json.loads((out / "shards.json").read_text())
    assert binding["tokenizer_sha256"] == sha(MODEL) and binding["vocab_size"] == 8192
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_val_docs"] == VAL_DOCS
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        n: sha(out / n) for n in shard_names(out)
    }
    assert not (local / ".download").exists()


def test_training_scripts_accept_the_download(downloaded):
    pytest.importorskip("torch")
    from golf.data import val_byte_sidecar

    out = dataset_of(downloaded[0])
    per_token, source = val_byte_sidecar(str(out), 10**9)
    assert source["manifest"] == "verified"
    assert (
        int(per_token.sum())
        == json.loads((out / "manifest.json").read_text())["original_bytes_val"]
    )
    assert caseops.check_caseops_export(out, MODEL)["val_files"] == source["files"]


def test_second_download_skips_verified_files(fake_hub, downloaded):
    root, _, files = fake_hub
    summary = caseops_hub.download_caseops(files["train"], downloaded[0], root, check_docs=1)
    assert summary["downloaded"] == 0 and summary["skipped"] == len(shard_names(fake_hub[1])) + 1


def test_a_truncated_file_on_the_hub_is_refused_and_nothing_is_written(fake_hub, tmp_path):
    root, hub_dataset, _ = fake_hub
    broken = tmp_path / "hub"
    shutil.copytree(root, broken)
    train = broken / hub_dataset.relative_to(root) / "fineweb_train_000001.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(RuntimeError) as e:
        caseops_hub.download_caseops(2, tmp_path / "data", broken)
    message = str(e.value)
    assert "fineweb_train_000001.bin: the downloaded file failed verification" in message
    assert "nothing was written" in message and "\n" not in message
    out = dataset_of(tmp_path / "data")
    assert not (out / "fineweb_train_000001.bin").exists()
    assert not (out / "manifest.json").exists() and not (out / "shards.json").exists()
    assert not list((tmp_path / "data" / ".download").rglob("fineweb_train_000001.bin*"))


def test_a_file_whose_sha256_differs_from_the_published_one_is_refused(
    fake_hub, tmp_path, monkeypatch
):
    root, hub_dataset, _ = fake_hub
    broken = tmp_path / "hub"
    shutil.copytree(root, broken)
    repo = "romeerp/parameter-golf-caseops-v1"
    published = {}
    for path in (broken / repo).rglob("*.bin"):
        remote = str(path.relative_to(broken / repo))
        published[remote] = {"size": path.stat().st_size, "sha256": sha(path)}
    monkeypatch.setattr(hub.LocalSource, "expected", lambda self, remotes: published)
    val = broken / hub_dataset.relative_to(root) / "fineweb_val_bytes_000000.bin"
    raw = bytearray(val.read_bytes())
    raw[-1] ^= 1  # same size, same header: only the hash can tell
    val.write_bytes(bytes(raw))
    expected = (
        r"fineweb_val_bytes_000000\.bin: .*sha256 [0-9a-f]{64}, the source publishes "
        r"[0-9a-f]{64}\); nothing was written"
    )
    with pytest.raises(RuntimeError, match=expected):
        caseops_hub.download_caseops(1, tmp_path / "data", broken)
    assert not (dataset_of(tmp_path / "data") / "fineweb_val_bytes_000000.bin").exists()


def test_a_download_killed_midway_resumes(fake_hub, tmp_path, monkeypatch):
    root, hub_dataset, files = fake_hub
    local = tmp_path / "data"
    real_fetch = hub.LocalSource.fetch

    def killed_at_train_1(self, remote, staging):
        if remote.endswith("fineweb_train_000001.bin"):
            # half of the file reached the staging folder when the process died
            part = staging / (remote + ".part")
            part.parent.mkdir(parents=True, exist_ok=True)
            whole = (self.root / remote).read_bytes()
            part.write_bytes(whole[: len(whole) // 2])
            raise KeyboardInterrupt
        return real_fetch(self, remote, staging)

    monkeypatch.setattr(hub.LocalSource, "fetch", killed_at_train_1)
    with pytest.raises(KeyboardInterrupt):
        caseops_hub.download_caseops(3, local, root, check_docs=2)
    monkeypatch.setattr(hub.LocalSource, "fetch", real_fetch)
    copied = []
    real_copy = shutil.copyfileobj

    def counting_copy(src, dst, length=0):
        start = dst.tell()
        real_copy(src, dst, length)
        copied.append((os.path.basename(dst.name), dst.tell() - start))

    monkeypatch.setattr(hub.shutil, "copyfileobj", counting_copy)
    summary = caseops_hub.download_caseops(3, local, root, check_docs=2)
    size = (hub_dataset / "fineweb_train_000001.bin").stat().st_size
    assert summary["skipped"] == 2 * files["val"] + 1  # val, sidecars, train 0 were kept
    # the .part was continued, not copied again
    assert ("fineweb_train_000001.bin.part", size - size // 2) in copied
    out = dataset_of(local)
    for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        assert (out / name).read_bytes() == (hub_dataset / name).read_bytes()


def test_the_reproduction_check_catches_val_tokens_our_builder_does_not_make(fake_hub, tmp_path):
    root, hub_dataset, _ = fake_hub
    other = tmp_path / "hub"
    shutil.copytree(root, other)
    docs = other / "willdepueoai" / "parameter-golf" / "datasets" / "docs_selected.jsonl"
    lines = docs.read_text(encoding="utf-8").splitlines(keepends=True)
    docs.write_text(lines[1] + lines[0] + "".join(lines[2:]), encoding="utf-8")
    expected = (
        r"val tokens differ from our CaseOps builder on document 0 of .*docs_selected\.jsonl "
        r"\(token \d+: \d+ != \d+\)"
    )
    with pytest.raises(RuntimeError, match=expected):
        caseops_hub.download_caseops(0, tmp_path / "data", other, check_docs=4)
    assert not (dataset_of(tmp_path / "data") / "shards.json").exists()


def test_download_cli_names_the_variant_and_refuses_misplaced_options(
    fake_hub, downloaded, capsys, tmp_path
):
    root, _, _ = fake_hub
    local = tmp_path / "data"
    shutil.copytree(downloaded[0], local)
    argv = ["--variant", "sp8192_caseops", "--train-shards", "1", "--json"]
    argv += ["--local-dir", str(local), "--hub-dir", str(root), "--check-docs", "2"]
    assert download.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["variant"] == "sp8192_caseops" and summary["reproduced_docs"] == 2
    assert download.main(["--variant", "sp1024", "--from-docs"]) == 1
    assert capsys.readouterr().err == "error: --from-docs: only for --variant sp8192_caseops\n"
    assert download.main(["--variant", "sp8192_caseops", "--workers", "2"]) == 1
    assert capsys.readouterr().err == "error: --workers: only with --from-docs\n"


# -----------------------------------------------------------------------------
# --from-docs
# -----------------------------------------------------------------------------


def test_from_docs_builds_the_export_file_for_file(fake_hub, built):
    _, hub_dataset, files = fake_hub
    local, summary = built
    out = dataset_of(local)
    assert shard_names(out) == shard_names(hub_dataset)
    for name in shard_names(out):
        assert (out / name).read_bytes() == (hub_dataset / name).read_bytes(), name
    assert summary["complete"] and summary["train_shards"] == files["train"]
    assert (local / "docs_selected.jsonl").read_bytes() == DOCS.read_bytes()


def test_from_docs_and_download_write_the_same_layout(downloaded, built):
    got = dataset_of(downloaded[0])
    made = dataset_of(built[0])
    assert sorted(os.listdir(got)) == sorted(os.listdir(made))
    assert (got / "shards.json").read_bytes() == (made / "shards.json").read_bytes()
    m_got = json.loads((got / "manifest.json").read_text())
    m_made = json.loads((made / "manifest.json").read_text())
    assert sorted(m_got) == sorted(m_made)
    assert {k: v for k, v in m_got.items() if k != "source"} == {
        k: v for k, v in m_made.items() if k != "source"
    }
    assert (m_got["source"]["kind"], m_made["source"]["kind"]) == ("hub", "docs")
    for name in os.listdir(got):
        if name.endswith(".bin"):
            a = np.fromfile(got / name, dtype="<i4", count=256)
            b = np.fromfile(made / name, dtype="<i4", count=256)
            assert np.array_equal(a, b), name


def test_from_docs_resumes_after_a_kill_keeping_finished_files(fake_hub, built, tmp_path):
    root, _, _ = fake_hub
    local = tmp_path / "data"
    writes = []
    real_write = fromdocs.write_shard

    def killed_after_four(path, tokens, vocab_size=None):
        if len(writes) == 4:
            raise KeyboardInterrupt
        writes.append(path.name)
        return real_write(path, tokens, vocab_size)

    kwargs = dict(num_val_docs=VAL_DOCS, shard_size=SHARD, train_files=MANY_FILES, chunk_docs=16)
    fromdocs.write_shard = killed_after_four
    try:
        with pytest.raises(KeyboardInterrupt):
            fromdocs.build_from_docs(MANY_FILES, local, root, workers=1, **kwargs)
    finally:
        fromdocs.write_shard = real_write
    out = dataset_of(local)
    listed = [f["name"] for f in json.loads((out / "manifest.json").read_text())["files"]]
    assert listed == writes[:4]
    kept = {name: (out / name).stat().st_mtime_ns for name in listed}
    (out / ".fineweb_train_000009.bin.abc.tmp").write_bytes(b"half a file")
    (out / "fineweb_train_000007.bin").write_bytes(b"written after the last manifest update")
    summary = fromdocs.build_from_docs(MANY_FILES, local, root, workers=2, **kwargs)
    assert summary["kept"] == 4 and summary["complete"]
    assert {name: (out / name).stat().st_mtime_ns for name in listed} == kept
    assert sorted(os.listdir(out)) == sorted(os.listdir(dataset_of(built[0])))
    for name in shard_names(out):
        assert (out / name).read_bytes() == (dataset_of(built[0]) / name).read_bytes(), name


def test_from_docs_resumes_inside_a_document_and_rebuilds_a_damaged_file(fake_hub, built, tmp_path):
    source = dataset_of(built[0])
    local = tmp_path / "data"
    shutil.copytree(built[0], local)
    out = dataset_of(local)
    manifest = json.loads((out / "manifest.json").read_text())
    resume = manifest["source"]["resume"]
    # the first train file whose predecessor ends inside a document: resuming there must start
    # from the middle of that document
    inside = [
        i for i in range(1, fake_hub[2]["train"]) if resume[f"fineweb_train_{i - 1:06d}.bin"][2] > 0
    ]
    assert inside, "some train file must end inside a document for this test to mean anything"
    damaged = out / f"fineweb_train_{inside[0]:06d}.bin"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    config = manifest["source"]["config"]
    summary = fromdocs.build_shards(
        local / "docs_selected.jsonl", local / "tokenizers" / TOKENIZER_NAME, out, config,
        MANY_FILES, workers=1, chunk_docs=16,
    )  # fmt: skip
    assert summary["kept"] == 2 * fake_hub[2]["val"] + inside[0]  # val + sidecars, train before
    for name in shard_names(source):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_the_last_train_file_ends_with_the_document_crossing_the_budget(fake_hub, tmp_path, capsys):
    root, _, _ = fake_hub
    kwargs = dict(num_val_docs=VAL_DOCS, shard_size=SHARD, train_files=3, chunk_docs=16)
    summary = fromdocs.build_from_docs(3, tmp_path / "a", root, workers=1, **kwargs)
    lines = capsys.readouterr().err.splitlines()
    assert "progress: from-docs wrote fineweb_train_000002.bin (3/3 train files" in lines[-1]
    out = dataset_of(tmp_path / "a")
    train = [read_shard(out / f"fineweb_train_{i:06d}.bin") for i in range(3)]
    assert [t.size for t in train[:2]] == [SHARD, SHARD] and train[2].size > SHARD
    assert summary["complete"] and summary["train_tokens"] == sum(t.size for t in train)
    sequential = np.concatenate(
        [read_shard(p) for p in sorted(fake_hub[1].glob("fineweb_train_*.bin"))]
    )
    stream = np.concatenate(train)
    assert np.array_equal(stream, sequential[: stream.size])
    assert sequential[stream.size] == caseops.BOS_ID  # it ends where the next document begins
    # --train-shards 1 of the same layout: the first file only, resumable to the rest
    partial = fromdocs.build_from_docs(1, tmp_path / "b", root, workers=1, **kwargs)
    assert (partial["train_shards"], partial["complete"]) == (1, False)
    rest = fromdocs.build_from_docs(3, tmp_path / "b", root, workers=1, **kwargs)
    assert (rest["kept"], rest["complete"]) == (2 * fake_hub[2]["val"] + 1, True)
    for i in range(3):
        name = f"fineweb_train_{i:06d}.bin"
        assert (dataset_of(tmp_path / "b") / name).read_bytes() == (out / name).read_bytes()


def test_documents_with_a_wrong_sha256_are_refused(fake_hub, tmp_path):
    root, _, _ = fake_hub
    other = tmp_path / "hub"
    shutil.copytree(root, other)
    sidecar = other / "willdepueoai/parameter-golf/datasets/docs_selected.source_manifest.json"
    sidecar.write_text(json.dumps({"docs_sha256": "0" * 64}))
    with pytest.raises(ValueError) as e:
        fromdocs.build_from_docs(1, tmp_path / "data", other, workers=1)
    assert str(e.value) == (
        f"datasets/docs_selected.jsonl: sha256 {sha(DOCS)}, but "
        f"docs_selected.source_manifest.json says {'0' * 64}; the download was discarded, "
        f"nothing was written to {tmp_path / 'data' / 'docs_selected.jsonl'}"
    )
    assert not (tmp_path / "data" / "docs_selected.jsonl").exists()
    assert not list((tmp_path / "data" / ".download").rglob("docs_selected.jsonl*"))


def test_from_docs_refuses_shards_it_did_not_make(fake_hub, downloaded, built, tmp_path):
    root, _, _ = fake_hub
    mixed = tmp_path / "mixed"
    shutil.copytree(downloaded[0], mixed)
    foreign = r"fineweb_train_000000\.bin: not made by --from-docs \(its manifest\.json says"
    with pytest.raises(ValueError, match=foreign):
        fromdocs.build_from_docs(1, mixed, root, workers=1)
    other = tmp_path / "other"
    shutil.copytree(built[0], other)
    kwargs = dict(num_val_docs=VAL_DOCS, train_files=MANY_FILES, chunk_docs=16)
    stale = rf"fineweb_train_000000\.bin: built with shard_size={SHARD}, this build has {2 * SHARD}"
    with pytest.raises(ValueError, match=stale):
        fromdocs.build_from_docs(1, other, root, workers=1, shard_size=2 * SHARD, **kwargs)
    with pytest.raises(ValueError, match=r"not downloaded from the hub"):
        caseops_hub.download_caseops(1, other, root)


def test_a_missing_record_dataset_names_the_download_command():
    from golf.data import how_to_get

    hint = how_to_get("data/datasets/fineweb10B_sp8192_caseops")
    assert "`python -m data.download --variant sp8192_caseops`" in hint
    assert how_to_get(f"data/tokenizers/{TOKENIZER_NAME}") == hint


# -----------------------------------------------------------------------------
# the hub client (its answers stood in for: no network in tests)
# -----------------------------------------------------------------------------


def test_hub_source_reads_the_published_sizes_and_sha256(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    monkeypatch.setattr(hub, "_check_resolvable", lambda: None)
    asked = []

    def paths_info(self, repo_id, paths, repo_type=None):
        asked.append((repo_id, list(paths), repo_type))
        lfs = {"size": 12, "oid": "ab" * 32, "pointerSize": 130}
        return [RepoFile(path=p, size=12, oid="0" * 40, lfs=lfs) for p in paths[:1]] + [
            RepoFile(path=p, size=7, oid="1" * 40) for p in paths[1:]
        ]

    monkeypatch.setattr(HfApi, "get_paths_info", paths_info)
    got = hub.HubSource("o/r").expected(["a.bin", "b.json"])
    assert asked == [("o/r", ["a.bin", "b.json"], "dataset")]
    assert got == {
        "a.bin": {"size": 12, "sha256": "ab" * 32},
        "b.json": {"size": 7, "sha256": None},
    }


def test_hub_source_offline_is_one_actionable_line(monkeypatch):
    def offline():
        raise ConnectionError("cannot resolve huggingface.co: Name or service not known")

    monkeypatch.setattr(hub, "_check_resolvable", offline)
    with pytest.raises(RuntimeError) as e:
        hub.HubSource("o/r").fetch("datasets/manifest.json", Path("/nonexistent"))
    assert str(e.value).startswith("cannot reach the Hugging Face hub (cannot resolve")
    assert "check the network" in str(e.value) and "\n" not in str(e.value)
