"""Runs that go wrong fail cleanly and say why where people look: path-like RUN_IDs, non-finite
knobs and learning rates, bad token ids in a training shard, exceptions mid-run (text log, status
file, exit status), stale and failed temporary files, and the 10-minute track's clocks (a run over
either limit ends `score INVALID` with the reason; simulated with a tiny limit, not 600 s)."""

import dataclasses
import errno
import json
import os

import numpy as np
import pytest
from conftest import SCRIPTS, TINY_ENV, load_script, run_script, summary_of


@pytest.fixture(scope="module")
def gpt():
    return load_script("train_gpt.py")


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def run_env(embedded, tmp_path, run_id, **overrides):
    env = {**TINY_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": run_id}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


def status_of(tmp_path, run_id):
    return json.loads((tmp_path / f"{run_id}.status.json").read_text())


# --- RUN_ID --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../x", "a/b", "/tmp/x", ".hidden", "..", "a\\b", "x y", "é"])
def test_a_run_id_that_is_not_a_plain_name_is_refused(script, run_id):
    with pytest.raises(ValueError, match="RUN_ID=.*plain name"):
        script.Hyperparameters.from_env({"RUN_ID": run_id})


@pytest.mark.parametrize("run_id", ["", "abc", "seed_42.v2-final", "20260101_120000_record_ab12cd"])
def test_plain_run_ids_are_accepted(gpt, run_id):
    assert gpt.Hyperparameters.from_env({"RUN_ID": run_id}).run_id == run_id


def test_a_traversal_run_id_exits_2_with_one_line_and_writes_nothing(embedded, tmp_path):
    logs = tmp_path / "logs"
    env = run_env(embedded, logs, "../escaped")
    out = run_script("train_gpt.py", env, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "RUN_ID='../escaped'" in out.stderr
    assert not logs.exists() and not list(tmp_path.glob("escaped*"))


# --- non-finite knobs --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_max_wallclock_is_refused_naming_the_variable(script, value):
    with pytest.raises(ValueError, match="MAX_WALLCLOCK_SECONDS=.*finite"):
        script.Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": value})


def test_every_float_knob_refuses_nan_and_inf(script):
    floats = [f.name.upper() for f in dataclasses.fields(script.Hyperparameters) if f.type is float]
    assert "MAX_WALLCLOCK_SECONDS" in floats and "MATRIX_LR" in floats and len(floats) > 20
    for name in floats:
        for value in ("nan", "inf"):
            with pytest.raises(ValueError, match=f"^{name}=.*finite"):
                script.Hyperparameters.from_env({name: value})


def test_a_non_finite_float_set_in_code_is_refused_by_validate(gpt):
    h = gpt.Hyperparameters.from_env({})
    h.mlp_mult = float("nan")
    with pytest.raises(ValueError, match="MLP_MULT=nan: must be a finite number"):
        h.validate()


def test_every_learning_rate_refuses_nan_inf_and_negative_values(script):
    lrs = [
        f.name.upper() for f in dataclasses.fields(script.Hyperparameters) if f.name.endswith("_lr")
    ]
    assert {"MATRIX_LR", "SCALAR_LR", "TTT_LR"} <= set(lrs)
    for name in lrs:
        for value in ("nan", "inf", "-0.1"):
            with pytest.raises(ValueError, match=f"^{name}="):
                script.Hyperparameters.from_env({name: value})


def test_a_non_finite_lr_exits_2_with_one_line(tmp_path):
    out = run_script("train_gpt.py", {"MATRIX_LR": "inf"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: MATRIX_LR='inf': expected a finite number"


# --- failures mid-run: log, status file, exit status --------------------------------------------


def test_a_bad_token_id_in_a_later_train_shard_fails_the_run_cleanly(gpt, embedded, tmp_path):
    """Shard 0 is clean and short, shard 1 holds an id >= VOCAB_SIZE: the loader opens shard 1
    mid-training, and the run stops with a one-line error naming it, in the log and status file."""
    data = tmp_path / "data"
    data.mkdir()
    train = gpt.load_data_shard(os.path.join(embedded["DATA_PATH"], "fineweb_train_000000.bin"))
    tokens = train.numpy()[:20_000].copy()
    write_shard(data / "fineweb_train_000000.bin", tokens[:6000])
    tokens[5000] = 1500
    write_shard(data / "fineweb_train_000001.bin", tokens)
    val = os.path.join(embedded["DATA_PATH"], "fineweb_val_000000.bin")
    os.symlink(val, data / "fineweb_val_000000.bin")
    env = run_env({**embedded, "DATA_PATH": str(data)}, tmp_path, "badid", iterations=4)
    with pytest.raises(ValueError, match="fineweb_train_000001.bin: token id 1500 >= VOCAB_SIZE"):
        gpt.run_main(gpt.Hyperparameters.from_env(env))
    log = (tmp_path / "badid.txt").read_text()
    assert "step:1/4" in log  # it trained on shard 0 first
    error_lines = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "fineweb_train_000001.bin: token id 1500" in error_lines[0]
    status = status_of(tmp_path, "badid")
    assert status["state"] == "failed" and "token id 1500 >= VOCAB_SIZE=1024" in status["error"]
    assert not (tmp_path / "badid.pga").exists()


def test_a_bad_first_train_shard_exits_2_before_training(gpt, embedded, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_train_000000.bin", [1, 5, 2000, 7] * 100)
    val = os.path.join(embedded["DATA_PATH"], "fineweb_val_000000.bin")
    os.symlink(val, data / "fineweb_val_000000.bin")
    env = run_env({**embedded, "DATA_PATH": str(data)}, tmp_path, "bad0")
    out = run_script("train_gpt.py", env, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "fineweb_train_000000.bin: token id 2000 >= VOCAB_SIZE=1024" in out.stderr
    status = status_of(tmp_path, "bad0")
    assert status["state"] == "failed" and "token id 2000" in status["error"]
    assert "error: " in (tmp_path / "bad0.txt").read_text()


def test_an_unexpected_exception_is_written_to_the_log_and_status(
    gpt, embedded, tmp_path, monkeypatch
):
    def broken(run):
        raise RuntimeError("model build\nfailed")

    monkeypatch.setattr(gpt, "build_run_model", broken)
    with pytest.raises(RuntimeError):
        gpt.run_main(gpt.Hyperparameters.from_env(run_env(embedded, tmp_path, "boom")))
    log = (tmp_path / "boom.txt").read_text()
    assert "error: RuntimeError: model build failed" in log and "Traceback" in log
    status = status_of(tmp_path, "boom")
    assert status["state"] == "failed" and status["error"] == "RuntimeError: model build failed"
    events = [json.loads(line) for line in (tmp_path / "boom.jsonl").read_text().splitlines()]
    assert events[-1] == {
        **events[-1],
        "event": "error",
        "message": "RuntimeError: model build failed",
    }


# --- temporary files -----------------------------------------------------------------------------


def test_a_new_run_removes_stale_temp_files_of_its_own_id_only(gpt, embedded, tmp_path):
    stale = ["r1.status.json.tmp4242", "r1.pga.tmp7", "r1.txt.tmp99"]
    kept = ["r10.status.json.tmp5", "r1.status.json.tmpx", "r1.pga", "other.pga.tmp3"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 100)
    run = gpt.open_run(gpt.Hyperparameters.from_env(run_env(embedded, tmp_path, "r1")))
    assert run.run_id == "r1"
    assert not [name for name in stale if (tmp_path / name).exists()]
    assert all((tmp_path / name).exists() for name in kept)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_failed_atomic_write_leaves_no_temp_file(gpt, tmp_path, monkeypatch, where):
    target = tmp_path / "a.status.json"
    target.write_bytes(b"old")
    real_open = open

    class DiskFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, blob):
            self.f.write(blob[: len(blob) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(path, mode="r", *args, **kwargs):
        return DiskFull(real_open(path, mode, *args, **kwargs))

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if where == "write":
        monkeypatch.setattr(gpt, "open", full_disk_open, raising=False)
    else:
        monkeypatch.setattr(gpt.os, "replace", failing_replace)
    with pytest.raises(OSError):
        gpt.write_bytes_atomic(str(target), b"new" * 1000)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.status.json"]
    assert target.read_bytes() == b"old"


# --- the 10-minute track's clocks --------------------------------------------------------------


def test_time_violations_on_and_off_the_record_track(gpt):
    ledger = gpt.TimeLedger(precompute_s=10.0, train_setup_s=2.0, train_loop_s=580.0, gptq_s=9.0)
    assert ledger.train_s == pytest.approx(601.0)
    record = gpt.Hyperparameters.from_env({"PRESET": "record"})
    attempt = gpt.Hyperparameters.from_env({"PRESET": "smoke", "RECORD_ATTEMPT": "1"})
    casual = gpt.Hyperparameters.from_env({"PRESET": "smoke"})
    assert record.record_track and attempt.record_track and not casual.record_track
    assert gpt.time_violations(record, ledger) == ["training took 601.0s, over the 600s limit"]
    assert gpt.time_violations(casual, ledger) == []
    ledger = gpt.TimeLedger(train_loop_s=590.0, final_eval_s=600.5)
    assert gpt.time_violations(attempt, ledger) == ["evaluation took 600.5s, over the 600s limit"]
    assert (
        gpt.time_violations(attempt, gpt.TimeLedger(train_loop_s=600.0, final_eval_s=600.0)) == []
    )


def test_a_record_attempt_over_its_training_limit_is_invalid(gpt, embedded, tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "TRAIN_LIMIT_S", 0.01)
    env = run_env(embedded, tmp_path, "slow", record_attempt=1, iterations=2, val_max_tokens=4096)
    assert gpt.run_main(gpt.Hyperparameters.from_env(env)) == 3
    log = (tmp_path / "slow.txt").read_text()
    invalid = [line for line in log.splitlines() if line.startswith("score INVALID: ")]
    assert (
        len(invalid) == 1 and "training took" in invalid[0] and "over the 0.01s limit" in invalid[0]
    )
    summary = summary_of(log)
    assert not summary["valid"] and summary["record_track"]
    assert len(summary["invalid_reasons"]) == 1 and summary["invalid_reasons"][0].startswith(
        "training took"
    )
    assert all(a["passed"] for a in summary["audits"].values())  # only the clock is broken
    # one source of truth: every time figure of the summary is the ledger's
    ledger = summary["time_ledger"]
    assert summary["train_budget_s"] == ledger["train_s"]
    assert summary["eval_time_ms"] == pytest.approx(1000 * ledger["eval_s"])
    assert summary["train_time_ms"] == pytest.approx(1000 * ledger["train_loop_s"])
    parts = ("precompute_s", "train_setup_s", "train_loop_s", "gptq_s")
    assert ledger["train_s"] == pytest.approx(sum(ledger[k] for k in parts))
    assert ledger["train_setup_s"] > 0
    status = status_of(tmp_path, "slow")
    assert status["state"] == "failed" and status["invalid_reasons"] == summary["invalid_reasons"]


def test_the_same_run_off_the_record_track_is_valid(gpt, embedded, tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "TRAIN_LIMIT_S", 0.01)
    monkeypatch.setattr(gpt, "EVAL_LIMIT_S", 0.01)
    env = run_env(embedded, tmp_path, "casual", iterations=2, val_max_tokens=4096)
    assert gpt.run_main(gpt.Hyperparameters.from_env(env)) == 0
    summary = summary_of((tmp_path / "casual.txt").read_text())
    assert summary["valid"] and not summary["record_track"] and summary["invalid_reasons"] == []


def test_the_training_clock_covers_the_whole_train_stage(gpt, embedded, tmp_path, monkeypatch):
    """Nothing of the train stage escapes the ledger: its wallclock is what train_s counts plus
    what the ledger names as excluded (warmup, periodic validation)."""
    shipped = gpt.train
    walls = []

    def timed_train(run, model):
        t0 = gpt.time.perf_counter()
        stats = shipped(run, model)
        walls.append((gpt.time.perf_counter() - t0, run.ledger))
        return stats

    monkeypatch.setattr(gpt, "train", timed_train)
    env = run_env(embedded, tmp_path, "clock", iterations=3, warmup_steps=2, val_loss_every=2)
    run = gpt.open_run(gpt.Hyperparameters.from_env(env))
    model, _ = gpt.build_run_model(run)
    gpt.train(run, model)
    wall, ledger = walls[0]
    assert ledger.warmup_excluded_s > 0 and ledger.validation_excluded_s > 0
    counted = ledger.train_s - ledger.gptq_s
    excluded = ledger.warmup_excluded_s + ledger.validation_excluded_s
    assert counted + excluded == pytest.approx(wall, abs=0.05)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_the_record_attempt_knob(name):
    module = load_script(name)
    h = module.Hyperparameters.from_env({"PRESET": "smoke", "RECORD_ATTEMPT": "1"})
    assert h.record_attempt and h.record_track
