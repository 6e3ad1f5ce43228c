"""Issue 25: seeds to a checked record folder in one command (scripts/record_run.sh): each seed
trained with torchrun, the folder assembled by pack.py record and checked by pack.py check."""

import json
import os
import subprocess
import sys

from conftest import REPO, TINY_ENV


def test_two_tiny_seeds_become_a_checked_record_folder(embedded, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY_ENV)
    env.update(embedded)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "SEEDS": "1 2",
            "NPROC": "1",
            "PYTHON": sys.executable,
            "LOG_DIR": str(tmp_path / "logs"),
            "RUN_TAG": "tiny",
        }
    )
    out = tmp_path / "records"
    args = ["--author", "Test Author", "--github-id", "tester", "--date", "2026-05-01"]
    args += ["--out", str(out), "--non-record", "--blurb", "Two tiny CPU seeds."]
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "record_run.sh"), "Tiny", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    folder = out / "track_non_record_16mb" / "2026-05-01_Tiny"
    assert "ok: True" in done.stdout
    assert f"record_run: verdict: {folder} is consistent" in done.stdout
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == [1, 2]
    assert (tmp_path / "logs" / "tiny_s1.txt").is_file()


def test_a_missing_name_is_a_usage_error():
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "record_run.sh"), "--author", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: usage:")
