"""Re-score an artifact: ours (.pga, by the script that wrote it) or the official .int8.ptz.

  python eval_bpb.py logs/RUN.pga          # mode, data, tokenizer from the header
  python eval_bpb.py final_model.int8.ptz --data-path data/datasets/fineweb10B_sp1024 \
      --tokenizer-path data/tokenizers/fineweb_1024_bpe.model      # official baseline format
  EVAL_STRIDE=64 torchrun --standalone --nproc_per_node=8 eval_bpb.py ARTIFACT --mode sliding

Our artifact names its script and the script's sha256. Its header is checked first (checksum,
script name, tensor table, sizes) by this checkout's reader (golf.container), before any code
runs. Re-scoring runs the code of the script the header binds, so that its own loader, model and
eval functions (its EVAL_MODES) score the bytes (the training run did the same, so the figures
agree to the printed digits): when the sha256 is this checkout's train_*.py, that is the golf
package it is generated from (the model built through golf.models' registry); when it is the
script at a git revision of this checkout, that revision's file. A script from anywhere else (a
downloaded record folder) runs only when named with --trust-script PATH, which prints a warning.
Our format holds no pickle; the official .ptz is read with torch.load(weights_only=True) only,
through this tool's `load_official_int8` (zlib output, pickle size and opcodes bounded first), and
evaluated with the `baseline` preset architecture sized from its tensors (env vars such as
NUM_LAYERS or TRAIN_SEQ_LEN override). Eval settings come from the artifact's hyperparameters;
env vars EVAL_SEQ_LEN, EVAL_STRIDE, TTT_*, AUDIT_SEQ_LEN, VAL_BATCH_SIZE and VAL_MAX_TOKENS override
them; the n-gram tilt (NGRAM_TILT_ENABLED, TOKEN_*) is the run's, from the header, never
overridden. The causality audit (at TRAIN_SEQ_LEN and at the eval window) and the byte audit run
before scoring. Exit status: 0 ok, 2 bad input (one line on stderr), 3 an audit failed (score
INVALID).
"""

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
import zlib

# OpenMP reads its wait policy when torch loads (importing golf below): PASSIVE, so waiting
# threads sleep instead of spinning on a busy CPU (issue 18). Imported as a module, nothing is set.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The package of this checkout, for the file hash and the artifact header checks: scripts and
# tokenizers are hashed before any of them is trusted. The eval modes come from the code of the
# script that wrote the artifact (load()).
from golf.bpb import byte_source
from golf.bundle import BUNDLES, MODULE_ORDER
from golf.container import ARTIFACT_MAGIC, OFFICIAL_MAX_RAW_BYTES, read_artifact_header
from golf.runtime import file_sha256, sha256_hex

HERE = os.path.dirname(os.path.abspath(__file__))
# The official .ptz: bounds checked before torch.load (the baseline's own: ~17 MB inflated, a 17 KB
# pickle of ~5,200 opcodes, ~1,100 memo reads, 147 storages, 17M elements).
OFFICIAL_MAX_PICKLE_BYTES = 1 << 20
OFFICIAL_MAX_PICKLE_OPS = 100_000
OFFICIAL_MAX_MEMO_GETS = 20_000
OFFICIAL_MAX_ELEMENTS = 64 << 20
BASELINE_ARCH = (
    "vocab_size",
    "model_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "mlp_mult",
    "tie_embeddings",
)


class BadInput(Exception):
    """One-line refusal: exit 2."""


