"""Distributed setup and rank-0 printing.

`setup_distributed` is the only place that reads torchrun's environment; the rest of the code gets
`rank`, `world_size` and `device` from the `Dist` it returns. Importable without torch (torch is
imported when a process group is started).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


from topolm.config import UserError


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    ddp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", backend: str = "auto") -> Dist:
    """Read torchrun's environment (if any), pick the device and start the process group."""
    import torch
    import torch.distributed as dist

    ddp = int(os.environ.get("RANK", "-1")) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA device is available; use device=cpu")
    if not ddp:
        return Dist(0, 0, 1, device, False)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError("backend=nccl needs CUDA devices; use backend=gloo on CPU")
    dist.init_process_group(backend=backend)
    return Dist(rank, local_rank, world_size, device, True)


def run_distributed(cfg, job: Callable[[Any, Dist], None]) -> None:
    """Set up distributed from `cfg.device`/`cfg.backend`, run `job(cfg, dist)`, always tear down."""
    d = setup_distributed(cfg.device, cfg.backend)
    try:
        job(cfg, d)
    finally:
        cleanup_distributed(d)


def cleanup_distributed(d: Dist) -> None:
    import torch.distributed as dist

    if d.ddp and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (every process of a single-process run is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)




def raise_together(d: Dist, error: UserError | None) -> None:
    """Collective: when any rank hit `error` (e.g. rank 0 could not write a checkpoint), every rank raises it,
    instead of the others waiting in the next collective for a rank that has stopped. All ranks must call."""
    if not d.ddp:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    messages = [None] * d.world_size
    dist.all_gather_object(messages, None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(first)


def check_on_main(d: Dist, check: Callable[[], Any]) -> None:
    """Collective: run `check()` on rank 0 only (e.g. that the run folder takes files); the UserError it
    raises is raised on every rank."""
    error = None
    if d.is_main:
        try:
            check()
        except UserError as e:
            error = e
    raise_together(d, error)
