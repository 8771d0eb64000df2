"""Interpreter discovery: find a working Python for a variant's range without the user's help.

GPU servers often have pyenv or conda interpreters whose ``python3.X`` shims on PATH fail until enabled;
a failing candidate is skipped (and remembered, with why), never trusted.  Searched, in order:
``$PATH`` (``python3.X``, ``python3``), pyenv's versions (``$PYENV_ROOT`` or ``~/.pyenv``), conda
(``$CONDA_PREFIX``, ``$CONDA_EXE``'s base, ``~/miniconda3``, ``~/anaconda3``, ``~/miniforge3``,
``/opt/conda``) and their ``envs/*``, uv-managed interpreters (``uv python find``), the usual system paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_harness.core import procs
from vllm_harness.core.errors import UsageError

_PROBE = ("import sys, json, sysconfig; print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3], "
          "'executable': sys.executable, 'include': sysconfig.get_paths()['include']}))")
MINORS = range(8, 16)


@dataclass(frozen=True)
class Interpreter:
    path: str           # the path we ran (kept: venvs made from it point back to it)
    version: str
    executable: str     # sys.executable it reports
    origin: str         # PATH | pyenv | conda | uv | system | given
    has_headers: bool   # Python.h present (needed to build extensions)

    @property
    def parsed(self) -> Version:
        return Version(self.version)


def _probe(path: str, origin: str, timeout: float = 15.0) -> Interpreter | str:
    try:
        out = procs.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                        env={k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{path}: {e.__class__.__name__}"
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()
        return f"{path}: exit {out.returncode} ({first[0] if first else 'no output'})"
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"{path}: unexpected output"
    return Interpreter(path=path, version=info["version"], executable=info["executable"], origin=origin,
                       has_headers=Path(info["include"], "Python.h").is_file())


_PROBED: dict[tuple, Interpreter | str] = {}


def _probe_once(path: str, origin: str) -> Interpreter | str:
    """_probe, remembered for this process while the file (and what it links to) is unchanged: doctor and the
    build's own interpreter choice ask about the same candidates within one command."""
    try:
        st, real = os.stat(path), os.stat(os.path.realpath(path))
        key = (path, origin, st.st_mtime_ns, st.st_size, real.st_mtime_ns, real.st_ino)
    except OSError:
        return _probe(path, origin)
    if key not in _PROBED:
        _PROBED[key] = _probe(path, origin)
    return _PROBED[key]


def _on_path(env: dict[str, str]) -> list[tuple[str, str]]:
    found = (shutil.which(n, path=env.get("PATH")) for n in [f"python3.{m}" for m in MINORS] + ["python3"])
    return [(p, "PATH") for p in found if p]


def _pyenv(env: dict[str, str]) -> list[tuple[str, str]]:
    """Each pyenv version's newest python3.X (or python3)."""
    seen = []
    pyenv_root = Path(env.get("PYENV_ROOT") or Path(env.get("HOME", "~")).expanduser() / ".pyenv")
    for d in sorted((pyenv_root / "versions").glob("*")):
        for n in [f"bin/python3.{m}" for m in MINORS] + ["bin/python3"]:
            if (d / n).is_file():
                seen.append((str(d / n), "pyenv"))
                break
    return seen


def _conda(env: dict[str, str]) -> list[tuple[str, str]]:
    """The active conda env, the base of the conda in use and the usual install places, with their envs."""
    conda_bases = []
    if env.get("CONDA_PREFIX"):
        conda_bases.append(Path(env["CONDA_PREFIX"]))
    if env.get("CONDA_EXE"):
        conda_bases.append(Path(env["CONDA_EXE"]).parent.parent)
    home = Path(env.get("HOME", "~")).expanduser()
    conda_bases += [home / "miniconda3", home / "anaconda3", home / "miniforge3", home / "mambaforge",
                    Path("/opt/conda")]
    return [(str(d / "bin" / "python3"), "conda")
            for base in conda_bases
            for d in [base, *sorted((base / "envs").glob("*"))]
            if (d / "bin" / "python3").is_file()]


def _uv_managed(env: dict[str, str]) -> list[tuple[str, str]]:
    uv = shutil.which("uv", path=env.get("PATH"))
    if not uv:
        return []
    # uv-managed interpreters live in `uv python dir` (`uv python list` would also probe all of PATH: 1 s+)
    try:
        out = procs.run([uv, "python", "dir"], capture_output=True, text=True, timeout=20, env=env)
        managed = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        managed = None
    if not (managed and managed.is_dir()):
        return []
    return [(str(d / "bin" / "python3"), "uv")
            for d in sorted(managed.glob("cpython-*")) if (d / "bin" / "python3").is_file()]


def _system() -> list[tuple[str, str]]:
    return [(str(Path(d) / f"python3.{m}"), "system")
            for d in ("/usr/bin", "/usr/local/bin") for m in MINORS if (Path(d) / f"python3.{m}").is_file()]


def _candidates(env: dict[str, str]) -> list[tuple[str, str]]:
    """(path, origin) of every interpreter worth probing, each real file once (the first name found)."""
    seen = _on_path(env) + _pyenv(env) + _conda(env) + _uv_managed(env) + _system()
    out_list, keys = [], set()
    for p, origin in seen:
        key = os.path.realpath(p)
        if key not in keys:
            keys.add(key)
            out_list.append((p, origin))
    return out_list


def discover(env: dict[str, str] | None = None) -> tuple[list[Interpreter], list[str]]:
    """All working interpreters found, newest first, and the candidates that failed (with why)."""
    env = dict(os.environ if env is None else env)
    good: list[Interpreter] = []
    bad: list[str] = []
    real_seen = set()
    cands = _candidates(env)
    # each candidate is a process start (a pyenv shim is a shell script): all at once, the order kept
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(cands)))) as pool:
        results = list(pool.map(lambda c: _probe_once(*c), cands))
    for r in results:
        if isinstance(r, str):
            bad.append(r)
            continue
        key = os.path.realpath(r.executable)
        if key in real_seen:
            continue
        real_seen.add(key)
        good.append(r)
    good.sort(key=lambda i: i.parsed, reverse=True)
    return good, bad


def find(
    spec: str, given: str | None = None, env: dict[str, str] | None = None, what: str = "this variant"
) -> Interpreter:
    """The newest working interpreter whose version is in ``spec`` (or the one ``given``)."""
    if given:
        r = _probe(given, "given")
        if isinstance(r, str):
            raise UsageError(
                f"The interpreter given with --python does not run ({r}).",
                "Pass the path of a working python executable.",
            )
        if not SpecifierSet(spec).contains(r.version):
            raise UsageError(
                f"--python {given} is Python {r.version}, outside {what}'s range '{spec}'.",
                f"Pass an interpreter in '{spec}' or change the variant's python key.",
            )
        return r
    good, bad = discover(env)
    for interp in good:
        if SpecifierSet(spec).contains(interp.version):
            return interp
    found = ", ".join(f"{i.version} ({i.origin})" for i in good) or "none"
    want = _minor_hint(spec)
    raise UsageError(
        f"No Python in '{spec}' for {what} (working interpreters found: {found}; searched PATH, pyenv, "
        f"conda, uv"
        f"{'; ' + str(len(bad)) + ' candidates failed to run' if bad else ''}).",
        f"Install one (e.g. `uv python install {want}` or your OS's python{want}) or pass --python PATH.",
    )


def _minor_hint(spec: str) -> str:
    s = SpecifierSet(spec)
    for m in reversed(MINORS):
        if s.contains(f"3.{m}.0") or s.contains(f"3.{m}.99"):
            return f"3.{m}"
    return "3"
