"""A load test stopped with SIGTERM stops everything it started.

``run_load`` starts the server, the worker, the provider simulators, Redis and locust, each in a session
of its own (so a terminal's Ctrl-C reaches only ``run_load``, which then stops them in order). SIGTERM,
what a CI job's timeout or ``kill`` sends, used to end ``run_load`` at once and leave the rest running,
holding ports and cores. This runs a real (small) load test, sends SIGTERM once locust is running, and
looks for any process left whose command line names the run's folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_supervisor import command_line

ROOT = Path(__file__).resolve().parent.parent


def _processes_naming(folder: Path) -> list[str]:
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [f"{pid}: {command[:160]}" for pid in pids if str(folder) in (command := command_line(pid))]


def test_sigterm_stops_the_stack_it_started(tmp_path: Path) -> None:
    env = os.environ | {"TMPDIR": str(tmp_path)}  # the run's folder lands here, named in its processes
    small = ["--users", "2", "--spawn-rate", "2", "--seconds", "60"]
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "load_tests" / "run_load.py"), *small],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not any("locust" in line for line in _processes_naming(tmp_path)):
            assert run.poll() is None, run.communicate()[0].decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "locust never started"
            time.sleep(0.2)
        assert len(_processes_naming(tmp_path)) >= 3  # locust, the simulators, Redis at least
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        left = _processes_naming(tmp_path)
        for line in left:  # a failed run must not leave them running for the rest of the suite
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert run.returncode == 130, output.decode(errors="replace")[-2000:]
    assert b"everything it started has been stopped" in output
    assert left == []
