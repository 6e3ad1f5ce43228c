"""Issue 15, the compact counted code form: a deterministic minified form of the readable script
(no comments or docstrings, local and module-level names shortened where safe), Brotli- or
LZMA-compressed into a few-line self-extracting script. It must expand, without running, to
exactly the minified form of the bound readable source, and must run exactly like it: the same
artifact bytes and scores for all three scripts, Triton kernels built from its source."""

import ast
import hashlib
import importlib.util
import inspect
import io
import json
import os
import subprocess
import sys
import tokenize

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO, SCRIPTS, TINY_ENV, TINY_RUN, run_interpreted, summary_of

import golf.compact as compact_tools


def load_compact(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name)
    return mod


@pytest.fixture(scope="module")
def compact(gpt):
    source = (REPO / "train_gpt.py").read_bytes()
    return source, compact_tools.compact_code(source, "train_gpt.py")


def test_the_compact_form_expands_to_the_minified_source(gpt, compact):
    source, blob = compact
    minified, sha, size, name = compact_tools.expand_compact(blob)
    assert minified == compact_tools.minify_source(source)
    assert (sha, size, name) == (hashlib.sha256(source).hexdigest(), len(source), "train_gpt.py")
    compact_tools.check_compact(blob, source, "train_gpt.py")
    text = minified.decode()
    kinds = {t.type for t in tokenize.generate_tokens(io.StringIO(text).readline)}
    assert tokenize.COMMENT not in kinds
    tree = ast.parse(text)
    assert ast.get_docstring(tree) is None
    assert all(
        ast.get_docstring(n) is None
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    )
    assert "def minify_source" not in text and "def compact_code" not in text  # the builder
    assert len(blob) < len(source) / 5


def test_a_compact_form_of_anything_else_is_refused(gpt, compact):
    source, blob = compact
    with pytest.raises(ValueError, match="wrapper"):
        compact_tools.expand_compact(blob.replace(b"linecache,", b"linecache,sys,", 1))
    with pytest.raises(ValueError, match="binds another"):
        compact_tools.check_compact(blob, source + b"\n", "train_gpt.py")
    with pytest.raises(ValueError, match="runs as"):
        compact_tools.check_compact(blob, source, "train_hydra.py")
    # another program under the true source's sha256 and size: its source is not the minified
    # form of the readable file, and re-deriving it says so
    extra = b"\nprint('not the record')\n"
    other = compact_tools.compact_code(source + extra, "train_gpt.py")
    true_sha = hashlib.sha256(source).hexdigest().encode()
    other_sha = hashlib.sha256(source + extra).hexdigest().encode()
    forged = other.replace(other_sha, true_sha).replace(
        b"READABLE_BYTES=%d" % (len(source) + len(extra)), b"READABLE_BYTES=%d" % len(source)
    )
    with pytest.raises(ValueError, match="not the minified form"):
        compact_tools.check_compact(forged, source, "train_gpt.py")


def test_minify_keeps_what_python_means():
    """Edge cases of the token re-emitter and the renamers, run against the readable form."""

    src = b'''
"""module doc"""
import re
LIMIT = 3


def helper_function(value, scale=2, *, label=LIMIT):
    """doc"""
    total = value * scale  # comment
    items = [total, total + 1,]
    pair = (total,)
    keyed = {"a": total, }
    word = f"{total=} {label}"
    closure = [lambda: total + k for k in range(2)]

    def inner(other):
        return other + total

    return (items, pair, keyed, word, [c() for c in closure], inner(1), 1 .real, re.escape("x"))


class Holder:
    """only a docstring"""


def only_doc():
    """nothing else"""


RESULT = helper_function(5) + (Holder.__name__, only_doc(), helper_function(1, label=4))
'''
    want = {}
    got = {}
    exec(compile(src, "<readable>", "exec"), want)  # noqa: S102 (the test's own source)
    minified = compact_tools.minify_source(src)
    exec(compile(minified, "<minified>", "exec"), got)  # noqa: S102
    renamed = compact_tools.compact_names(src)
    assert renamed["RESULT"] != "RESULT"  # module-level names are shortened too
    assert got[renamed["RESULT"]] == want["RESULT"]
    assert b"#" not in minified and b"doc" not in minified and b"\n\n" not in minified
    assert b"total=" in minified  # a self-documenting f-string keeps its names


def test_the_compact_module_runs_from_its_own_source(gpt, compact, tmp_path):
    source, blob = compact
    path = tmp_path / "train_gpt_compact.py"
    path.write_bytes(blob)
    mod = load_compact(path, "train_gpt_compact")
    names = compact_tools.compact_names(source)

    def fn(name):
        return getattr(mod, names.get(name, name))

    assert fn("readable_sha256")(mod.MODEL) == hashlib.sha256(source).hexdigest()
    assert fn("running_source")(mod.MODEL) == compact_tools.minify_source(source)
    assert "tl.program_id" in inspect.getsource(fn("_triton_kernels"))
    hparams = mod.Hyperparameters
    h = hparams.from_env({**TINY_ENV, "CODE_FORM": "compact"})
    assert fn("counted_code")(h) == blob  # a compact form counts its own file
    with pytest.raises(ValueError, match="runs the compact form"):
        fn("counted_code")(hparams.from_env({**TINY_ENV, "CODE_FORM": "readable"}))


