"""The compact counted code (build-time, not part of a bundle): the minifier, the self-extracting
wrapper, and the check that re-derives a compact form from its readable script.
"""

import lzma
import math
import re

import numpy as np

from golf.codec import LZMA_MEMLIMIT, _bounded, _brotli_bounded
from golf.container import valid_script_name
from golf.runtime import sha256_hex

try:
    import brotli
except ImportError:  # Brotli is optional: the per-group compressor uses it where installed
    brotli = None


# --- the compact counted code (CODE_FORM=compact) ------------------------------------------------
# As the records ship it (#1394's train_gpt.py beside train_gpt_human.py): a few-line script that
# holds a minified form of the readable source, compressed, in one ASCII string literal (a base-94
# number: 22% overhead, where base85 costs 25%), expands it and runs it under the readable file's
# name. linecache gets the running source, so inspect (and @triton.jit, which reads its
# kernel's source) work as for the file. The minified form is a deterministic function of the
# readable source: comments and docstrings dropped, function-local names shortened, one space per
# indent level, lines joined inside brackets. This module is a build-time tool: no bundle holds it,
# so a compact form never builds another (a run from a checkout imports it to count
# CODE_FORM=compact). Checking a compact form re-derives the minified source from the readable one
# and compares; the artifact header binds the readable sha256.

COMPACT_MAX_SOURCE = 4 << 20


def _docstring_starts(tree):
    """{(line, column): whether it is its body's only statement} of every docstring."""
    import ast

    out = {}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, kinds) or not body:
            continue
        first = body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            out[(first.lineno, first.col_offset)] = len(body) == 1
    return out


def _short_names():
    """a, b, ..., z, aa, ab, ...: names that are neither keywords nor builtins."""
    import builtins
    import itertools
    import keyword
    import string

    for size in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=size):
            name = "".join(letters)
            if not keyword.iskeyword(name) and not hasattr(builtins, name):
                yield name


def _scope_nodes(fn):
    """The nodes of a function's body, not descending into nested functions, lambdas or classes
    (those are yielded themselves). Defaults, annotations and decorators are left out: they are
    evaluated in the enclosing scope."""
    import ast

    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _renamable_locals(fn, fixed_params, segment):
    """(names a function binds that can be renamed, {name: its Name nodes}, {param: its arg
    node}). A parameter qualifies unless it is in fixed_params (passed by keyword or spelled as a
    string somewhere in the file) or annotated (Triton's constexprs); a local qualifies unless
    it is declared global or nonlocal, bound by an import, an except clause or a match, bound
    anywhere in a nested function, lambda or class (reading it there is fine: those uses are
    renamed too), or used inside an f-string that may use the `{name=}` form. A function that
    calls locals(), vars(), eval() or exec() keeps all its names. segment(node) is a node's
    source text."""
    import ast

    args = fn.args
    arg_nodes = {a.arg: a for a in args.posonlyargs + args.args + args.kwonlyargs}
    params = set(arg_nodes)
    for star in (args.vararg, args.kwarg):
        if star is not None:
            params.add(star.arg)
    renamable_params = {
        name
        for name, node in arg_nodes.items()
        if name not in fixed_params and node.annotation is None
    }
    keep = params - renamable_params
    uses = {}
    stored = set()
    for node in _scope_nodes(fn):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            keep.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            keep.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            keep.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            if not isinstance(node, ast.Lambda):
                keep.add(node.name)
            for inner in ast.walk(node):
                if inner is not node and _binds_or_hides(inner, segment):
                    return set(), {}, {}
                keep.update(_bound_names(inner))
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load):
                    uses.setdefault(inner.id, []).append(inner)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
            return set(), {}, {}
        elif isinstance(node, ast.JoinedStr) and re.search(r"=\s*[}!:]", segment(node)):
            keep.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("locals", "vars", "eval", "exec")
        ):
            return set(), {}, {}
        if isinstance(node, ast.Name):
            uses.setdefault(node.id, []).append(node)
            if not isinstance(node.ctx, ast.Load):
                stored.add(node.id)
    names = (stored | renamable_params) - keep
    return names, uses, arg_nodes


def _bound_names(node):
    """The names a node binds in its own scope (for a nested scope: any of them)."""
    import ast

    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
        return {node.id}
    if isinstance(node, ast.arg):
        return {node.arg}
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return set(node.names)
    if isinstance(node, ast.ExceptHandler) and node.name:
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    return set()


