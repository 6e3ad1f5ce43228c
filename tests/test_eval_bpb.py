"""Specification of eval_bpb.py: it reproduces a training run's logged figures from the artifact on
disk (each eval mode), re-scores the official int8 baseline format to the figure an independent
reference computes, and refuses bad input with one line (exit 2) or a failed audit with exit 3.

The tiny runs are shared with test_pack.py (tests/fixtures/pack/runs.py). Training runs and
re-scores use one CPU thread, so both sides do the same float operations in the same order.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures" / "pack"
for p in (REPO, TESTS, FIXTURES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import reference_int8  # noqa: E402
import runs  # noqa: E402

import eval_bpb  # noqa: E402

EXACT = re.compile(r"^(\S+)_exact val_loss:(\S+) val_bpb:(\S+)", re.M)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(request):
    """Two seeds of one tiny sliding-window config, and a TTT run (tests/fixtures/pack/runs.py)."""
    return runs.tiny_runs(request)


def rescore(capsys, *argv, env=None):
    code = eval_bpb.main([str(a) for a in argv], env={} if env is None else env)
    out, err = capsys.readouterr()
    return code, out, err


def logged_exact(log_path):
    return {
        m[1]: (m[2], m[3])
        for m in EXACT.finditer(Path(log_path).read_text().split("=" * 100, 1)[1])
    }


@pytest.mark.parametrize(
    "run,mode,label",
    [
        ("s1", "standard", "final_int8_zlib_roundtrip"),
        ("s1", None, "final_sliding_window"),
        ("ttt", None, "legal_ttt"),
        ("ttt", "standard", "final_int8_zlib_roundtrip"),
    ],
)
def test_rescore_reproduces_the_logged_figure(tiny, capsys, run, mode, label):
    r = tiny[run]
    code, out, _ = rescore(capsys, r["artifact"], *(["--mode", mode] if mode else []))
    assert code == 0, out
    got = {m[1]: (m[2], m[3]) for m in EXACT.finditer(out)}
    assert got[label] == logged_exact(r["log"])[label]
    assert (
        "audit:causality passed:True" in out
        and "audit:bytes passed:True" in out
        and "valid: True" in out
    )


def test_rescore_of_this_checkout_runs_the_package_not_the_bundle(tiny, capsys, monkeypatch):
    """Issue 22: the artifact binds this checkout's train_gpt.py, so its code comes from the golf
    package it is generated from (golf.models' registry); the bundle file is never imported."""

    def no_import(path):
        raise AssertionError(f"eval_bpb imported {path}")

    monkeypatch.setattr(eval_bpb, "import_script", no_import)
    r = tiny["s1"]
    code, out, _ = rescore(capsys, r["artifact"])
    assert code == 0, out
    got = {m[1]: (m[2], m[3]) for m in EXACT.finditer(out)}
    label = "final_sliding_window"
    assert got[label] == logged_exact(r["log"])[label]


def test_rescore_command_line_json(tiny):
    r = tiny["s2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval_bpb.py"),
            str(r["artifact"]),
            "--json",
            "--data-path",
            str(r["data"]),
            "--tokenizer-path",
            str(r["tokenizer"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=r["ws"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    summary = json.loads(Path(r["log"]).read_text().rsplit("summary: ", 1)[1])
    assert res["mode"] == "sliding" and res["valid"] is True
    assert f"{res['val_bpb']:.8f}" == f"{summary['val_bpb']:.8f}"
    assert f"{res['val_loss']:.8f}" == f"{summary['val_loss']:.8f}"
    assert (res["tokens"], res["bytes"]) == (summary["tokens"], summary["bytes"])
    assert set(res["audits"]) == {"causality", "bytes", "score_first"}
    assert res["total_bytes"] == summary["total_bytes"]


def test_eval_env_overrides_apply_to_the_artifact_hyperparameters(tiny, capsys):
    code, out, _ = rescore(
        capsys,
        tiny["s1"]["artifact"],
        "--json",
        "--max-tokens",
        "2048",
        env={"EVAL_STRIDE": "16", "NUM_LAYERS": "7"},
    )
    res = json.loads(out)
    assert code == 0 and res["mode"] == "sliding" and res["tokens"] == 2048 and res["seq_len"] == 64
    code, _, err = rescore(capsys, tiny["s1"]["artifact"], env={"EVAL_STRIDE": "128"})
    assert code == 2 and "EVAL_STRIDE" in err


# The official baseline format


def baseline_h(tg, **over):
    env = {
        "PRESET": "baseline",
        "NUM_LAYERS": "2",
        "MODEL_DIM": "256",
        "NUM_HEADS": "4",
        "NUM_KV_HEADS": "2",
        "MLP_MULT": "2",
        **over,
    }
    return tg.Hyperparameters.from_env(env)


@pytest.fixture(scope="module")
def official(tiny, tmp_path_factory):
    """A tiny baseline-architecture model with random weights,
    written by the reference int8 writer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt_snapshot", tiny["s1"]["script"])
    tg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tg
    spec.loader.exec_module(tg)
    h = baseline_h(tg)
    torch.manual_seed(0)
    model = tg.build_model(h)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05 if name != "tok_emb.weight" else 0.5)
    path = tmp_path_factory.mktemp("official") / "final_model.int8.ptz"
    obj = reference_int8.write_ptz(model.state_dict(), path)
    assert set(obj["quantized"]) >= {"tok_emb.weight", "blocks.0.mlp.fc.weight"}
    assert obj["passthrough"]["blocks.0.attn.c_q.weight"].dtype == torch.float16
    assert obj["passthrough"]["blocks.0.attn.q_gain"].dtype == torch.float32
    return {"path": path, "obj": obj, "tg": tg}


def reference_score(official, tiny, **over):
    tg = official["tg"]
    h = baseline_h(tg, **over)
    model = tg.build_model(h)
    model.load_state_dict(reference_int8.dequantize(official["obj"]), strict=True)
    sp = tg.load_tokenizer(str(tiny["s1"]["tokenizer"]), h.vocab_size)
    luts = tg.build_sentencepiece_luts(sp, h.vocab_size, torch.device("cpu"))
    val = tg.load_validation_tokens(str(tiny["s1"]["data"]), h.train_seq_len)
    return tg.eval_val(h, model.eval(), val, luts)


@pytest.mark.parametrize("env", [{}, {"TRAIN_SEQ_LEN": "256"}])
def test_official_int8_rescores_to_the_reference_figure(official, tiny, capsys, env):
    ref = reference_score(official, tiny, **env)
    code, out, _ = rescore(
        capsys,
        official["path"],
        "--json",
        "--data-path",
        tiny["s1"]["data"],
        "--tokenizer-path",
        tiny["s1"]["tokenizer"],
        "--script",
        tiny["s1"]["script"],
        env=env,
    )
    res = json.loads(out)
    assert code == 0 and res["format"] == "int8_clean_per_row_v1" and res["mode"] == "standard"
    assert res["inferred"] == {
        "vocab_size": 1024,
        "model_dim": 256,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "mlp_mult": 2.0,
        "tie_embeddings": True,
    }
    assert res["train_seq_len"] == int(env.get("TRAIN_SEQ_LEN", 1024))
    assert (
        f"{res['val_loss']:.8f} {res['val_bpb']:.8f}"
        == f"{ref['val_loss']:.8f} {ref['val_bpb']:.8f}"
    )
    assert res["tokens"] == ref["tokens"] and res["bytes"] == ref["bytes"]


# Refusals: one line on stderr, exit 2 (bad input) or 3 (audit failed)


def refused(capsys, *argv, env=None):
    code, out, err = rescore(capsys, *argv, env=env)
    assert code == 2, out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_truncated_and_bit_flipped_artifacts_are_refused(tiny, official, tmp_path, capsys):
    blob = Path(tiny["s1"]["artifact"]).read_bytes()
    cases = {"half.pga": blob[: len(blob) // 2], "head.pga": blob[:40], "flip.pga": bytearray(blob)}
    cases["flip.pga"][len(blob) - 1000] ^= 0x04
    ptz = Path(official["path"]).read_bytes()
    cases["half.ptz"] = ptz[: len(ptz) // 2]
    cases["flip.ptz"] = bytearray(ptz)
    cases["flip.ptz"][len(ptz) // 2] ^= 0x01
    cases["notes.txt"] = b"hello, this is not a model\n"
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(bytes(data))
        err = refused(
            capsys,
            path,
            "--script",
            tiny["s1"]["script"],
            "--data-path",
            tiny["s1"]["data"],
            "--tokenizer-path",
            tiny["s1"]["tokenizer"],
        )
        assert str(path) in err or "artifact" in err, (name, err)
    assert "truncated or corrupted" in refused(
        capsys, tmp_path / "flip.pga", "--script", tiny["s1"]["script"]
    )


class Bomb:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tiny, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plain = zlib.compress(
        pickle.dumps({"__quant_format__": "int8_clean_per_row_v1", "x": Bomb(marker)}), 9
    )
    buf = io.BytesIO()
    torch.save(
        {"__quant_format__": "int8_clean_per_row_v1", "quantized": {}, "x": Bomb(marker)}, buf
    )
    for name, data in (("plain.ptz", plain), ("torchsave.ptz", zlib.compress(buf.getvalue(), 9))):
        (tmp_path / name).write_bytes(data)
        err = refused(
            capsys,
            tmp_path / name,
            "--data-path",
            tiny["s1"]["data"],
            "--tokenizer-path",
            tiny["s1"]["tokenizer"],
        )
        assert "refused" in err or "unreadable" in err
    assert not marker.exists()


def test_wrong_tokenizer_is_refused(tiny, official, tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(Path(tiny["s1"]["tokenizer"]).read_bytes() + b"\0")
    err = refused(capsys, tiny["s1"]["artifact"], "--tokenizer-path", other)
    assert "TOKENIZER_PATH" in err and "sha256" in err
    sp8192 = runs.SHARED / "tokenizers" / "fineweb_8192_bpe.model"
    if sp8192.is_file():
        # the official format has no tokenizer hash: the vocabulary size must agree
        err = refused(
            capsys,
            official["path"],
            "--data-path",
            tiny["s1"]["data"],
            "--tokenizer-path",
            sp8192,
            "--script",
            tiny["s1"]["script"],
        )
        assert "8192" in err and "VOCAB_SIZE=1024" in err


def test_mismatching_script_is_refused(tiny, tmp_path, capsys, monkeypatch):
    edited = Path(tiny["s1"]["script"]).read_bytes() + b"\n# edited\n"
    (tmp_path / "train_gpt.py").write_bytes(edited)
    assert "does not match" in refused(
        capsys, tiny["s1"]["artifact"], "--script", tmp_path / "train_gpt.py"
    )
    folder = tmp_path / "record"  # an artifact beside an edited copy of its script
    folder.mkdir()
    (folder / "train_gpt.py").write_bytes(edited)
    (folder / "run.pga").write_bytes(Path(tiny["s1"]["artifact"]).read_bytes())
    monkeypatch.chdir(folder)
    assert "does not match" in refused(capsys, folder / "run.pga")


def test_failed_causality_audit_exits_3_with_score_invalid(tiny, tmp_path, capsys):
    leaky = tmp_path / "train_leaky.py"
    leaky.write_text(
        Path(tiny["s1"]["script"]).read_text() + "\n\n_honest_logits = GPT.forward_logits\n\n\n"
        "def _leaky_logits(self, input_ids):\n    out = _honest_logits(self, input_ids)\n"
        "    return out + 0.5 * torch.roll(out, -1, dims=1)\n\n\n"
        "GPT.forward_logits = _leaky_logits\n"
    )
    mod = eval_bpb.import_script(str(leaky))
    h = mod.Hyperparameters.from_env(
        {
            "PRESET": "smoke",
            "NUM_LAYERS": "1",
            "MODEL_DIM": "32",
            "NUM_HEADS": "2",
            "NUM_KV_HEADS": "1",
            "TRAIN_SEQ_LEN": "64",
            "TRAIN_BATCH_TOKENS": "4096",
            "EVAL_MODE": "standard",
            "DATA_PATH": str(tiny["s1"]["data"]),
            "TOKENIZER_PATH": str(tiny["s1"]["tokenizer"]),
        }
    )
    torch.manual_seed(0)
    mod.save_artifact(mod.build_model(h), h, str(tmp_path / "leaky.pga"))
    # a script outside the checkout runs only when trusted explicitly (issue 13)
    code, out, _ = rescore(capsys, tmp_path / "leaky.pga", "--trust-script", leaky)
    assert code == 3
    assert (
        "audit:causality passed:False" in out and "score INVALID" in out and "valid: False" in out
    )
