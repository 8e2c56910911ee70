"""Named points of the training loop where extra behaviour attaches, and the fault injection built on them.

The loop calls ``hooks.fire(point, step=...)`` at each point of :data:`POINTS` and passes its loss through
``hooks.filter("loss", loss, step=...)``; nothing is attached unless asked, so a normal run's loop does only
the work it names. :class:`FaultInjector` turns the ``fault.*`` injection keys (used by the tests: NaN
losses, kills, slow data, slow steps) into hooks.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Where the loop calls hooks, in order within one step. ``step`` is the number of finished steps at that point.
POINTS = (
    "data_wait",           # inside the wait for the next batch (a stop signal may interrupt it)
    "loss",                # a filter: receives the step's loss tensor before backward, returns the loss to use
    "step_end",            # the step's update is done (before the step-boundary agreement between ranks)
    "before_checkpoint",   # after logging and validation, before this step's checkpoint (if any)
    "checkpoint_staged",   # rank 0: every checkpoint file is written, nothing is committed yet
)


class Hooks:
    """Callables attached to the named points of :data:`POINTS`, run in the order they were added."""

    def __init__(self):
        self._at: dict[str, list[Callable]] = {p: [] for p in POINTS}

    def add(self, point: str, fn: Callable) -> None:
        """Attach ``fn`` at ``point`` (an unknown point is a ValueError naming the known ones)."""
        if point not in self._at:
            raise ValueError(f"unknown hook point {point!r}; known: {', '.join(POINTS)}")
        self._at[point].append(fn)

    def fire(self, point: str, **kw) -> None:
        """Call every hook at ``point`` with the keyword arguments."""
        for fn in self._at[point]:
            fn(**kw)

    def filter(self, point: str, value, **kw):
        """Pass ``value`` through every hook at ``point`` (each returns the new value)."""
        for fn in self._at[point]:
            value = fn(value, **kw)
        return value


class FaultInjector:
    """The ``fault`` section's injection keys as hooks (see ``FaultSection``); never set them in real runs.

    ``nan_at_steps``: the loss of those steps (0-based: the number of steps finished before it) becomes NaN, so
    its gradients do too; ``kill_at_step``: SIGKILL after that step's validation, before its checkpoint, on
    ``kill_rank`` (-1 = every rank), once per ``out_dir`` (a marker file keeps a restarted job from dying again);
    ``kill_in_checkpoint_at_step``: SIGKILL with that step's checkpoint staged but not committed;
    ``step_sleep_s`` / ``data_sleep_s``: sleep after every step / in every wait for data.
    """

    def __init__(self, fault, out_dir: str | os.PathLike, rank: int = 0):
        self.fault = fault
        self.out = Path(out_dir)
        self.rank = rank

    def install(self, hooks: Hooks) -> Hooks:
        """Attach a hook for every injection key that is set; returns ``hooks``."""
        f = self.fault
        if f.data_sleep_s:
            hooks.add("data_wait", lambda step: time.sleep(f.data_sleep_s))
        if f.nan_at_steps:
            hooks.add("loss", self._nan_loss)
        if f.step_sleep_s:
            hooks.add("step_end", lambda step: time.sleep(f.step_sleep_s))
        if f.kill_at_step >= 0 and f.kill_rank in (-1, self.rank):
            hooks.add("before_checkpoint", self._kill_once)
        if f.kill_in_checkpoint_at_step >= 0:
            hooks.add("checkpoint_staged", self._kill_in_checkpoint)
        return hooks

    def _nan_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if step in self.fault.nan_at_steps else loss

    def _kill_once(self, step: int) -> None:
        if step != self.fault.kill_at_step:
            return
        marker = self.out / f".fault_killed_step{step}_rank{self.rank}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def _kill_in_checkpoint(self, step: int) -> None:
        if step == self.fault.kill_in_checkpoint_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
