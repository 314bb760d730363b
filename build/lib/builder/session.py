"""What one run of the command knows about itself, passed explicitly.

A `Session` is made by the CLI (or a test) and handed to the build and to
every appliance: the phase the run is in (for the message when a signal
stops it) and how many appliances it started (for --json).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass
class Session:
    phase: str = "startup"
    launches: int = 0

    @contextlib.contextmanager
    def enter(self, phase: str) -> Iterator[None]:
        """Run a block as `phase`.  Not restored when an exception leaves the
        block: the error report then says where the run stopped."""
        previous, self.phase = self.phase, phase
        yield
        self.phase = previous
