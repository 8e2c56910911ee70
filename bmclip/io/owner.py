"""Temporary folders named after the process that made them: is that process alive, and removing the folders of
those that are gone (a run killed with SIGKILL, or by a power loss, cleans up nothing itself)."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

__all__ = ["owner_tag", "pid_alive", "remove_dead_owners"]


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def owner_tag() -> str:
    """``HOST-PID`` of this process, for a temporary name that :func:`remove_dead_owners` can judge (a host name
    holds no ``-``-free guarantee, so the pid is the last field)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_dead_owners(parent: str | os.PathLike, pattern: str | re.Pattern) -> list[Path]:
    """Remove the entries of ``parent`` whose whole name matches ``pattern`` and whose owner is gone: the match's
    ``pid`` group names a process that no longer runs, on this host when the pattern has a ``host`` group (another
    host's processes cannot be judged from here: left alone). Never this process's own. Returns what was removed."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    here, me, removed = socket.gethostname(), os.getpid(), []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = rx.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if "host" in rx.groupindex and m.group("host") != here:
            continue
        if pid == me or pid_alive(pid):
            continue
        p = Path(parent) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