def _binds_or_hides(node, segment):
    """Whether a node inside a nested scope makes its names unsafe to rename at all: a match
    pattern, a self-documenting f-string or a call of locals(), vars(), eval() or exec()."""
    import ast

    if isinstance(node, (ast.MatchAs, ast.MatchStar, ast.MatchMapping)):
        return True
    if isinstance(node, ast.JoinedStr):
        return re.search(r"=\s*[}!:]", segment(node)) is not None
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("locals", "vars", "eval", "exec")
    )


def _rename_edits(text, tree):
    """[(line, start column, end column, old, new)] (columns in UTF-8 bytes) that give each
    function's renamable names the shortest names unused in that function, the most used
    first."""
    import ast
    import io
    import tokenize

    fixed_params = {
        kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
    }
    fixed_params |= {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value not in ("self", "cls")  # bound by the call's object, never from a dict
    }
    lines = [line.encode("utf-8") for line in text.splitlines(True)]

    def segment(node):
        """The node's source text (ast.get_source_segment splits the whole file each call)."""
        rows = lines[node.lineno - 1 : node.end_lineno]
        if len(rows) == 1:
            return rows[0][node.col_offset : node.end_col_offset].decode("utf-8")
        rows = [rows[0][node.col_offset :], *rows[1:-1], rows[-1][: node.end_col_offset]]
        return b"".join(rows).decode("utf-8")

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    edits = []
    given = {}  # id of a nested function: new names its enclosing functions gave names it reads
    for fn in ast.walk(tree):  # outer functions first
        if not isinstance(fn, functions):
            continue
        names, uses, arg_nodes = _renamable_locals(fn, fixed_params, segment)
        if not names:
            continue
        reader = io.StringIO(segment(fn)).readline
        taken = {t.string for t in tokenize.generate_tokens(reader) if t.type == tokenize.NAME}
        taken |= given.get(id(fn), set())
        nested = [n for n in ast.walk(fn) if n is not fn and isinstance(n, functions)]
        fresh = (name for name in _short_names() if name not in taken)
        for old in sorted(names, key=lambda n: (-len(uses.get(n, ())), n)):
            new = next(fresh)
            if len(new) >= len(old):
                continue
            nodes = list(uses.get(old, ()))
            if old in arg_nodes:
                nodes.append(arg_nodes[old])
            for node in nodes:
                edits.append((node.lineno, node.col_offset, node.end_col_offset, old, new))
            for inner in nested:
                given.setdefault(id(inner), set()).add(new)
    return edits


def rename_locals(source):
    """source (bytes) with each function's renamable parameters and locals shortened
    (_renamable_locals); ValueError where the AST's positions do not point at the name."""
    import ast

    text = source.decode("utf-8")
    lines = [line.encode("utf-8") for line in text.splitlines(True)]
    for row, start, end, old, new in sorted(_rename_edits(text, ast.parse(text)), reverse=True):
        line = lines[row - 1]
        if line[start:end] != old.encode():
            raise ValueError(f"rename_locals: line {row} has no {old!r} at column {start}")
        lines[row - 1] = line[:start] + new.encode() + line[end:]
    return b"".join(lines)


def rename_globals(source):
    """source (bytes) with module-level functions and assigned names shortened, where that is
    safe: the name is bound nowhere else in the file (so no local shadows it), never declared
    global, and never spelled inside a string (getattr, globals() and the contract's name lists
    read names from strings). The new names are unused anywhere in the file."""
    return _global_renames(source)[0]


def compact_names(source):
    """{readable name: its name in the compact form} of the module-level names rename_globals
    shortens in a readable script (bytes): for tracebacks and tests of a compact form."""
    return _global_renames(rename_locals(source))[1]


def _global_renames(source):
    """(renamed source, {old: new}) of rename_globals."""
    import ast
    import io
    import tokenize

    text = source.decode("utf-8")
    tree = ast.parse(text)
    defined = {}  # name: the positions of its module-level binding
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defined[node.name] = node
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            defined[node.targets[0].id] = node.targets[0]
    bindings = {}
    strings = set()
    for node in ast.walk(tree):
        for name in _bound_names(node):
            bindings[name] = bindings.get(name, 0) + 1
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    names = {n for n in defined if bindings.get(n) == 1 and n not in strings}
    uses = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            uses.setdefault(node.id, []).append(node)
    reader = io.StringIO(text).readline
    taken = {t.string for t in tokenize.generate_tokens(reader) if t.type == tokenize.NAME}
    fresh = (name for name in _short_names() if name not in taken)
    lines = [line.encode("utf-8") for line in text.splitlines(True)]
    edits = []
    mapping = {}
    for old in sorted(names, key=lambda n: (-len(uses.get(n, ())), n)):
        new = next(fresh)
        if len(new) >= len(old):
            continue
        mapping[old] = new
        node = defined[old]
        if isinstance(node, ast.FunctionDef):
            start = node.col_offset + len("def ")
            edits.append((node.lineno, start, start + len(old.encode()), old, new))
        for use in uses.get(old, ()):
            edits.append((use.lineno, use.col_offset, use.end_col_offset, old, new))
    for row, start, end, old, new in sorted(edits, reverse=True):
        line = lines[row - 1]
        if line[start:end] != old.encode():
            raise ValueError(f"rename_globals: line {row} has no {old!r} at column {start}")
        lines[row - 1] = line[:start] + new.encode() + line[end:]
    return b"".join(lines), mapping


