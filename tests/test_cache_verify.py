"""Cache verification: a build trusts a file's recorded sha256 while its size
and stat (inode, mtime, ctime) are unchanged and hashes it again otherwise;
`rootfs-build cache verify` hashes everything, whatever the stats say."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

import builder.cache
from builder.cache import ENTRY_META, Cache

KEY = "a" * 64
CONTENT = bytes(range(256)) * 64   # 16 KiB


def build_entry(cache: Cache, key: str = KEY, content: bytes = CONTENT) -> tuple[Path, bool]:
    def build(tmp: Path) -> dict[str, Any]:
        (tmp / "data.bin").write_bytes(content)
        return {"made": True}
    return cache.get_or_build(key, build, kind="test", label="test entry")


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the cache hashes (it keeps using the real sha256_file)."""
    seen: list[Path] = []
    real = builder.cache.sha256_file

    def counting(path: Path, **kw: Any) -> str:
        seen.append(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(builder.cache, "sha256_file", counting)
    return seen


def use(root: Path) -> tuple[Path, bool]:
    cache = Cache(root)
    try:
        return build_entry(cache)
    finally:
        cache.close()


def test_an_unchanged_entry_is_used_without_reading_it(tmp_path: Path,
                                                       hashes: list[Path]) -> None:
    d, built = use(tmp_path)
    assert built
    hashes.clear()
    d, built = use(tmp_path)
    assert not built and hashes == []
    assert json.loads((d / ENTRY_META).read_text())["layout"] == builder.cache.ENTRY_LAYOUT


def test_a_new_stat_with_the_same_content_is_hashed_once_and_recorded(
        tmp_path: Path, hashes: list[Path]) -> None:
    d, _ = use(tmp_path)
    st = (d / "data.bin").stat()
    os.utime(d / "data.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hashes.clear()
    assert use(tmp_path) == (d, False)
    assert [p.name for p in hashes] == ["data.bin"]
    hashes.clear()
    assert use(tmp_path) == (d, False)
    assert hashes == []


def test_a_copied_cache_is_hashed_once(tmp_path: Path, hashes: list[Path]) -> None:
    d, _ = use(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")   # new inodes, same mtimes
    hashes.clear()
    assert use(tmp_path / "two")[1] is False
    assert [p.name for p in hashes] == ["data.bin"]


def test_a_flip_with_size_and_mtime_put_back_is_caught_by_a_build(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Setting the mtime back changes the ctime, which nobody can set back."""
    d, _ = use(tmp_path)
    victim = d / "data.bin"
    st = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(bytes([CONTENT[100] ^ 1]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    capsys.readouterr()
    d2, built = use(tmp_path)
    assert built and d2 == d
    assert (d / "data.bin").read_bytes() == CONTENT
    assert f"cache entry {KEY[:12]} is damaged (its files do not match their checksums); " \
        "rebuilding it" in capsys.readouterr().err


def test_an_entry_of_another_layout_is_rebuilt(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = use(tmp_path)
    meta = json.loads((d / ENTRY_META).read_text())
    del meta["layout"]
    (d / ENTRY_META).write_text(json.dumps(meta))
    capsys.readouterr()
    assert use(tmp_path)[1] is True
    err = capsys.readouterr().err
    assert f"cache entry {KEY[:12]} was written by another version of rootfs-build " \
        f"(layout 1, this one reads {builder.cache.ENTRY_LAYOUT}); rebuilding it" in err


def test_cache_verify_command(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    good, _ = build_entry(cache, "b" * 64)
    bad, _ = build_entry(cache, "c" * 64)
    cache.close()
    with open(bad / "data.bin", "r+b") as f:
        f.truncate(100)
    res = run_cli("cache", "verify", "--cache-dir", tmp_path, "--json")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["damaged"], doc["removed"]) == (1, 1)
    assert {r["key"]: r["status"] for r in doc["entries"]} == {"b" * 64: "ok", "c" * 64: "damaged"}
    assert good.exists() and not bad.exists()
    res = run_cli("cache", "verify", "--cache-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "1 entries verified, 0 damaged, 0 removed"


# A change behind the filesystem's back (as bit rot or a write to the block
# device would make it): the entry lives on a loop-mounted ext4; between two
# mounts one byte of the file's block is flipped in the image.  Size, inode,
# mtime and ctime stay as they were.
_BEHIND_THE_FS = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from builder.cache import Cache
    work = Path(sys.argv[2]); image, mnt = work / "fs.img", work / "mnt"
    key, content = "d" * 64, bytes(range(256)) * 64
    def build(tmp):
        (tmp / "data.bin").write_bytes(content)
        return {}
    def sh(*argv):
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    def use():
        cache = Cache(mnt / "cache")
        try:
            return cache.get_or_build(key, build, kind="test", label="t")[1]
        finally:
            cache.close()
    sh("truncate", "-s", "32M", str(image))
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", str(image))
    mnt.mkdir()
    sh("mount", "-o", "loop", str(image), str(mnt))
    use()
    path = mnt / "cache" / "entries" / key / "data.bin"
    before = os.stat(path)
    sh("umount", str(mnt))
    block = int(sh("debugfs", "-R", f"bmap /cache/entries/{key}/data.bin 0",
                   str(image)).split()[-1])
    with open(image, "r+b") as f:
        f.seek(block * 4096 + 100)
        f.write(bytes([content[100] ^ 1]))
    sh("mount", "-o", "loop", str(image), str(mnt))
    after = os.stat(path)
    same = [getattr(before, a) == getattr(after, a)
            for a in ("st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")]
    flipped = path.read_bytes() != content
    build_rebuilt = use()
    cache = Cache(mnt / "cache")
    rows = cache.verify()
    cache.close()
    exists_after_verify = path.exists()
    rebuilt_after_verify = use()
    sh("umount", str(mnt))
    print(json.dumps({"same_stat": same, "flipped": flipped, "build_rebuilt": build_rebuilt,
                      "rows": rows, "exists_after_verify": exists_after_verify,
                      "rebuilt_after_verify": rebuilt_after_verify}))
""")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare")
                    or not shutil.which("debugfs") or not os.path.exists("/dev/loop-control"),
                    reason="needs root, unshare, loop devices and debugfs")
def test_cache_verify_finds_a_change_behind_the_filesystems_back(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                           _BEHIND_THE_FS, str(repo), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["same_stat"] == [True] * 4 and got["flipped"]
    # what a normal build does not see (documented in builder/cache.py) ...
    assert got["build_rebuilt"] is False
    # ... cache verify does, and the next build makes the entry again
    assert [(r["key"], r["status"]) for r in got["rows"]] == [("d" * 64, "damaged")]
    assert not got["exists_after_verify"] and got["rebuilt_after_verify"] is True
