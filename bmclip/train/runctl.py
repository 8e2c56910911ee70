"""Run control for ``bmclip train``: stop/checkpoint signals, the ``out_dir`` lock and operator output.

Signals: SIGTERM and SIGINT ask the run to stop after the current step with a checkpoint; SIGUSR1 asks
for a checkpoint (``train.on_usr1=checkpoint``, then training continues) or for the same stop
(``on_usr1=stop``). The handler only records the request; the loop acts on it at the next step boundary,
after an all-reduce so that every rank stops (or checkpoints) at the same step. A repeated SIGTERM or
SIGINT while stopping is noted and ignored, so it cannot cut the checkpoint write short; a third SIGINT
aborts at once (KeyboardInterrupt), and even then checkpoints are atomic, so nothing half-written is
ever picked up.

The lock: ``OUT/.bmclip.lock`` holds the host and pid of the run writing there. A second run into the
same ``out_dir`` is refused while that process lives; a lock left by a dead process on this host is taken
over (with a note); a lock from another host cannot be checked from here, so it is refused with a message
naming the host unless ``break_lock=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from bmclip.errors import ConfigError
from bmclip.io import atomic_write_text
from bmclip.io.owner import pid_alive
from bmclip.progress import format_duration, is_terminal

LOCK_NAME = ".bmclip.lock"


def _raw_write(fd: int, msg: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a write to the same stream,
    # and a re-entrant buffered write raises.
    try:
        os.write(fd, msg.encode("utf-8", "replace"))
    except OSError:
        pass


def resume_hint(resume: str) -> str:
    """What a stopped run tells its operator to do to go on from its checkpoint, for its ``resume`` setting.

    Only ``resume=auto`` picks the stop's checkpoint up when the same command is rerun: with ``none`` the rerun
    sets the checkpoints aside and starts afresh, with a PATH it starts from that older checkpoint again.
    """
    if resume == "auto":
        return "rerun the same command to resume"
    return f"this run has resume={resume}: rerun it with --resume=auto to resume from that checkpoint"


class DataWaitInterrupted(Exception):
    """A stop signal arrived while a single-process run waited for its next batch (see StopSignals.data_wait)."""


class StopSignals:
    """Records SIGTERM / SIGINT / SIGUSR1 for the training loop (install in the main thread only).

    A stop signal normally takes effect at the next step boundary. While the loop waits for data inside
    ``data_wait()`` (a loader searching a damaged data set can take minutes to hand out a batch) a single-process
    run is interrupted at once: the handler raises DataWaitInterrupted there, and the trainer checkpoints the last
    finished step. Several ranks keep the step-boundary rule (every rank must stop at the same step).
    """

    HANDLED = ("SIGTERM", "SIGINT", "SIGUSR1")
    ABORT_AFTER_SIGINTS = 3  # the third SIGINT aborts at once (KeyboardInterrupt)

    def __init__(self, on_usr1: str = "checkpoint", rank: int = 0,
                 resume_hint: str = "rerun the same command to resume"):
        if on_usr1 not in ("checkpoint", "stop"):
            raise ConfigError(f"on_usr1: must be checkpoint or stop, got {on_usr1!r}")
        self.on_usr1 = on_usr1
        self.rank = rank
        self.resume_hint = resume_hint  # how to go on from the stop's checkpoint (see resume_hint())
        self.stop: str | None = None  # name of the first signal that asked to stop
        self.checkpoint = False  # a SIGUSR1 checkpoint request not yet acted on
        self.step = 0  # the last finished step (for the messages)
        self.repeats = 0  # stop signals after the first
        self.sigints = 0  # SIGINTs among all stop signals (the first included)
        self.interrupt_data_wait = False  # set by a single-process trainer: stop signals end a data wait at once
        self._in_data_wait = False
        self._old: dict[int, object] = {}

    @contextlib.contextmanager
    def data_wait(self):
        """The loop waits for its next batch in this block (a stop signal may raise DataWaitInterrupted)."""
        self._in_data_wait = True
        try:
            if self.stop is not None and self.interrupt_data_wait:
                raise DataWaitInterrupted(self.stop)
            yield
        finally:
            self._in_data_wait = False

    def install(self) -> bool:
        """Install the handlers; False (nothing installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for name in self.HANDLED:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def stop_signum(self) -> int:
        """The number of the signal that asked to stop, 0 when none did."""
        return int(getattr(signal, self.stop)) if self.stop else 0

    def take_checkpoint_request(self) -> bool:
        """The pending SIGUSR1 checkpoint request (cleared by reading it)."""
        want, self.checkpoint = self.checkpoint, False
        return want

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        who = f"[bmclip] rank {self.rank}: " if self.rank else "[bmclip] "
        if name == "SIGUSR1" and self.on_usr1 == "checkpoint":
            self.checkpoint = True
            _raw_write(2, f"\n{who}SIGUSR1: writing a checkpoint after step {self.step + 1}, then continuing\n")
            return
        if self.stop is None:
            self.sigints += name == "SIGINT"
            self.stop = name
            if self._in_data_wait and self.interrupt_data_wait:
                _raw_write(2, f"\n{who}{name} while waiting for data: stopping at step {self.step} with a "
                              f"checkpoint ({self.resume_hint})\n")
                self._in_data_wait = False
                raise DataWaitInterrupted(name)
            _raw_write(2, f"\n{who}{name}: stopping after step {self.step + 1} with a checkpoint "
                          f"({self.resume_hint})\n")
            return
        self.repeats += 1
        if name == "SIGINT":
            self.sigints += 1
            if self.sigints >= self.ABORT_AFTER_SIGINTS:
                _raw_write(2, f"\n{who}SIGINT again: aborting without a checkpoint (the newest complete one is "
                              "kept)\n")
                raise KeyboardInterrupt
        left = self.ABORT_AFTER_SIGINTS - self.sigints
        _raw_write(2, f"\n{who}{name} again: already stopping ({self.stop}); the checkpoint is being written "
                      f"({left} more SIGINT{'s' if left > 1 else ''} abort{'' if left > 1 else 's'} without it)\n")


# ---------------------------------------------------------------------------------------------------
# out_dir lock

def _read_lock(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


class OutDirLock:
    """``OUT/.bmclip.lock``: one training run per out_dir (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, break_lock: bool = False):
        self.path = Path(out_dir) / LOCK_NAME
        self.break_lock = break_lock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held = False
        self.note: str | None = None  # what happened to a previous lock, for the operator

    def _record(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "command": " ".join(sys.argv)[:500]})

    def acquire(self) -> OutDirLock:
        """Take the lock or raise ConfigError naming its holder; sets ``note`` when taking over a stale one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
        self.held = True
        return self

    def _take_over(self) -> None:
        old = _read_lock(self.path)
        where = self.path.parent
        if old is None:
            if time.time() - self._mtime() < 10:  # just created by another run, not yet written
                raise ConfigError(f"out_dir {where} is being locked by another run right now; use another out_dir")
            self.note = f"took over an unreadable lock file {self.path}"
        else:
            host, pid = str(old.get("host", "?")), old.get("pid")
            since = old.get("started", "?")
            if host == self.host:
                if isinstance(pid, int) and pid != self.pid and pid_alive(pid):
                    if not self.break_lock:
                        raise ConfigError(
                            f"out_dir {where} is in use by a run on this host (pid {pid}, started {since}); wait "
                            "for it to finish, or use another --out_dir (--break_lock=true only if you are sure "
                            "that process is not training there)")
                    self.note = f"broke the lock of live pid {pid} on this host (break_lock=true)"
                else:
                    self.note = f"took over a stale lock of pid {pid} (no longer running) on this host"
            elif not self.break_lock:
                raise ConfigError(
                    f"out_dir {where} is locked by host {host} (pid {pid}, started {since}); this host cannot tell "
                    f"whether that run is alive. If it is not, rerun with --break_lock=true (or delete {self.path}); "
                    "otherwise use another --out_dir")
            else:
                self.note = f"broke the lock of host {host} (pid {pid}) (break_lock=true)"
        atomic_write_text(self._record(), self.path)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        cur = _read_lock(self.path)
        if cur is not None and cur.get("host") == self.host and cur.get("pid") == self.pid:
            try:
                self.path.unlink()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------
# Operator output

class Console:
    """Rank 0's terminal output: a tqdm bar on a TTY (when ``progress``), otherwise plain lines.

    Messages always go on their own line: while the bar is shown they are written through tqdm (which
    clears and redraws the bar), and closing the bar ends its line so an error printed afterwards starts
    on a fresh one.
    """

    def __init__(self, enabled: bool, progress: bool, total: int, initial: int, stream=None):
        self.enabled = enabled
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        if enabled and progress and is_terminal(self.stream):
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=self.stream)

    def say(self, msg: str, err: bool = False) -> None:
        """One line to stdout (``err``: stderr), never onto the bar's line."""
        if not self.enabled:
            return
        f = sys.stderr if err else sys.stdout
        if self.bar is not None:
            self.bar.write(msg, file=f)
            f.flush()
        else:
            print(msg, file=f, flush=True)

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def step_line(self, step: int, loss: float, lr: float, sps: float, eta_s: float, *,
                  data_wait_frac: float = 0.0, fetch_wait_s: float = 0.0) -> None:
        """The periodic plain progress line (only when no bar is shown): with the share of the window's time the
        loop waited for data and, for remote shards, the seconds the loader has waited for downloads."""
        if self.enabled and self.bar is None:
            fetch = f" (downloads {fetch_wait_s:.2f} s)" if fetch_wait_s > 0 else ""
            print(f"[bmclip] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {sps:.1f} samples/s  "
                  f"data wait {100 * data_wait_frac:.0f}%{fetch}  ETA {format_duration(eta_s)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
