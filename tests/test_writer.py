"""Issue 26: one writer (core/writer.py) for every file the harness writes outside its state folder, and for its
logs.  Each case below lost or changed a user's file before: plan --write (name checked after the write, over
pyproject.toml, through a planted FILE.tmp link), --save-machine and compat --refresh --out (any file replaced,
its mode changed), bundle --archive (an existing DIR.tar replaced), a log or logs/<variant> that is a link
(written through).  A refused write leaves the old file byte-identical."""

from __future__ import annotations

import ast
import functools
import os
import stat
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compat_refresh import Index  # the recorded-metadata index of the refresh tests
from tiny_index import _tiny

from vllm_harness.cli import main as cli
from vllm_harness.core import writer
from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import NAME_RE, Layout
from vllm_harness.core.runner import StepLog, run_commands, write_json
from vllm_harness.facts import compat, machine_profile, planner
from vllm_harness.facts.variants import load_variant_file
from vllm_harness.pipeline import preflight
from vllm_harness.steps import bundle

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vllm_harness"
MACHINES = Path(__file__).parent / "machines"
RTX = MACHINES / "rtx4090-driver550.toml"
USER = b"# my own notes, not the harness's\nkeep = true\n"


@functools.cache
def _report() -> dict:
    return planner.plan(machine_profile.load_profile(RTX), compat.load(), "rtx4090")


def _user_file(p: Path, data: bytes = USER, mode: int = 0o640) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    return p


def _tmp_left(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


# ------------------------------------------------------------------------------------------ plan --write

def test_plan_write_refuses_a_bad_name_before_touching_the_file(tmp_path, capsys):
    bad = _user_file(tmp_path / "My Variant.toml")
    rc = cli(["plan", "--machine", str(RTX), "--write", str(bad)])
    assert bad.read_bytes() == USER       # before: written, then refused by name
    err = capsys.readouterr().err
    assert rc == 2 and "not a variant name" in err and "nothing was written" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stem=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                    max_size=70).filter(lambda s: s not in (".", "..")),
       content=st.binary(max_size=300))
