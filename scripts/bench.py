"""Benchmark a training step of train_gpt.py's model: ms/step, tokens/s, MFU and peak memory.

Two modes. `--dry-run` builds the preset at its real shapes on the meta device (no memory, no
data, any machine) and prints what a step will cost on 8xH100: parameters, FLOPs per token,
activation memory per GPU, the step time at a stated MFU and the steps that fit in 600 s, next to
record #1855's measured figures. Without it, it times real steps on --device (CUDA by default when
present).

Runs W warmup and N timed steps of forward + backward + optimizer (Muon + Adam, as training builds
them) on random tokens, so no data is needed. The step is one rank's share of a TRAIN_BATCH_TOKENS
batch at a world size (WORLD_SIZE from torchrun, or --world-size; default 8): grad_accum = 8 / world
micro-batches of TRAIN_BATCH_TOKENS / 8 tokens each. On CUDA the model is compiled and runs under
bf16 autocast as in training; on CPU it runs eager in fp32. Hyperparameters come from PRESET and the
environment, as for train_gpt.py, and --compare runs a second preset with the same overrides on the
same machine.

  python scripts/bench.py --compare baseline          # record vs baseline on this machine
  NUM_LAYERS=6 MODEL_DIM=64 TRAIN_SEQ_LEN=64 TRAIN_BATCH_TOKENS=4096 \\
    python scripts/bench.py --steps 3 --compare baseline --json     # tiny, CPU, seconds
  python scripts/bench.py --dry-run                   # record at full shape, on paper
  python scripts/bench.py --device cuda --compare baseline --json   # on a GPU

Overrides apply to both presets; with fewer than 6 layers, set RECUR_LAYERS within NUM_LAYERS
(e.g. 1).

MFU counts model FLOPs per token as 6 x parameters (blocks counted once per pass, so depth
recurrence costs what it runs; lookup tables other than the tied embedding/head excluded) + 12 x
layer passes x model_dim x seq_len for attention, against --peak-tflops (default 989, H100 bf16
dense, on CUDA; n/a on CPU unless given). Peak memory is torch.cuda.max_memory_allocated on CUDA,
the process's ru_maxrss on CPU (cumulative over runs).
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg


def flops_per_token(model, h):
    """6 x parameters run per token (recurrent blocks once per pass) + attention's 12 L d T."""
    order = model.orders[model.recur_active]
    per_block = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bigram.embed"))
    params += sum(per_block[i] for i in order) - sum(per_block)
    return 6 * params + 12 * len(order) * h.model_dim * h.train_seq_len


# --- dry run: the full-shape model on the meta device, costed on paper ----------------------------

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of one H100 SXM
RECORD_1855 = {"ms_per_step": 121.7, "steps": 4931}  # 8xH100, 786,432 tokens x 2048 (docs/rules.md)
BUDGET_S = 600.0
BATCH_SPLIT = 8  # grad_accum_steps = 8 // world_size: every rank's micro-batch is 1/8 of the batch


