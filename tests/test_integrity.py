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
