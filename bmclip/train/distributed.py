"""Process-group set-up from the torchrun environment and DDP / FSDP2 wrapping.

One process: no process group, world size 1. Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT set, or a c10d rendezvous): gloo on CPU, nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bmclip.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits: global rank, world size, local rank, device, whether a group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise from torchrun env vars when WORLD_SIZE > 1; picks the device and the backend."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                    initialized=dist.is_initialized())


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def all_reduce_flag(flag: bool, info: DistInfo) -> bool:
    """Logical OR of a per-rank flag (so every rank takes the same branch, e.g. skipping a NaN step)."""
    if not info.initialized:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise maximum over ranks of several small numbers (flags as 0/1, signal numbers) in one collective."""
    if not info.initialized:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=info.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not info.initialized:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a float over ranks."""
    if not info.initialized:
        return value
    t = torch.tensor([float(value)], device=info.device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "ddp", mixed_bf16: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` per transformer block + root; identity in one process."""
    if not info.initialized:
        return model
    if parallel == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        # broadcast_buffers=False: the model has no running statistics; the only buffers are constants.
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    if parallel == "fsdp":
        try:
            # start-up cost (~0.6 s) and only in torch >= 2.6; loaded only when FSDP is asked for
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError as e:  # torch < 2.6
            raise ConfigError(f"parallel: fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") \
                from None
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
        kw = {"mp_policy": mp} if mp is not None else {}
        # Shard each transformer block separately (so only one block is unsharded at a time), then each
        # tower (so encode_image / encode_text, which bypass the root's forward, gather their own
        # parameters), then the root (logit scale / bias).
        for block in transformer_blocks(model):
            fully_shard(block, **kw)
        for tower in ("visual", "text"):
            if isinstance(getattr(model, tower, None), nn.Module):
                fully_shard(getattr(model, tower), **kw)
        # fully_shard cannot shard 0-dim parameters (logit_scale, logit_bias): they stay replicated
        # plain tensors and ``sync_ignored_grads`` averages their gradients after each backward.
        scalars = {p for p in model.parameters() if p.ndim == 0}
        fully_shard(model, ignored_params=scalars or None, **kw)
        model._bmclip_replicated_params = sorted(scalars, key=id)
        return model
    raise ConfigError(f"parallel: unknown mode {parallel!r} (ddp | fsdp)")


def parallel_summary(model: nn.Module) -> str:
    """What wrapping actually happened, from the module itself: 'ddp', 'fsdp: K of N parameters sharded' or 'none'."""
    if isinstance(model, DDP):
        return "ddp"
    try:
        # start-up cost (~0.6 s), and absent from torch builds without distributed support
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor cannot have FSDP2-sharded parameters
        return "none"
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    return f"fsdp: {sharded} of {len(params)} parameters sharded" if sharded else "none"


def sync_ignored_grads(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients of parameters FSDP2 leaves replicated (0-dim ones) across ranks."""
    params = getattr(model, "_bmclip_replicated_params", None)
    if not params or not info.initialized:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(info.world_size)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layer modules of both towers (children of any nn.ModuleList)."""
    blocks = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList):
            blocks.extend(mod)
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers (FSDP2 wraps in place, nothing to strip)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_state_dicts(model: nn.Module, optimizer, parallel: str, info: DistInfo) -> tuple[dict, dict]:
    """(model state, optimizer state) as full, unsharded CPU dicts; a collective under FSDP (all ranks call)."""
    if info.initialized and parallel == "fsdp":
        # start-up cost (~0.6 s); loaded only under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    bare = unwrap(model)
    return ({k: v.detach().cpu().clone() for k, v in bare.state_dict().items()}, optimizer.state_dict())


def load_full_state_dicts(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None,
                          parallel: str, info: DistInfo) -> None:
    """Inverse of ``full_state_dicts`` (every rank passes the same full dicts)."""
    if info.initialized and parallel == "fsdp":
        # start-up cost (~0.6 s); loaded only under FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict=optim_sd if optim_sd is not None else {}, options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    if optim_sd is not None and optimizer is not None:
        optimizer.load_state_dict(optim_sd)
