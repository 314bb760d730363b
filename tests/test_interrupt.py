"""Interruption: SIGINT, SIGTERM and SIGKILL sent to real builds in each phase.

A graceful stop (SIGINT, SIGTERM) must end the build within seconds with one
line naming the phase, kill the appliance and leave nothing behind; SIGKILL
must leave nothing that looks complete and nothing the next build would use.
Appliance launches are the cost, so only base extraction uses a cold cache;
the other phases start from a copy of the session's demo cache.
"""

from __future__ import annotations

import signal
import tarfile
import time
from pathlib import Path

import pytest
from conftest import Build, run_cli
from reliability_helpers import (
    _stat,
    alive,
    copy_cache,
    demo_image,
    entries_of_kind,
    error_lines,
    gone_within,
    layer_cache,
    leftovers,
    random_overlay,
    recipe,
    sleepy_element,
    start_build,
    sums_verify,
)

from builder.hashing import sha256_file as sha256

pytestmark = [pytest.mark.appliance]

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]
STOP_WITHIN = 15.0   # seconds from the signal to the exit
BIG = 200 << 20      # incompressible overlay bytes: writing tar.gz takes seconds


def _assert_stopped(run, signum: int, seconds: float, phase: str, out: Path, name: str,
                    cache: Path) -> None:
    assert seconds < STOP_WITHIN, f"took {seconds:.1f} s to stop"
    assert run.proc.returncode == (130 if signum == signal.SIGINT else 128 + signum), run.stderr
    errors = error_lines(run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith("rootfs-build: ") and f"during {phase};" in errors[0], errors[0]
    assert "nothing was published" in errors[0]
    assert run.json["phase"] == phase
    assert not gone_within(run.qemus(), 0), "qemu outlived the build"
    assert not gone_within(run.seen, 5), "a process of the build outlived it"
    assert leftovers(out, name, cache) == []
    assert not (out / name).exists()


@pytest.fixture(scope="module")
def reference(demo_build: Build, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """sha256 of rootfs.tar for the small 'cold' recipe, built warm (no appliance)."""
    work = tmp_path_factory.mktemp("reference")
    r = recipe(work / "cold.yaml", "cold", demo_image(demo_build))
    res = run_cli(r, "-o", work / "out", "--cache-dir", copy_cache(demo_build.cache,
                                                                   work / "cache"), "--json")
    assert res.returncode == 0, res.stderr
    assert res.json["appliance_launches"] == 0
    return {"rootfs.tar": sha256(work / "out" / "cold" / "rootfs.tar")}


# ---------------------------------------------------------------------------
# base extraction (cold cache: the appliance streams the image's tree)


def _extracting(cache: Path) -> bool:
    """The appliance's tar stream has started arriving in the cache's tmp/."""
    return any((cache / "tmp").glob("base-*/layer.tar"))


def _freeze_in_extraction(run, cache: Path) -> None:
    """Stop the build while the tree streams in (the stream takes about a
    second for the demo image, so the signal is then sure to land in it)."""
    run.wait_for(lambda: _extracting(cache) and run.qemus(), "extraction")
    run.freeze()
    assert _extracting(cache), "extraction ended before the build was frozen"


def test_signal_during_base_extraction(demo_build: Build, tmp_path: Path) -> None:
    # SIGTERM only: SIGINT takes the same path (one handler), and is sent
    # during the launch, a run step and the assembly below.
    signum = signal.SIGTERM
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = recipe(tmp_path / "cold.yaml", "cold", demo_image(demo_build))
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs")
    _freeze_in_extraction(run, cache)
    seconds = run.signal(signum)
    print(f"{signal.Signals(signum).name} during extraction: stopped in {seconds:.2f} s")
    _assert_stopped(run, signum, seconds, "base image extraction", out, "cold", cache)
    assert run.json["appliance_launches"] == 1
    assert entries_of_kind(cache, "base") == []
    # (that the next build extracts afresh and makes the reference bytes is
    # shown after a SIGKILL below, the harder case)


LAUNCH_MOMENTS = {
    # the first process of the appliance's start: the base step's qemu-img
    # check of a qcow2 base right before the launch, or the launch's own
    # supermin and qemu probes; not any child (ldconfig, say, before the
    # signal handlers exist)
    "starting": lambda run, first_seen: any(
        p.comm.startswith(("supermin", "qemu")) for p in run.seen),
    # an appliance qemu has been booting for a second
    "booting": lambda run, first_seen: any(
        time.monotonic() - first_seen.setdefault(p, time.monotonic()) >= 1.0
        for p in run.qemus() if p.comm.startswith("qemu-system") and alive(p)),
}


@pytest.mark.parametrize(("moment", "signum"), [
    pytest.param("starting", signal.SIGINT, id="starting-SIGINT"),
    pytest.param("booting", signal.SIGINT, id="booting-SIGINT"),
    pytest.param("booting", signal.SIGTERM, id="booting-SIGTERM"),
])
def test_signal_during_appliance_launch(moment: str, signum: int, demo_build: Build,
                                        tmp_path: Path) -> None:
    """A signal while the appliance starts kills qemu at once (or as soon as
    it appears) instead of waiting for it to boot, and the build exits
    cleanly: no crash in libguestfs, no qemu left."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = recipe(tmp_path / "cold.yaml", "cold", demo_image(demo_build))
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs")
    first_seen: dict = {}
    run.wait_for(lambda: LAUNCH_MOMENTS[moment](run, first_seen), f"the launch ({moment})")
    run.freeze()
    assert not _extracting(cache), "the launch ended before the build was frozen"
    seconds = run.signal(signum)
    print(f"{signal.Signals(signum).name} while the appliance was {moment}: "
          f"stopped in {seconds:.2f} s")
    _assert_stopped(run, signum, seconds, "base image extraction", out, "cold", cache)
    assert run.json["appliance_launches"] == 0
    assert seconds < 5, f"took {seconds:.1f} s: the launch was waited for"
    assert entries_of_kind(cache, "base") == []


def test_sigkill_during_extraction_leaves_nothing_usable(demo_build: Build, tmp_path: Path,
                                                         reference: dict[str, str]) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = recipe(tmp_path / "cold.yaml", "cold", demo_image(demo_build))
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs")
    _freeze_in_extraction(run, cache)
    run.signal(signal.SIGKILL)
    torn = list((cache / "tmp").glob("base-*"))
    assert torn, "expected the killed build's partial layer in tmp/"
    assert entries_of_kind(cache, "base") == []
    assert not (out / "cold").exists()
    # libguestfs' recovery process takes the appliance down with its parent
    assert not gone_within(run.qemus(), 10), "qemu outlived the killed build"
    # Two builds at once after the kill: the torn layer is never used; one
    # extracts afresh, the other waits for that entry and reuses it.
    runs = [start_build(r, "-o", tmp_path / f"out{i}", "--cache-dir", cache, "--json",
                        logs=tmp_path / "logs") for i in (1, 2)]
    for run in runs:
        assert run.finish() == 0, run.stderr
    assert sorted(layer_cache(run.json, "base")[0] for run in runs) == ["built", "hit"]
    assert sum(run.json["appliance_launches"] for run in runs) == 1
    for i in (1, 2):
        assert sums_verify(tmp_path / f"out{i}" / "cold")
        assert sha256(tmp_path / f"out{i}" / "cold" / "rootfs.tar") == reference["rootfs.tar"]
    assert not any(p.exists() for p in torn)


# ---------------------------------------------------------------------------
# a run step (cached base; the script sleeps inside the appliance)


@pytest.fixture(scope="module")
def run_area(demo_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo cache and the sleepy element, shared by both signals so
    the follow-up build's run step is made once."""
    work = tmp_path_factory.mktemp("run-step")
    copy_cache(demo_build.cache, work / "cache")
    sleepy_element(work / "elements")
    recipe(work / "sleepy.yaml", "sleepy", demo_image(demo_build), elements=["sleepy"],
           params={"nap": 1000})
    return work


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_run_step(signum: int, run_area: Path, tmp_path: Path) -> None:
    cache, out, r = run_area / "cache", tmp_path / "out", run_area / "sleepy.yaml"
    runs_before = entries_of_kind(cache, "run")
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs",
                      env={"LIBGUESTFS_TRACE": "1"})  # to see the script start
    run.wait_for(lambda: "libguestfs: trace: command " in run.stderr, "the script to start",
                 timeout=600)
    time.sleep(1.0)  # the script is sleeping inside the appliance now
    assert run.qemus()
    seconds = run.signal(signum)
    print(f"{signal.Signals(signum).name} during a run step: stopped in {seconds:.2f} s")
    step = "running element sleepy (install.d/10-sleep)"
    _assert_stopped(run, signum, seconds, step, out, "sleepy", cache)
    assert run.json["appliance_launches"] == 1
    assert entries_of_kind(cache, "run") == runs_before  # nothing of the stopped step
    # the next build (without the long nap) runs the step and publishes
    again = run_cli(r, "-o", out, "--cache-dir", cache, "--json", "--set", "params.nap=0")
    assert again.returncode == 0, again.stderr
    assert layer_cache(again.json, "base") == ["hit"]
    assert layer_cache(again.json, "run") in (["built"], ["hit"])
    assert sums_verify(out / "sleepy")
    with tarfile.open(out / "sleepy" / "rootfs.tar") as tf:
        assert tf.extractfile("./opt/slept").read() == b"slept 0\n"  # type: ignore[union-attr]
    assert leftovers(out, "sleepy", cache) == []


# ---------------------------------------------------------------------------
# assembly and compression (cached layers; 200 MB that does not compress)


@pytest.fixture(scope="module")
def big_area(demo_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("assembly")
    copy_cache(demo_build.cache, work / "cache")
    random_overlay(work / "overlay", BIG, "big")
    recipe(work / "big.yaml", "big", demo_image(demo_build), overlays=[work / "overlay"],
           formats=("tar", "tar.gz", "tar.zst"))
    return work


@pytest.fixture(scope="module")
def big_reference(big_area: Path) -> dict[str, str]:
    """The artifacts of an uninterrupted build (this also caches the overlay layer)."""
    out = big_area / "reference"
    res = run_cli(big_area / "big.yaml", "-o", out, "--cache-dir", big_area / "cache",
                  "--json")
    assert res.returncode == 0, res.stderr
    return {p.name: sha256(p) for p in (out / "big").glob("rootfs.*")}


def _writing(out: Path) -> bool:
    """Assembly is under way: the compressed tar in the staging dir has data."""
    return any(p.stat().st_size > (1 << 20) for p in out.glob(".big~staging-*/rootfs.tar.gz"))


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_assembly(signum: int, big_area: Path, big_reference: dict[str, str],
                                tmp_path: Path) -> None:
    cache, out, r = big_area / "cache", tmp_path / "out", big_area / "big.yaml"
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs")
    run.wait_for(lambda: _writing(out), "compression")
    seconds = run.signal(signum)
    print(f"{signal.Signals(signum).name} during assembly: stopped in {seconds:.2f} s")
    _assert_stopped(run, signum, seconds, "assembly", out, "big", cache)
    assert run.json["appliance_launches"] == 0
    again = run_cli(r, "-o", out, "--cache-dir", cache, "--json")
    assert again.returncode == 0, again.stderr
    assert sums_verify(out / "big")
    assert {p.name: sha256(p) for p in (out / "big").glob("rootfs.*")} == big_reference
    assert leftovers(out, "big", cache) == []


def _before_publishing(out: Path) -> bool:
    """Every artifact, manifest.json and SHA256SUMS are complete in staging; the
    rename into place comes next (the build stops itself there, see env)."""
    return any(out.glob(".big~staging-*/SHA256SUMS"))


@pytest.mark.parametrize("moment", [pytest.param(_writing, id="assembly"),
                                    pytest.param(_before_publishing, id="before-publishing")])
def test_sigkill_during_assembly_leaves_no_complete_looking_output(
        moment, big_area: Path, big_reference: dict[str, str], tmp_path: Path) -> None:
    cache, out, r = big_area / "cache", tmp_path / "out", big_area / "big.yaml"
    seam = "stop_before_publish" if moment is _before_publishing else None
    run = start_build(r, "-o", out, "--cache-dir", cache, "--json", logs=tmp_path / "logs",
                      seam=seam)
    run.wait_for(lambda: moment(out), moment.__name__)
    if seam:
        run.wait_for(lambda: (_stat(run.pid) or (0, "", "", 0))[2] == "T", "the stop")
    run.signal(signal.SIGKILL)
    assert not (out / "big").exists()
    assert not list(out.glob("big*")), list(out.iterdir())
    assert list(out.glob(".big~staging-*"))  # hidden, and removed by the next build
    again = run_cli(r, "-o", out, "--cache-dir", cache, "--json")
    assert again.returncode == 0, again.stderr
    assert sums_verify(out / "big")
    assert {p.name: sha256(p) for p in (out / "big").glob("rootfs.*")} == big_reference
    assert leftovers(out, "big", cache) == []


# ---------------------------------------------------------------------------
# damaged cache entries


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_entry_is_discarded_and_rebuilt(damage: str, demo_build: Build,
                                                      tmp_path: Path) -> None:
    cache = copy_cache(demo_build.cache, tmp_path / "cache")

    def build(out: str) -> dict:
        res = run_cli(demo_build.recipe, "-o", tmp_path / out, "--cache-dir", cache, "--json",
                      "--set", "output.formats=[tar, tar.zst]")
        assert res.returncode == 0, res.stderr
        return {"json": res.json, "stderr": res.stderr}

    first = build("one")
    assert first["json"]["appliance_launches"] == 0
    victim = next(layer for layer in first["json"]["layers"]
                  if layer["label"] == "element rexec")
    tar = cache / "entries" / victim["key"] / "layer.tar"
    size = tar.stat().st_size
    if damage == "flip":
        with open(tar, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
    else:
        with open(tar, "r+b") as f:
            f.truncate(size - 512)
    second = build("two")
    warnings = [line for line in second["stderr"].splitlines() if "damaged" in line]
    assert warnings == [f"rootfs-build: warning: cache entry {victim['key'][:12]} is damaged "
                        "(its files do not match their checksums); rebuilding it"]
    rebuilt = {layer["label"]: layer["cache"] for layer in second["json"]["layers"]}
    assert rebuilt["element rexec"] == "built"
    assert [c for label, c in rebuilt.items() if label != "element rexec"] == \
        ["hit"] * (len(rebuilt) - 1)
    assert second["json"]["appliance_launches"] == 0
    for name in ("rootfs.tar", "rootfs.tar.zst", "manifest.json", "SHA256SUMS"):
        assert sha256(tmp_path / "one" / "demo" / name) == \
            sha256(tmp_path / "two" / "demo" / name), name
    assert tar.stat().st_size == size
    third = build("three")   # the rebuilt entry is good: no warning, all hits
    assert "damaged" not in third["stderr"]
    assert set(layer_cache(third["json"], "element")) == {"hit"}
