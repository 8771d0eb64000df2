"""Make a vLLM source tree build against the torch already in the env.

In order:

1. the tree's version: PKG-INFO (sdists), ``git describe`` (checkouts), else the variant's -- a tree with
   neither .git nor PKG-INFO is built with ``SETUPTOOLS_SCM_PRETEND_VERSION`` set to it;
2. the torch this source pins (CMakeLists' ``TORCH_SUPPORTED_VERSION_CUDA``, else its requirement files),
   recorded before the pins are stripped (the compile probe names it in its fix);
3. ``patches/`` for that version (see ``patches.py``);
4. the tree's own ``use_existing_torch.py`` (root, or ``tools/`` from 0.31), which differs by release:
   0.6.2-0.10.1 and 0.11.0-0.14 strip every line containing "torch" from root ``requirements*.txt`` (0.6)
   or ``requirements/*.txt`` (0.8+) and pyproject.toml; 0.10.2's only prints a uv hint; 0.16+ take
   ``--prefix`` (only ``torch=``-style pins; the harness passes it) and 0.20+ glob ``requirements/**``;
   0.6.0/0.6.1 have none;
5. the harness's own equivalent on every layout (root ``requirements*.txt``, ``requirements/**/*.txt|*.in``,
   ``[build-system] requires``), which finishes what an older or no-op script left: it removes the
   requirement lines of torch, torchvision, torchaudio and xformers (built against one torch; the variant's
   comes from ``[post_install]``), and nothing else;
6. the check: no torch/torchvision/torchaudio pin left in any build or runtime requirement file nor in
   the build-system table.

Idempotent: a second run changes nothing and says so (patches report ``already-applied``).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.source_tree import vllm_version
from vllm_harness.facts.toolkit import clean_env
from vllm_harness.steps import patches as patches_mod
from vllm_harness.steps.context import Ctx, source_dir

TORCH_NAMES = ("torch", "torchvision", "torchaudio")
# A requirement line naming torch itself (not open_clip_torch, torch-neuronx, not '# via torch' comments).
TORCH_REQ_RE = re.compile(r"""^\s*["']?(torch|torchvision|torchaudio)\s*(\[[^\]]*\])?\s*([=<>!~;@"',#]|$)""",
                          re.IGNORECASE)
# What the harness strips: the torch family and xformers, whose wheels are built against one torch build.
STRIP_RE = re.compile(
    r"""^\s*["']?(torch|torchvision|torchaudio|xformers)\s*(\[[^\]]*\])?\s*([=<>!~;@"',#]|$)""", re.IGNORECASE
)
SCRIPT_PLACES = ("use_existing_torch.py", "tools/use_existing_torch.py")


def requirement_files(src: Path) -> list[Path]:
    files = sorted(src.glob("requirements*.txt")) + sorted(src.glob("requirements/**/*.txt"))
    files += sorted(src.glob("requirements/**/*.in"))
    if (src / "pyproject.toml").is_file():
        files.append(src / "pyproject.toml")
    return files


def refuse_outside_links(src: Path, files: list[Path]) -> None:
    """prepare rewrites these files: one that is a link to a file outside the source tree would have a file
    the harness does not manage changed (another checkout, the user's own requirements).  Refuse before any
    change."""
    for f in files:
        try:
            target = f.resolve()
        except OSError:
            continue
        if f.is_symlink() and src not in target.parents:
            raise StepFailed(
                f"prepare: {f} is a link to {target}, outside the source tree {src}; preparing it "
                f"would change that file",
                f"replace the link with a copy of the file (cp --remove-destination {target} {f}), "
                f"or fetch the source again",
            )


