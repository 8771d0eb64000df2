"""issue 16: compat facts from the package index's metadata (recorded responses, a local server; one live test)."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vllm_harness.cli import main as cli
from vllm_harness.core.errors import UsageError
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import compat, feasibility, machine_profile
from vllm_harness.facts import index_metadata as im
from vllm_harness.facts.variants import load_variant_file

DATA = Path(__file__).parent / "data" / "index"
MACHINES = Path(__file__).parent / "machines"


class Index:
    """A local index serving the recorded responses: /simple/<project>/ (PEP 691), /files/<name>.metadata,
    /pytorch/torch/ (PEP 503); ``routes`` overrides or adds paths (bytes, content type); Range is honoured.
    The recorded aarch64 wheels are served a .metadata too: the x86_64 wheel's text of the same release, as
    PyPI's are (one METADATA per release, its Requires-Dist markers naming the platform); ``aarch64_metadata``
    replaces one."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, str]] = {}
        for p in ("vllm", "torch", "xformers"):
            page = json.loads((DATA / f"{p}.json").read_text())
            for f in page["files"]:
                name, version = f["filename"].split("-")[:2]
                twin = sorted((DATA / "files").glob(f"{name}-{version}-*x86_64.whl.metadata"))
                if f["filename"].endswith("_aarch64.whl") and twin:
                    f["core-metadata"] = {"sha256": "synthetic"}
                    self.routes[f"/files/{f['filename']}.metadata"] = (twin[0].read_bytes(), "text/plain")
            self.routes[f"/simple/{p}/"] = (json.dumps(page).encode(), im.SIMPLE_JSON)
        for f in (DATA / "files").iterdir():
            self.routes[f"/files/{f.name}"] = (f.read_bytes(), "text/plain")
        self.routes["/pytorch/torch/"] = ((DATA / "pytorch-torch.html").read_bytes(), "text/html")
        self.hits: list[str] = []
        index = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                index.hits.append(self.path)
                if self.path not in index.routes:
                    self.send_error(404)
                    return
                body, ctype = index.routes[self.path]
                rng = self.headers.get("Range")
                if rng:
                    m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng)
                    a, b = m.group(1), m.group(2)
                    start, end = (len(body) - int(b), len(body) - 1) if not a else (int(a), min(int(b or len(body) - 1), len(body) - 1))
                    start = max(0, start)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                    body = body[start:end + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def aarch64_metadata(self, filename: str, text: str) -> None:
        """Serve ``text`` as the .metadata of the recorded aarch64 wheel ``filename``."""
        self.routes[f"/files/{filename}.metadata"] = (text.encode(), "text/plain")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index():
    with Index() as ix:
        yield ix


def _refresh(ix: Index, out: Path, cache: Path | None = None, **kw) -> im.RefreshResult:
    return im.refresh(out_path=out, index=f"{ix.url}/simple", pytorch_index=kw.pop("pytorch", f"{ix.url}/pytorch"),
                      cache_dir=cache, today=kw.pop("today", "2026-11-28"), timeout=5, **kw)


def test_refresh_reads_the_facts_from_recorded_metadata(index, tmp_path):
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out, tmp_path / "cache")
    assert res.changed and not res.skipped and res.counts == {"vllm": 4, "torch": 3, "xformers": 3}
    lock = compat.tomllib.loads(out.read_text())
    assert lock["source"] == "index-metadata" and lock["generated"] == "2026-11-28"
    v = lock["vllm"]["0.33.0"]
    assert (v["torch"], v["torchvision"], v["torchaudio"], v["flashinfer"]) == ("2.14.0", "0.29.0", "2.11.0", "0.7.2.post1")
    assert v["python"] == ">=3.11,<3.15" and v["sdist"] is True
    assert "cp38-abi3-manylinux_2_28_x86_64" in v["wheels"]
    assert lock["vllm"]["0.8.5"]["xformers"] == "0.0.29.post2"
    assert lock["vllm"]["0.20.2"]["sdist"] is True
    t = lock["torch"]
    assert t["2.14.0"]["pypi_cuda"] == "13.0" and t["2.6.0"]["pypi_cuda"] == "12.4"
    assert t["2.6.0"]["python"] == ">=3.11,<3.13"   # the CPython wheels listed: the trimmed page has cp311, cp312
    assert t["2.14.0"]["cuda_variants"] == ["12.6", "13.0"]   # from the PyTorch index page (cpu is not CUDA)
    assert lock["xformers"]["0.0.34"]["torch"] == "2.10.0"
    assert "torch" not in lock["xformers"]["0.0.35"] and lock["xformers"]["0.0.35"]["torch_requires"] == ">=2.10"
    # the merged data: index facts with their source, hand facts kept with theirs
    data = compat.load_file(compat.DATA_PATH, out)
    vf = data.vllm("0.33.0")
    assert vf.torch.value == "2.14.0" and vf.torch.source == "index-metadata" and not vf.torch.inferred
    assert vf.build_archs("13.0").source == "vllm-cmake-000a1ee" and vf.build_archs("13.0").inferred
    assert data.cuda("13.0").driver_min.source == "nv-relnotes"
    assert data.torch("2.14.0").pypi_default_cuda.value == "13.0" and data.newest("vllm") == "0.33.0"


