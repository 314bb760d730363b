"""Concurrency: builds sharing one cache and one output root, and `cache ls|prune`.

No appliance starts here: every cache is a copy of the session's demo cache
(which holds the base layer), and what differs between builds are overlays.
Where an order must be certain, the test freezes a build with SIGSTOP at a
point it observed (staging dir, cache tmp dir), starts the other one, and
lets the first go on with SIGCONT.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest
from conftest import Build, run_cli
from reliability_helpers import (
    Running,
    copy_cache,
    demo_image,
    layer_cache,
    leftovers,
    random_overlay,
    recipe,
    start_build,
    sums_verify,
)

from builder.hashing import sha256_file as sha256

pytestmark = [pytest.mark.appliance]  # uses the demo build (made with the appliance)

FORMATS = ("tar", "tar.zst")
N_MAX = 4


def _artifacts(directory: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(directory.glob("rootfs.*"))}


def _marker(directory: Path) -> str:
    with tarfile.open(directory / "rootfs.tar") as tf:
        return tf.extractfile("./etc/which").read().decode().strip()  # type: ignore[union-attr]


def _finish_all(runs: list[Running], timeout: float = 600) -> list[Running]:
    """Wait for every build; returns them in the order they ended."""
    order: list[Running] = []
    deadline = time.monotonic() + timeout
    while len(order) < len(runs):
        for run in runs:
            if run not in order and run.proc.poll() is not None:
                run.ended_at = time.monotonic()
                order.append(run)
        assert time.monotonic() < deadline, "builds did not finish"
        time.sleep(0.02)
    return order


@pytest.fixture(scope="module")
def area(demo_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recipes par0..par3: the demo base, one overlay they share and one of their own."""
    work = tmp_path_factory.mktemp("concurrency")
    image = demo_image(demo_build)
    common = random_overlay(work / "overlays" / "common", 24 << 20, "common")
    for i in range(N_MAX):
        own = random_overlay(work / "overlays" / f"own{i}", 4 << 20, f"par{i}")
        recipe(work / f"par{i}.yaml", f"par{i}", image, overlays=[common, own],
               formats=FORMATS)
    copy_cache(demo_build.cache, work / "seed")
    return work


@pytest.fixture(scope="module")
def sequential(area: Path) -> dict[str, dict[str, str]]:
    """What each recipe makes when built alone, one after the other."""
    cache = copy_cache(area / "seed", area / "seq-cache")
    out: dict[str, dict[str, str]] = {}
    for i in range(N_MAX):
        res = run_cli(area / f"par{i}.yaml", "-o", area / "seq-out", "--cache-dir", cache,
                      "--json")
        assert res.returncode == 0, res.stderr
        out[f"par{i}"] = _artifacts(area / "seq-out" / f"par{i}")
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_different_recipes_share_cache_and_output_root(
        n: int, area: Path, sequential: dict[str, dict[str, str]], tmp_path: Path) -> None:
    cache = copy_cache(area / "seed", tmp_path / "cache")
    out = tmp_path / "out"
    t0 = time.monotonic()
    runs = [start_build(area / f"par{i}.yaml", "-o", out, "--cache-dir", cache, "--json",
                        logs=tmp_path / "logs") for i in range(n)]
    _finish_all(runs)
    print(f"{n} builds together: {time.monotonic() - t0:.1f} s")
    for i, run in enumerate(runs):
        assert run.proc.returncode == 0, run.stderr
        assert run.json["appliance_launches"] == 0
        assert sums_verify(out / f"par{i}")
        assert _artifacts(out / f"par{i}") == sequential[f"par{i}"]
        assert _marker(out / f"par{i}") == f"par{i}"
        assert leftovers(out, f"par{i}", cache) == []
    # the overlay they share became one cache entry, made by one of them
    shared = [[layer for layer in run.json["layers"] if layer["kind"] == "overlay"][0]
              for run in runs]
    assert len({layer["key"] for layer in shared}) == 1
    assert sorted(layer["cache"] for layer in shared) == ["built"] + ["hit"] * (n - 1)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        [f"par{i}" for i in range(n)]


