"""The machine and the input as a careless or hostile user leaves them (issue 26, class 8): a read-only state
folder, a disk that fills while the harness writes its lock or records a failure, a 128 KB argument, a FIFO or
/dev/zero given as a log, terminal escape sequences in a machine profile, verify after a build given by path.
Each is one message (exit 2, no traceback) with the state right; each case broke on the code before it."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from tiny_index import _tiny

from vllm_harness.core.layout import Layout

VARIANT = ROOT / "envs" / "cu124.toml"
NO_GPU = ROOT / "tests" / "machines" / "no-gpu.toml"
LONG = "a" * 131_000   # a single argument may be 128 KiB on Linux (MAX_ARG_STRLEN)


def _offline(tmp_path: Path) -> Path:
    v = tmp_path / "offline.toml"
    v.write_text(VARIANT.read_text().replace("# no index_url: PyPI's Linux wheels of torch 2.6.0 are the cu124 build",
                                             'index_url = "http://127.0.0.1:9/simple"'))
    return v


def _git_source(tmp_path: Path) -> Path:
    """A source variant whose fetch fails at once (git cannot connect): a step that starts, then fails."""
    v = tmp_path / "gitsrc.toml"
    v.write_text(VARIANT.read_text().replace('mode = "wheel"', 'mode = "source"\nsource = "git"\n'
                                             'git = "https://127.0.0.1:9/vllm.git"\nref = "v0.8.5"'))
    return v


def _left_behind(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*") if ".tmp" in p.name)


def _full_disk(monkeypatch, when) -> None:
    """The disk fills during the writes ``when(path, text)`` picks: part of the text reaches the file, then
    ENOSPC (as write(2) reports it, without a file name)."""
    real = Path.write_text

    def write_text(self, data, *args, **kw):
        if when(self, data):
            real(self, data[: len(data) // 2], *args, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kw)
    monkeypatch.setattr(Path, "write_text", write_text)


# ------------------------------------------------------------------------------------ read-only state

@pytest.fixture
def read_only_state(state):
    """The state folder, made by the harness, then read-only: a read-only bind mount as root (root writes
    through a folder's mode), the folder's mode otherwise."""
    Layout.default().ensure()
    (state / "locks").mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(state), str(state)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(state)],
                                         capture_output=True).returncode != 0:
            if mounted:
                subprocess.run(["umount", str(state)])
            pytest.skip("root without mount: no way to make a read-only folder here")
        yield state
        subprocess.run(["umount", str(state)], check=True)
    else:
        for d in (state, state / "locks"):
            d.chmod(0o555)
        yield state
        for d in (state, state / "locks"):
            d.chmod(0o755)


def test_a_read_only_state_folder_is_one_message_and_nothing_is_recorded(harness, read_only_state, tmp_path):
    before = sorted(p.name for p in read_only_state.rglob("*"))
    rc, out, err = harness("deps", "--variant", _offline(tmp_path))
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, out + err
    assert str(read_only_state) in err and "VLLM_HARNESS_STATE" in err
    assert sorted(p.name for p in read_only_state.rglob("*")) == before


# ------------------------------------------------------------------------------------------ full disk

def test_a_disk_full_while_the_lock_is_written_is_one_message_and_leaves_nothing(harness, state, tmp_path,
                                                                                 monkeypatch):
    _full_disk(monkeypatch, lambda p, _text: p.parent.name == "locks")
    rc, out, err = harness("deps", "--variant", _offline(tmp_path))
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, out + err
    assert "Lock record" in err and "disk is full" in err and "df -h" in err
    assert _left_behind(state) == []
    assert not (state / "status" / "offline.json").exists()   # nothing ran


def test_a_disk_full_while_a_failure_is_recorded_never_leaves_the_step_running(harness, state, tmp_path,
                                                                               monkeypatch):
    _full_disk(monkeypatch, lambda p, text: p.parent.name == "status" and '"failed"' in text)
    rc, out, err = harness("fetch", "--variant", _git_source(tmp_path))
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, out + err
    assert "Status file" in err and "disk is full" in err
    assert _left_behind(state) == []
    st = state / "status" / "gitsrc.json"
    assert not st.exists() or "running" not in st.read_text()
    assert not st.exists() and "record was removed" in err   # no room even for the failed record


def test_a_failure_record_written_in_the_space_its_old_record_frees(harness, state, tmp_path, monkeypatch):
    """Only the first write of the failed record meets the full disk: the old "running" record is removed and
    the failed one fits in the space that frees."""
    seen = []
    _full_disk(monkeypatch, lambda p, text: p.parent.name == "status" and '"failed"' in text and not seen.append(1)
               and len(seen) == 1)
    rc, out, err = harness("fetch", "--variant", _git_source(tmp_path))
    assert rc == 2 and "disk is full" in err and "Traceback" not in err, out + err
    assert json.loads((state / "status" / "gitsrc.json").read_text())["steps"]["fetch"]["status"] == "failed"


# --------------------------------------------------------------------------------------- long arguments

@pytest.mark.parametrize("argv,flag", [
    (["doctor", "--variant", LONG], "--variant"),
    (["doctor", "--variant", f"/tmp/{'a/' * 65_000}x.toml"], "--variant"),
    (["verify", "--variant", "a" * 300], "--variant"),
    (["verify", "--python", LONG], "--python"),
    (["diagnose", "--log", LONG], "--log"),
    (["bundle", "--check", LONG], "--check"),
    (["doctor", "--variant", "cu124", "--machine", str(NO_GPU), "--source", LONG], "--source"),
])
def test_a_128_kb_argument_is_one_message_naming_its_flag(harness, argv, flag):
    rc, out, err = harness(*argv)
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, err[:500]
    assert err.startswith(f"error: {flag} ") and "too long" in err and len(err) < 1000


# ----------------------------------------------------------------------------------------- diagnose --log

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_diagnose_names_what_a_log_that_is_not_a_file_is(harness, tmp_path, kind):
    target = {"fifo": tmp_path / "build.log", "dev-zero": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    rc, out, err = harness("diagnose", "--log", target)
    assert rc == 2 and err.count("error:") == 1 and "no such file" not in err, err
    assert f"--log {target}: is {({'fifo': 'a FIFO', 'dev-zero': 'a character device', 'directory': 'a directory'})[kind]}" in err


# ------------------------------------------------------------------------------ escapes in a profile

ESCAPES = "\\u001b[2J\\u001b]0;owned\\u0007\\u009b31m\\u202e"   # clear screen, OSC title + BEL, C1 CSI, RLO


def test_terminal_escapes_in_a_machine_profile_are_shown_not_obeyed(harness, tmp_path):
    prof = tmp_path / "evil.toml"
    prof.write_text(NO_GPU.read_text().replace("gpu = []\n", "").replace('os = "ubuntu-22.04"', f'os = "ubuntu{ESCAPES}"')
                    + f'\n[[gpu]]\nname = "NVIDIA {ESCAPES}A100"\ncompute_capability = "8.0"\nmemory_gib = 80.0\n')
    for argv in (["doctor", "--variant", "cu124", "--machine", prof], ["plan", "--machine", prof]):
        rc, out, err = harness(*argv)
        assert rc in (0, 1), err
        assert not any(c in out + err for c in "\x1b\x07\x9b\u202e"), repr(out[-400:])
    rc, out, err = harness("doctor", "--variant", "cu124", "--machine", prof)
    assert "NVIDIA \\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202eA100" in out   # shown, as escapes


# ------------------------------------------------------------------------------------ verify by path

def test_verify_after_a_build_given_by_path_verifies_that_build(harness, state, tmp_path, index):
    v = _tiny(tmp_path, index, name="mine")   # a variant file outside envs/
    rc, out, err = harness("build-variant", "--variant", v, "--skip-doctor")
    assert (state / "status" / "mine.json").is_file(), out + err
    for argv in (["verify", "--device", "cpu"], ["verify", "--variant", "mine", "--device", "cpu"]):
        rc, out, err = harness(*argv)
        assert "Unknown variant" not in err and rc in (0, 1), out + err
        assert str(state / "envs" / "mine") in out + err   # the env that build made was the one verified
