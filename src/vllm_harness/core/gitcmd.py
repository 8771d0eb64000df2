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

A repository's own configuration can name commands (``core.fsmonitor``, hooks, ``core.sshCommand``, a
pager, ``diff.external`` and textconv drivers, ``filter.<name>.clean/smudge/process``).  Every git the
harness runs goes through :func:`run`, which overrides them on the command line (``--no-pager``,
``-c core.fsmonitor=false``, ``-c core.hooksPath=/dev/null``, ``-c core.sshCommand=ssh`` (or the user's
``GIT_SSH``),
``-c core.askPass=``, ``-c core.attributesFile=/dev/null``; ``--no-ext-diff --no-textconv`` for the
commands that diff), ignores the system configuration and attributes (``GIT_CONFIG_NOSYSTEM``,
``GIT_ATTR_NOSYSTEM``), drops the variables that point git at another repository (``GIT_DIR``...), and
never prompts.  A user's ``GIT_SSH_COMMAND`` (the environment, never a repository) still wins over the
neutral ``core.sshCommand``.

A tree the user handed over is read with :func:`inspect` only: never when another user owns it (git's
"dubious ownership" refusal stands: the harness adds no ``safe.directory`` for it and runs no git there),
with every filter driver the tree's configuration names emptied, and never to check anything out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from vllm_harness.core import procs
from vllm_harness.core.errors import UsageError

ALLOWED_SCHEMES = ("https", "ssh", "git", "file")
GIT_TIMEOUT = 1800
HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_SCP_RE = re.compile(r"^[A-Za-z0-9._~-]+@[A-Za-z0-9.-]+:[^\s]+$")  # git@github.com:vllm-project/vllm.git
# what `git check-ref-format --allow-onelevel` refuses, checked here without a process (man
# git-check-ref-format)
_REF_BAD = re.compile(
    r"(^[-./])|(\.\.)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(/\.)|(\.lock$)|(\.lock/)|(//)|([./]$)|^@$"
)


def protocol_config() -> list[str]:
    out = ["-c", "protocol.allow=never"]
    for s in ALLOWED_SCHEMES:
        out += ["-c", f"protocol.{s}.allow=always"]
    return out


#: the configuration that makes git run a command, overridden on every git the harness starts
SAFE_CONFIG = (
    "core.fsmonitor=false",
    "core.hooksPath=/dev/null",
    "core.askPass=",
    "core.pager=cat",
    "core.attributesFile=/dev/null",
)
#: subcommands that can diff (external diff drivers, textconv): they get --no-ext-diff --no-textconv
_DIFFING = frozenset(
    {
        "diff",
        "log",
        "show",
        "diff-index",
        "diff-files",
        "diff-tree",
        "format-patch",
        "whatchanged",
        "grep",
        "blame",
        "range-diff",
    }
)
#: variables that would point git at another repository than the one named
_REPO_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_COMMON_DIR",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_EXTERNAL_DIFF",
    "GIT_CONFIG",
)
_PATH_OPTS = ("-C", "--git-dir", "--work-tree")


def safe_config(env: dict[str, str] | None = None) -> list[str]:
    """The options that turn off every command a configuration can name.  ``core.sshCommand`` is plain
    ``ssh``, or the user's ``GIT_SSH`` program (which a configured sshCommand would otherwise beat);
    ``GIT_SSH_COMMAND`` in the environment beats both, as git has it."""
    ssh = (env or {}).get("GIT_SSH")
    out = ["--no-pager", "-c", f"core.sshCommand={shlex.quote(ssh) if ssh else 'ssh'}"]
    for kv in SAFE_CONFIG:
        out += ["-c", kv]
    return out


