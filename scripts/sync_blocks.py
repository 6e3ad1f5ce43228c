"""Keeps the shared blocks of the training scripts byte-identical (the HF `# Copied from` idea).

train_gpt.py is the canonical copy. Each block is fenced by
    # ===== BEGIN SHARED BLOCK: <name> v<version> =====
    # ===== END SHARED BLOCK: <name> v<version> =====
`--check` reports drift and exits 1; without it, the blocks of the other scripts are replaced by the
canonical text (a script missing a block is an error: blocks are never added silently).

    python scripts/sync_blocks.py [--check] [--repo DIR]
"""

import argparse
import re
import sys
from pathlib import Path

CANONICAL = "train_gpt.py"
COPIES = ("train_manifold.py", "train_hydra.py")
BLOCK = re.compile(
    r"^[ ]*# ===== BEGIN SHARED BLOCK: (?P<name>\w+) v(?P<version>\d+) =====\n.*?"
    r"^[ ]*# ===== END SHARED BLOCK: (?P=name) v(?P=version) =====\n",
    re.S | re.M,
)


def blocks(text):
    """{name: (version, text)} of every shared block in a script."""
    return {m["name"]: (m["version"], m.group(0)) for m in BLOCK.finditer(text)}


def drift(repo):
    """List of problems: missing blocks, version or text differences, against the canonical copy."""
    canon = blocks((repo / CANONICAL).read_text(encoding="utf-8"))
    problems = []
    if not canon:
        problems.append(f"{CANONICAL}: no shared blocks found")
    for name in COPIES:
        path = repo / name
        if not path.exists():
            continue
        theirs = blocks(path.read_text(encoding="utf-8"))
        for block, (version, text) in canon.items():
            if block not in theirs:
                problems.append(f"{name}: missing shared block {block}")
            elif theirs[block] != (version, text):
                problems.append(f"{name}: shared block {block} differs from {CANONICAL}")
    return problems


def sync(repo):
    canon = blocks((repo / CANONICAL).read_text(encoding="utf-8"))
    changed = []
    for name in COPIES:
        path = repo / name
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        missing = [b for b in canon if b not in blocks(text)]
        if missing:
            raise SystemExit(f"error: {name} lacks shared blocks {missing}: add the fences first")
        new = BLOCK.sub(lambda m: canon[m["name"]][1], text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(name)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report drift and exit 1 instead of fixing it"
    )
    parser.add_argument(
        "--repo", default=str(Path(__file__).resolve().parent.parent), help="repository root"
    )
    args = parser.parse_args(argv)
    repo = Path(args.repo)
    if args.check:
        problems = drift(repo)
        for p in problems:
            print(f"drift: {p}")
        print(f"shared_blocks: {'drift' if problems else 'identical'}")
        return 1 if problems else 0
    changed = sync(repo)
    print(f"synced: {', '.join(changed) if changed else 'nothing to do'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
