"""Specification of pack.py: size accounting, the log parser, significance, record folders and
their check.

Real inputs: tiny CPU runs of train_gpt.py (shared with test_eval_bpb.py through
tests/fixtures/pack/runs.py, once per session) and hand-written logs of the baseline and late log
families (docs/rules.md, Log lines).
"""

import hashlib
import io
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pack"
for p in (REPO, FIXTURES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import runs  # noqa: E402

import pack  # noqa: E402


@pytest.fixture(scope="session")
def tiny(request):
    """Two seeds of one tiny sliding-window config, and a TTT run (tests/fixtures/pack/runs.py)."""
    return runs.tiny_runs(request)


def run(argv, capsys):
    code = pack.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_container(path, raw, compressor="zlib", script_sha="0" * 64):
    """Our artifact layout, built by hand: magic, version, header length, JSON header (with its
    mandatory header_sha256), payload."""
    payload = zlib.compress(raw, 9) if compressor == "zlib" else raw
    header = {
        "format": "pgolf-artifact",
        "script": "train_x.py",
        "script_sha256": script_sha,
        "hparams": {},
        "tokenizer_sha256": None,
        "vocab_size": 8,
        "compressor": compressor,
        "raw_bytes": len(raw),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        # one raw uint8 tensor spanning the payload: the reader checks every span
        "tensors": [
            {
                "name": "w",
                "dtype": "uint8",
                "shape": [len(raw)],
                "scheme": "raw",
                "data": [0, len(raw)],
            }
        ],
    }
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header["header_sha256"] = hashlib.sha256(canonical).hexdigest()  # mandatory
    head = json.dumps(header).encode()
    Path(path).write_bytes(b"PGOLFART" + struct.pack("<II", 1, len(head)) + head + payload)
    return 16 + len(head) + len(payload), payload


# Size accounting


def test_size_counts_artifact_plus_script_bytes(tmp_path, capsys):
    raw = bytes(range(256)) * 40
    art_bytes, payload = write_container(tmp_path / "a.pga", raw)
    script = tmp_path / "train_x.py"
    script.write_text("print('héllo')\n" * 100, encoding="utf-8")  # 16 bytes a line: é is two bytes
    code, out, _ = run(["size", tmp_path / "a.pga", "--script", script, "--json"], capsys)
    rep = json.loads(out)
    assert code == 0
    assert rep["artifact_bytes"] == art_bytes == (tmp_path / "a.pga").stat().st_size
    assert rep["code_bytes"] == 1600
    assert rep["total_bytes"] == art_bytes + 1600
    assert rep["margin_bytes"] == 16_000_000 - art_bytes - 1600
    assert rep["raw_payload_bytes"] == len(raw)
    assert rep["compressors"]["zlib-9"]["payload_bytes"] == len(payload)
    assert rep["compressors"]["zlib-9"]["total_bytes"] == art_bytes + 1600
    assert rep["compressors"]["lzma-9e"]["payload_bytes"] > 0


def test_size_of_official_ptz_tables_the_raw_torch_bytes(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(
        {"__quant_format__": "int8_clean_per_row_v1", "w": torch.arange(1000, dtype=torch.int8)},
        buf,
    )
    blob = zlib.compress(buf.getvalue(), 9)
    (tmp_path / "final_model.int8.ptz").write_bytes(blob)
    (tmp_path / "train_gpt.py").write_bytes(b"x = 1\n")
    code, out, _ = run(
        [
            "size",
            tmp_path / "final_model.int8.ptz",
            "--script",
            tmp_path / "train_gpt.py",
            "--json",
        ],
        capsys,
    )
    rep = json.loads(out)
    assert code == 0
    assert rep["total_bytes"] == len(blob) + 6
    assert rep["raw_payload_bytes"] == len(buf.getvalue())
    assert rep["compressors"]["zlib-9"]["payload_bytes"] == len(blob)


def test_size_over_budget_exits_1(tmp_path, capsys):
    art_bytes, _ = write_container(tmp_path / "a.pga", b"\0" * 1000)
    script = tmp_path / "train_x.py"
    script.write_bytes(b"#" * (16_000_000 - art_bytes))
    code, out, _ = run(["size", tmp_path / "a.pga", "--script", script, "--no-table"], capsys)
    assert code == 0 and "margin_bytes: 0" in out
    script.write_bytes(b"#" * (16_000_000 - art_bytes + 1))
    code, out, err = run(["size", tmp_path / "a.pga", "--script", script, "--no-table"], capsys)
    assert code == 1
    assert "over_budget: True" in out and err.startswith("error: ") and "over the 16000000" in err


def test_size_refuses_foreign_and_corrupt_files(tmp_path, capsys):
    (tmp_path / "s.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not an artifact\n")
    code, _, err = run(["size", tmp_path / "notes.txt", "--script", tmp_path / "s.py"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    write_container(tmp_path / "a.pga", bytes(range(256)) * 8)
    blob = bytearray((tmp_path / "a.pga").read_bytes())
    blob[-5] ^= 0x10
    (tmp_path / "a.pga").write_bytes(bytes(blob))
    code, _, err = run(["size", tmp_path / "a.pga", "--script", tmp_path / "s.py"], capsys)
    assert code == 2 and "corrupted" in err


def test_size_of_a_real_run_matches_its_log(tiny, capsys):
    code, out, _ = run(
        ["size", tiny["s1"]["artifact"], "--script", tiny["s1"]["script"], "--json"], capsys
    )
    rep, log = json.loads(out), pack.parse_log(tiny["s1"]["log"])
    assert code == 0
    assert rep["total_bytes"] == log["total_bytes"]
    assert rep["script_sha256_matches"] is True


# Log parser


def test_parse_log_reads_the_baseline_family():
    log = pack.parse_log(FIXTURES / "baseline_seed1337.log")
    assert log["family"] == "baseline"
    assert log["val_bpb"] == 1.2243657 and log["val_loss"] == 2.07269206
    assert (
        log["total_bytes"] == 15863489
        and log["code_bytes"] == 47642
        and log["artifact_bytes"] == 15815847
    )
    assert log["steps"] == 13780 and log["train_time_ms"] == 600012
    assert log["seed"] == 1337 and log["eval_mode"] == "standard" and log["valid"] is True
    assert log["val"][-1] == {"step": 13780, "val_loss": 2.0556, "val_bpb": 1.2172}
    assert log["train"][1] == {"step": 200, "train_loss": 2.861, "train_time_ms": 8716.0}


def test_parse_log_reads_the_late_family():
    log = pack.parse_log(FIXTURES / "late_seed42.log")
    assert log["family"] == "late"
    assert log["final_label"] == "quantized_ttt_phased" and log["eval_mode"] == "ttt_phased"
    assert log["val_bpb"] == 1.06107587 and log["val_loss"] == 2.74090811
    assert log["code_bytes"] == 31999 and log["total_bytes"] == 15897259
    assert log["evals"]["quantized_sliding_window"]["val_bpb"] == 1.0629876
    assert log["pre_quant_val_bpb"] == 1.06479004
    assert log["eval_time_ms"] == pytest.approx(455100.0)
    assert log["train"][2] == {
        "step": 4000,
        "train_loss": 2.863,
        "train_time_ms": pytest.approx(486000.0),
    }
    assert log["seed"] == 42 and log["hparams"]["num_layers"] == "11"


def test_parse_log_prefers_our_summary_and_hashes_the_logged_source(tiny):
    log = pack.parse_log(tiny["s1"]["log"])
    summary = log["summary"]
    assert log["family"] == "ours" and log["final_label"] == "summary"
    assert log["val_bpb"] == summary["val_bpb"] and log["tokens"] == summary["tokens"]
    assert f"{log['val_bpb']:.8f}" == f"{log['exact']['final_sliding_window']['val_bpb']:.8f}"
    header = pack.read_container(tiny["s1"]["artifact"])["header"]
    assert log["source_sha256"] == header["script_sha256"] == pack.sha256_file(tiny["s1"]["script"])
    assert log["hparams"]["eval_stride"] == "32" and log["seed"] == 1


# Significance


def welch_by_hand(new, old):
    new, old = np.asarray(new, float), np.asarray(old, float)
    v1, v2 = new.var(ddof=1) / len(new), old.var(ddof=1) / len(old)
    t = (new.mean() - old.mean()) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(new) - 1) + v2**2 / (len(old) - 1))
    return t, df


def test_welch_shifts_the_baseline_by_the_threshold():
    from scipy import stats

    new, old = [2.0500, 2.0512, 2.0496], [2.0601, 2.0589, 2.0612, 2.0598]
    t, df = welch_by_hand(new, [o - 0.005 for o in old])
    res = pack.welch_significance(new, old, metric="val_loss")
    assert res["t_statistic"] == pytest.approx(t, rel=1e-10)
    assert res["welch_df"] == pytest.approx(df, rel=1e-10)
    assert res["p_value"] == pytest.approx(stats.t.cdf(t, df), rel=1e-9)
    assert res["improvement_nats"] == pytest.approx(np.mean(old) - np.mean(new))
    assert res["significant"] is (res["p_value"] < 0.01)


def test_welch_in_bpb_converts_the_threshold_with_tokens_per_byte():
    tpb = 0.40945
    threshold = 0.005 * tpb / math.log(2)
    assert threshold == pytest.approx(0.00295, abs=1e-5)  # docs/rules.md, Records and significance
    new, old = [1.2180, 1.2190, 1.2175], [1.2244, 1.2250, 1.2239]
    t, df = welch_by_hand(new, [o - threshold for o in old])
    res = pack.welch_significance(new, old, metric="val_bpb", tpb=tpb)
    assert res["threshold"] == pytest.approx(threshold)
    assert res["t_statistic"] == pytest.approx(t, rel=1e-10) and res["welch_df"] == pytest.approx(
        df, rel=1e-10
    )
    assert res["improvement_nats"] == pytest.approx(
        (np.mean(old) - np.mean(new)) * math.log(2) / tpb
    )


def test_significance_command_reads_logs_and_values(capsys):
    late = [FIXTURES / "late_seed42.log", FIXTURES / "late_seed314.log"]
    code, out, _ = run(
        [
            "significance",
            "--new",
            *late,
            "--baseline-values",
            "1.0700,1.0712",
            "--metric",
            "val_bpb",
            "--json",
        ],
        capsys,
    )
    res = json.loads(out)
    logs = [pack.parse_log(p) for p in late]
    tpb = np.mean([lg["val_bpb"] * math.log(2) / lg["val_loss"] for lg in logs])
    t, df = welch_by_hand(
        [lg["val_bpb"] for lg in logs], [v - 0.005 * tpb / math.log(2) for v in (1.07, 1.0712)]
    )
    assert (
        code == 0
        and res["t_statistic"] == pytest.approx(t)
        and res["welch_df"] == pytest.approx(df)
    )
    code, out, _ = run(
        [
            "significance",
            "--new",
            *late,
            "--baseline",
            FIXTURES / "baseline_seed1337.log",
            FIXTURES / "baseline_seed42.log",
        ],
        capsys,
    )
    assert code == 0 and "p_value: " in out and "metric: val_loss" in out


# Record folders


def record(tmp_path, capsys, logs, *extra, name="Tiny"):
    argv = [
        "record",
        *logs,
        "--name",
        name,
        "--author",
        "Test Author",
        "--github-id",
        "tester",
        "--date",
        "2026-05-01",
        "--out",
        tmp_path / "records",
        "--blurb",
        "Two tiny CPU seeds.",
        *extra,
    ]
    return run(argv, capsys)


@pytest.fixture(scope="session")
def record_folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    args = pack.build_parser().parse_args(
        [
            "record",
            str(tiny["s2"]["log"]),
            str(tiny["s1"]["log"]),
            "--name",
            "TinySmoke",
            "--author",
            "Test Author",
            "--github-id",
            "tester",
            "--date",
            "2026-05-01",
            "--out",
            str(out / "records"),
            "--non-record",
            "--baseline-values",
            "6.7,6.71,6.72",
        ]
    )
    folder, _ = pack.build_record(args)
    return Path(folder)


def test_record_writes_a_folder_that_passes_check(record_folder, tiny, capsys):
    assert record_folder.parent.name == "track_non_record_16mb"
    assert record_folder.name == "2026-05-01_TinySmoke"
    for name in (
        "README.md",
        "submission.json",
        "requirements.txt",
        "train_gpt.py",
        "train_seed1.log",
        "train_seed2.log",
        "train_seed1.jsonl",
        "final_model_seed1.pga",
        "final_model_seed2.pga",
    ):
        assert (record_folder / name).is_file(), name
    code, out, _ = run(["check", record_folder], capsys)
    assert code == 0, out
    assert "ok: True" in out


def test_record_submission_json_is_computed_from_the_logs(record_folder, tiny):
    sub = json.loads((record_folder / "submission.json").read_text())
    logs = [pack.parse_log(tiny[k]["log"]) for k in ("s1", "s2")]
    bpbs = [lg["val_bpb"] for lg in logs]
    assert sub["seeds"] == [1, 2]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-12)
    assert sub["bytes_total"] == max(lg["total_bytes"] for lg in logs)
    assert sub["bytes_code"] == logs[0]["code_bytes"]
    assert sub["seed_results"]["1"]["val_bpb"] == logs[0]["val_bpb"]
    assert sub["seed_results"]["2"]["steps"] == 4
    comp = sub["compliance"]
    assert comp["artifact_under_16mb"] is True and comp["causality_audit_passed"] is True
    assert comp["training_under_600s"] is False and comp["eval_under_600s"] is False  # a CPU run
    assert comp["score_first_ttt"] is None and comp["no_val_data_in_training"] is None
    assert (
        sub["p_value"] == sub["significance"]["p_value"] and sub["significance"]["n_baseline"] == 3
    )
    applied = sub["significance_applied"]  # issue 25: the maintainers' rule beside the README's
    assert applied["alpha"] == 0.25 and applied["threshold"] == 0.0
    assert applied["baseline_values"] == sub["significance"]["baseline_values"]
    assert sub["track"] == "track_non_record_16mb" and sub["non_record"] is True


def test_record_readme_says_non_record_and_how_to_reproduce(record_folder):
    text = (record_folder / "README.md").read_text()
    assert "NON-RECORD SUBMISSION" in text
    assert "SEED=1 PRESET=smoke" in text and "EVAL_STRIDE=32" in text and "ITERATIONS=4" in text
    assert "python eval_bpb.py" in text and "pack.py check" in text
    if (record_folder / "loss_curve.png").is_file():
        assert (record_folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_refuses_a_cpu_run_without_non_record_and_writes_nothing(tiny, tmp_path, capsys):
    code, _, err = record(tmp_path, capsys, [tiny["s1"]["log"], tiny["s2"]["log"]])
    assert code == 1 and "--non-record" in err and "8xH100" in err
    assert not any(
        p.is_dir() and not p.name.startswith(".")
        for p in (tmp_path / "records").rglob("*")
        if p.parent.name in pack.TRACKS
    )


def test_record_refuses_mixed_configs(tiny, tmp_path, capsys):
    code, _, err = record(tmp_path, capsys, [tiny["s1"]["log"], tiny["ttt"]["log"]], "--non-record")
    assert code == 1 and "different configs" in err and "eval_mode" in err


def tampered_log(tiny, tmp_path, kind):
    text = tiny["s2"]["log"].read_text()
    if kind == "audit":
        text = text.replace("audit:causality passed:True", "audit:causality passed:False")
        text = text.replace('"causality": {"passed": true}', '"causality": {"passed": false}')
    else:
        size = pack.parse_log(tiny["s2"]["log"])["total_bytes"]
        text = text.replace(f'"total_bytes": {size}', '"total_bytes": 16000001')
    path = tmp_path / f"bad_{kind}.txt"
    path.write_text(text)
    shutil.copyfile(tiny["s2"]["events"], tmp_path / f"bad_{kind}.jsonl")
    return path


@pytest.mark.parametrize(
    "kind,why", [("audit", "audit causality failed"), ("size", "over the 16000000 budget")]
)
def test_record_refuses_failed_audit_or_over_budget_unless_non_record(
    tiny, tmp_path, capsys, kind, why
):
    logs = [tiny["s1"]["log"], tampered_log(tiny, tmp_path, kind)]
    code, _, err = record(tmp_path, capsys, logs)
    assert code == 1 and why in err
    code, out, _ = record(tmp_path, capsys, logs, "--non-record", name=f"Bad{kind}")
    assert code == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / f"2026-05-01_Bad{kind}"
    assert why in (folder / "README.md").read_text()


@pytest.mark.parametrize("tamper", ["val_bpb", "script", "swap"])
def test_check_catches_a_tampered_folder(record_folder, tmp_path, capsys, tamper):
    folder = tmp_path / "track_non_record_16mb" / record_folder.name
    shutil.copytree(record_folder, folder)
    if tamper == "val_bpb":
        sub = json.loads((folder / "submission.json").read_text())
        sub["val_bpb"] -= 0.001
        (folder / "submission.json").write_text(json.dumps(sub))
        expect = "val_bpb"
    elif tamper == "script":
        script = bytearray((folder / "train_gpt.py").read_bytes())
        script[script.index(b"import")] = ord("I")  # also breaks compilation
        (folder / "train_gpt.py").write_bytes(bytes(script))
        expect = "sha256"
    else:
        a, b = folder / "final_model_seed1.pga", folder / "final_model_seed2.pga"
        a.rename(folder / "tmp.pga")
        b.rename(a)
        (folder / "tmp.pga").rename(b)
        expect = "artifact"
    code, out, _ = run(["check", folder], capsys)
    assert code == 1 and "ok: False" in out
    assert any(expect in line for line in out.splitlines() if line.startswith("problem: ")), out


def test_check_refuses_a_log_that_counted_other_bytes_than_its_artifact(tiny):
    """Issue 24: the byte source of each seed is in its log's summary and its artifact header;
    a record folder whose two disagree is refused (the same check runs in `pack.py check`)."""
    art = str(tiny["s1"]["artifact"])
    log = pack.parse_log(str(tiny["s1"]["log"]))
    assert log["byte_source"] == {"kind": "tables"}
    assert pack._check_byte_source(1, art, log) == []
    forged = {**log, "byte_source": {"kind": "sidecar", "sha256": "ab" * 32, "files": 1,
                                     "manifest": "verified"}}  # fmt: skip
    problems = pack._check_byte_source(1, art, forged)
    assert problems and "the artifact header says {'kind': 'tables'}" in problems[0]
    assert pack.compliance_of([log, log])["bytes_counted"] == "tables"
    assert pack.compliance_of([log, forged])["bytes_counted"] is None


def test_size_refuses_a_script_whose_file_bytes_are_not_its_utf8_bytes(tmp_path, capsys):
    """Issue 24: the challenge counts len(code.encode("utf-8")); a latin-1 file is smaller on disk
    than that count, so pack.py counts both and refuses the difference."""
    write_container(tmp_path / "a.pga", b"\0" * 1000)
    script = tmp_path / "train_x.py"
    script.write_bytes(b"# coding: latin-1\nNAME = '\xe9t\xe9'\n")
    code, out, err = run(["size", tmp_path / "a.pga", "--script", script, "--json"], capsys)
    assert code == 1
    rep = json.loads(out)
    assert rep["code_bytes"] == len(script.read_bytes())
    assert rep["code_bytes_utf8"] == rep["code_bytes"] + 2
    assert "UTF-8 bytes" in err and err.count("\n") == 1
    script.write_bytes("NAME = '\u00e9t\u00e9'\n".encode("utf-8"))
    code, out, err = run(["size", tmp_path / "a.pga", "--script", script, "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["code_bytes_utf8"] == rep["code_bytes"]


RECORD_1855 = FIXTURES / "record_1.0611"  # the per-seed figures of the official 1.0611 folder


def test_significance_against_a_record_folder_prints_both_rules(tiny, capsys):
    """Issue 25: the other side read from a record folder (here the official #1855 figures),
    our CPU seed logs on this side; the README's rule and the applied one, side by side."""
    logs = [tiny["s1"]["log"], tiny["s2"]["log"]]
    code, out, err = run(["significance", "--new", *logs, "--against", RECORD_1855], capsys)
    assert code == 0, err
    assert "baseline_source: " in out and "submission.json (seed_results)" in out
    assert "baseline values: 2.31944212, 2.32239991, 2.32423994" in out
    assert "README: 0.005 nats, p < 0.01" in out and "applied: Welch, p < 0.25" in out
    assert out.count("not significant") == 2  # a CPU minute does not beat 1.0611
    code, out, _ = run(["significance", "--new", *logs, "--against", RECORD_1855, "--json"], capsys)
    res = json.loads(out)
    new = [pack.parse_log(str(p))["val_loss"] for p in logs]
    old = [2.31944212, 2.32239991, 2.32423994]
    t, df = welch_by_hand(new, [v - 0.005 for v in old])
    assert res["t_statistic"] == pytest.approx(t) and res["welch_df"] == pytest.approx(df)
    t0, _ = welch_by_hand(new, old)
    assert res["applied_t_statistic"] == pytest.approx(t0)
    assert res["applied_alpha"] == 0.25 and res["applied_threshold"] == 0.0


def test_the_two_rules_can_disagree(tmp_path, capsys):
    """0.002 nats better on every seed, tightly: the maintainers' rule (no margin, p < 0.25) says
    significant, the README's (0.005 nats, p < 0.01) does not."""
    folder = tmp_path / "rec"
    folder.mkdir()
    old = {"1": 2.3200, "2": 2.3210, "3": 2.3205}
    sub = {"seed_results": {s: {"val_loss": v} for s, v in old.items()}}
    (folder / "submission.json").write_text(json.dumps(sub))
    logs = []
    for seed, v in (("1", 2.3181), ("2", 2.3186), ("3", 2.3184)):
        path = tmp_path / f"new{seed}.log"
        path.write_text(f"final_int8_zlib_roundtrip_exact val_loss:{v:.8f} val_bpb:1.06\n")
        logs.append(path)
    code, out, err = run(["significance", "--new", *logs, "--against", folder, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["applied_significant"] and not res["significant"]


def test_significance_refuses_a_record_folder_it_cannot_read(tmp_path, capsys):
    (tmp_path / "submission.json").write_text('{"seed_results": {"1": {"val_loss": "x"}}}')
    code, _, err = run(
        ["significance", "--new", FIXTURES / "late_seed42.log", "--against", tmp_path], capsys
    )
    assert code == 2 and err.startswith("error: ") and "is not a number" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(
        ["significance", "--new", FIXTURES / "late_seed42.log", "--against", empty], capsys
    )
    assert code == 2 and "no submission.json seed_results" in err


def test_a_one_seed_record_has_no_standard_deviation(tiny, tmp_path, capsys):
    """Issue 25: a one-seed --non-record folder said `std 0.00000000`; one run says nothing of
    the spread: null in submission.json, "n/a" in the README, and the folder still checks."""
    code, out, err = record(tmp_path, capsys, [tiny["s1"]["log"]], "--non-record", name="One")
    assert code == 0, out + err
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-05-01_One"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb_std"] is None
    assert "std n/a (one seed)" in (folder / "README.md").read_text()
    code, out, _ = run(["check", folder], capsys)
    assert code == 0 and "ok: True" in out, out


def test_size_finds_the_script_the_header_names(tiny, record_folder, tmp_path, capsys):
    """Issue 25: `pack.py size` demanded --script though the header names the script and its
    sha256: it now finds it beside the artifact (a record folder) or in the checkout."""
    art = record_folder / "final_model_seed1.pga"
    code, out, err = run(["size", art, "--json", "--no-table"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["script"] == str(record_folder / "train_gpt.py") and rep["script_sha256_matches"]
    alone = tmp_path / "alone.pga"
    alone.write_bytes(art.read_bytes())
    header = pack.read_container(str(alone))["header"]
    found = (REPO / "train_gpt.py").is_file() and pack.sha256_file(
        str(REPO / "train_gpt.py")
    ) == header["script_sha256"]
    code, out, err = run(["size", alone, "--no-table"], capsys)
    if found:  # the checkout's own script wrote it
        assert code == 0, err
    else:
        assert code == 2 and "pass --script" in err and err.count("\n") == 1


def test_a_record_with_a_baseline_draws_both_sides_per_seed(record_folder):
    """Issue 25: the significance comparison as a picture, per-seed points of both sides, in the
    folder, named in its README and in its hash table."""
    pytest.importorskip("matplotlib")
    png = record_folder / "significance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    sub = json.loads((record_folder / "submission.json").read_text())
    assert sub["significance_plot"] is True and "significance.png" in sub["sha256"]
    assert (
        "![per-seed values of both sides](significance.png)"
        in (record_folder / "README.md").read_text()
    )