def _word_char(c):
    """Whether c can continue a name or number (two such tokens need a space between them)."""
    return c.isalnum() or c == "_"


def _joined_literals(first, second):
    """One literal for two adjacent ones with the same prefix and the same single quote, or
    None: triple quotes, and a first literal ending in an octal escape (a digit after it would
    join the escape), are left alone."""
    pattern = r"([A-Za-z]*)([\"'])(.*)\2"
    a = re.fullmatch(pattern, first, re.DOTALL)
    b = re.fullmatch(pattern, second, re.DOTALL)
    if a is None or b is None or a[1].lower() != b[1].lower() or a[2] != b[2]:
        return None
    if a[3].startswith(a[2] * 2) or b[3].startswith(b[2] * 2) or re.search(r"\\[0-7]{1,2}$", a[3]):
        return None
    return first[:-1] + b[3] + second[-1]


class _Minifier:
    """Re-emits a token stream: no comments, docstrings or blank lines, one space per indent
    level, one logical line per statement, a space only where two tokens would otherwise merge,
    trailing commas dropped where that cannot change a tuple. f-strings are copied as written
    (Python 3.12 splits them into several tokens)."""

    def __init__(self, text, docstrings):
        import io
        import tokenize

        self.tokenize = tokenize
        self.lines = text.splitlines(True)
        self.docstrings = docstrings
        self.tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        self.out = []
        self.line = []
        self.kinds = []  # the token type of each piece of self.line
        self.brackets = []  # [opener, whether a call or subscript, top-level commas]

    def span(self, start, end):
        """The source text from one (row, col) to another, as written."""
        (r0, c0), (r1, c1) = start, end
        if r0 == r1:
            return self.lines[r0 - 1][c0:c1]
        middle = "".join(self.lines[r0 : r1 - 1])
        return self.lines[r0 - 1][c0:] + middle + self.lines[r1 - 1][:c1]

    def emit(self, text, kind):
        tok = self.tokenize
        if self.line and kind == tok.STRING and self.kinds[-1] == tok.STRING:
            merged = _joined_literals(self.line[-1], text)
            if merged is not None:  # "ab" "cd" -> "abcd": implicit concatenation done here
                self.line[-1] = merged
                return
        if self.line:
            prev = self.line[-1]
            prev_kind = self.kinds[-1]
            joins = _word_char(prev[-1]) or prev_kind in (tok.NUMBER, tok.STRING)
            starts = _word_char(text[0]) or (prev_kind == tok.NUMBER and text[0] == ".")
            if joins and starts:
                self.line.append(" ")
                self.kinds.append(None)
        if text in ("(", "[", "{"):
            self.brackets.append([text, text != "{" and self._after_callee(), 0])
        elif text in (")", "]", "}") and self.brackets:
            opener, call, commas = self.brackets.pop()
            # a set, dict, call or a tuple of two or more stays what it is without a trailing comma
            droppable = opener == "{" or commas >= 2 or (call and opener == "(")
            if self.line and self.line[-1] == "," and droppable:
                self.line.pop()
                self.kinds.pop()
        elif text == "," and self.brackets:
            self.brackets[-1][2] += 1
        self.line.append(text)
        self.kinds.append(kind)

    def _after_callee(self):
        """Whether the bracket being opened calls or subscripts what precedes it (a name that is
        not a keyword, or a closing bracket), rather than starting a tuple, list or group."""
        import keyword

        prev = next((p for p in reversed(self.line) if p != " "), "")
        if prev in (")", "]"):
            return True
        soft = prev in ("match", "case", "type", "_")
        return (
            _word_char(prev[-1:])
            and not prev[0].isdigit()
            and not soft
            and not keyword.iskeyword(prev)
        )

    def run(self, depth=0):
        tok = self.tokenize
        fstring_from = None
        fstring_depth = 0
        for t in self.tokens:
            if t.type == tok.COMMENT:
                continue
            name = tok.tok_name[t.type]
            if name == "FSTRING_START":
                if fstring_depth == 0:
                    fstring_from = t.start
                fstring_depth += 1
                continue
            if name == "FSTRING_END":
                fstring_depth -= 1
                if fstring_depth == 0:
                    self.emit(self.span(fstring_from, t.end), tok.STRING)
                continue
            if fstring_depth:
                continue
            if t.type == tok.INDENT:
                depth += 1
            elif t.type == tok.DEDENT:
                depth -= 1
            elif t.type == tok.NEWLINE:
                if self.line:
                    self.out.append(" " * depth + "".join(self.line))
                self.line = []
                self.kinds = []
            elif t.type == tok.STRING and not self.line and t.start in self.docstrings:
                if self.docstrings[t.start]:
                    self.emit("0", tok.NUMBER)
            elif t.type not in (tok.NL, tok.ENCODING, tok.ENDMARKER):
                self.emit(self.span(t.start, t.end), t.type)
        return "\n".join(self.out) + "\n"