def _digest(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _lines_by_table(f: Path) -> list[tuple[str, bool]]:
    """(line, counts) for each line; in pyproject.toml only [build-system] lines count."""
    text = f.read_text(errors="replace")
    if f.name != "pyproject.toml":
        return [(line, True) for line in text.splitlines(keepends=True)]
    out, in_bs = [], False
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if s.startswith("["):
            in_bs = s.replace(" ", "") == "[build-system]"
            out.append((line, False))
        else:
            out.append((line, in_bs))
    return out


INLINE_REQUIRES_RE = re.compile(r"""^(\s*requires\s*=\s*\[)(.*)(\]\s*(#.*)?)$""")
ITEM_RE = re.compile(r"""\s*("[^"]*"|'[^']*')\s*,?""")


def _inline_items(line: str) -> list[str] | None:
    """The items of a one-line ``requires = [...]`` (None for other lines)."""
    m = INLINE_REQUIRES_RE.match(line.rstrip("\n"))
    if not m:
        return None
    return [x[1:-1] for x in ITEM_RE.findall(m.group(2))]


def torch_pins(src: Path) -> list[tuple[str, int, str]]:
    """(file, line number, line) of each torch pin still in the tree's requirement files."""
    left = []
    for f in requirement_files(src):
        for n, (line, counts) in enumerate(_lines_by_table(f), 1):
            items = _inline_items(line) if counts and f.name == "pyproject.toml" else None
            if counts and (TORCH_REQ_RE.match(line) or any(TORCH_REQ_RE.match(i) for i in items or [])):
                left.append((str(f.relative_to(src)), n, line.strip()))
    return left


def strip_torch(src: Path) -> list[dict]:
    """The equivalent of use_existing_torch.py, for every layout (and after scripts that miss some)."""
    changed = []
    for f in requirement_files(src):
        keep, removed = [], []
        for line, counts in _lines_by_table(f):
            items = _inline_items(line) if counts and f.name == "pyproject.toml" else None
            if counts and STRIP_RE.match(line):
                removed.append(line.strip())
            elif items and any(STRIP_RE.match(i) for i in items):  # requires = ["cmake", "torch==2.5.1"]
                removed += [i for i in items if STRIP_RE.match(i)]
                m = INLINE_REQUIRES_RE.match(line.rstrip("\n"))
                rest = ", ".join(f'"{i}"' for i in items if not STRIP_RE.match(i))
                keep.append(f"{m.group(1)}{rest}{m.group(3)}\n")
            else:
                keep.append(line)
        if removed:
            f.write_text("".join(keep))
            changed.append({"file": str(f.relative_to(src)), "what": "removed " + "; ".join(removed)})
    return changed


# --------------------------------------------------------------------------------------------- facts


def source_torch_pin(src: Path) -> tuple[str | None, str]:
    """(torch version, where) this source pins: CMakeLists' TORCH_SUPPORTED_VERSION_CUDA (prepare never
    edits it), else a ``torch==`` in its requirement files / pyproject, else PKG-INFO's Requires-Dist."""
    cm = src / "CMakeLists.txt"
    if cm.is_file():
        m = re.search(r'set\s*\(\s*TORCH_SUPPORTED_VERSION_CUDA\s+"([^"]+)"', cm.read_text(errors="replace"))
        if m:
            return m.group(1), "CMakeLists.txt TORCH_SUPPORTED_VERSION_CUDA"
    for f in requirement_files(src):
        for line, counts in _lines_by_table(f):
            m = re.match(r"""^\s*["']?torch\s*==\s*([0-9][\w.+]*)""", line) if counts else None
            if m:
                return m.group(1), str(f.relative_to(src))
    pkg = src / "PKG-INFO"
    if pkg.is_file():
        m = re.search(
            r"^Requires-Dist:\s*torch\s*\(?==\s*([0-9][\w.+]*)", pkg.read_text(errors="replace"), re.MULTILINE
        )
        if m:
            return m.group(1), "PKG-INFO Requires-Dist"
    return None, "not found"


def find_script(src: Path) -> Path | None:
    for rel in SCRIPT_PLACES:
        if (src / rel).is_file():
            return src / rel
    return None


def script_kind(script: Path) -> str:
    """prefix (takes --prefix) | edits (rewrites files) | no-op (0.10.2: only prints a uv hint)."""
    text = script.read_text(errors="replace")
    if "--prefix" in text:
        return "prefix"
    if "open(" in text:
        return "edits"
    return "no-op"


# --------------------------------------------------------------------------------------------- prepare


def _snapshot(files: list[Path]) -> dict[str, list[str]]:
    return {str(f): f.read_text(errors="replace").splitlines() for f in files if f.is_file()}


def _removed(before: list[str], after: list[str]) -> list[str]:
    left = list(after)
    out = []
    for line in before:
        if line in left:
            left.remove(line)
        else:
            out.append(line.strip())
    return [x for x in out if x]


def prepare(
    src: Path,
    python: Path,
    log: Path,
    env: dict[str, str],
    version: str | None = None,
    patches_dir: Path | None = None,
    apply_patches: bool = True,
) -> dict:
    """Returns the contract's JSON: {"source", "vllm_version", "changed": [{"file", "what"}],
    "patches": [{"name", "status"}]} plus how, script, torch_pin, version_from."""
    src = src.resolve()
    files = requirement_files(src)
    refuse_outside_links(src, files + [p for p in (src / x for x in SCRIPT_PLACES) if p.exists()])
    before = _snapshot(files)
    digests = _digest(files)
    ver, ver_from = vllm_version(src, version, env)
    pin, pin_from = source_torch_pin(src)
    log.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "source": str(src),
        "vllm_version": ver,
        "version_from": ver_from,
        "torch_pin": pin,
        "torch_pin_from": pin_from,
        "changed": [],
        "patches": [],
    }
    with open(log, "a") as fh:
        fh.write(f"# vLLM {ver} ({ver_from}); source pins torch {pin} ({pin_from})\n")
        # 1. patches
        plist = patches_mod.load_patches(patches_dir) if (patches_dir and apply_patches) else []
        statuses = patches_mod.apply_all(plist, src, ver, env)
        for st in statuses:
            fh.write(
                f"patch {st['name']}: {st['status']}"
                + (f" ({st['reason']})" if st.get("reason") else "")
                + "\n"
            )
            if st["status"] == "failed":
                fh.write(f"{st.get('errors', '')}\nthe hunk:\n{st.get('hunk', '')}\n")
        result["patches"] = [
            {"name": s["name"], "status": s["status"], **{k: s[k] for k in ("reason", "hunk") if s.get(k)}}
            for s in statuses
        ]
        for st in statuses:
            if st["status"] == "applied":
                result["changed"] += [{"file": f, "what": f"patch {st['name']}"} for f in st.get("files", [])]
        failed = [s for s in statuses if s["status"] == "failed"]
        if failed:
            err = StepFailed(
                f"prepare: patch {failed[0]['name']} claims vLLM {ver} ({failed[0]['versions']}) "
                f"but does not apply: {failed[0].get('reason', '')}",
                f"Refresh patches/{failed[0]['name']}.patch for this release, or narrow its "
                f"versions; the failing hunk is in {log}.",
                log=str(log),
                result=result,
            )
            raise err
        # 2. the tree's own script
        script = find_script(src)
        if script is not None:
            kind = script_kind(script)
            argv = [str(python), str(script)] + (["--prefix"] if kind == "prefix" else [])
            rel = str(script.relative_to(src)) + (" --prefix" if kind == "prefix" else "")
            fh.write(f"$ {' '.join(argv)}   (cwd {src})\n")
            fh.flush()
            r = procs.run(argv, cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
            if r.returncode != 0:
                raise StepFailed(f"prepare: {rel} exited with {r.returncode}.", None, log=str(log))
            how = rel if kind != "no-op" else "harness-equivalent"
            result["script"] = {"path": str(script.relative_to(src)), "kind": kind}
            if kind == "no-op":
                fh.write(f"# {rel} edits no file in this release: the harness strips the pins itself\n")
        else:
            fh.write("# no use_existing_torch.py in this tree: stripping torch pins the same way\n")
            how = "harness-equivalent"
        # 3. finish the job on every layout
        extra = strip_torch(src)
        fh.writelines(f"# harness removed: {c['file']}: {c['what']}\n" for c in extra)
        left = torch_pins(src)
        fh.writelines(f"torch pin left: {f}:{n}: {line}\n" for f, n, line in left)
    result["how"] = how
    if left:
        f, n, line = left[0]
        err = StepFailed(
            f"prepare: a torch pin is still in {f}:{n} ({line}).",
            "Remove it by hand or add a patch under patches/.",
            log=str(log),
            result=result,
        )
        raise err
    after = _snapshot(files)
    for f in files:
        key = str(f)
        if f.is_file() and digests.get(key) != _digest([f]).get(key):
            gone = _removed(before.get(key, []), after.get(key, []))
            result["changed"].append(
                {
                    "file": str(f.relative_to(src)),
                    "what": ("removed " + "; ".join(gone)) if gone else "rewritten",
                }
            )
    return result


def build_requirement_files(src: Path) -> list[Path]:
    for cand in ("requirements/build/cuda.txt", "requirements/build.txt", "requirements-build.txt"):
        if (src / cand).is_file():
            return [src / cand]
    return []


def runtime_requirement_files(src: Path, device: str) -> list[Path]:
    names = [f"requirements/{device}.txt", f"requirements-{device}.txt"]
    return [src / n for n in names if (src / n).is_file()][:1]


def build_system_requires(src: Path) -> list[str]:
    p = src / "pyproject.toml"
    if not p.is_file():
        return []
    try:
        reqs = tomllib.loads(p.read_text()).get("build-system", {}).get("requires", [])
    except (ValueError, OSError):
        return []
    return [r for r in reqs if isinstance(r, str) and not TORCH_REQ_RE.match(r)]


def do_prepare(ctx: Ctx, log: Path, src: Path | None = None) -> dict:
    src = src or source_dir(ctx)
    if log.exists():
        log.unlink()
    env = clean_env(ctx.base_env)
    result = prepare(
        src,
        Path(sys.executable),
        log,
        env,
        version=ctx.variant.vllm["version"],
        patches_dir=ctx.layout.root / "patches",
    )
    n = len(result["changed"])
    result["note"] = f"{result['how']}: {n} file(s) changed" if n else f"{result['how']}: nothing to change"
    applied = [
        p["name"] + (" (already applied)" if p["status"] == "already-applied" else "")
        for p in result["patches"]
        if p["status"] in ("applied", "already-applied")
    ]
    if applied:
        result["note"] += f"; patches: {', '.join(applied)}"
    return result