def check_official_pickle(path, raw):
    """Refuse, before unpickling, a zlib output that is not torch.save's zip archive of stored
    members, or whose data.pkl is too large, too long or too memo-heavy to be the official dict."""
    import io
    import pickletools

    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(
            f"{path}: refused: not a torch.save zip archive ({type(exc).__name__})"
        ) from None
    pickles = [m for m in members if m.filename.endswith("/data.pkl")]
    if len(pickles) != 1 or any(m.compress_type != zipfile.ZIP_STORED for m in members):
        raise ValueError(f"{path}: refused: not a torch.save archive (one stored data.pkl)")
    if pickles[0].file_size > OFFICIAL_MAX_PICKLE_BYTES:
        raise ValueError(
            f"{path}: refused: its pickle is {pickles[0].file_size} bytes, more than the "
            f"{OFFICIAL_MAX_PICKLE_BYTES} an int8 state dict needs"
        )
    data = archive.read(pickles[0])
    ops = 0
    gets = 0
    try:
        for op, _, _ in pickletools.genops(data):
            ops += 1
            gets += op.name in ("GET", "BINGET", "LONG_BINGET", "DUP")
            if ops > OFFICIAL_MAX_PICKLE_OPS or gets > OFFICIAL_MAX_MEMO_GETS:
                raise ValueError(
                    f"{path}: refused: its pickle has more than {OFFICIAL_MAX_PICKLE_OPS} opcodes "
                    f"or {OFFICIAL_MAX_MEMO_GETS} memo reads (an int8 state dict needs a few "
                    "thousand)"
                )
    except (ValueError, EOFError) as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: refused: unreadable pickle ({exc})") from None


def check_official_tensors(path, obj):
    """Refuse a dict whose tensors would materialize more than OFFICIAL_MAX_ELEMENTS (counting
    every reference: a memo bomb points thousands of names at one tensor) or view more than their
    storage holds (stride-0 expansion)."""
    import torch

    total = 0
    for group in ("quantized", "scales", "passthrough"):
        tensors = obj.get(group, {})
        if not isinstance(tensors, dict):
            raise ValueError(f"{path}: {group}: expected a dict of tensors")  # noqa: TRY004
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                what = f"{group}[{str(name)[:60]!r}]"
                raise ValueError(f"{path}: {what}: not a tensor")  # noqa: TRY004
            total += t.numel()
            if t.numel() * t.element_size() > t.untyped_storage().nbytes():
                raise ValueError(
                    f"{path}: {group}[{str(name)[:60]!r}]: a view larger than its storage"
                )
            if total > OFFICIAL_MAX_ELEMENTS:
                raise ValueError(
                    f"{path}: refused: the tensors hold more than {OFFICIAL_MAX_ELEMENTS} elements"
                )


