"""Bad input to `pack.py record` and `pack.py check` (issue 13): tampered record folders, killed
runs, names that would leave the output folder, failures half-way through writing, forged scores
that only a re-score can catch, and a trojaned training script that must never run.

Real inputs: two tiny CPU runs of train_gpt.py (tests/fixtures/pack/runs.py, shared with
test_pack.py within a session), one honest record folder built from them once per session, and one
run of a trojaned copy of the script whose import would write a marker file.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pack"
for p in (REPO, FIXTURES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import runs  # noqa: E402

import pack  # noqa: E402

NON_RECORD = "track_non_record_16mb"
DATE = "2026-05-01"


@pytest.fixture(scope="session")
def tiny(request):
    """Seeds 1 and 2 of one tiny sliding-window config (the same runs test_pack.py uses)."""
    base = request.getfixturevalue("tmp_path_factory").getbasetemp() / "pgolf_tiny"
    src = None if (base / "ws" / "ready").is_file() else runs.data_source()
    if src is None and not (base / "ws" / "ready").is_file():
        emb = request.getfixturevalue("embedded")
        src = (emb["DATA_PATH"], emb["TOKENIZER_PATH"])
    return {
        "s1": runs.tiny_run(base, "s1", 1, src, EVAL_MODE="sliding"),
        "s2": runs.tiny_run(base, "s2", 2, src, EVAL_MODE="sliding"),
    }


def record_args(logs, out, *extra, name="Honest", date=DATE):
    return [
        "record",
        *map(str, logs),
        "--name",
        name,
        "--author",
        "Test Author",
        "--github-id",
        "tester",
        "--date",
        date,
        "--out",
        str(out),
        "--non-record",
        *map(str, extra),
    ]


def run(argv, capsys):
    code = pack.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def problems(out):
    return [line[len("problem: ") :] for line in out.splitlines() if line.startswith("problem: ")]


def tree(root):
    """Every path under root (files and folders), relative:
    what a failed command must leave alone."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture(scope="session")
def honest(tiny, tmp_path_factory):
    """An honest record folder of the two tiny seeds, made once;
    tests copy it before changing it."""
    out = tmp_path_factory.mktemp("bad_records") / "records"
    args = pack.build_parser().parse_args(record_args([tiny["s1"]["log"], tiny["s2"]["log"]], out))
    folder, _ = pack.build_record(args)
    return Path(folder)


@pytest.fixture
def folder(honest, tmp_path):
    """A private copy of the honest folder, in a folder named after its track."""
    copy = tmp_path / NON_RECORD / honest.name
    shutil.copytree(honest, copy)
    return copy


def edit_submission(folder, change):
    path = folder / "submission.json"
    sub = json.loads(path.read_text())
    change(sub)
    path.write_text(json.dumps(sub, indent=2))


# Tamper-evident folders


def test_the_hash_table_covers_every_file_and_an_honest_folder_passes(honest, capsys):
    sub = json.loads((honest / "submission.json").read_text())
    names = {p.name for p in honest.iterdir()} - {"submission.json"}
    assert set(sub["sha256"]) == names
    assert {
        "train_gpt.py",
        "train_seed1.log",
        "train_seed2.log",
        "final_model_seed1.pga",
        "final_model_seed2.pga",
        "README.md",
    } <= names
    assert sub["sha256"]["final_model_seed1.pga"] == pack.sha256_file(
        honest / "final_model_seed1.pga"
    )
    code, out, _ = run(["check", honest], capsys)
    assert code == 0 and "ok: True" in out, out


@pytest.mark.parametrize(
    "name", ["train_seed1.log", "final_model_seed2.pga", "train_gpt.py", "README.md"]
)
def test_check_names_a_file_changed_after_recording(folder, capsys, name):
    path = folder / name
    blob = bytearray(path.read_bytes())
    if name.endswith(".pga"):
        blob[-1] ^= 0x01  # a flipped payload bit
    else:
        blob += b"\n# edited after recording\n"  # changes nothing any other check reads
    path.write_bytes(bytes(blob))
    code, out, _ = run(["check", folder], capsys)
    assert code == 1 and "ok: False" in out
    assert f"{name}: sha256 differs from submission.json (changed after recording)" in problems(
        out
    ), out


def test_check_names_an_extra_and_a_missing_file(folder, capsys):
    (folder / "notes.txt").write_text("added later\n")
    (folder / "train_seed2.jsonl").unlink()
    code, out, _ = run(["check", folder], capsys)
    found = problems(out)
    assert code == 1
    assert "notes.txt: extra file, not in submission.json's sha256 table" in found, out
    assert "train_seed2.jsonl: missing (submission.json's sha256 table lists it)" in found, out


