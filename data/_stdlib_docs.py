"""Worker for data/embedded.py: collect the standard library's docstrings, one document per module.

Run as a script in a child process (`python -B -s data/_stdlib_docs.py OUT.json`, stdlib only):
importing ~300 modules may print, warn or touch global state, and none of that may reach the
builder's process or its output. Writes {module name: document} as JSON to OUT.json.

Modules come from sys.stdlib_module_names and their subpackages, walked in sorted order. Kept:
modules whose file is a .py inside the standard library directory and that import without error.
Skipped: private names, GUI and joke modules that act on import, test suites, `__main__` modules,
codecs.
"""

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import sysconfig
import warnings

SKIP = {
    "antigravity",
    "this",
    "__hello__",
    "__phello__",  # act on import (browser, printing)
    "tkinter",
    "idlelib",
    "turtle",
    "turtledemo",  # GUI
    "test",
    "tests",
    "idle_test",
    "__main__",  # test suites, script entry points
    "ensurepip",
    "venv",
    "lib2to3",
    "encodings",
    "pydoc_data",  # installers, codec tables, the topics
}
STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])


def clean(doc) -> str:
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""


def module_document(name: str, module) -> str:
    """Module docstring, then each public class/function defined here, in sorted order."""
    parts = [name]
    if clean(module.__doc__):
        parts.append(clean(module.__doc__))
    for key in sorted(vars(module)):
        value = vars(module)[key]
        if key.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        if clean(value.__doc__):
            parts.append(f"{name}.{key}\n{clean(value.__doc__)}")
        if inspect.isclass(value):
            for attr in sorted(vars(value)):
                member = vars(value)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if (
                    attr.startswith("_")
                    or not inspect.isroutine(member)
                    or not clean(member.__doc__)
                ):
                    continue
                parts.append(f"{name}.{key}.{attr}\n{clean(member.__doc__)}")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def collect() -> dict:
    docs = {}

    def visit(name: str) -> None:
        if any(part.startswith("_") or part in SKIP for part in name.split(".")):
            return
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                module = importlib.import_module(name)
        except BaseException:  # a missing platform module, a SystemExit on import: not our corpus
            return
        path = getattr(module, "__file__", None) or ""
        if not path.endswith(".py") or not os.path.realpath(path).startswith(STDLIB + os.sep):
            return
        text = module_document(name, module)
        if text:
            docs[name] = text
        if hasattr(module, "__path__"):
            for sub in sorted(m.name for m in pkgutil.iter_modules(module.__path__)):
                visit(f"{name}.{sub}")

    warnings.simplefilter("ignore")
    for name in sorted(sys.stdlib_module_names):
        visit(name)
    return docs


if __name__ == "__main__":
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(collect(), f)
