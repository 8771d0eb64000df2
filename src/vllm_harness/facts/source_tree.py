"""Facts read from a vLLM source tree without building it: the dependencies its CMake fetches
(``FetchContent_Declare``: URL, tag, override variable), its version (PKG-INFO, setuptools-scm's tag) and
the git trust its build needs (``safe.directory`` entries for the tree, its submodules and the
FetchContent checkouts, through the child's environment only)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import gitcmd

KEYWORDS = {
    "GIT_REPOSITORY",
    "GIT_TAG",
    "GIT_SHALLOW",
    "GIT_PROGRESS",
    "GIT_SUBMODULES",
    "GIT_SUBMODULES_RECURSE",
    "SOURCE_DIR",
    "SOURCE_SUBDIR",
    "BINARY_DIR",
    "SUBBUILD_DIR",
    "CONFIGURE_COMMAND",
    "BUILD_COMMAND",
    "INSTALL_COMMAND",
    "TEST_COMMAND",
    "UPDATE_COMMAND",
    "PATCH_COMMAND",
    "URL",
    "URL_HASH",
    "URL_MD5",
    "QUIET",
    "OVERRIDE_FIND_PACKAGE",
    "FIND_PACKAGE_ARGS",
    "EXCLUDE_FROM_ALL",
    "SYSTEM",
    "DOWNLOAD_EXTRACT_TIMESTAMP",
    "GIT_CONFIG",
    "GIT_REMOTE_NAME",
    "TLS_VERIFY",
}


# override variables whose name does not contain the dependency's name
ALIASES = {"arm_compute": ["ACL_ROOT_DIR"], "flashmla": ["FLASH_MLA_SRC_DIR"]}


OVERRIDE_RE = re.compile(r"\$ENV\{(\w+)\}|DEFINED\s+ENV\{(\w+)\}")


CMAKE_VAR_OVERRIDE_RE = re.compile(r"if\s*\(\s*(\w+_SRC_DIR)\s*\)", re.IGNORECASE)


@dataclass
class Dep:
    name: str
    url: str | None
    rev: str | None
    file: str
    line: int
    submodules: list[str] | None = None  # GIT_SUBMODULES; None = all, recursively (FetchContent's default)
    subdir: str | None = None  # SOURCE_SUBDIR
    env_override: str | None = None  # environment variable the tree reads for a local copy
    cmake_override: str | None = None  # CMake variable the tree reads (when not from the environment)
    direct_populate: bool = False  # FetchContent_Populate(name ... GIT_REPOSITORY ...)
    condition: str = ""  # the if() the declaration sits in (aarch64 vs x86 oneDNN...)
    unresolved: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.rev}"

    @property
    def dirname(self) -> str:
        rev = re.sub(r"[^A-Za-z0-9._-]", "_", self.rev or "none")
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.name)}-{rev[:16]}"


def _strip_comments(text: str) -> str:
    out = []
    for line in text.splitlines():
        q = False
        for i, ch in enumerate(line):
            if ch == '"':
                q = not q
            elif ch == "#" and not q:
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def _tokens(body: str) -> list[str]:
    return [a if b == "" else b for a, b in re.findall(r'([^\s"]+)|"([^"]*)"', body)]


def cmake_files(src: Path) -> list[Path]:
    files = [src / "CMakeLists.txt"] if (src / "CMakeLists.txt").is_file() else []
    return (
        files + sorted(p for p in (src / "cmake").rglob("*.cmake") if p.is_file())
        if (src / "cmake").is_dir()
        else files
    )


def _sets(text: str) -> list[tuple[int, str, str]]:
    out = []
    for m in re.finditer(r"\bset\s*\(\s*([A-Za-z_][\w-]*)\s+(\"[^\"]*\"|[^\s)]+)", text, re.IGNORECASE):
        out.append((m.start(), m.group(1), m.group(2).strip('"')))
    return out


def _resolve(
    value: str,
    pos: int,
    local: list[tuple[int, str, str]],
    glob: dict[str, str],
    missing: list[str],
    depth: int = 0,
) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        before = [v for p, n, v in local if n == name and p < pos]
        val = before[-1] if before else glob.get(name)
        if val is None:
            missing.append(name)
            return m.group(0)
        return _resolve(val, pos, local, glob, missing, depth + 1) if depth < 8 else val

    return re.sub(r"\$\{(\w+)\}", sub, value)


def _condition(text: str, pos: int) -> str:
    """The innermost open if()/elseif()/else() before pos (a rough view, enough to tell arch variants)."""
    stack: list[str] = []
    for m in re.finditer(r"\b(if|elseif|else|endif)\s*\(([^)]*)\)", text[:pos], re.IGNORECASE):
        kw = m.group(1).lower()
        if kw == "if":
            stack.append(m.group(2).strip())
        elif kw in ("elseif", "else") and stack:
            stack[-1] = m.group(2).strip() if kw == "elseif" else f"NOT ({stack[-1]})"
        elif kw == "endif" and stack:
            stack.pop()
    return " AND ".join(stack)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _keyword_args(args: list[str]) -> dict[str, list[str]]:
    """A FetchContent call's arguments grouped under their keywords (those before any keyword dropped)."""
    kw: dict[str, list[str]] = {}
    cur = None
    for a in args:
        if a in KEYWORDS:
            cur = a
            kw.setdefault(cur, [])
        elif cur:
            kw[cur].append(a)
    return kw


