"""Reference writer and reader of the official baseline artifact, `int8_clean_per_row_v1` + zlib
(the official baseline's format).

Written from the rules text, independently of train_gpt.py, so that eval_bpb.py's official path is
checked against a second implementation:
- non-float tensors pass through; float tensors with numel <= 65,536 pass through as fp16, except
  control tensors (attn_scale, mlp_scale, resid_mix, q_gain, skip_weight) which stay fp32; the
  original dtype of a downcast tensor is recorded in passthrough_orig_dtypes;
- larger 2-D float tensors: per row, clip = quantile(|w_row|, 0.9999984),
  scale = max(clip / 127, 1 / 127) stored as fp16,
  q = round(clamp(w, -clip, clip) / scale) in [-127, 127];
- any other large float tensor: one per-tensor scale of the same form;
- the dict is torch.save'd and zlib-compressed at level 9.
"""

import io
import zlib

import torch

FORMAT = "int8_clean_per_row_v1"
CLIP_Q = 99.99984 / 100.0
KEEP_FLOAT_MAX_NUMEL = 65_536
CONTROL_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def quantize(state):
    obj = {
        "__quant_format__": FORMAT,
        "quantized": {},
        "scales": {},
        "dtypes": {},
        "passthrough": {},
        "qmeta": {},
        "passthrough_orig_dtypes": {},
    }
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if not t.is_floating_point():
            obj["passthrough"][name] = t
            continue
        if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            if any(p in name for p in CONTROL_PATTERNS):
                obj["passthrough"][name] = t.float()
                if t.dtype != torch.float32:
                    obj["passthrough_orig_dtypes"][name] = _dtype_name(t.dtype)
            else:
                obj["passthrough"][name] = t.half()
                obj["passthrough_orig_dtypes"][name] = _dtype_name(t.dtype)
            continue
        w = t.float()
        if w.ndim == 2:
            clip = torch.quantile(w.abs(), CLIP_Q, dim=1)
            scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
            clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
            q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
            obj["qmeta"][name] = {"scheme": "per_row", "axis": 0}
            obj["scales"][name] = scale.half()
        else:
            clip = torch.quantile(w.abs().flatten(), CLIP_Q)
            scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
            q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -127, 127).to(
                torch.int8
            )
            obj["scales"][name] = scale.float()
        obj["quantized"][name] = q.contiguous()
        obj["dtypes"][name] = _dtype_name(t.dtype)
    return obj


def dequantize(obj):
    """The state dict the official loader rebuilds: q x scale (per row or per tensor),
    passthrough restored."""
    state = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name].float()
        w = q.float() * (s[:, None] if s.ndim == 1 else s)
        state[name] = w.to(getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        orig = obj["passthrough_orig_dtypes"].get(name)
        state[name] = t.to(getattr(torch, orig)) if orig else t
    return state


def write_ptz(state, path):
    """Quantize, torch.save, zlib 9; returns the quantized object."""
    obj = quantize(state)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(zlib.compress(buf.getvalue(), 9))
    return obj
