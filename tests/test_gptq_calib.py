"""GPTQ_CALIB_SOURCE=random (#2135's GPTQ_CALIBRATION_MODE=random): GPTQ calibrates on random
windows of the rank's own training shards, drawn as #2135's fresh loader draws them, never from
val, the same for every SEED."""

import numpy as np
import pytest
import torch
from conftest import TINY_ENV

from data.shards import write_shard

SEQ = 16
TRAIN_LENGTHS = (700, 1200, 333, 40, 900)  # the 40-token shard holds two windows of 17
VAL_IDS = (600, 700)  # val ids lie above every train id, so a val token would show


@pytest.fixture
def dataset(tmp_path):
    """Five train shards of ids in [2, 500) and a val shard of ids in [600, 700); returns
    (DATA_PATH, [train tokens])."""
    rng = np.random.default_rng(0)
    shards = []
    for i, length in enumerate(TRAIN_LENGTHS):
        tokens = rng.integers(2, 500, length)
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens)
        shards.append(tokens)
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(*VAL_IDS, 4000))
    return str(tmp_path), shards


def locate(rows, shards, indices):
    """(shard index, start) of each row: where in the listed shards it is a contiguous slice
    (random ids make a 17-token match unique); an assertion error for a row found nowhere."""
    found = []
    for row in rows:
        hits = [
            (k, int(start))
            for k in indices
            for start in np.flatnonzero(
                (np.lib.stride_tricks.sliding_window_view(shards[k], row.size) == row).all(1)
            )
        ]
        assert len(hits) == 1, (row[:4], hits)
        found.append(hits[0])
    return found


def windows(gpt, data_path, n, rank=0, world=1, vocab_size=0, seed=0):
    out = gpt.random_calibration_windows(data_path, n, SEQ, rank, world, vocab_size, seed)
    assert out.dtype == torch.int64 and out.shape == (n, SEQ + 1)
    return out.numpy()


def test_windows_are_contiguous_slices_of_the_ranks_train_shards(gpt, dataset):
    data_path, shards = dataset
    for rank, world in ((0, 1), (0, 2), (1, 2), (2, 3)):
        got = windows(gpt, data_path, 12, rank, world)  # inside one pass: 19+ windows a rank
        assert got.max() < VAL_IDS[0]  # never a val token
        mine = list(range(len(shards)))[rank::world]
        starts = locate(got, shards, mine)
        for k in mine:  # one phase per shard and pass: every start of a shard is congruent
            assert len({start % SEQ for shard, start in starts if shard == k}) <= 1


def test_the_same_rank_and_seed_draw_the_same_windows_and_others_do_not(gpt, dataset):
    data_path, _ = dataset
    first = windows(gpt, data_path, 30, rank=1, world=2)
    assert np.array_equal(first, windows(gpt, data_path, 30, rank=1, world=2))
    assert not np.array_equal(first, windows(gpt, data_path, 30, rank=0, world=2))
    assert not np.array_equal(first, windows(gpt, data_path, 30, rank=1, world=2, seed=1))
    # A longer draw begins with the shorter one: a call reads one stream, from its start.
    assert np.array_equal(first, windows(gpt, data_path, 50, rank=1, world=2)[:30])


