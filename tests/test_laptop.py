"""Issue 18, the laptop loop: evals proportionate to the run, progress on long steps, the CPU thread
choice, the eager warmup, the honest compressor label, the wallclock overshoot warning, and
portable record folders. Tiny models, one thread, one short in-process run shared by the module."""

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS, TINY_ENV, load_script, summary_of

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures" / "pack"
for p in (TESTS.parent, FIXTURES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import runs  # noqa: E402

import pack  # noqa: E402

# TINY_ENV without its own eval choices: the smoke preset's defaults decide.
SMOKE_DEFAULTS = {
    k: v
    for k, v in TINY_ENV.items()
    if k not in ("VAL_MAX_TOKENS", "PRE_QUANT_EVAL", "ROUNDTRIP_EVAL")
}


class ListLogger:
    """The slice of RunLogger that the helpers under test use."""

    enabled = True

    def __init__(self):
        self.lines = []
        self.status = {}

    def log0(self, msg, console=True):
        self.lines.append(msg)

    def update_status(self, force=False, history=None, **fields):
        self.status.update(fields)

    def event(self, kind, **fields):
        pass


@pytest.fixture(scope="module")
def smoke_run(gpt, embedded, tmp_path_factory):
    """One tiny PRESET=smoke run in this process, with the smoke preset's eval choices."""
    torch = gpt.torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logs = tmp_path_factory.mktemp("laptop")
    env = {**SMOKE_DEFAULTS, **embedded, "LOG_DIR": str(logs), "RUN_ID": "quick", "ITERATIONS": "2"}
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        status = gpt.run_main(gpt.Hyperparameters.from_env(env))
    torch.set_num_threads(threads)
    text = (logs / "quick.txt").read_text().split("=" * 100, 1)[1]
    return {
        "status": status,
        "log": text,
        "summary": summary_of(text),
        "dir": logs,
        "console": console.getvalue(),
    }


# --- evals proportionate to the run --------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_preset_scores_a_prefix_and_only_the_final_eval(name):
    h = load_script(name).Hyperparameters.from_env({"PRESET": "smoke"})
    assert h.val_max_tokens == 65536 and not h.pre_quant_eval and not h.roundtrip_eval


@pytest.mark.parametrize("name", SCRIPTS)
def test_record_preset_keeps_every_eval_on_the_whole_val_split(name):
    h = load_script(name).Hyperparameters.from_env({"PRESET": "record"})
    assert h.val_max_tokens == 0 and h.pre_quant_eval and h.roundtrip_eval


def test_a_smoke_run_evaluates_the_prefix_once_and_says_so(smoke_run, gpt):
    log = smoke_run["log"]
    s = smoke_run["summary"]
    assert smoke_run["status"] == 0 and s["valid"]
    final = gpt.EVAL_MODES["sliding"].label
    assert s["evals"] == {final: 65536} and s["tokens"] == 65536 and s["quick_look"] is True
    assert s["pre_quant_val_bpb"] is None and s["roundtrip_val_bpb"] is None
    assert "pre-quantization post-ema val_loss" not in log
    assert "final_int8_zlib_roundtrip_exact" not in log and f"{final}_exact" in log
    evals = next(line for line in log.splitlines() if line.startswith("evals: "))
    assert "skipped (PRE_QUANT_EVAL=0)" in evals and "skipped (ROUNDTRIP_EVAL=0)" in evals
    assert f"{final} on 65,536 targets" in evals and "a quick look, not an official score" in evals


def test_a_smoke_run_prints_an_honest_unigram_floor_and_a_short_result_block(smoke_run, gpt):
    """The floor agrees with data/embedded.py's own unigram_bpb (bytes from decoded documents)."""
    from data.embedded import unigram_bpb

    s = smoke_run["summary"]
    hp = json.loads((smoke_run["dir"] / "quick.jsonl").read_text().splitlines()[0])["hparams"]
    train = gpt.load_data_shard(os.path.join(hp["data_path"], "fineweb_train_000000.bin")).numpy()
    val = gpt.load_data_shard(os.path.join(hp["data_path"], "fineweb_val_000000.bin")).numpy()
    sp = gpt.load_tokenizer(hp["tokenizer_path"], 1024)
    expected, _ = unigram_bpb(sp, train, val[: 65536 + 1])
    assert s["unigram_bpb"] == pytest.approx(expected, rel=1e-3)
    assert smoke_run["log"].rstrip().splitlines()[-1].startswith("summary: ")  # still the last line
    tail = smoke_run["console"].rstrip().splitlines()[-7:]
    assert tail[0] == tail[-1] == "=" * 60
    assert tail[1].startswith(f"val_bpb:     {s['val_bpb']:.4f} (unigram {s['unigram_bpb']:.4f})")
    assert f"{s['total_bytes']:,} of 16,000,000" in tail[2] and tail[3] == "valid:       True"
    assert tail[4].endswith("quick.txt") and tail[5].endswith("quick.pga")


def test_the_eval_flags_choose_the_evals(gpt, monkeypatch):
    calls = []

    def fake_eval(run, model, mode, label=None):
        calls.append(label or gpt.EVAL_MODES[mode].label)
        run.evals[calls[-1]] = 10
        audit = {
            "passed": True,
            "chunks_scored": 1,
            "updates": 0,
            "targets": 10,
            "scored_twice": 0,
            "never_scored": 0,
        }
        return {
            "val_loss": 1.0,
            "val_bpb": 1.0,
            "eval_time_ms": 1.0,
            "tokens": 10,
            "score_first": audit,
        }

    monkeypatch.setattr(gpt, "timed_eval", fake_eval)

    def final(**env):
        calls.clear()
        h = gpt.Hyperparameters.from_env({"PRESET": "smoke", **env})
        run = gpt.RunContext(
            h, None, ListLogger(), gpt.TimeLedger(), None, None, None, None, "r", "a"
        )
        gpt.final_eval(run, None, {})
        return list(calls), gpt.describe_evals(run, h.final_eval_mode)

    assert final()[0] == ["final_sliding_window"]
    assert final(ROUNDTRIP_EVAL="1")[0] == ["final_int8_zlib_roundtrip", "final_sliding_window"]
    # the final figure itself
    assert final(EVAL_MODE="standard")[0] == ["final_int8_zlib_roundtrip"]
    _, line = final(VAL_MAX_TOKENS="0")
    assert "the whole val split" in line and "quick look" not in line


# --- progress ------------------------------------------------------------------------------------


def test_progress_plain_lines_carry_an_eta_and_the_status_gets_the_stage(gpt):
    logger = ListLogger()
    with gpt.Progress(
        "eval sliding", 4, state="evaluating", every_s=0, interactive=False, logger=logger
    ) as progress:
        for _ in range(4):
            gpt.Progress.advance_active(1)
        assert progress.done == 4
    lines = [line for line in logger.lines if line.startswith("progress: ")]
    assert re.fullmatch(r"progress: eval sliding 25% 1/4 eta \d+s", lines[0])
    assert lines[3].startswith("progress: eval sliding 100% 4/4 eta 0s")
    assert lines[-1].startswith("progress: eval sliding done 4/4 in ")
    prog = logger.status["progress"]
    assert logger.status["state"] == "evaluating" and prog["stage"] == "eval sliding"
    assert prog["fraction"] == 1.0 and prog["eta_s"] == 0.0 and prog["total"] == 4


def test_progress_without_a_run_writes_to_its_stream_and_stays_quiet_when_fast(gpt):
    out = io.StringIO()
    progress = gpt.Progress("gptq calibration", 2, every_s=0, interactive=False, stream=out)
    progress.advance()
    progress.close()
    assert re.fullmatch(
        r"progress: gptq calibration 50% 1/2 eta \d+s", out.getvalue().splitlines()[0]
    )
    quiet = io.StringIO()
    with gpt.Progress("serialize", 1, every_s=3600, interactive=False, stream=quiet) as p:
        p.advance()
    assert quiet.getvalue() == ""  # shorter than one period: no lines at all


def test_data_progress_has_the_same_plain_format():
    from data.shards import progress

    out = io.StringIO()
    assert list(
        progress(range(3), "export x", unit="doc", every_s=0, stream=out, interactive=False)
    ) == [0, 1, 2]
    assert re.fullmatch(r"progress: export x 33% 1/3 doc eta \d+s", out.getvalue().splitlines()[0])


# --- threads -------------------------------------------------------------------------------------


def test_thread_choice_respects_omp_num_threads_and_counts_free_cores(gpt):
    assert gpt.choose_cpu_threads({"OMP_NUM_THREADS": "3"}, 8, 0.0, 8) == (
        None,
        "OMP_NUM_THREADS=3 (set by the caller)",
    )
    assert gpt.choose_cpu_threads({}, 2, 4.4, 2)[0] == 1  # a busy 2-core machine: one thread
    assert gpt.choose_cpu_threads({}, 8, 1.2, 4)[0] == 4  # never more than the physical cores
    assert gpt.choose_cpu_threads({}, 8, 5.0, 8)[0] == 3
    assert gpt.choose_cpu_threads({}, 8, 0.0, 8, local_procs=2)[0] == 4  # shared by 2 processes


def test_the_run_logs_its_thread_choice(gpt, smoke_run):
    line = next(x for x in smoke_run["log"].splitlines() if x.startswith("threads: "))
    assert "OMP_WAIT_POLICY=" in line
    rt = gpt.setup_runtime({"OMP_NUM_THREADS": "1"})
    assert "OMP_NUM_THREADS=1 (set by the caller)" in rt.threads


# --- warmup, overshoot, compressor label ---------------------------------------------------------


def test_an_eager_cpu_run_keeps_one_warmup_step_and_says_so(gpt, embedded, tmp_path):
    env = {**TINY_ENV, **embedded, "WARMUP_STEPS": "5", "ITERATIONS": "1", "LOG_DIR": str(tmp_path)}
    h = gpt.Hyperparameters.from_env(env)
    logger = ListLogger()
    ledger = gpt.TimeLedger()
    gpt.train_model(
        h, gpt.setup_runtime({"OMP_NUM_THREADS": "1"}), gpt.build_model(h), logger, ledger
    )
    assert any("warmup: 1 step instead of WARMUP_STEPS=5" in line for line in logger.lines)
    assert any(line.startswith("warmup: 1 steps in ") for line in logger.lines)
    assert ledger.warmup_excluded_s > 0


def test_a_slow_step_gets_a_step_line_whatever_train_log_every(
    gpt, embedded, tmp_path, monkeypatch
):
    """Issue 25: a smoke run on a slow CPU was silent for ~90 s between step 10 and 25: a step
    line now comes at least every TRAIN_LOG_MAX_GAP_S of train time (0 here: every step)."""
    env = {**TINY_ENV, **embedded, "ITERATIONS": "13", "TRAIN_LOG_EVERY": "1000"}
    h = gpt.Hyperparameters.from_env({**env, "LOG_DIR": str(tmp_path)})
    steps = {}
    for gap in (1e9, 0.0):
        monkeypatch.setattr(gpt, "TRAIN_LOG_MAX_GAP_S", gap)
        logger = ListLogger()
        gpt.train_model(h, gpt.setup_runtime({"OMP_NUM_THREADS": "1"}), gpt.build_model(h), logger)
        steps[gap] = [int(x.split("/")[0][5:]) for x in logger.lines if x.startswith("step:")]
    assert steps[1e9] == list(range(1, 11))  # the first ten, then every 1000th
    assert steps[0.0] == list(range(1, 14))


def test_a_step_far_past_the_wallclock_cap_is_a_warning(gpt):
    logger = ListLogger()
    assert not gpt.overshoot_warning(logger, 65_000, 60_000, 9_000)  # 8 % past: fine
    assert gpt.overshoot_warning(logger, 85_000, 60_000, 30_000)
    assert logger.lines == [
        "warning: the wallclock cap was overshot: the step that crossed 60.0s "
        "ended at 85.0s (42% past the cap; that step took 30.0s)"
    ]


def test_the_size_lines_name_the_true_compressor_beside_the_baseline_label(smoke_run):
    log = smoke_run["log"]
    s = smoke_run["summary"]
    header = pack.read_container(s["artifact_path"])["header"]  # names the compressor used
    assert f"Total submission size int8+zlib: {s['total_bytes']} bytes" in log
    assert (
        f"Total submission size int8+{header['compressor']}: {s['total_bytes']} bytes "
        "(the true widths and compressor)"
    ) in log


# --- record folders ------------------------------------------------------------------------------


def test_a_record_folder_has_portable_commands_and_pinned_requirements(request, tmp_path):
    tiny = runs.tiny_runs(request)
    if tiny["s1"] is None:
        pytest.skip("no data for the tiny runs")
    args = pack.build_parser().parse_args(
        [
            "record",
            str(tiny["s1"]["log"]),
            str(tiny["s2"]["log"]),
            "--name",
            "Portable",
            "--author",
            "T",
            "--github-id",
            "t",
            "--date",
            "2026-05-01",
            "--out",
            str(tmp_path / "records"),
            "--non-record",
        ]
    )
    folder, _ = pack.build_record(args)
    readme = (Path(folder) / "README.md").read_text()
    assert not re.search(r"(^|[\s=])/[A-Za-z]", readme), "an absolute path in the README"
    assert (
        "DATA_PATH=data/datasets/data" in readme
        and "TOKENIZER_PATH=data/tokenizers/tokenizer.model" in readme
    )
    reqs = [
        line
        for line in (Path(folder) / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    pins = dict(
        line.split("==")
        for line in (TESTS.parent / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {r.split("==")[0] for r in reqs} >= {"torch", "numpy", "sentencepiece", "zstandard"}
    assert all("==" in r and pins[r.split("==")[0]] == r.split("==")[1] for r in reqs)
