from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_harness.core.errors import UsageError
from vllm_harness.facts.variants import load_variant, parse_variant, variant_names

ENVS = [ROOT / "envs"]
GOOD = (ROOT / "envs" / "cu124.toml").read_text()


def test_shipped_variants_load_with_the_documents_recipes():
    assert {"cu118", "cu124", "cu130"} <= set(variant_names(ROOT / "envs"))
    cu118 = load_variant("cu118", ENVS)
    assert cu118.cuda == "11.8" and cu118.vllm["mode"] == "source" and cu118.vllm["version"] == "0.8.5"
    assert "torch==2.6.0+cu118" in cu118.torch["packages"]
    assert cu118.torch["index_url"] == "https://download.pytorch.org/whl/cu118"
    assert "numpy<2" in cu118.deps["packages"] and "cmake>=3.26" in cu118.deps["packages"]
    assert cu118.post_install["packages"] == ["xformers==0.0.29.post2"]
    assert cu118.python_spec.contains("3.10.13") and not cu118.python_spec.contains("3.12.1")
    cu124 = load_variant("cu124", ENVS)
    assert cu124.vllm["mode"] == "wheel" and cu124.torch["index_url"] is None
    assert cu124.vllm_requirement == "vllm==0.8.5"
    cu130 = load_variant("cu130", ENVS)
    assert cu130.torch["version"] == "2.14.0" and cu130.vllm["version"] == "0.33.0"   # issue 16: newest on PyPI's torch


def _err(text: str, tmp_path: Path) -> str:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UsageError) as e:
        load_variant(str(p), [])
    msg = str(e.value)
    assert str(p) in msg and "Fix:" in msg
    return msg


@pytest.mark.parametrize("edit, key", [
    (lambda t: t + "\nbogus = 1\n", "verify.bogus"),                                        # unknown key
    (lambda t: t.replace('cuda = "12.4"', "cuda = 12.4"), "cuda"),                          # wrong type
    (lambda t: t.replace('python = ">=3.12,<3.13"', 'python = ">>3.12"'), "python"),        # bad specifier
    (lambda t: t.replace('"torch==2.6.0"', '"torch=2.6.0"'), "torch.packages"),             # bad requirement
    (lambda t: t.replace('mode = "wheel"', 'mode = "binary"'), "vllm.mode"),                # bad choice
    (lambda t: t.replace('version = "0.8.5"', 'version = "latest"'), "vllm.version"),       # bad version
    (lambda t: t.replace("[deps]", "[dependencies]"), "dependencies"),                      # unknown section
    (lambda t: t.replace('description = ', 'descr = '), "descr"),
    (lambda t: t.replace('mode = "wheel"', 'mode = "source"\nsource = "path"\npath = "../../etc/nope"'),
     "vllm.path"),                                                                           # missing path
])
def test_broken_variant_gives_one_message_naming_file_and_key(tmp_path, edit, key):
    msg = _err(edit(GOOD), tmp_path)
    assert f"'{key}'" in msg


def test_invalid_toml_and_missing_section(tmp_path):
    assert "not valid TOML" in _err("cuda = ", tmp_path)
    assert "'torch'" in _err(GOOD.split("[torch]")[0], tmp_path)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(UsageError) as e:
        load_variant("cu999", ENVS)
    assert "cu118" in str(e.value) and "envs/cu999.toml" in str(e.value)


def test_torch_packages_must_name_torch(tmp_path):
    msg = _err(GOOD.replace('packages = ["torch==2.6.0", "torchvision==0.21.0", "torchaudio==2.6.0"]',
                            'packages = ["torchvision==0.21.0"]'), tmp_path)
    assert "'torch.packages'" in msg


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["description", "cuda", "python", "installer", "torch", "vllm", "build",
                                        "zzz"]),
                       st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.lists(st.text(max_size=5)),
                                 st.dictionaries(st.sampled_from(["version", "packages", "mode", "jobs", "env"]),
                                                 st.one_of(st.text(max_size=8), st.integers(),
                                                           st.lists(st.text(max_size=8)))))))
def test_any_malformed_variant_is_a_usage_error_never_a_traceback(data):
    import json
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in tables.items():
        lines.append(f"[{k}]")
        lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    try:
        parse_variant("x", Path("x.toml"), "\n".join(lines))
    except UsageError as e:
        assert "x.toml" in str(e)


def test_huge_values_and_files_are_refused(tmp_path):
    assert "'build.jobs'" in _err(GOOD + '\n[build]\njobs = 100000000000\n', tmp_path)
    assert "too long" in _err(GOOD.replace('description = "', 'description = "' + "x" * 5000), tmp_path)
    big = tmp_path / "big.toml"
    big.write_text(GOOD + "#" * (2 << 20))
    with pytest.raises(UsageError) as e:
        load_variant(str(big), [])
    assert "too large" in str(e.value)
