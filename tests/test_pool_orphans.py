"""Killing the process that owns a pool stops its workers: no orphan keeps running or idling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import alive, pool_workers, wait_until

REPO = Path(__file__).resolve().parent.parent

# The owner: a pool of two workers, each on a job that would take five minutes.
OWNER = """
import time
from pipeline.pool import Job, JobPool
with JobPool(2) as pool:
    for done in pool.run([Job("a", time.sleep, (300,)), Job("b", time.sleep, (300,))]):
        pass
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_killing_the_owner_stops_its_workers_within_seconds(sig):
    # As from a terminal: SIGINT at its default, whatever this process inherited (a shell's
    # background job ignores SIGINT, and Python then never raises KeyboardInterrupt).
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert wait_until(lambda: len(pool_workers(owner.pid)) == 2, 60), "the pool's workers never started"
        workers = pool_workers(owner.pid)
        time.sleep(1.0)  # the workers are inside their jobs now
        os.kill(owner.pid, sig)
        owner.wait(timeout=30)
        assert wait_until(lambda: not any(alive(w) for w in workers), 10), (
            f"workers {[w for w in workers if alive(w)]} outlived their owner (killed by {sig.name})"
        )
    finally:
        if owner.poll() is None:
            owner.kill()
        for w in pool_workers(owner.pid):
            os.kill(w, signal.SIGKILL)
