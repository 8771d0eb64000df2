"""git in a user's tree never runs a command the tree (or a global config) names, and a tree another user
owns stays refused (issue 26, class 4).

A booby-trapped repository names a command in every place git looks for one (core.fsmonitor, hooks by
core.hooksPath and in .git/hooks, core.sshCommand, core.pager, core.askPass, diff.external and textconv, a
filter driver with clean/smudge/process); each command writes a marker file.  The test first shows that a
plain git does run them, then that no harness git call does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vllm_harness.core import gitcmd
from vllm_harness.facts import source_tree
from vllm_harness.steps import fetch, patches

GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
HOOKS = ("post-checkout", "pre-commit", "post-commit", "post-merge", "reference-transaction", "post-index-change",
         "pre-auto-gc", "fsmonitor-watchman", "post-rewrite", "pre-push")


def plain_git(*args, cwd=None, env=None, check=True):
    r = subprocess.run(["git", *map(str, args)], cwd=cwd, env={**os.environ, **GIT_ID, **(env or {})},
                       capture_output=True, text=True)
    assert r.returncode == 0 or not check, r.stderr
    return r


def _trap(marks: Path, what: str, then: str = "true") -> str:
    return f"touch {marks / what}; {then}"


def trap_config(marks: Path, hooks: Path) -> dict[str, str]:
    """Every configuration key that makes git run a command, each writing its own marker."""
    hooks.mkdir(parents=True, exist_ok=True)
    for h in HOOKS:
        (hooks / h).write_text(f"#!/bin/sh\ntouch {marks / ('hook-' + h)}\n")
        (hooks / h).chmod(0o755)
    return {
        "core.fsmonitor": _trap(marks, "fsmonitor", "false"),
        "core.hooksPath": str(hooks),
        "core.sshCommand": _trap(marks, "ssh", "false"),
        "core.pager": _trap(marks, "pager", "cat"),
        "core.askPass": str(hooks / "post-commit"),
        "diff.external": _trap(marks, "extdiff"),
        "diff.trap.textconv": _trap(marks, "textconv", "cat"),
        "filter.trap.clean": _trap(marks, "clean", "cat"),
        "filter.trap.smudge": _trap(marks, "smudge", "cat"),
    }


def trapped_repo(path: Path, marks: Path) -> Path:
    """A committed repository whose .git/config and .git/hooks name the trap commands, with a file that is
    stat-dirty (git must read it again, through its filter) and a .gitattributes that routes every file to
    the trap filter and diff driver."""
    path.mkdir(parents=True)
    plain_git("init", "-q", "-b", "main", cwd=path)
    (path / "a.txt").write_text("one\ntwo\nthree\n")
    (path / "CMakeLists.txt").write_text("project(x)\n")
    plain_git("add", "-A", cwd=path)
    plain_git("commit", "-q", "-m", "c", cwd=path)
    plain_git("tag", "-a", "v1.2.3", "-m", "v1.2.3", cwd=path)
    (path / ".git" / "info").mkdir(exist_ok=True)
    (path / ".git" / "info" / "attributes").write_text("* filter=trap diff=trap\n")
    for key, value in trap_config(marks, path / ".git" / "trap-hooks").items():
        plain_git("config", key, value, cwd=path)
    for h in HOOKS:
        shutil.copy(path / ".git" / "trap-hooks" / h, path / ".git" / "hooks" / h)
    time.sleep(1.1)
    (path / "a.txt").touch()  # stat-dirty: status must hash it again (the clean filter)
    return path


def fired(marks: Path) -> list[str]:
    return sorted(p.name for p in marks.iterdir())


@pytest.fixture
def trapped(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    tree = trapped_repo(tmp_path / "user-tree", marks)
    # the traps are live: a plain git status runs the fsmonitor and the clean filter, a diff the textconv
    plain_git("status", "--porcelain", cwd=tree)
    plain_git("diff", "--no-ext-diff", "HEAD", cwd=tree)
    live = fired(marks)
    assert "fsmonitor" in live and "clean" in live, live
    for p in marks.iterdir():
        p.unlink()
    (tree / "a.txt").touch()
    return tree, marks


def clean_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), **GIT_ID}


def test_reading_a_users_tree_runs_none_of_its_commands(trapped, tmp_path):
    """--source DIR (the commit and dirtiness of the tree), setuptools-scm's version by git describe: the
    tree's fsmonitor, hooks and filters never run (the old code's `git status` ran core.fsmonitor)."""
    tree, marks = trapped
    env = clean_env(tmp_path)
    prov = fetch._path_provenance(tree, env)
    assert prov["git_commit"] == plain_git("rev-parse", "HEAD", cwd=tree).stdout.strip()
    assert "git_dirty" in prov
    assert source_tree.vllm_version(tree, "0.0.1", env=env) == ("1.2.3", "git describe (v1.2.3)")
    assert fired(marks) == []
    r = gitcmd.inspect(tree, ["diff", "HEAD"], env)  # the textconv and external diff stay off too
    assert r.returncode == 0
    assert fired(marks) == []


def _fetch_source(harness, tmp_path, tree) -> dict:
    """`fetch --source TREE --json` for a source-mode variant; its JSON (the command must succeed)."""
    v = tmp_path / "p.toml"
    v.write_text('description = "t"\ncuda = "12.4"\npython = ">=3.10"\n[torch]\nversion = "2.6.0"\n'
                 'packages = ["torch==2.6.0"]\n[vllm]\nmode = "source"\nversion = "9.9.9"\n')
    rc, out, err = harness("fetch", "--variant", v, "--source", tree, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_fetch_source_dir_copies_without_running_the_trees_commands(trapped, tmp_path, harness):
    tree, marks = trapped
    res = _fetch_source(harness, tmp_path, tree)
    assert res["provenance"]["git_commit"] and not (Path(res["source"]) / ".git").exists()
    assert fired(marks) == []


def test_patching_an_in_place_tree_runs_none_of_its_filters(trapped, tmp_path):
    """`git apply` reads the old file through the tree's clean filter: emptied, and no hook runs."""
    tree, marks = trapped
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "fix.patch").write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
    (tmp_path / "p" / "fix.toml").write_text('versions = ">=0"\nwhy = "t"\nupstream = "t"\n')
    [p] = patches.load_patches(tmp_path / "p")
    st = patches.status(p, tree, "1.0", clean_env(tmp_path))
    assert st["status"] == "applied", st
    assert (tree / "a.txt").read_text() == "one\nTWO\nthree\n"
    assert fired(marks) == []


