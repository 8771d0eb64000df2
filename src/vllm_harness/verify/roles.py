"""What a compiled library of a package is for, read from the package itself (verify's binary layer).

A wheel like vLLM's ships libraries of two kinds:

* the ones its Python imports unconditionally (``vllm/platforms/cuda.py``: ``import
vllm._C_stable_libtorch``):
  they must hold code for every GPU the wheel is installed on, or the first kernel fails with "no kernel
image";
* kernels for particular GPUs that its Python loads only where they apply (FlashAttention 3 for sm_90a,
  FlashMLA, the sm_100f-only libraries) or imports guarded (``try: from . import _vllm_fa2_C`` /
  ``except ImportError``, ``contextlib.suppress(ImportError)``, inside a function or an ``if``): a GPU they
  hold no code for is a GPU they are not used on.

Two facts decide which, and neither is a list of names (a release adds and renames libraries):

1. the device code: a library whose SASS is only architecture-specific (``sm_90a``) or family-specific
   (``sm_100f``) targets, with no PTX, was built for those GPUs only -- by construction it cannot serve any
other;
2. how the package's Python imports the module (:func:`import_sites`, an AST read of its ``.py`` files): at
   least one import at module level with no guard makes it **required**; only guarded imports make it
   **optional**; no import at all (loaded by path, or a package without Python) leaves it **unknown**, judged
as
   required.

Stdlib only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

EXT = re.compile(r"^(?P<mod>.+?)(\.abi3|\.cpython-[^./]+)?\.so$")
MAX_SOURCE_BYTES = 4 << 20  # a larger .py file is not a module's import block: skipped
GUARD_EXCEPTIONS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException", "OSError"}


@dataclass(frozen=True)
class ImportSite:
    file: str
    line: int
    guard: str  # "" (module level, unguarded) or what guards it

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" + (f" ({self.guard})" if self.guard else "")


@dataclass(frozen=True)
class Role:
    kind: str  # "required" | "optional" | "unknown"
    sites: tuple[ImportSite, ...] = field(default=())

    @property
    def where(self) -> str:
        shown = [s for s in self.sites if not s.guard] if self.kind == "required" else list(self.sites)
        return ", ".join(str(s) for s in shown[:2]) + (f" (+{len(shown) - 2})" if len(shown) > 2 else "")


def module_name(member: str) -> str | None:
    """``vllm/_C.abi3.so`` -> ``vllm._C``; ``pkg/x/_C.cpython-312-x86_64-linux-gnu.so`` -> ``pkg.x._C``;
    None for a shared library that is not an extension module (``libfoo.so.1``)."""
    m = EXT.match(member)
    if not m or ".so." in member:
        return None
    parts = m.group("mod").split("/")
    return ".".join(parts) if all(p.isidentifier() for p in parts) else None


def _package_of(path: str) -> list[str]:
    parts = path[:-3].split("/")
    return parts[:-1]  # the package a module (or an __init__) belongs to, for relative imports


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    if t is None:
        return True
    names = t.elts if isinstance(t, ast.Tuple) else [t]
    return any(
        (n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else "")
        in GUARD_EXCEPTIONS
        for n in names
    )


def _suppresses_import_error(item: ast.withitem) -> bool:
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    fn = call.func
    name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
    return name == "suppress" and any(
        (a.id if isinstance(a, ast.Name) else a.attr if isinstance(a, ast.Attribute) else "")
        in GUARD_EXCEPTIONS
        for a in call.args
    )


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: str, wanted: set[str], out: dict[str, list[ImportSite]]) -> None:
        self.path, self.wanted, self.out = path, wanted, out
        self.pkg = _package_of(path)
        self.guards: list[str] = []

    def _record(self, name: str, node: ast.AST) -> None:
        if name in self.wanted:
            self.out.setdefault(name, []).append(
                ImportSite(self.path, getattr(node, "lineno", 0), self.guards[-1] if self.guards else "")
            )

    def _guarded(self, guard: str, nodes: Iterable[ast.AST]) -> None:
        self.guards.append(guard)
        for n in nodes:
            self.visit(n)
        self.guards.pop()

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._record(a.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = (self.pkg[: len(self.pkg) - node.level + 1] if node.level else []) + (
            node.module.split(".") if node.module else []
        )
        if node.level and node.level - 1 > len(self.pkg):
            return
        mod = ".".join(base)
        self._record(mod, node)
        for a in node.names:  # `from vllm import _C`: the name is a submodule
            self._record(f"{mod}.{a.name}" if mod else a.name, node)

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._record(node.args[0].value, node)
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        guard = "try/except ImportError" if any(_catches_import_error(h) for h in node.handlers) else ""
        if guard:
            self._guarded(guard, node.body)
            for n in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(n)
        else:
            self.generic_visit(node)

    visit_TryStar = visit_Try

    def visit_With(self, node: ast.With) -> None:
        if any(_suppresses_import_error(i) for i in node.items):
            self._guarded("contextlib.suppress(ImportError)", node.body)
        else:
            self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        self._guarded("under an if", [node.test, *node.body, *node.orelse])

    def visit_FunctionDef(self, node: ast.AST) -> None:
        body = getattr(node, "body", [])
        self._guarded("inside a function", body if isinstance(body, list) else [body])

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef


def import_sites(sources: Iterable[tuple[str, str]], modules: set[str]) -> dict[str, list[ImportSite]]:
    """{module: its import sites} over ``(path, text)`` of a package's Python files (paths relative to the
    site-packages root, ``/``-separated).  Only files that name one of the modules are parsed."""
    out: dict[str, list[ImportSite]] = {}
    if not modules:
        return out
    short = sorted({re.escape(m.rsplit(".", 1)[-1]) for m in modules})
    # a line that imports one of them by its last name (`import x._C`, `from . import _C`,
    # `import_module("x._C")`)
    named = re.compile(r"^[^\n]*import[^\n]*\b(?:" + "|".join(short) + r")\b", re.M)
    for path, text in sources:
        if len(text) > MAX_SOURCE_BYTES or not named.search(text):
            continue
        try:
            tree = ast.parse(text, path)
        except (SyntaxError, ValueError):
            continue  # a file this interpreter cannot parse says nothing about the others
        _Visitor(path, modules, out).visit(tree)
    return out


def roles(sources: Iterable[tuple[str, str]], modules: set[str]) -> dict[str, Role]:
    sites = import_sites(sources, modules)
    out = {}
    for m in modules:
        s = tuple(sites.get(m, ()))
        out[m] = Role("unknown" if not s else "required" if any(not x.guard for x in s) else "optional", s)
    return out


class PythonSide:
    """The roles of a package's extension modules, read once and only when a verdict needs them."""

    def __init__(self, sources: Callable[[], Iterable[tuple[str, str]]], members: Iterable[str]) -> None:
        self._sources = sources
        self.modules = {m: n for n in members if (m := module_name(n))}  # module -> member
        self._roles: dict[str, Role] | None = None

    def role(self, member: str) -> Role | None:
        mod = module_name(member)
        if mod is None:
            return None
        if self._roles is None:
            self._roles = roles(self._sources(), set(self.modules))
        return self._roles.get(mod)