def test_same_recipe_into_same_output_dir_does_not_interleave(
        demo_build: Build, area: Path, tmp_path: Path) -> None:
    """Two builds of one recipe name, told apart by their overlays: the second
    waits for the first's lock, and the directory left is wholly the second's."""
    cache = copy_cache(area / "seed", tmp_path / "cache")
    out = tmp_path / "out"
    first_ov = random_overlay(tmp_path / "first", 32 << 20, "first")
    second_ov = random_overlay(tmp_path / "second", 32 << 20, "second")
    r = recipe(tmp_path / "same.yaml", "same", demo_image(demo_build), overlays=[first_ov],
               formats=FORMATS)

    def start(overlay: Path) -> Running:
        return start_build(r, "-o", out, "--cache-dir", cache, "--json", "-v",
                           "--set", f"overlays=[{overlay}]", logs=tmp_path / "logs")

    first = start(first_ov)
    first.wait_for(lambda: list(out.glob(".same~staging-*")), "the first build's staging")
    os.kill(first.pid, signal.SIGSTOP)   # it holds the output lock now
    try:
        second = start(second_ov)
        second.wait_for(lambda: "waiting for another build of 'same'" in second.stderr,
                        "the second build to wait")
        assert not (out / "same").exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    order = _finish_all([first, second])
    for run in order:
        assert run.proc.returncode == 0, run.stderr
    assert order == [first, second]
    assert "waiting for another build" not in first.stderr
    final = out / "same"
    assert sums_verify(final)
    assert _marker(final) == "second"
    assert {Path(a["path"]).name: a["sha256"] for a in second.json["artifacts"]} == \
        _artifacts(final)
    manifest = json.loads((final / "manifest.json").read_text())
    assert [layer["key"] for layer in manifest["layers"]] == \
        [layer["key"] for layer in second.json["layers"]]
    assert leftovers(out, "same", cache) == []


def test_two_builds_needing_the_same_missing_entry_build_it_once(
        demo_build: Build, area: Path, tmp_path: Path) -> None:
    cache = copy_cache(area / "seed", tmp_path / "cache")
    out = tmp_path / "out"
    shared = random_overlay(tmp_path / "shared", 48 << 20, "shared")
    image = demo_image(demo_build)
    recipes = [recipe(tmp_path / f"need{i}.yaml", f"need{i}", image, overlays=[shared],
                      formats=("tar",)) for i in (1, 2)]
    one = start_build(recipes[0], "-o", out, "--cache-dir", cache, "--json", "-v",
                      logs=tmp_path / "logs")
    one.wait_for(lambda: list((cache / "tmp").glob("overlay-*/layer.tar")),
                 "the first build to start the overlay entry")
    os.kill(one.pid, signal.SIGSTOP)   # it holds the entry's lock, half-way through
    try:
        two = start_build(recipes[1], "-o", out, "--cache-dir", cache, "--json", "-v",
                          logs=tmp_path / "logs")
        two.wait_for(lambda: "waiting for another build to finish cache entry" in two.stderr,
                     "the second build to wait for the entry")
    finally:
        os.kill(one.pid, signal.SIGCONT)
    _finish_all([one, two])
    for run in (one, two):
        assert run.proc.returncode == 0, run.stderr
        assert layer_cache(run.json, "base") == ["hit"]
    assert layer_cache(one.json, "overlay") == ["built"]
    assert layer_cache(two.json, "overlay") == ["hit"]
    keys = {[la["key"] for la in run.json["layers"] if la["kind"] == "overlay"][0]
            for run in (one, two)}
    assert len(keys) == 1
    assert sha256(out / "need1" / "rootfs.tar") == sha256(out / "need2" / "rootfs.tar")
    assert [p.name for p in (cache / "tmp").iterdir()] == []


# ---------------------------------------------------------------------------
# cache ls | prune


def _entry_sizes(cache: Path) -> dict[str, int]:
    return {d.name: sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            for d in (cache / "entries").iterdir()}


def test_cache_ls_lists_entries(area: Path, tmp_path: Path) -> None:
    cache = copy_cache(area / "seed", tmp_path / "cache")
    res = run_cli("cache", "ls", "--cache-dir", cache, "--json")
    assert res.returncode == 0, res.stderr
    sizes = _entry_sizes(cache)
    rows = {row["key"]: row for row in res.json["entries"]}
    assert set(rows) == set(sizes) and len(rows) >= 5
    for key, row in rows.items():
        meta = json.loads((cache / "entries" / key / "entry.json").read_text())
        assert (row["kind"], row["label"], row["size"]) == (meta["kind"], meta["label"],
                                                            sizes[key])
    assert {row["kind"] for row in rows.values()} >= {"base", "element"}
    assert res.json["total"] == sum(sizes.values())
    text = run_cli("cache", "ls", "--cache-dir", cache)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-1] == f"{len(rows)} entries, {sum(sizes.values())} bytes in {cache}"
    for key, row in rows.items():
        line = next(li for li in lines if li.startswith(key[:16]))
        assert row["kind"] in line and str(row["size"]) in line and row["label"] in line
    empty = run_cli("cache", "ls", "--cache-dir", tmp_path / "empty")
    assert empty.stdout.strip() == f"0 entries, 0 bytes in {tmp_path / 'empty'}"