def test_harness_git_ignores_command_settings_of_the_users_global_config(tmp_path, trapped):
    """The harness's own clone/checkout (fetch_git) and a network git: a global core.hooksPath (a
    post-checkout hook), core.fsmonitor, core.sshCommand never run."""
    tree, marks = trapped
    glob = tmp_path / "global.gitconfig"
    lines = ["[core]"] + [f"\t{k.split('.', 1)[1]} = \"{v}\"" for k, v in trap_config(marks, tmp_path / "ghooks").items()
                          if k.startswith("core.")]
    glob.write_text("\n".join(lines) + "\n")
    env = {**clean_env(tmp_path), "GIT_CONFIG_GLOBAL": str(glob)}
    # the global trap is live for a plain git
    plain_git("-C", tree, "status", env={"GIT_CONFIG_GLOBAL": str(glob)})
    assert fired(marks)
    for p in marks.iterdir():
        p.unlink()
    origin = tmp_path / "origin.git"
    plain_git("clone", "-q", "--bare", tree, origin)
    for p in marks.iterdir():
        p.unlink()
    prov = fetch.fetch_git(origin.as_uri(), "v1.2.3", tmp_path / "dest", tmp_path / "cache", env)
    assert prov["kind"] == "tag" and (tmp_path / "dest" / "a.txt").is_file()
    r = gitcmd.run(["ls-remote", "--", "ssh://127.0.0.1:1/x.git"], env, timeout=60)
    assert r.returncode != 0
    assert fired(marks) == []


def test_values_given_to_git_cannot_become_options(tmp_path):
    with pytest.raises(ValueError):
        gitcmd.argv(["-C", "--upload-pack=touch x", "status"])
    argv = gitcmd.argv(["-C", str(tmp_path), "diff", "--", "a"])
    assert argv[argv.index("diff") + 1:argv.index("diff") + 3] == ["--no-ext-diff", "--no-textconv"]
    assert "core.fsmonitor=false" in argv and "core.hooksPath=/dev/null" in argv and "--no-pager" in argv
    assert "core.sshCommand='/opt/my ssh'" in gitcmd.argv(["status"], {"GIT_SSH": "/opt/my ssh"})  # the user's
    env = gitcmd.safe_env({"GIT_DIR": "/elsewhere", "PATH": "/bin"})
    assert "GIT_DIR" not in env and env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_TERMINAL_PROMPT"] == "0"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a tree owned by another uid (os.chown)")
def test_a_tree_owned_by_another_user_is_copied_without_git_and_never_trusted(trapped, tmp_path, harness):
    """git refuses a repository another user owns (dubious ownership); the harness does not override that
    with safe.directory (the old code did, and git status ran the tree's core.fsmonitor as root): the tree
    is copied without its .git, the provenance says why, and no git runs there."""
    tree, marks = trapped
    for dirpath, dirs, files in os.walk(tree):
        for n in dirs + files:
            os.lchown(os.path.join(dirpath, n), 1234, 1234)
    os.lchown(tree, 1234, 1234)
    os.chmod(marks, 0o777)
    env = clean_env(tmp_path)
    plain = subprocess.run(["git", "-C", str(tree), "status"], env=env, capture_output=True, text=True)
    assert plain.returncode == 128 and "dubious ownership" in plain.stderr
    res = _fetch_source(harness, tmp_path, tree)
    prov = res["provenance"]
    assert "git_commit" not in prov and "dubious ownership" in prov["git_not_read"], prov
    assert (Path(res["source"]) / "a.txt").is_file() and not (Path(res["source"]) / ".git").exists()
    assert fetch._path_provenance(tree, env).keys() == {"git_not_read"}
    assert source_tree.vllm_version(tree, "9.9.9", env=env)[0] == "9.9.9"  # not git describe's 1.2.3
    assert gitcmd.inspect(tree, ["status"], env).returncode == 128
    assert fired(marks) == []