def test_second_refresh_changes_no_byte_and_is_served_from_the_cache(index, tmp_path):
    out, cache = tmp_path / "compat.lock.toml", tmp_path / "cache"
    _refresh(index, out, cache)
    before = out.read_bytes()
    index.hits.clear()
    res = _refresh(index, out, cache, today="2027-01-05")
    assert not res.changed and out.read_bytes() == before and res.generated == "2026-11-28"
    assert not [h for h in index.hits if h.endswith(".metadata")]      # metadata came from the cache


def test_unreachable_index_changes_nothing_and_names_the_url(tmp_path):
    out = tmp_path / "compat.lock.toml"
    out.write_text("keep me\n")
    with pytest.raises(UsageError) as e:
        im.refresh(out_path=out, index="http://127.0.0.1:9/simple", pytorch_index=None, timeout=2)
    assert "http://127.0.0.1:9/simple/" in str(e.value) and "was not changed" in str(e.value)
    assert out.read_text() == "keep me\n"


def test_broken_index_page_changes_nothing(index, tmp_path):
    out = tmp_path / "compat.lock.toml"
    index.routes["/simple/torch/"] = (b"{not json", im.SIMPLE_JSON)
    with pytest.raises(UsageError) as e:
        _refresh(index, out)
    assert f"{index.url}/simple/torch/" in str(e.value) and not out.exists()


def test_pytorch_index_unreachable_is_reported_and_pypi_still_read(index, tmp_path):
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out, pytorch="http://127.0.0.1:9/whl")
    assert res.changed and any("http://127.0.0.1:9/whl/torch/" in n for n in res.notes)
    assert "cuda_variants" not in compat.tomllib.loads(out.read_text())["torch"]["2.14.0"]


def test_malformed_metadata_is_skipped_with_its_name(index, tmp_path):
    name = "vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl.metadata"
    index.routes[f"/files/{name}"] = (b"Metadata-Version: 2.4\nName: vllm\nVersion: 0.32.0\n"
                                      b"Requires-Dist: torch===\n", "text/plain")
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out)
    assert [s.split(":")[0] for s in res.skipped] == [name[:-len(".metadata")]]
    lock = compat.tomllib.loads(out.read_text())
    assert "0.32.0" not in lock["vllm"] and "0.33.0" in lock["vllm"]


def test_wheel_without_metadata_file_is_read_with_range_requests(index, tmp_path):
    """No PEP 658 file: the METADATA member is read from the zip's end, central directory and member."""
    page = json.loads((DATA / "xformers.json").read_text())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xformers/__init__.py", "x = 1\n" * 5000)
        z.writestr("xformers-0.0.34.dist-info/METADATA",
                   (DATA / "files" / "xformers-0.0.34-cp39-abi3-manylinux_2_28_x86_64.whl.metadata").read_text())
    for f in page["files"]:
        if f["filename"] == "xformers-0.0.34-cp39-abi3-manylinux_2_28_x86_64.whl":
            f.pop("core-metadata")
            index.routes["/files/" + f["filename"]] = (buf.getvalue(), "application/zip")
    index.routes["/simple/xformers/"] = (json.dumps(page).encode(), im.SIMPLE_JSON)
    out = tmp_path / "compat.lock.toml"
    _refresh(index, out)
    assert compat.tomllib.loads(out.read_text())["xformers"]["0.0.34"]["torch"] == "2.10.0"
    assert not [h for h in index.hits if h.startswith("/files/xformers-0.0.34") and h.endswith(".metadata")]


