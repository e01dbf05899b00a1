"""Training under torchrun: this process's rank, the collectives the loop needs, DDP / FSDP2 wrapping, and
FSDP's full-state gather and load for checkpoints.

    Dist(device)                                   rank / world / local device; all_sum, any, barrier, close
    wrap_for_ranks(model, dist, fsdp)              DDP, or FSDP2 `fully_shard` per block then root; as is on 1 process
    no_sync_unless(model, last)                    DDP gradient sync only on the last micro-batch of a step
    gather_model_state(model, raw, fsdp)           full, unsharded state dict on CPU (every rank takes part)
    gather_optimizer_state(model, optimizer, fsdp) full optimizer state (FSDP: keyed by parameter name)
    load_optimizer_state(model, optimizer, state, fsdp)

Under FSDP the checkpoint holds the same full tensors as a single-process run (`optimizer_layout` "fqn"
marks the optimizer state keyed by fully qualified names), so a run can resume on another world size.
The torch.distributed submodules are imported inside the functions that need them: a torch build without
distributed support still trains on one process.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mamba_lm.checkpoint import clean_state_dict
from mamba_lm.errors import UserError


class Dist:
    """Process-group facts for this process (single process: rank 0 of 1). device: the resolved device;
    under torchrun with CUDA it becomes cuda:LOCAL_RANK."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True
        self.main = self.rank == 0

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.all_sum(1.0 if flag else 0.0) > 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def wrap_for_ranks(model, dist: Dist, fsdp: bool):
    """DDP (or FSDP2 with fsdp=True) under torchrun; the model itself on one process."""
    if not dist.enabled:
        return model
    if fsdp:
        return shard_fsdp(model)
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync_unless(model, last: bool):
    """DDP's `no_sync()` for every micro-batch but the last of a step (gradients all-reduced once)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def shard_fsdp(model):
    """FSDP2 (`fully_shard`): shard each block of `backbone.layers` (if any), then the root."""
    try:  # local: only --fsdp runs need it, and fully_shard exists only from torch 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise UserError(f"--fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}")
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model)
    return model


def gather_model_state(model, raw, fsdp: bool) -> dict:
    """The full state dict on CPU with clean keys (FSDP: gathered from the shards; all ranks call this)."""
    if fsdp:
        # local: only FSDP runs use the distributed state-dict API
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return clean_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True)))
    return {k: v.detach().cpu() for k, v in clean_state_dict(raw.state_dict()).items()}


def gather_optimizer_state(model, optimizer, fsdp: bool) -> dict:
    if fsdp:
        # local: only FSDP runs use the distributed state-dict API
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict | None, fsdp: bool) -> None:
    if not state:
        return
    if fsdp:
        # local: only FSDP runs use the distributed state-dict API
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit this model/optimizer ({e}); "
                        "resume with the settings it was trained with")
