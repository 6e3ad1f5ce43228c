"""Data and tokenizer belong together (issue 13): shards.json binds shards to their tokenizer, a
re-encode check stands in where there is none, and val shards are checked before training starts.

Every refusal is one line naming the file or variable; run as a script it exits 2. The tokenizers
are tiny (vocab 400, trained in well under a second on the pydoc topics); the real-data cases use
../shared/data and skip cleanly when it is absent.
"""

import json
import sys
import types
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TINY_ENV, run_script

from data.build import export_shards, train_tokenizer
from data.shards import HEADER_BYTES, sha256_file, write_shard

VOCAB = 400


@pytest.fixture(scope="session")
def topics():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory, topics):
    """(right, wrong): two tokenizers of the same vocabulary size trained on different documents."""
    root = tmp_path_factory.mktemp("tokenizers")
    right = train_tokenizer(topics[:40], VOCAB, root / "right_400_bpe.model")
    wrong = train_tokenizer(topics[40:], VOCAB, root / "wrong_400_bpe.model")
    return right, wrong


@pytest.fixture
def dataset(tmp_path, topics, tokenizers):
    """Shards of the first 40 topics (5 val documents) written by data/ with the right tokenizer."""
    out = tmp_path / "ds"
    export_shards(topics[:40], tokenizers[0], out, num_val_docs=5)
    return out


def hparams(data_path, tokenizer_path, vocab_size=VOCAB):
    return types.SimpleNamespace(
        data_path=str(data_path),
        tokenizer_path=str(tokenizer_path),
        vocab_size=vocab_size,
        train_seq_len=64,
        eval_len=64,
    )


def check(gpt, data_path, tokenizer_path, vocab_size=VOCAB, max_tokens=0):
    """The pre-training data checks of the shared data block; returns the val tokens."""
    h = hparams(data_path, tokenizer_path, vocab_size)
    sp = gpt.load_tokenizer(h.tokenizer_path, vocab_size)
    return gpt.load_checked_val_tokens(h, sp, 64, max_tokens)


def refused(gpt, data_path, tokenizer_path, vocab_size=VOCAB):
    with pytest.raises(ValueError) as info:
        check(gpt, data_path, tokenizer_path, vocab_size)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the binding file -------------------------------------------------------------------------


def test_export_writes_the_binding_beside_the_shards(dataset, tokenizers):
    binding = json.loads((dataset / "shards.json").read_text())
    assert binding == {
        "format": "pgolf-shards",
        "version": 1,
        "tokenizer_sha256": sha256_file(tokenizers[0]),
        "tokenizer": "right_400_bpe.model",
        "vocab_size": VOCAB,
    }


def test_right_tokenizer_passes_with_the_binding(gpt, dataset, tokenizers):
    tokens = check(gpt, dataset, tokenizers[0])
    assert int(tokens[0]) == 1 and int(tokens.max()) < VOCAB


def test_wrong_tokenizer_of_the_same_vocab_is_refused_by_the_binding(gpt, dataset, tokenizers):
    right, wrong = tokenizers
    message = refused(gpt, dataset, wrong)
    assert f"TOKENIZER_PATH={str(wrong)!r}" in message
    assert f"DATA_PATH={str(dataset)!r}" in message
    assert sha256_file(wrong) in message and sha256_file(right) in message


def test_binding_vocab_must_equal_vocab_size(gpt, dataset, tokenizers):
    path = dataset / "shards.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 512}))
    message = refused(gpt, dataset, tokenizers[0])
    assert "shards.json records vocab_size 512" in message and "VOCAB_SIZE=400" in message


@pytest.mark.parametrize(
    "text", ["{not json", '{"format": "other", "version": 1}', '{"format": "pgolf-shards"}']
)
def test_a_broken_binding_is_refused_naming_it(gpt, dataset, tokenizers, text):
    (dataset / "shards.json").write_text(text)
    assert str(dataset / "shards.json") in refused(gpt, dataset, tokenizers[0])


# --- without a binding: the re-encode check ---------------------------------------------------


def test_right_tokenizer_passes_without_the_binding(gpt, dataset, tokenizers):
    (dataset / "shards.json").unlink()
    assert check(gpt, dataset, tokenizers[0]).numel() > 64
    assert check(gpt, dataset, tokenizers[0], max_tokens=100).numel() == 101  # VAL_MAX_TOKENS cut


