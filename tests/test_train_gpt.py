"""Contract and foundation tests of the training scripts: env parsing, data validation, byte tables,
model behaviour at init, the official baseline state_dict, the artifact, distributed equivalence and
the end-to-end CPU smoke run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SCRIPTS, TINY_ENV, run_script, summary_of
from reference_baseline import baseline_loss, baseline_state_shapes, random_state


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def tiny_h(module, **overrides):
    env = {**TINY_ENV, **{k.upper(): str(v) for k, v in overrides.items()}}
    return module.Hyperparameters.from_env(env)


# --- import and hyperparameters -------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_import_has_no_side_effects(name, tmp_path):
    code = (
        f"import sys, os; sys.path.insert(0, {str(REPO)!r}); import importlib.util as u;"
        f"s = u.spec_from_file_location('m', {str(REPO / name)!r}); m = u.module_from_spec(s);"
        "s.loader.exec_module(m); import torch.distributed as d;"
        "assert not d.is_initialized(); print(sorted(os.listdir('.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_env_parsing_converts_types_and_presets(script):
    h = script.Hyperparameters.from_env(
        {
            "PRESET": "smoke",
            "ITERATIONS": "7",
            "MATRIX_LR": "0.5",
            "TIE_EMBEDDINGS": "0",
            "RUN_ID": "abc",
        }
    )
    assert (h.preset, h.iterations, h.matrix_lr, h.tie_embeddings, h.run_id) == (
        "smoke",
        7,
        0.5,
        False,
        "abc",
    )
    assert script.Hyperparameters.from_env({}).preset == "record"


@pytest.mark.parametrize(
    "name,value",
    [
        ("ITERATIONS", "ten"),
        ("MATRIX_LR", "fast"),
        ("TIE_EMBEDDINGS", "maybe"),
        ("ITERATIONS", "2.5"),
    ],
)
def test_env_parsing_rejects_bad_values_naming_the_variable(script, name, value):
    with pytest.raises(ValueError, match=name):
        script.Hyperparameters.from_env({name: value})


def test_unknown_preset_is_rejected(script):
    with pytest.raises(ValueError, match="PRESET"):
        script.Hyperparameters.from_env({"PRESET": "fastest"})


@pytest.mark.parametrize("world", ["3", "5", "16"])
def test_world_size_must_divide_8(script, world):
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        script.setup_runtime({"WORLD_SIZE": world, "RANK": "0"})


def test_grad_accum_keeps_eight_way_maths(script):
    for world in (1, 2, 4, 8):
        rt = script.setup_runtime({"WORLD_SIZE": str(world)})
        assert rt.grad_accum_steps * world == 8


# --- data -----------------------------------------------------------------------------------------


def test_shard_roundtrip(gpt, tmp_path):
    tokens = np.arange(1000) % 1024
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert (
        gpt.load_data_shard(str(tmp_path / "fineweb_train_000000.bin")).numpy().tolist()
        == tokens.tolist()
    )


@pytest.mark.parametrize(
    "kind,match",
    [
        ("magic", "bad magic"),
        ("version", "version"),
        ("truncated", "truncated"),
        ("short", "shorter than"),
    ],
)
def test_bad_shards_are_rejected_naming_the_file(gpt, tmp_path, kind, match):
    path = tmp_path / "fineweb_val_000000.bin"
    if kind == "magic":
        write_shard(path, [1, 2, 3], magic=123)
    elif kind == "version":
        write_shard(path, [1, 2, 3], version=7)
    elif kind == "truncated":
        write_shard(path, [1, 2, 3], count=10)
    else:
        path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=match) as err:
        gpt.load_data_shard(str(path))
    assert "fineweb_val_000000.bin" in str(err.value)


def test_missing_data_path_names_the_variable(gpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        gpt.shard_files(str(tmp_path / "nope"), "train")


def test_val_split_shorter_than_a_sequence_is_rejected(gpt, tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 7])
    with pytest.raises(ValueError, match="shorter than one sequence"):
        gpt.load_validation_tokens(str(tmp_path), 64)


def test_loader_gives_each_rank_a_disjoint_span(gpt, tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(20000) % 60000)
    loaders = [
        gpt.DistributedTokenLoader(str(tmp_path), r, 2, torch.device("cpu")) for r in range(2)
    ]
    (x0, y0), (x1, y1) = (ld.next_batch(1024, 64, 4) for ld in loaders)
    assert x0.shape == (2, 64) and torch.equal(x0.flatten()[1:], y0.flatten()[:-1])
    assert x1[0, 0].item() == 129  # rank 1 starts after rank 0's span of 128 + 1 tokens


def test_training_never_opens_validation_files(gpt, embedded, tmp_path, monkeypatch):
    opened = []
    real = gpt.load_data_shard
    monkeypatch.setattr(
        gpt, "load_data_shard", lambda p: opened.append(os.path.basename(p)) or real(p)
    )
    h = tiny_h(gpt, **embedded, iterations=3)
    rt = gpt.setup_runtime({})
    model = gpt.build_model(h)
    logger = gpt.RunLogger(str(tmp_path), "t", enabled=False)
    gpt.train_model(h, rt, model, logger, {})
    assert opened and all(name.startswith("fineweb_train_") for name in opened)


# --- tokenizer and byte tables --------------------------------------------------------------------


def test_tokenizer_with_wrong_vocab_is_rejected(gpt, embedded):
    with pytest.raises(ValueError, match="VOCAB_SIZE=2048"):
        gpt.load_tokenizer(embedded["TOKENIZER_PATH"], 2048)


def test_lut_bytes_equal_decoded_utf8_on_real_documents(gpt, real_sp1024):
    sp = gpt.load_tokenizer(real_sp1024["TOKENIZER_PATH"], 1024)
    tokens = gpt.load_validation_tokens(real_sp1024["DATA_PATH"], 64)
    luts = gpt.build_sentencepiece_luts(sp, 1024, torch.device("cpu"))
    total = int(gpt.target_bytes(tokens[:-1], tokens[1:], luts).sum())
    docs = (tokens == 1).nonzero().flatten().tolist() + [tokens.numel()]
    decoded = sum(
        len(sp.decode(tokens[a + 1 : b].tolist()).encode("utf-8"))
        for a, b in zip(docs[:-1], docs[1:])
    )
    assert total == decoded == 1_489_418  # the figure ../shared/data/README.md states
    assert gpt.audit_bytes(sp, tokens, luts)["passed"]


def test_byte_fallback_tokens_count_one_byte(gpt, real_sp1024):
    sp = gpt.load_tokenizer(real_sp1024["TOKENIZER_PATH"], 1024)
    base, _, boundary = gpt.build_sentencepiece_luts(sp, 1024, torch.device("cpu"))
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(int(base[i]) == 1 for i in byte_ids)
    assert bool(boundary[1]) and int(base[1]) == 0


# --- model ----------------------------------------------------------------------------------------


def test_loss_at_init_is_near_ln_vocab(script):
    h = tiny_h(script)
    torch.manual_seed(0)
    model = script.build_model(h)
    x = torch.randint(0, h.vocab_size, (4, 64))
    loss = model(x, torch.randint(0, h.vocab_size, (4, 64))).item()
    assert abs(loss - math.log(h.vocab_size)) < 0.1


def test_a_tiny_batch_overfits(script, gpt):
    h = tiny_h(script)
    torch.manual_seed(0)
    model = script.build_model(h)
    matrices, adam_groups = (
        script.param_groups(model, h)
        if hasattr(script, "param_groups")
        else gpt.param_groups(model, h)
    )
    opts = [script.Muon(matrices, lr=0.02, momentum=0.9), torch.optim.Adam(adam_groups, lr=0.01)]
    x = torch.randint(0, h.vocab_size, (2, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(60):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert loss.item() < 0.25 * first


def test_official_baseline_state_dict_loads_strictly_and_matches_the_reference(gpt):
    h = gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    model = gpt.build_model(h)
    shapes = baseline_state_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == 17_059_912
    state = random_state(shapes, seed=3)
    model.load_state_dict(state, strict=True)
    x = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x, y).item()
        ref = baseline_loss(state, x, y).item()
    assert abs(ours - ref) < 1e-4


def test_causality_audit_passes_on_the_real_model(script):
    h = tiny_h(script)
    result = script.audit_causality(script.build_model(h), 64, h.vocab_size)
    assert result["passed"], result["failures"]


# --- artifact -------------------------------------------------------------------------------------


def test_artifact_roundtrip_is_exact_and_deterministic(script, embedded, tmp_path):
    h = tiny_h(script, **embedded)
    torch.manual_seed(0)
    model = script.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    a, b = tmp_path / "a.pga", tmp_path / "b.pga"
    sizes = script.save_artifact(model, h, str(a))
    script.save_artifact(model, h, str(b))
    assert a.read_bytes() == b.read_bytes()
    assert sizes["artifact_bytes"] == a.stat().st_size
    assert sizes["code_bytes"] == len((REPO / f"{script.__name__}.py").read_bytes())
    assert sizes["total_bytes"] == sizes["artifact_bytes"] + sizes["code_bytes"]
    loaded, h2 = script.load_artifact(str(a))
    header, raw = script.read_artifact(str(a))
    expected = script.dequantize_entries(header["tensors"], raw)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert h2.model_dim == h.model_dim and h2.num_layers == h.num_layers


def test_artifact_from_another_script_version_is_refused(gpt, embedded, tmp_path):
    h = tiny_h(gpt, **embedded)
    path = tmp_path / "a.pga"
    gpt.save_artifact(gpt.build_model(h), h, str(path))
    data = bytearray(path.read_bytes())
    header, offset = gpt.read_artifact_header(str(path))
    header["script_sha256"] = "0" * 64
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    payload = bytes(data[offset:])
    gpt.write_artifact(str(path), header, payload)
    with pytest.raises(ValueError, match="not by this script"):
        gpt.load_artifact(str(path))
    assert len(head) > 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_damaged_artifacts_are_refused(gpt, embedded, tmp_path, damage):
    h = tiny_h(gpt, **embedded)
    path = tmp_path / "a.pga"
    gpt.save_artifact(gpt.build_model(h), h, str(path))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-50] ^= 0x10
    else:
        data = b"PK\x03\x04" + bytes(data[4:])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="a.pga"):
        gpt.load_artifact(str(path))


# --- runs -----------------------------------------------------------------------------------------


def test_missing_data_path_exits_with_one_line_and_no_artifact(embedded, tmp_path):
    out = run_script(
        "train_gpt.py",
        {
            **TINY_ENV,
            **embedded,
            "DATA_PATH": str(tmp_path / "none"),
            "LOG_DIR": str(tmp_path),
            "RUN_ID": "x",
        },
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "DATA_PATH" in out.stderr
    assert not list(tmp_path.glob("*.pga"))


def test_non_numeric_env_exits_with_one_line(tmp_path):
    out = run_script("train_gpt.py", {"ITERATIONS": "many"}, cwd=tmp_path)
    assert (
        out.returncode == 2
        and out.stderr.strip() == "error: ITERATIONS='many': expected an integer"
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_cpu_smoke_run_end_to_end(name, embedded, tmp_path):
    out = run_script(
        name, {**TINY_ENV, **embedded, "LOG_DIR": str(tmp_path), "RUN_ID": "smoke"}, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = (tmp_path / "smoke.txt").read_text()
    assert log.startswith((REPO / name).read_text()[:200])  # the source comes first
    summary = summary_of(log)
    assert summary["valid"] and summary["eval_mode"] == "sliding"
    assert os.path.getsize(summary["artifact_path"]) == summary["artifact_bytes"]
    assert summary["total_bytes"] == summary["artifact_bytes"] + summary["code_bytes"]
    assert summary["val_bpb"] < 4.5 and all(a["passed"] for a in summary["audits"].values())
    assert (
        "final_int8_zlib_roundtrip_exact val_loss:" in log
        and "Total submission size int8+zlib:" in log
    )
    events = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    status = json.loads((tmp_path / "smoke.status.json").read_text())
    assert status["state"] == "done" and status["val_bpb"] == summary["val_bpb"]


def test_two_process_gloo_run_matches_one_process_with_accumulation(embedded, tmp_path):
    env = {
        **TINY_ENV,
        **embedded,
        "ITERATIONS": "3",
        "EVAL_MODE": "standard",
        "LOG_DIR": str(tmp_path),
    }
    one = run_script("train_gpt.py", {**env, "RUN_ID": "one", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    two = run_script("train_gpt.py", {**env, "RUN_ID": "two"}, cwd=tmp_path, nproc=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    s1, s2 = (summary_of((tmp_path / f"{r}.txt").read_text()) for r in ("one", "two"))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert abs(s1["pre_quant_val_bpb"] - s2["pre_quant_val_bpb"]) < 1e-4
    assert abs(s1["val_bpb"] - s2["val_bpb"]) < 1e-3


def test_training_with_the_shard_mixer_logs_its_weights(gpt, embedded, tmp_path):
    tokens = gpt.load_data_shard(
        os.path.join(embedded["DATA_PATH"], "fineweb_train_000000.bin")
    ).numpy()
    for i in range(3):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", tokens[i * 50000 : (i + 1) * 50000])
    h = tiny_h(
        gpt,
        data_path=str(tmp_path),
        iterations=6,
        data_mixer=1,
        mixer_phase_steps=2,
        mixer_heldout_tokens=4096,
        log_dir=str(tmp_path),
    )
    logger = gpt.RunLogger(str(tmp_path), "mix", enabled=True)
    gpt.train_model(h, gpt.setup_runtime({}), gpt.build_model(h), logger, {})
    events = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    weights = [e["weights"] for e in events if e["event"] == "mixer"]
    assert len(weights) == 3 and all(abs(sum(w) - 1) < 1e-6 and len(w) == 3 for w in weights)


def test_a_bit_flip_in_the_artifact_header_is_caught(gpt, embedded, tmp_path):
    h = tiny_h(gpt, **embedded)
    path = tmp_path / "a.pga"
    gpt.save_artifact(gpt.build_model(h), h, str(path))
    data = path.read_bytes()
    i = data.index(b'"model_dim":64') + len(b'"model_dim":6')
    path.write_bytes(data[:i] + b"5" + data[i + 1 :])  # model_dim 64 -> 65: still valid JSON
    with pytest.raises(ValueError, match="header is corrupted"):
        gpt.load_artifact(str(path))
