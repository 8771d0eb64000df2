"""Get a vLLM source tree for a variant: a PyPI sdist (sha256 checked, cached), a git ref, or a local path.

The tree lands in ``.harness/src/<variant>/`` (a local path is copied there unless the variant says
``in_place = true``), so the harness never edits a checkout the user did not hand over.  Provenance
(where from, hash or commit) is written beside it in ``provenance.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import StepFailed, UsageError
from .runner import write_json

PYPI_JSON = os.environ.get("VLLM_HARNESS_PYPI_JSON", "https://pypi.org/pypi/{name}/{version}/json")
COPY_IGNORE = shutil.ignore_patterns("build", "dist", ".deps", "*.egg-info", "*.so", "__pycache__", ".git")


def _download(url: str, dest: Path, sha256: str | None) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as fh:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                fh.write(chunk)
                h.update(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise StepFailed(f"fetch: cannot download {url} ({getattr(e, 'reason', e)}).",
                         "Check the network or proxy, or download the sdist elsewhere and set "
                         "source = 'path' in the variant to its unpacked folder.") from None
    if sha256 and h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise StepFailed(f"fetch: {url} has sha256 {h.hexdigest()}, PyPI says {sha256}.",
                         "Retry; if it persists, the download is being altered (proxy/mirror).")
    os.replace(tmp, dest)


def sdist_info(name: str, version: str) -> dict:
    url = PYPI_JSON.format(name=name, version=version)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            meta = json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise UsageError(f"PyPI has no {name} {version}.", "Check [vllm].version in the variant.") from None
        raise StepFailed(f"fetch: PyPI answered {e.code} for {url}.", "Retry later.") from None
    except (urllib.error.URLError, OSError) as e:
        raise StepFailed(f"fetch: cannot reach PyPI ({getattr(e, 'reason', e)}).",
                         "Check the network, or set source = 'path' to an unpacked sdist.") from None
    for f in meta.get("urls", []):
        if f.get("packagetype") == "sdist":
            return {"url": f["url"], "sha256": f["digests"]["sha256"], "filename": f["filename"]}
    raise UsageError(f"PyPI has no sdist for {name} {version}.", "Use source = 'git' with a ref.")


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    dest = dest.resolve()
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if not str(target).startswith(str(dest) + os.sep) and target != dest:
            raise StepFailed(f"fetch: archive member {m.name!r} points outside the source folder.",
                             "Do not use this archive.")
        if m.issym() or m.islnk():
            link = (target.parent / m.linkname).resolve()
            if not str(link).startswith(str(dest)):
                raise StepFailed(f"fetch: archive link {m.name!r} points outside the source folder.",
                                 "Do not use this archive.")
    tar.extractall(dest)


def fetch(variant, layout, env: dict[str, str]) -> tuple[Path, dict]:
    """Return (source dir, provenance)."""
    v = variant.vllm
    base = layout.src(variant.name)
    if v["source"] == "path":
        src = variant.source_path()
        if v["in_place"]:
            return src, {"from": "path", "path": str(src), "in_place": True}
        dest = base / src.name
        if dest.exists():
            shutil.rmtree(dest)
        base.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, symlinks=True, ignore=COPY_IGNORE)
        prov = {"from": "path", "path": str(src), "copied_to": str(dest)}
    elif v["source"] == "git":
        ref = v["ref"] or f"v{v['version']}"
        dest = base / f"vllm-{ref}"
        if dest.exists():
            shutil.rmtree(dest)
        base.mkdir(parents=True, exist_ok=True)
        genv = git_env(env, [dest])
        r = subprocess.run(["git", "clone", "--depth", "1", "--branch", ref, v["git"], str(dest)],
                           capture_output=True, text=True, env=genv, timeout=1800)
        if r.returncode != 0:
            raise StepFailed(f"fetch: git clone of {v['git']}@{ref} failed: {r.stderr.strip().splitlines()[-1:]}",
                             "Check the URL/ref and the network, or clone it yourself and use source = 'path'.")
        commit = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True,
                                text=True, env=genv).stdout.strip()
        prov = {"from": "git", "url": v["git"], "ref": ref, "commit": commit}
    else:
        info = sdist_info(v["package"], v["version"])
        cache = layout.cache / "sdist"
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / info["filename"]
        if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != info["sha256"]:
            _download(info["url"], archive, info["sha256"])
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            _safe_extract(tar, base)
        dirs = [d for d in base.iterdir() if d.is_dir()]
        if len(dirs) != 1:
            raise StepFailed(f"fetch: {archive.name} did not unpack to one folder.", "Use source = 'path'.")
        dest = dirs[0]
        prov = {"from": "pypi-sdist", "url": info["url"], "sha256": info["sha256"]}
    write_json(base / "provenance.json", prov)
    return dest, prov


def git_env(env: dict[str, str], trees: list[Path]) -> dict[str, str]:
    """Trust exactly the harness's own trees for git, through the child's environment only.

    Never ``git config --global``, never ``safe.directory = *``: GIT_CONFIG_COUNT/KEY/VALUE reach the
    git processes of this step (clone, CMake's FetchContent under .deps) and nothing else.
    """
    out = dict(env)
    n = int(out.get("GIT_CONFIG_COUNT", "0") or 0)
    for t in trees:
        for p in (t, t / ".deps" / "*"):
            out[f"GIT_CONFIG_KEY_{n}"] = "safe.directory"
            out[f"GIT_CONFIG_VALUE_{n}"] = str(p)
            n += 1
    out["GIT_CONFIG_COUNT"] = str(n)
    return out
