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

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_harness.core import safeio, writer
from vllm_harness.core.errors import UsageError

#: a variant's name (envs/NAME.toml, nox's build-NAME, the state folder's entries): the one rule
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def find_root(start: Path | None = None) -> Path:
    env = os.environ.get("VLLM_HARNESS_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for d in [here, *here.parents]:
        if (d / "envs").is_dir() and (d / "noxfile.py").is_file():
            return d
    pkg_root = Path(__file__).resolve().parents[3]  # src/vllm_harness/core/layout.py -> repo
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
    #: what the harness itself puts at the top of its state folder (a folder holding anything else was
    #: not made by it)
    ENTRIES = frozenset({"envs", "src", "logs", "status", "cache", "locks", "wheelhouse", "buildspeed",
                         "last-failed.json", "last-built", MARKER})

    def _forbidden(self) -> Path | None:
        st = self.state.resolve()
        for p in (Path(st.anchor), Path.home().resolve(), self.root.resolve()):
            if st == p:
                return p
        return None

    def _marker_record(self) -> dict | None:
        """The marker's record when it is the harness's own (a regular file, not a link, in the harness's
        format); None otherwise.  A copied state folder (another path, another machine) keeps its record."""
        marker = self.state / self.MARKER
        try:
            if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
                return None
            text = marker.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        try:
            rec = json.loads(text)
        except ValueError:
            # the plain-text marker of earlier versions: trusted only while the folder holds nothing else
            legacy = text.startswith("vllm-harness state folder") and not self.foreign_entries()
            return (
                {"tool": "vllm-harness", "path": str(self.state.resolve()), "legacy": True}
                if legacy
                else None
            )
        if not isinstance(rec, dict) or rec.get("tool") != "vllm-harness":
            return None
        return rec

    def foreign_entries(self) -> list[str]:
        try:
            names = sorted(p.name for p in self.state.iterdir())
        except OSError:
            return []
        return [
            n
            for n in names
            if n not in self.ENTRIES and not n.startswith(("last-failed.", ".harness-state."))
        ]

    def _refusal(self, why: str) -> UsageError:
        return UsageError(
            f"{self.state} is not a harness state folder: it {why}. The harness writes and deletes "
            f"only in a folder it made itself (one with its {self.MARKER} record), so nothing was "
            "written or deleted there.",
            "Unset VLLM_HARNESS_STATE (default: .harness/ in the checkout), or point it at a new or "
            "empty folder; if .harness is a link to your own folder, remove the link.",
        )

    def check(self) -> None:
        """Refuse a state folder the harness did not make (every command calls this before it touches it)."""
        bad = self._forbidden()
        if bad is not None:
            raise self._refusal(f"is {bad} (/, your home or the harness checkout itself)")
        st = self.state
        if not st.exists() and not st.is_symlink():
            return
        if not st.is_dir():
            raise self._refusal("is not a folder")
        if self._marker_record() is None and any(True for _ in st.iterdir()):
            foreign = self.foreign_entries()
            held = (
                f"holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}"
                if foreign
                else "holds files but no harness record"
            )
            raise self._refusal(f"was not made by the harness ({held})")

    def ensure(self) -> None:
        """Create the state folder with its marker, or adopt an empty folder; refuse any other folder.  The
        marker records that the harness made the folder: ``clean`` deletes only inside a folder that has
        it."""
        self.check()
        st = self.state
        created = not st.exists()
        st.mkdir(parents=True, exist_ok=True)
        rec = self._marker_record()
        if rec is not None and not rec.get("legacy"):
            return
        if rec is None and any(True for _ in st.iterdir()):  # filled by someone else since check()
            raise self._refusal("was filled while the harness started")
        record = {
            "tool": "vllm-harness",
            "path": str(st.resolve()),
            "how": "upgraded" if rec else ("created" if created else "adopted an empty folder"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        # never through a link planted as the marker; the temporary name starts with the marker's (not
        # foreign)
        writer.write_file(st / self.MARKER, json.dumps(record) + "\n", what="State folder marker", force=True)

    def is_state_folder(self) -> bool:
        return self._forbidden() is None and self._marker_record() is not None

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

    def _reset_fix(self, path: Path) -> str:
        return f"Delete {path} (the harness writes it again), or run `invoke clean --all`."

    def read_last_built(self) -> str | None:
        """The variant built last, or None: its name, or the path of its file when the build was given one
        (``build-variant --variant path/NAME.toml``: the second line); a corrupt record is a UsageError naming
        the file and its reset."""
        p = self.last_built
        if not p.exists() and not p.is_symlink():
            return None
        raw = safeio.read_bytes(p, "State file", 4096, self._reset_fix(p))
        name, _, path = raw.decode("utf-8", "replace").strip().partition("\n")
        if not NAME_RE.match(name) or (path and Path(path).stem != name):
            raise UsageError(
                f"State file {p} is corrupt (not a variant name: {name[:40]!r}).", self._reset_fix(p)
            )
        return path or name

    def read_last_failed(self) -> dict | None:
        """{variant, step, log} of the last failed step, or None; a corrupt record is a UsageError."""
        p = self.last_failed
        if not p.exists() and not p.is_symlink():
            return None
        data = safeio.load_json(p, "State file", self._reset_fix(p), limit=1 << 16)
        if not (
            isinstance(data, dict)
            and isinstance(data.get("log"), str)
            and data["log"]
            and isinstance(data.get("variant"), (str, type(None)))
            and isinstance(data.get("step"), (str, type(None)))
        ):
            raise UsageError(
                f"State file {p} is corrupt (not the record of a failed step).", self._reset_fix(p)
            )
        return data

    def managed_trees(self) -> list[Path]:
        """The folders ``clean`` may delete from (never anything outside these)."""
        return [self.state]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"