def test_torch_cuda_from_requirements():
    from packaging.requirements import Requirement as R
    assert im.torch_cuda([R('nvidia-cuda-runtime-cu12==12.4.127; platform_system == "Linux"')])[0] == "12.4"
    assert im.torch_cuda([R("cuda-toolkit[cudart]==13.0.2")])[0] == "13.0"
    assert im.torch_cuda([R("nvidia-cuda-runtime-cu12==12.8.90; platform_machine == 'aarch64'")])[0] is None
    assert im.torch_cuda([R("filelock")])[0] is None


# ------------------------------------------------------------------------------------ per platform (issue 28)

TORCH_211_ARM = "torch-2.11.0-cp311-cp311-manylinux_2_28_aarch64.whl"
VLLM_0330_ARM = "vllm-0.33.0-cp38-abi3-manylinux_2_28_aarch64.whl"


def test_refresh_reads_each_platforms_wheel_with_its_markers(index, tmp_path):
    """torch 2.6.0's aarch64 wheel: its nvidia-* pins are marked x86_64 -> "cpu"; torch 2.11.0's aarch64 wheel
    pins the CUDA runtime for aarch64 -> that CUDA; vLLM 0.33.0's aarch64 wheel pins another torch there."""
    index.aarch64_metadata(TORCH_211_ARM, "Metadata-Version: 2.4\nName: torch\nVersion: 2.11.0\nRequires-Python: >=3.10\n"
                           "Requires-Dist: cuda-toolkit[cudart]==13.0.2; platform_machine == 'x86_64'\n"
                           "Requires-Dist: nvidia-cuda-runtime-cu12==12.9.79; platform_machine == 'aarch64'\n")
    index.aarch64_metadata(VLLM_0330_ARM, "Metadata-Version: 2.4\nName: vllm\nVersion: 0.33.0\n"
                           "Requires-Python: <3.15,>=3.11\n"
                           "Requires-Dist: torch==2.14.0; platform_machine == 'x86_64'\n"
                           "Requires-Dist: torch==2.13.0; platform_machine == 'aarch64'\n"
                           "Requires-Dist: torchaudio==2.11.0\nRequires-Dist: flashinfer-python==0.7.2.post1\n")
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out, tmp_path / "cache")
    assert not res.skipped and res.counts == {"vllm": 4, "torch": 3, "xformers": 3}
    assert {h for h in index.hits if "aarch64" in h} == {f"/files/{f}.metadata" for f in (
        "torch-2.6.0-cp311-cp311-manylinux_2_28_aarch64.whl", TORCH_211_ARM,
        "torch-2.14.0-cp311-cp311-manylinux_2_28_aarch64.whl", "vllm-0.20.2-cp38-abi3-manylinux_2_35_aarch64.whl",
        "vllm-0.32.0-cp38-abi3-manylinux_2_28_aarch64.whl", VLLM_0330_ARM)}
    text = out.read_text()
    lock = compat.tomllib.loads(text)
    assert lock["schema"] == 2 and '[torch."2.6.0"]' in text and 'platform.aarch64.pypi_cuda = "cpu"' in text
    t = lock["torch"]
    # the top-level facts stay the x86_64 wheel's
    assert (t["2.6.0"]["pypi_cuda"], t["2.11.0"]["pypi_cuda"], t["2.14.0"]["pypi_cuda"]) == ("12.4", "13.0", "13.0")
    arm = {v: t[v]["platform"]["aarch64"] for v in ("2.6.0", "2.11.0", "2.14.0")}
    assert arm["2.6.0"]["pypi_cuda"] == "cpu" and "pypi_cuda_from" not in arm["2.6.0"]
    assert arm["2.11.0"]["pypi_cuda"] == "12.9" and arm["2.11.0"]["pypi_cuda_from"].startswith("nvidia-cuda-runtime")
    assert arm["2.14.0"]["pypi_cuda"] == "13.0" and arm["2.14.0"]["metadata_from"].endswith("_aarch64.whl")
    # glibc floors per platform: torch 2.6.0 is manylinux1 (2.5) on x86_64, manylinux_2_28 on aarch64
    assert t["2.6.0"]["platform"]["x86_64"] == {"glibc": "2.5", "tags": ["manylinux1_x86_64"]}
    assert arm["2.6.0"]["glibc"] == "2.28" and arm["2.6.0"]["tags"] == ["manylinux_2_28_aarch64"]
    v = lock["vllm"]
    assert v["0.33.0"]["torch"] == "2.14.0" and v["0.33.0"]["platform"]["aarch64"]["torch"] == "2.13.0"
    assert v["0.33.0"]["platform"]["aarch64"]["unpinned"] == ["torchvision"]   # x86_64's pin, not aarch64's
    assert "torch" not in v["0.32.0"]["platform"]["aarch64"]       # the same pin: written once, at the top
    assert v["0.20.2"]["platform"]["aarch64"]["glibc"] == "2.35" and "aarch64" not in v["0.8.5"]["platform"]
    assert "platform" not in lock["xformers"]["0.0.35"] or "aarch64" not in lock["xformers"]["0.0.35"]["platform"]
    # merged: the reading per platform, with its source
    data = compat.load_file(compat.DATA_PATH, out)
    f = data.torch_pypi_cuda("2.11.0", "aarch64")
    assert (f.value, f.source, f.inferred) == ("12.9", "index-metadata", False) and TORCH_211_ARM in f.note
    assert data.torch_pypi_cuda("2.6.0", "aarch64").value == "cpu"
    assert data.torch_pypi_cuda("2.11.0", "x86_64").value == "13.0" == data.torch_pypi_cuda("2.11.0", None).value
    assert feasibility.pypi_torch_cuda(data, data.torch("2.11.0"), "aarch64")[0] == "12.9"
    assert feasibility.pypi_torch_cuda(data, data.torch("2.6.0"), "aarch64")[0] is None
    assert data.platform_facts("vllm", "0.33.0", "aarch64")["torch"].value == "2.13.0"
    assert data.platform_facts("vllm", "0.33.0", "aarch64")["glibc"].source == "index-metadata"
    assert TORCH_211_ARM.replace("torch-2.11.0-", "")[:-4] in data.torch("2.11.0").wheels.value


