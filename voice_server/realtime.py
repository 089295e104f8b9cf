"""Real-time scheduling for the processes that carry calls (``VOICEBOOK_REALTIME_PRIORITY``).

A call's audio and its booking wait on every wake-up: a media frame arriving, a Redis reply, the ledger's
thread handing back a commit. Under Linux's default policy a process woken while the cores are busy
waits for its turn behind whatever else runs there (a batch job, a backup, a load generator), and on a
small machine that wait, not the work, is most of a turn's tail and of a booking's. Telephony servers
have long offered to run under a real-time policy for this reason (FreeSWITCH's ``-rp``, Asterisk's
``-p``). With ``VOICEBOOK_REALTIME_PRIORITY`` set to 1..99, ``voicebook serve`` (its supervisor, server
processes, booking process and embedded Redis) runs under ``SCHED_RR`` at that priority and ``voicebook
worker`` one step lower, so a calendar write or a text never delays a call: a woken loop takes a core at
once from any normal process.

The policy is set on the calling thread before the process starts any other, so every thread and child it
starts inherits it. It needs an ``RLIMIT_RTPRIO`` at least that high (``docker run --ulimit rtprio=10``,
systemd's ``LimitRTPRIO=10``; the image's unprivileged user needs exactly this) or ``CAP_SYS_NICE``;
without either the process logs ``realtime_priority_refused`` and runs as before. The kernel keeps 5% of
each second for normal processes (``kernel.sched_rt_runtime_us``), so a loop that spins cannot lock the
machine up.
"""

from __future__ import annotations

import os
from typing import Literal

import structlog

log = structlog.get_logger("voicebook.realtime")

Role = Literal["server", "booking-process", "worker"]

HINT = "raise RLIMIT_RTPRIO (docker run --ulimit rtprio=N, systemd LimitRTPRIO=N, ulimit -r) or grant CAP_SYS_NICE"


def priority_for(role: Role, priority: int) -> int:
    """The ``SCHED_RR`` priority of ``role`` for the configured ``priority`` (0: none). The effect worker's
    jobs have hundreds of milliseconds of slack: it runs one step below the calls, never above normal."""
    if priority == 0:
        return 0
    return max(1, priority - 1) if role == "worker" else priority


def apply_realtime_priority(priority: int, role: Role) -> bool:
    """Put this thread, and every thread and child process it starts from now on, under ``SCHED_RR`` at
    ``priority_for(role, priority)``. True when set; False when ``priority`` is 0 (nothing changes) or the
    system refuses (logged as ``realtime_priority_refused``; the process goes on as it was)."""
    wanted = priority_for(role, priority)
    if wanted == 0:
        return False
    if not hasattr(os, "sched_setscheduler"):
        log.warning("realtime_priority_refused", role=role, priority=wanted, error="not supported here", hint=HINT)
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(wanted))
    except PermissionError as refused:
        log.warning("realtime_priority_refused", role=role, priority=wanted, error=str(refused), hint=HINT)
        return False
    log.info("realtime_priority", role=role, priority=wanted, policy="SCHED_RR")
    return True
