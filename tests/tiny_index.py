"""A tiny package index for the fast tests: real, installable pure-Python wheels made here (torch, vllm and a
few small dependencies) served as a PEP 503 index on 127.0.0.1, with every request remembered (``_Index.hits``),
and a wheel-mode variant that installs from it."""
from __future__ import annotations

import base64
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A real, installable pure-Python wheel (METADATA, WHEEL, RECORD)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {f"{name.replace('-', '_')}/__init__.py": f"__version__ = '{version}'\n",
             f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for n, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


PACKAGES = [("torch", "2.6.0", ("tinysub>=1",)), ("tinysub", "1.0", ()), ("tinysub", "1.2", ()),
            ("tinydep", "0.3", ("tinysub<1.2",)), ("vllm", "0.0.1", ("tinydep",)), ("xtra", "1.0", ())]


class _Index(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):  # http.server's name
        _Index.hits.append(self.path)
        super().do_GET()


def anchor(w: Path) -> str:
    """The index page's link to wheel ``w``, with its METADATA served beside it as PyPI does (PEP 658/714:
    ``<wheel>.metadata``), so that a resolver reads the metadata without downloading the wheel."""
    with zipfile.ZipFile(w) as z:
        meta = next(z.read(n) for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    w.with_name(w.name + ".metadata").write_bytes(meta)
    mh = hashlib.sha256(meta).hexdigest()
    return (f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}" '
            f'data-core-metadata="sha256={mh}" data-dist-info-metadata="sha256={mh}">{w.name}</a>\n')


def build_index(root: Path) -> Path:
    """root/files/ (the tiny wheels) and root/simple/<project>/index.html: a PEP 503 index to serve."""
    (root / "files").mkdir(parents=True)
    by: dict[str, list[Path]] = {}
    for name, ver, req in PACKAGES:
        by.setdefault(name, []).append(_wheel(root / "files", name, ver, req))
    for name, wheels in by.items():
        page = root / "simple" / name
        page.mkdir(parents=True)
        links = "".join(anchor(w) for w in wheels)
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return root


@pytest.fixture
def index(tmp_path):
    """A PEP 503 index of the tiny wheels on 127.0.0.1 (files/ and simple/<project>/index.html)."""
    root = build_index(tmp_path / "index")
    handler = lambda *a, **k: _Index(*a, directory=str(root), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Index.hits = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/simple"
    srv.shutdown()


def _tiny(tmp_path: Path, index: str, name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'''description = "tiny wheel-mode variant for the bundle tests"
cuda = "12.4"
python = ">=3.11,<3.12"
installer = "uv"
[torch]
version = "2.6.0"
packages = ["torch==2.6.0"]
index_url = "{index}"
[vllm]
version = "0.0.1"
mode = "wheel"
index_url = "{index}"
[deps]
packages = ["tinydep"]
index_url = "{index}"
[post_install]
packages = ["xtra==1.0"]
index_url = "{index}"
''')
    return p