KERNELS = """
import hashlib, importlib.util, sys, torch
sys.path.insert(0, {repo!r})
import train_gpt as tg
from golf.compact import compact_names
names = compact_names(open({readable!r}, "rb").read())
spec = importlib.util.spec_from_file_location("compact", {path!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
kernels = getattr(mod, names["_triton_kernels"])()
assert kernels is not None, "Triton kernels were not built from the compact form's source"
g = torch.Generator().manual_seed(0)
quantize = getattr(mod, names["quantize_rows"])
dequantize = getattr(mod, names["dequantize_rows"])
for bits in (4, 6, 8):
    w = torch.randn(5, 300, generator=g)
    clip = w.abs().amax(dim=1) * 0.8
    q, s = quantize(w, bits, clip, True)  # positional: parameter names are shortened too
    tq, ts = tg.quantize_rows(w, bits, clip, use_triton=False)
    assert torch.equal(q, tq) and torch.equal(s, ts), bits
    assert torch.equal(dequantize(q, s, True), tg.dequantize_rows(q, s, False))
model_kernels = getattr(mod, names["triton_model_kernels"])()
assert "matmul_leaky2" in model_kernels
print("kernels agree")
"""


def test_triton_kernels_of_the_compact_form_run_under_the_interpreter(compact, tmp_path):
    _, blob = compact
    path = tmp_path / "train_gpt_compact.py"
    path.write_bytes(blob)
    code = KERNELS.format(repo=str(REPO), readable=str(REPO / "train_gpt.py"), path=str(path))
    assert "kernels agree" in run_interpreted(code)


def _run(script_path, env, cwd):
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env})
    return subprocess.run(
        [sys.executable, str(script_path)],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_compact_form_trains_and_scores_exactly_like_the_readable_script(
    name, embedded, tmp_path
):
    """The readable script and its compact form, on the same tiny run: byte-identical artifacts
    (both bind the readable sha256 and the compact form's bytes) and identical scores."""
    mod_name = name.removesuffix(".py")
    blob = compact_tools.compact_code((REPO / name).read_bytes(), name)
    folder = tmp_path / "record"
    folder.mkdir()
    compact_path = folder / f"{mod_name}_compact.py"
    compact_path.write_bytes(blob)
    results = {}
    for form, path in (("readable", REPO / name), ("compact", compact_path)):
        env = {
            **TINY_ENV, **TINY_RUN[name], **embedded, "CODE_FORM": "compact", "SEED": "3",
            "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": f"{mod_name}_{form}",
        }  # fmt: skip
        done = _run(path, env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = summary_of((tmp_path / "logs" / f"{mod_name}_{form}.txt").read_text())
        artifact = (tmp_path / "logs" / f"{mod_name}_{form}.pga").read_bytes()
        results[form] = (summary, hashlib.sha256(artifact).hexdigest())
    readable, compact_run = results["readable"], results["compact"]
    assert readable[1] == compact_run[1]  # the same artifact, byte for byte
    for key in ("val_bpb", "val_loss", "pre_quant_val_bpb", "roundtrip_val_bpb", "code_bytes"):
        assert readable[0].get(key) == compact_run[0].get(key), key
    assert readable[0]["code_bytes"] == len(blob)
    assert json.dumps(readable[0]["audits"]) == json.dumps(compact_run[0]["audits"])


def test_the_ascii_literal_roundtrips_and_needs_no_escapes_but_quotes(gpt):
    """Issue 24: the literal is printable ASCII, so the compact file's bytes are its UTF-8 bytes."""
    quote = compact_tools.COMPACT_DIGITS.index(b'"')
    base = compact_tools.COMPACT_BASE
    quotes = (quote * base**2 + quote * base + quote).to_bytes(3, "big")
    rng = np.random.default_rng(0)
    cases = [b"", b"\x00", b"\x00\x00\x07", quotes, rng.bytes(39_341), bytes(range(256)) * 4]
    for data in cases:
        literal = compact_tools._ascii_literal(data)
        assert literal.isascii() and all(0x20 <= c < 0x7F for c in literal)
        assert literal.count(b"\\") == literal.count(b'\\"')  # the only escape is a quote's
        assert b'"""' not in literal and not literal.endswith(b'"') or literal.endswith(b'\\"')
        digits = ast.literal_eval('"""' + literal.decode("ascii") + '"""').encode("ascii")
        assert compact_tools._ascii_value(digits, len(data)) == data
    # two quotes that a quote follows, and the last: all escaped
    assert compact_tools._ascii_literal(quotes) == b'\\"\\"\\"'
    with pytest.raises(ValueError, match="outside the digits"):
        compact_tools._ascii_value(b"\x01\x00\x02", 3)
    with pytest.raises(ValueError, match="more bytes"):
        compact_tools._ascii_value(compact_tools._ascii_literal(b"\xff\xff"), 1)
    with pytest.raises(ValueError, match="longer"):
        compact_tools._ascii_value(b"!" * 5000, 10)


def test_the_compact_file_is_pure_ascii_and_counts_the_same_three_ways(compact):
    """File bytes, the UTF-8 bytes of its text (the official count) and len(compact_code(...)),
    the run's figure, are one number; a non-ASCII form is refused."""
    _, blob = compact
    assert blob.isascii()
    assert len(blob) == len(blob.decode("utf-8").encode("utf-8"))
    with pytest.raises(ValueError, match="not pure ASCII"):
        compact_tools.expand_compact(blob.replace(b"import ", b"import \xe9", 1))