def test_cache_prune_removes_least_recently_used_first(area: Path, tmp_path: Path) -> None:
    cache = copy_cache(area / "seed", tmp_path / "cache")
    sizes = _entry_sizes(cache)
    order = sorted(sizes)   # pretend they were last used in this order
    now = time.time()
    for age, key in enumerate(reversed(order)):
        t = now - 3600 * (age + 1)
        os.utime(cache / "entries" / key / "entry.json", (t, t))
    total = sum(sizes.values())
    limit = total - sizes[order[0]] - sizes[order[1]]
    res = run_cli("cache", "prune", "--max-size", str(limit), "--cache-dir", cache, "--json")
    assert res.returncode == 0, res.stderr
    assert res.json == {"removed": 2, "freed": sizes[order[0]] + sizes[order[1]]}
    assert sorted(_entry_sizes(cache)) == order[2:]
    # already small enough: nothing goes; units are accepted
    res = run_cli("cache", "prune", "--max-size", "1G", "--cache-dir", cache, "--json")
    assert res.json == {"removed": 0, "freed": 0}
    # ls reports when each entry was last used
    ls = run_cli("cache", "ls", "--cache-dir", cache, "--json").json["entries"]
    assert max(ls, key=lambda row: row["last_used"])["key"] == order[-1]
    res = run_cli("cache", "prune", "--cache-dir", cache, "--json")
    assert res.json["removed"] == len(order) - 2
    assert _entry_sizes(cache) == {}


def test_cache_prune_spares_entries_a_running_build_uses(demo_build: Build, area: Path,
                                                         tmp_path: Path) -> None:
    """A real build frozen while it writes its outputs holds its entries; prune
    removes everything else, plus orphaned tmp dirs, but not a live one."""
    cache = copy_cache(area / "seed", tmp_path / "cache")
    out = tmp_path / "out"
    big = random_overlay(tmp_path / "big", 96 << 20, "big")
    r = recipe(tmp_path / "inuse.yaml", "inuse", demo_image(demo_build), overlays=[big],
               formats=("tar", "tar.gz"))
    # orphans of killed builds, and a tmp dir whose builder is alive (its lock held)
    for name in ("base-orphan1", "run-orphan2"):
        (cache / "tmp" / name).mkdir(parents=True)
        (cache / "tmp" / name / "layer.tar").write_bytes(b"x" * 1024)
    (cache / "tmp" / "base-orphan1.lock").touch()
    (cache / "tmp" / "element-live").mkdir()
    live = os.open(cache / "tmp" / "element-live.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(live, fcntl.LOCK_EX)
    before = set(_entry_sizes(cache))
    build = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs")
    try:
        build.wait_for(lambda: any(p.stat().st_size > 0
                                   for p in out.glob(".inuse~staging-*/rootfs.tar.gz")),
                       "the build to write its outputs")
        os.kill(build.pid, signal.SIGSTOP)
        prune = run_cli("cache", "prune", "--cache-dir", cache, "--json")
    finally:
        os.kill(build.pid, signal.SIGCONT)
    assert prune.returncode == 0, prune.stderr
    assert build.finish() == 0, build.stderr
    used = {layer["key"] for layer in build.json["layers"]}
    left = set(_entry_sizes(cache))
    assert used <= left, "prune removed an entry in use"
    assert left == used
    assert prune.json["removed"] == len(before - used) > 0
    assert sums_verify(out / "inuse")
    tmp = sorted(p.name for p in (cache / "tmp").iterdir())
    assert tmp == ["element-live", "element-live.lock"]
    os.close(live)


def test_cache_prune_leaves_a_running_builds_work_dir(demo_build: Build, area: Path,
                                                      tmp_path: Path) -> None:
    """A run step's hooks tree is laid out in the cache's tmp/ before its
    appliance starts; a prune meanwhile must not take it from the build."""
    cache = copy_cache(area / "seed", tmp_path / "cache")
    install_d = tmp_path / "elements" / "slow" / "install.d"
    install_d.mkdir(parents=True)
    (install_d / "10-wait").write_text("#!/bin/bash\nsleep 600\n")
    (install_d / "10-wait").chmod(0o755)
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(f"name: slow\nbase: {{image: {demo_image(demo_build)}}}\n"
                      "elements: [slow]\n")
    build = start_build(recipe, "-o", tmp_path / "out", "--cache-dir", cache, "--json",
                        logs=tmp_path / "logs")
    try:
        build.wait_for(lambda: list((cache / "tmp").glob("work-*/hooks-*")),
                       "the hooks tree to be laid out")
        os.kill(build.pid, signal.SIGSTOP)
        work = list((cache / "tmp").glob("work-*"))
        prune = run_cli("cache", "prune", "--cache-dir", cache, "--json")
        assert prune.returncode == 0, prune.stderr
        assert all(p.exists() for p in work), "prune removed a running build's work dir"
        os.kill(build.pid, signal.SIGTERM)
    finally:
        os.kill(build.pid, signal.SIGCONT)
    assert build.finish(timeout=120) == 128 + signal.SIGTERM, build.stderr
    assert "stopped by signal 15 during" in build.stderr
    assert [p.name for p in (cache / "tmp").iterdir()] == []