def test_check_refuses_a_folder_without_the_hash_table(folder, capsys):
    edit_submission(folder, lambda sub: sub.pop("sha256"))
    code, out, _ = run(["check", folder], capsys)
    assert code == 1 and any("no sha256 table" in p for p in problems(out)), out


@pytest.mark.parametrize(
    "field,value",
    [("script", "../../../etc/hostname"), ("artifact", "../x.pga"), ("seeds", ["../1"])],
)
def test_check_refuses_names_that_leave_the_folder(folder, capsys, field, value):
    def change(sub):
        if field == "artifact":
            sub["seed_results"]["1"]["artifact"] = value
        else:
            sub[field] = value

    edit_submission(folder, change)
    code, out, _ = run(["check", folder], capsys)
    assert code == 1 and any(repr(value) in p for p in problems(out)), out


# Refused records: killed runs, names that leave the output folder, failures half-way


def test_record_refuses_a_killed_run_and_writes_nothing(tiny, tmp_path, capsys):
    lines = tiny["s1"]["log"].read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("Serialized model"))
    killed = tmp_path / "logs" / "killed_seed1.txt"
    killed.parent.mkdir()
    killed.write_text("".join(lines[:cut]))  # stopped after the pre-quantization eval
    assert "pre-quantization" in killed.read_text()
    before = tree(tmp_path)
    code, _, err = run(
        record_args([killed], tmp_path / "records", "--artifact", tiny["s1"]["artifact"]), capsys
    )
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert str(killed) in err and "summary" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--name", "../../escaped"),
        ("--name", "a/b"),
        ("--name", ".hidden"),
        ("--date", "../../x"),
        ("--date", "2026-13-01"),
        ("--date", "2026/05/01"),
    ],
)
def test_record_refuses_names_that_leave_the_output_folder(tiny, tmp_path, capsys, flag, value):
    out = tmp_path / "deep" / "er" / "records"
    kwargs = {"name": value} if flag == "--name" else {"date": value}
    before = tree(tmp_path)
    code, _, err = run(record_args([tiny["s1"]["log"]], out, **kwargs), capsys)
    assert code == 2 and err.startswith(f"error: {flag} {value!r}") and err.count("\n") == 1, err
    assert tree(tmp_path) == before


def test_record_refuses_a_header_script_name_that_leaves_the_folder(tiny, tmp_path, capsys):
    """The artifact header names the script the folder ships: a traversal there is refused too. The
    forged name has the length of the real one, so the artifact keeps the size its log measured."""
    blob = tiny["s1"]["artifact"].read_bytes()
    magic, version, head_len = struct.unpack_from("<8sII", blob)
    header = json.loads(blob[16 : 16 + head_len])
    header["script"] = "../../pwn.py"
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    header["header_sha256"] = hashlib.sha256(canonical).hexdigest()  # a consistent forgery
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    forged = tmp_path / "forged.pga"
    forged.write_bytes(
        struct.pack("<8sII", magic, version, len(head)) + head + blob[16 + head_len :]
    )
    assert forged.stat().st_size == len(blob)
    before = tree(tmp_path)
    code, _, err = run(
        record_args([tiny["s1"]["log"]], tmp_path / "records", "--artifact", forged), capsys
    )
    assert code == 2 and "'../../pwn.py'" in err and err.count("\n") == 1, err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("boom")])
def test_a_failure_while_writing_leaves_no_temp_folder(tiny, tmp_path, capsys, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pack, "_readme", fail)
    out = tmp_path / "records"
    argv = record_args([tiny["s1"]["log"], tiny["s2"]["log"]], out)
    if isinstance(error, OSError):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
        assert f"{DATE}_Honest" in err
    else:
        with pytest.raises(RuntimeError):
            pack.main(argv)
    assert list((out / NON_RECORD).iterdir()) == []


# Re-scoring


def forge_val_bpb(log, path, delta):
    """A copy of a log whose summary claims a better val_bpb: consistent everywhere a reader looks,
    so that only re-scoring the artifact can tell."""
    out = []
    for line in log.read_text().splitlines(keepends=True):
        if line.startswith("summary: "):
            summary = json.loads(line[len("summary: ") :])
            summary["val_bpb"] -= delta
            line = f"summary: {json.dumps(summary, sort_keys=True)}\n"
        out.append(line)
    path.write_text("".join(out))
    return path


