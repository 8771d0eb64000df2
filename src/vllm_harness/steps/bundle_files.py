"""The bundle's pieces (steps/bundle): the target (Python, platform tags), picking the best file of a release
for it, downloads (sha256 checked), hard links into the bundle, and the manifest (every key checked for its
type, every file entry a wheel or sdist name inside the bundle).  A verdict on a file is always its content's
sha256: no record keyed by its stat (an edit that restores the mtime keeps size, inode and mtime)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from packaging import tags as ptags
from packaging.requirements import Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

from vllm_harness.core import safeio, writer
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError
from vllm_harness.core.masking import mask
from vllm_harness.facts import compat, feasibility, pythons
from vllm_harness.facts import index_metadata as im
from vllm_harness.facts.package_index import dist_name_version

SCHEMA = 1
DOWNLOAD_MAX = 8 << 30   # one wheel or sdist (torch's CUDA wheels are ~1-3 GB)
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
        return feasibility.uv_python_platform(self.arch, self.glibc)

    def platforms(self) -> list[str]:
        return feasibility.manylinux_platforms(self.arch, self.glibc)

    def tags(self) -> list[ptags.Tag]:
        ver = tuple(int(x) for x in self.python.split("."))
        return list(ptags.cpython_tags(ver, platforms=self.platforms())) + \
            list(ptags.compatible_tags(ver, platforms=self.platforms()))


def target_for(variant, profile: dict | None = None, profile_path: str | None = None,
               python: str | None = None, given: str | None = None, say=None) -> Target:
    """The Python and platform a bundle is for: --machine's profile, else this machine (the interpreter the
    env step would pick).  A profile is first judged by doctor's platform rule (:func:`judge_platform`)."""
    m = (profile or {}).get("machine", {})
    if profile is not None:
        judge_platform(variant, profile, profile_path, say)
        have = [v for v in m.get("python", []) if variant.python_spec.contains(v)]
        if not have and not python:
            raise UsageError(f"Machine profile {profile_path}: no Python in [machine] python "
                             f"({', '.join(m.get('python', [])) or 'none'}) fits variant {variant.name}'s "
                             f"python = '{variant.python}'.",
                             "Install a fitting Python on that machine and save its profile again "
                             "(`invoke doctor --save-machine FILE`), or use a variant for its Python.")
        py = python or sorted(have, key=Version)[-1]
        glibc = str(m.get("glibc") or "2.28")
        arch = feasibility.cpu_arch(profile) or platform.machine()
        where = str(profile_path)
    else:
        if python is None:
            python = pythons.find(
                variant.python, given, dict(os.environ), what=f"variant {variant.name}"
            ).version
        py = python
        glibc = platform.libc_ver()[1] or "2.28"
        arch = platform.machine()
        where = "this machine"
    py = ".".join(str(py).split(".")[:2])
    return Target(python=py, arch=arch, glibc=".".join(glibc.split(".")[:2]), where=where)


def judge_platform(variant, profile: dict, profile_path: str | None, say=None) -> list:
    """``bundle --machine``: the variant on that machine's platform (CPU arch, glibc against each wheel's
    glibc floor, Jetson), judged by facts/feasibility.py as doctor's platform rule is.  Where doctor finds
    an error (its verdict 'will fail') the bundle is refused before anything is fetched (exit 2, with doctor's
    ids and fixes); its warnings are said.  Returns the warnings' findings."""
    verdict = feasibility.platform_verdict(compat.load(), profile, feasibility.candidate_of(variant))
    errors = [i.finding for i in verdict.issues if i.finding.severity == "error"]
    if errors:
        raise UsageError(f"Machine profile {profile_path}: variant {variant.name} does not run there "
                         "(doctor: will fail): " + "; ".join(f"{f.id}: {f.evidence}" for f in errors) + ".",
                         "; ".join(dict.fromkeys(f.fix for f in errors))
                         + f" (`invoke doctor --variant {variant.name} --machine {profile_path}` says the "
                           "same).")
    warnings = [i.finding for i in verdict.issues if i.finding.severity == "warning"]
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    for f in warnings:
        say(f"  ! {f.id}: {f.evidence}; {f.fix}")
    return warnings


def variant_hash(variant) -> str:
    return hashlib.sha256(Path(variant.path).read_bytes()).hexdigest()


sha256_file = safeio.sha256_file


def bundle_cmd(variant, out: Path | str, machine: str | None = None) -> str:
    return f"invoke bundle --variant {variant.name} --out {out}" + (
        f" --machine {machine}" if machine else "")


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


