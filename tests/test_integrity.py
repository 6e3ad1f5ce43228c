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


# --- hostile inputs: one line, non-zero, no traceback, nothing half-written, memory bounded -----


@pytest.fixture(scope="module")
def tiny_artifact(embedded, tmp_path_factory):
    """A real tiny train_gpt.py artifact (and its log folder)."""
    from conftest import TINY_ENV, run_script

    folder = tmp_path_factory.mktemp("hostile")
    env = {**TINY_ENV, **embedded, "RUN_ID": "h", "LOG_DIR": str(folder)}
    done = run_script("train_gpt.py", env, folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "h.pga"


def rewrite_header(gpt, src, dst, change):
    """A copy of the artifact with its header changed by `change(header)` and its checksum made
    right again: what a forger would do."""
    header, offset = gpt.read_artifact_header(str(src))
    payload = src.read_bytes()[offset:]
    header = {k: v for k, v in header.items() if k != "header_sha256"}
    change(header)
    gpt.write_artifact(str(dst), header, payload)
    return dst


def eval_bpb_cli(artifact, embedded, timeout=120):
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import resource, runpy, sys; sys.argv = ['eval_bpb.py'] + sys.argv[1:];"
        "code = 0\n"
        "try:\n runpy.run_path('eval_bpb.py', run_name='__main__')\n"
        "except SystemExit as e:\n code = e.code or 0\n"
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)"
    )
    args = [str(artifact), "--data-path", embedded["DATA_PATH"]]
    args += ["--tokenizer-path", embedded["TOKENIZER_PATH"]]
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def maxrss_mb(stderr):
    line = [x for x in stderr.splitlines() if x.startswith("maxrss_kb")][-1]
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize(
    "change",
    [
        {"num_layers": 256, "model_dim": 16384},  # terabytes, if it were built
        {"model_dim": 128},  # plausible, but not the shapes of the tensors it ships
        {"num_layers": 1_000_000},  # past SHAPE_LIMITS
        {"model_dim": -64},
    ],
    ids=["huge", "other shapes", "absurd layers", "negative"],
)
def test_a_header_describing_another_model_is_refused_before_allocating(
    tiny_artifact, embedded, tmp_path, change
):
    gpt = load_script("train_gpt.py")
    forged = rewrite_header(
        gpt, tiny_artifact, tmp_path / "forged.pga", lambda h: h["hparams"].update(change)
    )
    done = eval_bpb_cli(forged, embedded)
    assert done.returncode == 2, done.stdout[-500:] + done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if not x.startswith("maxrss_kb")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {forged}")
    assert "Traceback" not in done.stderr
    assert maxrss_mb(done.stderr) < 1500  # what re-scoring a tiny valid artifact needs


@pytest.mark.parametrize("what", ["version", "checksum"])
def test_pack_size_refuses_what_eval_bpb_refuses(tiny_artifact, tmp_path, what, capsys):
    import struct

    import pack

    blob = bytearray(tiny_artifact.read_bytes())
    if what == "version":
        blob[8:12] = struct.pack("<I", 7)
    else:
        head_len = struct.unpack_from("<I", blob, 12)[0]
        at = blob.index(b'"vocab_size":', 16, 16 + head_len) + len('"vocab_size":')
        blob[at : at + 1] = b"9" if blob[at : at + 1] != b"9" else b"8"
    bad = tmp_path / "bad.pga"
    bad.write_bytes(bytes(blob))
    script = tmp_path / "s.py"
    script.write_text("x = 1\n")
    code = pack.main(["size", str(bad), "--script", str(script)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bad}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "limit_bytes,extra",
    [(250_000, {}), (800_000, {"MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"})],
    ids=["the log", "the artifact"],
)
def test_a_file_size_limit_while_writing_ends_in_one_line(embedded, tmp_path, limit_bytes, extra):
    """RLIMIT_FSIZE stands in for a full disk: the run dies with one line, exit 1, no
    traceback, and leaves no temporary or half-written file behind; first while it writes its
    log (the source is ~280 KB), then while it writes an artifact larger than its log."""
    import os
    import resource
    import subprocess
    import sys

    from conftest import REPO, TINY_ENV

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, **TINY_ENV, **embedded, "RUN_ID": "full", "LOG_DIR": str(tmp_path)}
    env.update(extra)
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "File too large" in last, last
    named = "full.txt" if limit_bytes == 250_000 else "full.pga"
    assert f"{tmp_path / named}: File too large" in last, last
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert not (tmp_path / "full.pga").exists()


# --- issue 25: a missing dataset says how to get it, before the run writes anything --------------


@pytest.mark.parametrize(
    "env,variable,hint",
    [
        ({"PRESET": "record"}, "TOKENIZER_PATH",
         "`python -m data.download --variant sp8192_caseops`"),
        (
            {"PRESET": "record", "DATA_PATH": "nowhere/fineweb10B_sp1024", "VOCAB_SIZE": "1024",
             "TOKENIZER_PATH": "nowhere/fineweb_1024_bpe.model"},
            "TOKENIZER_PATH",
            "python -m data.download --variant sp1024",
        ),
        ({"PRESET": "smoke", "DATA_PATH": "nowhere/pydoc_sp1024"}, "DATA_PATH", "data.embedded"),
    ],
    ids=["record", "sp1024", "smoke"],
)  # fmt: skip
def test_missing_data_names_the_command_that_makes_it(tmp_path, env, variable, hint, embedded):
    import os
    import subprocess
    import sys

    from conftest import REPO

    full = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    if env["PRESET"] == "smoke":
        full["TOKENIZER_PATH"] = embedded["TOKENIZER_PATH"]
    full.update(env)
    full.update({"LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "nodata"})
    done = subprocess.run(
        [sys.executable, str(REPO / "train_gpt.py")],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {variable}=") and done.stderr.count("\n") == 1
    assert hint in done.stderr
    assert done.stdout == "" and not (tmp_path / "logs").exists()  # nothing printed or written
