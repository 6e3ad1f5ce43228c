"""Scoring CaseOps data (PR #1729): bpb counts the ORIGINAL bytes from the val sidecar, the
byte audit recounts them independently, and a missing or mismatched sidecar is an error,
never a fallback."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, TINY_ENV, run_script, summary_of

DOCS = SHARED_DATA / "text" / "fineweb_docs_sample200.jsonl"
CASEOPS_MODEL = (
    SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
)
HEADER_BYTES = 256 * 4


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    if not DOCS.exists() or not CASEOPS_MODEL.exists():
        pytest.skip("../shared/data (FineWeb docs and the CaseOps tokenizer) is not present")
    root = tmp_path_factory.mktemp("caseops")
    docs = root / "docs.jsonl"
    with open(DOCS, encoding="utf-8") as src, open(docs, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= 60:
                break
            dst.write(line)
    out = root / "shards"
    cmd = [
        sys.executable,
        "-m",
        "data.build",
        "shards",
        "--caseops",
        "--input",
        str(docs),
        "--model",
        str(CASEOPS_MODEL),
        "--out-dir",
        str(out),
        "--num-val-docs",
        "20",
        "--json",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def read_tokens(path):
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)


def caseops_env(data_path):
    return {
        **TINY_ENV,
        "VOCAB_SIZE": "8192",
        "DATA_PATH": str(data_path),
        "TOKENIZER_PATH": str(CASEOPS_MODEL),
        "EVAL_MODE": "sliding",
        "VAL_MAX_TOKENS": "4096",
    }


def test_build_writes_a_sidecar_parallel_to_the_val_tokens(caseops_data):
    val = read_tokens(caseops_data / "fineweb_val_000000.bin")
    sidecar = read_tokens(caseops_data / "fineweb_val_bytes_000000.bin")
    assert val.shape == sidecar.shape
    assert int(sidecar[val == 1].sum()) == 0  # BOS counts no byte
    assert (caseops_data / "shards.json").exists()


def test_training_scores_the_original_bytes_of_the_sidecar(caseops_data, tmp_path):
    run = run_script("train_gpt.py", {**caseops_env(caseops_data), "RUN_ID": "co"}, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    log = (tmp_path / "logs" / "co.txt").read_text()
    assert "val_bytes: per-token original UTF-8 counts" in log
    summary = summary_of(log)
    assert summary["audits"]["bytes"]["passed"]
    sidecar = read_tokens(caseops_data / "fineweb_val_bytes_000000.bin").astype(np.int64)
    # Sliding eval scores every target 1..N-1 of the val prefix exactly once.
    assert summary["bytes"] == int(sidecar[1 : summary["tokens"] + 1].sum())
    # Issue 24: the byte source is in the summary and in the artifact header, the same.
    source = summary["byte_source"]
    assert source["kind"] == "sidecar" and source["manifest"] == "verified"
    assert source["files"] == 1 and len(source["sha256"]) == 64
    sys.path.insert(0, str(REPO))
    from golf.container import read_artifact_header

    header, _ = read_artifact_header(str(tmp_path / "logs" / "co.pga"))
    assert header["byte_source"] == source


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_missing_sidecar_is_an_error_not_a_fallback(caseops_data, tmp_path, gpt):
    data = copy_data(caseops_data, tmp_path / "data")
    os.remove(data / "fineweb_val_bytes_000000.bin")
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000\.bin: missing"):
        gpt.load_val_byte_sidecar(str(data), 1000)


def test_a_sidecar_without_its_val_shard_is_an_error(caseops_data, tmp_path, gpt):
    data = copy_data(caseops_data, tmp_path / "data")
    shutil.copy(data / "fineweb_val_bytes_000000.bin", data / "fineweb_val_bytes_000007.bin")
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000007\.bin: a byte sidecar"):
        gpt.load_val_byte_sidecar(str(data), 1000)


def test_a_sidecar_of_the_wrong_length_is_an_error(caseops_data, tmp_path, gpt):
    data = copy_data(caseops_data, tmp_path / "data")
    side = data / "fineweb_val_bytes_000000.bin"
    blob = bytearray(side.read_bytes()[:-2])
    count = int.from_bytes(blob[8:12], "little")
    blob[8:12] = (count - 1).to_bytes(4, "little")
    side.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000\.bin: \d+ byte counts"):
        gpt.load_val_byte_sidecar(str(data), 1000)


def test_the_byte_audit_catches_a_tampered_sidecar(caseops_data, gpt):
    import torch

    h = gpt.Hyperparameters.from_env(caseops_env(caseops_data))
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    tokens = gpt.load_validation_tokens(h.data_path, h.train_seq_len)
    counter = gpt.val_byte_counter(h, sp, tokens, torch.device("cpu"))
    assert isinstance(counter, gpt.SidecarBytes)
    honest = gpt.audit_bytes(sp, tokens, counter)
    assert honest["passed"], honest
    inflated = gpt.SidecarBytes(counter.per_token * 2)
    result = gpt.audit_bytes(sp, tokens, inflated)
    assert not result["passed"]
    assert "sidecar counts" in result["failures"][0]


def test_the_original_byte_recount_follows_the_operators(gpt):
    title, allcaps, capnext, esc = "\ue001", "\ue002", "\ue003", "\ue004"
    assert gpt.original_utf8_bytes(f"{title}hello {allcaps}nasa") == len("Hello NASA")
    assert gpt.original_utf8_bytes(f"mc{capnext}donald") == len("McDonald")
    assert gpt.original_utf8_bytes(f"{esc}{title}x") == len(f"{title}x".encode("utf-8"))
    assert gpt.original_utf8_bytes("caf\u00e9") == 5


@pytest.mark.parametrize("mode", ["standard", "sliding", "ttt_lora"])
def test_every_eval_mode_counts_the_sidecar_bytes(caseops_data, gpt, mode):
    import torch

    env = {**caseops_env(caseops_data), "TTT_LORA_RANK": "2", "TTT_LORA_CHUNK": "32"}
    h = gpt.Hyperparameters.from_env(env)
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    tokens = gpt.load_validation_tokens(h.data_path, h.train_seq_len, 1024)
    counter = gpt.val_byte_counter(h, sp, tokens, torch.device("cpu"))
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    result = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, counter)
    scored = counter.per_token[1 : result["tokens"] + 1]
    assert result["bytes"] == int(scored.sum())


# --- issue 24: bytes that cannot be miscounted ---------------------------------------------------


def test_caseops_shards_without_sidecar_or_manifest_are_refused(caseops_data, tmp_path, gpt):
    """What the records' own prep script writes: CaseOps tokens and no sidecar, no manifest. The
    lookup tables would count the transformed text (+10 %); the tokenizer's operator pieces say
    so, and the run stops before it trains."""
    import torch

    data = copy_data(caseops_data, tmp_path / "data")
    os.remove(data / "fineweb_val_bytes_000000.bin")
    os.remove(data / "manifest.json")
    h = gpt.Hyperparameters.from_env(caseops_env(data))
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    assert gpt.tokenizer_transform(sp) == "lossless_caps_caseops_v1"
    tokens = gpt.load_validation_tokens(h.data_path, h.train_seq_len)
    with pytest.raises(ValueError, match=r"no val byte sidecars.*lossless_caps_caseops_v1"):
        gpt.val_byte_counter(h, sp, tokens, torch.device("cpu"))
    run = run_script("train_gpt.py", {**caseops_env(data), "RUN_ID": "noside"}, tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "no val byte sidecars" in run.stderr
    assert "step:1/" not in run.stdout


def test_a_sidecar_that_is_not_the_manifests_is_refused(caseops_data, tmp_path, gpt):
    """A sidecar with one byte more on 50 tokens is not the file the manifest recorded when the
    shards were built: refused before training or re-scoring, exactly (tolerance 0)."""
    data = copy_data(caseops_data, tmp_path / "data")
    side = data / "fineweb_val_bytes_000000.bin"
    counts = read_tokens(side).copy()
    counts[np.flatnonzero(counts > 0)[:50]] += 1
    header = side.read_bytes()[:HEADER_BYTES]
    side.write_bytes(header + counts.astype("<u2").tobytes())
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000\.bin: sha256 differs"):
        gpt.load_val_byte_sidecar(str(data), 1000)


def test_the_manifests_original_byte_total_is_checked(caseops_data, tmp_path, gpt):
    import json

    data = copy_data(caseops_data, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["original_bytes_val"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="original_bytes_val"):
        gpt.load_val_byte_sidecar(str(data), 1000)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b"\xff\xfe", None],
    ids=["bad json", "list", "binary", "dir"],
)
def test_a_malformed_manifest_is_an_error_not_ignored(caseops_data, tmp_path, gpt, content):
    data = copy_data(caseops_data, tmp_path / "data")
    path = data / "manifest.json"
    path.unlink()
    if content is None:
        path.mkdir()  # unreadable as a file
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"manifest\.json: "):
        gpt.load_val_byte_sidecar(str(data), 1000)


def test_a_biased_sidecar_without_a_manifest_fails_the_recount(caseops_data, tmp_path, gpt):
    """Without a manifest to bind it, the decoded-text recount still bounds a sidecar at 0.05 %:
    +0.4 % (about 0.004 bpb) fails the byte audit."""
    import torch

    data = copy_data(caseops_data, tmp_path / "data")
    os.remove(data / "manifest.json")
    h = gpt.Hyperparameters.from_env(caseops_env(data))
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    tokens = gpt.load_validation_tokens(h.data_path, h.train_seq_len)
    counter = gpt.val_byte_counter(h, sp, tokens, torch.device("cpu"))
    assert counter.source["manifest"] == "none"
    honest = gpt.audit_bytes(sp, tokens, counter)
    assert honest["passed"], honest
    biased = counter.per_token.clone()
    nonzero = torch.nonzero(biased > 0).flatten()
    extra = int(0.004 * int(biased[:10_000].sum()))
    biased[nonzero[:extra]] += 1
    result = gpt.audit_bytes(sp, tokens, gpt.SidecarBytes(biased, counter.source))
    assert not result["passed"] and "sidecar counts" in result["failures"][0]


def test_a_run_whose_sidecar_fails_the_recount_ends_invalid_not_in_a_traceback(
    caseops_data, tmp_path
):
    """No manifest to bind it, a sidecar 0.4 % too high: the byte audit fails, and the run ends
    `score INVALID` with exit status 3 (it ended in a KeyError before, issue 24)."""
    data = copy_data(caseops_data, tmp_path / "data")
    os.remove(data / "manifest.json")
    side = data / "fineweb_val_bytes_000000.bin"
    counts = read_tokens(side).astype(np.int64)
    nonzero = np.flatnonzero(counts > 0)
    counts[nonzero[: int(0.004 * counts[:10_000].sum())]] += 1
    side.write_bytes(side.read_bytes()[:HEADER_BYTES] + counts.astype("<u2").tobytes())
    run = run_script("train_gpt.py", {**caseops_env(data), "RUN_ID": "biased"}, tmp_path)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    log = (tmp_path / "logs" / "biased.txt").read_text()
    assert "score INVALID" in log
    summary = summary_of(log)
    assert not summary["valid"] and not summary["audits"]["bytes"]["passed"]
    assert "sidecar counts" in summary["audits"]["bytes"]["failures"][0]
