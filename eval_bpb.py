"""Re-score an artifact: ours (.pga, by the script that wrote it) or the official .int8.ptz.

  python eval_bpb.py logs/RUN.pga          # mode, data, tokenizer from the header
  python eval_bpb.py final_model.int8.ptz --data-path data/datasets/fineweb10B_sp1024 \
      --tokenizer-path data/tokenizers/fineweb_1024_bpe.model      # official baseline format
  EVAL_STRIDE=64 torchrun --standalone --nproc_per_node=8 eval_bpb.py ARTIFACT --mode sliding

Our artifact names its script and the script's sha256: the script is taken from --script, else
beside the artifact, its parent folder, or the current folder, must hash to that sha256, and is
then imported from its path so that its own loader, model and eval functions (its EVAL_MODES)
score the bytes (the training run did the same, so the figures agree to the printed digits). Our
format holds no pickle; the official .ptz is read with torch.load(weights_only=True) only, through
this tool's `load_official_int8`, and evaluated with the `baseline` preset architecture sized from
its tensors (env vars such as NUM_LAYERS or TRAIN_SEQ_LEN override). Eval settings come from the
artifact's hyperparameters; env vars EVAL_SEQ_LEN, EVAL_STRIDE, TTT_*, AUDIT_SEQ_LEN,
VAL_BATCH_SIZE and VAL_MAX_TOKENS override them. The causality audit (at TRAIN_SEQ_LEN and at the
eval window) and the byte audit run before scoring. Exit status: 0 ok, 2 bad input (one line on
stderr), 3 an audit failed (score INVALID).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import struct
import sys
import warnings
import zlib

# This checkout's training script, for its file hash only: scripts and tokenizers are hashed before
# any of them is trusted. The eval modes come from the script that wrote the artifact (load()).
from train_gpt import file_sha256

HERE = os.path.dirname(os.path.abspath(__file__))
ARTIFACT_MAGIC = b"PGOLFART"
PREFIX = struct.Struct("<8sII")
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


def load_official_int8(path, max_bytes=1 << 31):
    """State dict of an official `final_model.int8.ptz`: zlib of a torch.save dict in the
    int8_clean_per_row_v1 format. torch.load runs with weights_only=True, so a pickle carrying code
    is refused, never executed."""
    import io
    import pickle

    import torch

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
    """Our artifact's JSON header, or None for anything else (the official reader judges those)."""
    with open(path, "rb") as f:
        prefix = f.read(PREFIX.size)
        if prefix[:8] != ARTIFACT_MAGIC:
            return None
        if len(prefix) < PREFIX.size:
            raise BadInput(f"{path}: truncated artifact ({len(prefix)} bytes)")
        _, _, head_len = PREFIX.unpack(prefix)
        if head_len > min(16 << 20, os.path.getsize(path) - PREFIX.size):
            raise BadInput(f"{path}: truncated or corrupt artifact header")
        try:
            header = json.loads(f.read(head_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"{path}: corrupt artifact header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or not header.get("script") or not header.get("script_sha256"):
        raise BadInput(f"{path}: the artifact header names no script")
    return header


def find_script(artifact, header, given):
    """The script the header names, with a matching sha256."""
    want = header["script_sha256"]
    if given:
        if not os.path.isfile(given):
            raise BadInput(f"--script {given}: no such file")
        got = file_sha256(given)
        if got != want:
            raise BadInput(
                f"--script {given}: sha256 {got[:16]}... does not match the artifact's "
                f"script_sha256 {want[:16]}... ({header['script']})"
            )
        return given
    here = os.path.dirname(os.path.abspath(artifact))
    seen = []
    for folder in (here, os.path.dirname(here), os.getcwd()):
        cand = os.path.join(folder, os.path.basename(header["script"]))
        if os.path.isfile(cand) and cand not in seen:
            seen.append(cand)
            if file_sha256(cand) == want:
                return cand
    if seen:
        raise BadInput(
            f"{seen[0]}: sha256 does not match the artifact's script_sha256 {want[:16]}...; "
            f"pass the exact {header['script']} that wrote it with --script"
        )
    raise BadInput(
        f"{header['script']} (sha256 {want[:16]}...) not found beside {artifact}; "
        "pass it with --script"
    )


def import_script(path):
    name = f"pgolf_script_{file_sha256(path)[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
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


def load(args, env):
    """(module, model, h, info) for either format, with the eval overrides applied."""
    if not os.path.isfile(args.artifact):
        raise BadInput(f"{args.artifact}: no such file")
    header = peek_header(args.artifact)
    info = {"artifact": args.artifact, "artifact_bytes": os.path.getsize(args.artifact)}

    if header is not None:
        script = find_script(args.artifact, header, args.script)
        mod = import_script(script)
        model, h = mod.load_artifact(args.artifact)
        info.update(
            format=header.get("format", "pgolf-artifact"),
            script=script,
            script_sha256=header["script_sha256"],
            tokenizer_sha256=header.get("tokenizer_sha256"),
            code_bytes=os.path.getsize(script),
        )
        info["total_bytes"] = info["artifact_bytes"] + info["code_bytes"]
    else:
        script = args.script or os.path.join(HERE, "train_gpt.py")
        if not os.path.isfile(script):
            raise BadInput(
                f"{script}: no such file (the baseline format is evaluated with train_gpt.py)"
            )
        mod = import_script(script)

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


def eval_modes(mod, script):
    """The script's registry of eval modes: name -> EvalMode(name, evaluate, label)."""
    modes = getattr(mod, "EVAL_MODES", None)
    if modes is None:
        raise BadInput(f"{script}: defines no EVAL_MODES (older than the eval-mode registry)")
    return modes


def evaluate(mod, model, h, rt, max_tokens=None):
    """(mode, result, audits): the audits run on the model before the eval mode scores it."""
    sp = mod.load_tokenizer(h.tokenizer_path, h.vocab_size)
    from train_gpt import load_checked_val_tokens  # this checkout's data checks, for any script

    val_tokens = load_checked_val_tokens(h, sp, max(h.train_seq_len, h.eval_len))
    # --max-tokens, else the run's VAL_MAX_TOKENS: the first N + 1 tokens
    limit = max_tokens or getattr(h, "val_max_tokens", 0)
    if limit:
        val_tokens = val_tokens[: limit + 1]
    model = model.to(rt.device)
    luts = mod.build_sentencepiece_luts(sp, h.vocab_size, rt.device)

    audits = {
        "causality": mod.audit_causality(model, h.audit_seq_len or h.train_seq_len, h.vocab_size)
    }
    if h.eval_len != (h.audit_seq_len or h.train_seq_len):
        audits["causality_eval"] = mod.audit_causality(model, h.eval_len, h.vocab_size)
    audits["bytes"] = mod.audit_bytes(sp, val_tokens, luts)

    mode = "ttt" if h.ttt_enabled else h.eval_mode
    res = mod.EVAL_MODES[mode].evaluate(h, model, val_tokens, luts)
    if "score_first" in res:
        audits["score_first"] = res["score_first"]
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
        help="training script (ours: must match the header's sha256; official: train_gpt.py)",
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
    try:
        mod, model, h, info = load(args, env)
        rt = mod.setup_runtime()
        mode, res, audits = evaluate(mod, model, h, rt, args.max_tokens)
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
            "world_size": rt.world_size,
            "device": str(rt.device),
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
    print(f"bytes: {out['bytes']}")
    if out["max_tokens"]:
        print(f"max_tokens: {out['max_tokens']} (a partial score, not the run's figure)")
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
