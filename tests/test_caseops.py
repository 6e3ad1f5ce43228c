"""CaseOps (lossless_caps_caseops_v1, PR #1729): the transform and its inverse, the original-byte
sidecar of the val shards, and the byte audit.

The pinned digests below were computed with data/caseops.py and cross-checked, outside the
repository, against the record's own lossless_caps.py and prepare_caseops_data.py (record folder
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, sentencepiece 0.2.0): the
transformed 200 documents are identical, and so are the val, sidecar and train shard files.
"""

import hashlib
import json
import random

import numpy as np
import pytest
from conftest import SHARED_DATA

from data import build, caseops
from data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from data.shards import check_shard, read_shard, write_shard

DOCS_PATH = SHARED_DATA / "text" / "fineweb_docs_sample200.jsonl"
MODEL_PATH = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
# sha256 of the 200 transformed documents, each as UTF-8 followed by "\n".
TRANSFORMED_200_SHA256 = "3ce8f4e0b32ad7c0bc0291d6258615d63ef307986cd508d904f5272745085dec"
# The export of the 200 documents with --num-val-docs 100 (byte-identical to the record's script).
EXPORT_100_SHA256 = {
    "fineweb_val_000000.bin": "2ce7c8b7e2b3edffd7164e5d3c53b58fe4e1ea1b0d259023248c9eb85310097a",
    "fineweb_val_bytes_000000.bin": (
        "bfd206a47f94e605ec8980d11c5d1784da86dcf4dbfd3a7e17718699496cbe48"
    ),
    "fineweb_train_000000.bin": "5181555bb6a3a2a6080f5387c9aa6c549fe6a5cd774fec23e3e376a87845731d",
}
RAW_BYTES_200 = 1_489_515

ADVERSARIAL = [
    "",
    "a",
    "A",
    "I am OK",
    "iPhone McDonald HTTPServer aBC ABc",
    TITLE + ALLCAPS + CAPNEXT + ESC,
    "X" + TITLE + "Y" + ESC + ESC + "z",
    "ÉCOLE École naïve Straße ΣΊΣΥΦΟΣ",
    "abc123DEF4gH 1.5 kHz",
    "snake_Case_WORD __init__ X_Y",
    "U.S.A. e.g. I'm",
    "\n\n  Hi\t\tTHERE  \n",
    "ﬁ Ⅻ ＡＢＣ 日本語 😀",
]


@pytest.fixture(scope="module")
def docs():
    if not DOCS_PATH.exists():
        pytest.skip("../shared/data is not present beside the checkout")
    with open(DOCS_PATH, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def sp():
    pytest.importorskip("sentencepiece")
    if not MODEL_PATH.exists():
        pytest.skip("../shared/data (the CaseOps tokenizer) is not present beside the checkout")
    return caseops.load_caseops_tokenizer(MODEL_PATH)


@pytest.fixture(scope="module")
def audit_200(sp, docs):
    return caseops.audit_original_bytes(sp, docs)


@pytest.fixture(scope="module")
def export_100(tmp_path_factory, docs):
    if not MODEL_PATH.exists():
        pytest.skip("../shared/data (the CaseOps tokenizer) is not present beside the checkout")
    out_dir = tmp_path_factory.mktemp("caseops_export")
    manifest = caseops.export_caseops_shards(docs, MODEL_PATH, out_dir, num_val_docs=100)
    return out_dir, manifest


# -----------------------------------------------------------------------------
# The transform
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("hello world", "hello world"),
        ("Hello", TITLE + "hello"),
        ("HELLO", ALLCAPS + "hello"),
        ("A", TITLE + "a"),
        ("I am OK", TITLE + "i am " + ALLCAPS + "ok"),
        ("iPhone", "i" + CAPNEXT + "phone"),
        ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
        ("ABc", TITLE + "a" + CAPNEXT + "bc"),
        ("abc123DEF4gH", "abc123" + ALLCAPS + "def4g" + CAPNEXT + "h"),
        ("snake_Case_WORD", "snake_" + TITLE + "case_" + ALLCAPS + "word"),
        ("ÉCOLE École", "É" + ALLCAPS + "cole École"),
        (TITLE, ESC + TITLE),
        ("X" + ALLCAPS, TITLE + "x" + ESC + ALLCAPS),
    ],
)
def test_encode_follows_the_caseops_rules(text, expected):
    assert caseops.encode(text) == expected


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_decode_inverts_encode_on_adversarial_strings(text):
    assert caseops.decode(caseops.encode(text)) == text


def test_decode_inverts_encode_on_random_strings():
    rng = random.Random(0)
    alphabet = "aAbBzZ _1é\n." + TITLE + ALLCAPS + CAPNEXT + ESC
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert caseops.decode(caseops.encode(text)) == text


