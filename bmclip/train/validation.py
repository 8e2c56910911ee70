"""Validation during training: retrieval R@1/5/10 (both directions) on held-out pairs.

The held-out pairs are the first ``data.val_max_samples`` of the synthetic evaluation set (``data.synthetic``;
generated a batch at a time) or of the ``data.val`` shards read in order, the same every time.
:class:`Validator` decides when to run (every ``val_every`` steps and at the end; not when a signal stops the
run early: a scheduler's grace period is for the checkpoint) and runs it as a collective: rank 0 evaluates the
bare model while the others wait, or under FSDP every rank runs the same sharded forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from bmclip.data.loader import ShardLoader
from bmclip.data.normalize import normalize_images
from bmclip.data.sources import synthetic_eval_batches
from bmclip.eval.retrieval import retrieval_metrics
from bmclip.train.distributed import DistInfo, barrier

VAL_BATCH = 128


@torch.no_grad()
def validate(model, batches, device: torch.device, autocast=contextlib.nullcontext) -> dict:
    """Retrieval R@1/5/10 both directions on held-out (image uint8, input_ids) batches (model in eval mode)."""
    was_training = model.training
    model.eval()
    imgs, txts = [], []
    try:
        for im_u8, ids in batches:
            with autocast():
                imgs.append(model.encode_image(normalize_images(im_u8, device)).float().cpu())
                txts.append(model.encode_text(ids.to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not imgs:
        return {}
    return retrieval_metrics(torch.cat(imgs), torch.cat(txts))


def val_batches(data, seed: int, image_size: int, context_length: int, tokenizer) -> Iterator[tuple]:
    """Held-out (image uint8, input_ids) batches of the ``data`` config section (the same every call)."""
    n_max = data.val_max_samples
    if data.synthetic:
        # all data.val_max_samples pairs of the held-out set, one batch at a time
        yield from synthetic_eval_batches(n_max, VAL_BATCH, image_size, context_length, seed + 1000)
        return
    loader = ShardLoader(data.val, batch_size=VAL_BATCH, image_size=image_size, num_threads=data.num_threads,
                         augment="center", shuffle=False, resampled=False, drop_last=False, tokenizer=tokenizer,
                         cache_dir=data.cache_dir or None, cache_bytes=data.cache_bytes,
                         prefetch_shards=data.prefetch_shards)
    seen = 0
    for batch in loader:
        take = min(len(batch["image"]), n_max - seen)
        yield batch["image"][:take], batch["input_ids"][:take]
        seen += take
        if seen >= n_max:
            break


class Validator:
    """When and how the training loop validates (see the module docstring)."""

    def __init__(self, cfg, info: DistInfo, mcfg, tokenizer, autocast: Callable = contextlib.nullcontext):
        self.cfg, self.info, self.tokenizer, self.autocast = cfg, info, tokenizer, autocast
        self.image_size, self.context_length = mcfg.vision.image_size, mcfg.text.context_length
        self.enabled = bool(cfg.data.synthetic or cfg.data.val)

    def due(self, step: int, final: bool, stopped_by_signal: bool) -> bool:
        """Validate after step ``step``? (``final``: the last step of this run.)"""
        if not self.enabled or (stopped_by_signal and step < self.cfg.steps):
            return False
        return bool(self.cfg.val_every and step % self.cfg.val_every == 0) or final

    def batches(self) -> Iterator[tuple]:
        return val_batches(self.cfg.data, self.cfg.seed, self.image_size, self.context_length, self.tokenizer)

    def run(self, fwd_model, model) -> dict:
        """The metrics on rank 0 ({} elsewhere, and when there is nothing to evaluate); a collective."""
        device = self.info.device
        if self.cfg.parallel == "fsdp" and self.info.initialized:
            # sharded parameters: every rank runs the same forward (the all-gathers are collective)
            return validate(fwd_model, self.batches(), device, self.autocast)
        metrics = validate(model, self.batches(), device, self.autocast) if self.info.is_main else {}
        barrier(self.info)
        return metrics
