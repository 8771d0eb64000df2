"""The one way the harness runs git: values after options, transports limited, refs and URLs checked.

A variant file or ``--source`` is user input, and git treats an argument that starts with ``-`` as an
option wherever it appears before ``--``/``--end-of-options`` (``--upload-pack=CMD`` runs CMD).  So:

* :func:`check_url` accepts https, ssh, git and file URLs (and scp-like ``user@host:path``), never one that
  starts with ``-``; :func:`check_ref` accepts what ``git check-ref-format`` accepts (tags, branches) or a
  commit id, never one that starts with ``-``;
* :func:`run` puts ``-c protocol.allow=never`` plus ``protocol.<scheme>.allow=always`` for those four in
  front of every command and sets ``GIT_ALLOW_PROTOCOL`` in its environment (so ``ext::`` and friends
  never run, submodules and FetchContent included), and callers pass URLs and refs after ``--`` or
  ``--end-of-options``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from vllm_harness.core import procs
from vllm_harness.core.errors import UsageError

ALLOWED_SCHEMES = ("https", "ssh", "git", "file")
GIT_TIMEOUT = 1800
HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_SCP_RE = re.compile(r"^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:[^\s]+$")  # git@github.com:vllm-project/vllm.git
# what `git check-ref-format --allow-onelevel` refuses, checked here without a process (man git-check-ref-format)
_REF_BAD = re.compile(r"(^[-./])|(\.\.)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(/\.)|(\.lock$)|(\.lock/)|(//)|([./]$)|^@$")


def protocol_config() -> list[str]:
    out = ["-c", "protocol.allow=never"]
    for s in ALLOWED_SCHEMES:
        out += ["-c", f"protocol.{s}.allow=always"]
    return out


def restrict_env(env: dict[str, str]) -> dict[str, str]:
    """The child's environment with git's transports limited (``GIT_ALLOW_PROTOCOL``, honoured by git for
    clones, fetches and submodules, also inside CMake's FetchContent)."""
    return {**env, "GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_SCHEMES), "GIT_TERMINAL_PROMPT": "0"}


def check_url(url: str, where: str) -> str:
    """A git URL the harness may hand to git, or a UsageError naming ``where``."""
    u = url.strip()
    fix = ("Give an https://, ssh://, git:// or file:// URL, or user@host:path, e.g. "
           "https://github.com/vllm-project/vllm.git.")
    if not u or u.startswith("-") or any(c in u for c in "\x00\n\r\t "):
        raise UsageError(f"{where}: {url!r} is not a git URL the harness accepts (empty, whitespace, or it "
                         "starts with '-', which git would read as an option).", fix)
    if _SCP_RE.match(u) and "://" not in u:
        return u
    parts = urlsplit(u)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UsageError(f"{where}: {url!r} uses the transport {parts.scheme or '(none)'!r}; only "
                         f"{', '.join(ALLOWED_SCHEMES)} are allowed.", fix)
    if parts.scheme.lower() != "file" and (not parts.hostname or parts.hostname.startswith("-")):
        raise UsageError(f"{where}: {url!r} names no host.", fix)
    return u


def check_ref(ref: str, where: str) -> str:
    """A tag, branch or commit id that git will read as a ref, never as an option."""
    r = ref.strip()
    if not r or r.startswith("-") or len(r) > 255 or _REF_BAD.search(r):
        raise UsageError(f"{where}: {ref!r} is not a git ref (a tag like v0.8.5, a branch, or a commit id; "
                         "it may not start with '-' or hold spaces, '..', '~', '^', ':', '?', '*', '[' or '\\').",
                         "Write the tag, branch or commit id, e.g. ref = 'v0.8.5'.")
    return r


def run(args: list[str], env: dict[str, str], cwd: Path | None = None,
        timeout: int = GIT_TIMEOUT) -> subprocess.CompletedProcess:
    """``git <protocol limits> <args>``; a missing git is a UsageError, a timeout exit 124."""
    argv = ["git", *protocol_config(), *args]
    try:
        # its own process group (git-remote-https, ssh), ended with the harness
        return procs.run(argv, cwd=cwd, env=restrict_env(env), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError("git is not installed.", "Install git (apt-get install git), or use source = "
                         "'pypi-sdist' / 'path'.") from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"git {args[0]} timed out after {timeout}s")
