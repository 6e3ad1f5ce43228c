"""Prints how openly a Python file reads, by the measures of issue 12.

For each file: the share of blank lines, the share of lines over 100 characters, multi-name
assignments per 1,000 lines (`a, b = x, y` or `a = b = x`, counted by the AST), and chained
conditional expressions (`x if c else y if d else z`).

    python scripts/readability.py train_gpt.py train_hydra.py [--json]
"""

import argparse
import ast
import json
import sys
from pathlib import Path

MAX_LINE = 100


def multi_name_assignments(tree):
    """Statements that bind unrelated names together: `a = b = x` and `a, b = x, y`.

    Unpacking one value (`x, y = batch`, `q, scale = quantize(w)`) binds names that belong
    together and is not counted.
    """
    count = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        chained = len(node.targets) > 1
        packed = isinstance(node.targets[0], (ast.Tuple, ast.List)) and isinstance(
            node.value, (ast.Tuple, ast.List)
        )
        if chained or packed:
            count += 1
    return count


def chained_conditionals(tree):
    """Conditional expressions whose branch is itself a conditional expression."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp):
            if isinstance(node.body, ast.IfExp) or isinstance(node.orelse, ast.IfExp):
                count += 1
    return count


def measure(path):
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    n_lines = max(len(lines), 1)
    tree = ast.parse(text, filename=str(path))
    blank = sum(1 for line in lines if not line.strip())
    long_lines = sum(1 for line in lines if len(line) > MAX_LINE)
    multi = multi_name_assignments(tree)
    return {
        "file": str(path),
        "lines": len(lines),
        "blank_pct": round(100.0 * blank / n_lines, 1),
        "over_100_pct": round(100.0 * long_lines / n_lines, 1),
        "multi_assign_per_1k": round(1000.0 * multi / n_lines, 1),
        "chained_conditionals": chained_conditionals(tree),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="Python files to measure")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    for path in args.files:
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        row = measure(path)
        if args.json:
            print(json.dumps(row))
        else:
            print(" ".join(f"{key}: {value}" for key, value in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
