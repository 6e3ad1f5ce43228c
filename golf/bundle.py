"""Generates the three self-contained training scripts from the golf package.

The challenge wants one file per submission; the repository wants one copy of each piece of code.
Both hold when the package is the source and each `train_*.py` is its bundle: the modules a model
needs, in layer order, each under a banner naming its source, with the imports between them
removed and the third-party imports gathered at the top. The bundles are checked in (users run and
ship them), so `--check` (and a test) fails when one differs from a fresh build, the way
`make fix-copies` guards copied code in large libraries.

    python -m golf.bundle            # rewrite the three train_*.py at the top of the checkout
    python -m golf.bundle --check    # exit 1, naming each stale script, if a rebuild changes it
"""

import argparse
import ast
import os
import sys

GOLF = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(GOLF)

# The layers, lowest first: a module imports only modules before it (docs/design.md's layering). The
# build-time tools (compact, bundle) are never bundled.
MODULE_ORDER = (
    "config",
    "contract",
    "runtime",
    "data",
    "bpb",
    "ngram",
    "kernels",
    "optim",
    "quant",
    "codec",
    "container",
    "evaluation",
    "ttt",
    "modes",
    "telemetry",
    "report",
    "train",
)
BUNDLES = {"train_gpt.py": "gpt", "train_hydra.py": "hydra", "train_manifold.py": "manifold"}
RULE = "# " + "=" * 98

# OpenMP reads its wait policy once, when torch loads it: a run sets PASSIVE before `import torch`.
OMP_BLOCK = """\
# OpenMP reads its wait policy once, when torch loads it, so a run sets PASSIVE before `import
# torch`: waiting threads then sleep instead of spinning on a busy CPU (issue 18; set after the
# import it has no effect, BENCHMARKS.md). Imported as a module (tests) it sets nothing.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
"""


class BundleError(Exception):
    """A source module breaks a rule the bundler relies on."""


def _source_path(module):
    """golf/<module>.py, or golf/models/<name>.py for "models.<name>"."""
    return os.path.join(GOLF, *module.split(".")) + ".py"


def _is_optional_import(node):
    """`try: import x` / `except ImportError: x = None`: an optional package."""
    return (
        isinstance(node, ast.Try)
        and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
        and len(node.handlers) == 1
        and not node.orelse
        and not node.finalbody
    )


class Module:
    """One source module split into its docstring, its imports and the rest of its text."""

    def __init__(self, name):
        self.name = name
        self.path = _source_path(name)
        with open(self.path, encoding="utf-8") as f:
            self.text = f.read()
        tree = ast.parse(self.text, filename=self.path)
        self.doc_source = ""
        self.golf_imports = []  # module names inside the package, in source order
        self.imports = []  # (module, name or None, alias or None) of every other top-level import
        self.optional = []  # source text of each optional-import block
        drop = set()
        lines = self.text.splitlines(keepends=True)
        for i, node in enumerate(tree.body):
            span = range(node.lineno - 1, node.end_lineno)
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                self.doc_source = "".join(lines[span.start : span.stop])
                drop.update(span)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("golf"):
                if node.module == "golf" or node.level:
                    raise BundleError(f"{self.path}:{node.lineno}: use `from golf.<module> import`")
                self.golf_imports.append(node.module.removeprefix("golf."))
                drop.update(span)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "golf":
                        raise BundleError(
                            f"{self.path}:{node.lineno}: `import golf...` is not bundled"
                        )
                    self.imports.append((alias.name, None, alias.asname))
                drop.update(span)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    self.imports.append((node.module, alias.name, alias.asname))
                drop.update(span)
            elif _is_optional_import(node):
                self.optional.append("".join(lines[span.start : span.stop]))
                drop.update(span)
        kept = [line for i, line in enumerate(lines) if i not in drop]
        self.body = _squeeze_blank_lines("".join(kept)).strip("\n") + "\n"


def _squeeze_blank_lines(text):
    """At most two blank lines in a row (where removed imports leave more)."""
    out = []
    blank = 0
    for line in text.splitlines(keepends=True):
        blank = blank + 1 if not line.strip() else 0
        if blank <= 2:
            out.append(line)
    return "".join(out)


