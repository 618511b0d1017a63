"""Data parallelism under torchrun for every trained method (`align.loop`): each rank computes the per-row tensors
(PAL: profiles; heads: embeddings) of its part of every batch, the loss is the whole batch's, and the parameter
gradients are summed over ranks, so N ranks train the same parameters as one process on the same global batch (up to
floating-point summation order).

    torchrun --nproc_per_node 4 -m pipe_align.pipelines.cli align --shards ... --out RUN [--method ...]

Every rank walks the same seeded epoch order and takes its slice of each batch (`align.data.part_bounds`); per-row
tensors are all-gathered (the local slice keeps its autograd graph, the others are constants), every rank computes
the same global loss, and since each rank's backward yields the gradient through its own rows only, an all-reduce
SUM of the gradients is the exact gradient of the global loss. Clipping and AdamW then run identically on every rank,
so the parameters never drift apart. Rank 0 alone writes checkpoints, run.json and the progress bar. Closed-form
methods fit identically on every rank (deterministic) and rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        return self.rank, self.world


def launched_world() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[DataParallel, str]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); returns it and this rank's device."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DataParallel(rank, world, local), device


def gather_rows(x: Tensor, sizes: tuple[int, ...], dp: DataParallel) -> Tensor:
    """Every rank's rows of x, concatenated in rank order; only this rank's rows carry gradient."""
    m = max(sizes)
    pad = torch.cat([x, x.new_zeros((m - len(x), *x.shape[1:]))]) if len(x) < m else x
    parts = [torch.empty_like(pad) for _ in range(dp.world)]
    dist.all_gather(parts, pad.detach().contiguous())
    parts[dp.rank] = pad
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def sum_gradients(params: list[Tensor]) -> None:
    """All-reduce SUM of the parameters' gradients, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


def barrier_and_close(dp: DataParallel | None) -> None:
    if dp is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
