"""GPTQ_RESERVE_MEASURED: the loop's GPTQ reserve is one calibration batch timed before the loop x
the batches a rank reads x GPTQ_RESERVE_SAFETY; the time ledger refuses a run whose training and
calibration together end past MAX_WALLCLOCK_SECONDS. Slowness is injected by wrapping the Hessian
pass (the bundle is one namespace, so the trainer calls the wrapper)."""

import dataclasses
import re
import time

import pytest
from conftest import TINY_ENV, summary_of


def run_env(embedded, tmp_path, run_id, **overrides):
    env = {**TINY_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": run_id}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


def slowed(gpt, monkeypatch, delays):
    """Wrap collect_hessians: call k sleeps delays[k] seconds per batch (the last delay repeats);
    returns the list of batch counts per call."""
    shipped = gpt.collect_hessians
    calls = []

    def slow(model, batches, embed=False):
        batches = list(batches)
        time.sleep(delays[min(len(calls), len(delays) - 1)] * len(batches))
        calls.append(len(batches))
        return shipped(model, batches, embed=embed)

    monkeypatch.setattr(gpt, "collect_hessians", slow)
    return calls


@pytest.mark.parametrize("source", ["train", "random"])
def test_the_reserve_is_the_measured_batch_time_times_batches_and_safety(
    gpt, embedded, tmp_path, monkeypatch, source
):
    calls = slowed(gpt, monkeypatch, [0.3, 0.0])
    # TINY_ENV: 4096 tokens / 8 / 64 = 8 sequences per loader batch; 20 sequences: 3 batches. The
    # random source (#2135) reads its windows in batches of the same 8 rows.
    env = run_env(
        embedded,
        tmp_path,
        "probe",
        gptq_enabled=1,
        gptq_calib_source=source,
        gptq_reserve_measured=1,
        gptq_reserve_safety=2.0,
        gptq_calib_seqs=20,
        iterations=2,
        max_wallclock_seconds=120,
    )
    run = gpt.open_run(gpt.Hyperparameters.from_env(env))
    model, _ = gpt.build_run_model(run)
    reads = []
    if source == "random":  # the probe and calibration read through the same window reader
        shipped = gpt.random_calibration_windows

        def counted(*args, **kwargs):
            out = shipped(*args, **kwargs)
            reads.append(out.shape[0])
            return out

        monkeypatch.setattr(gpt, "random_calibration_windows", counted)
    gpt.train(run, model)
    assert calls == [1]  # the probe: one batch
    gpt.calibrate(run, model)
    assert calls == [1, 3]  # calibration read the 3 batches the reserve counted
    assert reads == ([8, 20] if source == "random" else [])
    log = (tmp_path / "probe.txt").read_text()
    line = re.search(r"gptq:reserve measured ([\d.]+)s/batch x (\d+) batches x", log)
    assert line, log
    per_batch = float(line.group(1))
    assert per_batch >= 0.3 and int(line.group(2)) == 3
    assert run.ledger.gptq_reserve_s == pytest.approx(per_batch * 3 * 2.0, abs=0.01)
    assert f"gptq:reserving {run.ledger.gptq_reserve_s:.1f}s" in log


def test_an_explicit_reserve_wins_over_a_measured_one(gpt, embedded, tmp_path, monkeypatch):
    calls = slowed(gpt, monkeypatch, [0.0])
    env = run_env(embedded, tmp_path, "fixed", gptq_enabled=1, iterations=2)
    h = gpt.Hyperparameters.from_env({**env, "GPTQ_RESERVE_SECONDS": "3"})
    assert not h.gptq_reserve_measured
    run = gpt.open_run(dataclasses.replace(h, max_wallclock_seconds=120))
    model, _ = gpt.build_run_model(run)
    gpt.train(run, model)
    assert calls == [] and run.ledger.gptq_reserve_s == 3.0
    with pytest.raises(ValueError, match="GPTQ_RESERVE_SECONDS=.*GPTQ_RESERVE_MEASURED"):
        gpt.Hyperparameters.from_env(
            {**env, "GPTQ_RESERVE_SECONDS": "3", "GPTQ_RESERVE_MEASURED": "1"}
        )
    with pytest.raises(ValueError, match="GPTQ_RESERVE_MEASURED"):
        gpt.Hyperparameters.from_env(
            {**env, "GPTQ_RESERVE_MEASURED": "1", "GPTQ_CALIB_SOURCE": "self"}
        )


def test_calibration_slower_than_measured_breaks_the_training_clock(
    gpt, embedded, tmp_path, monkeypatch
):
    # The probe is fast, calibration then sleeps 1 s a batch: past the cap the reserve left.
    slowed(gpt, monkeypatch, [0.0, 1.0])
    env = run_env(
        embedded,
        tmp_path,
        "overrun",
        gptq_enabled=1,
        gptq_reserve_measured=1,
        gptq_calib_seqs=16,
        record_attempt=1,
        iterations=100000,
        max_wallclock_seconds=2,
        val_max_tokens=4096,
    )
    assert gpt.run_main(gpt.Hyperparameters.from_env(env)) == 3
    log = (tmp_path / "overrun.txt").read_text()
    summary = summary_of(log)
    ledger = summary["time_ledger"]
    assert ledger["gptq_s"] >= 2.0 and ledger["train_s"] > 2.0
    assert summary["invalid_reasons"] == [
        f"training + GPTQ calibration took {ledger['train_s']:.1f}s, over "
        f"MAX_WALLCLOCK_SECONDS=2 (GPTQ reserve {ledger['gptq_reserve_s']:.2f}s, calibration "
        f"{ledger['gptq_s']:.2f}s)"
    ]
    assert "warning: training + GPTQ calibration took" in log


def test_the_reserve_check_reads_the_ledger(gpt):
    h = gpt.Hyperparameters.from_env(
        {"PRESET": "smoke", "RECORD_ATTEMPT": "1", "GPTQ_ENABLED": "1"}
    )
    h = dataclasses.replace(h, max_wallclock_seconds=100.0)
    inside = gpt.TimeLedger(train_loop_s=95.0, gptq_s=5.0, gptq_reserve_s=6.0)
    over = gpt.TimeLedger(train_loop_s=95.0, gptq_s=5.5, gptq_reserve_s=6.0)
    assert gpt.time_violations(h, inside) == []
    assert gpt.time_violations(h, over) == [
        "training + GPTQ calibration took 100.5s, over MAX_WALLCLOCK_SECONDS=100 (GPTQ reserve "
        "6.00s, calibration 5.50s)"
    ]
    # Past 600 s the training clock's own reason says it; without GPTQ there is no reserve.
    long = gpt.TimeLedger(train_loop_s=601.0, gptq_s=5.0)
    assert gpt.time_violations(dataclasses.replace(h, max_wallclock_seconds=600.0), long) == [
        "training took 606.0s, over the 600s limit"
    ]
    no_gptq = dataclasses.replace(h, gptq_enabled=False)
    assert gpt.time_violations(no_gptq, over) == []