def test_plan_write_never_changes_an_existing_file_it_did_not_write(stem, content):
    """Any name, any content without the harness's line: refused, the file byte-identical (a valid name
    included: before, every such file was replaced, and a bad name was checked only after the write)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"{stem}.toml"
        try:
            p.write_bytes(content)
        except OSError:   # a name this file system cannot hold
            return
        with pytest.raises(UsageError) as e:
            try:
                planner.write_variant(_report(), compat.load(), p)
            finally:
                assert p.read_bytes() == content and not _tmp_left(Path(d))
        assert "nothing was written" in e.value.message or "left unchanged" in e.value.message


@settings(max_examples=40, deadline=None)
@given(stem=st.from_regex(NAME_RE, fullmatch=True).filter(lambda s: s != "pyproject"))
def test_plan_write_replaces_its_own_variant_and_keeps_its_mode(stem):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "envs" / f"{stem}.toml"
        planner.write_variant(_report(), compat.load(), p)
        os.chmod(p, 0o604)
        first = p.read_bytes()
        p.write_bytes(first + b"# an edit\n")     # still the harness's (its first line)
        planner.write_variant(_report(), compat.load(), p)
        assert p.read_bytes() == first and stat.S_IMODE(p.stat().st_mode) == 0o604
        assert load_variant_file(p).name == stem and not _tmp_left(p.parent)


def test_plan_write_never_replaces_pyproject_even_with_force(tmp_path, capsys):
    pp = _user_file(tmp_path / "pyproject.toml", b"[project]\nname = 'mine'\n")
    rc = cli(["plan", "--machine", str(RTX), "--write", str(pp)])
    assert rc == 2 and "project file" in capsys.readouterr().err
    assert pp.read_bytes() == b"[project]\nname = 'mine'\n"
    rc = cli(["plan", "--machine", str(RTX), "--write", str(pp), "--force"])
    assert rc == 2 and "project file" in capsys.readouterr().err
    assert pp.read_bytes() == b"[project]\nname = 'mine'\n"


def test_plan_write_force_replaces_a_hand_written_variant_keeping_its_mode(tmp_path, capsys):
    v = _user_file(tmp_path / "mine.toml", mode=0o600)
    assert cli(["plan", "--machine", str(RTX), "--write", str(v)]) == 2
    assert "--force" in capsys.readouterr().err and v.read_bytes() == USER
    assert cli(["plan", "--machine", str(RTX), "--write", str(v), "--force"]) == 0
    assert v.read_bytes().startswith(planner.PLAN_MARK.encode()) and stat.S_IMODE(v.stat().st_mode) == 0o600


def test_plan_write_never_writes_through_a_planted_tmp_link(tmp_path):
    victim = _user_file(tmp_path / "victim.txt")
    (tmp_path / "mine.toml.tmp").symlink_to(victim)
    planner.write_variant(_report(), compat.load(), tmp_path / "mine.toml")
    assert victim.read_bytes() == USER and (tmp_path / "mine.toml.tmp").is_symlink()
    assert load_variant_file(tmp_path / "mine.toml").name == "mine"


def test_plan_write_refuses_a_link_and_a_hard_link(tmp_path):
    victim = _user_file(tmp_path / "victim.toml")
    (tmp_path / "link.toml").symlink_to(victim)
    os.link(victim, tmp_path / "hard.toml")
    for name in ("link.toml", "hard.toml"):
        with pytest.raises(UsageError) as e:
            planner.write_variant(_report(), compat.load(), tmp_path / name)
        assert "link" in e.value.message
    assert victim.read_bytes() == USER and (tmp_path / "link.toml").is_symlink()


# --------------------------------------------------------------------------------------- --save-machine

def test_save_machine_refuses_a_file_it_did_not_write(tmp_path):
    prof = machine_profile.load_profile(RTX)
    f = _user_file(tmp_path / "me.toml")
    with pytest.raises(UsageError) as e:
        machine_profile.save_profile(prof, f)
    assert "not written by the harness" in e.value.message and "--force" in e.value.fix
    assert f.read_bytes() == USER
    with pytest.raises(UsageError):   # the doctor command's path, through its --force
        preflight.machine_profile(None, str(RTX), str(f), force=False)
    assert f.read_bytes() == USER
    preflight.machine_profile(None, str(RTX), str(f), force=True)
    assert machine_profile.load_profile(f) == prof and stat.S_IMODE(f.stat().st_mode) == 0o640


def test_save_machine_keeps_the_mode_of_its_own_profile(tmp_path):
    prof = machine_profile.load_profile(RTX)
    f = machine_profile.save_profile(prof, tmp_path / "me.toml")
    os.chmod(f, 0o644)
    machine_profile.save_profile(prof, f)      # before: a mkstemp file (0600) replaced it
    assert stat.S_IMODE(f.stat().st_mode) == 0o644 and machine_profile.load_profile(f) == prof


def test_doctor_save_machine_cli_refuses_and_force_is_a_flag(state, tmp_path, capsys):
    f = _user_file(tmp_path / "me.toml")
    rc = cli(["doctor", "--variant", "cu124", "--machine", str(RTX), "--save-machine", str(f)])
    assert rc == 2 and "not written by the harness" in capsys.readouterr().err and f.read_bytes() == USER
    cli(["doctor", "--variant", "cu124", "--machine", str(RTX), "--save-machine", str(f), "--force"])
    assert f.read_bytes().startswith(machine_profile.PROFILE_MARK.encode())


# ------------------------------------------------------------------------------------ compat --refresh --out

@pytest.fixture
def meta_index():
    with Index() as ix:
        yield ix


def test_compat_refresh_out_refuses_a_user_file_before_reading_the_index(state, tmp_path, meta_index, capsys):
    out = _user_file(tmp_path / "notes.toml", mode=0o600)
    args = ["compat", "--refresh", "--index-url", f"{meta_index.url}/simple", "--pytorch-index",
            f"{meta_index.url}/pytorch", "--out", str(out)]
    rc = cli(args)
    assert rc == 2 and "not written by the harness" in capsys.readouterr().err
    assert out.read_bytes() == USER and not meta_index.hits        # judged before one request
    assert cli([*args, "--force"]) == 0
    text = out.read_text()
    assert text.startswith("# GENERATED by `invoke compat --refresh`") and stat.S_IMODE(out.stat().st_mode) == 0o600
    # its own file it replaces without --force (a changed date rewrites nothing; a changed body would)
    assert cli(args) == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_compat_refresh_out_refuses_a_link(state, tmp_path, meta_index, capsys):
    victim = _user_file(tmp_path / "victim.toml")
    (tmp_path / "out.toml").symlink_to(victim)
    rc = cli(["compat", "--refresh", "--index-url", f"{meta_index.url}/simple", "--pytorch-index",
              f"{meta_index.url}/pytorch", "--out", str(tmp_path / "out.toml")])
    assert rc == 2 and "symbolic link" in capsys.readouterr().err
    assert victim.read_bytes() == USER and (tmp_path / "out.toml").is_symlink()


# ----------------------------------------------------------------------------------------- bundle --archive

def test_bundle_archive_refuses_a_tar_it_did_not_write(tmp_path):
    out = tmp_path / "b"
    (out / "wheels").mkdir(parents=True)
    (out / "manifest.json").write_text("{}\n")
    tar = _user_file(tmp_path / "b.tar", b"my backup, not a bundle\n")
    with pytest.raises(UsageError) as e:
        bundle._archive(out, lambda s: None)
    assert "not written by the harness" in e.value.message and tar.read_bytes() == b"my backup, not a bundle\n"
    tar.unlink()
    assert bundle._archive(out, lambda s: None) == tar
    os.chmod(tar, 0o600)
    bundle._archive(out, lambda s: None)       # its own archive: replaced, mode kept
    with tarfile.open(tar) as t:
        assert "b/manifest.json" in t.getnames()
    assert stat.S_IMODE(tar.stat().st_mode) == 0o600 and not _tmp_left(tmp_path)


def test_bundle_archive_is_judged_before_the_bundle_is_made(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    tar = _user_file(tmp_path / "b.tar", b"my backup\n")
    rc, out, err = harness("bundle", "--variant", v, "--out", tmp_path / "b", "--archive")
    assert rc == 2 and "b.tar" in err and "not written by the harness" in err
    assert tar.read_bytes() == b"my backup\n" and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ logs

def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_log_that_is_a_link_is_never_written_through(tmp_path, kind):
    victim = _user_file(tmp_path / "victim.txt")
    log = tmp_path / "state" / "logs" / "v" / "build.log"
    log.parent.mkdir(parents=True)
    (log.symlink_to if kind == "symlink" else lambda v: os.link(v, log))(victim)
    with pytest.raises(UsageError) as e:
        run_commands("build", [_py("print('x')")], log, dict(os.environ), quiet=True, append=True)
    assert "Log file" in e.value.message and "link" in e.value.message
    assert victim.read_bytes() == USER
    with pytest.raises(UsageError):
        StepLog(log, append=False).open()
    assert victim.read_bytes() == USER


def test_a_log_folder_that_is_a_link_is_refused(tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "v").symlink_to(mine)
    with pytest.raises(UsageError) as e:
        run_commands("build", [_py("print('x')")], logs / "v" / "build.log", dict(os.environ), quiet=True)
    assert "symbolic link" in e.value.message and os.listdir(mine) == []
    # logs/ itself a link: refused as well
    (tmp_path / "state2").mkdir()
    (tmp_path / "state2" / "logs").symlink_to(mine)
    with pytest.raises(UsageError):
        StepLog(tmp_path / "state2" / "logs" / "v" / "x.log").open()
    assert os.listdir(mine) == []


def test_state_files_never_go_through_a_planted_tmp_name(tmp_path):
    victim = _user_file(tmp_path / "victim.txt")
    st = tmp_path / "state"
    st.mkdir()
    (st / "last-failed.tmp").symlink_to(victim)            # the name write_json used
    write_json(st / "last-failed.json", {"variant": "v", "step": "build", "log": "x"})
    assert victim.read_bytes() == USER and (st / "last-failed.json").is_file()
    # the marker's upgrade (a legacy plain-text marker) with the name its write used planted as a link
    st2 = tmp_path / "state2"
    st2.mkdir()
    (st2 / Layout.MARKER).write_text("vllm-harness state folder\n")
    (st2 / f"{Layout.MARKER}.tmp{os.getpid()}").symlink_to(victim)
    lay = Layout(root=tmp_path, state=st2)
    lay.ensure()
    assert victim.read_bytes() == USER and lay.is_state_folder()
    assert not [n for n in os.listdir(st2) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------- the writer itself

@settings(max_examples=80, deadline=None)
@given(old=st.binary(max_size=600), new=st.binary(max_size=600), mode=st.integers(0o400, 0o777))
def test_writer_replaces_only_its_own_files_and_keeps_the_mode(old, new, mode):
    mark = b"# written by the harness"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.txt"
        p.write_bytes(old)
        os.chmod(p, mode)
        if mark in old:
            writer.write_file(p, new, what="f", marker=mark)
            assert p.read_bytes() == new and stat.S_IMODE(p.stat().st_mode) == mode
        else:
            with pytest.raises(UsageError):
                writer.write_file(p, new, what="f", marker=mark)
            assert p.read_bytes() == old
            writer.write_file(p, new, what="f", marker=mark, force=True)
            assert p.read_bytes() == new and stat.S_IMODE(p.stat().st_mode) == mode
        assert os.listdir(d) == ["f.txt"]


def test_writer_refuses_links_fifos_and_colliding_temp_names(tmp_path, monkeypatch):
    victim = _user_file(tmp_path / "victim")
    (tmp_path / "sym").symlink_to(victim)
    os.link(victim, tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    for name in ("sym", "hard", "fifo"):
        with pytest.raises(UsageError):
            writer.write_file(tmp_path / name, b"x", what="t", force=True)
    assert victim.read_bytes() == USER
    # every temporary name taken (a planted link): refused, never opened
    monkeypatch.setattr(writer.secrets, "token_hex", lambda n: "fixed")
    (tmp_path / "new.fixed.tmp").symlink_to(victim)
    with pytest.raises(UsageError) as e:
        writer.write_file(tmp_path / "new", b"x", what="t")
    assert "temporary" in e.value.message and victim.read_bytes() == USER and not (tmp_path / "new").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = _user_file(tmp_path / "f")
    with pytest.raises(RuntimeError), writer.atomic_output(p, what="t", force=True) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert p.read_bytes() == USER and os.listdir(tmp_path) == ["f"]


# ------------------------------------------------------------------------- no other writer in the package

#: modules that write only inside the harness's own state folder (or into a child's tree it made), with why
STATE_FOLDER_WRITERS = {
    "core/writer.py": "the writer",
    "core/safeio.py": "reads only (os.open O_RDONLY)",
}
#: KNOWN, not converted yet (other engineers' files in this change): a log or state file in .harness/, a
#: downloaded file or a tree the harness made.  Each count is the number of write sites left in the module.
KNOWN_LEFT = {
    "cli.py": 1,                   # os.devnull for a closed stdout
    "core/locks.py": 2,            # .harness/locks/
    "core/status.py": 1,           # .harness/status/<v>.json
    "facts/package_index.py": 2,   # .harness/cache/index/ (HTTP cache)
    "facts/index_metadata.py": 1,  # .harness/cache/index/last-refresh (not this line of that file)
    "pipeline/run.py": 2,          # .harness/logs/<v>/*.log, .harness/last-built
    "steps/build.py": 3,           # .harness/logs/<v>/build*.log
    "steps/build_memory.py": 1,    # .harness/buildspeed
    "steps/bundle.py": 3,          # .harness/cache/bundle/ work files
    "steps/deps.py": 1,            # .harness/logs/<v>/deps.log
    "steps/deps_cache.py": 2,      # .harness/cache/deps
    "steps/env.py": 1,             # a .pth file in the variant's own venv
    "steps/fetch.py": 4,           # .harness/src/<v>, .harness/cache, its logs
    "steps/patches.py": 2,         # .harness/cache/patches
    "steps/prepare.py": 2,         # the fetched tree in .harness/src/<v>, its log
    "steps/probe.py": 2,           # .harness/logs/<v>/probe*
    "steps/torch_install.py": 3,   # .harness/envs/<v>.constraints.txt, its log
    "steps/wheelhouse.py": 1,      # .harness/wheelhouse
    "verify/checks.py": 1,         # .harness/logs/<v>/verify*.log
}
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


_MODULE_OPENERS = {"io", "builtins", "gzip", "bz2", "lzma", "tarfile", "zipfile"}


def _mode_of(call: ast.Call, pos: int) -> str | None:
    """The mode's letters (every string in the expression: ``"a" if fresh else "w"`` gives "aw")."""
    node = call.args[pos] if len(call.args) > pos else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if node is None:
        return None
    return "".join(x.value for x in ast.walk(node) if isinstance(x, ast.Constant) and isinstance(x.value, str))