def minify_source(source):
    """The minified form of a readable script (bytes): rename_locals, then _Minifier.
    Deterministic, and checked to compile."""
    import ast

    renamed = rename_globals(rename_locals(source)).decode("utf-8")
    text = _Minifier(renamed, _docstring_starts(ast.parse(renamed))).run()
    compile(text, "<minified>", "exec")
    return text.encode("utf-8")


# name: (import line, decompress expression) of the back ends a compact form may use.
COMPACT_CODECS = {
    "brotli": (b"import brotli,linecache,os\n", b"brotli.decompress"),
    "lzma": (b"import linecache,lzma,os\n", b"lzma.decompress"),
}


def _compact_pack(data, codec):
    if codec == "brotli":
        return brotli.compress(data, quality=11, lgwin=24)
    return lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=9 | lzma.PRESET_EXTREME
    )


def _compact_unpack(data, codec):
    if codec == "brotli":
        return _brotli_bounded(data, COMPACT_MAX_SOURCE)
    return _bounded(lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT), data, COMPACT_MAX_SOURCE)


# The compressed source is written as a number in base 94, one printable ASCII character per
# digit: every character from space to tilde but the backslash (an escape). The file is then
# pure ASCII, so its bytes on disk are the UTF-8 bytes of its text, the count the official code
# makes (a latin-1 literal was 0.3 % over the compressed size on disk but 50 % over it in UTF-8,
# issue 24); the price is 22 % over the compressed size, where base85 (records) costs 25 %.
# Decoding it is one line of the wrapper (Horner's rule, about a second on a slow CPU).
COMPACT_BASE = 94
COMPACT_DIGITS = bytes(c for c in range(0x20, 0x7F) if c != 0x5C)
COMPACT_DECODE = b"_c-32-(_c>92)"  # COMPACT_DIGITS.index(_c), as the wrapper spells it


def _ascii_literal(data):
    """data as the body of a \"\"\"...\"\"\" literal: the big-endian number it spells, in base
    94 digits drawn from COMPACT_DIGITS, with a quote that another quote follows (or that ends
    the literal) escaped."""
    n = int.from_bytes(data, "big")
    digits = []
    chunk = COMPACT_BASE**16
    while n:  # 16 digits per long division: linear in the length, not quadratic
        n, part = divmod(n, chunk)
        for _ in range(16):
            part, d = divmod(part, COMPACT_BASE)
            digits.append(d)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
    text = bytes(COMPACT_DIGITS[d] for d in reversed(digits or [0]))
    return re.sub(rb'"(?="|\Z)', rb'\\"', text)


def _ascii_value(digits, size):
    """The `size` bytes an ASCII literal's characters spell; ValueError for a character outside
    COMPACT_DIGITS or more digits than `size` bytes need. Split in halves (value = high *
    94^len(low) + low), so a long literal does not take quadratic time."""
    if len(digits) > size * 8 / math.log2(COMPACT_BASE) + 2:
        raise ValueError("compact form: its literal is longer than the bytes it declares")
    table = np.full(256, -1, np.int64)
    table[np.frombuffer(COMPACT_DIGITS, np.uint8)] = np.arange(COMPACT_BASE)
    values = table[np.frombuffer(digits, np.uint8)].tolist()
    if min(values, default=0) < 0:
        raise ValueError("compact form: its literal has a character outside the digits")
    powers = {}

    def value(lo, hi):
        if hi - lo <= 64:
            n = 0
            for d in values[lo:hi]:
                n = n * COMPACT_BASE + d
            return n
        mid = (lo + hi) // 2
        if hi - mid not in powers:
            powers[hi - mid] = COMPACT_BASE ** (hi - mid)
        return value(lo, mid) * powers[hi - mid] + value(mid, hi)

    try:
        return value(0, len(values)).to_bytes(size, "big")
    except OverflowError:
        raise ValueError("compact form: its literal spells more bytes than it declares") from None