def needed_modules(model):
    """The golf modules `models.<model>` needs, directly or not, in layer order."""
    seen = set()
    todo = [f"models.{model}"]
    while todo:
        module = Module(todo.pop())
        for dep in module.golf_imports:
            if dep not in MODULE_ORDER:
                raise BundleError(f"{module.path}: imports golf.{dep}, which is not bundled")
            if module.name in MODULE_ORDER and MODULE_ORDER.index(dep) >= MODULE_ORDER.index(
                module.name
            ):
                raise BundleError(f"{module.path}: imports golf.{dep}, a layer at or above its own")
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return [name for name in MODULE_ORDER if name in seen]


def _name_key(name):
    """isort's order by type inside `from x import ...`: CONSTANTS, Classes, functions."""
    if name.isupper() and len(name) > 1:
        kind = 0
    elif name[:1].isupper():
        kind = 1
    else:
        kind = 2
    return kind, name.lower(), name


def _import_lines(imports):
    """The import statements of (module, name, alias) triples, as ruff's isort writes them."""
    plain = sorted({(m, a) for m, n, a in imports if n is None}, key=lambda x: (x[0].lower(), x))
    froms = {}
    for module, name, alias in imports:
        if name is not None:
            froms.setdefault(module, set()).add((name, alias))
    lines = [f"import {m} as {a}" if a else f"import {m}" for m, a in plain]
    for module in sorted(froms, key=str.lower):
        names = sorted(froms[module], key=lambda x: _name_key(x[0]))
        parts = [f"{n} as {a}" if a else n for n, a in names]
        line = f"from {module} import {', '.join(parts)}"
        if len(line) > 100:
            line = f"from {module} import (\n" + "".join(f"    {p},\n" for p in parts) + ")"
        lines.append(line)
    return lines


def _banner(module, doc=True):
    """A section banner naming the source file, then its docstring (as written) as comment
    lines."""
    where = os.path.relpath(module.path, ROOT).replace(os.sep, "/")
    out = [RULE, f"# {where}", RULE]
    text = module.doc_source.strip()[3:-3] if doc else ""
    for line in text.strip("\n").splitlines():
        out.append(f"# {line}".rstrip())
    return "\n".join(out) + "\n"


def build(script):
    """The text of one bundle."""
    model = Module(f"models.{BUNDLES[script]}")
    modules = [Module(name) for name in needed_modules(BUNDLES[script])]
    imports = [imp for m in [*modules, model] for imp in m.imports]
    stdlib = [i for i in imports if i[0].split(".")[0] in sys.stdlib_module_names]
    third = [i for i in imports if i[0].split(".")[0] not in sys.stdlib_module_names]
    optional = []
    for m in [*modules, model]:
        optional += [block for block in m.optional if block not in optional]
    head = [
        f"# GENERATED by `python -m golf.bundle` from golf/models/{BUNDLES[script]}.py and the",
        "# golf modules it needs (each section's banner names its source): do not edit this",
        "# file. Edit the sources, then rebuild with `python -m golf.bundle` (`--check` says",
        "# whether this file is current). A change made here on a GPU box is ported back by hand.",
        model.doc_source.rstrip("\n"),
        "",
        *_import_lines(stdlib),
        "",
        OMP_BLOCK,
        *_import_lines(third),
        "",
        *[block.rstrip("\n") for block in optional],
    ]
    parts = ["\n".join(head).rstrip("\n") + "\n"]
    for module in modules:
        parts.append(_banner(module) + "\n\n" + module.body)
    # the model's docstring opens the file
    parts.append(_banner(model, doc=False) + "\n\n" + model.body)
    return "\n\n".join(parts)


def stale(root=ROOT):
    """The bundles under `root` that differ from a fresh build."""
    out = []
    for script in BUNDLES:
        path = os.path.join(root, script)
        current = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                current = f.read()
        if current != build(script):
            out.append(script)
    return out


def write_all(root=ROOT):
    """Rewrites every bundle that changed; returns their names."""
    changed = stale(root)
    for script in changed:
        path = os.path.join(root, script)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(build(script))
        os.replace(tmp, path)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a checked-in bundle is not a fresh build"
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale()
            for script in problems:
                print(f"{script}: differs from a fresh build; run `python -m golf.bundle`")
            if not problems:
                print(f"bundles: {', '.join(BUNDLES)} are current")
            return 1 if problems else 0
        changed = write_all()
    except (BundleError, SyntaxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bundles written: {', '.join(changed) or 'none (all current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
