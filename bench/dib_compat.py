"""Compatibility report: `rootfs-build validate` on every element
diskimage-builder ships, one recipe per element, and a count of the
accepted and of the refused by reason.

    .venv/bin/python bench/dib_compat.py [--json] [--list]

It validates only (no appliance): a refusal is what a DIB user meets first.
rootfs-build searches diskimage-builder's elements by itself (last, after
its own); `--elements-path` puts them on ELEMENTS_PATH instead, ahead of the
shipped elements, as a user of a revision that did not search them had to.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from diskimage_builder import paths

# Refusal messages are grouped by what they say, not by the element's name
# or path.
REASONS = [
    (r"would run on the build host", "host phase ({phase})"),
    (r"provided twice: operating-system", "provides operating-system (the base image is it)"),
    (r"provided twice", "provided twice"),
    (r"not found \(required by", "needs an element that is not there"),
    (r"uses (\S+), which rootfs-build does not support", "unsupported: {0}"),
    (r"has (\S+), which rootfs-build would not use", "unused content: {0}"),
    (r"unknown key", "element.yaml"),
]


def classify(line: str) -> str:
    for pattern, label in REASONS:
        m = re.search(pattern, line)
        if m:
            phase = re.search(r"phase (\S+)", line)
            return label.format(*m.groups(), phase=phase.group(1) if phase else "?")
    return "other: " + line[:100]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    ap.add_argument("--list", action="store_true", help="print each element's result")
    ap.add_argument("--elements-path", action="store_true",
                    help="set ELEMENTS_PATH to diskimage-builder's elements directory")
    args = ap.parse_args()
    dib = Path(paths.get_path("elements"))
    names = sorted(p.name for p in dib.iterdir()
                   if p.is_dir() and not p.name.startswith(("_", ".")))
    env = {k: v for k, v in os.environ.items() if k != "ELEMENTS_PATH"}
    if args.elements_path:
        env["ELEMENTS_PATH"] = str(dib)
    accepted: list[str] = []
    refused: dict[str, list[str]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        for name in names:
            recipe.write_text(f"name: compat\nbase: {{image: base.qcow2}}\nelements: [{name}]\n")
            proc = subprocess.run([sys.executable, "-m", "builder.cli", "validate", str(recipe)],
                                  capture_output=True, text=True, env=env, cwd=tmp)
            if proc.returncode == 0:
                accepted.append(name)
                result = "accepted"
            else:
                lines = [x for x in proc.stderr.splitlines() if "warning:" not in x]
                result = classify(lines[-1] if lines else "(no message)")
                refused[result].append(name)
            if args.list:
                print(f"{name:32} {result}")
    total = len(names)
    if args.json:
        print(json.dumps({"total": total, "accepted": len(accepted),
                          "refused": {k: len(v) for k, v in refused.items()}}, indent=1))
        return 0
    print(f"diskimage-builder elements: {total}")
    print(f"  accepted by validate: {len(accepted)}")
    print(f"  refused:              {total - len(accepted)}")
    for reason, who in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        print(f"    {len(who):4}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