def test_a_pure_wheel_is_read_once_and_a_platform_read_that_is_malformed_is_skipped(index, tmp_path):
    index.aarch64_metadata(TORCH_211_ARM, "Metadata-Version: 2.4\nName: torch\nVersion: 2.11.0\n"
                           "Requires-Dist: nvidia-cuda-runtime-cu12==12.9.79 ; platform_machine == \n")
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out)
    assert [s.split(":")[0] for s in res.skipped] == [TORCH_211_ARM]
    t = compat.tomllib.loads(out.read_text())["torch"]["2.11.0"]
    assert t["pypi_cuda"] == "13.0" and set(t["platform"]) == {"x86_64"}    # x86_64's facts kept
    data = compat.load_file(compat.DATA_PATH, out)    # no reading of that platform: the hand-kept fallback,
    assert data.torch_pypi_cuda("2.11.0", "aarch64") is None   # which holds only up to torch 2.10.0
    assert data.torch_pypi_cuda("2.10.0", "aarch64") is data.platform("aarch64")["torch_pypi_cuda"]


def _lock(body: str, tmp_path: Path, schema: int = 2) -> Path:
    p = tmp_path / f"lock{schema}.toml"
    p.write_text(f'schema = {schema}\nsource = "index-metadata"\ngenerated = "2026-12-01"\nindex = "x"\n{body}')
    return p


