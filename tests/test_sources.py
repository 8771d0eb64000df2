"""Real vLLM sources: fetch (PyPI sdist, git clone cache, local sdist, path), --source, prepare on every
layout, offline FetchContent deps, git trust through the environment only.

Offline tests use a fake PyPI (file:// URLs) and local git repositories; tests marked ``network`` fetch and
prepare real sdists from PyPI (0.6.6.post1, 0.8.5, 0.11.0, 0.20.2) and skip with the reason when PyPI is
unreachable.  Tests that need github.com skip with that reason (it is unreachable from the dev machine).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import needs_pypi, status_of

from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.steps import deps_cache, fetch, prepare

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def git(*args, cwd=None, env=None):
    e = {**os.environ, **GIT_ENV, **(env or {})}
    r = subprocess.run(["git", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def variant_file(tmp_path: Path, name: str, vllm: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'description = "test"\ncuda = "12.4"\npython = ">=3.10"\n[torch]\nversion = "2.6.0"\n'
                 f'packages = ["torch==2.6.0"]\n[vllm]\nmode = "source"\n{vllm}\n')
    return p


def sdist_bytes(version: str, torch: str = "2.6.0") -> bytes:
    buf = io.BytesIO()
    files = {"PKG-INFO": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nRequires-Dist: torch=={torch}\n",
             "requirements/build.txt": f"cmake>=3.26\ntorch=={torch}\n",
             "requirements/cuda.txt": f"-r common.txt\ntorch=={torch}\nxformers==0.0.29.post2 # Requires PyTorch\n",
             "requirements/common.txt": "outlines == 0.1.11 # Requires pytorch\n",
             "pyproject.toml": f'[build-system]\nrequires = ["cmake>=3.26", "torch == {torch}"]\n',
             "CMakeLists.txt": f'set(TORCH_SUPPORTED_VERSION_CUDA "{torch}")\n'}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"vllm-{version}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A PyPI with vllm 9.9.9 (simple index only: the JSON API answers nothing, as through some proxies), served
    on 127.0.0.1 (the harness reads http/https only: issue 26)."""
    root = tmp_path / "pypi"
    (root / "simple" / "vllm").mkdir(parents=True)
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda self, *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    data = sdist_bytes("9.9.9")
    (root / "vllm-9.9.9.tar.gz").write_bytes(data)
    index = {"meta": {"api-version": "1.1"}, "name": "vllm", "versions": ["9.9.9"],
             "files": [{"filename": "vllm-9.9.9.tar.gz", "url": f"{base}/vllm-9.9.9.tar.gz",
                        "hashes": {"sha256": hashlib.sha256(data).hexdigest()}}]}
    (root / "simple" / "vllm" / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(fetch, "PYPI_JSON", base + "/json-api-missing/{name}-{version}.json")
    monkeypatch.setattr(fetch, "PYPI_SIMPLE", base + "/simple/{name}/index.json")
    yield root
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------- --source

@pytest.mark.parametrize("text,want", [
    ("sdist", {"source": "pypi-sdist"}),
    ("sdist:0.8.5", {"source": "pypi-sdist", "version": "0.8.5"}),
    ("https://github.com/vllm-project/vllm.git@v0.8.5",
     {"source": "git", "git": "https://github.com/vllm-project/vllm.git", "ref": "v0.8.5"}),
    ("git+https://github.com/vllm-project/vllm.git@releases/v0.9",
     {"source": "git", "git": "https://github.com/vllm-project/vllm.git", "ref": "releases/v0.9"}),
    ("git@github.com:vllm-project/vllm.git@main", {"source": "git", "git": "git@github.com:vllm-project/vllm.git",
                                                   "ref": "main"}),
    ("https://user@example.com/vllm.git", {"source": "git", "git": "https://user@example.com/vllm.git", "ref": None}),
])
def test_source_override_forms(text, want):
    assert fetch.parse_source(text) == want


def test_source_override_paths_and_errors(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "vllm-1.0.tar.gz").write_bytes(sdist_bytes("1.0"))
    assert fetch.parse_source(str(tmp_path / "tree"))["source"] == "path"
    assert fetch.parse_source(str(tmp_path / "vllm-1.0.tar.gz"))["source"] == "sdist-file"
    with pytest.raises(UsageError) as e:
        fetch.parse_source(str(tmp_path / "nope"))
    assert "git URL" in str(e.value) and "Fix:" in str(e.value)


# ------------------------------------------------------------------------------------------ sdists

def test_sdist_is_hash_checked_cached_and_reused_offline(harness, state, tmp_path, fake_pypi, monkeypatch):
    v = variant_file(tmp_path, "sd", 'version = "9.9.9"\nsource = "pypi-sdist"')
    rc, out, err = harness("fetch", "--variant", v, "--json")
    assert rc == 0, err
    res = json.loads(out)
    prov = res["provenance"]
    assert prov["from"] == "pypi-sdist" and prov["verified"] and not prov["from_cache"]
    assert prov["sha256"] == hashlib.sha256((fake_pypi / "vllm-9.9.9.tar.gz").read_bytes()).hexdigest()
    assert (state / "cache" / "sdist" / "vllm-9.9.9.tar.gz.sha256").is_file()
    assert json.loads((state / "src" / "sd" / "provenance.json").read_text())["sha256"] == prov["sha256"]
    # PyPI gone: the verified cached sdist is used without it
    monkeypatch.setattr(fetch, "PYPI_JSON", "http://127.0.0.1:9/pypi/{name}/{version}/json")
    monkeypatch.setattr(fetch, "PYPI_SIMPLE", "http://127.0.0.1:9/simple/{name}/")
    rc, out, err = harness("fetch", "--variant", v, "--force", "--json")
    assert rc == 0, err
    prov = json.loads(out)["provenance"]
    assert prov["from_cache"] and prov["verified"]
    assert status_of(state, "sd")["steps"]["fetch"]["status"] == "ok"


def test_sdist_hash_mismatch_is_refused(harness, tmp_path, fake_pypi):
    idx = fake_pypi / "simple" / "vllm" / "index.json"
    data = json.loads(idx.read_text())
    data["files"][0]["hashes"]["sha256"] = "0" * 64
    idx.write_text(json.dumps(data))
    rc, out, err = harness("fetch", "--variant", variant_file(tmp_path, "bad", 'version = "9.9.9"'))
    assert rc == 1 and "sha256" in err and "PyPI says 0000" in err


def test_unreachable_pypi_says_what_and_how_to_supply_it_offline(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "PYPI_JSON", "http://127.0.0.1:9/pypi/{name}/{version}/json")
    monkeypatch.setattr(fetch, "PYPI_SIMPLE", "http://127.0.0.1:9/simple/{name}/")
    rc, out, err = harness("fetch", "--variant", variant_file(tmp_path, "off", 'version = "0.8.5"'))
    assert rc == 1
    assert err.count("error:") == 1 and "cannot reach PyPI for vllm 0.8.5" in err
    assert "pip download vllm==0.8.5 --no-deps --no-binary :all:" in err and "--source" in err


def test_hand_placed_sdist_is_used_when_pypi_is_unreachable(harness, state, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "PYPI_JSON", "http://127.0.0.1:9/{name}/{version}")
    monkeypatch.setattr(fetch, "PYPI_SIMPLE", "http://127.0.0.1:9/simple/{name}/")
    Layout.default().ensure()  # the user copies the sdist into the state folder the harness made
    (state / "cache" / "sdist").mkdir(parents=True)
    (state / "cache" / "sdist" / "vllm-7.0.0.tar.gz").write_bytes(sdist_bytes("7.0.0"))
    rc, out, err = harness("fetch", "--variant", variant_file(tmp_path, "hand", 'version = "7.0.0"'), "--json")
    assert rc == 0, err
    prov = json.loads(out)["provenance"]
    assert prov["verified"] is False and "not checked against PyPI" in prov["note"]


def test_local_sdist_archive_as_source(harness, state, tmp_path):
    arch = tmp_path / "vllm-3.1.4.tar.gz"
    arch.write_bytes(sdist_bytes("3.1.4"))
    v = variant_file(tmp_path, "arch", 'version = "3.1.4"')
    rc, out, err = harness("fetch", "--variant", v, "--source", arch, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["provenance"]["from"] == "sdist-file"
    assert (Path(res["source"]) / "PKG-INFO").is_file()


# --------------------------------------------------------------------------------------------- git

@pytest.fixture
def origin(tmp_path):
    """A bare repository with a tag v9.9.9 and a branch dev, like vLLM's."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "requirements").mkdir()
    (work / "requirements" / "build.txt").write_text("torch==2.6.0\n")
    (work / "CMakeLists.txt").write_text('set(TORCH_SUPPORTED_VERSION_CUDA "2.6.0")\n')
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "release", cwd=work)
    git("tag", "-a", "v9.9.9", "-m", "v9.9.9", cwd=work)
    git("checkout", "-q", "-b", "dev", cwd=work)
    (work / "dev.txt").write_text("dev\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "dev", cwd=work)
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", work, bare)
    return bare


def test_git_ref_goes_through_the_clone_cache_and_works_offline(harness, state, tmp_path, origin):
    url = origin.as_uri()
    v = variant_file(tmp_path, "g", f'version = "9.9.9"\nsource = "git"\ngit = "{url}"\nref = "v9.9.9"')
    rc, out, err = harness("fetch", "--variant", v, "--json")
    assert rc == 0, err
    res = json.loads(out)
    prov = res["provenance"]
    assert prov["from"] == "git" and prov["kind"] == "tag" and len(prov["commit"]) == 40
    assert Path(prov["cache"]).parent == state / "cache" / "git"
    src = Path(res["source"])
    assert prepare.vllm_version(src, env=dict(os.environ)) == ("9.9.9", "git describe (v9.9.9)")
    # the remote disappears: the tag is in the cache, fetch again works offline
    shutil.rmtree(origin)
    rc, out, err = harness("fetch", "--variant", v, "--force", "--json")
    assert rc == 0, err
    prov2 = json.loads(out)["provenance"]
    assert prov2["from_cache"] and prov2["commit"] == prov["commit"]


def test_git_branch_falls_back_to_the_cache_and_unknown_refs_say_so(harness, tmp_path, origin):
    url = origin.as_uri()
    v = variant_file(tmp_path, "b", 'version = "9.9.9"')
    rc, out, err = harness("fetch", "--variant", v, "--source", f"{url}@dev", "--json")
    assert rc == 0, err
    assert json.loads(out)["provenance"]["kind"] == "branch"
    rc, out, err = harness("fetch", "--variant", v, "--source", f"{url}@no-such-ref")
    assert rc == 2 and "no-such-ref" in err
    moved = origin.with_name("moved.git")
    origin.rename(moved)
    rc, out, err = harness("fetch", "--variant", v, "--source", f"{url}@dev", "--force", "--json")
    assert rc == 0, err
    assert "unreachable" in json.loads(out)["provenance"]["note"]
    rc, out, err = harness("fetch", "--variant", v, "--source", f"{url}@v1.0.0")
    assert rc == 1 and err.count("error:") == 1 and "cannot reach" in err and "offline" in err


def test_path_source_is_copied_with_its_commit(harness, tmp_path, origin):
    tree = tmp_path / "checkout"
    git("clone", "-q", origin, tree)
    (tree / "build").mkdir()
    (tree / "build" / "junk.o").write_text("x")
    v = variant_file(tmp_path, "p", f'version = "9.9.9"\nsource = "path"\npath = "{tree}"')
    rc, out, err = harness("fetch", "--variant", v, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["provenance"]["git_commit"] == git("rev-parse", "HEAD", cwd=tree)
    assert res["provenance"]["git_dirty"] is False
    assert not (Path(res["source"]) / "build").exists() and (Path(res["source"]) / "CMakeLists.txt").is_file()


# ---------------------------------------------------------------------------------- git trust (env)

CMAKE = """
set(CUTLASS_REVISION "v3.9.0" CACHE STRING "CUTLASS revision to use")
if (DEFINED ENV{VLLM_CUTLASS_SRC_DIR})
  set(VLLM_CUTLASS_SRC_DIR $ENV{VLLM_CUTLASS_SRC_DIR})
endif()
if(VLLM_CUTLASS_SRC_DIR)
  FetchContent_Declare(cutlass SOURCE_DIR ${VLLM_CUTLASS_SRC_DIR})
else()
  FetchContent_Declare(
      cutlass
      GIT_REPOSITORY https://github.com/nvidia/cutlass.git
      # Please keep this in sync with CUTLASS_REVISION line above.
      GIT_TAG ${CUTLASS_REVISION}
      GIT_SHALLOW TRUE
  )
endif()
FetchContent_MakeAvailable(cutlass)
"""


def test_git_env_trusts_each_fetchcontent_checkout_never_star(tmp_path):
    tree = tmp_path / "vllm"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text(CMAKE)
    (tree / ".deps" / "oldlib-src").mkdir(parents=True)
    env = fetch.git_env({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.x", "GIT_CONFIG_VALUE_0": "1"}, [tree])
    values = [env[f"GIT_CONFIG_VALUE_{i}"] for i in range(1, int(env["GIT_CONFIG_COUNT"]))]
    assert env["GIT_CONFIG_KEY_0"] == "core.x"  # the caller's own entries are kept
    assert str(tree) in values and str(tree / ".deps" / "cutlass-src") in values  # declared, not yet made
    assert str(tree / ".deps" / "oldlib-src") in values  # left by an earlier build
    assert "*" not in values and all(env[f"GIT_CONFIG_KEY_{i}"] == "safe.directory" for i in range(1, len(values) + 1))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a repository owned by another uid")
def test_dubious_ownership_of_deps_checkout_is_solved_through_the_env_only(tmp_path):
    tree = tmp_path / "vllm"
    dep = tree / ".deps" / "cutlass-src"
    dep.mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text(CMAKE)
    git("init", "-q", cwd=dep)
    git("commit", "-q", "--allow-empty", "-m", "x", cwd=dep)
    for dirpath, dirs, files in os.walk(tree):
        for n in dirs + files:
            os.lchown(os.path.join(dirpath, n), 1234, 1234)
    os.lchown(tree, 1234, 1234)
    home = tmp_path / "home"
    home.mkdir()
    base = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1"}
    plain = subprocess.run(["git", "-C", str(dep), "rev-parse", "HEAD"], env=base, capture_output=True, text=True)
    assert plain.returncode == 128 and "dubious ownership" in plain.stderr
    trusted = subprocess.run(["git", "-C", str(dep), "rev-parse", "HEAD"], env=fetch.git_env(base, [tree]),
                             capture_output=True, text=True)
    assert trusted.returncode == 0, trusted.stderr
    assert not (home / ".gitconfig").exists()  # nothing global was written


# ------------------------------------------------------------------------------------ offline deps

SYNTH = """
include(FetchContent)
set(FLASH_REV "REVPLACEHOLDER")
if (DEFINED ENV{VLLM_FLASH_ATTN_SRC_DIR})
  set(VLLM_FLASH_ATTN_SRC_DIR $ENV{VLLM_FLASH_ATTN_SRC_DIR})
endif()
if(VLLM_FLASH_ATTN_SRC_DIR)
  FetchContent_Declare(vllm-flash-attn SOURCE_DIR ${VLLM_FLASH_ATTN_SRC_DIR})
else()
  FetchContent_Declare(vllm-flash-attn GIT_REPOSITORY https://github.com/vllm-project/flash-attention.git
                       GIT_TAG ${FLASH_REV} GIT_PROGRESS TRUE)
endif()
FetchContent_Declare(oneDNN GIT_REPOSITORY https://github.com/oneapi-src/oneDNN.git GIT_TAG v3.7.1)
if (DEFINED ENV{TRITON_KERNELS_SRC_DIR})
  FetchContent_Declare(triton_kernels SOURCE_DIR $ENV{TRITON_KERNELS_SRC_DIR})
else()
  FetchContent_Declare(triton_kernels GIT_REPOSITORY https://github.com/triton-lang/triton.git GIT_TAG v3.6.0
                       SOURCE_SUBDIR python/triton_kernels/triton_kernels)
endif()
"""


def _repo_with(path: Path, files: dict[str, str], tag: str | None = None) -> str:
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "c", cwd=path)
    if tag:
        git("tag", tag, cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


@pytest.fixture
def fake_github(tmp_path):
    """Local repositories standing in for github.com, reached through url.<local>.insteadOf in the env."""
    gh = tmp_path / "gh"
    sub_sha = _repo_with(gh / "cutlass-sub", {"include/cutlass/cutlass.h": "// cutlass\n"})
    fa = gh / "flash-attention"
    fa_sha = _repo_with(fa, {"CMakeLists.txt": "# fa\n"})
    git("-c", "protocol.file.allow=always", "submodule", "add", "-q", (gh / "cutlass-sub").as_uri(), "csrc/cutlass",
        cwd=fa)
    git("commit", "-q", "-m", "sub", cwd=fa)
    fa_sha = git("rev-parse", "HEAD", cwd=fa)
    _repo_with(gh / "oneDNN", {"README": "onednn\n"}, tag="v3.7.1")
    _repo_with(gh / "triton", {"python/triton_kernels/triton_kernels/__init__.py": ""}, tag="v3.6.0")
    pairs = {"https://github.com/vllm-project/flash-attention.git": fa, "https://github.com/oneapi-src/oneDNN.git":
             gh / "oneDNN", "https://github.com/triton-lang/triton.git": gh / "triton"}
    env = {**os.environ, "GIT_ALLOW_PROTOCOL": "file:https", "GIT_CONFIG_COUNT": str(len(pairs) + 1),
           "GIT_CONFIG_KEY_0": "protocol.file.allow", "GIT_CONFIG_VALUE_0": "always"}
    for i, (url, path) in enumerate(pairs.items(), 1):
        env[f"GIT_CONFIG_KEY_{i}"] = f"url.{path.as_uri()}.insteadOf"
        env[f"GIT_CONFIG_VALUE_{i}"] = url
    return {"env": env, "fa_sha": fa_sha, "sub_sha": sub_sha}


def _tree(tmp_path: Path, fa_sha: str, cmake_args: bool) -> Path:
    tree = tmp_path / "vllm"
    (tree / "cmake" / "external_projects").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text(CMAKE)
    (tree / "cmake" / "external_projects" / "deps.cmake").write_text(SYNTH.replace("REVPLACEHOLDER", fa_sha))
    (tree / "setup.py").write_text("import os\nos.environ.get('CMAKE_ARGS')\n" if cmake_args else "print()\n")
    return tree


def test_deps_are_parsed_with_their_pins_and_overrides(tmp_path):
    tree = _tree(tmp_path, "a" * 40, cmake_args=True)
    deps = {d.name: d for d in deps_cache.parse_deps(tree)}
    assert deps["cutlass"].rev == "v3.9.0" and deps["cutlass"].env_override == "VLLM_CUTLASS_SRC_DIR"
    assert deps["vllm-flash-attn"].rev == "a" * 40 and deps["vllm-flash-attn"].env_override == "VLLM_FLASH_ATTN_SRC_DIR"
    assert deps["oneDNN"].env_override is None and deps["oneDNN"].rev == "v3.7.1"
    assert deps["triton_kernels"].subdir == "python/triton_kernels/triton_kernels"
    assert deps["triton_kernels"].env_override == "TRITON_KERNELS_SRC_DIR"


def test_deps_cache_fill_build_env_and_copy_to_another_machine(tmp_path, fake_github, state):
    tree = _tree(tmp_path, fake_github["fa_sha"], cmake_args=False)
    root = tmp_path / "cache" / "deps"
    env = fake_github["env"]
    # cutlass points at github.com (no local stand-in): it alone cannot be fetched here
    with pytest.raises(StepFailed) as e:
        deps_cache.fill(tree, root, env, device="cuda")
    assert "cannot reach https://github.com/nvidia/cutlass.git" in e.value.message and "--deps" in e.value.fix
    (tree / "CMakeLists.txt").write_text("")  # leave the others
    res = deps_cache.fill(tree, root, env, device="cuda", every=True)
    assert set(res["fetched"]) == {f"vllm-flash-attn@{fake_github['fa_sha']}", "oneDNN@v3.7.1", "triton_kernels@v3.6.0"}
    fa_dir = root / json.loads((root / "manifest.json").read_text())[f"vllm-flash-attn@{fake_github['fa_sha']}"]["dir"]
    assert (fa_dir / "csrc" / "cutlass" / "include" / "cutlass" / "cutlass.h").is_file()  # submodules too
    assert deps_cache.fill(tree, root, env, every=True)["fetched"] == []  # once only
    # copy the cache to "another machine" and point the build at it
    other = tmp_path / "elsewhere" / "deps"
    shutil.copytree(root, other)
    shutil.rmtree(root)
    plan = deps_cache.build_env(tree, other, tmp_path / "work", {}, device="cuda")
    assert plan["env"]["VLLM_FLASH_ATTN_SRC_DIR"] == str(other / fa_dir.name)
    assert plan["env"]["TRITON_KERNELS_SRC_DIR"].endswith("python/triton_kernels/triton_kernels")
    # oneDNN has no environment override in this tree: CMake gets it through FETCHCONTENT_SOURCE_DIR_ONEDNN
    assert plan["missing"] == [] and "oneDNN" in plan["from_cache"]
    assert "CMAKE_TOOLCHAIN_FILE" in plan["env"]  # this setup.py does not pass CMAKE_ARGS on
    tc = Path(plan["env"]["CMAKE_TOOLCHAIN_FILE"]).read_text()
    assert f'set(FETCHCONTENT_SOURCE_DIR_ONEDNN "{other}' in tc
    (tree / "setup.py").write_text("CMAKE_ARGS\n")
    plan = deps_cache.build_env(tree, other, tmp_path / "work", {"CMAKE_ARGS": "-DX=1"}, device="cuda")
    assert plan["env"]["CMAKE_ARGS"].startswith("-DX=1 -DFETCHCONTENT_SOURCE_DIR_ONEDNN=")


# ---------------------------------------------------------------------- prepare on synthetic layouts

def _layout_06(tmp_path: Path) -> Path:
    src = tmp_path / "v06"
    src.mkdir()
    (src / "requirements-build.txt").write_text("cmake>=3.26\ntorch==2.5.1\n")
    (src / "requirements-cuda.txt").write_text("-r requirements-common.txt\ntorch == 2.5.1\n"
                                               "torchvision == 0.20.1 # phi3v\nxformers == 0.0.28.post3 # torch 2.5.1\n")
    (src / "requirements-common.txt").write_text("outlines == 0.1.11 # Requires pytorch\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["cmake>=3.26", "torch == 2.5.1"]\n')
    (src / "PKG-INFO").write_text("Version: 0.6.6\n")
    return src


def test_prepare_without_script_strips_pins_keeps_the_rest_and_is_idempotent(tmp_path):
    src = _layout_06(tmp_path)
    res = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))
    assert res["how"] == "harness-equivalent" and res["vllm_version"] == "0.6.6" and res["torch_pin"] == "2.5.1"
    assert {c["file"] for c in res["changed"]} == {"requirements-build.txt", "requirements-cuda.txt", "pyproject.toml"}
    assert "outlines" in (src / "requirements-common.txt").read_text()
    assert "xformers" not in (src / "requirements-cuda.txt").read_text()
    again = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))
    assert again["changed"] == []


def test_prepare_refuses_a_requirement_link_pointing_outside_the_tree(tmp_path):
    src = _layout_06(tmp_path)
    outside = tmp_path / "users-own-requirements.txt"
    outside.write_text("torch == 2.5.1\nnumpy\n")
    (src / "requirements-cuda.txt").unlink()
    (src / "requirements-cuda.txt").symlink_to(outside)
    before = {f: f.read_bytes() for f in src.iterdir() if f.is_file()}
    with pytest.raises(StepFailed) as e:
        prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))
    assert "requirements-cuda.txt" in str(e.value) and str(outside) in str(e.value) and "copy" in e.value.fix
    assert outside.read_text() == "torch == 2.5.1\nnumpy\n"          # the file outside was not touched
    assert {f: f.read_bytes() for f in src.iterdir() if f.is_file()} == before  # nor the tree
    # a link inside the tree is fine
    (src / "requirements-cuda.txt").unlink()
    (src / "requirements-cuda-real.txt").write_text("torch == 2.5.1\n")
    (src / "requirements-cuda.txt").symlink_to(src / "requirements-cuda-real.txt")
    res = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))
    assert prepare.torch_pins(src) == [] and res["torch_pin"] == "2.5.1"


def test_prepare_runs_a_tools_script_with_prefix_and_finishes_its_job(tmp_path):
    src = tmp_path / "v31"
    (src / "tools").mkdir(parents=True)
    (src / "requirements" / "build").mkdir(parents=True)
    (src / "requirements" / "build" / "cuda.txt").write_text("torch==2.13.0\nninja\n")
    (src / "requirements" / "cuda.txt").write_text("torch==2.13.0\ntorchaudio >= 2.11\n")
    (src / "tools" / "use_existing_torch.py").write_text(
        "import argparse, glob\np = argparse.ArgumentParser(); p.add_argument('--prefix', action='store_true')\n"
        "a = p.parse_args()\nassert a.prefix\nfor f in glob.glob('requirements/**/*.txt', recursive=True):\n"
        "    lines = open(f).readlines()\n"
        "    open(f, 'w').writelines(x for x in lines if not x.startswith('torch='))\n")
    res = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ), version="0.31.0")
    assert res["how"] == "tools/use_existing_torch.py --prefix"
    assert prepare.torch_pins(src) == []  # 'torchaudio >= 2.11' was left by --prefix: the harness removed it
    assert res["vllm_version"] == "0.31.0" and "variant" in res["version_from"]


def test_prepare_cli_json_contract(harness, tmp_path):
    src = _layout_06(tmp_path)
    v = variant_file(tmp_path, "cj", 'version = "0.6.6"')
    rc, out, err = harness("prepare", "--variant", v, "--source", src, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert {"source", "vllm_version", "changed", "patches"} <= set(res)
    assert all({"file", "what"} <= set(c) for c in res["changed"])
    assert all(p["status"] in ("applied", "already-applied", "not-needed", "failed") for p in res["patches"])
    rc, out, err = harness("prepare", "--variant", v, "--source", src, "--json")
    assert json.loads(out)["changed"] == [] and json.loads(out)["note"].endswith("nothing to change")


# --------------------------------------------------------------------------- real sdists (network)

REAL = {
    "0.6.6.post1": {"how": "use_existing_torch.py", "pin": "2.5.1", "patch": "0001-use-existing-torch-exact-match",
                    "kept": {"requirements-common.txt": ["outlines == 0.1.11", "compressed-tensors == 0.8.1"]},
                    "gone": {"requirements-cuda.txt": ["xformers"]}, "cutlass": "8aa95dbb888be6d81c6fbf7169718c5244b53227"},
    "0.8.5": {"how": "use_existing_torch.py", "pin": "2.6.0", "patch": "0001-use-existing-torch-exact-match",
              "kept": {"requirements/test.in": ["vector_quantize_pytorch"]}, "gone": {"requirements/cuda.txt": ["xformers"]},
              "cutlass": "v3.9.0"},
    "0.11.0": {"how": "use_existing_torch.py", "pin": "2.8.0", "patch": "0001-use-existing-torch-exact-match",
               "kept": {"requirements/cpu.txt": ["triton==3.2.0", "intel_extension_for_pytorch"],
                        "pyproject.toml": ["no-build-isolation-package"]}, "gone": {}, "cutlass": "v4.0.0"},
    "0.20.2": {"how": "use_existing_torch.py --prefix", "pin": "2.11.0", "patch": None,
               "kept": {"requirements/test/cuda.in": ["open_clip_torch"]}, "gone": {}, "cutlass": "v4.4.2"},
}


@functools.cache
def _sdist_cache() -> Path:
    return Path(os.environ.get("VLLM_HARNESS_TEST_SDISTS", "/tmp/vllm-harness-test-sdists"))


@pytest.mark.network
@pytest.mark.parametrize("version", list(REAL))
def test_real_sdist_fetch_and_prepare(version, harness, state, tmp_path):
    needs_pypi()
    want = REAL[version]
    # keep downloads between runs: seed the state's sdist cache from a shared folder (hash-checked on use)
    shared = _sdist_cache()
    shared.mkdir(parents=True, exist_ok=True)
    Layout.default().ensure()
    (state / "cache").mkdir(parents=True, exist_ok=True)
    if not (state / "cache" / "sdist").exists():
        (state / "cache" / "sdist").symlink_to(shared)
    v = variant_file(tmp_path, "real", f'version = "{version}"')
    rc, out, err = harness("fetch", "--variant", v, "--json")
    assert rc == 0, err
    fetched = json.loads(out)
    assert fetched["provenance"]["verified"] is True
    src = Path(fetched["source"])
    rc, out, err = harness("prepare", "--variant", v, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["vllm_version"] == version and res["version_from"] == "PKG-INFO"
    assert res["how"] == want["how"] and res["torch_pin"] == want["pin"]
    assert prepare.torch_pins(src) == []
    assert "torch" not in prepare.build_system_requires(src)
    statuses = {p["name"]: p["status"] for p in res["patches"]}
    for name, st in statuses.items():
        assert st == ("applied" if name == want["patch"] else "not-needed"), (name, st)
    for rel, needles in want["kept"].items():
        text = (src / rel).read_text()
        assert all(n in text for n in needles), (rel, needles)
    for rel, needles in want["gone"].items():
        lines = [x for x in (src / rel).read_text().splitlines() if not x.lstrip().startswith("#")]
        assert not any(n in x for n in needles for x in lines), (rel, needles)
    deps = {d.name: d for d in deps_cache.parse_deps(src)}
    assert deps["cutlass"].rev == want["cutlass"] and deps["vllm-flash-attn"].url.endswith("flash-attention.git")
    # the second prepare changes nothing and says so
    rc, out, err = harness("prepare", "--variant", v, "--force", "--json")
    again = json.loads(out)
    assert again["changed"] == [] and "nothing to change" in again["note"]
    assert all(p["status"] in ("already-applied", "not-needed") for p in again["patches"])


@functools.cache
def github_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://github.com", timeout=10):
            return True
    except Exception:
        return False


@pytest.mark.network
def test_fetch_deps_from_github(tmp_path):
    """`invoke fetch --deps` for real: CUTLASS of vLLM 0.8.5 (needs github.com)."""
    if not github_reachable():
        pytest.skip("needs github.com (unreachable from this machine)")
    tree = tmp_path / "v"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text(CMAKE)
    root = tmp_path / "deps"
    res = deps_cache.fill(tree, root, dict(os.environ))
    assert res["fetched"] == ["cutlass@v3.9.0"]
    assert (root / "cutlass-v3.9.0" / "include" / "cutlass" / "cutlass.h").is_file()



def _cmake_ok() -> bool:
    cm = shutil.which("cmake")
    if not cm:
        return False
    out = subprocess.run([cm, "--version"], capture_output=True, text=True).stdout.split()
    try:
        major, minor = (int(x) for x in out[2].split(".")[:2])
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (3, 21)


@pytest.mark.skipif(not _cmake_ok(), reason="needs cmake >= 3.21 (reads CMAKE_TOOLCHAIN_FILE from the environment)")
def test_toolchain_route_reaches_fetchcontent_without_network(tmp_path):
    """For releases whose setup.py drops CMAKE_ARGS: the generated toolchain file hands CMake the local copy."""
    tree = tmp_path / "vllm"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\nproject(p LANGUAGES NONE)\ninclude(FetchContent)\n"
        "FetchContent_Declare(cutlass GIT_REPOSITORY https://github.com/nvidia/cutlass.git GIT_TAG v3.5.1)\n"
        'FetchContent_MakeAvailable(cutlass)\nmessage(STATUS "cutlass at ${cutlass_SOURCE_DIR}")\n')
    (tree / "setup.py").write_text("print()\n")
    root = tmp_path / "deps"
    (root / "cutlass-v3.5.1").mkdir(parents=True)
    (root / "cutlass-v3.5.1" / "CMakeLists.txt").write_text('message(STATUS "the cached cutlass")\n')
    (root / "manifest.json").write_text(json.dumps({"cutlass@v3.5.1": {"dir": "cutlass-v3.5.1"}}))
    plan = deps_cache.build_env(tree, root, tmp_path / "work", {}, device="cuda")
    assert plan["via"] == ["CMAKE_TOOLCHAIN_FILE"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **plan["env"], "GIT_ALLOW_PROTOCOL": "none"}
    r = subprocess.run(["cmake", "-S", str(tree), "-B", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the cached cutlass" in r.stdout and f"cutlass at {root / 'cutlass-v3.5.1'}" in r.stdout
