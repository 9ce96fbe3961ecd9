"""The process layout of one training run: S latent shards times R data-parallel replicas (Gao et al. 2024,
appendix D.1; Shoeybi et al. 2019 for the tensor-parallel pair of operators).

Rank r = replica * S + shard, so the S shards of a replica are neighbours (one node's fast links carry the
per-step shard traffic; only gradients cross replicas). Every collective is synchronous: a collective
issued asynchronously and never waited on is a bug of the reference code (openai/sparse_autoencoder,
train.py: `async_op=True` collectives are never waited on).

A single process is the same code with `Mesh()`: every reduction is the identity and nothing is sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Mesh:
    shards: int = 1
    replicas: int = 1
    shard: int = 0  # this process's latent shard
    replica: int = 0  # this process's data-parallel replica
    capacity: float = 2.0  # TopK candidates per shard, as a multiple of k / S (the paper's capacity factor)
    device: str = "cpu"  # where the backend's collectives run: cuda for NCCL, cpu for gloo
    shard_group: object = field(default=None, repr=False)  # the S ranks of this replica
    replica_group: object = field(default=None, repr=False)  # the R ranks holding this shard

    @property
    def world(self) -> int:
        return self.shards * self.replicas

    @property
    def rank(self) -> int:
        return self.replica * self.shards + self.shard

    @property
    def writer(self) -> bool:
        """Replicas hold identical state: replica 0 writes each shard's checkpoint."""
        return self.replica == 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # --- layout ---------------------------------------------------------------------------------------
    def latent_range(self, n: int, shard: int | None = None) -> tuple[int, int]:
        """Latents [start, stop) held by a shard (this one by default); n is a multiple of S (checked at the edge)."""
        s = self.shard if shard is None else shard
        return s * n // self.shards, (s + 1) * n // self.shards

    def batch_rows(self, batch_size: int) -> slice:
        """This replica's rows of a global batch (batch_size is a multiple of R)."""
        per = batch_size // self.replicas
        return slice(self.replica * per, (self.replica + 1) * per)

    # --- collectives ----------------------------------------------------------------------------------
    def sum_shards(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of the shards' partial results (the decoder's output); gradient passed through unchanged."""
        return _SumShards.apply(t, self) if self.shards > 1 else t

    def to_shards(self, t: torch.Tensor) -> torch.Tensor:
        """The input every shard reads (the encoder's); its gradient is the sum of the shards' gradients."""
        return _ToShards.apply(t, self) if self.shards > 1 else t

    def gather(self, t: torch.Tensor, over: str = "shards", dim: int = 1) -> torch.Tensor:
        """The equal-shaped tensors of the ranks "shards" (of this replica) or "world" concatenated along dim,
        in rank order (no gradient)."""
        size, group = (self.shards, self.shard_group) if over == "shards" else (self.world, None)
        if size == 1:
            return t
        here = t.to(self.device).contiguous()
        parts = [torch.empty_like(here) for _ in range(size)]
        dist.all_gather(parts, here, group=group)
        return torch.cat(parts, dim=dim).to(t.device)

    def gather_to_leader(self, t: torch.Tensor) -> torch.Tensor | None:
        """Replica 0's shards' tensors concatenated along dim 0 on the leader, None elsewhere: only the leader
        holds the whole SAE (the other replicas send nothing; they hold the same rows)."""
        if self.shards == 1:
            return t if self.leader else None
        if self.replica != 0:
            return None
        here = t.to(self.device).contiguous()
        parts = [torch.empty_like(here) for _ in range(self.shards)] if self.leader else None
        dist.gather(here, parts, dst=0, group=self.shard_group)
        return torch.cat(parts).to(t.device) if self.leader else None

    def reduce_(self, t: torch.Tensor, over: str, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over "shards", "replicas" or "world"; op: sum, mean, min or max."""
        size = {"shards": self.shards, "replicas": self.replicas, "world": self.world}[over]
        if size == 1:
            return t
        group = {"shards": self.shard_group, "replicas": self.replica_group, "world": None}[over]
        red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
               "max": dist.ReduceOp.MAX}[op]
        here = t if t.device.type == self.device else t.to(self.device)
        dist.all_reduce(here, op=red, group=group)
        if here is not t:
            t.copy_(here)
        return t.div_(size) if op == "mean" else t

    def all_true(self, flag: bool) -> bool:
        """Whether a condition holds on every rank (e.g. a finite loss), so all ranks take the same branch."""
        if self.world == 1:
            return flag
        return bool(self.reduce_(torch.tensor([int(flag)], dtype=torch.int32), "world", "min"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


TRIVIAL = Mesh()


class _SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, mesh):
        return mesh.reduce_(t.clone(), "shards")

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, mesh):
        ctx.mesh = mesh
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return ctx.mesh.reduce_(g.clone(), "shards"), None


def build_mesh(shards: int, replicas: int, capacity: float = 2.0) -> Mesh:
    """The mesh of this process once torch.distributed is initialised with world size shards * replicas.
    Every rank creates every subgroup, in the same order, as new_group requires."""
    rank = dist.get_rank()
    shard, replica = rank % shards, rank // shards
    shard_group = replica_group = None
    for r in range(replicas):
        group = dist.new_group([r * shards + s for s in range(shards)])
        if r == replica:
            shard_group = group
    for s in range(shards):
        group = dist.new_group([r * shards + s for r in range(replicas)])
        if s == shard:
            replica_group = group
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return Mesh(shards, replicas, shard, replica, capacity, device, shard_group, replica_group)