def test_torch_pypi_cuda_lock_reading_wins_over_the_hand_fallback(tmp_path):
    hand = compat.load_file(compat.DATA_PATH, None).platform("aarch64")["torch_pypi_cuda"]
    assert hand.value == "cpu" and hand.inferred
    body = ('[torch."2.10.0"]\npython = ">=3.10,<3.15"\npypi_cuda = "12.8"\n'
            'metadata_from = "torch-2.10.0-cp312-cp312-manylinux_2_28_x86_64.whl"\n')
    old = compat.load_file(compat.DATA_PATH, _lock(body, tmp_path, schema=1))       # a lock without platforms
    assert old.torch_pypi_cuda("2.10.0", "aarch64") == hand
    assert feasibility.pypi_torch_cuda(old, old.torch("2.10.0"), "aarch64") == (None, hand)
    new = compat.load_file(compat.DATA_PATH, _lock(
        body + 'platform.aarch64.pypi_cuda = "12.8"\nplatform.aarch64.pypi_cuda_from = "nvidia-cuda-runtime-cu12==12.8.90"\n'
        'platform.aarch64.metadata_from = "torch-2.10.0-cp312-cp312-manylinux_2_28_aarch64.whl"\n', tmp_path))
    f = new.torch_pypi_cuda("2.10.0", "aarch64")
    assert (f.value, f.source, f.inferred) == ("12.8", "index-metadata", False) and "cu12==12.8.90" in f.note
    assert feasibility.pypi_torch_cuda(new, new.torch("2.10.0"), "aarch64") == ("12.8", f)
    assert new.torch_pypi_cuda("2.9.1", "aarch64") == hand           # a release the lock did not read
    assert new.torch_pypi_cuda("2.10.0", "ppc64le") is None           # nothing known of that platform
    with pytest.raises(UsageError, match=r"torch\.2\.10\.0\.platform\.aarch64\.pypi_cuda"):
        compat.load_file(compat.DATA_PATH, _lock(body + 'platform.aarch64.pypi_cuda = "gpu"\n', tmp_path))


# ------------------------------------------------------------------------------------- doctor after it

def _variant(tmp_path: Path, vllm: str, torch: str, cuda: str = "13.0", name: str = "x") -> object:
    f = tmp_path / f"{name}.toml"
    f.write_text(f'description = "t"\ncuda = "{cuda}"\npython = ">=3.12,<3.13"\n[torch]\nversion = "{torch}"\n'
                 f'packages = ["torch=={torch}"]\n[vllm]\nversion = "{vllm}"\nmode = "wheel"\n')
    return load_variant_file(f)


def _h200_driver580() -> dict:
    text = (MACHINES / "h100-driver535.toml").read_text()
    text = text.replace('driver = "535.183.01"', 'driver = "580.95.05"').replace('driver_cuda = "12.2"', 'driver_cuda = "13.0"')
    return machine_profile.parse_profile(text, "h100-driver580")


def test_doctor_before_and_after_a_refresh(index, tmp_path):
    prof = _h200_driver580()
    hand_only = compat.load_file(compat.DATA_PATH, None)        # the data before any refresh
    v = _variant(tmp_path, "0.33.0", "2.14.0")
    fs = doctor.check(v, prof, data=hand_only)
    assert [f.id for f in fs if f.id.startswith("compat-")] == ["compat-stale"]
    assert "invoke compat --refresh" in fs[0].fix or any("invoke compat --refresh" in f.fix for f in fs)
    out = tmp_path / "compat.lock.toml"
    _refresh(index, out)
    data = compat.load_file(compat.DATA_PATH, out)
    fs = doctor.check(v, prof, data=data)
    assert not [f for f in fs if f.id in ("compat-unknown", "compat-stale")], fs
    assert doctor.verdict(fs) != "will fail", [f for f in fs if f.severity == "error"]
    bad = doctor.check(_variant(tmp_path, "0.33.0", "2.11.0", name="bad"), prof, data=data)
    pin = [f for f in bad if f.severity == "error" and f.id == "dependency-conflict"]
    assert pin and "torch==2.14.0" in pin[0].evidence and "[index-metadata]" in pin[0].evidence
    # Python outside vLLM 0.33.0's Requires-Python (>=3.11): judged from the index data
    v310 = load_variant_file(_write(tmp_path / "py310.toml", (tmp_path / "x.toml").read_text()
                                    .replace('">=3.12,<3.13"', '">=3.10,<3.11"')))
    fs = doctor.check(v310, prof, data=data)
    assert any(f.id == "python-unsupported" and ">=3.11,<3.15" in f.evidence for f in fs)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_packaged_data_judges_the_shipped_variants():
    """The committed lock: cu130 (vLLM 0.33.0) and cu128 are judged fully on machines their files name."""
    from vllm_harness.facts.variants import load_variant
    envs = [Path(__file__).parent.parent / "envs"]
    fs = doctor.check(load_variant("cu130", envs), _h200_driver580())
    assert not [f for f in fs if f.id in ("compat-unknown", "compat-stale")] and doctor.verdict(fs) != "will fail"
    p = machine_profile.load_profile(MACHINES / "rtx4090-gcc13-ubuntu24.toml")   # driver 570
    fs = doctor.check(load_variant("cu128", envs), p)
    assert not [f for f in fs if f.id in ("compat-unknown", "compat-stale")] and doctor.verdict(fs) != "will fail"
    for name in ("cu118", "cu124", "cu128", "cu130"):
        assert "For:" in (envs[0] / f"{name}.toml").read_text() or "# " in (envs[0] / f"{name}.toml").read_text()


