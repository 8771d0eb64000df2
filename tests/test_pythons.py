import os
import sys
from pathlib import Path

import pytest

from vllm_harness.core.errors import UsageError
from vllm_harness.facts import pythons

MINOR = f"3.{sys.version_info[1]}"


def _fake_home(tmp_path: Path) -> dict:
    """A PATH whose python3.X shim fails (like pyenv's before `pyenv global`), and a pyenv root that has it."""
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / f"python{MINOR}"
    shim.write_text(f"#!/bin/sh\necho 'pyenv: python{MINOR}: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    ver = tmp_path / "pyenv" / "versions" / sys.version.split()[0] / "bin"
    ver.mkdir(parents=True)
    os.symlink(os.path.realpath(sys.executable), ver / f"python{MINOR}")
    return {"PATH": f"{shims}:/nonexistent", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv")}


def test_failing_shim_is_skipped_and_pyenv_version_found(tmp_path):
    env = _fake_home(tmp_path)
    good, bad = pythons.discover(env)
    assert any("exit 127" in b and "shims" in b for b in bad)
    found = pythons.find(f"=={MINOR}.*", env=env)
    assert found.origin in ("pyenv", "system") and found.version.startswith(MINOR)


def test_no_interpreter_in_range_is_one_clear_message(tmp_path):
    env = _fake_home(tmp_path)
    with pytest.raises(UsageError) as e:
        pythons.find(">=3.99", env=env, what="variant cu999")
    msg = str(e.value)
    assert "variant cu999" in msg and "uv python install" in msg and "--python" in msg


def test_given_interpreter_outside_range(tmp_path):
    with pytest.raises(UsageError) as e:
        pythons.find("<3.0", given=sys.executable)
    assert "outside" in str(e.value)
    with pytest.raises(UsageError):
        pythons.find(">=3", given=str(tmp_path / "nope"))
