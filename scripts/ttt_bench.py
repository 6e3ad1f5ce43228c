"""TTT eval time on this CPU, per token, and projected for 8xH100 (issue 16).

  OMP_NUM_THREADS=2 python scripts/ttt_bench.py --preset record --val-tokens 4096
  python scripts/ttt_bench.py --preset smoke --modes sliding,ttt_lora,ttt_phased

Scores the first --val-tokens tokens of a real val shard (real document lengths: LoRA TTT's cost
grows with them, since each chunk is one forward of up to EVAL_SEQ_LEN tokens of its document) with
a randomly initialised model of the preset's shape, in each mode, and prints the wall time and the
time per scored token. The projection to 8xH100:

  t_8xH100 = t_per_token_cpu x projected_tokens x (F_cpu / (F_h100 x MFU)) / 8

where F_cpu is this CPU's fp32 matmul rate measured here (the TTT eval is matmul-bound: forward and
backward of the model), F_h100 = 989 TFLOP/s (H100 SXM dense bf16 peak, NVIDIA's datasheet) and MFU
(default 0.25: small per-document batches, forward + backward of 48-token chunks; state your own
with --mfu) is the fraction of that peak the TTT eval reaches. The ratio is an assumption, not a
measurement; on a lent GPU run this script there instead (it then measures, and projects only x8).
"""

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H100_BF16_PEAK = 989e12
# Real FineWeb val tokens and their tokenizer: a folder named by FINEWEB_SAMPLE holding
# shards/realtext_sp1024 and tokenizers/fineweb_1024_bpe.model (or pass --shard / --tokenizer).
SAMPLE = os.environ.get("FINEWEB_SAMPLE", "")
SHARD = os.path.join(SAMPLE, "shards", "realtext_sp1024", "fineweb_val_000000.bin")
TOKENIZER = os.path.join(SAMPLE, "tokenizers", "fineweb_1024_bpe.model")


def load_train_gpt():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt", os.path.join(REPO, "train_gpt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def matmul_flops(device, n=1024, reps=20):
    """Measured fp32 (CPU) or bf16 (CUDA) matmul rate, FLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="record", help="model shape and TTT knobs from this PRESET")
    p.add_argument("--val-tokens", type=int, default=4096)
    p.add_argument("--modes", default="sliding,ttt_lora,ttt_phased")
    p.add_argument("--shard", default=SHARD, help="a val shard (default: under $FINEWEB_SAMPLE)")
    p.add_argument("--tokenizer", default=TOKENIZER, help="its tokenizer")
    p.add_argument("--mfu", type=float, default=0.25)
    p.add_argument(
        "--project-tokens",
        type=int,
        default=62_021_632,
        help="val tokens to project to (sp1024 FineWeb val: 62,021,632)",
    )
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE hyperparameter overrides")
    args = p.parse_args()
    gpt = load_train_gpt()
    env = {"PRESET": args.preset, "COMPILE": "0", "VOCAB_SIZE": "1024", "TTT_PHASES": "2,4,6"}
    env.update(kv.split("=", 1) for kv in args.env)
    h = gpt.Hyperparameters.from_env(env)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = gpt.build_model(h).to(device).eval()
    tokens = gpt.load_data_shard(args.shard)[: args.val_tokens + 1].to(torch.int64)
    sp = gpt.load_tokenizer(args.tokenizer, h.vocab_size)
    luts = gpt.build_sentencepiece_luts(sp, h.vocab_size, device)
    docs = gpt.val_documents(tokens)
    flops = matmul_flops(device)
    n_params = sum(p.numel() for p in model.parameters())
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"machine: {where}; matmul {flops / 1e9:.1f} GFLOP/s measured")
    print(
        f"model: PRESET={args.preset} {h.num_layers}L x {h.model_dim}, {n_params:,} parameters; "
        f"window {h.eval_len}, LoRA rank {h.ttt_lora_rank}, chunk {h.ttt_lora_chunk}, "
        f"batch {h.ttt_lora_batch_docs} docs, phases {h.ttt_phases}"
    )
    print(
        f"val: {tokens.numel() - 1} targets in {len(docs)} documents "
        f"(mean {(tokens.numel() - 1) / len(docs):.0f} tokens)"
    )
    ratio = 1.0 if device.type == "cuda" else flops / (H100_BF16_PEAK * args.mfu)
    for mode in args.modes.split(","):
        res = gpt.EVAL_MODES[mode].evaluate(h, model, tokens, luts)
        sec = res["eval_time_ms"] / 1000
        per_tok = sec / res["tokens"]
        proj = per_tok * args.project_tokens * ratio / 8
        print(
            f"{mode:11s} {sec:8.2f} s  {1e6 * per_tok:9.1f} us/token  "
            f"val_bpb {res['val_bpb']:.4f}  "
            f"audit {res['score_first']['passed']}  -> 8xH100 projection {proj:7.1f} s "
            f"for {args.project_tokens:,} tokens"
        )
    if device.type != "cuda":
        print(
            f"projection ratio CPU->H100: {flops / 1e9:.1f} GFLOP/s / ({H100_BF16_PEAK / 1e12:.0f} "
            f"TFLOP/s x MFU {args.mfu}) = {ratio:.2e}; an assumption, not a measurement"
        )


if __name__ == "__main__":
    main()
