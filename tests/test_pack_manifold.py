"""pack.py on a per-group train_manifold.py artifact (issue 22). Its control tensors (route scales,
manifold biases, neighbour gates) are stored fp32 in the group `control.fp32`; pack.py used to keep
its own copy of the control patterns and would refuse the artifact. It now reads every artifact
through golf.container, the reader the scripts use, so `size` and a record folder's `check` pass."""

import json

import pytest

pytest.importorskip("torch")

from conftest import REPO, TINY_ENV, TINY_RUN, run_script
from test_pack import record, run


@pytest.fixture(scope="module")
def manifold_run(embedded, tmp_path_factory):
    """One tiny per-group manifold run: (log, artifact)."""
    logs = tmp_path_factory.mktemp("manifold_pergroup") / "logs"
    env = {**TINY_ENV, **TINY_RUN["train_manifold.py"], **embedded}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "COMPRESSOR": "pergroup",
            "SEED": "1",
            "RUN_ID": "manifold_pg",
            "LOG_DIR": str(logs),
        }
    )
    done = run_script("train_manifold.py", env, logs.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return logs / "manifold_pg.txt", logs / "manifold_pg.pga"


def test_size_reads_a_pergroup_manifold_artifact(manifold_run, capsys):
    _, artifact = manifold_run
    code, out, err = run(
        ["size", artifact, "--script", REPO / "train_manifold.py", "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["compressor"] == "pergroup"
    names = [g["name"] for g in report["groups"]]
    assert "control.fp32" in names, names
    assert report["script_sha256_matches"]
    assert report["total_bytes"] == report["artifact_bytes"] + report["code_bytes"]


def test_a_record_folder_of_pergroup_manifold_runs_passes_check(manifold_run, tmp_path, capsys):
    log, _ = manifold_run
    code, out, err = record(tmp_path, capsys, [log], "--non-record", name="TinyManifold")
    assert code == 0, out + err
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-05-01_TinyManifold"
    assert (folder / "train_manifold.py").is_file()
    code, out, err = run(["check", folder], capsys)
    assert code == 0, out + err
    assert "ok: True" in out