def write_sites(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every file write: open(..., 'w'/'a'/'x'/'+'), tarfile.open(NAME, 'w'), p.open('w'),
    write_text/write_bytes, os.open with a write flag, tempfile.mkstemp.  A call given ``fileobj=`` writes to
    a file object opened elsewhere (core.writer's), not a path."""
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        if name in ("write_text", "write_bytes", "mkstemp"):
            out.append((n.lineno, name))
        elif name == "open" and owner == "os":
            flags = {x.attr for a in n.args[1:2] for x in ast.walk(a) if isinstance(x, ast.Attribute)}
            if flags & _WRITE_FLAGS:
                out.append((n.lineno, "os.open for writing"))
        elif name == "open" and not any(k.arg == "fileobj" for k in n.keywords):
            mode = _mode_of(n, 1 if isinstance(f, ast.Name) or owner in _MODULE_OPENERS else 0)
            if mode and any(c in mode for c in "wax+"):
                out.append((n.lineno, f"open(..., {mode!r})"))
    return out


def test_the_writer_is_the_only_writer_of_files():
    probe = ("open(p, 'w'); open(p, mode='ab'); p.open('a'); p.write_text('x'); p.write_bytes(b'');"
             "os.open(p, os.O_WRONLY | os.O_CREAT); tempfile.mkstemp(); tarfile.open(p, 'w');"
             "open(p); os.open(p, os.O_RDONLY); p.read_text(); tarfile.open(fileobj=f, mode='w'); p.open()")
    assert len(write_sites(ast.parse(probe))) == 8     # the check sees each kind of write, and no read
    offenders, over = [], []
    for py in sorted(SRC.rglob("*.py")):
        rel = py.relative_to(SRC).as_posix()
        if rel in STATE_FOLDER_WRITERS or rel.startswith("data/"):   # data/*.py run inside the target env
            continue
        sites = write_sites(ast.parse(py.read_text(encoding="utf-8")))
        offenders += [f"{rel}:{line}: {what}" for line, what in sites]
        if len(sites) != KNOWN_LEFT.get(rel, 0):   # fewer: lower its count (the list only shrinks)
            over.append(f"{rel}: {len(sites)} write sites, {KNOWN_LEFT.get(rel, 0)} known")
    print("write sites outside core/writer.py:\n  " + "\n  ".join(offenders))
    assert not over, "write files through core.writer (write_file / atomic_output / open_log):\n" + "\n".join(over)
    for rel in ("facts/planner.py", "facts/machine_profile.py", "commands/compat_plan.py", "core/runner.py",
                "core/layout.py"):
        assert not write_sites(ast.parse((SRC / rel).read_text())), rel
