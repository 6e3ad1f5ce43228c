"""The model contract between the shared blocks and each script (written once at the top of the
shared runtime block), and the one-place registries every tool reads: EVAL_MODES, QuantScheme."""

import pytest
from conftest import SCRIPTS, TINY_ENV, load_script


def edit_distance(a, b):
    """Levenshtein distance: insertions, deletions and substitutions each cost 1."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def misspelled_hooks(names, hooks):
    """Names within edit distance 2 of a hook that are not that hook exactly."""
    return sorted(
        f"{name} (did you mean {hook}?)"
        for name in names
        for hook in hooks
        if name not in hooks and edit_distance(name, hook) <= 2
    )


@pytest.fixture(scope="module", params=SCRIPTS)
def script(request):
    return load_script(request.param)


def test_every_required_name_is_defined(script):
    missing = []
    for dotted in script.MODEL_CONTRACT_REQUIRED:
        obj = script
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(dotted)
    assert not missing, f"{script.__name__} lacks {missing}"


def test_no_model_attribute_is_a_misspelled_hook(script):
    model = script.build_model(script.Hyperparameters.from_env(TINY_ENV))
    names = set(dir(model)) | set(dir(type(model)))
    assert misspelled_hooks(names, script.MODEL_HOOKS) == []


def test_the_misspelling_check_catches_a_near_miss(script):
    assert misspelled_hooks({"validation_probe", "blocks"}, script.MODEL_HOOKS) == [
        "validation_probe (did you mean validation_probes?)"
    ]


def test_model_hook_rejects_an_unknown_name(script):
    model = script.build_model(script.Hyperparameters.from_env(TINY_ENV))
    with pytest.raises(ValueError, match="set_train_progress"):
        script.model_hook(model, "set_train_progress")


def test_model_hook_gives_none_for_a_hook_the_model_lacks(script):
    class Bare:
        pass

    assert script.model_hook(Bare(), "validation_probes") is None


def test_control_tensors_match_whole_name_components(script):
    pattern = script.CONTROL_TENSOR_PATTERNS[0]
    assert script.is_control_tensor(f"blocks.0.{pattern}", script.CONTROL_TENSOR_PATTERNS)
    assert script.is_control_tensor(
        f"blocks.0.attn.{pattern}.weight", script.CONTROL_TENSOR_PATTERNS
    )
    assert not script.is_control_tensor(
        f"blocks.0.{pattern}_proj.weight", script.CONTROL_TENSOR_PATTERNS
    )
    assert not script.is_control_tensor(
        f"blocks.0.my{pattern}.weight", script.CONTROL_TENSOR_PATTERNS
    )


def test_a_name_merely_containing_gate_is_not_a_control_tensor(script):
    assert not script.is_control_tensor(
        "blocks.0.attn_gate_proj.weight", script.CONTROL_TENSOR_PATTERNS
    )
    assert not script.is_control_tensor(
        "blocks.0.mlp.gate_up.weight", script.CONTROL_TENSOR_PATTERNS
    )


def test_eval_modes_registry_names_functions_and_labels(script):
    modes = script.EVAL_MODES
    assert set(modes) == {"standard", "sliding", "ttt", "ttt_lora", "ttt_phased"}
    assert all(mode.name == name for name, mode in modes.items())
    assert modes["standard"].evaluate is script.eval_val
    assert modes["sliding"].evaluate is script.eval_val_sliding
    assert modes["ttt"].evaluate is script.eval_val_ttt
    assert modes["standard"].label == "final_int8_zlib_roundtrip"
    assert modes["sliding"].label == "final_sliding_window"
    assert modes["ttt"].label == "legal_ttt"
    assert modes["ttt_lora"].evaluate is script.eval_val_ttt_lora
    assert modes["ttt_phased"].evaluate is script.eval_val_ttt_phased
    assert modes["ttt_lora"].label == "quantized_ttt_lora"
    assert modes["ttt_phased"].label == "quantized_ttt_phased"


def test_eval_mode_outside_the_registry_is_rejected(script):
    with pytest.raises(ValueError, match="EVAL_MODE='beam'"):
        script.Hyperparameters.from_env({**TINY_ENV, "EVAL_MODE": "beam"})


@pytest.mark.parametrize("text", ["int4", "int5", "int6", "int7", "int8", "fp16", "fp32"])
def test_quant_scheme_parses_and_prints_back(script, text):
    scheme = script.QuantScheme.parse(text)
    assert str(scheme) == text
    assert scheme.kind == ("int" if text.startswith("int") else "float")
    assert scheme.bits == int(text[3:] if text.startswith("int") else text[2:])


@pytest.mark.parametrize("text", ["int3", "int9", "int", "fp8", "raw", "INT6", ""])
def test_quant_scheme_parse_error_names_the_text(script, text):
    with pytest.raises(ValueError, match=repr(text)):
        script.QuantScheme.parse(text)


def test_sha256_helpers_agree(script, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"parameter golf")
    assert script.file_sha256(path) == script.sha256_hex(b"parameter golf")
    assert len(script.sha256_hex(b"")) == 64