@pytest.mark.parametrize(
    "bad",
    [
        TITLE,  # a marker with no word
        "A",  # uppercase ASCII never appears in transformed text
        ALLCAPS + "a",  # ALLCAPS needs two letters
        TITLE + "a" + CAPNEXT + "b",  # "AB" is written with ALLCAPS
        "ab" + TITLE + "c",  # a word marker inside a word
        ALLCAPS + "ab" + CAPNEXT + "c",
        ESC + "x",  # ESC escapes only an operator
        ESC,
    ],
)
def test_decode_refuses_text_encode_cannot_produce(bad):
    with pytest.raises(ValueError, match="not CaseOps text"):
        caseops.decode(bad)


def test_decode_succeeds_only_on_canonical_text():
    rng = random.Random(1)
    alphabet = "ab _" + TITLE + ALLCAPS + CAPNEXT + ESC
    decoded = 0
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        try:
            original = caseops.decode(text)
        except ValueError:
            continue
        decoded += 1
        assert caseops.encode(original) == text
    assert decoded > 1000


def test_roundtrip_on_the_200_fineweb_documents(docs):
    for text in docs:
        assert caseops.decode(caseops.encode(text)) == text


def test_transformed_200_documents_match_the_records_transform(docs):
    digest = hashlib.sha256()
    for text in docs:
        digest.update(caseops.encode(text).encode("utf-8") + b"\n")
    assert digest.hexdigest() == TRANSFORMED_200_SHA256


# -----------------------------------------------------------------------------
# Original bytes per token
# -----------------------------------------------------------------------------


def test_operators_and_bos_count_zero_original_bytes(sp):
    tokens, sidecar = caseops.tokenize_document(sp, "Hello World")
    pieces = [sp.id_to_piece(int(i)) for i in tokens]
    assert pieces == ["<s>", TITLE, "hello", "\u2581", TITLE, "world"]
    assert sidecar.tolist() == [0, 0, 5, 1, 0, 5]


def test_an_escaped_operator_counts_its_own_three_bytes(sp):
    tokens, sidecar = caseops.tokenize_document(sp, TITLE + "x")
    assert [sp.id_to_piece(int(i)) for i in tokens] == ["<s>", ESC, TITLE, "x"]
    assert sidecar.tolist() == [0, 0, 3, 1]


def test_original_byte_counts_carry_an_escape_across_pieces():
    surfaces = ["a" + ESC, TITLE, TITLE + "b", "é"]
    assert caseops.original_byte_counts(surfaces) == [1, 3, 1, 2]


def test_sidecar_equals_the_independent_recount_on_200_documents(audit_200):
    assert audit_200["mismatched_tokens"] == 0
    assert audit_200["out_of_order_docs"] == 0
    assert audit_200["sidecar_bytes"] == audit_200["recount_bytes"]
    assert audit_200["passed"]


def test_sidecar_total_equals_raw_utf8_length_on_200_documents(audit_200):
    # Piece surfaces include the whitespace nmt_nfkc folds into them, so on these documents (no
    # leading or trailing whitespace) the sidecar loses nothing: raw - sidecar = 0 bytes, where
    # the lookup-table bytes of decode(encode(text)) lose 97 (data/README.md).
    assert audit_200["raw_bytes"] == RAW_BYTES_200
    assert audit_200["raw_minus_sidecar"] == 0
    assert audit_200["uncovered_bytes"] == 0


def test_audit_reports_whitespace_the_normalizer_drops(sp):
    result = caseops.audit_original_bytes(sp, ["  Hello   World  \n\n", "\n", *ADVERSARIAL])
    assert result["passed"]
    assert result["raw_minus_sidecar"] == result["uncovered_bytes"] > 0
    assert set(result["uncovered_chars"]) <= {"' '", "'\\n'", "'\\t'"}


# -----------------------------------------------------------------------------
# Shards and the sidecar file
# -----------------------------------------------------------------------------


def test_export_matches_the_records_shards(export_100):
    out_dir, manifest = export_100
    for name, digest in EXPORT_100_SHA256.items():
        assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == digest, name
    assert sorted(f["name"] for f in manifest["files"]) == sorted(EXPORT_100_SHA256)


def test_export_writes_readable_parallel_shards(export_100, docs):
    out_dir, manifest = export_100
    tokens = read_shard(out_dir / "fineweb_val_000000.bin")
    sidecar = read_shard(out_dir / "fineweb_val_bytes_000000.bin")
    assert check_shard(out_dir / "fineweb_val_bytes_000000.bin") == tokens.size
    assert tokens.size == sidecar.size == manifest["tokens_val"]
    assert int((tokens == caseops.BOS_ID).sum()) == manifest["num_val_docs"] == 100
    train = read_shard(out_dir / "fineweb_train_000000.bin")
    assert train.size == manifest["tokens_train"]
    assert int((train == caseops.BOS_ID).sum()) == manifest["num_train_docs"] == 100
    raw_val = sum(len(text.encode("utf-8")) for text in docs[:100])
    assert manifest["original_bytes_val"] == int(sidecar.sum()) == raw_val
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"


