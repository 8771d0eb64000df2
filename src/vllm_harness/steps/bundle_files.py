"""The bundle's pieces (steps/bundle): the target (Python, platform tags), picking the best file of a release for
it, downloads (sha256 checked), hard links into the bundle, the manifest, and a sha256 record keyed by the
file's stat so that re-checking an unchanged bundle costs stat calls."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging import tags as ptags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from vllm_harness.core import safeio
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.masking import mask
from vllm_harness.facts import index_metadata as im
from vllm_harness.facts import pythons
from vllm_harness.facts.package_index import dist_name_version

SCHEMA = 1
MANIFEST = "manifest.json"

# ------------------------------------------------------------------------------------------ the target

@dataclass(frozen=True)
class Target:
    python: str            # "3.12"
    arch: str              # "x86_64"
    glibc: str             # "2.28"
    where: str             # "this machine" / the profile's path

    @property
    def uv_platform(self) -> str:
        major, minor = self.glibc.split(".")[:2]
        return f"{self.arch}-manylinux_{major}_{minor}"

    def platforms(self) -> list[str]:
        major, minor = (int(x) for x in self.glibc.split(".")[:2])
        out = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        out += [f"{legacy[m]}_{self.arch}" for m in (17, 12, 5) if major == 2 and m <= minor]
        return out + [f"linux_{self.arch}"]

    def tags(self) -> list[ptags.Tag]:
        ver = tuple(int(x) for x in self.python.split("."))
        return list(ptags.cpython_tags(ver, platforms=self.platforms())) + \
            list(ptags.compatible_tags(ver, platforms=self.platforms()))


def target_for(variant, profile: dict | None = None, profile_path: str | None = None,
               python: str | None = None, given: str | None = None) -> Target:
    """The Python and platform a bundle is for: --machine's profile, else this machine (the interpreter the
    env step would pick)."""
    m = (profile or {}).get("machine", {})
    if profile is not None:
        have = [v for v in m.get("python", []) if variant.python_spec.contains(v)]
        if not have and not python:
            raise UsageError(f"Machine profile {profile_path}: no Python in [machine] python "
                             f"({', '.join(m.get('python', [])) or 'none'}) fits variant {variant.name}'s "
                             f"python = '{variant.python}'.",
                             "Install a fitting Python on that machine and save its profile again "
                             "(`invoke doctor --save-machine FILE`), or use a variant for its Python.")
        py = python or sorted(have, key=Version)[-1]
        glibc = str(m.get("glibc") or "2.28")
        arch = m.get("arch") or platform.machine()
        where = str(profile_path)
    else:
        if python is None:
            python = pythons.find(variant.python, given, dict(os.environ), what=f"variant {variant.name}").version
        py = python
        glibc = platform.libc_ver()[1] or "2.28"
        arch = platform.machine()
        where = "this machine"
    py = ".".join(str(py).split(".")[:2])
    return Target(python=py, arch=arch, glibc=".".join(glibc.split(".")[:2]), where=where)


def variant_hash(variant) -> str:
    return hashlib.sha256(Path(variant.path).read_bytes()).hexdigest()


sha256_file = safeio.sha256_file


def bundle_cmd(variant, out: Path | str, machine: str | None = None) -> str:
    return f"invoke bundle --variant {variant.name} --out {out}" + (f" --machine {machine}" if machine else "")


# ------------------------------------------------------------------------------------------ files

def _candidates_local(folder: Path, name: str, version: Version) -> list[tuple[Path, str]]:
    out = []
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        parsed = dist_name_version(p.name)
        if parsed is None:
            continue
        n, ver = parsed
        if n == canonicalize_name(name) and ver == version:
            out.append((p, p.resolve().as_uri()))
    return out


def best_file(names: list[tuple[str, object]], target: Target) -> tuple[int, object] | None:
    """The best (filename, payload) for the target's tags: a wheel by tag priority, else an sdist."""
    order = {t: i for i, t in enumerate(target.tags())}
    best = None
    for fname, payload in names:
        if fname.endswith(".whl"):
            try:
                file_tags = parse_wheel_filename(fname)[3]
            except ValueError:
                continue
            rank = min((order[t] for t in file_tags if t in order), default=None)
            if rank is None:
                continue
        else:
            rank = 10 ** 6
        if best is None or rank < best[0]:
            best = (rank, (fname, payload))
    return best[1] if best else None


def _index_files(index: str, name: str, cache_dir: Path) -> list:
    http = im.Http(cache_dir)
    try:
        return im.read_project(http, index, name)
    except im.FetchError as e:
        raise StepFailed(f"bundle: {mask(e.url)}: {e.reason}", None) from None


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def _download(url: str, dest: Path, sha256: str | None, say) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    t0 = time.monotonic()
    req = urllib.request.Request(url, headers={"User-Agent": "vllm-harness-bundle"})
    with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as fh:  # noqa: S310
        for chunk in iter(lambda: r.read(1 << 20), b""):
            fh.write(chunk)
            h.update(chunk)
    digest = h.hexdigest()
    if sha256 and digest != sha256:
        tmp.unlink(missing_ok=True)
        raise StepFailed(f"bundle: {mask(url)} has sha256 {digest}, the index says {sha256}.",
                         "Retry; if it persists the download is being altered (proxy/mirror).")
    os.replace(tmp, dest)
    size = dest.stat().st_size
    say(f"    downloaded {dest.name} ({size / 2**20:.1f} MiB, {size / 2**20 / max(time.monotonic() - t0, 1e-3):.1f} MiB/s)")
    return digest


# ------------------------------------------------------------------------------------------ manifest

def load_manifest(out: Path) -> dict | None:
    p = out / MANIFEST
    if not p.is_file():
        return None
    data = safeio.load_json(p, "Bundle manifest", f"Delete {p} and run `invoke bundle` again.", limit=1 << 24)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("files"), dict):
        raise UsageError(f"Bundle manifest {p} is not one this harness writes (schema {SCHEMA}).",
                         f"Delete {p} and run `invoke bundle` again.")
    return data


def _save_manifest(out: Path, data: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, out / MANIFEST)


class _Verified:
    """sha256 results by (path, size, mtime), so re-checking an unchanged 3 GB bundle costs stat calls."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def sha(self, p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self.data:
            self.data[key] = sha256_file(p)
        return self.data[key]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data))
        except OSError:
            pass


