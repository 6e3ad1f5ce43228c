"""Shared fixtures: the repository root, the scripts under test, real data beside the checkout, and
a small dataset built offline (the embedded corpus) once per session."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SCRIPTS = [
    name
    for name in ("train_gpt.py", "train_manifold.py", "train_hydra.py")
    if (REPO / name).exists()
]

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A model small enough to train a few steps in seconds on a 2-core CPU.
TINY_ENV = {
    "PRESET": "smoke",
    "ITERATIONS": "6",
    "WARMUP_STEPS": "0",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "4096",
    "VAL_LOSS_EVERY": "0",
    "EVAL_SEQ_LEN": "64",
    "EVAL_STRIDE": "32",
    "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_BATCH_SIZE": "16384",
    "TTT_CHUNK_TOKENS": "4096",
    "VAL_MAX_TOKENS": "16384",
    # The smoke preset skips these evals on a laptop (issue 18); the tiny test runs keep them, so
    # the pipeline's every eval and log line stays under test (tests/test_laptop.py covers the
    # smoke defaults).
    "PRE_QUANT_EVAL": "1",
    "ROUNDTRIP_EVAL": "1",
}

# What each script adds to TINY_ENV for a tiny end-to-end run (its own test file's settings).
TINY_RUN = {
    "train_gpt.py": {},
    "train_hydra.py": {"HYDRA_SLOTS": "8", "HYDRA_CHUNK": "32"},
    "train_manifold.py": {"MODEL_DIM": "32", "MANIFOLD_MODES": "16", "MANIFOLD_COORDS": "4",
                          "ROUTE_TOPK": "8", "MANIFOLD_PHYSICS_STEPS": "5",
                          "MANIFOLD_PHYSICS_DIM": "16", "MANIFOLD_PAIRS": "400"},
}  # fmt: skip


def load_script(name):
    """Import a training script as a module (they are importable with no side effects)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", params=SCRIPTS)
def script(request):
    return load_script(request.param)


@pytest.fixture(scope="session")
def gpt():
    return load_script("train_gpt.py")


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded corpus (tokenizer + shards), built offline into a temp dir,
    or the repo's copy."""
    from data.embedded import build_embedded

    root = tmp_path_factory.mktemp("embedded")
    build_embedded(str(root), vocab_size=1024)
    return {
        "DATA_PATH": str(root / "datasets" / "pydoc_sp1024"),
        "TOKENIZER_PATH": str(root / "tokenizers" / "pydoc_1024_bpe.model"),
    }


@pytest.fixture(scope="session")
def real_sp1024():
    shards = SHARED_DATA / "shards" / "realtext_sp1024"
    tok = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
    if not (shards / "fineweb_val_000000.bin").exists() or not tok.exists():
        pytest.skip("../shared/data (real FineWeb shards) is not present beside the checkout")
    return {"DATA_PATH": str(shards), "TOKENIZER_PATH": str(tok)}


def run_script(script_name, env_overrides, cwd, nproc=None, timeout=600):
    """Run a training script as a user would (python or torchrun); returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1" if nproc else env.get("OMP_NUM_THREADS", "2"),
        }
    )
    env.update(env_overrides)
    path = str(REPO / script_name)
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            path,
        ]
    else:
        cmd = [sys.executable, path]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def summary_of(log_text):
    import json

    lines = [line for line in log_text.splitlines() if line.startswith("summary: ")]
    return json.loads(lines[-1][len("summary: ") :]) if lines else None


def perturbed_model(module, env, seed=0):
    """(model, h) of `module` built from `env`, every weight perturbed, so zero-initialized
    projections, gates and lambdas do not hide what a technique computes."""
    h = module.Hyperparameters.from_env(env)
    torch.manual_seed(seed)
    model = module.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, h


def run_interpreted(code, *args, timeout=600):
    """stdout of `code` run by a fresh interpreter with TRITON_INTERPRET=1 (the Triton kernels on
    the CPU, which must be set before triton is imported) and one thread; a failure unless it
    exits 0. Skips where triton is not installed."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def random_tokens(h, batch=2, seq=32, seed=1):
    """Token ids of a (batch, seq) input, never a special id."""
    return torch.randint(
        2, h.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )
