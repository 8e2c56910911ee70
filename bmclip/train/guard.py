"""The non-finite step guard: a step whose loss or gradient norm is NaN/Inf on any rank is skipped by all.

After the backward pass, :meth:`NonFiniteGuard.check` decides (all ranks agreeing, one flag all-reduce per
test) whether the optimizer may step: the loss must be finite, then the gradients are clipped to
``grad_clip`` (0: measured, not clipped) and their global norm must be finite. A skipped step is counted
(``skipped``, checkpointed with the run's counters), reported through ``on_skip``, and after ``max_in_a_row``
skips in a row the run stops with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from bmclip.errors import BmclipError
from bmclip.train.distributed import DistInfo, all_reduce_flag


class NonFiniteLossError(BmclipError):
    """The loss (or gradient norm) was non-finite for ``fault.max_nonfinite`` steps in a row, or a checkpoint
    would have been written from non-finite weights."""


class NonFiniteGuard:
    """Decides per step whether the update is applied; counts and reports skipped steps."""

    def __init__(self, info: DistInfo, *, max_in_a_row: int, grad_clip: float = 0.0, skipped: int = 0,
                 on_skip: Callable[[dict], None] | None = None, hint: str = ""):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.info = info
        self.max_in_a_row = max_in_a_row
        self.grad_clip = grad_clip
        self.skipped = skipped  # skipped steps of the whole run (resumed runs continue the count)
        self.in_a_row = 0
        self.grad_norm = float("nan")  # of the last checked step (NaN when it was skipped on the loss)
        self.on_skip = on_skip
        self.hint = hint

    def check(self, step: int, loss: float, params: Iterable[torch.nn.Parameter]) -> bool:
        """True when step ``step`` (1-based, the step being finished) may update the weights.

        Clips the gradients of ``params`` (those with a ``.grad``) when the loss is finite everywhere.
        False: the step is counted and reported; the caller drops the gradients. Raises
        NonFiniteLossError on the ``max_in_a_row``-th skip in a row.
        """
        self.grad_norm = float("nan")
        bad = all_reduce_flag(not math.isfinite(loss), self.info)
        if not bad:
            grads = [p for p in params if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
            bad = all_reduce_flag(not math.isfinite(self.grad_norm), self.info)
        if not bad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.on_skip is not None:
            self.on_skip({"step": step, "kind": "skip", "reason": "non-finite loss or grad norm", "loss": loss,
                          "nonfinite_skipped": self.skipped})
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(f"{self.in_a_row} non-finite losses in a row (step {step}); stopping. "
                                     f"Lower optim.lr or check the data{self.hint}")
        return False
