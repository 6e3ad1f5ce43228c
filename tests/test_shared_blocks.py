"""The shared blocks are one text in three places."""

import importlib.util
import shutil

from conftest import REPO

spec = importlib.util.spec_from_file_location("sync_blocks", REPO / "scripts" / "sync_blocks.py")
sync_blocks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_blocks)

EXPECTED_BLOCKS = {"hparams", "runtime", "data", "bpb", "optim", "quant", "eval", "train"}


def test_canonical_script_has_every_shared_block():
    assert set(sync_blocks.blocks((REPO / "train_gpt.py").read_text())) == EXPECTED_BLOCKS


def test_shared_blocks_are_identical_across_scripts():
    assert sync_blocks.drift(REPO) == []


def test_drift_is_detected_and_resynced(tmp_path):
    shutil.copy(REPO / "train_gpt.py", tmp_path / "train_gpt.py")
    copy = (REPO / "train_gpt.py").read_text().replace("def dist_max(t):", "def dist_max(t):  # edited")
    (tmp_path / "train_hydra.py").write_text(copy)
    assert sync_blocks.drift(tmp_path) == ["train_hydra.py: shared block runtime differs from train_gpt.py"]
    assert sync_blocks.sync(tmp_path) == ["train_hydra.py"]
    assert sync_blocks.drift(tmp_path) == []