def _set_overrides(dep: Dep, overrides: set[str], cmake_vars: set[str]) -> None:
    """The environment variable (else the CMake variable) of the file that points ``dep`` at a local copy."""
    name = dep.name
    want = [_norm(a) for a in ALIASES.get(name.lower(), [])]
    for var in sorted(overrides):
        nv = _norm(var)
        if _norm(var) in want or (_norm(name) in nv and re.search(r"(SRC|SOURCE|ROOT)_?DIR", var)):
            dep.env_override = var
            return
    for var in sorted(cmake_vars):
        if _norm(name) in _norm(var) or _norm(var) in want:
            dep.cmake_override = var
            return


def parse_deps(src: Path) -> list[Dep]:
    """Every git dependency the tree's CMake fetches, at the revision it pins (in file order)."""
    files = cmake_files(src)
    texts = {f: _strip_comments(f.read_text(errors="replace")) for f in files}
    glob_sets: dict[str, str] = {}
    for t in texts.values():
        for _, n, v in _sets(t):
            glob_sets.setdefault(n, v)
    deps: list[Dep] = []
    for f, text in texts.items():
        local = _sets(text)
        overrides = set()
        for m in OVERRIDE_RE.finditer(text):
            overrides.add(m.group(1) or m.group(2))
        cmake_vars = set(CMAKE_VAR_OVERRIDE_RE.findall(text))
        for m in re.finditer(r"\bFetchContent_(Declare|Populate)\s*\(([^)]*)\)", text, re.IGNORECASE):
            toks = _tokens(m.group(2))
            if not toks:
                continue
            name, kw = toks[0], _keyword_args(toks[1:])
            if "GIT_REPOSITORY" not in kw:
                continue
            missing: list[str] = []
            url = _resolve(" ".join(kw["GIT_REPOSITORY"]), m.start(), local, glob_sets, missing)
            rev = _resolve(" ".join(kw.get("GIT_TAG", [])), m.start(), local, glob_sets, missing) or None
            subs = kw.get("GIT_SUBMODULES")
            dep = Dep(
                name=name,
                url=url,
                rev=rev,
                file=str(f.relative_to(src)),
                line=text.count("\n", 0, m.start()) + 1,
                submodules=[s for s in subs if s] if subs is not None else None,
                subdir=(kw.get("SOURCE_SUBDIR") or [None])[0],
                direct_populate=m.group(1).lower() == "populate",
                condition=_condition(text, m.start()),
                unresolved=sorted(set(missing)),
            )
            _set_overrides(dep, overrides, cmake_vars)
            deps.append(dep)
    return deps


def submodule_dirs(repo: Path, depth: int = 2) -> list[Path]:
    out = []
    gm = repo / ".gitmodules"
    if depth <= 0 or not gm.is_file():
        return out
    for m in re.finditer(r"^\s*path\s*=\s*(.+?)\s*$", gm.read_text(errors="replace"), re.MULTILINE):
        sub = repo / m.group(1)
        out.append(sub)
        out += submodule_dirs(sub, depth - 1)
    return out


