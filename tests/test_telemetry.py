"""Run-side telemetry: SMMA, the coherence score, the constrained-simplex projection of the shard
mixer, the atomic status file, and the embedding probes."""

import json
import threading

import numpy as np
import pytest
import torch
from conftest import load_script

gpt = load_script("train_gpt.py")


def test_smma_follows_its_formula():
    xs = [5.0, 3.0, 4.0, 1.0, 2.0]
    s = gpt.Smma(3)
    expected = xs[0]
    assert s.update(xs[0]) == expected
    for x in xs[1:]:
        expected = (expected * 2 + x) / 3
        assert s.update(x) == pytest.approx(expected)


def test_coherence_of_a_repetitive_sample_is_below_30():
    score = gpt.coherence_score(" ".join(["region"] * 128))
    assert score < 30 and score == pytest.approx(20 + 10 * 7 / 25 + 35 / 127 + 35 / 126, abs=1e-9)


def test_coherence_of_ordinary_prose_is_above_30():
    prose = (
        "The river runs past the old mill, where children once played in the summer. "
        "Today the town keeps the building as a museum, and visitors walk along the water "
        "to see the wheel turn."
    )
    assert gpt.coherence_score(prose) > 70


@pytest.mark.parametrize("seed", range(5))
def test_projection_respects_floors_and_caps_and_sums_to_one(seed):
    rng = np.random.default_rng(seed)
    w = rng.random(7) * 3 - 1
    lo, hi = np.full(7, 0.05), np.full(7, 0.3)
    x = gpt.project_capped_simplex(w, lo, hi)
    assert x.sum() == pytest.approx(1.0, abs=1e-9)
    assert (x >= lo - 1e-12).all() and (x <= hi + 1e-12).all()


def test_projection_where_plain_floors_would_fail():
    x = gpt.project_capped_simplex([0.9, 0.05, 0.05], [0.3, 0.3, 0.3], [1, 1, 1])
    assert x.tolist() == pytest.approx([0.4, 0.3, 0.3], abs=1e-9)
    with pytest.raises(ValueError, match="infeasible"):
        gpt.project_capped_simplex([0.5, 0.5], [0.6, 0.6], [1, 1])


def test_shard_mixer_weights_stay_feasible_and_favour_the_rewarded_shard():
    h = gpt.Hyperparameters.from_env(
        {"DATA_MIXER": "1", "MIXER_FLOOR": "0.1", "MIXER_CAP": "0.6", "MIXER_UCB_C": "0.05"}
    )
    mixer = gpt.ShardMixer(h, 4)
    loss = 5.0
    w = mixer.weights
    for _ in range(40):
        loss -= 0.1 if mixer.arm == 2 else 0.01
        w = mixer.end_phase(loss)
        assert w.sum() == pytest.approx(1.0) and (w >= 0.1 - 1e-9).all() and (w <= 0.6 + 1e-9).all()
    assert w.argmax() == 2 and mixer.counts.argmax() == 2 and w[2] == pytest.approx(0.6)


def test_status_file_is_never_seen_half_written(tmp_path):
    path = tmp_path / "run.status.json"
    gpt.write_json_atomic(str(path), {"step": 0})
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except (json.JSONDecodeError, FileNotFoundError) as exc:
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for step in range(300):
        gpt.write_json_atomic(
            str(path), {"step": step, "history": {"loss": list(range(step * 10))}}
        )
    stop.set()
    t.join()
    assert not errors and json.loads(path.read_text())["step"] == 299


def test_embedding_probes_report_rank_anisotropy_and_overlap(embedded):
    sp = gpt.load_tokenizer(embedded["TOKENIZER_PATH"], 1024)
    w = torch.randn(1024, 32, generator=torch.Generator().manual_seed(0))
    probes = gpt.embedding_probes(w, sp, other=w.clone())
    assert probes["neighbour_overlap"] == 1.0 and abs(probes["anisotropy"]) < 0.05
    assert 1 <= probes["rank90"] <= probes["rank95"] <= 32
    assert probes["neighbours"] and all(len(v) == 5 for v in probes["neighbours"].values())
