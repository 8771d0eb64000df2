"""One message for what the machine refuses (issue 26, class 8): a read-only folder, a full disk, a path too
long for the system.  ``cli.py`` turns such an ``OSError`` into a :class:`UsageError` naming the flag whose
value the path came from (exit 2, no traceback); the state writers (``status``) put their state right first
and then raise :func:`refusal`'s error."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from vllm_harness.core.errors import UsageError

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
TOO_LONG = frozenset({errno.ENAMETOOLONG})


def refused(e: OSError) -> bool:
    """``e`` is the machine's refusal (a full disk, a read-only folder, a path too long), not a bug."""
    return e.errno in FULL | READ_ONLY | TOO_LONG


def short(text: str, keep: int = 300) -> str:
    """A value fit for one message line: a 128 KB argument is cut, its length said."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def refusal(e: OSError, what: str, path: Any = None, done: str = "") -> UsageError | None:
    """The one message for ``e`` raised on ``path`` (what: "Status file", "--log", ...), or None when ``e`` is
    not the environment's refusal (a bug or another failure: the caller re-raises it).  ``done``: what the
    harness did about its state, said after the problem."""
    p = short(str(path if path is not None else (e.filename or "")))
    who = f"{what} {p}".strip() or "A file the harness was writing"
    folder = os.path.dirname(str(path if path is not None else e.filename or "")) or "the state folder"
    if e.errno in FULL:
        return UsageError(
            f"{who}: the disk is full ({e.strerror}){done}.",
            f"Free space on the disk that holds {short(folder)} (`df -h {short(folder)}`), then run the "
            "command again.",
        )
    if e.errno in READ_ONLY:
        return UsageError(
            f"{who}: {e.strerror}{done}.",
            "Check the permissions there (a read-only mount, the owner, the mode), or point "
            "VLLM_HARNESS_STATE (the harness's state folder) or the flag at a path you can use.",
        )
    if e.errno in TOO_LONG:
        return UsageError(
            f"{who}: the path is too long for this system ({e.strerror}: at most "
            f"{os.pathconf('/', 'PC_PATH_MAX')} characters, {os.pathconf('/', 'PC_NAME_MAX')} per "
            f"name){done}.",
            "Give a shorter path.",
        )
    return None


def from_args(e: OSError, args: Mapping[str, Any]) -> UsageError | None:
    """:func:`refusal` for an error that reached the command line, naming the flag whose value is in the path
    (``--variant``, ``--log``, ...) when one is."""
    name = str(e.filename or "")
    best = None
    for dest, value in args.items():
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str) or not v or (best is not None and len(v) <= len(best[1])):
                continue
            # a path too long: the flag whose value is in it; any other refusal: the flag that is that path
            if (v in name) if e.errno in TOO_LONG else os.path.abspath(v) == os.path.abspath(name):
                best = (dest, v)
    if best is None:
        return refusal(e, "")
    flag = "--" + best[0].replace("_", "-")
    return refusal(e, flag, best[1] if e.errno in TOO_LONG else name)
