"""Bad artifacts: truncated, bit-flipped, forged (the attacker recomputes the header checksum),
bombs, pickles, and trojaned scripts. Each is refused with one line naming the file and the field (a
ValueError from the reader, exit 2 from eval_bpb.py), quickly, without running foreign code and
without leaving files.

The artifacts are made once per session from a tiny model (no training).
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
zstandard = pytest.importorskip("zstandard")

from conftest import REPO, TINY_ENV  # noqa: E402

import eval_bpb  # noqa: E402

BOMB_BYTES = 64 << 20  # what each bomb inflates to; the tiny artifact's raw payload is ~100 KB


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def good(gpt, embedded, tmp_path_factory):
    """A valid tiny artifact of this checkout's train_gpt.py: {path, blob, header, payload}."""
    env = {**TINY_ENV, **embedded, "COMPRESSOR": "zlib", "EVAL_MODE": "standard"}
    h = gpt.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "good.pga"
    gpt.save_artifact(gpt.build_model(h), h, str(path))
    header, offset = gpt.read_artifact_header(str(path))
    blob = path.read_bytes()
    return {"path": path, "blob": blob, "header": header, "payload": blob[offset:]}


@pytest.fixture
def no_temp_left(tmp_path, monkeypatch):
    """Points tempfile at a fresh folder and checks it is empty afterwards."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    assert list(tmp.iterdir()) == []


def forge(gpt, good, path, change, payload=None):
    """The good artifact with its header changed by change(header); the checksum is recomputed, as
    an attacker would."""
    header = json.loads(json.dumps(good["header"]))
    header.pop("header_sha256")
    payload = good["payload"] if payload is None else payload
    header["payload_bytes"] = len(payload)
    header["payload_sha256"] = gpt.sha256_hex(payload)
    change(header)
    gpt.write_artifact(str(path), header, payload)
    return path


def refused(gpt, path, *words):
    """load_artifact raises one line naming the file and each of words."""
    with pytest.raises(ValueError) as info:
        gpt.load_artifact(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def cli_refused(capsys, *argv):
    code = eval_bpb.main([str(a) for a in argv], env={})
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def only(folder, *names):
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(names)


# --- damaged --------------------------------------------------------------------------------------


def test_truncated_and_bit_flipped_artifacts(gpt, good, tmp_path, capsys):
    blob = good["blob"]
    head_end = len(blob) - len(good["payload"])
    cases = {
        "short.pga": (blob[:10], "too short"),
        "half.pga": (blob[: len(blob) // 2], "truncated"),
        "cut.pga": (blob[:-100], "truncated"),
        "payload_flip.pga": (blob[:-500] + bytes([blob[-500] ^ 0x04]) + blob[-499:], "corrupted"),
    }
    i = blob.index(b'"model_dim":64') + len(b'"model_dim":6')
    cases["header_flip.pga"] = (blob[:i] + b"5" + blob[i + 1 :], "header is corrupted")
    assert i < head_end
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(gpt, tmp_path / name, words)
        err = cli_refused(capsys, tmp_path / name)
        assert str(tmp_path / name) in err
    only(tmp_path, *cases)


def test_header_without_checksum_is_refused(gpt, good, tmp_path):
    header = {k: v for k, v in good["header"].items() if k != "header_sha256"}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path = tmp_path / "nosum.pga"
    prefix = gpt.ARTIFACT_PREFIX.pack(gpt.ARTIFACT_MAGIC, gpt.ARTIFACT_VERSION, len(head))
    path.write_bytes(prefix + head + good["payload"])
    refused(gpt, path, "header_sha256", "mandatory")


def test_pickle_where_our_format_is_expected_never_runs(gpt, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pga"
    path.write_bytes(pickle.dumps(Evil(marker)))
    refused(gpt, path, "not a Parameter Golf artifact")
    assert "not a zlib-compressed" in cli_refused(capsys, path)  # read as an official .ptz
    assert not marker.exists()
    only(tmp_path, "model.pga")


# --- forged headers (valid checksum) --------------------------------------------------------------


def _set(field, value):
    def change(header):
        header[field] = value

    return change


def _tensor(i, field, value):
    def change(header):
        header["tensors"][i][field] = value

    return change


def _hparam(field, value):
    def change(header):
        header["hparams"][field] = value

    return change


FORGED = {
    "traversal_script": (_set("script", "../../evil.py"), ("script", "../../evil.py")),
    "folder_script": (_set("script", "sub/train_gpt.py"), ("script",)),
    "not_python_script": (_set("script", "train_gpt.sh"), ("script",)),
    "unknown_dtype": (_tensor(0, "dtype", "complex64"), ("dtype", "complex64")),
    "dtype_not_a_string": (_tensor(1, "dtype", ["float32"]), ("dtype",)),
    "unknown_scheme": (_tensor(0, "scheme", "int3"), ("int3",)),
    "scheme_not_a_string": (_tensor(0, "scheme", {"int": 8}), ("scheme",)),
    "name_not_a_string": (_tensor(0, "name", 7), ("name",)),
    "entry_not_an_object": (None, ("tensors[0]",)),
    "offset_outside_payload": (None, ("beyond raw_bytes",)),
    "huge_shape": (_tensor(0, "shape", [1 << 20, 1 << 20]), ("shape", "elements")),
    "negative_dim": (_tensor(0, "shape", [-1, 64]), ("shape",)),
    "deep_rank": (_tensor(0, "shape", [1] * 20), ("shape",)),
    "duplicate_name": (None, ("name",)),
    "overlap": (None, ("overlaps",)),
    "negative_raw_bytes": (_set("raw_bytes", -1), ("raw_bytes",)),
    "absurd_raw_bytes": (_set("raw_bytes", 1 << 40), ("raw_bytes",)),
    "raw_bytes_not_shapes": (None, ("raw_bytes", "shapes imply")),
    "unknown_hparam": (_hparam("evil", 1), ("hparams.evil",)),
    "hparam_type": (_hparam("num_heads", "2"), ("hparams.num_heads",)),
    "hparam_bool_for_int": (_hparam("num_layers", True), ("hparams.num_layers",)),
    "hparam_nan": (_hparam("matrix_lr", float("nan")), ("hparams.matrix_lr",)),
    "hparam_invalid": (_hparam("model_dim", 63), ("MODEL_DIM",)),
    "run_only_hparam": (_hparam("artifact_path", "/tmp/x"), ("hparams.artifact_path",)),
    "no_format": (_set("format", "other"), ("format",)),
    "compressor": (_set("compressor", "brotli"), ("compressor", "brotli")),
}


def _special(name, header):
    tensors = header["tensors"]
    if name == "entry_not_an_object":
        tensors[0] = "x"
    elif name == "duplicate_name":
        tensors[1]["name"] = tensors[0]["name"]
    elif name == "overlap":
        tensors[1]["data"] = [tensors[0]["data"][0], tensors[1]["data"][1]]
    elif name == "offset_outside_payload":
        tensors[-1]["data"] = [header["raw_bytes"] + 10, tensors[-1]["data"][1]]
    elif name == "raw_bytes_not_shapes":
        header["raw_bytes"] += 4


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_header_is_refused_before_anything_runs(gpt, good, tmp_path, case):
    change, words = FORGED[case]
    path = forge(gpt, good, tmp_path / f"{case}.pga", change or (lambda h: _special(case, h)))
    refused(gpt, path, *words)
    only(tmp_path, f"{case}.pga")


def test_forged_headers_exit_2_on_the_command_line(gpt, good, tmp_path, capsys):
    for case in ("traversal_script", "unknown_dtype", "huge_shape", "negative_raw_bytes"):
        path = forge(gpt, good, tmp_path / f"{case}.pga", FORGED[case][0])
        err = cli_refused(capsys, path)
        assert str(path) in err and FORGED[case][1][0] in err, err


# --- bombs ----------------------------------------------------------------------------------------


def _zeros_stream(compressor, n=BOMB_BYTES):
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(n // len(chunk))]
    return b"".join(parts) + compressor.flush()


def bomb_payload(name):
    if name == "zstd":  # the frame declares its content size: one-shot decompress would trust it
        cobj = zstandard.ZstdCompressor(level=1).compressobj(size=BOMB_BYTES)
        payload = _zeros_stream(cobj)
        assert zstandard.frame_content_size(payload) == BOMB_BYTES
        return payload
    if name == "zlib":
        return _zeros_stream(zlib.compressobj(1))
    import lzma

    return _zeros_stream(lzma.LZMACompressor(preset=0))


@pytest.mark.parametrize("name", ["zstd", "zlib", "lzma"])
def test_decompression_bomb_stops_at_the_declared_size(gpt, good, tmp_path, name):
    payload = bomb_payload(name)
    assert len(payload) < BOMB_BYTES // 100
    path = forge(gpt, good, tmp_path / f"{name}.pga", _set("compressor", name), payload)
    t0 = time.perf_counter()
    refused(gpt, path, "inflates beyond", str(good["header"]["raw_bytes"]))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="outside"):  # the decompressors refuse a bad limit too
        gpt.COMPRESSORS[name][1](payload, -1)


# --- the official .ptz path -----------------------------------------------------------------------


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torch_zip(obj=None, pkl=None):
    """torch.save of obj, or of a placeholder with its data.pkl replaced by pkl."""
    buf = io.BytesIO()
    torch.save({"a": 1} if obj is None else obj, buf)
    if pkl is None:
        return buf.getvalue()
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


def official_refused(capsys, path, *words):
    with pytest.raises(ValueError) as info:
        eval_bpb.load_official_int8(str(path))
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    assert str(path) in cli_refused(capsys, path)


def test_malicious_pickle_in_an_official_ptz_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = {"__quant_format__": "int8_clean_per_row_v1", "quantized": {}, "x": Evil(marker)}
    (tmp_path / "zip.ptz").write_bytes(zlib.compress(torch_zip(evil)))
    official_refused(capsys, tmp_path / "zip.ptz", "refused")
    (tmp_path / "plain.ptz").write_bytes(zlib.compress(pickle.dumps(evil)))
    official_refused(capsys, tmp_path / "plain.ptz", "not a torch.save zip archive")
    assert not marker.exists()


def test_pickle_memo_bomb_is_refused_fast(tmp_path, capsys):
    ops = bytearray(b"\x80\x02]r\x00\x00\x00\x00](")  # a list, then ~50,000 memo reads of it
    ops += b"j\x00\x00\x00\x00" * 20_000 + b"h\x00" * 30_000 + b"e."
    assert len(ops) < 200_000
    (tmp_path / "memo.ptz").write_bytes(zlib.compress(torch_zip(pkl=bytes(ops))))
    t0 = time.perf_counter()
    official_refused(capsys, tmp_path / "memo.ptz", "memo reads")
    assert time.perf_counter() - t0 < 5


def test_official_tensor_bombs_are_refused_before_dequantizing(tmp_path, capsys):
    big = torch.zeros(1 << 20, dtype=torch.int8)  # one storage named many times: 100M elements
    shared = {f"w{i}": big for i in range(100)}
    fmt = {"__quant_format__": "int8_clean_per_row_v1", "scales": {}, "passthrough": {}}
    (tmp_path / "shared.ptz").write_bytes(zlib.compress(torch_zip({**fmt, "quantized": shared})))
    t0 = time.perf_counter()
    official_refused(capsys, tmp_path / "shared.ptz", "elements")
    expanded = {"w": torch.zeros(1, dtype=torch.int8).expand(1 << 24)}  # stride 0
    (tmp_path / "view.ptz").write_bytes(zlib.compress(torch_zip({**fmt, "quantized": expanded})))
    official_refused(capsys, tmp_path / "view.ptz", "larger than its storage")
    assert time.perf_counter() - t0 < 10
    zbomb = zlib.compressobj(1)
    (tmp_path / "zlib.ptz").write_bytes(
        _zeros_stream(zbomb, eval_bpb.OFFICIAL_MAX_RAW_BYTES + (1 << 20))
    )
    official_refused(capsys, tmp_path / "zlib.ptz", "inflates beyond")
    only(tmp_path, "shared.ptz", "view.ptz", "zlib.ptz")


# --- trust: which script runs ---------------------------------------------------------------------

TROJAN = '\nopen({marker!r}, "w").write("ran")  # a trojan: runs when the script is imported\n'


def test_trojaned_script_beside_an_artifact_is_not_run_by_default(
    gpt, good, tmp_path, capsys, no_temp_left
):
    folder = tmp_path / "record"
    folder.mkdir()
    marker = tmp_path / "trojan_ran"
    trojan = (REPO / "train_gpt.py").read_text() + TROJAN.format(marker=str(marker))
    (folder / "train_gpt.py").write_text(trojan)
    sha = gpt.sha256_hex(trojan.encode())
    art = forge(gpt, good, folder / "final_model.pga", _set("script_sha256", sha))

    err = cli_refused(capsys, art, "--max-tokens", "256")
    assert "train_gpt.py" in err and "--trust-script" in err and sha[:16] in err and str(art) in err
    err = cli_refused(capsys, art, "--script", folder / "train_gpt.py")
    assert "--trust-script" in err
    assert not marker.exists()

    code = eval_bpb.main(
        [
            str(art),
            "--trust-script",
            str(folder / "train_gpt.py"),
            "--max-tokens",
            "256",
            "--mode",
            "standard",
        ],
        env={},
    )
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert (
        "warning: --trust-script" in err
        and str(folder / "train_gpt.py") in err
        and "execute" in err
    )
    assert marker.exists() and "valid: True" in out
    marker.unlink()
    only(folder, "train_gpt.py", "final_model.pga")


def test_trust_script_must_still_match_the_header(gpt, good, tmp_path, capsys):
    other = tmp_path / "train_gpt.py"
    other.write_text("raise SystemExit('must not run')\n")
    err = cli_refused(capsys, good["path"], "--trust-script", other)
    assert "does not match" in err and "--trust-script" in err


def test_official_ptz_with_a_foreign_script_needs_trust(tmp_path, capsys):
    marker = tmp_path / "trojan_ran"
    script = tmp_path / "train_gpt.py"
    script.write_text(TROJAN.format(marker=str(marker)))
    ptz = tmp_path / "final_model.int8.ptz"
    ptz.write_bytes(zlib.compress(torch_zip({"__quant_format__": "int8_clean_per_row_v1"})))
    err = cli_refused(capsys, ptz, "--script", script)
    assert str(script) in err and "--trust-script" in err
    assert not marker.exists()


def _git(*args):
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else None


def test_a_git_revision_of_the_checkout_script_is_trusted_and_cleaned_up(gpt, no_temp_left):
    revs = (_git("log", "--all", "--format=%H", "--", "train_gpt.py") or b"").split()
    current = gpt.file_sha256(str(REPO / "train_gpt.py"))
    old = [r for r in revs if gpt.sha256_hex(_git("show", f"{r.decode()}:train_gpt.py")) != current]
    if not old:
        pytest.skip("not a git checkout with an older train_gpt.py")
    blob = _git("show", f"{old[-1].decode()}:train_gpt.py")
    cleanup = []
    path = eval_bpb.checkout_script(gpt.sha256_hex(blob), "train_gpt.py", cleanup)
    assert path and Path(path).read_bytes() == blob and Path(path).name == "train_gpt.py"
    assert eval_bpb.checkout_script("0" * 64, "train_gpt.py", cleanup) is None
    assert eval_bpb.checkout_script(current, "train_gpt.py", []) == str(REPO / "train_gpt.py")
    for folder in cleanup:
        shutil.rmtree(folder)


def test_the_example_record_reads_and_resolves_to_a_git_revision(gpt, no_temp_left):
    records = sorted(REPO.glob("records/*/*/*.pga"))
    if not records:
        pytest.skip("no example record")
    header, _ = gpt.read_artifact_header(str(records[0]))
    cleanup = []
    path = eval_bpb.checkout_script(header["script_sha256"], header["script"], cleanup)
    if path is None:
        pytest.skip("the example record's script is not in this checkout's git history")
    assert gpt.file_sha256(path) == header["script_sha256"]
    for folder in cleanup:
        shutil.rmtree(folder)


def test_eval_bpb_cli_refuses_a_trojan_without_running_it(gpt, good, tmp_path):
    """The same refusal from a real process (exit status and stderr as a user sees them)."""
    marker = tmp_path / "trojan_ran"
    trojan = (REPO / "train_gpt.py").read_text() + TROJAN.format(marker=str(marker))
    (tmp_path / "train_gpt.py").write_text(trojan)
    art = forge(
        gpt, good, tmp_path / "a.pga", _set("script_sha256", gpt.sha256_hex(trojan.encode()))
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval_bpb.py"), str(art)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: ")
        and "--trust-script" in proc.stderr
    )
    assert proc.stderr.count("\n") == 1 and not marker.exists()
    only(tmp_path, "train_gpt.py", "a.pga")
