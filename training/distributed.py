"""Everything about running on several processes: process groups, DDP/FSDP wrapping, and the
state-dict gathering that checkpoints need. No other module imports DDP or FSDP.

Strategies: ``none`` (one process), ``ddp`` (DistributedDataParallel on the student; the teacher
stays a plain replica, identical on every rank because the student is), ``fsdp`` (FSDP2
``fully_shard`` per transformer block and per network, student and teacher sharded alike so the
EMA pairs local shards).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


def init_distributed(backend: str = "auto") -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))) if dist.is_initialized() else (0, 1, 0)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear the process group down after a final barrier.

    gloo's worker threads release a finished collective (and the Python tensors it holds) after
    waking its caller; if the interpreter is already finalizing by then, taking the GIL ends that
    thread mid-destructor and the process aborts ("terminate called without an active exception")
    after a successful run. gloo's barrier waits for the work queued before it, so no earlier
    collective is still being released at exit (the test's torchrun worker aborted in about 1 of 6
    runs without it, 0 of 20 with it).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _uses_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def wrap(student: nn.Module, teacher: nn.Module, strategy: str) -> nn.Module:
    """Wrap for ``strategy``; returns the module the step must call for the student forward."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy '{strategy}' is not one of {STRATEGIES}")
    if strategy == "none" or not dist.is_initialized():
        return student
    if strategy == "ddp":
        device_ids = [student_device(student).index] if student_device(student).type == "cuda" else None
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=device_ids)  # the student has no buffers
    from torch.distributed.fsdp import fully_shard  # FSDP2 (torch >= 2.6)

    # Student: reshard_after_forward=False keeps gathered parameters until backward (ZeRO-2, the
    # SHARD_GRAD_OP of the GPFM run; a step runs the backbone twice). Teacher: forward only, so it
    # must reshard after its forward or it would stay gathered.
    for net, keep_gathered in ((student, True), (teacher, False)):
        for block in net.backbone.blocks:
            fully_shard(block, reshard_after_forward=not keep_gathered)
        fully_shard(net, reshard_after_forward=not keep_gathered)
    return student


def student_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated value of a possibly distributed scalar (e.g. a sharded grad norm)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of scalar metrics, for logging (one collective for all of them)."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].float().reshape(()) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (a list of one element without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of ``model`` on every rank."""
    if not _uses_fsdp(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not _uses_fsdp(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not _uses_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not _uses_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
