"""pack.py on a per-group train_manifold.py artifact (issue 22). Its control tensors (route scales,
manifold biases, neighbour gates) are stored fp32 in the group `control.fp32`; pack.py used to keep
its own copy of the control patterns and would refuse the artifact. It now reads every artifact
through golf.container, the reader the scripts use, so `size` and a record folder's `check` pass."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from conftest import REPO, TINY_ENV

import pack

MANIFOLD_TINY = {
    "MODEL_DIM": "32",
    "MANIFOLD_MODES": "16",
    "MANIFOLD_COORDS": "4",
    "ROUTE_TOPK": "8",
    "MANIFOLD_PHYSICS_STEPS": "5",
    "MANIFOLD_PHYSICS_DIM": "16",
    "MANIFOLD_PAIRS": "400",
}


@pytest.fixture(scope="module")
def manifold_run(embedded, tmp_path_factory):
    """One tiny per-group manifold run: (log, artifact)."""
    logs = tmp_path_factory.mktemp("manifold_pergroup") / "logs"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY_ENV)
    env.update(MANIFOLD_TINY)
    env.update(embedded)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "COMPRESSOR": "pergroup",
            "SEED": "1",
            "RUN_ID": "manifold_pg",
            "LOG_DIR": str(logs),
        }
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "train_manifold.py")],
        cwd=logs.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return logs / "manifold_pg.txt", logs / "manifold_pg.pga"


def run(argv, capsys):
    code = pack.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


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
    code, out, err = run(
        [
            "record",
            log,
            "--name",
            "TinyManifold",
            "--author",
            "Test Author",
            "--github-id",
            "tester",
            "--date",
            "2026-05-01",
            "--out",
            tmp_path / "records",
            "--non-record",
        ],
        capsys,
    )
    assert code == 0, out + err
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-05-01_TinyManifold"
    assert (folder / "train_manifold.py").is_file()
    code, out, err = run(["check", folder], capsys)
    assert code == 0, out + err
    assert "ok: True" in out
