"""setup.sh derives the bookworm-backports entry from the machine's own
Debian source: no mirror's host name is written in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO


def _derive(apt_etc: Path) -> subprocess.CompletedProcess[str]:
    """setup.sh's debian_source function, run against `apt_etc`."""
    text = (REPO / "setup.sh").read_text()
    func = re.search(r"^debian_source\(\) \{.*?^\}$", text, re.S | re.M)
    assert func, "setup.sh has no debian_source function"
    script = f"apt_etc={apt_etc}\n{func.group()}\ndebian_source\n"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True)


@pytest.mark.parametrize(("files", "expect"), [
    ({"sources.list": "# comment\ndeb http://mirror.example/debian bookworm main\n"
                      "deb http://mirror.example/debian-security bookworm-security main\n"},
     "http://mirror.example/debian\t"),
    ({"sources.list": "deb [arch=amd64 signed-by=/k.gpg] https://m.example/d bookworm main\n"},
     "https://m.example/d\t"),
    ({"sources.list.d/debian.sources":
      "Types: deb\nURIs: http://m.example/debian-security\nSuites: bookworm-security\n"
      "Components: main\n\nTypes: deb deb-src\nURIs: http://m.example/debian\n"
      "Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/k.gpg\n"},
     "http://m.example/debian\t/usr/share/k.gpg"),
    ({"sources.list.d/other.sources": "Types: deb\nURIs: http://x.example/\nSuites: nodistro\n"},
     ""),
    ({}, ""),
])
def test_backports_source_comes_from_the_machine(tmp_path: Path, files: dict[str, str],
                                                 expect: str) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    res = _derive(tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip("\n") == expect


def test_setup_names_no_host() -> None:
    for path in (REPO / "setup.sh", REPO / ".ci" / "run"):
        assert not re.search(r"https?://", path.read_text()), path