def link_into(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def _download(url: str, dest: Path, sha256: str | None, say) -> str:
    t0 = time.monotonic()
    fetcher = Fetcher(deadline_s=None, max_requests=8, timeout_s=60, request_deadline_s=3 * 3600,
                      user_agent="vllm-harness-bundle")
    try:   # core.fetcher: streamed to a temporary file beside dest, sha256 checked, renamed; bounded
        digest = fetcher.download(url, dest, max_bytes=DOWNLOAD_MAX, sha256=sha256)
    except FetchError as e:
        if e.kind == "sha256":
            raise StepFailed(
                f"bundle: {e.url} has sha256 {e.digest}, the index says {sha256}.", e.fix
            ) from None
        raise StepFailed(f"bundle: cannot download {e.url} ({e.reason}).", e.fix) from None
    size = dest.stat().st_size
    rate = size / 2**20 / max(time.monotonic() - t0, 1e-3)
    say(f"    downloaded {dest.name} ({size / 2**20:.1f} MiB, {rate:.1f} MiB/s)")
    return digest


# ------------------------------------------------------------------------------------------ manifest

HEX64 = re.compile(r"[0-9a-f]{64}")
SOURCE_ARCHIVE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.(tar\.gz|tgz|tar\.bz2|tar\.xz|tar|zip)")
PARTIAL = "bundle"   # the step name of the `missing` entry a manifest written while its run goes on carries


def _fix(p: Path) -> str:
    return (f"Delete {p.parent} (or just {p}) and make the bundle again: `invoke bundle --variant NAME --out "
            f"{p.parent}` (it adds what is missing and checks every file it keeps).")


def _bad(p: Path, why: str) -> UsageError:
    return UsageError(f"Bundle manifest {p} is not one this harness writes: {why}.", _fix(p))


def _check_rel(p: Path, rel: object) -> str:
    """A file entry's name: ``wheels/<wheel or sdist name>`` or ``sdist/<sdist name>``, nothing else."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise _bad(p, f"file entry {str(rel)[:80]!r} is not a relative path")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts or len(parts) != 2 \
            or parts[0] not in ("wheels", "sdist") or rel != "/".join(parts):
        raise _bad(p, f"file entry {rel[:120]!r} is not wheels/NAME or sdist/NAME inside the bundle")
    name = parts[1]
    try:
        if name.endswith(".whl") and parts[0] == "wheels":
            parse_wheel_filename(name)
        else:
            parse_sdist_filename(name)
    except (InvalidWheelFilename, InvalidSdistFilename, ValueError):
        # vLLM's own source archive may be a local file of the user's naming (fetch's `source = path`)
        if not (parts[0] == "sdist" and SOURCE_ARCHIVE.fullmatch(name)):
            raise _bad(p, f"file entry {rel[:120]!r} is not named as a wheel or an sdist") from None
    return rel


def _check_info(p: Path, rel: str, info: object) -> None:
    if not isinstance(info, dict):
        raise _bad(p, f"entry {rel!r} is not a table")
    if not isinstance(info.get("sha256"), str) or not HEX64.fullmatch(info["sha256"]):
        raise _bad(p, f"entry {rel!r} has no sha256 (64 hex digits)")
    if type(info.get("size")) is not int or info["size"] < 0:
        raise _bad(p, f"entry {rel!r} has no size (a whole number of bytes)")
    for k in ("url", "pin"):
        if not isinstance(info.get(k, ""), str):
            raise _bad(p, f"entry {rel!r}: {k} is not text")


def validate_manifest(p: Path, data: object) -> dict:
    """The manifest's shape, every key the harness reads with its type; every file entry inside the bundle."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise _bad(p, f"not a schema {SCHEMA} bundle manifest")
    v, t = data.get("variant"), data.get("target")
    if not isinstance(v, dict) or not all(isinstance(v.get(k), str) for k in ("name", "sha256")):
        raise _bad(p, "variant is not a table with name and sha256")
    if not isinstance(t, dict) or not all(isinstance(t.get(k), str)
                                          for k in ("python", "arch", "glibc", "where")):
        raise _bad(p, "target is not a table with python, arch, glibc and where")
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("recorded", {}), dict):
        raise _bad(p, "files is not a table")
    for rel, info in [*data["files"].items(), *data.get("recorded", {}).items()]:
        _check_info(p, _check_rel(p, rel), info)
    missing = data.get("missing", [])
    if not isinstance(missing, list) or not all(
        isinstance(m, dict) and isinstance(m.get("what"), str)
        and all(isinstance(m.get(k, ""), str) for k in ("source", "reason", "fill", "step"))
        for m in missing
    ):
        raise _bad(p, "missing is not a list of tables with what")
    deps = data.get("deps") or {}
    if not isinstance(deps, dict):
        raise _bad(p, "deps is not a table")
    for name, d in deps.items():
        dname = d.get("dir") if isinstance(d, dict) else None
        if not isinstance(dname, str) or not dname or dname in (".", "..") or "/" in dname or "\\" in dname \
                or "\x00" in dname:
            raise _bad(p, f"deps entry {str(name)[:80]!r} has no dir (one folder name under deps/)")
    for k in ("pins",):
        if not isinstance(data.get(k, {}), dict):
            raise _bad(p, f"{k} is not a table")
    if not isinstance(data.get("resolved_key"), (str, type(None))):
        raise _bad(p, "resolved_key is not text")
    return data


