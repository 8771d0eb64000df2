"""The one writer of files (issue 26): every file the harness writes outside its state folder goes through
here,
and its state files and logs do too.

``write_file`` / ``atomic_output``: the target is validated before a byte is written -- a symbolic link, a
file
with more than one hard link, something that is not a regular file, or an existing file the harness did not
write (``marker``: the generated-by line the harness puts in the first 4 KiB of such a file) is refused with
one :class:`UsageError` naming it (``force=True`` lifts only the last refusal).  The new content goes to a
temporary file created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` in the same folder (never a name planted there:
an existing name, a link included, is never opened), fsynced, given the mode of the file it replaces, and
renamed over it.  A refused or failed write leaves the old file byte-identical and no temporary file behind.

``open_log``: a log file opened for appending (or started afresh, the previous one renamed) with
``O_NOFOLLOW`` inside a folder opened with ``O_NOFOLLOW``; a log that is a link, a hard link or not a regular
file, or a log folder (or its parent, ``logs/``) that is a link, is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vllm_harness.core.errors import UsageError
from vllm_harness.core.safeio import file_kind

HEAD_BYTES = 4096  # where a generated-by marker must appear
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

#: paths whose replacement the user consented to (``--force``) when the command validated them, before the
#: layer that writes them (which does not see the flag) runs
_permitted: set[str] = set()


@contextlib.contextmanager
def permitted(path: str | Path | None) -> Iterator[None]:
    """Within the block, ``path`` may be replaced although the harness did not write it: the user consented
    (``--force``) when the command validated it.  ``None``: no consent (a no-op)."""
    key = os.path.abspath(path) if path is not None else None
    if key is None or key in _permitted:
        yield
        return
    _permitted.add(key)
    try:
        yield
    finally:
        _permitted.discard(key)


def _head(dfd: int | None, name: str, path: Path) -> bytes:
    try:
        fd = os.open(
            name if dfd is not None else path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=dfd
        )
    except OSError:
        return b""
    try:
        return os.read(fd, HEAD_BYTES)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _lstat(dfd: int | None, name: str, path: Path) -> os.stat_result | None:
    try:
        if dfd is not None:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(
            f"{path}: a part of the path is a file, not a folder; nothing was written.",
            "Give a path in an existing folder.",
        ) from None


@dataclasses.dataclass(frozen=True)
class _Rules:
    """What a target is judged by: ``what`` names it in messages, ``force`` lifts the not-ours refusal,
    ``marker`` is the generated-by line that makes it ours, ``fix`` the advice of that refusal."""

    what: str
    force: bool = False
    marker: bytes | None = None
    fix: str = ""


def _judge(st: os.stat_result | None, path: Path, rules: _Rules, head) -> None:
    what = rules.what
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(
            f"{what} {path}: is a symbolic link; the harness never writes through a link, so nothing "
            "was written and the file it points to is unchanged.",
            "Remove the link, or give the path of a new file.",
        )
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"{what} {path}: is {file_kind(st.st_mode)}, not a regular file; nothing was written.",
            "Give the path of a new file.",
        )
    if st.st_nlink > 1:
        raise UsageError(
            f"{what} {path}: has {st.st_nlink} hard links (another name shares its content, which "
            "a write would change too); nothing was written.",
            "Remove the other names, or give the path of a new file.",
        )
    if rules.force or os.path.abspath(path) in _permitted:
        return
    if rules.marker is not None and rules.marker in head():
        return
    raise UsageError(
        f"{what} {path}: exists and was not written by the harness; it was left unchanged.",
        rules.fix or "Give the path of a new file, or pass --force to replace it.",
    )


def check_target(
    path: str | Path, *, what: str, force: bool = False, marker: bytes | None = None, fix: str = ""
) -> os.stat_result | None:
    """Validate ``path`` as a target of :func:`write_file` without touching anything; its lstat (None:
    new)."""
    p = Path(path)
    st = _lstat(None, p.name, p)
    _judge(st, p, _Rules(what, force, marker, fix), lambda: _head(None, p.name, p))
    return st


def _open_dir(d: Path, what: str, path: Path) -> int:
    try:
        return os.open(d, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as e:
        raise UsageError(
            f"{what} {path}: its folder {d} cannot be opened ({e.strerror}); nothing was written.",
            "Give a path in a folder you can write.",
        ) from None


@contextlib.contextmanager
def atomic_output(
    path: str | Path,
    *,
    what: str,
    force: bool = False,
    fix: str = "",
    marker: bytes | None = None,
    mode: int | None = None,
) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` atomically when the block ends without an error
    (see the module's doc for what is refused first).  ``mode``: the mode of the file written (a secret:
    0o600),
    else the replaced file's, else the umask's."""
    p = Path(path)
    check_target(p, what=what, force=force, marker=marker, fix=fix)  # before the folder is even made
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"{what} {p}: cannot make its folder {p.parent} ({e.strerror}); nothing was written.",
            "Give a path in a folder you can write.",
        ) from None
    dfd = _open_dir(p.parent, what, p)
    rules = _Rules(what, force, marker, fix)
    tmp = None
    try:
        st = _lstat(dfd, p.name, p)  # again, relative to the folder now held open
        _judge(st, p, rules, lambda: _head(dfd, p.name, p))
        fd = -1
        for _ in range(8):
            tmp = f"{p.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                    0o666 if mode is None else mode,
                    dir_fd=dfd,
                )
                break
            except FileExistsError:  # a name already there (a planted link too) is never opened
                tmp = None
                continue
            except OSError as e:
                raise UsageError(
                    f"{what} {p}: cannot create a file in {p.parent} ({e.strerror}); nothing was written.",
                    "Give a path in a folder you can write.",
                ) from None
        if fd < 0:
            raise UsageError(
                f"{what} {p}: every temporary name tried in {p.parent} already exists; nothing was written.",
                f"Remove the {p.name}.*.tmp files there.",
            )
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            elif st is not None:  # keep the mode (and, where allowed, the owner) of what it replaces
                os.fchmod(fh.fileno(), stat.S_IMODE(st.st_mode))
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(OSError):
                        os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fsync(fh.fileno())
        now = _lstat(dfd, p.name, p)  # the same file as judged (a link put there since is refused)
        if now is not None and (st is None or (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev)):
            _judge(now, p, rules, lambda: _head(dfd, p.name, p))
        os.replace(tmp, p.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        os.close(dfd)


def write_file(path: str | Path, data: bytes | str, **target: Any) -> Path:
    """Replace (or create) ``path`` with ``data`` (str: UTF-8) atomically; refused cases: see the module's
    doc.  ``target``: the keywords of :func:`atomic_output` (``what`` required; ``force``, ``fix``,
    ``marker``: the bytes a file the harness wrote holds in its first 4 KiB (None: any existing file needs
    ``force``), ``mode``).  Returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, **target) as fh:
        fh.write(raw)
    return Path(path)


# ------------------------------------------------------------------------------------------------- logs


def _log_refusal(path: Path, why: str) -> UsageError:
    return UsageError(
        f"Log file {path}: {why}; the harness never writes a log through a link, so nothing was written.",
        f"Remove {path} (or the link), then run again; `invoke clean` removes the logs.",
    )


def _open_nofollow_dir(d: Path, parent_fd: int | None, path: Path) -> int:
    try:
        return os.open(
            d.name if parent_fd is not None else d,
            os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC,
            dir_fd=parent_fd,
        )
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _log_refusal(path, f"its folder {d} is a symbolic link or not a folder") from None
        raise UsageError(
            f"Log file {path}: its folder {d} cannot be opened ({e.strerror}).",
            "Check the state folder's permissions.",
        ) from None


def _open_log_folder(p: Path) -> int:
    """The log's folder opened with ``O_NOFOLLOW`` (and ``logs/`` above it, when there is one, too)."""
    in_logs = p.parent.parent.name == "logs"
    for d in (p.parent.parent, p.parent) if in_logs else (p.parent,):
        if d.is_symlink():  # before a folder is made in it
            raise _log_refusal(p, f"its folder {d} is a symbolic link")
    p.parent.mkdir(parents=True, exist_ok=True)
    if in_logs:
        gfd = _open_nofollow_dir(p.parent.parent, None, p)
        try:
            return _open_nofollow_dir(p.parent, gfd, p)
        finally:
            os.close(gfd)
    if stat.S_ISLNK(os.lstat(p.parent).st_mode):
        raise _log_refusal(p, f"its folder {p.parent} is a symbolic link")
    return _open_nofollow_dir(p.parent, None, p)


def _refuse_odd_log(p: Path, st: os.stat_result) -> None:
    """A log that is not a regular file, or shares its content with another name, is never written."""
    if not stat.S_ISREG(st.st_mode):
        raise _log_refusal(p, f"is {file_kind(st.st_mode)}, not a regular file")
    if st.st_nlink > 1:
        raise _log_refusal(p, f"has {st.st_nlink} hard links (another name shares its content)")


def _open_log_fd(p: Path, dfd: int) -> int:
    try:
        return os.open(
            p.name,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC,
            0o666,
            dir_fd=dfd,
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _log_refusal(p, "is a symbolic link") from None
        raise UsageError(
            f"Log file {p}: cannot be opened ({e.strerror}).", "Check the state folder's permissions."
        ) from None


def open_log(path: str | Path, *, append: bool = True, previous: str | Path | None = None) -> BinaryIO:
    """An unbuffered binary file to write the log ``path`` (created if missing).  ``append=False``: a new
    log; the old one, if any, is renamed to ``previous`` (or emptied when None)."""
    p = Path(path)
    dfd = _open_log_folder(p)
    try:
        old = _lstat(dfd, p.name, p)
        if old is not None:
            if stat.S_ISLNK(old.st_mode):
                raise _log_refusal(p, "is a symbolic link")
            _refuse_odd_log(p, old)
            if not append and previous is not None:
                os.replace(p.name, Path(previous).name, src_dir_fd=dfd, dst_dir_fd=dfd)
        fd = _open_log_fd(p, dfd)
        try:
            _refuse_odd_log(p, os.fstat(fd))
            os.set_blocking(fd, True)
            if not append and previous is None:
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "ab", buffering=0)
    finally:
        os.close(dfd)


def append_log(path: str | Path, data: bytes | str) -> None:
    """Append ``data`` (str: UTF-8) to the log ``path`` (see :func:`open_log`)."""
    with open_log(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
