"""Write tests/logs/toolchain-l10n.json: the toolchain's own translations of the messages diagnose reads
(glibc's strerror/strsignal texts, gcc's diagnostics, make's error line), read from the message catalogs
that Debian installs (libc-l10n: libc.mo; gcc-12-locales: gcc-12.mo; make: make.mo), never written by
hand.  The patterns of data/failures.toml that match these texts were made from this file, and
tests/test_diagnose_l10n.py checks them against it.

    apt-get install -y locales-all libc-l10n gcc-12-locales make
    python tests/logs/toolchain_l10n.py

The same texts come out of the tools themselves, e.g.
``LANGUAGE=pt_BR LC_ALL=pt_BR.UTF-8 gcc -c a.c`` on a file that includes a missing Python.h prints
``a.c:1:10: fatal error: Python.h: Arquivo ou diretório inexistente``.
"""
from __future__ import annotations

import gettext
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

LANGS = ("ko", "zh_CN", "zh_TW", "ja", "pt_BR", "es", "de", "fr", "ru", "it")
#: the locale each language is run under (locales-all)
LOCALES = {"ko": "ko_KR", "zh_CN": "zh_CN", "zh_TW": "zh_TW", "ja": "ja_JP", "pt_BR": "pt_BR", "es": "es_ES",
           "de": "de_DE", "fr": "fr_FR", "ru": "ru_RU", "it": "it_IT"}
MESSAGES = (
    ("libc", "No such file or directory"),
    ("libc", "No space left on device"),
    ("libc", "Killed"),
    ("gcc-12", "%s signal terminated program %s"),
    ("gcc-12", "fatal error: "),
    ("make", "%s[%s: %s] Error %d%s"),
)


def tool_output() -> dict[str, dict[str, str]]:
    """The first error line the tools themselves print in each locale: gcc on a source that includes a
    missing Python.h, cp onto /dev/full (ENOSPC)."""
    out: dict[str, dict[str, str]] = {}
    gcc, cp = shutil.which("gcc"), shutil.which("cp")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "a.c")
        src.write_text("#include <Python.h>\nint main(void) { return 0; }\n", encoding="utf-8")
        for lang, loc in LOCALES.items():
            env = {**os.environ, "LANGUAGE": lang, "LC_ALL": f"{loc}.UTF-8"}
            row = out.setdefault(lang, {})
            if gcc:
                proc = subprocess.run([gcc, "-c", "a.c", "-o", os.devnull], cwd=tmp, env=env,
                                      capture_output=True, text=True, check=False)
                row["gcc: missing Python.h"] = proc.stderr.splitlines()[0]
            if cp and Path("/dev/full").exists():
                proc = subprocess.run([cp, "a.c", "/dev/full"], cwd=tmp, env=env,
                                      capture_output=True, text=True, check=False)
                row["cp: /dev/full"] = proc.stderr.splitlines()[0]
    return out


def main() -> None:
    out: dict[str, dict[str, str]] = {}
    for domain, msgid in MESSAGES:
        row = out.setdefault(f"{domain}: {msgid}", {})
        for lang in LANGS:
            mo = Path(f"/usr/share/locale/{lang}/LC_MESSAGES/{domain}.mo")
            if not mo.is_file():
                continue
            with mo.open("rb") as fh:
                text = gettext.GNUTranslations(fh).gettext(msgid)
            if text != msgid:
                row[lang] = text
    out["tool output"] = tool_output()
    target = Path(__file__).with_name("toolchain-l10n.json")
    target.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