def test_no_window_repeats_while_windows_remain_then_a_new_pass_begins(gpt, dataset):
    data_path, shards = dataset
    most = sum((n - 1) // SEQ for n in TRAIN_LENGTHS)
    got = windows(gpt, data_path, most + 40)
    starts = locate(got, shards, range(len(shards)))
    # The first pass: each shard's phase is its first window's; the pass reads every window of
    # every shard at that phase once, in some order, before any window comes again.
    phases = {}
    for k, start in starts:
        phases.setdefault(k, start % SEQ)
    assert len(phases) == len(shards)
    first = {
        (k, phase + j * SEQ)
        for k, phase in phases.items()
        for j in range((TRAIN_LENGTHS[k] - 1 - phase) // SEQ)
    }
    assert len(first) < len(starts)
    assert set(starts[: len(first)]) == first and len(set(starts[: len(first)])) == len(first)


def draw_as_2135(shards, seq_len, rank, world, n):
    """The reference: #2135's calibration loader as its description reads, one draw at a time
    (numpy's choice with p for the shard, the shard's last remaining window taken)."""
    mine = shards[rank::world]
    rng = np.random.Generator(np.random.PCG64(rank))
    starts = [[] for _ in mine]

    def new_pass():
        for k, tokens in enumerate(mine):
            max_phase = min(seq_len - 1, max(0, tokens.size - seq_len - 1))
            phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
            count = (tokens.size - 1 - phase) // seq_len
            starts[k] = list(phase + rng.permutation(count) * seq_len)

    new_pass()
    out = []
    for _ in range(n):
        left = np.array([len(s) for s in starts], dtype=np.float64)
        if left.sum() == 0:
            new_pass()
            left = np.array([len(s) for s in starts], dtype=np.float64)
        k = int(rng.choice(len(mine), p=left / left.sum()))
        start = starts[k].pop()
        out.append(mine[k][start : start + seq_len + 1])
    return np.stack(out)


@pytest.mark.parametrize("rank,world,n", [(0, 1, 7), (0, 1, 300), (1, 2, 60), (2, 3, 90)])
def test_the_draws_are_2135s_stream(gpt, dataset, rank, world, n):
    data_path, shards = dataset
    assert np.array_equal(
        windows(gpt, data_path, n, rank, world), draw_as_2135(shards, SEQ, rank, world, n)
    )


def test_a_rank_past_the_shard_count_reads_a_shard_of_its_own(gpt, dataset):
    data_path, shards = dataset
    got = windows(gpt, data_path, 12, rank=6, world=7)  # 5 shards: rank 6 reads shard 6 % 5 = 1
    assert {k for k, _ in locate(got, shards, range(len(shards)))} == {1}


def test_a_token_id_past_the_vocabulary_is_one_line_naming_the_shard(gpt, tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(2, 202))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.full(200, 999))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(2, 202))
    assert windows(gpt, str(tmp_path), 4, rank=0, world=2, vocab_size=512).max() < 512
    with pytest.raises(ValueError) as err:
        windows(gpt, str(tmp_path), 4, rank=1, world=2, vocab_size=512)
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(
        "fineweb_train_000001.bin: token id 999 >= VOCAB_SIZE=512; the shard was not made with "
        "this tokenizer"
    )


def test_shards_too_short_for_a_window_are_one_line_naming_data_path(gpt, tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(2, 2 + SEQ))
    with pytest.raises(ValueError, match=r"DATA_PATH=.*hold no window of TRAIN_SEQ_LEN \+ 1 = 17"):
        windows(gpt, str(tmp_path), 1)
    with pytest.raises(FileNotFoundError, match="DATA_PATH=.*no train shards"):
        windows(gpt, str(tmp_path / "nowhere"), 1)


def hparams(gpt, **overrides):
    return gpt.Hyperparameters.from_env(
        {**TINY_ENV, **{k.upper(): str(v) for k, v in overrides.items()}}
    )


def test_the_source_parses_and_a_bad_one_is_refused(gpt):
    assert hparams(gpt, gptq_calib_source="random").gptq_calib_source == "random"
    assert hparams(gpt, gptq_calib_source="random", gptq_reserve_measured=1).gptq_reserve_measured
    with pytest.raises(ValueError, match="GPTQ_CALIB_SOURCE.*must be one of train, self, random"):
        hparams(gpt, gptq_calib_source="shuffled")
    with pytest.raises(ValueError, match="GPTQ_RESERVE_MEASURED"):
        hparams(gpt, gptq_calib_source="self", gptq_reserve_measured=1)


def test_the_record_presets_calibrate_as_2135(gpt):
    for preset in ("record", "frontier"):
        assert gpt.Hyperparameters.from_env({"PRESET": preset}).gptq_calib_source == "random"
    assert gpt.Hyperparameters.from_env({"PRESET": "smoke"}).gptq_calib_source == "train"


def test_gptq_calibrate_reads_random_windows_without_the_loader(gpt, dataset):
    data_path, _ = dataset
    # 5 sequences in batches of one loader batch's rows: 256 / (8 x 16) = 2, so 2 + 2 + 1.
    h = hparams(
        gpt,
        data_path=data_path,
        gptq_calib_source="random",
        gptq_calib_seqs=5,
        train_seq_len=SEQ,
        train_batch_tokens=8 * SEQ * 2,
        vocab_size=512,
    )
    assert gpt.calibration_batch_rows(h) == 2
    torch.manual_seed(0)
    model = gpt.build_model(h)

    def next_batch():
        raise AssertionError("the random source does not read the training loader")

    hessians = gpt.gptq_calibrate(model, h, next_batch)
    weights = dict(model.named_parameters())
    assert len(hessians) == 6 * h.num_layers
    for name, H in hessians.items():
        assert H.shape == (weights[name].shape[1],) * 2
    x = torch.from_numpy(windows(gpt, data_path, 5, vocab_size=512)[:, :-1].copy())
    expected = gpt.collect_hessians(model, [x])
    for name, H in hessians.items():
        assert torch.allclose(H, expected[name], rtol=1e-4, atol=1e-6), name