def activation_bytes_per_token(h, model):
    """Bytes saved for backward per token: (per layer pass, once per token). An estimate from a
    count of the tensors each op keeps, under bf16 autocast with the residual stream in fp32 (the
    embedding is an fp32 parameter, so x stays fp32 through the blocks): every matmul input as a
    bf16 copy; q and k three times (raw, normed, rotated); SDPA keeps q, k, v, its output and a
    logsumexp; XSA its normalized values and output; the gate its output; the MLP its two hidden
    tensors; the branch outputs that meet a learned scale. Once per token: the embedding, bigram and
    smear outputs in fp32, and the logits as bf16 matmul output plus three fp32 copies (cast,
    softcap, softmax)."""
    d = h.model_dim
    kv = h.num_kv_heads * (d // h.num_heads)
    hidden = int(h.mlp_mult * d)
    residual = 4 * 3 * d  # block input, attn-norm input, mlp-norm input (fp32)
    matmul_inputs = 2 * (3 * d + hidden)  # c_q/c_k/c_v input, attn proj, fc, mlp proj
    attention = 2 * (3 * (d + kv) + kv + d) + 4 * h.num_heads
    if h.xsa_last_n:
        attention += 2 * (kv + d)
    if h.attn_gate:
        attention += 2 * d
    mlp = 2 * 2 * hidden
    scales = 2 * 2 * d
    per_pass = residual + matmul_inputs + attention + mlp + scales
    once = 4 * 3 * d + h.vocab_size * (2 + 3 * 4)
    if model.bigram is not None:
        once += 2 * h.bigram_dim
    return per_pass, once


def state_bytes(model, h):
    """fp32 weights and gradients, Adam's two moments, Muon's momentum, the fp32 EMA copy."""
    matrices, adam_groups = tg.param_groups(model, h)
    n_all = sum(p.numel() for p in model.parameters())
    n_muon = sum(p.numel() for g in matrices for p in g["params"])
    n_adam = sum(p.numel() for g in adam_groups for p in g["params"])
    ema = 4 * n_all if h.ema_decay > 0 else 0
    return 4 * n_all + 4 * n_all + 8 * n_adam + 4 * n_muon + ema


def dry_run(preset, args, env):
    """Full-shape figures without memory: the model is built on the meta device."""
    h = tg.Hyperparameters.from_env({**env, "PRESET": preset})
    with torch.device("meta"):
        model = tg.build_model(h)
    recurrent = len(model.orders[True]) != len(model.orders[False])
    model.set_recurrence(False)
    fpt_off = flops_per_token(model, h)
    passes_off = len(model.orders[False])
    model.set_recurrence(recurrent)
    fpt_on = flops_per_token(model, h)
    passes_on = len(model.orders[recurrent])
    # Recurrence joins at RECUR_START_FRAC of the wallclock budget: that share of the time runs
    # at the cheaper step.
    off_share = h.recur_start_frac if recurrent else 0.0
    peak = (args.peak_tflops or H100_BF16_TFLOPS) * 1e12
    per_pass, once = activation_bytes_per_token(h, model)
    micro_tokens = h.train_batch_tokens // BATCH_SPLIT
    act_bytes = micro_tokens * (passes_on * per_pass + once)
    states = state_bytes(model, h)
    out = {
        "preset": preset,
        "device": "meta (no memory)",
        "params": sum(p.numel() for p in model.parameters()),
        "params_matmul": sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("bigram.embed")
        ),
        "layers": h.num_layers,
        "layer_passes": passes_on,
        "layer_passes_before_recurrence": passes_off,
        "model_dim": h.model_dim,
        "vocab_size": h.vocab_size,
        "seq_len": h.train_seq_len,
        "batch_tokens": h.train_batch_tokens,
        "flops_formula": "6 x matmul params per pass (recurrent blocks per pass) "
        "+ 12 x layer passes x model_dim x seq_len",
        "flops_per_token": fpt_on,
        "flops_per_token_before_recurrence": fpt_off,
        "flops_per_step": fpt_on * h.train_batch_tokens,
        "micro_batch_tokens_per_gpu": micro_tokens,
        "micro_batch_seqs_per_gpu": micro_tokens // h.train_seq_len,
        "activation_bytes_per_token_per_pass": per_pass,
        "activation_bytes_per_token_once": once,
        "activation_gib_per_gpu": round(act_bytes / 2**30, 2),
        "state_gib_per_gpu": round(states / 2**30, 3),
        "memory_assumptions": "bf16 autocast, fp32 residual stream, no activation checkpointing; "
        "per-GPU activations are the same at 1/2/4/8 GPUs (micro-batch = batch / 8)",
        "mfu": args.mfu,
        "peak_tflops_per_gpu": peak / 1e12,
    }
    for world in (1, 2, 4, 8):
        sec_on = fpt_on * h.train_batch_tokens / world / (args.mfu * peak)
        sec_off = fpt_off * h.train_batch_tokens / world / (args.mfu * peak)
        steps = off_share * BUDGET_S / sec_off + (1 - off_share) * BUDGET_S / sec_on
        out[f"gpus{world}.grad_accum_steps"] = BATCH_SPLIT // world
        out[f"gpus{world}.ms_per_step"] = round(1000 * sec_on, 1)
        out[f"gpus{world}.steps_in_600s"] = int(steps)
    if preset == "record":
        # The MFU at which this projection gives #1855's step count: steps = 600 s x MFU x peak x
        # (off_share / flops_off + (1 - off_share) / flops_on), flops per GPU per step.
        per_gpu = h.train_batch_tokens / 8
        rate = off_share / (fpt_off * per_gpu) + (1 - off_share) / (fpt_on * per_gpu)
        out["pr1855.ms_per_step"] = RECORD_1855["ms_per_step"]
        out["pr1855.steps"] = RECORD_1855["steps"]
        out["pr1855.implied_mfu"] = round(RECORD_1855["steps"] / (BUDGET_S * peak * rate), 3)
    return out


