"""Issue 25, item 4: a wallclock-bound smoke run sizes its batch and its val prefix to the machine.
A slow CPU is simulated by injecting the measured times (time_train_step, probe_eval_seconds);
the choices are checked against what the injected times promise, never against fixed figures."""

import contextlib
import io

import pytest
from conftest import TINY_ENV, run_script, summary_of

# The tiny model of TINY_ENV with the smoke preset's batch and val prefix (the sizing's inputs)
# and a wallclock budget of a minute; ITERATIONS ends the tiny runs after a few steps.
SIZED_ENV = {
    k: v
    for k, v in TINY_ENV.items()
    if k not in ("TRAIN_BATCH_TOKENS", "VAL_MAX_TOKENS", "PRE_QUANT_EVAL", "ROUNDTRIP_EVAL")
}
SIZED_ENV.update({"MAX_WALLCLOCK_SECONDS": "60", "ITERATIONS": "2"})

# A laptop-class CPU ~2.4x slower than ours (issue 25: 6.1 s a step of 16,384 tokens) with a fixed
# cost per step (the optimizer), and a fast one.
SLOW = {"fixed_s": 0.2, "per_token_s": 5.9 / 16384}
FAST = {"fixed_s": 0.01, "per_token_s": 0.05 / 16384}


def predicted_steps(cpu, tokens, loop_s):
    return loop_s / (cpu["fixed_s"] + cpu["per_token_s"] * tokens)


def timings_of(cpu, sizes):
    return [(n, cpu["fixed_s"] + cpu["per_token_s"] * n) for n in sizes]


class ListLogger:
    enabled = True

    def __init__(self):
        self.lines = []

    def log0(self, msg, console=True):
        self.lines.append(msg)

    def update_status(self, force=False, history=None, **fields):
        pass

    def event(self, kind, **fields):
        pass


# --- the choices, from injected timings ----------------------------------------------------------


def test_the_step_model_recovers_a_fixed_cost_and_stays_cautious_on_noise(gpt):
    fixed, per_token = gpt.step_time_model(timings_of(SLOW, (16384, 4096)))
    assert fixed == pytest.approx(SLOW["fixed_s"]) and per_token == pytest.approx(
        SLOW["per_token_s"]
    )
    # Noise: the small step slower than the large one. The model keeps the slower per-token rate.
    fixed, per_token = gpt.step_time_model([(16384, 4.0), (4096, 4.5)])
    assert fixed == 0.0 and per_token == pytest.approx(4.5 / 4096)


@pytest.mark.parametrize("loop_s", [57.0, 147.0])  # what a 60 s and a 150 s run leave the loop
def test_a_slow_cpu_gets_a_batch_that_keeps_30_steps_within_the_bounds(gpt, loop_s):
    h = gpt.Hyperparameters.from_env({"PRESET": "smoke", "MAX_WALLCLOCK_SECONDS": "60"})
    low, high = gpt.smoke_batch_bounds(h)
    quantum = 8 * h.train_seq_len
    choice = gpt.size_smoke_batch(h, timings_of(SLOW, (16384, 4096)), loop_s)
    tokens = choice["tokens"]
    assert low <= tokens <= high and tokens % quantum == 0
    assert predicted_steps(SLOW, h.train_batch_tokens, loop_s) < gpt.SMOKE_MIN_STEPS
    assert predicted_steps(SLOW, tokens, loop_s) >= gpt.SMOKE_MIN_STEPS
    # the largest such batch: one quantum more would miss the aimed steps
    aim = gpt.SMOKE_MIN_STEPS * gpt.SMOKE_STEP_MARGIN
    assert predicted_steps(SLOW, tokens + quantum, loop_s) < aim
    line = choice["line"]
    assert line.startswith(f"smoke_sizing: TRAIN_BATCH_TOKENS={tokens} ")
    assert "16384 tokens in" in line and f"~{choice['expected_steps']} steps" in line


def test_a_fast_cpu_keeps_the_largest_batch_and_a_hopeless_one_is_warned(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "smoke", "MAX_WALLCLOCK_SECONDS": "60"})
    low, high = gpt.smoke_batch_bounds(h)
    assert gpt.size_smoke_batch(h, timings_of(FAST, (16384, 4096)), 57.0)["tokens"] == high
    hopeless = {"fixed_s": 3.0, "per_token_s": SLOW["per_token_s"]}
    choice = gpt.size_smoke_batch(h, timings_of(hopeless, (16384, 4096)), 57.0)
    assert choice["tokens"] == low and "WARNING: fewer than 30 steps" in choice["line"]


