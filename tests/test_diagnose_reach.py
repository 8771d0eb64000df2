"""diagnose reads logs from outside its corpus (issue 29): lower-cased pastes, the toolchain in other locales, pip's
conflict lines with environment markers, CUDA error 803, TLS-intercepting proxies, partial pastes, and failures
the log shows recovered from."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from vllm_harness import diagnose as dg
from vllm_harness.diagnose import engine as dge

LOGS = Path(__file__).parent / "logs"
# the toolchain's own translations (message catalogs) and what the tools print in each locale:
# written by tests/logs/toolchain_l10n.py, never by hand
L10N = json.loads((LOGS / "toolchain-l10n.json").read_text(encoding="utf-8"))
TOOL_OUTPUT = L10N["tool output"]


@pytest.fixture(autouse=True, params=dg.ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv("VLLM_HARNESS_DIAGNOSE_ENGINE", request.param)
    return request.param


def scan(text: str | bytes) -> dg.Report:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return dg.diagnose_stream(io.BytesIO(data))


def _root_evidence() -> list[tuple[str, str]]:
    """(root id, the line it was found on) for every corpus log whose root diagnose names first."""
    out = []
    for entry in dg.load_corpus(LOGS):
        if not entry["expected"]:
            continue
        report = dg.diagnose_path(LOGS / entry["file"])
        if report.ids[:1] == entry["expected"][:1]:
            out.append((report.ids[0], report.findings[0].evidence))
    return out


# ------------------------------------------------------------------------------------------ casing


def test_every_known_message_is_found_pasted_in_lower_case():
    pairs = _root_evidence()
    assert len(pairs) > 300
    missed = [(rid, ev) for rid, ev in pairs if scan(ev.lower()).ids[:1] != [rid]]
    assert missed == []


def test_lower_case_reading_needs_a_line_without_capitals():
    """Case-sensitive wording keeps its meaning on mixed-case lines: 'ENOSPC' is the errno, 'Enospc' is not."""
    assert scan("bfloat16 is only supported on gpus with compute capability of at least 8.0\n").ids == ["bf16-unsupported"]
    assert scan("Error: enospc in MyModule\n").ids == []


def test_case_insensitive_match_stays_literal_prefiltered():
    """The lower-cased anchors are literals of the prefilter (no case-insensitive regex over the log)."""
    rules = dg.load_knowledge()
    scanner = dge.Scanner(rules, "re")
    lowered = {a for r in rules for a in r.lower_anchors}
    assert lowered and lowered <= set(scanner.scan_words)
    assert all(not rx.flags & re.IGNORECASE for rx in scanner.searches)
    assert all(a == a.lower() for a in lowered)


# ------------------------------------------------------------------------------------------ locales


@pytest.mark.parametrize("lang", sorted(TOOL_OUTPUT))
def test_gcc_missing_header_in_every_locale(lang):
    line = TOOL_OUTPUT[lang]["gcc: missing Python.h"]
    assert "Python.h" in line
    assert scan(f"building 'x' extension\n{line}\n #include <Python.h>\ncompilation terminated.\n").ids == [
        "python-headers-missing"
    ]


@pytest.mark.parametrize("lang", sorted(TOOL_OUTPUT))
def test_no_space_left_in_every_locale(lang):
    line = TOOL_OUTPUT[lang]["cp: /dev/full"]
    assert scan(line + "\n").ids == ["disk-full"]


@pytest.mark.parametrize("lang", sorted(L10N["gcc-12: %s signal terminated program %s"]) + ["ko", "zh_CN", "ja", "ru"])
def test_killed_compiler_in_every_locale(lang):
    """gcc's 'fatal error: %s signal terminated program %s' with glibc's strsignal(SIGKILL), both translated."""
    template = L10N["gcc-12: %s signal terminated program %s"].get(lang, "%s signal terminated program %s")
    fatal = L10N["gcc-12: fatal error: "].get(lang, "fatal error: ")
    killed = L10N["libc: Killed"][lang]
    line = f"c++: {fatal}" + template.replace("%s", killed, 1).replace("%s", "cc1plus", 1)
    assert scan(line + "\n").ids[:1] == ["compiler-oom"]


# ------------------------------------------------------------------------------------------ pip markers


def test_conflict_line_with_environment_markers():
    line = ('torch 2.0.1 requires triton==2.0.0; platform_system == "Linux" and platform_machine == "x86_64", '
            "but you have triton 2.1.0 which is incompatible.")
    assert scan(line + "\n").ids == ["dependency-conflict"]
    torch_line = ('xformers 0.0.20 requires torch==2.0.1; sys_platform == "linux", but you have torch 2.1.0 which '
                  "is incompatible.")
    assert "torch-replaced" in scan("Successfully uninstalled torch-2.0.1\n" + torch_line + "\n").ids


# ------------------------------------------------------------------------------------------ wordings


def test_cuda_error_803_beside_804():
    for name in ("cuda-forward-compat_stable-diffusion-439.log", "cuda-forward-compat_gpufetch-53.log"):
        assert dg.diagnose_path(LOGS / name).ids == ["cuda-forward-compat"]


@pytest.mark.parametrize(
    "name, also",
    [
        ("tls-ca-untrusted_uv-10563.log", "index-unreachable"),
        ("tls-ca-untrusted_codeproject-ai-41.log", "index-unreachable"),
        ("tls-ca-untrusted_typescript-course-5.log", "fetch-network"),
    ],
)
def test_tls_interception_is_its_own_cause_with_the_ca_fix(name, also):
    report = dg.diagnose_path(LOGS / name)
    assert report.ids == ["tls-ca-untrusted", also]
    fix = report.findings[0].fix
    for word in ("SSL_CERT_FILE", "--native-tls", "UV_NATIVE_TLS", "--system-certs", "--cert"):
        assert word in fix
    assert report.findings[1].explained_by == ["tls-ca-untrusted"]


def test_expired_server_certificate_is_not_an_intercepting_proxy():
    line = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
            "broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: certificate has expired (_ssl.c:1076)'))': /whl/torch_stable.html")
    assert scan(line + "\n").ids == ["index-unreachable"]
    intercepted = line.replace("certificate has expired", "self signed certificate in certificate chain")
    assert scan(intercepted + "\n").ids == ["tls-ca-untrusted", "index-unreachable"]


def test_partial_paste_of_the_xformers_block():
    report = dg.diagnose_path(LOGS / "xformers-torch-mismatch_ltx-desktop-23.log")
    assert report.ids == ["xformers-torch-mismatch"] and report.findings[0].line == 1
    assert scan("    PyTorch 2.1.0+cu121 with CUDA 1201 (you have 2.1.0+cpu)\n").ids == ["torch-cpu-only", "xformers-torch-mismatch"]


# ------------------------------------------------------------------------------------------ recovered failures

PIP_RETRY = (
    "Collecting torch==2.4.0\n"
    "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by "
    "'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new "
    "connection: [Errno 111] Connection refused')': /simple/torch/\n"
)
CLONE_RETRY = (
    "Cloning into 'cutlass-src'...\n"
    "error: RPC failed; curl 56 GnuTLS recv error (-54): Error in the pull function.\n"
    "fatal: the remote end hung up unexpectedly\n"
    "-- Had to git clone more than once: 2 times.\n"
)


def test_a_retry_that_got_through_is_no_failure():
    assert scan(PIP_RETRY).ids == ["index-unreachable"]
    assert scan(PIP_RETRY + "  Downloading torch-2.4.0-cp311-cp311-manylinux1_x86_64.whl (797.2 MB)\n"
                "Successfully installed torch-2.4.0\n").ids == []
    assert scan(CLONE_RETRY).ids == ["fetch-network"]
    assert scan(CLONE_RETRY + "-- Configuring done (12.3s)\n-- Generating done (0.1s)\n").ids == []


def test_a_recovery_line_before_the_failure_does_not_count_and_a_later_failure_is_found_again():
    assert scan("Successfully installed numpy-1.26.4\n" + PIP_RETRY).ids == ["index-unreachable"]
    report = scan(CLONE_RETRY + "-- Configuring done\n" + "fatal: unable to access 'https://github.com/x/y/': "
                  "Could not resolve host: github.com\n")
    assert report.ids == ["fetch-network"] and report.findings[0].line == 6


def test_a_recovered_failure_leaves_the_real_one():
    log = CLONE_RETRY + "-- Configuring done\n" + (
        "c++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated.\n")
    assert scan(log).ids == ["compiler-oom"]
