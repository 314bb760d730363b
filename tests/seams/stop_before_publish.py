"""rootfs-build, stopped (SIGSTOP) just before it publishes its outputs, so a
test can SIGKILL a build at exactly that moment.  A seam for tests only:
the production build has no such hook."""

import os
import signal
import sys

from builder import outputs
from builder.cli import main

_publish = outputs.OutputDir.publish


def _stop_then_publish(self: outputs.OutputDir):  # type: ignore[no-untyped-def]
    os.kill(os.getpid(), signal.SIGSTOP)
    return _publish(self)


outputs.OutputDir.publish = _stop_then_publish  # type: ignore[method-assign]
sys.exit(main(sys.argv[1:]))
