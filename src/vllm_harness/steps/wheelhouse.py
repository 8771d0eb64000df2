"""Wheel artifacts: every source build leaves a wheel, keyed by everything that changes the binary.

    .harness/wheelhouse/<key>/<the wheel>.whl
    .harness/wheelhouse/<key>/meta.json        the key's parts (readable), variant, when, build seconds

The key (:func:`binary_key`) hashes: the prepared source tree's *content* (so the source version or commit,
``use_existing_torch.py``'s edits and any patch are in it; build outputs and what the tree's own
``.gitignore`` ignores are not), the installed torch, the CUDA toolkit's nvcc version, the final
``TORCH_CUDA_ARCH_LIST``, the Python version and ABI, the C++ compiler's version, the target device, the
build variables that change code (``CMAKE_BUILD_TYPE``, ``CMAKE_ARGS`` less the compiler launcher, ``*FLAGS``,
``VLLM_*`` of the variant's ``[build] env``) and the platform.  Not in it: ``MAX_JOBS``, ``NVCC_THREADS``
and the compiler cache (they change the time, not the binary).

A build whose key is in the wheelhouse installs that wheel (``--no-deps``: the deps step installed the
runtime requirements) instead of compiling; ``--rebuild`` compiles anyway.  ``VLLM_HARNESS_WHEELHOUSE``
moves it (a shared folder for a team); ``clean`` keeps it unless ``--wheelhouse`` or ``--all``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.core.status import key_of

SCHEMA = 1
SKIP_DIRS = {"build", "dist", ".deps", ".git", "__pycache__", ".eggs", ".pytest_cache", ".mypy_cache"}
SKIP_FILES = ("*.so", "*.pyd", "*.pyc", "*.o", "_version.py", "provenance.json")
KEY_ENV = ("CMAKE_BUILD_TYPE", "CFLAGS", "CXXFLAGS", "LDFLAGS", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS",
           "VLLM_TARGET_DEVICE", "TORCH_CUDA_ARCH_LIST")


def root(state: Path, env: dict[str, str] | None = None) -> Path:
    shared = (env if env is not None else os.environ).get("VLLM_HARNESS_WHEELHOUSE")
    return Path(shared).expanduser().resolve() if shared else state / "wheelhouse"


# ------------------------------------------------------------------------------------------ the key

def _gitignore(src: Path) -> list[str]:
    try:
        lines = (src / ".gitignore").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "!"))]


def _ignored(rel: str, name: str, pats: list[str]) -> bool:
    for p in pats:
        q = p.rstrip("/")
        if "/" in q.lstrip("/"):
            q = q.lstrip("/")
            if fnmatch.fnmatch(rel, q) or fnmatch.fnmatch(rel, q + "/*") or rel.startswith(q + "/"):
                return True
        elif fnmatch.fnmatch(name, q.lstrip("/")):
            return True
    return False


def tree_hash(src: Path) -> tuple[str, int]:
    """sha256 over (relative path, content) of the source files; (hex, file count)."""
    pats = _gitignore(src)
    h = hashlib.sha256()
    n = 0
    for dirpath, dirs, files in os.walk(src):
        reld = os.path.relpath(dirpath, src)
        reld = "" if reld == "." else reld
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and not _ignored(os.path.join(reld, d), d, pats))
        for f in sorted(files):
            rel = os.path.join(reld, f)
            if any(fnmatch.fnmatch(f, p) for p in SKIP_FILES) or _ignored(rel, f, pats):
                continue
            p = os.path.join(dirpath, f)
            try:
                if os.path.islink(p):
                    data = b"->" + os.readlink(p).encode()
                else:
                    with open(p, "rb") as fh:
                        data = fh.read()
            except OSError:
                continue
            h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            n += 1
    return h.hexdigest(), n


def _first_line(argv: list[str], env: dict[str, str]) -> str | None:
    try:
        r = procs.run(argv, capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0].strip() if r.returncode == 0 and text else None


def compiler_version(env: dict[str, str]) -> str | None:
    cxx = env.get("CXX") or shutil.which("c++", path=env.get("PATH")) or "c++"
    return _first_line([cxx, "--version"], env)


def nvcc_version(env: dict[str, str]) -> str | None:
    home = env.get("CUDA_HOME")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else (shutil.which("nvcc",
                                                                       path=env.get("PATH")) or "nvcc")
    try:
        out = procs.run([nvcc, "--version"], capture_output=True, text=True, env=env, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else None


@dataclass(frozen=True)
class BuildInputs:
    """What besides the source tree a build's wheel depends on: the device, torch and Python versions, the
    CUDA archs, the build step's final child ``env`` and the variant's [build] env, and the source's
    provenance and patches."""

    device: str
    torch: str | None
    python: str | None
    archs: str | None
    env: dict[str, str]
    variant_env: dict[str, str]
    provenance: dict | None = None
    patches: list | None = None


def binary_key(src: Path, inputs: BuildInputs | None = None, **fields: object) -> tuple[str, dict]:
    """(key, parts) for a build of ``src`` with this environment (the build step's final child env).
    ``inputs``, or its fields as keywords: see :class:`BuildInputs`."""
    b = inputs if inputs is not None else BuildInputs(**fields)
    device, archs, env = b.device, b.archs, b.env
    th, n = tree_hash(src)
    cmake_args = " ".join(a for a in env.get("CMAKE_ARGS", "").split() if "_COMPILER_LAUNCHER=" not in a)
    prov = {k: v for k, v in (b.provenance or {}).items() if k in ("from", "sha256", "commit", "ref", "url")}
    parts = {
        "schema": SCHEMA,
        "source": {"tree_sha256": th, "files": n, **prov},
        "patches": b.patches or [],
        "torch": b.torch,
        "cuda": nvcc_version(env) if device == "cuda" else None,
        "archs": archs if device == "cuda" else None,
        "python": b.python,
        "compiler": compiler_version(env),
        "device": device,
        "build_env": {
            **{k: env[k] for k in KEY_ENV if env.get(k)},
            "CMAKE_ARGS": cmake_args,
            **{k: v for k, v in b.variant_env.items() if k not in ("MAX_JOBS", "NVCC_THREADS")},
        },
        "platform": f"{platform.system()}-{platform.machine()}-{'-'.join(platform.libc_ver())}",
    }
    if device == "cuda" and not parts["archs"]:
        parts["archs"] = "source default"
    return key_of(parts), parts


# ------------------------------------------------------------------------------------------ the store


def lookup(state: Path, key: str, env: dict[str, str] | None = None) -> Path | None:
    d = root(state, env) / key
    wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
    return wheels[0] if wheels and (d / "meta.json").is_file() else None


@dataclass(frozen=True)
class WheelRecord:
    """What the wheelhouse keeps beside a wheel: the parts of its key, the variant that built it, how long."""
    parts: dict
    variant: str
    seconds: float | None = None


def store(state: Path, key: str, wheel: Path, record: WheelRecord, env: dict[str, str] | None = None) -> Path:
    """Copy ``wheel`` into the wheelhouse under ``key`` (atomically: a reader never sees half a wheel)."""
    parts, variant, seconds = record.parts, record.variant, record.seconds
    base = root(state, env)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy2(wheel, tmp / wheel.name)
    meta = {
        "key": key,
        "wheel": wheel.name,
        "variant": variant,
        "created": time.time(),
        "build_seconds": None if seconds is None else round(seconds, 1),
        "bytes": wheel.stat().st_size,
        "parts": parts,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    dest = base / key
    if dest.exists():
        old = base / f".{key}.old{os.getpid()}"
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dest)
    return dest / wheel.name


def entries(state: Path, env: dict[str, str] | None = None) -> list[dict]:
    out = []
    base = root(state, env)
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if d.name.startswith(".") or not (d / "meta.json").is_file():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        meta["path"] = str(d)
        out.append(meta)
    return out


def paths_of_variant(state: Path, variant: str | None) -> list[Path]:
    """The wheelhouse folders of one variant (all of them for None) under the state folder's wheelhouse."""
    base = state / "wheelhouse"
    if variant is None:
        return [base] if base.exists() else []
    return [Path(e["path"]) for e in entries(state, {}) if e.get("variant") == variant]


def install_cmd(py: Path, wheel: Path, uv: str | None) -> list[str]:
    """Install a wheelhouse wheel into the venv: no resolution (the deps step made the environment)."""
    if uv:
        argv = [uv, "pip", "install", "--python", str(py), "--no-deps", "--reinstall", "--offline"]
    else:
        argv = [
            str(py),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--force-reinstall",
            "--no-index",
            "--progress-bar",
            "off",
        ]
    return argv + [str(wheel)]