def load_official_int8(path, max_bytes=OFFICIAL_MAX_RAW_BYTES):
    """State dict of an official `final_model.int8.ptz`: zlib of a torch.save dict in the
    int8_clean_per_row_v1 format. The zlib output is streamed up to max_bytes, the pickle checked
    (check_official_pickle), and torch.load runs with weights_only=True, so a pickle carrying code
    is refused, never executed."""
    import io
    import pickle

    import torch

    if os.path.getsize(path) > max_bytes:
        raise ValueError(f"{path}: not an official int8 artifact (more than {max_bytes} bytes)")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        raw = zlib.decompressobj().decompress(blob, max_bytes + 1)
    except zlib.error as exc:
        raise ValueError(f"{path}: not a zlib-compressed official int8 artifact ({exc})") from None
    if len(raw) > max_bytes:
        raise ValueError(
            f"{path}: not an official int8 artifact (inflates beyond {max_bytes} bytes)"
        )
    check_official_pickle(path, raw)
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text suggests weights_only=False: wrong for untrusted files
        raise ValueError(
            f"{path}: refused: the pickle holds objects other than tensors ({type(exc).__name__})"
        ) from None
    except Exception as exc:
        raise ValueError(
            f"{path}: unreadable torch payload ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict) or obj.get("__quant_format__") != "int8_clean_per_row_v1":
        raise ValueError(f"{path}: not in the int8_clean_per_row_v1 format")
    check_official_tensors(path, obj)
    state = {}
    dtypes = obj.get("dtypes", {})
    for name, q in obj.get("quantized", {}).items():
        s = obj["scales"][name]
        w = q.float() * (
            s.float().view(q.shape[0], *([1] * (q.ndim - 1))) if s.ndim > 0 else float(s)
        )
        state[name] = w.to(getattr(torch, str(dtypes.get(name, "float32")).removeprefix("torch.")))
    orig = obj.get("passthrough_orig_dtypes", {})
    for name, t in obj.get("passthrough", {}).items():
        state[name] = (
            t.to(getattr(torch, str(orig[name]).removeprefix("torch."))) if name in orig else t
        )
    return state


def peek_header(path):
    """Our artifact's header, checked by this checkout's reader (checksum, script name, tensor
    table, sizes) before any script runs, or None for anything else (the official reader judges
    those)."""
    with open(path, "rb") as f:
        if f.read(len(ARTIFACT_MAGIC)) != ARTIFACT_MAGIC:
            return None
    try:
        return read_artifact_header(path)[0]
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def checkout_script(sha, name, cleanup):
    """The path of a training script of this checkout whose sha256 is sha: one of its train_*.py,
    else the file `name` at a git revision of this checkout (written to a temp folder that is
    added to cleanup). None when there is none."""
    for path in sorted(glob.glob(os.path.join(HERE, "train_*.py"))):
        if file_sha256(path) == sha:
            return path
    git = ["git", "-C", HERE]
    try:
        revs = subprocess.run(
            [*git, "log", "--all", "--format=%H", "--", name],
            capture_output=True,
            timeout=60,
            check=False,
        )
        for rev in revs.stdout.decode("ascii", "replace").split() if revs.returncode == 0 else []:
            blob = subprocess.run(
                [*git, "show", f"{rev}:{name}"], capture_output=True, timeout=60, check=False
            )
            if blob.returncode == 0 and sha256_hex(blob.stdout) == sha:
                folder = tempfile.mkdtemp(prefix="pgolf-script-")
                cleanup.append(folder)
                path = os.path.join(folder, name)
                with open(path, "wb") as f:
                    f.write(blob.stdout)
                return path
    except (OSError, subprocess.TimeoutExpired):
        return None
    return None


def trust_warning(path):
    print(
        f"warning: --trust-script {path}: eval_bpb.py will import and execute this file's code; "
        "use it only for a script you have read",
        file=sys.stderr,
    )


def check_hash(flag, path, want, script):
    if not os.path.isfile(path):
        raise BadInput(f"{flag} {path}: no such file")
    got = file_sha256(path)
    if got != want:
        raise BadInput(
            f"{flag} {path}: sha256 {got[:16]}... does not match the artifact's "
            f"script_sha256 {want[:16]}... ({script})"
        )


def find_script(artifact, header, args, cleanup):
    """The script to run for our artifact: --trust-script (any file, with a warning), else the
    checkout's script (or git revision) with the header's sha256. A script of that name beside the
    artifact must match the header."""
    want = header["script_sha256"]
    name = header["script"]
    if args.trust_script:
        check_hash("--trust-script", args.trust_script, want, name)
        trust_warning(args.trust_script)
        return args.trust_script
    if args.script:
        check_hash("--script", args.script, want, name)
    here = os.path.dirname(os.path.abspath(artifact))
    beside = os.path.join(here, name)
    if here != HERE and os.path.isfile(beside) and file_sha256(beside) != want:
        raise BadInput(
            f"{beside}: sha256 does not match the artifact's script_sha256 {want[:16]}...; "
            f"the record's {name} is not the one that wrote {os.path.basename(artifact)}"
        )
    path = checkout_script(want, name, cleanup)
    if path is None:
        raise BadInput(
            f"{artifact}: needs {name} sha256 {want[:16]}..., not a training script of this "
            f"checkout or of its git history; re-scoring runs that script's code: to run a copy "
            f"you trust, pass --trust-script PATH/{name}"
        )
    return path


def check_compact_beside(artifact, header, mod):
    """A compact form of the script beside the artifact (a record folder, issue 15) must expand,
    read and not run, to the minified form of the readable script the header binds (checked by
    that script's own minifier, `mod`, the one that made it), and be the counted code it binds."""
    name = header["script"]
    here = os.path.dirname(os.path.abspath(artifact))
    compact = os.path.join(here, name.removesuffix(".py") + "_compact.py")
    if not os.path.isfile(compact):
        return
    if getattr(mod, "check_compact", None) is None:
        raise BadInput(f"{compact}: the {name} this artifact binds cannot check a compact form")
    with open(compact, "rb") as f:
        blob = f.read()
    with open(mod.__file__, "rb") as f:
        readable = f.read()
    try:
        mod.check_compact(blob, readable, name)
    except ValueError as exc:
        raise BadInput(f"{compact}: {exc}") from None
    if header.get("code_sha256") not in (None, sha256_hex(blob)):
        raise BadInput(f"{compact}: not the counted code the artifact binds (code_sha256)")


def official_script(args, cleanup):
    """The script whose model evaluates an official .ptz: this checkout's train_gpt.py, --script
    when it is a training script of this checkout, or --trust-script (with a warning)."""
    if args.trust_script:
        if not os.path.isfile(args.trust_script):
            raise BadInput(f"--trust-script {args.trust_script}: no such file")
        trust_warning(args.trust_script)
        return args.trust_script
    if not args.script:
        return os.path.join(HERE, "train_gpt.py")
    if not os.path.isfile(args.script):
        raise BadInput(
            f"{args.script}: no such file (the baseline format is evaluated with train_gpt.py)"
        )
    path = checkout_script(file_sha256(args.script), os.path.basename(args.script), cleanup)
    if path is None:
        raise BadInput(
            f"--script {args.script}: not a training script of this checkout or of its git "
            "history; to run it anyway, pass --trust-script PATH"
        )
    return path


def package_namespace(script_name):
    """This checkout's code of `script_name`, from the golf package it is generated from: one
    namespace with the names its bundle has (the golf modules in layer order, then the model
    module), so that re-scoring runs the same code without importing the bundle file."""
    from golf.models import registry

    spec = registry()[script_name]
    names = {}
    for module in MODULE_ORDER:
        names.update(vars(importlib.import_module(f"golf.{module}")))
    names.update(vars(importlib.import_module(spec.hyperparameters.__module__)))
    names["check_compact"] = importlib.import_module("golf.compact").check_compact
    names["__file__"] = spec.code_path
    return types.SimpleNamespace(**names)


def script_code(path):
    """The code of a training script: the golf package for this checkout's own train_*.py, else
    the file itself (a git revision of it, or a --trust-script)."""
    name = os.path.basename(path)
    if os.path.abspath(path) == os.path.join(HERE, name) and name in BUNDLES:
        return package_namespace(name)
    return import_script(path)


def import_script(path):
    """A script from a git revision of this checkout or from --trust-script, run as a module."""
    name = f"pgolf_script_{file_sha256(path)[:12]}"
    cached = sys.modules.get(name)
    if cached is not None and os.path.isfile(getattr(cached, "__file__", "")):
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ left beside a record's script
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.dont_write_bytecode = write_bytecode
    return module


def resolve(path, *bases):
    """A relative data/tokenizer path as given, else relative to the script's or this tool's
    folder."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    for base in bases:
        cand = os.path.join(base, path)
        if os.path.exists(cand):
            return cand
    return path


def env_overrides(mod, h, env, names):
    """{field: value} for the named Hyperparameters fields set in env, parsed and validated by the
    script's own Hyperparameters.from_env on top of h."""
    fields = [f.name for f in dataclasses.fields(mod.Hyperparameters)]
    picked = {
        f.upper(): env[f.upper()] for f in fields if f.upper() in env and f != "preset" and names(f)
    }
    if not picked:
        return {}
    text = {True: "1", False: "0"}
    base = {
        f.upper(): text.get(v, repr(v)) if isinstance(v, (bool, float)) else str(v)
        for f in fields
        if (v := getattr(h, f)) is not None
    }
    new = mod.Hyperparameters.from_env({**base, **picked, "PRESET": h.preset})
    return {k.lower(): getattr(new, k.lower()) for k in picked}


def is_eval_field(name):
    return name.startswith(("eval_", "ttt_", "audit_")) or name in (
        "val_batch_size",
        "val_max_tokens",
    )


def replace_h(mod, h, changes):
    h = dataclasses.replace(h, **changes)
    h.validate()
    return h


def infer_baseline(state):
    """Baseline preset sizes from the official state dict's tensor shapes."""
    try:
        vocab, dim = state["tok_emb.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        heads = state["blocks.0.attn.q_gain"].numel()
        kv = state["blocks.0.attn.c_k.weight"].shape[0] // (dim // heads)
        mlp = state["blocks.0.mlp.fc.weight"].shape[0] / dim
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise BadInput(
            f"the state dict is not the baseline architecture (missing or odd {exc})"
        ) from None
    return {
        "vocab_size": int(vocab),
        "model_dim": int(dim),
        "num_layers": layers,
        "num_heads": int(heads),
        "num_kv_heads": int(kv),
        "mlp_mult": float(mlp),
        "tie_embeddings": "lm_head.weight" not in state,
    }


def load(args, env, cleanup):
    """(module, model, h, info) for either format, with the eval overrides applied. Temp folders
    made on the way are added to cleanup."""
    if not os.path.isfile(args.artifact):
        raise BadInput(f"{args.artifact}: no such file")
    header = peek_header(args.artifact)
    info = {"artifact": args.artifact, "artifact_bytes": os.path.getsize(args.artifact)}

    if header is not None:
        script = find_script(args.artifact, header, args, cleanup)
        mod = script_code(script)
        check_compact_beside(args.artifact, header, mod)
        model, h = mod.load_artifact(args.artifact)
        info.update(
            format=header.get("format", "pgolf-artifact"),
            script=script,
            script_sha256=header["script_sha256"],
            tokenizer_sha256=header.get("tokenizer_sha256"),
            byte_source=header.get("byte_source"),
            # the counted code: the compact form's size where the header binds one (issue 15)
            code_bytes=header.get("code_bytes", os.path.getsize(script)),
        )
        info["total_bytes"] = info["artifact_bytes"] + info["code_bytes"]
    else:
        script = official_script(args, cleanup)
        mod = script_code(script)

        # torch warns about pickle protocols before refusing: keep the refusal to one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = load_official_int8(args.artifact)
        arch = infer_baseline(state)
        h = replace_h(mod, mod.Hyperparameters.from_env({"PRESET": "baseline"}), arch)
        h = replace_h(mod, h, env_overrides(mod, h, env, lambda f: not is_eval_field(f)))

        model = mod.build_model(h)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BadInput(
                f"{args.artifact}: does not load into the inferred baseline model ({first})"
            ) from None
        model.eval()
        info.update(
            format="int8_clean_per_row_v1",
            script=script,
            tokenizer_sha256=None,
            inferred={k: getattr(h, k) for k in BASELINE_ARCH},
        )

    # Eval settings: env overrides, then --mode, then where the data and tokenizer are.
    h = replace_h(mod, h, env_overrides(mod, h, env, is_eval_field))
    modes = eval_modes(mod, script)
    if args.mode and args.mode not in modes:
        raise BadInput(
            f"--mode {args.mode!r}: not an eval mode of {os.path.basename(script)} "
            f"({', '.join(modes)})"
        )
    if args.mode or "EVAL_MODE" in env:
        h = replace_h(mod, h, {"eval_mode": args.mode or env["EVAL_MODE"], "ttt_enabled": False})
    bases = (os.path.dirname(os.path.abspath(script)), HERE)
    h = replace_h(
        mod,
        h,
        {
            "data_path": resolve(args.data_path or h.data_path, *bases),
            "tokenizer_path": resolve(args.tokenizer_path or h.tokenizer_path, *bases),
        },
    )

    if info.get("tokenizer_sha256") and os.path.isfile(h.tokenizer_path):
        got = file_sha256(h.tokenizer_path)
        if got != info["tokenizer_sha256"]:
            raise BadInput(
                f"TOKENIZER_PATH={h.tokenizer_path!r}: sha256 {got[:16]}... is not the tokenizer "
                f"the artifact was trained with ({info['tokenizer_sha256'][:16]}...)"
            )
    return mod, model, h, info


def final_mode(h):
    """The final eval mode, as the script's own Hyperparameters decide it (final_eval_mode); a
    script from before that property (a git revision) decided it by this same rule."""
    if hasattr(h, "final_eval_mode"):
        return h.final_eval_mode
    return "ttt" if h.ttt_enabled else h.eval_mode


def eval_modes(mod, script):
    """The script's registry of eval modes: name -> EvalMode(name, evaluate, label)."""
    modes = getattr(mod, "EVAL_MODES", None)
    if modes is None:
        raise BadInput(f"{script}: defines no EVAL_MODES (older than the eval-mode registry)")
    return modes


def check_byte_source(luts, want, h):
    """The bytes this re-score counts must be the ones the run counted (the header's
    byte_source, issue 24): the same kind, and for sidecars the same files (sha256)."""
    got = byte_source(luts)
    if want is None or (got["kind"] == "sidecar" and "sha256" not in got):
        return got  # an artifact or a counter from before the byte source: nothing to compare
    if got["kind"] != want["kind"] or got.get("sha256") != want.get("sha256"):
        raise BadInput(
            f"DATA_PATH={h.data_path!r}: this re-score would count bytes with {describe(got)}, "
            f"the run counted them with {describe(want)}: point --data-path at the val split "
            "the artifact was scored on"
        )
    return got


def describe(source):
    if source["kind"] == "tables":
        return "the SentencePiece lookup tables"
    return f"{source['files']} sidecar files (sha256 {source['sha256'][:16]}...)"


def evaluate(mod, model, h, rt, max_tokens=None, header_source=None):
    """(mode, result, audits): the audits run on the model before the eval mode scores it.
    `header_source` is the artifact header's byte_source: the re-score counts the same bytes."""
    sp = mod.load_tokenizer(h.tokenizer_path, h.vocab_size)
    # this checkout's data checks, for any script
    from golf.data import load_checked_val_tokens, load_val_byte_sidecar

    val_tokens = load_checked_val_tokens(h, sp, max(h.train_seq_len, h.eval_len))
    # --max-tokens, else the run's VAL_MAX_TOKENS: the first N + 1 tokens
    limit = max_tokens or getattr(h, "val_max_tokens", 0)
    if limit:
        val_tokens = val_tokens[: limit + 1]
    model = model.to(rt.device)
    if hasattr(mod, "val_byte_counter"):
        luts = mod.val_byte_counter(h, sp, val_tokens, rt.device)
    elif load_val_byte_sidecar(h.data_path, val_tokens.numel()) is not None:
        raise ValueError(
            f"DATA_PATH={h.data_path!r} counts bytes with fineweb_val_bytes_*.bin sidecars, which "
            f"{os.path.basename(mod.__file__)} predates: it would count the tables instead"
        )
    else:
        luts = mod.build_sentencepiece_luts(sp, h.vocab_size, rt.device)
    check_byte_source(luts, header_source, h)

    audits = {
        "causality": mod.audit_causality(model, h.audit_seq_len or h.train_seq_len, h.vocab_size)
    }
    if h.eval_len != (h.audit_seq_len or h.train_seq_len):
        audits["causality_eval"] = mod.audit_causality(model, h.eval_len, h.vocab_size)
    mode = final_mode(h)
    ttt_len = getattr(h, "ttt_eval_len", h.eval_len)  # older scripts have no TTT_EVAL_SEQ_LEN
    lora_ttt = mode in ("ttt_lora", "ttt_phased")
    if lora_ttt and ttt_len not in (h.eval_len, h.audit_seq_len or h.train_seq_len):
        audits["causality_ttt"] = mod.audit_causality(model, ttt_len, h.vocab_size)
    audits["bytes"] = mod.audit_bytes(sp, val_tokens, luts)

    res = mod.EVAL_MODES[mode].evaluate(h, model, val_tokens, luts)
    if "score_first" in res:
        audits["score_first"] = res["score_first"]
    if "ngram_tilt" in res:  # the run's n-gram tilt, from the header's hyperparameters
        audits["ngram_tilt"] = res["ngram_tilt"]
    return mode, res, audits


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", help="our .pga artifact or an official final_model.int8.ptz")
    p.add_argument(
        "--data-path", help="folder of fineweb_val_*.bin shards (default: the artifact's DATA_PATH)"
    )
    p.add_argument(
        "--tokenizer-path", help="SentencePiece model (default: the artifact's TOKENIZER_PATH)"
    )
    p.add_argument(
        "--mode", help="eval mode, a name in the script's EVAL_MODES (default: the run's)"
    )
    p.add_argument(
        "--script",
        help="training script (ours: must match the header's sha256; official: train_gpt.py); "
        "it runs only if it is a training script of this checkout or of its git history",
    )
    p.add_argument(
        "--trust-script",
        metavar="PATH",
        help="run this script even though it is not of this checkout (a downloaded record's "
        "script): its code is executed, so read it first; ours: must match the header's sha256",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        help="score only the first N val targets, like VAL_MAX_TOKENS "
        "(a quick look, not the official figure)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None, env=None):
    args = build_parser().parse_args(argv)
    env = os.environ if env is None else env
    cleanup = []  # temp folders of scripts taken from git history
    try:
        return run(args, env, cleanup)
    finally:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, env, cleanup):
    try:
        mod, model, h, info = load(args, env, cleanup)
        rt = mod.setup_runtime()
        mode, res, audits = evaluate(
            mod, model, h, rt, args.max_tokens, header_source=info.get("byte_source")
        )
    except BadInput as exc:
        return _fail(str(exc))
    except (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError, TypeError) as exc:
        return _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    valid = all(a["passed"] for a in audits.values())
    if rt.is_main:
        out = {
            **info,
            "mode": mode,
            "label": mod.EVAL_MODES[mode].label,
            "val_loss": res["val_loss"],
            "val_bpb": res["val_bpb"],
            "tokens": res["tokens"],
            "bytes": res["bytes"],
            "eval_time_ms": res["eval_time_ms"],
            "data_path": h.data_path,
            "tokenizer_path": h.tokenizer_path,
            "seq_len": h.eval_len,
            "train_seq_len": h.train_seq_len,
            "max_tokens": args.max_tokens,
            "val_max_tokens": args.max_tokens or getattr(h, "val_max_tokens", 0),
            "world_size": rt.world_size,
            "device": str(rt.device),
            "ngram_tilt": tilt_entry(res.get("ngram_tilt")),
            "valid": valid,
            "audits": {name: _audit_entry(audit) for name, audit in audits.items()},
        }
        if args.json:
            print(json.dumps(out, indent=2, sort_keys=True, default=str))
        else:
            print_text(out)
        if not valid:
            failed = ", ".join(k for k, v in audits.items() if not v["passed"])
            print(f"score INVALID: failed {failed}", file=sys.stderr if args.json else sys.stdout)

    if rt.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0 if valid else 3


def tilt_entry(tilt):
    """The output's n-gram tilt: None when the run scored without it, else its parameters and
    what the re-score's precompute found."""
    if tilt is None:
        return None
    keys = ("order", "threshold", "boost", "gated", "targets", "precompute_s")
    return {key: tilt[key] for key in keys}


def _audit_entry(audit):
    """{passed}, and what failed when it did not pass."""
    if audit["passed"]:
        return {"passed": audit["passed"]}
    failures = audit.get("failures") or audit.get("first_mismatch_ids")
    return {"passed": audit["passed"], "failures": failures}


def print_text(out):
    """The result as `key: value` lines, the audits, then the score in the training log's formats
    (`<label> val_loss:... eval_time:...ms` and `<label>_exact ...`)."""
    for key in ("artifact", "format", "script", "mode", "data_path", "tokenizer_path", "tokens"):
        print(f"{key}: {out[key]}")
    if out.get("ngram_tilt"):
        tilt = out["ngram_tilt"]
        print(
            f"ngram_tilt: order {tilt['order']} threshold {tilt['threshold']} boost "
            f"{tilt['boost']}, {tilt['gated']} of {tilt['targets']} targets tilted, precompute "
            f"{tilt['precompute_s']:.2f}s (inside eval_time)"
        )
    print(f"bytes: {out['bytes']}")
    if out["max_tokens"]:
        print(f"max_tokens: {out['max_tokens']} (a partial score, not the run's figure)")
    elif out.get("val_max_tokens"):
        print(
            f"val_max_tokens: {out['val_max_tokens']} (the run's VAL_MAX_TOKENS: the run's figure, "
            "a quick look, not an official score)"
        )
    for name, audit in out["audits"].items():
        failures = "" if audit["passed"] else f" failures:{audit['failures']}"
        print(f"audit:{name} passed:{audit['passed']}{failures}")

    label = out["label"]
    scores = f"val_loss:{out['val_loss']:.8f} val_bpb:{out['val_bpb']:.8f}"
    print(f"{label} {scores} eval_time:{out['eval_time_ms']:.0f}ms")
    print(f"{label}_exact {scores}")
    print(f"valid: {out['valid']}")


def _fail(msg):
    # torch's text goes on to suggest weights_only=False: never do that
    if "Weights only load failed" in msg:
        msg = (
            msg.split("(Weights only load failed")[0]
            + "(torch.load weights_only=True refused a non-tensor object)"
        )
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
