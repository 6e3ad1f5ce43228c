"""Benchmark a training step of train_gpt.py's model: ms/step, tokens/s, MFU and peak memory.

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
import train_gpt as tg  # noqa: E402


def flops_per_token(model, h):
    """6 x parameters run per token (recurrent blocks once per pass) + attention's 12 L d T."""
    order = model.orders[model.recur_active]
    per_block = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bigram.embed"))
    params += sum(per_block[i] for i in order) - sum(per_block)
    return 6 * params + 12 * len(order) * h.model_dim * h.train_seq_len


def build_optimizers(model, h, device):
    matrices, adam_groups = tg.param_groups(model, h)
    return [
        tg.Muon(
            matrices,
            lr=h.matrix_lr,
            momentum=h.muon_momentum,
            backend_steps=h.muon_backend_steps,
            weight_decay=h.muon_wd,
            row_norm=h.muon_row_norm,
        ),
        torch.optim.AdamW(
            adam_groups,
            betas=(h.beta1, h.beta2),
            eps=h.adam_eps,
            weight_decay=h.adam_wd,
            fused=device.type == "cuda",
        ),
    ]


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
    optimizers = build_optimizers(model, h, device)
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
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
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
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        # as train_gpt.py on CPU: denormal weights slow matmuls several-fold
        torch.set_flush_denormal(True)
        if args.threads:
            torch.set_num_threads(args.threads)

    env = {k: v for k, v in os.environ.items() if k != "PRESET"}
    runs = [
        bench(p, args, env, device)
        for p in [args.preset] + ([args.compare] if args.compare else [])
    ]
    out = {r["preset"]: r for r in runs}
    if len(runs) == 2:
        out["ms_per_step_ratio"] = round(runs[0]["ms_per_step"] / runs[1]["ms_per_step"], 3)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0

    for r in runs:
        for key, value in r.items():
            print(f"{r['preset']}.{key}: {value}" if len(runs) > 1 else f"{key}: {value}")
    if len(runs) == 2:
        ratio = out["ms_per_step_ratio"]
        print(f"ms_per_step_ratio: {ratio} ({runs[0]['preset']} / {runs[1]['preset']})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
