"""Event-balanced batches for Cox training (REFERENCE sections 5 and 7).

A Cox partial likelihood needs at least one event in the batch; with ~20 % events a random
batch of 8 has none about 17 % of the time. Upstream DeepMTS draws every batch half from
events and half from censored cases; :class:`EventBalancedBatchSampler` does the same for
``torch.utils.data.DataLoader(batch_sampler=...)``.

Each class is read from its own endless stream of shuffled passes (permutation ``c`` of a
class is seeded by ``(seed, class, c)``), so within a class every case is drawn once before
any is drawn again, across batches and epochs. Epoch ``e`` starts at a fixed offset of
that stream, so the batches of an epoch depend only on ``seed`` and ``e``
(:meth:`EventBalancedBatchSampler.set_epoch`), not on which epochs ran before; a resumed
run sees the same batches. A class with fewer cases than its share of a batch is
therefore sampled with replacement (it wraps into the next pass within the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from pipeline.metrics import check_events

log = logging.getLogger(__name__)

_EVENT, _CENSORED = 1, 0


class EventBalancedBatchSampler(Sampler[list[int]]):
    """Yields ``steps_per_epoch`` batches of dataset indices, half events, half censored.

    Args:
        events: event indicator per dataset index, shape [N], values 0/1 (or bool).
        batch_size: indices per batch (>= 2); events get ``ceil(batch_size / 2)``,
            censored cases the rest. With no censored case at all, batches are all events.
        steps_per_epoch: batches per epoch (``len(sampler)``).
        seed: base seed; together with the epoch it fixes every batch.

    Raises:
        ValueError: when ``events`` is empty, not 1-D, not 0/1, or has no event, or
            when ``batch_size`` / ``steps_per_epoch`` is not a positive integer
            (``batch_size`` >= 2).
    """

    def __init__(self, events: Any, batch_size: int = 8, steps_per_epoch: int = 50, seed: int = 42) -> None:
        ev = np.asarray(events)
        if ev.ndim != 1 or ev.size == 0:
            raise ValueError(f"EventBalancedBatchSampler: events must be a non-empty 1-D array, got shape {ev.shape}")
        ev_b = check_events(ev, "EventBalancedBatchSampler: events")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
            raise ValueError(f"EventBalancedBatchSampler: batch_size must be an integer >= 2, got {batch_size!r}")
        if not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1:
            raise ValueError(
                f"EventBalancedBatchSampler: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}"
            )
        self.event_idx = np.flatnonzero(ev_b)
        self.censored_idx = np.flatnonzero(~ev_b)
        if self.event_idx.size == 0:
            raise ValueError(
                f"EventBalancedBatchSampler: the training set ({ev.size} cases) has no event; the Cox "
                "partial likelihood is undefined for every batch"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"EventBalancedBatchSampler: seed must be an integer >= 0, got {seed!r}")
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        if self.censored_idx.size == 0:
            log.warning("EventBalancedBatchSampler: no censored case; batches hold events only")
            self.n_events_per_batch = self.batch_size
        else:
            self.n_events_per_batch = (self.batch_size + 1) // 2
        self.n_censored_per_batch = self.batch_size - self.n_events_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields next."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"EventBalancedBatchSampler.set_epoch: epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _stream(self, members: np.ndarray, cls: int, start: int, count: int) -> np.ndarray:
        """Positions ``start .. start+count-1`` of the class's endless shuffled stream."""
        n = members.size
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            cycle, offset = divmod(pos, n)
            perm = np.random.default_rng([self.seed, cls, cycle]).permutation(members)
            take = min(n - offset, count - filled)
            out[filled : filled + take] = perm[offset : offset + take]
            filled += take
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        n_e, n_c = self.n_events_per_batch, self.n_censored_per_batch
        ev = self._stream(self.event_idx, _EVENT, self.epoch * self.steps_per_epoch * n_e, self.steps_per_epoch * n_e)
        ce = (
            self._stream(
                self.censored_idx, _CENSORED, self.epoch * self.steps_per_epoch * n_c, self.steps_per_epoch * n_c
            )
            if n_c
            else np.empty(0, dtype=np.int64)
        )
        order_rng = np.random.default_rng([self.seed, 2, self.epoch])
        for step in range(self.steps_per_epoch):
            batch = np.concatenate([ev[step * n_e : (step + 1) * n_e], ce[step * n_c : (step + 1) * n_c]])
            yield order_rng.permutation(batch).tolist()  # mix classes within the batch
