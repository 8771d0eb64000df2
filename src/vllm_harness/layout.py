"""Where things live.  Everything the harness writes is under one ignored state folder, ``.harness/``:

    .harness/envs/<variant>/          the variant's isolated venv
    .harness/envs/<variant>.constraints.txt   the pins every later install keeps (torch, numpy<2, ...)
    .harness/src/<variant>/           the fetched and prepared source tree (source builds)
    .harness/logs/<variant>/<step>.log  full log of each step (the previous attempt: <step>.prev.log)
    .harness/status/<variant>.json    which steps finished, with which inputs; built or not
    .harness/cache/                   downloads (sdists), kept by ``clean`` unless --all
    .harness/locks/                   one lock per variant
    .harness/last-failed.json         the last failed step's log (``invoke diagnose`` default)
    .harness/last-built               the variant built last (``nox -s verify`` default)

``VLLM_HARNESS_STATE`` moves the state folder (tests use it); ``VLLM_HARNESS_ROOT`` names the repo root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError


def find_root(start: Path | None = None) -> Path:
    env = os.environ.get("VLLM_HARNESS_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for d in [here, *here.parents]:
        if (d / "envs").is_dir() and (d / "noxfile.py").is_file():
            return d
    pkg_root = Path(__file__).resolve().parents[2]  # src/vllm_harness/layout.py -> repo
    if (pkg_root / "envs").is_dir():
        return pkg_root
    raise UsageError(f"No harness checkout found from {here} (a folder with envs/ and noxfile.py).",
                     "Run the command inside the harness repo or set VLLM_HARNESS_ROOT.")


@dataclass(frozen=True)
class Layout:
    root: Path
    state: Path

    @classmethod
    def default(cls, root: Path | None = None) -> Layout:
        root = (root or find_root()).resolve()
        state = Path(os.environ.get("VLLM_HARNESS_STATE") or root / ".harness").resolve()
        return cls(root=root, state=state)

    @property
    def envs_dirs(self) -> list[Path]:
        return [self.root / "envs"]

    MARKER = ".harness-state"

    def ensure(self) -> None:
        """Create the state folder with its marker: `clean` deletes only inside a folder that has it."""
        self.state.mkdir(parents=True, exist_ok=True)
        marker = self.state / self.MARKER
        if not marker.exists():
            marker.write_text("vllm-harness state folder: everything here was made by the harness\n")

    def is_state_folder(self) -> bool:
        forbidden = {Path("/"), Path.home().resolve(), self.root.resolve()}
        return (self.state / self.MARKER).is_file() and self.state.resolve() not in forbidden

    def venv(self, variant: str) -> Path:
        return self.state / "envs" / variant

    def constraints(self, variant: str) -> Path:
        return self.state / "envs" / f"{variant}.constraints.txt"

    def src(self, variant: str) -> Path:
        return self.state / "src" / variant

    def logs(self, variant: str) -> Path:
        return self.state / "logs" / variant

    def status(self, variant: str) -> Path:
        return self.state / "status" / f"{variant}.json"

    def lock(self, variant: str) -> Path:
        return self.state / "locks" / f"{variant}.lock"

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def last_failed(self) -> Path:
        return self.state / "last-failed.json"

    @property
    def last_built(self) -> Path:
        return self.state / "last-built"

    def managed_trees(self) -> list[Path]:
        """The folders ``clean`` may delete from (never anything outside these)."""
        return [self.state]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"