def _compact_wrapper(literal, size, codec, readable_sha, readable_bytes, name):
    import_line, decompress = COMPACT_CODECS[codec]
    return b"".join(
        [
            import_line,
            b'_D="""' + literal + b'"""\n',
            b'READABLE_SHA256="' + readable_sha.encode() + b'"\n',
            b"READABLE_BYTES=" + str(readable_bytes).encode() + b"\n",
            b"COMPACT_PATH=os.path.abspath(__file__)\n",
            b"__file__=os.path.join(os.path.dirname(COMPACT_PATH)," + repr(name).encode() + b")\n",
            b"_N=0\n",
            b"for _c in _D.encode():_N=_N*94+" + COMPACT_DECODE + b"\n",
            b"RUNNING_SOURCE=" + decompress + b"(_N.to_bytes(" + str(size).encode(),
            b',"big")).decode()\n',
            b"_S=RUNNING_SOURCE\n",
            b"linecache.cache[__file__]=(len(_S),None,_S.splitlines(True),__file__)\n",
            b'exec(compile(_S,__file__,"exec"))\n',
        ]
    )


def compact_code(source, name):
    """The compact form of the readable script `source` (bytes) named `name`: its minified form
    compressed by Brotli where installed (smaller on source code), else LZMA."""
    if not valid_script_name(name):
        raise ValueError(f"compact_code name {name!r}: expected a bare .py file name")
    codec = "lzma" if brotli is None else "brotli"
    packed = _compact_pack(minify_source(source), codec)
    literal = _ascii_literal(packed)
    return _compact_wrapper(literal, len(packed), codec, sha256_hex(source), len(source), name)


def expand_compact(blob):
    """(minified source, readable sha256, readable bytes, script name) of a compact form, read
    without running it: the literal is parsed by ast.literal_eval and decoded as the wrapper
    would, and the file must be exactly the wrapper around it. ValueError for anything else."""
    import ast

    if not blob.isascii():
        raise ValueError("compact form: not pure ASCII (its file bytes must be its UTF-8 bytes)")
    m = re.fullmatch(
        rb"import (brotli,linecache,os|linecache,lzma,os)\n"
        rb'_D=(""".*?""")\nREADABLE_SHA256="([0-9a-f]{64})"\n'
        rb"READABLE_BYTES=([0-9]{1,9})\nCOMPACT_PATH=.*\n__file__=os\.path\.join\(os\.path\."
        rb"dirname\(COMPACT_PATH\),('[A-Za-z0-9_.-]{1,128}')\)\n.*\.to_bytes\(([0-9]{1,9}),.*",
        blob,
        re.DOTALL,
    )
    if m is None:
        raise ValueError("not a compact form of a training script (its wrapper differs)")
    codec = "brotli" if m[1].startswith(b"brotli") else "lzma"
    if codec == "brotli" and brotli is None:
        raise ValueError("compact form: it is Brotli-compressed and brotli is not installed")
    digits = ast.literal_eval(m[2].decode("ascii")).encode("ascii")
    readable_sha = m[3].decode()
    readable_bytes = int(m[4])
    name = ast.literal_eval(m[5].decode("ascii"))
    size = int(m[6])
    if size > COMPACT_MAX_SOURCE:
        raise ValueError(f"compact form: {size} compressed bytes is more than a script")
    packed = _ascii_value(digits, size)
    literal = _ascii_literal(packed)
    if _compact_wrapper(literal, size, codec, readable_sha, readable_bytes, name) != blob:
        raise ValueError("compact form: the wrapper around its source differs from ours")
    try:
        source = _compact_unpack(packed, codec)
    except Exception as exc:
        raise ValueError(f"compact form: its source does not decompress ({exc})") from None
    return source, readable_sha, readable_bytes, name


def check_compact(blob, readable, name):
    """ValueError unless `blob` is a compact form of exactly `readable` (bytes) named `name`:
    the sha256 and size it binds are the readable file's, and its source is the minified form
    of that file, re-derived here."""
    source, readable_sha, readable_bytes, inner = expand_compact(blob)
    if inner != name:
        raise ValueError(f"compact form runs as {inner!r}, not {name!r}")
    if readable_sha != sha256_hex(readable) or readable_bytes != len(readable):
        raise ValueError(f"compact form binds another {name} (sha256 {readable_sha})")
    if source != minify_source(readable):
        raise ValueError(f"compact form: its source is not the minified form of {name}")
