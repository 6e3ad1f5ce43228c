"""Download the official shards and tokenizer from the Hugging Face hub, by the published manifest.

The hub repo (a dataset repo) holds, under a remote prefix (default `datasets`):
    manifest.json
    datasets/fineweb10B_sp1024/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    tokenizers/fineweb_1024_bpe.model (+ .vocab)
and is mirrored locally without the prefix: data/manifest.json, data/datasets/...,
data/tokenizers/....

    python -m data.download --variant sp1024 --train-shards 80 [--local-dir data] [--repo-id ...]
    python -m data.download --variant sp8192_caseops [--from-docs]   (data/caseops_hub.py)

Always fetches the manifest (a stale cached manifest is a known pitfall), all val shards, the first
N train shards and the tokenizer. A file already present is skipped when it verifies: for a shard,
a valid header and exactly the token count the manifest implies (shard_size per full file, the rest
in the last). The dataset folder then gets shards.json, the sha256 of the tokenizer that came with
the shards, so that training and eval refuse any other tokenizer for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from data.build import report
from data.caseops_hub import CASEOPS_REPO_ID, CHECK_DOCS, download_caseops
from data.caseops_hub import VARIANT as CASEOPS_VARIANT
from data.hub import HUB_DIR_ENV, expected_shard_tokens, explain_hub_error
from data.shards import check_shard, progress, write_binding

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_PREFIX = "datasets"


def fetch(repo_id: str, filename: str, local_dir: Path) -> Path:
    """The only call that touches the network: download `filename` of the dataset repo under
    local_dir.

    Tests replace this with a stand-in that serves files from a local directory.
    """
    from huggingface_hub import constants, hf_hub_download

    # Resolve the hub's name first: offline, the hub client would retry for ~25 s before failing.
    # Behind a proxy the local resolver may not know the hub, so the check is skipped there.
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if not any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        try:
            socket.getaddrinfo(host, 443)
        except OSError as e:
            raise ConnectionError(f"cannot resolve {host}: {e}") from None
    return Path(
        hf_hub_download(
            repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=local_dir
        )
    )


def _fetch_checked(repo_id: str, filename: str, staging: Path) -> Path:
    """fetch() with hub failures turned into one actionable line."""
    try:
        return fetch(repo_id, filename, staging)
    except Exception as e:  # classified by explain_hub_error; anything unknown is re-raised
        explained = explain_hub_error(e, repo_id, filename)
        if explained is None:
            raise
        raise explained from None


def available_variants(manifest: dict) -> dict[str, dict]:
    """Variant name (the dataset suffix, e.g. sp1024) -> its dataset entry in the manifest."""
    return {
        entry["name"].rsplit("_", 1)[-1]: entry
        for entry in manifest.get("datasets", [])
        if "name" in entry
    }


def plan_files(manifest: dict, variant: str, train_shards: int) -> list[tuple[str, int | None]]:
    """(path relative to the remote prefix, expected token count or None) for every file to
    fetch."""
    variants = available_variants(manifest)
    if variant not in variants:
        raise ValueError(
            f"unknown variant {variant!r}: "
            f"the manifest lists {', '.join(sorted(variants)) or 'none'}"
        )
    entry = variants[variant]
    val, train = expected_shard_tokens(manifest, entry, variant, train_shards)
    base = entry.get("path") or f"datasets/{entry['name']}"
    plan = [(f"{base}/fineweb_val_{i:06d}.bin", tokens) for i, tokens in enumerate(val)]
    plan += [(f"{base}/fineweb_train_{i:06d}.bin", tokens) for i, tokens in enumerate(train)]
    tokenizer = next(
        (t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")),
        {},
    )
    vocab = variant.removeprefix("sp")
    model = tokenizer.get("model_path") or f"tokenizers/fineweb_{vocab}_bpe.model"
    plan.append((model, None))
    if tokenizer.get("vocab_path"):
        plan.append((tokenizer["vocab_path"], None))
    return plan


def variant_vocab_size(manifest: dict, variant: str) -> int:
    """The vocabulary size of a variant: the manifest's dataset entry, else the digits of its name
    (sp1024 -> 1024)."""
    entry = available_variants(manifest).get(variant, {})
    if entry.get("vocab_size"):
        return int(entry["vocab_size"])
    digits = variant.removeprefix("sp")
    if not digits.isdigit():
        raise ValueError(f"variant {variant!r}: no vocab_size in the manifest and none in the name")
    return int(digits)


def verify_file(path: Path, expected_tokens: int | None) -> None:
    """Raise ValueError when a local file is missing, empty, or (for a shard) malformed or the
    wrong length."""
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    if path.suffix == ".bin":
        num_tokens = check_shard(path)
        if expected_tokens is not None and num_tokens != expected_tokens:
            raise ValueError(
                f"{path}: holds {num_tokens} tokens, the manifest implies {expected_tokens}"
            )
    elif path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")


def download(
    variant: str,
    train_shards: int,
    local_dir: str | os.PathLike = "data",
    repo_id: str = REPO_ID,
    remote_prefix: str = REMOTE_PREFIX,
) -> dict:
    """Fetch the manifest, val shards, the first train_shards train shards and the tokenizer.

    Returns a summary.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    # On the same filesystem, so finished files move into place atomically.
    staging = local_dir / ".download"
    prefix = remote_prefix.strip("/")

    def get(relative: str, expected_tokens: int | None = None) -> Path:
        remote = f"{prefix}/{relative}" if prefix else relative
        got = _fetch_checked(repo_id, remote, staging)
        try:
            verify_file(got, expected_tokens)
        except ValueError as e:
            raise RuntimeError(f"{remote}: downloaded file failed verification: {e}") from None
        dest = local_dir / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(got), str(dest))
        return dest

    downloaded = 0
    skipped = 0
    try:
        manifest_path = get("manifest.json")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        plan = plan_files(manifest, variant, train_shards)
        for relative, expected_tokens in progress(plan, f"download {variant}", unit="file"):
            try:
                verify_file(local_dir / relative, expected_tokens)
                skipped += 1
                continue
            except ValueError:
                pass
            get(relative, expected_tokens)
            downloaded += 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shards = [p for p, _ in plan if p.endswith(".bin")]
    dataset_dir = local_dir / Path(shards[0]).parent
    tokenizer_path = local_dir / next(p for p, _ in plan if p.endswith(".model"))
    write_binding(dataset_dir, tokenizer_path, variant_vocab_size(manifest, variant))
    return {
        "variant": variant,
        "repo_id": repo_id,
        "dataset": str(dataset_dir),
        "tokenizer": str(tokenizer_path),
        "val_shards": sum(1 for p in shards if "_val_" in Path(p).name),
        "train_shards": train_shards,
        "downloaded": downloaded,
        "skipped": skipped,
        "manifest": str(manifest_path),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.download",
        description=(
            "Download the official Parameter Golf shards and tokenizer from the Hugging Face hub, "
            "or the CaseOps SP8192 data of the record preset (--variant sp8192_caseops)."
        ),
    )
    parser.add_argument(
        "--variant",
        default="sp1024",
        help=(
            "tokenizer variant named in the manifest, e.g. sp1024, sp4096, sp8192, or "
            f"{CASEOPS_VARIANT} (romeerp/parameter-golf-caseops-v1) (default: sp1024)"
        ),
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=80,
        help="number of train shards to fetch, from the first (default: 80, the usual 8B tokens)",
    )
    parser.add_argument(
        "--local-dir",
        default="data",
        help="local root for manifest.json, datasets/ and tokenizers/ (default: data)",
    )
    parser.add_argument(
        "--repo-id",
        default=None,
        help=f"Hugging Face dataset repo (default: {REPO_ID}; {CASEOPS_VARIANT}: the CaseOps repo)",
    )
    parser.add_argument(
        "--remote-prefix",
        default=None,
        help=f"folder of the export inside the repo (default: {REMOTE_PREFIX})",
    )
    caseops = parser.add_argument_group(f"{CASEOPS_VARIANT} only")
    caseops.add_argument(
        "--from-docs",
        action="store_true",
        help="build the shards locally from the official docs_selected.jsonl (about 48 GB; "
        "resumable) instead of downloading them",
    )
    caseops.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--from-docs: tokenizer worker processes (default: the CPU count)",
    )
    caseops.add_argument(
        "--check-docs",
        type=int,
        default=CHECK_DOCS,
        help="download: the first N documents of docs_selected.jsonl our builder must reproduce "
        f"byte for byte in the fetched val split (default: {CHECK_DOCS}; 0 skips the check)",
    )
    caseops.add_argument(
        "--hub-dir",
        default=None,
        help=f"read a local folder laid out like the hub (DIR/<owner>/<name>/...) instead of the "
        f"network (default: ${HUB_DIR_ENV} when set)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return parser


def _action(args):
    """The download or build the arguments ask for; ValueError for options of the other kind."""
    if args.variant != CASEOPS_VARIANT:
        for flag, given in (
            ("--from-docs", args.from_docs),
            ("--workers", args.workers is not None),
            ("--hub-dir", args.hub_dir is not None),
            ("--check-docs", args.check_docs != CHECK_DOCS),
        ):
            if given:
                raise ValueError(f"{flag}: only for --variant {CASEOPS_VARIANT}")
        return lambda: download(
            args.variant,
            args.train_shards,
            args.local_dir,
            args.repo_id or REPO_ID,
            REMOTE_PREFIX if args.remote_prefix is None else args.remote_prefix,
        )
    if args.remote_prefix is not None:
        raise ValueError(f"--remote-prefix: the {CASEOPS_VARIANT} layout is fixed")
    if args.from_docs:
        from data.fromdocs import build_from_docs

        if args.check_docs != CHECK_DOCS:
            raise ValueError("--check-docs: only for the download (--from-docs builds every file)")
        return lambda: build_from_docs(
            args.train_shards,
            args.local_dir,
            args.hub_dir,
            args.workers,
            repo_id=args.repo_id or CASEOPS_REPO_ID,
        )
    if args.workers is not None:
        raise ValueError("--workers: only with --from-docs")
    return lambda: download_caseops(
        args.train_shards,
        args.local_dir,
        args.hub_dir,
        args.check_docs,
        repo_id=args.repo_id or CASEOPS_REPO_ID,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        action = _action(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return report(action, args.json)


if __name__ == "__main__":
    sys.exit(main())