def test_rescore_passes_an_honest_folder(honest, tiny, capsys):
    code, out, err = run(
        [
            "check",
            honest,
            "--rescore",
            "--data-path",
            tiny["s1"]["data"],
            "--tokenizer-path",
            tiny["s1"]["tokenizer"],
        ],
        capsys,
    )
    assert code == 0 and "ok: True" in out, out
    # issue 25: it says what it compared, per seed, and showed progress while it ran
    lines = [x for x in out.splitlines() if x.startswith("rescore: seed ")]
    assert lines and all(x.endswith(": same") and "val_bpb logged " in x for x in lines), out
    assert err.count("eval_bpb.py is running") == len(lines)


def test_rescore_catches_a_forged_val_bpb_that_the_plain_check_misses(tiny, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    forged = forge_val_bpb(tiny["s1"]["log"], logs / "s1.txt", 0.01)
    code, _, err = run(
        record_args(
            [forged],
            tmp_path / "records",
            "--artifact",
            tiny["s1"]["artifact"],
            "--script",
            tiny["s1"]["script"],
            name="Forged",
        ),
        capsys,
    )
    assert code == 0, err
    folder = tmp_path / "records" / NON_RECORD / f"{DATE}_Forged"
    code, out, _ = run(["check", folder], capsys)
    assert code == 0 and "ok: True" in out, out  # every file agrees with every other
    code, out, err = run(["check", folder, "--rescore"], capsys)
    assert code == 1 and "ok: False" in out
    found = [p for p in problems(out) if p.startswith("seed 1: final_model_seed1.pga re-scores")]
    assert found and "train_seed1.log" in found[0], out
    assert "rescore: seed 1 (final_model_seed1.pga): eval_bpb.py is running" in err
    assert any(x.startswith("rescore: seed 1: val_bpb logged ") and x.endswith("DIFFERS")
               for x in out.splitlines()), out  # fmt: skip


def test_rescore_flags_need_rescore(honest, capsys):
    code, _, err = run(["check", honest, "--data-path", "somewhere"], capsys)
    assert code == 2 and "--rescore" in err


# A trojaned script is never executed


@pytest.fixture(scope="session")
def trojan(tiny, tmp_path_factory):
    """A tiny run of a copy of train_gpt.py that writes a marker file whenever it is imported
    (not run): its source opens the log and its sha256 is in the artifact header, so record
    accepts it."""
    ws = tmp_path_factory.mktemp("trojan")
    marker = ws / "MARKER_imported"
    source = (REPO / "train_gpt.py").read_text()
    payload = f'\n\nif __name__ != "__main__":\n    open({str(marker)!r}, "w").write("ran")\n'
    (ws / "train_gpt.py").write_text(source + payload)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in runs.TINY and not k.startswith(("TTT_", "EVAL_"))
    }
    env.update(
        runs.TINY,
        ITERATIONS="2",
        VAL_LOSS_EVERY="0",
        OMP_NUM_THREADS="1",
        LOG_DIR=str(ws / "logs"),
        RUN_ID="trojan_seed7",
        SEED="7",
        EVAL_MODE="standard",
        DATA_PATH=str(tiny["s1"]["data"]),
        TOKENIZER_PATH=str(tiny["s1"]["tokenizer"]),
    )
    proc = subprocess.run(
        [sys.executable, str(ws / "train_gpt.py")],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert not marker.exists()  # running it as a script does not fire the trojan
    return {"ws": ws, "marker": marker, "log": ws / "logs" / "trojan_seed7.txt"}


def test_record_and_check_never_execute_the_script(trojan, tmp_path, capsys):
    code, out, err = run(record_args([trojan["log"]], tmp_path / "records", name="Trojan"), capsys)
    assert code == 0, err
    folder = tmp_path / "records" / NON_RECORD / f"{DATE}_Trojan"
    assert (folder / "train_gpt.py").read_bytes() == (trojan["ws"] / "train_gpt.py").read_bytes()
    assert not trojan["marker"].exists()
    # env read from the log, not the script
    assert "NUM_LAYERS=2" in (folder / "README.md").read_text()
    code, out, _ = run(["check", folder, "--rescore"], capsys)
    assert code == 1 and any(p.startswith("not re-scored: train_gpt.py") for p in problems(out)), (
        out
    )
    assert not trojan["marker"].exists()
    # The trojan is real: importing the script fires it.
    spec = importlib.util.spec_from_file_location("trojan_probe", folder / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["trojan_probe"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("trojan_probe", None)
    assert trojan["marker"].exists()