def test_the_eval_prefix_costs_at_most_half_the_training_time(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "smoke", "MAX_WALLCLOCK_SECONDS": "60"})
    per_target = {"standard": 0.6e-3, "sliding": 2.4e-3}  # a slow CPU's probe evals
    choice = gpt.size_smoke_evals(h, per_target, 2.0, 40, h.val_max_tokens)
    tokens = choice["tokens"]
    assert gpt.SMOKE_VAL_MIN_TOKENS <= tokens < h.val_max_tokens
    assert choice["counts"] == {"standard": 1, "sliding": 1}  # the last step's validation
    cost = 2.0 + tokens * (per_target["standard"] + per_target["sliding"])
    assert cost == pytest.approx(choice["expected_s"])
    assert cost <= gpt.SMOKE_EVAL_SHARE * h.max_wallclock_seconds
    fast = {"standard": 1e-6, "sliding": 4e-6}
    assert gpt.size_smoke_evals(h, fast, 0.1, 40, h.val_max_tokens)["tokens"] == h.val_max_tokens


def test_the_sizing_is_off_unless_a_smoke_run_is_bound_by_the_wallclock(gpt):
    def reason(env, name="train_batch_tokens"):
        h = gpt.Hyperparameters.from_env({"PRESET": "smoke", **env})
        return gpt.smoke_sizing_off(h, name)

    assert reason({"MAX_WALLCLOCK_SECONDS": "60"}) is None
    assert reason({"MAX_WALLCLOCK_SECONDS": "60"}, "val_max_tokens") is None
    assert "ITERATIONS-bound" in reason({"MAX_WALLCLOCK_SECONDS": "0"})
    assert reason({"SMOKE_AUTOSIZE": "0"}) == "SMOKE_AUTOSIZE=0"
    assert reason({"TRAIN_BATCH_TOKENS": "4096"}) == "TRAIN_BATCH_TOKENS=4096 given"
    assert reason({"TRAIN_BATCH_TOKENS": "4096"}, "val_max_tokens") is None
    assert reason({"VAL_MAX_TOKENS": "8192"}, "val_max_tokens") == "VAL_MAX_TOKENS=8192 given"
    assert "whole val split" in reason({"VAL_MAX_TOKENS": "0"}, "val_max_tokens")
    record = gpt.Hyperparameters.from_env({"PRESET": "record"})
    assert gpt.smoke_sizing_off(record, "train_batch_tokens") == "SMOKE_AUTOSIZE=0"


# --- the pipeline uses the choices ---------------------------------------------------------------


def slow_step(gpt, calls):
    def fake(train_step, step, tokens, device, seq_len=None):
        calls.append(tokens)
        train_step(step, 1.0, tokens, seq_len)  # the real step (tiny model); the slow CPU's time
        return SLOW["fixed_s"] + SLOW["per_token_s"] * tokens

    return fake


def test_train_model_trains_with_the_chosen_batch(gpt, embedded, monkeypatch):
    calls = []
    monkeypatch.setattr(gpt, "time_train_step", slow_step(gpt, calls))
    h = gpt.Hyperparameters.from_env({**SIZED_ENV, **embedded})
    preset_batch = h.train_batch_tokens
    logger = ListLogger()
    rt = gpt.setup_runtime({"OMP_NUM_THREADS": "1"})
    gpt.seed_everything(h.seed)
    _, stats = gpt.train_model(h, rt, gpt.build_model(h), logger, gpt.TimeLedger())
    # timed: the preset's batch, then a quarter of it
    assert calls == [preset_batch, gpt.smoke_probe_batch(h, preset_batch)]
    line = next(x for x in logger.lines if x.startswith("smoke_sizing: TRAIN_BATCH_TOKENS="))
    assert line.startswith(f"smoke_sizing: TRAIN_BATCH_TOKENS={h.train_batch_tokens} ")
    assert h.train_batch_tokens < preset_batch and stats["steps"] == h.iterations
    assert predicted_steps(SLOW, h.train_batch_tokens, 60.0) >= gpt.SMOKE_MIN_STEPS