def test_cli_compat_refresh_json(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(tmp_path / "state"))
    out = tmp_path / "lock.toml"
    rc = cli(["compat", "--refresh", "--index-url", f"{index.url}/simple", "--pytorch-index", f"{index.url}/pytorch",
              "--out", str(out), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["changed"] and rep["counts"]["vllm"] == 4 and out.is_file()
    rc = cli(["compat", "--refresh", "--index-url", "http://127.0.0.1:9/simple", "--out", str(out)])
    assert rc == 2 and "http://127.0.0.1:9/simple/" in capsys.readouterr().err


@pytest.mark.network
def test_live_index_has_the_releases_the_data_names(tmp_path):
    out = tmp_path / "compat.lock.toml"
    res = im.refresh(out_path=out, cache_dir=tmp_path / "cache", timeout=30)
    lock = compat.tomllib.loads(out.read_text())
    assert res.counts["vllm"] > 50 and lock["vllm"]["0.8.5"]["torch"] == "2.6.0"
    assert lock["torch"]["2.6.0"]["pypi_cuda"] == "12.4"


@pytest.mark.network
def test_live_torch_release_read_per_platform_agrees_with_the_committed_lock():
    """torch 2.10.0 and 2.11.0 from PyPI, one wheel per platform (metadata cached under .harness/cache/index, as
    `invoke compat --refresh` keeps it): what each platform's wheel says is what the packaged lock holds."""
    from vllm_harness.facts.package_index import (
        Http,
        fetch_metadata,
        group_releases,
        parse_metadata,
        pick_wheel,
        read_project,
    )
    http = Http(Path(__file__).resolve().parents[1] / ".harness" / "cache" / "index", timeout=30)
    rels = {str(r.version): r for r in group_releases(read_project(http, im.DEFAULT_INDEX, "torch"), "torch")}
    lock = compat.tomllib.loads(compat.LOCK_PATH.read_text())["torch"]
    data = compat.load()
    for v in ("2.10.0", "2.11.0"):
        for arch in im.PLATFORMS:
            f = pick_wheel(rels[v], arch)
            assert f is not None and f.filename.endswith(f"_{arch}.whl")
            facts = im.torch_facts(parse_metadata(fetch_metadata(http, f), "torch", rels[v].version), rels[v], f,
                                   im.marker_env(arch))
            read = lock[v] if arch == "x86_64" else lock[v]["platform"][arch]
            assert facts.get("pypi_cuda", "cpu") == read.get("pypi_cuda", "cpu"), (v, arch, facts)
            assert data.torch_pypi_cuda(v, arch).value == facts.get("pypi_cuda", "cpu")


def test_without_an_aarch64_reading_the_hand_fallback_holds_only_up_to_its_bound(tmp_path):
    """No lock (or a schema-1 lock): the hand-kept CPU-only fact is used up to torch_pypi_cuda_until (2.10.0);
    a newer torch is taken as its x86_64 build (PyPI's aarch64 torch is a CUDA build from 2.11.0)."""
    from vllm_harness.facts import compat, feasibility
    data = compat.load_file(Path(compat.__file__).parent.parent / "data" / "compat.toml",
                            lock_path=tmp_path / "no-lock.toml")
    cuda, fact = feasibility.pypi_torch_cuda(data, data.torch("2.10.0"), "aarch64")
    assert cuda is None and fact.inferred and fact.source == "pt-aarch64-pypi"
    cuda, fact = feasibility.pypi_torch_cuda(data, data.torch("2.11.0"), "aarch64")
    assert cuda == "13.0" and fact is data.torch("2.11.0").pypi_default_cuda
