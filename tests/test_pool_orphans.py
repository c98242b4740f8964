"""Killing the process that owns a pool stops its workers: no orphan keeps running or idling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The owner: a pool of two workers, each on a job that would take five minutes.
OWNER = """
import time
from pipeline.pool import Job, JobPool
with JobPool(2) as pool:
    for done in pool.run([Job("a", time.sleep, (300,)), Job("b", time.sleep, (300,))]):
        pass
"""


def _children(pid: int) -> list[int]:
    """Pids of the pool workers of ``pid`` (spawned interpreters), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running or sleeping (a zombie, dead and waiting to be reaped, is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_killing_the_owner_stops_its_workers_within_seconds(sig):
    # As from a terminal: SIGINT at its default, whatever this process inherited (a shell's
    # background job ignores SIGINT, and Python then never raises KeyboardInterrupt).
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _wait(lambda: len(_children(owner.pid)) == 2, 60), "the pool's workers never started"
        workers = _children(owner.pid)
        time.sleep(1.0)  # the workers are inside their jobs now
        os.kill(owner.pid, sig)
        owner.wait(timeout=30)
        assert _wait(lambda: not any(_alive(w) for w in workers), 10), (
            f"workers {[w for w in workers if _alive(w)]} outlived their owner (killed by {sig.name})")
    finally:
        if owner.poll() is None:
            owner.kill()
        for w in _children(owner.pid):
            os.kill(w, signal.SIGKILL)