def inside(out: Path, rel: str) -> Path:
    """``out/rel``, refused (UsageError naming it) when it resolves outside the bundle (a symlink out)."""
    p = out / rel
    root = out.resolve()
    real = p.resolve()
    if real != root and root not in real.parents:
        raise UsageError(f"Bundle {out}: {rel} is a link to {real}, outside the bundle; nothing was used.",
                         f"Replace {p} by the file itself (or delete it and run `invoke bundle` again).")
    return p


def load_manifest(out: Path) -> dict | None:
    p = out / MANIFEST
    if not p.is_file() and not p.is_symlink():
        return None
    data = safeio.load_json(p, "Bundle manifest", _fix(p), limit=1 << 24)
    return validate_manifest(p, data)


def save_manifest(out: Path, data: dict) -> None:
    # the bundle folder is the user's: never through a planted manifest.json.tmp link (core.writer)
    writer.write_file(out / MANIFEST, json.dumps(data, indent=2, sort_keys=True), what="Bundle manifest",
                      force=True)


class Known:
    """filename -> {sha256, size, url} of the files the bundle downloaded into the harness's download cache:
    where a cached file came from and what it was then.  A file is hashed again before it is used; this
    record never says that a file is unchanged, only what it must hash to."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self.data = {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)
                     and type(v.get("size")) is int} if isinstance(data, dict) else {}

    def save(self) -> None:
        try:
            writer.write_file(self.path, json.dumps(self.data), what="Bundle download record", force=True)
        except (OSError, UsageError):
            pass  # a record that cannot be saved only costs a hash next time


# ------------------------------------------------------------------------------ a pinned file

@dataclass(frozen=True)
class Fill:
    """One run of :func:`make`: the bundle folder ``out`` and its ``target``; where pinned files are looked
    for (``links``: find-links folders, ``cache``: the download cache, whose files' origins ``known``
    records); ``work``: the resolution's scratch folder; ``env``: the children's environment; ``expected``:
    what the old manifest recorded under each name; ``say``: the progress output; ``missing``: what the run
    could not get (filled as it goes)."""

    out: Path
    target: Target
    links: list[str]
    cache: Path
    work: Path
    env: dict[str, str]
    known: Known
    expected: dict
    variant: object
    say: Callable[[str], object] = print
    missing: list[dict] = field(default_factory=list)


def unchanged_file(out: Path, rel: str, digest: str, expected: dict, origin: str) -> None:
    """A file about to be (re)recorded under ``rel``: the same content the manifest recorded, if it did."""
    was = expected.get(rel)
    if was and was["sha256"] != digest:
        raise UsageError(f"Bundle {out}: {rel} from {mask(origin)} has sha256 {digest[:16]}..., its manifest "
                         f"recorded {was['sha256'][:16]}... under that name (another file of the same name); "
                         "nothing was recorded.",
                         f"Remove that file from {mask(origin)} (the recorded one is fetched from its "
                         "origin), or make the bundle in a new folder if the new file is meant.")


def get_file(pin: str, index: str, fill: Fill, old_files: dict) -> tuple[str, dict]:
    """The bundle's file of ``pin``: (its name in the bundle, its manifest entry).  Every file recorded is
    hashed here (or was, against the manifest, when the run began), and one whose name the manifest already
    records with another sha256 is refused (``unchanged_file``): a swapped file is never recorded silently."""
    req = Requirement(pin)
    version = Version(str(next(iter(req.specifier)).version))
    # 1. already in the bundle (listed; its content checked against the manifest when this run began)
    for rel, info in old_files.items():
        there = fill.out / rel
        if info.get("pin") == pin and there.is_file() and there.stat().st_size == info["size"]:
            return rel, info
    # 2. a local find-links folder (the bundle's own wheels/ first) or the download cache
    got = _get_local(pin, req.name, version, fill, old_files)
    # 3. the index
    return got if got is not None else _get_from_index(pin, index, req.name, version, fill)


def _get_local(pin: str, name: str, version: Version, fill: Fill, old_files: dict) -> tuple[str, dict] | None:
    """The best file of ``pin`` in a find-links folder or the download cache (None: none, or the cache's
    copy changed since it was downloaded and was removed)."""
    out, cache, known = fill.out, fill.cache, fill.known
    local: list[tuple[str, object]] = []
    for f in fill.links + [str(cache)]:
        folder = Path(f[7:] if f.startswith("file://") else f)
        local += [(p.name, (p, url)) for p, url in _candidates_local(folder, name, version)
                  if f != str(cache) or p.name in known.data]   # the download cache: files of known origin
    pick = best_file(local, fill.target)
    if pick is None:
        return None
    p, url = pick[1]
    rel = f"wheels/{p.name}"
    dest = out / "wheels" / p.name
    listed = old_files.get(rel)
    if listed and p.resolve() == dest.resolve() and dest.stat().st_size == listed["size"]:
        return rel, {**listed, "pin": pin}
    k = known.data.get(p.name)
    from_cache = p.parent.resolve() == cache.resolve()
    digest = sha256_file(p)
    if from_cache and digest != k["sha256"]:
        # the cached copy is not what was downloaded (edited in place through a hard link?): fetched again
        fill.say(f"    {p.name}: the download cache's copy changed since it was downloaded; fetching it "
                 "again")
        p.unlink(missing_ok=True)
        del known.data[p.name]
        return None
    if k and not from_cache and p.resolve() == dest.resolve() and digest != k["sha256"]:
        raise UsageError(f"Bundle {out}: {rel} has sha256 {digest[:16]}..., the file of that name "
                         f"downloaded from {k.get('url', '?')} had {k['sha256'][:16]}...; nothing was "
                         "recorded.",
                         f"Delete {dest} and run `invoke bundle` again (it is fetched again and checked).")
    unchanged_file(out, rel, digest, fill.expected, str(p.parent))
    if p.resolve() != dest.resolve():
        link_into(p, dest)
    if k and digest == k["sha256"]:  # downloaded earlier: its origin
        return rel, {**k, "pin": pin}
    return rel, {"sha256": digest, "size": dest.stat().st_size, "url": url, "pin": pin}


def _get_from_index(pin: str, index: str, name: str, version: Version, fill: Fill) -> tuple[str, dict]:
    """The best file of ``pin`` on the index, through the download cache (sha256 checked)."""
    out, cache, target, known = fill.out, fill.cache, fill.target, fill.known
    files = [f for f in _index_files(index, name, cache.parent / "bundle" / "pages") if not f.yanked]
    cands = []
    for f in files:
        try:
            ver = parse_wheel_filename(f.filename)[1] if f.filename.endswith(".whl") else \
                parse_sdist_filename(f.filename)[1]
        except ValueError:
            continue
        if ver == version:
            cands.append((f.filename, f))
    pick = best_file(cands, target)
    if pick is None:
        raise StepFailed(f"{mask(index)} has no file of {pin} for Python {target.python} on "
                         f"{target.uv_platform}", None)
    f = pick[1]
    cached = cache / f.filename
    if cached.is_file() and f.sha256 and sha256_file(cached) == f.sha256:
        fill.say(f"    {f.filename}: from the download cache")
        digest = f.sha256
    else:
        digest = _download(f.url, cached, f.sha256, fill.say)
    rel = f"wheels/{f.filename}"
    unchanged_file(out, rel, digest, fill.expected, f.url)
    known.data[f.filename] = {"sha256": digest, "size": cached.stat().st_size, "url": mask(f.url)}
    known.save()   # before the link: a killed run's file in the bundle is checked against it when resumed
    dest = out / "wheels" / f.filename
    link_into(cached, dest)
    if sha256_file(dest) != digest:   # the cache's copy changed between the two (another process)
        dest.unlink(missing_ok=True)
        raise StepFailed(f"bundle: {cached} changed while it was linked into the bundle.",
                         "Run `invoke bundle` again.")
    return rel, {**known.data[f.filename], "pin": pin}
