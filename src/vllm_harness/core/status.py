"""Per-variant step status: which steps finished, with which inputs, and whether the env is built.

A step is done when its recorded key equals the key of its inputs now (the steps and their keys are declared
in ``pipeline/steps``).  A failed or interrupted step clears itself and every step that depends on it (the
``graph`` the pipeline gives: step -> the steps it uses) and sets ``built = false``: an env is never left
looking good.  A record opened without the graph (to read it, or to add verify's result) cannot clear steps.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_harness.core import masking, oserrors, safeio
from vllm_harness.core.errors import UsageError


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


def dependents(graph: Mapping[str, Sequence[str]], step: str) -> list[str]:
    """``step`` and every step that uses its result, directly or not, in the graph's order."""
    out = [step]
    for s, uses in graph.items():
        if any(d in out for d in uses) and s not in out:
            out.append(s)
    return out


class Status:
    def __init__(self, path: Path, variant: str, graph: Mapping[str, Sequence[str]] | None = None):
        self.path = path
        self.variant = variant
        self.graph = graph
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
        if self.graph is None:
            raise RuntimeError(f"status of {self.variant} opened without the step graph: cannot clear {name}")
        later = dependents(self.graph, name)
        for step in later:
            self.data["steps"].pop(step, None)
        last = list(self.graph)[-1]
        if any(s != last for s in later):  # re-running the last step (verify) alone does not unmake the build
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
