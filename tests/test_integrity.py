"""Issue 24, score integrity: one way to choose the final eval mode; (more below as it lands)."""

import pytest
from conftest import SCRIPTS, load_script


@pytest.fixture(scope="module", params=SCRIPTS)
def script(request):
    return load_script(request.param)


def test_ttt_enabled_is_eval_mode_ttt(script):
    h = script.Hyperparameters.from_env({"PRESET": "smoke", "TTT_ENABLED": "1"})
    assert h.eval_mode == "ttt" and h.final_eval_mode == "ttt"
    same = script.Hyperparameters.from_env(
        {"PRESET": "smoke", "TTT_ENABLED": "1", "EVAL_MODE": "ttt"}
    )
    assert same.final_eval_mode == "ttt"


@pytest.mark.parametrize("mode", ["standard", "sliding", "ttt_lora", "ttt_phased"])
def test_ttt_enabled_beside_another_eval_mode_is_refused(script, mode):
    env = {"PRESET": "smoke", "TTT_ENABLED": "1", "EVAL_MODE": mode}
    with pytest.raises(ValueError, match=f"TTT_ENABLED=1 means EVAL_MODE=ttt.*'{mode}'"):
        script.Hyperparameters.from_env(env)


def test_the_final_mode_is_decided_in_one_place(script):
    """A hyperparameter set made without the environment (an old artifact header) still reads
    TTT_ENABLED as the chunked TTT mode, through the same property the pipeline uses."""
    h = script.Hyperparameters.from_env({"PRESET": "smoke"})
    assert h.final_eval_mode == h.eval_mode == "sliding"
    h.ttt_enabled = True
    assert h.final_eval_mode == "ttt"


# --- bytes: the re-score counts what the run counted ----------------------------------------------


def test_eval_bpb_refuses_to_count_other_bytes_than_the_run(script):
    import torch

    import eval_bpb

    h = script.Hyperparameters.from_env({"PRESET": "smoke"})
    tables = (torch.zeros(4), torch.zeros(4), torch.zeros(4))
    sidecar = {"kind": "sidecar", "sha256": "ab" * 32, "files": 1, "manifest": "verified"}
    assert eval_bpb.check_byte_source(tables, {"kind": "tables"}, h) == {"kind": "tables"}
    with pytest.raises(eval_bpb.BadInput, match="the run counted them with 1 sidecar files"):
        eval_bpb.check_byte_source(tables, sidecar, h)
    other = script.SidecarBytes(torch.zeros(4), {**sidecar, "sha256": "cd" * 32})
    with pytest.raises(eval_bpb.BadInput, match="sha256 cdcdcdcd"):
        eval_bpb.check_byte_source(other, sidecar, h)


def test_the_header_takes_only_a_well_formed_byte_source(script):
    good = {"kind": "sidecar", "sha256": "ab" * 32, "files": 2, "manifest": "none"}
    assert script.valid_byte_source(good)
    assert script.valid_byte_source({"kind": "tables"})
    for bad in (
        {"kind": "tables", "extra": 1},
        {**good, "sha256": "xyz"},
        {**good, "files": -1},
        {**good, "manifest": "trust me"},
        ["tables"],
    ):
        assert not script.valid_byte_source(bad), bad


# --- the eval warm-up: outside the eval clock, on training tokens ---------------------------------


def test_the_eval_warmup_is_skipped_on_cpu_and_says_so(embedded, tmp_path):
    from conftest import TINY_ENV, run_script, summary_of

    env = {**TINY_ENV, **embedded, "RUN_ID": "warm", "LOG_DIR": str(tmp_path)}
    done = run_script("train_gpt.py", env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "warm.txt").read_text()
    assert "eval_warmup: skipped (CPU" in log
    assert summary_of(log)["time_ledger"]["eval_warmup_excluded_s"] == 0.0


@pytest.mark.parametrize("mode", ["sliding", "ttt", "ttt_lora", "ttt_phased"])
def test_the_eval_warmup_reads_training_tokens_never_val(embedded, mode):
    """Forced on the CPU: every compiled-on-GPU mode runs once on the first train shard; the run's
    val tokens are not even there to read, the ledger takes the time as excluded, and the model
    it primes scores exactly as before."""
    import torch
    from conftest import TINY_ENV

    gpt = load_script("train_gpt.py")
    env = {**TINY_ENV, **embedded, "EVAL_MODE": mode, "TTT_LORA_CHUNK": "16", "TTT_LORA_RANK": "2"}
    h = gpt.Hyperparameters.from_env(env)
    sp = gpt.load_tokenizer(h.tokenizer_path, h.vocab_size)
    rt = gpt.setup_runtime({})
    lines = []

    class Logger:
        def log0(self, text, console=True):
            lines.append(text)

    ledger = gpt.TimeLedger()
    run = gpt.RunContext(h, rt, Logger(), ledger, sp, None, None, None, "w", "a")
    torch.manual_seed(0)
    model = gpt.build_model(h).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = gpt.warm_up_eval(run, model, mode, force=True)
    assert seconds > 0 and ledger.eval_warmup_excluded_s == seconds
    assert (
        lines and lines[0].startswith(f"eval_warmup: {mode} on ") and "training tokens" in lines[0]
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