def safe_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a git the harness runs: transports limited, no system configuration or
    attributes, no prompt, no pager, nothing pointing at another repository."""
    out = {k: v for k, v in restrict_env(env).items() if k not in _REPO_VARS}
    out.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_ATTR_NOSYSTEM": "1", "GIT_PAGER": "cat"})
    return out


def restrict_env(env: dict[str, str]) -> dict[str, str]:
    """The child's environment with git's transports limited (``GIT_ALLOW_PROTOCOL``, honoured by git for
    clones, fetches and submodules, also inside CMake's FetchContent)."""
    return {**env, "GIT_ALLOW_PROTOCOL": ":".join(ALLOWED_SCHEMES), "GIT_TERMINAL_PROMPT": "0"}


def check_url(url: str, where: str) -> str:
    """A git URL the harness may hand to git, or a UsageError naming ``where``."""
    u = url.strip()
    fix = (
        "Give an https://, ssh://, git:// or file:// URL, or user@host:path, e.g. "
        "https://github.com/vllm-project/vllm.git."
    )
    if not u or u.startswith("-") or any(c in u for c in "\x00\n\r\t "):
        raise UsageError(
            f"{where}: {url!r} is not a git URL the harness accepts (empty, whitespace, or it "
            "starts with '-', which git would read as an option).",
            fix,
        )
    if _SCP_RE.match(u) and "://" not in u:
        return u
    parts = urlsplit(u)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UsageError(
            f"{where}: {url!r} uses the transport {parts.scheme or '(none)'!r}; only "
            f"{', '.join(ALLOWED_SCHEMES)} are allowed.",
            fix,
        )
    if parts.scheme.lower() != "file" and (not parts.hostname or parts.hostname.startswith("-")):
        raise UsageError(f"{where}: {url!r} names no host.", fix)
    return u


def check_ref(ref: str, where: str) -> str:
    """A tag, branch or commit id that git will read as a ref, never as an option."""
    r = ref.strip()
    if not r or r.startswith("-") or len(r) > 255 or _REF_BAD.search(r):
        raise UsageError(
            f"{where}: {ref!r} is not a git ref (a tag like v0.8.5, a branch, or a commit id; "
            "it may not start with '-' or hold spaces, '..', '~', '^', ':', '?', '*', '[' or '\\').",
            "Write the tag, branch or commit id, e.g. ref = 'v0.8.5'.",
        )
    return r


def argv(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``git <no pager> <safe config> <protocol limits> <args>``, with ``--no-ext-diff --no-textconv`` after a
    subcommand that diffs.  A value of ``-C``/``--git-dir``/``--work-tree`` may not start with ``-`` (git
    would read it as an option): give an absolute path."""
    args = list(args)
    i = 0
    while i < len(args) and args[i] in _PATH_OPTS:
        if i + 1 >= len(args) or not args[i + 1] or args[i + 1].startswith("-"):
            raise ValueError(
                f"git {args[i]} needs a path that does not start with '-', got {args[i + 1 : i + 2]}"
            )
        i += 2
    if i < len(args) and args[i] in _DIFFING:
        args[i + 1 : i + 1] = ["--no-ext-diff", "--no-textconv"]
    return ["git", *safe_config(env), *protocol_config(), *args]


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = GIT_TIMEOUT
) -> subprocess.CompletedProcess:
    """``git <args>`` made safe (the module's text); a missing git is a UsageError, a timeout exit 124."""
    cmd = argv(args, env)
    try:
        # its own process group (git-remote-https, ssh), ended with the harness
        return procs.run(cmd, cwd=cwd, env=safe_env(env), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(
            "git is not installed.",
            "Install git (apt-get install git), or use source = 'pypi-sdist' / 'path'.",
        ) from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"git {args[0]} timed out after {timeout}s")


# ------------------------------------------------------------------------------------ a user's tree

DUBIOUS = "dubious ownership"


def foreign_owner(tree: Path) -> int | None:
    """The uid owning ``tree`` (or its ``.git``) when it is not this user, else None: git refuses such a
    repository (dubious ownership), and the harness never overrides that for a tree it did not make."""
    me = os.geteuid() if hasattr(os, "geteuid") else None
    if me is None:
        return None
    for p in (tree, tree / ".git"):
        try:
            uid = p.lstat().st_uid
        except OSError:
            continue
        if uid != me:
            return uid
    return None


def _filter_overrides(listing: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with every ``filter.<name>.*`` driver named in ``listing`` (``git config --name-only
    --get-regexp`` output) emptied, through GIT_CONFIG_COUNT/KEY/VALUE (a name may hold any character)."""
    out = dict(env)
    n = int(out.get("GIT_CONFIG_COUNT", "0") or 0)
    names = {k[len("filter.") :].rsplit(".", 1)[0] for k in listing.splitlines() if k.startswith("filter.")}
    for name in sorted(names):
        for key, value in (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false")):
            out[f"GIT_CONFIG_KEY_{n}"] = f"filter.{name}.{key}"
            out[f"GIT_CONFIG_VALUE_{n}"] = value
            n += 1
    out["GIT_CONFIG_COUNT"] = str(n)
    return out


def tree_env(tree: Path, env: dict[str, str], timeout: int = 120) -> dict[str, str]:
    """The environment for git in a tree the user handed over: the caller's ``GIT_CONFIG_*`` entries
    (``safe.directory`` among them) dropped, a bare repository only when named, and, unless another user
    owns the tree (then git refuses it and no git runs to list them), every filter driver its
    configuration names emptied."""
    base = {k: v for k, v in env.items() if not k.startswith("GIT_CONFIG_")}
    base.update(
        {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.bareRepository", "GIT_CONFIG_VALUE_0": "explicit"}
    )
    if foreign_owner(Path(tree).absolute()) is not None:
        return base
    listing = run(
        ["-C", str(Path(tree).absolute()), "config", "--name-only", "--get-regexp", r"^filter\."],
        base,
        timeout=timeout,
    )
    return _filter_overrides(listing.stdout if listing.returncode == 0 else "", base)


def inspect(
    tree: Path, args: list[str], env: dict[str, str], timeout: int = 120
) -> subprocess.CompletedProcess:
    """``git -C <tree> <args>`` for reading a tree the user handed over (rev-parse, status, describe), in
    :func:`tree_env`.  Never run in a tree another user owns: that gives exit 128 and git's own "dubious
    ownership" message without starting git; no git gives exit 127."""
    tree = Path(tree).absolute()
    uid = foreign_owner(tree)
    if uid is not None:
        return subprocess.CompletedProcess(
            ["git", "-C", str(tree), *args],
            128,
            "",
            f"fatal: detected {DUBIOUS} in repository at '{tree}' (owned by uid "
            f"{uid}, not this user): the harness does not run git there",
        )
    try:
        return run(["-C", str(tree), *args], tree_env(tree, env, timeout), timeout=timeout)
    except UsageError as e:  # no git: the tree's metadata is simply not read
        return subprocess.CompletedProcess(["git", *args], 127, "", e.message)