def bench(preset, args, env, device):
    h = tg.Hyperparameters.from_env({**env, "PRESET": preset})
    world = args.world_size or int(env.get("WORLD_SIZE", 8))
    if world < 1 or 8 % world:
        raise ValueError(f"world size {world}: must divide 8")
    grad_accum = 8 // world
    seqs = h.train_batch_tokens // 8 // h.train_seq_len

    torch.manual_seed(h.seed)
    model = tg.build_model(h).to(device)
    if args.recurrence != "built":
        model.set_recurrence(args.recurrence == "on")
    optimizers = tg.build_optimizers(model, h, device)  # the training script's own
    compiled = device.type == "cuda" and h.compile and not args.no_compile
    step_model = torch.compile(model, dynamic=False) if compiled else model

    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, h.vocab_size, (seqs, h.train_seq_len + 1), generator=gen).to(device)
        for _ in range(grad_accum)
    ]

    def step():
        for b in batches:
            with tg._autocast(device):
                loss = step_model(b[:, :-1], b[:, 1:])
            (loss / grad_accum).backward()
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warmup (compile, allocator), then the timed steps.
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    ms = 1000.0 * (time.perf_counter() - t0) / args.steps

    tokens = grad_accum * seqs * h.train_seq_len
    fpt = flops_per_token(model, h)
    tflops = fpt * tokens / ms / 1e9
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    return {
        "preset": preset,
        "device": tg.device_description(device),
        "compiled": compiled,
        "threads": torch.get_num_threads() if device.type == "cpu" else "n/a",
        "world_size": world,
        "grad_accum_steps": grad_accum,
        "micro_batch_seqs": seqs,
        "seq_len": h.train_seq_len,
        "tokens_per_step_rank": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "layer_passes": len(model.orders[model.recur_active]),
        "flops_per_token": fpt,
        "steps": args.steps,
        "warmup": args.warmup,
        "ms_per_step": round(ms, 3),
        "tokens_per_s_rank": round(tokens / ms * 1000.0, 1),
        "tokens_per_s_global": round(tokens * world / ms * 1000.0, 1),
        "tflops_rank": round(tflops, 4),
        "mfu": round(tflops / peak, 4) if peak else "n/a",
        "peak_tflops": peak or "n/a",
        "peak_memory_mib": round(mem, 1),
        "final_loss": round(float(loss.detach()), 4),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset",
        default=os.environ.get("PRESET", "record"),
        help="preset to measure (env PRESET)",
    )
    ap.add_argument(
        "--compare",
        default="",
        help="a second preset measured with the same overrides, e.g. baseline",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compile, allocator)"
    )
    ap.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="world size for the per-rank batch (default WORLD_SIZE or 8)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="peak for MFU (default 989 on CUDA, n/a on CPU)",
    )
    ap.add_argument(
        "--recurrence",
        choices=("built", "on", "off"),
        default="built",
        help="depth recurrence state to time (built: as build_model leaves it, on)",
    )
    ap.add_argument("--no-compile", action="store_true", help="eager on CUDA too")
    ap.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to time steps (auto: CUDA when present); cuda fails when there is none",
    )
    ap.add_argument("--cpu", action="store_true", help="same as --device cpu")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="full shapes on the meta device: params, FLOPs, memory and step time on paper",
    )
    ap.add_argument(
        "--mfu",
        type=float,
        default=0.40,
        help="model FLOPs utilization the dry run projects the step time at",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default torch's; on a shared machine 1 "
        "avoids OpenMP spin-waits that slow steps tens of times)",
    )
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object instead of key: value lines"
    )
    args = ap.parse_args(argv)

    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup non-negative")
    if not 0 < args.mfu <= 1:
        ap.error("--mfu must be in (0, 1]")
    env = {k: v for k, v in os.environ.items() if k != "PRESET"}
    presets = [args.preset] + ([args.compare] if args.compare else [])
    if args.dry_run:
        return report([dry_run(p, args, env) for p in presets], args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    use_cuda = torch.cuda.is_available() and args.device != "cpu" and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu":
        # as train_gpt.py on CPU: denormal weights slow matmuls several-fold
        torch.set_flush_denormal(True)
        if args.threads:
            torch.set_num_threads(args.threads)

    return report([bench(p, args, env, device) for p in presets], args)


def report(runs, args):
    """Print the runs as key: value lines (prefixed by preset when there are two) or one JSON."""
    out = {r["preset"]: r for r in runs}
    ratio_key = "ms_per_step_ratio" if "ms_per_step" in runs[0] else "flops_per_token_ratio"
    if len(runs) == 2:
        metric = ratio_key.removesuffix("_ratio")
        out[ratio_key] = round(runs[0][metric] / runs[1][metric], 3)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0

    for r in runs:
        for key, value in r.items():
            print(f"{r['preset']}.{key}: {value}" if len(runs) > 1 else f"{key}: {value}")
    if len(runs) == 2:
        print(f"{ratio_key}: {out[ratio_key]} ({runs[0]['preset']} / {runs[1]['preset']})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