def test_an_explicit_batch_wins_over_the_sizing(gpt, embedded, monkeypatch):
    calls = []
    monkeypatch.setattr(gpt, "time_train_step", slow_step(gpt, calls))
    env = {**SIZED_ENV, **embedded, "TRAIN_BATCH_TOKENS": "16384"}
    h = gpt.Hyperparameters.from_env(env)
    logger = ListLogger()
    rt = gpt.setup_runtime({"OMP_NUM_THREADS": "1"})
    gpt.train_model(h, rt, gpt.build_model(h), logger, gpt.TimeLedger())
    assert h.train_batch_tokens == 16384 and calls == []  # WARMUP_STEPS=0: nothing timed
    assert "smoke_sizing: batch not sized (TRAIN_BATCH_TOKENS=16384 given)" in logger.lines


def run_in_process(gpt, env, tmp_path):
    torch = gpt.torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            status = gpt.run_main(gpt.Hyperparameters.from_env(env))
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "sized.txt").read_text().split("=" * 100, 1)[1]
    return status, text, summary_of(text)


def test_a_sized_run_scores_the_sized_prefix_against_its_own_unigram_floor(
    gpt, embedded, tmp_path, monkeypatch
):
    per_target = {"standard": 0.5e-3, "sliding": 2.0e-3}
    monkeypatch.setattr(gpt, "time_train_step", slow_step(gpt, []))
    monkeypatch.setattr(
        gpt, "probe_eval_seconds", lambda h, model, mode, tokens, luts: per_target[mode]
    )
    env = {**SIZED_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": "sized"}
    status, log, s = run_in_process(gpt, env, tmp_path)
    assert status == 0 and s["valid"]
    line = next(x for x in log.splitlines() if x.startswith("smoke_sizing: VAL_MAX_TOKENS="))
    chosen = int(line.split("=", 1)[1].split()[0])
    assert s["tokens"] == chosen and s["evals"] == {"final_sliding_window": chosen}
    assert chosen * per_target["sliding"] <= gpt.SMOKE_EVAL_SHARE * 60  # VAL_LOSS_EVERY=0
    # the floor is printed once, after the sizing, on the very targets scored
    floors = [x for x in log.splitlines() if x.startswith("unigram_bpb: ")]
    assert len(floors) == 1 and f"on the first {chosen:,} val targets" in floors[0]
    h = gpt.Hyperparameters.from_env({**env, "VAL_MAX_TOKENS": str(chosen)})
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    val = gpt.load_validation_tokens(h.data_path, h.train_seq_len, chosen)
    luts = gpt.build_sentencepiece_luts(sp, h.vocab_size, gpt.torch.device("cpu"))
    assert s["unigram_bpb"] == pytest.approx(gpt.unigram_bpb(h, val, luts))


def test_an_explicit_val_prefix_wins_over_the_sizing(gpt, embedded, tmp_path, monkeypatch):
    def no_probe(*args):
        raise AssertionError("an explicit VAL_MAX_TOKENS is not sized")

    monkeypatch.setattr(gpt, "time_train_step", slow_step(gpt, []))
    monkeypatch.setattr(gpt, "probe_eval_seconds", no_probe)
    env = {**SIZED_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": "sized"}
    env["VAL_MAX_TOKENS"] = "8192"
    status, log, s = run_in_process(gpt, env, tmp_path)
    assert status == 0 and s["tokens"] == 8192
    assert "smoke_sizing: VAL_MAX_TOKENS=" not in log and "smoke_sizing: TRAIN_BATCH" in log


def test_two_processes_size_alike_and_finish(embedded, tmp_path):
    """gloo, two ranks timing their own steps and probes: both take rank 0's choices (a rank with
    another val prefix would fail the distributed eval's collectives), and the run completes."""
    env = {**SIZED_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": "two"}
    proc = run_script("train_gpt.py", env, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "two.txt").read_text().split("=" * 100, 1)[1]
    s = summary_of(log)
    assert s["valid"] and s["world_size"] == 2
    lines = [x for x in log.splitlines() if x.startswith("smoke_sizing: ")]
    assert [x.split("=", 1)[0] for x in lines] == [
        "smoke_sizing: TRAIN_BATCH_TOKENS",
        "smoke_sizing: VAL_MAX_TOKENS",
    ]
    assert s["tokens"] == int(lines[1].split("=", 1)[1].split()[0])
