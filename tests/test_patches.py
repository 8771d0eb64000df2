"""patches/: metadata, the four statuses, the shipped patch doing what it says, and the check of every
patch against every release it claims (network: PyPI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_pypi

from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.steps import patches, prepare

PATCH = """--- a/hello.txt
+++ b/hello.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""


def _patch_dir(tmp_path: Path, meta: str, patch: str = PATCH, name: str = "0001-hello") -> Path:
    d = tmp_path / "patches"
    d.mkdir(exist_ok=True)
    (d / f"{name}.patch").write_text(patch)
    (d / f"{name}.toml").write_text(meta)
    return d


META = 'versions = ">=1.0,<2"\nwhy = "two is shouted"\nupstream = "example/repo#1"\n'


def _tree(tmp_path: Path, text: str = "one\ntwo\nthree\n") -> Path:
    src = tmp_path / "tree"
    src.mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_text(text)
    return src


@pytest.mark.parametrize("meta,key", [
    ('why = "x"\nupstream = "y"\n', "versions"),
    ('versions = "1.0"\nwhy = "x"\nupstream = "y"\n', "versions"),
    ('versions = ">=1"\nupstream = "y"\n', "why"),
    ('versions = ">=1"\nwhy = "x"\n', "upstream"),
    (META + 'patch = "missing.patch"\n', "patch"),
    (META + "needed_if = 3\n", "needed_if"),
    (META + 'colour = "red"\n', "colour"),
])
def test_bad_metadata_names_the_file_and_key(tmp_path, meta, key):
    d = _patch_dir(tmp_path, meta)
    with pytest.raises(UsageError) as e:
        patches.load_patches(d)
    assert "0001-hello.toml" in str(e.value) and f"'{key}'" in str(e.value)


def test_statuses_applied_already_not_needed_failed(tmp_path):
    env = dict(os.environ)
    p = patches.load_patches(_patch_dir(tmp_path, META))[0]
    src = _tree(tmp_path)
    assert patches.status(p, src, "1.5", env)["status"] == "applied"
    assert (src / "hello.txt").read_text() == "one\nTWO\nthree\n"
    assert patches.status(p, src, "1.5", env)["status"] == "already-applied"
    st = patches.status(p, _tree(tmp_path / "b"), "2.0", env)
    assert st["status"] == "not-needed" and "outside" in st["reason"]
    bad = _tree(tmp_path / "c", "one\nzwei\nthree\n")
    st = patches.status(p, bad, "1.5", env)
    assert st["status"] == "failed" and "@@ -1,3 +1,3 @@" in st["hunk"] and "-two" in st["hunk"]
    assert (bad / "hello.txt").read_text() == "one\nzwei\nthree\n"  # untouched


def test_needed_if_marker_and_a_repository_around_the_tree(tmp_path):
    env = dict(os.environ)
    d = _patch_dir(tmp_path, META + 'needed_if = { file = "hello.txt", contains = "two" }\n')
    p = patches.load_patches(d)[0]
    outer = tmp_path / "outer"
    outer.mkdir()
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    src = _tree(outer)  # a tree inside someone's repository: the patch applies to the tree, not the repo
    assert patches.status(p, src, None, env)["status"] == "applied"
    assert patches.status(p, src, None, env)["status"] == "already-applied"  # marker gone, reverse applies
    other = _tree(tmp_path / "o", "one\nthree\n")
    assert patches.status(p, other, "1.1", env)["status"] == "not-needed"


def test_prepare_reports_a_failed_patch_with_its_hunk(tmp_path):
    d = _patch_dir(tmp_path, META)
    src = _tree(tmp_path, "one\nzwei\nthree\n")
    (src / "PKG-INFO").write_text("Version: 1.2\n")
    log = tmp_path / "p.log"
    with pytest.raises(StepFailed) as e:
        prepare.prepare(src, Path(sys.executable), log, dict(os.environ), patches_dir=d)
    assert "0001-hello" in e.value.message and "1.2" in e.value.message
    assert e.value.result["patches"][0]["status"] == "failed"
    assert "-two" in log.read_text()


SHIPPED = sorted((ROOT / "patches").glob("*.toml"))


def test_shipped_patches_have_metadata_and_an_upstream_reference():
    ps = patches.load_patches(ROOT / "patches")
    assert len(ps) == len(SHIPPED) >= 1
    for p in ps:
        assert p.why and p.upstream and p.files and str(p.versions)


def test_shipped_use_existing_torch_patch_keeps_unrelated_lines(tmp_path):
    """The fixture's use_existing_torch.py is vLLM 0.8's: patched, it strips only torch/xformers pins."""
    src = tmp_path / "v"
    src.mkdir()
    shutil.copy(ROOT / "tests/fixtures/vllm-mini/use_existing_torch.py", src)
    (src / "requirements").mkdir()
    (src / "requirements" / "cuda.txt").write_text(
        "torch==2.6.0\ntorchvision==0.21.0 # phi3v\nxformers==0.0.29.post2 # Requires PyTorch 2.6.0\n")
    (src / "requirements" / "common.txt").write_text(
        "outlines == 0.1.11 # Requires pytorch\ntriton==3.2.0 # imported in torch.compile\nopen_clip_torch==2.32.0\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = [\n  "torch == 2.6.0",\n]\n[tool.uv]\n'
                                        'no-build-isolation-package = ["torch"]\n')
    res = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ), version="0.8.5",
                          patches_dir=ROOT / "patches")
    assert {p["name"]: p["status"] for p in res["patches"]}["0001-use-existing-torch-exact-match"] == "applied"
    assert (src / "requirements" / "cuda.txt").read_text() == ""
    common = (src / "requirements" / "common.txt").read_text()
    assert "outlines" in common and "triton" in common and "open_clip_torch" in common
    assert "no-build-isolation-package" in (src / "pyproject.toml").read_text()
    again = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ), version="0.8.5",
                            patches_dir=ROOT / "patches")
    assert again["changed"] == []
    assert {p["name"]: p["status"] for p in again["patches"]}["0001-use-existing-torch-exact-match"] == "already-applied"


@pytest.mark.network
def test_every_patch_against_every_release_it_claims(tmp_path):
    needs_pypi()
    cache = Path(os.environ.get("VLLM_HARNESS_TEST_PATCH_CHECK", "/tmp/vllm-harness-test-patch-check"))
    res = patches.check_releases(patches.load_patches(ROOT / "patches"), cache, dict(os.environ), log=lambda s: None)
    assert res["ok"], res["failed"]
    assert res["releases_checked"] >= 30
    applied = [r for r in res["results"] if r["status"] == "applied"]
    assert applied and all(r["second_run"] == "already-applied" for r in applied)
    # 0.10.2's script only prints a uv hint: claimed by the range, not needed there (the marker says so)
    assert {r["version"] for r in res["claims_too_much"]} <= {"0.10.2"}


def test_patches_cli_on_a_tree(harness, tmp_path):
    src = tmp_path / "v"
    src.mkdir()
    shutil.copy(ROOT / "tests/fixtures/vllm-mini/use_existing_torch.py", src)
    rc, out, err = harness("patches", "--source", src, "--version", "0.8.5")
    assert rc == 0, err
    assert "0001-use-existing-torch-exact-match" in out and "applies (dry run)" in out
    assert "'torch' not in line.lower()" in (src / "use_existing_torch.py").read_text()  # a dry run
