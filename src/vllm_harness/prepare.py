"""Make a vLLM source tree build against the torch already in the env.

Runs the tree's own ``use_existing_torch.py`` when it has one (its behaviour differs by release), or does
the equivalent when it does not; then checks the result: no torch/torchvision/torchaudio pin is left in any
build or runtime requirement file, nor in ``[build-system] requires``.  Idempotent: a second run changes
nothing and says so.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from .errors import StepFailed

TORCH_NAMES = ("torch", "torchvision", "torchaudio")
# A requirement line naming torch itself (not open_clip_torch, not '# via torch' comments).
TORCH_REQ_RE = re.compile(r"""^\s*["']?(torch|torchvision|torchaudio)\s*(\[[^\]]*\])?\s*([=<>!~;@"',]|$)""",
                          re.IGNORECASE)


def requirement_files(src: Path) -> list[Path]:
    files = sorted(src.glob("requirements*.txt")) + sorted(src.glob("requirements/**/*.txt"))
    files += sorted(src.glob("requirements/**/*.in"))
    if (src / "pyproject.toml").is_file():
        files.append(src / "pyproject.toml")
    return files


def _digest(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def torch_pins(src: Path) -> list[tuple[str, int, str]]:
    """(file, line number, line) of each torch pin still in the tree's requirement files."""
    left = []
    for f in requirement_files(src):
        in_build_system = f.name != "pyproject.toml"
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if f.name == "pyproject.toml":
                stripped = line.strip()
                if stripped.startswith("["):
                    in_build_system = stripped == "[build-system]"
                    continue
                if not in_build_system:
                    continue
            if TORCH_REQ_RE.match(line):
                left.append((str(f.relative_to(src)), n, line.strip()))
    return left


def strip_torch(src: Path) -> list[dict]:
    """The equivalent of use_existing_torch.py for trees that lack it."""
    changed = []
    for f in requirement_files(src):
        lines = f.read_text(errors="replace").splitlines(keepends=True)
        keep, removed = [], []
        in_build_system = f.name != "pyproject.toml"
        for line in lines:
            if f.name == "pyproject.toml" and line.strip().startswith("["):
                in_build_system = line.strip() == "[build-system]"
            if in_build_system and TORCH_REQ_RE.match(line):
                removed.append(line.strip())
            else:
                keep.append(line)
        if removed:
            f.write_text("".join(keep))
            changed.append({"file": str(f.relative_to(src)), "what": "removed " + "; ".join(removed)})
    return changed


def prepare(src: Path, python: Path, log: Path, env: dict[str, str]) -> dict:
    files = requirement_files(src)
    before = _digest(files)
    script = src / "use_existing_torch.py"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        if script.is_file():
            fh.write(f"$ {python} use_existing_torch.py\n")
            fh.flush()
            r = subprocess.run([str(python), "use_existing_torch.py"], cwd=src, env=env, stdout=fh,
                               stderr=subprocess.STDOUT, timeout=300)
            if r.returncode != 0:
                raise StepFailed(f"prepare: {script} exited with {r.returncode}.", None, log=str(log))
            how = "use_existing_torch.py"
        else:
            fh.write("# no use_existing_torch.py in this tree: stripping torch pins the same way\n")
            strip_torch(src)
            how = "harness-equivalent"
        # Old scripts miss some layouts (requirements/**/*.txt, pyproject build-system): finish the job.
        extra = strip_torch(src)
        fh.writelines(f"# also removed: {c}\n" for c in extra)
        left = torch_pins(src)
        fh.writelines(f"torch pin left: {f}:{n}: {line}\n" for f, n, line in left)
    if left:
        f, n, line = left[0]
        raise StepFailed(f"prepare: a torch pin is still in {f}:{n} ({line}).",
                         "Remove it by hand or add a patch under patches/.", log=str(log))
    after = _digest(files)
    changed = [{"file": str(Path(f).relative_to(src)), "what": "torch pins removed"}
               for f in after if before.get(f) != after[f]]
    return {"source": str(src), "how": how, "changed": changed, "patches": []}


def read_version(src: Path) -> str | None:
    pkg = src / "PKG-INFO"
    if pkg.is_file():
        for line in pkg.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def build_requirement_files(src: Path) -> list[Path]:
    for cand in ("requirements/build/cuda.txt", "requirements/build.txt", "requirements-build.txt"):
        if (src / cand).is_file():
            return [src / cand]
    return []


def runtime_requirement_files(src: Path, device: str) -> list[Path]:
    names = [f"requirements/{device}.txt", f"requirements-{device}.txt"]
    return [src / n for n in names if (src / n).is_file()][:1]


def build_system_requires(src: Path) -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    p = src / "pyproject.toml"
    if not p.is_file():
        return []
    try:
        reqs = tomllib.loads(p.read_text()).get("build-system", {}).get("requires", [])
    except (ValueError, OSError):
        return []
    return [r for r in reqs if isinstance(r, str) and not TORCH_REQ_RE.match(r)]