def fetchcontent_dirs(tree: Path) -> list[Path]:
    """The git checkouts CMake's FetchContent makes (or made, maybe as another user) under a vLLM tree:
    ``.deps/<name>-src`` (and their submodules) for every dependency the tree's CMake declares, and any
    ``.deps/*-src`` / ``build/*/_deps/*-src`` left by an earlier build."""
    dirs: list[Path] = []
    try:
        from vllm_harness.facts.source_tree import parse_deps

        dirs += [tree / ".deps" / f"{d.name.lower()}-src" for d in parse_deps(tree)]
    except Exception:  # a tree the parser does not understand still gets the globbed ones
        pass
    dirs += sorted(tree.glob(".deps/*-src")) + sorted(tree.glob("build/*/_deps/*-src"))
    for d in list(dirs):
        if d.is_dir():
            dirs += submodule_dirs(d)
    return dirs


def git_env(env: dict[str, str], trees: list[Path], extra: list[Path] | tuple = ()) -> dict[str, str]:
    """Trust exactly the harness's own trees for git, through the child's environment only.

    Only trees the harness made (its clone cache, its checkouts and copies under the state folder, the
    FetchContent checkouts of its deps cache): never a tree the user handed over (``--source DIR``, an
    ``in_place`` path), whose "dubious ownership" refusal must stand (a repository another user owns can
    name a ``core.fsmonitor`` command that git would run as this user); those are read with
    ``gitcmd.inspect``.

    Never ``git config --global``, never ``safe.directory = *``: GIT_CONFIG_COUNT/KEY/VALUE reach the
    git processes of this step (clone, setuptools-scm, CMake's FetchContent under .deps) and nothing else.
    Each tree gets its own entry, ``<tree>/.deps/*`` (a leading-path match, git >= 2.46), and, for older
    git that only matches exact paths, one entry per FetchContent checkout (``.deps/cutlass-src``, its
    submodules...) that the tree declares or that an earlier build left.
    """
    out = dict(env)
    n = int(out.get("GIT_CONFIG_COUNT", "0") or 0)
    seen = {
        out.get(f"GIT_CONFIG_VALUE_{i}")
        for i in range(n)
        if out.get(f"GIT_CONFIG_KEY_{i}") == "safe.directory"
    }
    entries: list[Path] = []
    for t in trees:
        t = Path(t)
        entries += [t, t / ".deps" / "*"]
        if (t / "CMakeLists.txt").is_file() or (t / ".deps").is_dir():
            entries += fetchcontent_dirs(t)
    entries += [Path(p) for p in extra]
    for p in entries:
        value = str(p)
        if value in seen or value.strip() in ("*", ""):
            continue
        seen.add(value)
        out[f"GIT_CONFIG_KEY_{n}"] = "safe.directory"
        out[f"GIT_CONFIG_VALUE_{n}"] = value
        n += 1
    out["GIT_CONFIG_COUNT"] = str(n)
    return gitcmd.restrict_env(out)  # transports limited for every git the step starts (FetchContent too)


def read_version(src: Path) -> str | None:
    pkg = src / "PKG-INFO"
    if pkg.is_file():
        for line in pkg.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def vllm_version(
    src: Path, fallback: str | None = None, env: dict[str, str] | None = None
) -> tuple[str | None, str]:
    """(version, where it came from): PKG-INFO, git describe (vX.Y.Z tags), or the variant."""
    v = read_version(src)
    if v:
        return v, "PKG-INFO"
    if (src / ".git").exists():
        # a tree the user handed over: no safe.directory, its commands off, no git if another user owns it
        r = gitcmd.inspect(
            src,
            ["describe", "--tags", "--match", "v[0-9]*"],
            dict(os.environ) if env is None else env,
            timeout=60,
        )
        if r.returncode == 0:
            tag = r.stdout.strip()
            m = re.fullmatch(r"v(\d+(?:\.\d+)*(?:\.post\d+|rc\d+)?)(?:-(\d+)-g([0-9a-f]+))?", tag)
            if m:
                return (
                    m.group(1) if not m.group(2) else f"{m.group(1)}.dev{m.group(2)}+g{m.group(3)}"
                ), f"git describe ({tag})"
    if fallback:
        return fallback, "the variant ([vllm].version; SETUPTOOLS_SCM_PRETEND_VERSION at build time)"
    return None, "unknown"
