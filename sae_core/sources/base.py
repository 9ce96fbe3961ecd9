"""The interface every activation source implements, and the argument checks the sources share."""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from sae_core.errors import ConfigError


class ActivationSource(ABC):
    """Training vectors as a pure function of (step, batch_size), plus a fixed held-out eval set.

    Purity is what lets the trainer resume a run bit-for-bit by asking again for step s.
    """

    d_in: int
    # vectors per token: 1, or the number of hooked layers for a multi-layer SAE (one vector per layer of each
    # token); the trainer's dead-latent window, in tokens, is this many vectors a token
    vectors_per_token: int = 1

    @abstractmethod
    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        """float32 CPU [batch_size, d_in]: positions [step*batch_size, (step+1)*batch_size) of the stream."""

    @abstractmethod
    def eval_set(self) -> torch.Tensor:
        """float32 [n_eval, d_in] held-out vectors, never returned by train_batch; the same tensor every call."""

    def eval_layer_ids(self) -> torch.Tensor | None:
        """The layer of each row of eval_set() for a multi-layer source (int64 [n_eval]); None for one layer."""
        return None

    def sample(self, n: int) -> torch.Tensor:
        """A deterministic sample of n training vectors, for initialisation statistics."""
        return self.train_batch(0, n)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_arg(ok: bool, name: str, allowed: str, got) -> None:
    """Raise a ConfigError naming the argument, what is allowed and what was given."""
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {got!r}")


class EpochStream:
    """An endless stream of epochs over n training rows, epoch e in the order order(e); rows_at(start, count)
    gives the rows at stream positions [start, start + count). The last two epochs' orders are kept: a batch
    straddles at most two epochs unless it is longer than one."""

    def __init__(self, n: int, order: Callable[[int], np.ndarray]):
        self.n, self.order = n, order
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        rows = self._epochs.get(epoch)
        if rows is None:
            rows = self.order(epoch)
            if len(self._epochs) >= 2:
                del self._epochs[next(iter(self._epochs))]
            self._epochs[epoch] = rows
        return rows

    def rows_at(self, start: int, count: int) -> np.ndarray:
        epoch, offset = np.divmod(np.arange(start, start + count, dtype=np.int64), self.n)
        out = np.empty(count, np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            out[here] = self._epoch(int(e))[offset[here]]
        return out
