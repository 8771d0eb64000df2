"""Per-variant step status: which steps finished, with which inputs, and whether the env is built.

A step is done when its recorded key equals the key of its inputs now; keys chain (each step's key
includes the previous step's), so a change to the variant's torch re-runs everything after torch, and
a change to its post-install packages re-runs only post-install and verify.  A failed or interrupted
step clears itself and every later step and sets ``built = false``: an env is never left looking good.
Writes are atomic (temp file + rename).  A write the machine refuses (a full disk, a read-only folder) leaves
no temporary file behind and never a step recorded as "running": the record is removed instead (the next run
starts the variant over) when the new one cannot be written in the space the old one frees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from vllm_harness.core import masking, oserrors, safeio
from vllm_harness.core.errors import UsageError

STEPS = ["fetch", "prepare", "env", "torch", "deps", "build", "post-install", "verify"]
# step -> the steps whose result it uses; re-running a step clears everything that depends on it
DEPENDS = {"fetch": [], "prepare": ["fetch"], "env": [], "torch": ["env"], "deps": ["torch", "prepare"],
           "build": ["deps"], "post-install": ["build"], "verify": ["post-install"]}


def dependents(step: str) -> list[str]:
    out = [step]
    for s in STEPS:
        if any(d in out for d in DEPENDS[s]) and s not in out:
            out.append(s)
    return out


def key_of(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _well_formed(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("steps"), dict)
        and isinstance(data.get("built", False), bool)
        and all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("status"), str)
            for k, v in data["steps"].items()
        )
    )


class Status:
    def __init__(self, path: Path, variant: str):
        self.path = path
        self.variant = variant
        self.data: dict[str, Any] = {"variant": variant, "built": False, "steps": {}}
        if path.exists() or path.is_symlink():
            fix = (
                f"`invoke clean --variant {variant}` removes it with the variant's env (or delete "
                f"{path}: the "
                "next run starts the variant over)."
            )
            loaded = safeio.load_json(path, "Status file", fix, limit=1 << 22)
            if not _well_formed(loaded):
                raise UsageError(f"Status file {path} is corrupt (not the record the harness writes).", fix)
            self.data = loaded
        self._running_on_disk = self._running()  # what the record on disk says (put right if a write fails)

    def _running(self) -> bool:
        return any(s.get("status") == "running" for s in self.data["steps"].values())

    @property
    def built(self) -> bool:
        return bool(self.data.get("built"))

    def step(self, name: str) -> dict | None:
        return self.data["steps"].get(name)

    def is_done(self, name: str, key: str) -> bool:
        s = self.step(name)
        return bool(s) and s.get("status") == "ok" and s.get("key") == key

    def invalidate(self, name: str) -> None:
        later = dependents(name)
        for step in later:
            self.data["steps"].pop(step, None)
        if "post-install" in later:  # re-running verify alone does not unmake the build
            self.data["built"] = False

    def start(self, name: str) -> None:
        self.invalidate(name)
        self.data["steps"][name] = {"status": "running", "started": time.time(), "pid": os.getpid()}
        self.save()

    def finish(self, name: str, key: str, log: str | None, seconds: float, **extra: Any) -> None:
        self.data["steps"][name] = {
            "status": "ok",
            "key": key,
            "log": log,
            "seconds": round(seconds, 1),
            "finished": time.time(),
            **extra,
        }
        self.save()

    def fail(self, name: str, log: str | None, reason: str) -> None:
        self.invalidate(name)
        self.data["steps"][name] = {"status": "failed", "log": log, "reason": reason, "finished": time.time()}
        self.save()

    def set_built(self, built: bool) -> None:
        self.data["built"] = built
        self.save()

    def reset(self) -> None:
        self.data = {"variant": self.variant, "built": False, "steps": {}}
        self.save()

    def save(self) -> None:
        try:
            self._write()
        except OSError as e:
            if not oserrors.refused(e):  # not the machine's refusal (full, read-only): raised as it is
                raise
            raise oserrors.refusal(e, "Status file", self.path, self._put_right()) from None
        self._running_on_disk = self._running()

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(masking.mask(json.dumps(self.data, indent=2, sort_keys=True)))
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # never a half-written file left on a full disk
                tmp.unlink()
            raise

    def _put_right(self) -> str:
        """After a refused write, a record on disk that says a step is running is not left so: it is removed
        (and this record written once more in the space that frees).  Returns what was done, for the
        message."""
        if not self._running_on_disk:
            return "; the status on disk was not changed"
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            return ""  # a read-only folder: nothing can be put right there
        try:
            self._write()
        except OSError:
            self._running_on_disk = False
            return ("; its record was removed rather than left saying a step is running (the next run starts "
                    "over)")
        self._running_on_disk = self._running()
        return "; the step's outcome was recorded in the space its old record freed"