def test_small_shard_size_cuts_tokens_and_sidecar_at_the_same_places(tmp_path, docs, export_100):
    out_dir, _ = export_100
    caseops.export_caseops_shards(docs[:100], MODEL_PATH, tmp_path, 100, shard_size=60_000)
    val_files = sorted(tmp_path.glob("fineweb_val_0*.bin"))
    byte_files = sorted(tmp_path.glob("fineweb_val_bytes_*.bin"))
    assert len(val_files) == len(byte_files) == 5
    for val_file, byte_file in zip(val_files, byte_files):
        assert check_shard(val_file) == check_shard(byte_file)
    whole = read_shard(out_dir / "fineweb_val_bytes_000000.bin")
    assert np.array_equal(np.concatenate([read_shard(p) for p in byte_files]), whole)
    checked = caseops.check_caseops_export(tmp_path, MODEL_PATH)
    assert checked["val_files"] == 5
    assert checked["tokens"] == whole.size


def test_build_cli_writes_caseops_shards_and_checks_them(tmp_path, capsys, docs, sp):
    argv = ["shards", "--caseops", "--input", str(DOCS_PATH), "--model", str(MODEL_PATH)]
    argv += ["--out-dir", str(tmp_path), "--num-val-docs", "3", "--max-docs", "5", "--json"]
    assert build.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["val_docs"], summary["train_docs"]) == (3, 2)
    assert summary["sidecars_checked"] == 1


def test_build_cli_refuses_a_tokenizer_without_the_operators(tmp_path, capsys, docs, sp):
    plain = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
    argv = ["shards", "--caseops", "--input", str(DOCS_PATH), "--model", str(plain)]
    argv += ["--out-dir", str(tmp_path), "--num-val-docs", "1"]
    assert build.main(argv) == 1
    assert "not a CaseOps tokenizer" in capsys.readouterr().err


def _write_pair(tmp_path, tokens, counts):
    val = write_shard(tmp_path / "fineweb_val_000000.bin", np.array(tokens, dtype=np.uint16))
    sidecar = tmp_path / "fineweb_val_bytes_000000.bin"
    if counts is not None:
        write_shard(sidecar, np.array(counts, dtype=np.uint16))
    return val, sidecar


# BOS, TITLE, "hello", ESC, TITLE (escaped, 3 bytes), ALLCAPS, "ok"
TOKENS = [1, 4, 100, 7, 4, 5, 200]
COUNTS = [0, 0, 5, 0, 3, 0, 2]


def test_check_bytes_sidecar_accepts_a_caseops_sidecar(tmp_path):
    val, sidecar = _write_pair(tmp_path, TOKENS, COUNTS)
    assert caseops.check_bytes_sidecar(val, sidecar).tolist() == COUNTS


def test_check_bytes_sidecar_refuses_a_missing_file(tmp_path):
    val, sidecar = _write_pair(tmp_path, TOKENS, None)
    with pytest.raises(ValueError, match="fineweb_val_bytes_000000.bin: missing"):
        caseops.check_bytes_sidecar(val, sidecar)


def test_check_bytes_sidecar_refuses_a_wrong_length(tmp_path):
    val, sidecar = _write_pair(tmp_path, TOKENS, COUNTS[:-1])
    with pytest.raises(ValueError, match="fineweb_val_bytes_000000.bin: 6 byte counts for 7"):
        caseops.check_bytes_sidecar(val, sidecar)


def test_check_bytes_sidecar_refuses_lookup_table_bytes(tmp_path):
    val, sidecar = _write_pair(tmp_path, TOKENS, [0, 3, 5, 3, 3, 3, 2])
    with pytest.raises(ValueError, match="fineweb_val_bytes_000000.bin: operator token 4"):
        caseops.check_bytes_sidecar(val, sidecar)


def test_check_bytes_sidecar_refuses_bytes_on_bos(tmp_path):
    val, sidecar = _write_pair(tmp_path, TOKENS, [1, *COUNTS[1:]])
    with pytest.raises(ValueError, match="fineweb_val_bytes_000000.bin: BOS"):
        caseops.check_bytes_sidecar(val, sidecar)


def test_check_caseops_export_refuses_another_tokenizer(export_100):
    out_dir, _ = export_100
    other = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
    with pytest.raises(ValueError, match="manifest.json: shards were built with tokenizer"):
        caseops.check_caseops_export(out_dir, other)