def test_wrong_tokenizer_of_the_same_vocab_is_refused_without_the_binding(gpt, dataset, tokenizers):
    (dataset / "shards.json").unlink()
    message = refused(gpt, dataset, tokenizers[1])
    assert "does not reproduce the val tokens" in message
    assert str(tokenizers[1]) in message and str(dataset) in message


# --- val and train shards ---------------------------------------------------------------------


def val_shard(dataset):
    return dataset / "fineweb_val_000000.bin"


def test_val_id_at_or_above_vocab_is_refused_naming_the_shard(gpt, dataset, tokenizers):
    write_shard(val_shard(dataset), [1, 5, 6, VOCAB, 7] * 20)
    message = refused(gpt, dataset, tokenizers[0])
    assert str(val_shard(dataset)) in message and "token id 400 >= VOCAB_SIZE=400" in message


def test_val_split_without_bos_is_refused_naming_the_shard(gpt, dataset, tokenizers):
    write_shard(val_shard(dataset), [5, 6, 7, 8] * 30)
    message = refused(gpt, dataset, tokenizers[0])
    assert str(val_shard(dataset)) in message and "not BOS" in message


@pytest.mark.parametrize("keep", [100, HEADER_BYTES + 10])
def test_truncated_val_shard_is_refused_naming_the_shard(gpt, dataset, tokenizers, keep):
    path = val_shard(dataset)
    path.write_bytes(path.read_bytes()[:keep])
    assert str(path) in refused(gpt, dataset, tokenizers[0])


def test_truncated_train_shard_is_refused_before_training(gpt, dataset, tokenizers):
    path = dataset / "fineweb_train_000000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    message = refused(gpt, dataset, tokenizers[0])
    assert str(path) in message and "truncated" in message


def test_shard_writer_refuses_ids_at_or_above_vocab(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    with pytest.raises(ValueError) as info:
        write_shard(path, [1, 2, VOCAB], vocab_size=VOCAB)
    assert str(info.value) == f"{path}: token id 400 >= vocab size 400"
    assert list(tmp_path.iterdir()) == []


def test_rescoring_runs_the_same_checks(gpt, dataset, tokenizers):
    import eval_bpb

    with pytest.raises(ValueError, match="is not the tokenizer the shards"):
        eval_bpb.evaluate(gpt, None, hparams(dataset, tokenizers[1]), None)


def test_the_script_exits_2_with_one_line_naming_the_shard(dataset, tokenizers, tmp_path):
    write_shard(val_shard(dataset), [1, 5, VOCAB + 3] * 100)
    env = {
        **TINY_ENV,
        "DATA_PATH": str(dataset),
        "TOKENIZER_PATH": str(tokenizers[0]),
        "VOCAB_SIZE": str(VOCAB),
        "LOG_DIR": str(tmp_path / "logs"),
        "RUN_ID": "bad_data",
    }
    out = run_script("train_gpt.py", env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0
    assert str(val_shard(dataset)) in out.stderr and "token id 403 >= VOCAB_SIZE=400" in out.stderr
    assert not list((tmp_path / "logs").glob("*.pga"))


# --- the real shards beside the checkout ------------------------------------------------------


def shared(*parts):
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (../shared/data beside the checkout)")
    return path


@pytest.mark.parametrize(
    "shards, tokenizer, vocab",
    [
        ("realtext_sp1024", "fineweb_1024_bpe.model", 1024),
        ("realtext_sp8192", "fineweb_8192_bpe.model", 8192),
    ],
)
def test_the_official_tokenizers_pass_on_the_shared_shards(gpt, shards, tokenizer, vocab):
    data = shared("shards", shards)
    tokens = check(gpt, data, shared("tokenizers", tokenizer), vocab, max_tokens=3000)
    assert tokens.numel() == 3001


def test_a_tokenizer_of_the_same_vocab_is_refused_on_the_shared_sp1024(gpt, topics, tmp_path):
    data = shared("shards", "realtext_sp1024")
    other = train_tokenizer(topics, 1024, tmp_path / "pydoc_1024_bpe.model")
    assert "does not reproduce the val tokens" in refused(gpt, data, other, 1024)


def test_the_caseops_tokenizer_is_refused_on_the_shared_sp8192(gpt):
    data = shared("shards", "realtext_sp8192")
    tok = shared("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    assert "does not reproduce the val tokens" in refused(gpt, data, tok, 8192)


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__)), "-q"]))
