"""Bundle integrity (issue 26, class 3 and the bundle part of 6): --check and --from-bundle hash every file's
content (no verdict keyed by a file's stat), a re-run never records a changed file, manifest entries stay inside
the bundle and a malformed manifest is one message, a killed bundle resumes, and killing bundle ends the
`uv pip compile` it started."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from bundle_gate_index import (
    alive,
    cmdline,
    descendants,
    gated_index,  # noqa: F401 - the fixture
    harness_process,
    kill_hard,
    wait_gone,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.utils import parse_sdist_filename, parse_wheel_filename
from tiny_index import _Index, _tiny, _wheel

W = "tinydep-0.3-py3-none-any.whl"


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _recorded(b: Path, rel: str) -> str:
    """The sha256 the bundle's manifest records for ``rel`` (a listed file, or one deleted since)."""
    m = _manifest(b)
    return {**m.get("recorded", {}), **m["files"]}[rel]["sha256"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _errors(err: str) -> int:
    return sum(ln.startswith("error:") for ln in err.splitlines())


def _venv() -> Path:
    return Path(os.environ["VLLM_HARNESS_STATE"]) / "envs" / "tiny"


# ------------------------------------------------------------------------------------------ content, not stat

def test_an_in_place_edit_with_the_mtime_restored_is_caught_and_never_re_recorded(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    b = tmp_path / "b"
    assert harness("bundle", "--variant", v, "--out", b)[0] == 0
    assert harness("bundle", "--check", b)[0] == 0   # (the old code recorded every file's stat -> sha256 here)
    w = b / "wheels" / W
    good = _sha(w)
    st0 = w.stat()
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(w, "r+b") as fh:   # same inode, same size (and the download cache's hard link edited with it)
        fh.write(data)
    os.utime(w, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    st1 = w.stat()
    assert (st1.st_ino, st1.st_size, st1.st_mtime_ns) == (st0.st_ino, st0.st_size, st0.st_mtime_ns)
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and W in err and "sha256" in err, out + err
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and W in err and not _venv().exists(), out + err
    # a re-run refuses (naming the file and the fix) and records nothing
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 2 and W in err and "Delete" in err and "Traceback" not in err, out + err
    assert _recorded(b, f"wheels/{W}") == good
    # the fix it names: the file deleted, a re-run fetches it again (the cache's edited copy is not used)
    w.unlink()
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and _sha(w) == good, out + err
    assert harness("bundle", "--check", b)[0] == 0
    # a file replaced by a link out of the bundle (same bytes): refused, by --check and by --from-bundle
    outside = tmp_path / "elsewhere" / W
    outside.parent.mkdir()
    shutil.copy(w, outside)
    w.unlink()
    w.symlink_to(outside)
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and "outside the bundle" in err, out + err
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and "outside the bundle" in err and not _venv().exists(), out + err


def test_a_swapped_same_name_wheel_is_not_blessed_by_a_re_run(harness, tmp_path, index, monkeypatch):
    v = _tiny(tmp_path, index)
    b = tmp_path / "b"
    assert harness("bundle", "--variant", v, "--out", b)[0] == 0
    w = b / "wheels" / W
    good = _sha(w)
    other = tmp_path / "other"
    other.mkdir()
    swapped = _wheel(other, "tinydep", "0.3", ("tinysub<1.2", "xtra"))   # same name, other bytes and size
    w.unlink()
    shutil.copy(swapped, w)
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and W in err
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 2 and W in err and "Delete" in err, out + err
    assert _recorded(b, f"wheels/{W}") == good
    assert harness("bundle", "--check", b)[0] == 2   # still refused: the fix did not bless the swap
    # the swapped file offered through find-links instead: refused too, naming where it came from
    w.unlink()
    monkeypatch.setenv("UV_FIND_LINKS", str(other))
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 2 and W in err and str(other) in err, out + err
    assert _recorded(b, f"wheels/{W}") == good
    swapped.unlink()
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and _sha(w) == good, out + err
    assert harness("bundle", "--check", b)[0] == 0


# ------------------------------------------------------------------------------------------ the manifest

GOOD = "good-1.0-py3-none-any.whl"


def _crafted(root: Path) -> tuple[Path, dict]:
    """A small valid bundle made by hand: one wheel and its manifest (no variant needed for --check)."""
    b = root / "b"
    (b / "wheels").mkdir(parents=True)
    w = b / "wheels" / GOOD
    w.write_bytes(b"PK good wheel bytes")
    man = {"schema": 1, "variant": {"name": "tiny", "file": "tiny.toml", "sha256": "0" * 64},
           "target": {"python": "3.11", "arch": "x86_64", "glibc": "2.28", "where": "this machine"},
           "files": {f"wheels/{GOOD}": {"sha256": _sha(w), "size": w.stat().st_size, "url": "file:///x",
                                        "pin": "good==1.0"}},
           "pins": {}, "deps": {}, "missing": [], "resolved_key": None}
    (b / "manifest.json").write_text(json.dumps(man))
    return b, man


def _parses(name: str) -> bool:
    try:
        (parse_wheel_filename if name.endswith(".whl") else parse_sdist_filename)(name)
        return True
    except ValueError:
        return False


ODD = st.text(st.characters(blacklist_characters="/\x00\\", blacklist_categories=("Cs",)), min_size=1,
              max_size=30).filter(lambda n: n not in (".", "..") and not _parses(n) and len(n.encode()) < 200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["dotdot", "absolute", "link", "linked-folder", "odd"]),
       prefix=st.sampled_from(["", "wheels/", "sdist/", "wheels/./", "deps/x/"]), odd=ODD)
def test_hostile_manifest_entries_are_refused(harness, state, kind, prefix, odd):
    """Every entry points at a real file whose sha256 and size the manifest gives right (the old code accepted
    them all): a path with .., an absolute one, a link out of the bundle, a file whose name is no wheel or sdist
    name.  --check refuses each: exit 2, one message, no traceback."""
    root = Path(tempfile.mkdtemp(dir=state.parent))
    b, man = _crafted(root)
    target = root / "outside" / "evil-1.0-py3-none-any.whl"
    target.parent.mkdir()
    target.write_bytes(b"PK not in the bundle")
    if kind == "dotdot":
        (b / prefix).mkdir(parents=True, exist_ok=True)
        rel = prefix + os.path.relpath(target, b / prefix if prefix else b)
    elif kind == "absolute":
        rel = str(target)
    elif kind == "link":
        rel = f"wheels/{target.name}"
        (b / rel).symlink_to(target)
    elif kind == "linked-folder":
        shutil.rmtree(b / "wheels")
        (b / "wheels").symlink_to(target.parent)
        rel = f"wheels/{target.name}"
        del man["files"][f"wheels/{GOOD}"]
    else:
        rel = f"wheels/{odd}"
        target = b / rel
        target.write_bytes(b"odd")
    man["files"][rel] = {"sha256": _sha(target), "size": target.stat().st_size, "url": "", "pin": ""}
    (b / "manifest.json").write_text(json.dumps(man))
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and "Traceback" not in err and _errors(err) == 1, (kind, rel, out, err)
    assert "manifest" in err or "outside the bundle" in err, (kind, rel, err)
    shutil.rmtree(root)


def _malformed(man: dict, text: str) -> list[tuple[str, str | bytes]]:
    f = dict(man["files"])
    rel = next(iter(f))

    def m(**kw) -> str:
        return json.dumps({**man, **kw})
    return [
        ("truncated", text[: len(text) // 2]),
        ("not utf-8", b"\xff\xfe{" + os.urandom(8)),
        ("a list", "[]"),
        ("no schema", json.dumps({k: x for k, x in man.items() if k != "schema"})),
        ("no variant", json.dumps({k: x for k, x in man.items() if k != "variant"})),
        ("variant a string", m(variant="tiny")),
        ("target without python", m(target={"arch": "x86_64"})),
        ("files a list", m(files=[rel])),
        ("size as text", m(files={rel: {**f[rel], "size": str(f[rel]["size"])}})),
        ("size a bool", m(files={rel: {**f[rel], "size": True}})),
        ("sha256 a number", m(files={rel: {**f[rel], "sha256": 5}})),
        ("sha256 short", m(files={rel: {**f[rel], "sha256": "ab"}})),
        ("entry a string", m(files={rel: "x"})),
        ("missing a table", m(missing={"what": "x"})),
        ("missing without what", m(missing=[{"step": "torch"}])),
        ("deps dir out", m(deps={"cutlass": {"dir": "../../x"}})),
        ("deps entry a list", m(deps={"cutlass": ["x"]})),
        ("deep nesting", "[" * 100000 + "]" * 100000),
    ]


def test_malformed_manifests_are_one_message(harness, tmp_path, index):
    """Truncated JSON, bytes that are not text, and every key the harness reads with a wrong type: --check,
    a re-run of bundle and --from-bundle each say so in one message naming the manifest (exit 2)."""
    b, man = _crafted(tmp_path)
    text = (b / "manifest.json").read_text()
    v = _tiny(tmp_path, index)
    problems = []
    for name, content in _malformed(man, text):
        if isinstance(content, bytes):
            (b / "manifest.json").write_bytes(content)
        else:
            (b / "manifest.json").write_text(content)
        for argv in (("bundle", "--check", b), ("bundle", "--variant", v, "--out", b),
                     ("deps", "--variant", v, "--from-bundle", b)):
            try:
                rc, out, err = harness(*argv)
            except Exception as e:  # what the CLI let through: a traceback for the user
                problems.append(f"{name} {argv[1]}: {type(e).__name__}: {e}")
                continue
            if not (rc == 2 and str(b / "manifest.json") in err and _errors(err) == 1):
                problems.append(f"{name} {argv[1]}: rc {rc}: {err.strip()[:200]}")
    assert not problems, "\n".join(problems)
    assert not _venv().exists()


# ------------------------------------------------------------------------------------------ killed runs

def _kill_mid_way(gate, v, b) -> None:
    """Run `bundle` and SIGKILL it while the torch step's second download is held (tinysub's is done)."""
    gate.close("/files/torch-2.6.0", "vllm-harness")
    p = harness_process("bundle", "--variant", v, "--out", b)
    try:
        assert gate.reached.wait(120), p.communicate(timeout=5)
        kill_hard(p)
    finally:
        if p.poll() is None:
            kill_hard(p)
        gate.open()


def test_a_bundle_killed_mid_way_resumes_and_checks_what_it_finds(harness, tmp_path, gated_index):  # noqa: F811 - the fixture
    url, gate = gated_index
    v = _tiny(tmp_path, url)
    b = tmp_path / "b"
    _kill_mid_way(gate, v, b)
    sub = b / "wheels" / "tinysub-1.2-py3-none-any.whl"
    assert sub.is_file()
    # the bundle says it is incomplete until a run finishes it
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 1 and "INCOMPLETE" in out, out + err
    # run again: resumed, what it had is kept (not downloaded again)
    _Index.hits.clear()
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and "complete" in out, out + err
    assert not [h for h in _Index.hits if h.startswith("/files/tinysub-1.2")]
    assert harness("bundle", "--check", b)[0] == 0


def test_a_bundle_killed_before_its_manifest_resumes_from_the_files_there(harness, tmp_path, gated_index):  # noqa: F811 - the fixture
    """No manifest at all (killed before the first was written): the folder's wheels are used again, each
    checked against what was downloaded; one that differs is refused, naming it."""
    url, gate = gated_index
    v = _tiny(tmp_path, url)
    b = tmp_path / "b"
    _kill_mid_way(gate, v, b)
    (b / "manifest.json").unlink(missing_ok=True)
    sub = b / "wheels" / "tinysub-1.2-py3-none-any.whl"
    good = sub.read_bytes()
    sub.unlink()   # another wheel of that name (uv reads it as well), a new file: the cache's copy untouched
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(_wheel(other, "tinysub", "1.2", ("xtra",)), sub)
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 2 and sub.name in err and "Traceback" not in err, out + err
    sub.unlink()
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and "complete" in out and sub.read_bytes() == good, out + err
    assert harness("bundle", "--check", b)[0] == 0


def test_killing_bundle_ends_the_uv_pip_compile_it_started(harness, tmp_path, gated_index, monkeypatch):  # noqa: F811 - the fixture
    url, gate = gated_index
    monkeypatch.setenv("UV_NO_CACHE", "1")   # uv asks the index (not its own cache of the pages)
    v = _tiny(tmp_path, url)
    gate.close("/simple/", "uv/")   # uv's first request to the index is held: uv waits on it
    p = harness_process("bundle", "--variant", v, "--out", tmp_path / "b")
    uv = []
    try:
        assert gate.reached.wait(120), p.communicate(timeout=5)
        uv = [c for c in descendants(p.pid) if "compile" in cmdline(c)]
        assert uv, [cmdline(c) for c in descendants(p.pid)]
        kill_hard(p)
        assert all(wait_gone(c, 10) for c in uv), [cmdline(c) for c in uv if alive(c)]
    finally:
        if p.poll() is None:
            kill_hard(p)
        for c in uv:
            if alive(c):
                os.kill(c, 9)
        gate.open()
