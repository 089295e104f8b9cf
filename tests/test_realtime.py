"""``VOICEBOOK_REALTIME_PRIORITY`` (voice_server/realtime.py): the real Linux policy of a real process,
its later threads and children, and the refusal an unprivileged process gets. Each case runs in a child
interpreter, so the test process's own policy never changes."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from voice_server.realtime import priority_for
from voice_server.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, os, subprocess, sys, threading
from structlog.testing import capture_logs
from voice_server.realtime import apply_realtime_priority

with capture_logs() as logs:
    applied = apply_realtime_priority(int(sys.argv[1]), sys.argv[2])
seen = {}
def look():
    seen["thread"] = [os.sched_getscheduler(0), os.sched_getparam(0).sched_priority]
thread = threading.Thread(target=look)
thread.start()
thread.join()
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)"],
    capture_output=True, text=True, check=True,
).stdout.split()
print(json.dumps({
    "applied": applied,
    "main": [os.sched_getscheduler(0), os.sched_getparam(0).sched_priority],
    "thread": seen["thread"],
    "child": [int(word) for word in child],
    "events": [(entry["event"], entry.get("priority")) for entry in logs],
}))
"""


PR_CAPBSET_DROP = 24  # <linux/prctl.h>
CAP_SYS_NICE = 23  # <linux/capability.h>
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it


def probe(priority: int, role: str, *, unprivileged: bool = False, rtprio: int = 0) -> dict[str, object]:
    def drop_privilege() -> None:
        # In the child before exec: RLIMIT_RTPRIO at ``rtprio``, and CAP_SYS_NICE out of the bounding set, so
        # even root comes out of the exec without it (as the image's unprivileged user runs).
        resource.setrlimit(resource.RLIMIT_RTPRIO, (rtprio, rtprio))
        if LIBC.prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_NICE)")

    finished = subprocess.run(
        [sys.executable, "-c", PROBE, str(priority), role],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        preexec_fn=drop_privilege if unprivileged else None,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    result: dict[str, object] = json.loads(finished.stdout)
    return result


def may_set_realtime(priority: int) -> bool:
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= priority


def test_the_worker_runs_a_step_below_the_calls_and_never_at_zero() -> None:
    assert [priority_for("server", p) for p in (0, 1, 10)] == [0, 1, 10]
    assert [priority_for("booking-process", p) for p in (0, 1, 10)] == [0, 1, 10]
    assert [priority_for("worker", p) for p in (0, 1, 10)] == [0, 1, 9]


def test_the_setting_is_off_by_default_and_bounded() -> None:
    assert Settings.from_env({}).realtime_priority == 0
    assert Settings.from_env({"VOICEBOOK_REALTIME_PRIORITY": "10"}).realtime_priority == 10
    for wrong in ("100", "-1", "high"):
        with pytest.raises(SettingsError, match="VOICEBOOK_REALTIME_PRIORITY"):
            Settings.from_env({"VOICEBOOK_REALTIME_PRIORITY": wrong})


def test_priority_zero_changes_nothing() -> None:
    seen = probe(0, "server")
    assert seen["applied"] is False
    assert seen["main"] == seen["thread"] == seen["child"] == [os.SCHED_OTHER, 0]
    assert seen["events"] == []


def test_the_policy_reaches_later_threads_and_children() -> None:
    if not may_set_realtime(7):
        pytest.skip("this user may not set a real-time policy (no CAP_SYS_NICE, RLIMIT_RTPRIO below 7)")
    seen = probe(7, "server")
    assert seen["applied"] is True
    assert seen["main"] == seen["thread"] == seen["child"] == [os.SCHED_RR, 7]
    assert seen["events"] == [["realtime_priority", 7]]
    worker = probe(7, "worker")
    assert worker["main"] == worker["child"] == [os.SCHED_RR, 6]


def test_a_refused_priority_is_logged_and_the_process_runs_as_before() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping CAP_SYS_NICE from the bounding set needs root (CAP_SETPCAP)")
    seen = probe(7, "booking-process", unprivileged=True)
    assert seen["applied"] is False
    assert seen["main"] == seen["thread"] == seen["child"] == [os.SCHED_OTHER, 0]
    assert seen["events"] == [["realtime_priority_refused", 7]]


def test_an_rtprio_limit_is_enough_without_the_capability() -> None:
    """What ``docker run --ulimit rtprio=10`` gives the image's unprivileged user."""
    if os.geteuid() != 0:
        pytest.skip("dropping CAP_SYS_NICE from the bounding set needs root (CAP_SETPCAP)")
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[1] < 10:
        pytest.skip("the hard RLIMIT_RTPRIO here is below 10, and raising it needs CAP_SYS_RESOURCE")
    allowed = probe(7, "booking-process", unprivileged=True, rtprio=10)
    assert allowed["applied"] is True
    assert allowed["main"] == allowed["child"] == [os.SCHED_RR, 7]
