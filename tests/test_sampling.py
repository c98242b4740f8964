from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.sampling import EventBalancedBatchSampler


def _events(n=60, n_events=12, seed=0):
    ev = np.zeros(n, dtype=int)
    ev[np.random.default_rng(seed).choice(n, n_events, replace=False)] = 1
    return ev


def test_every_batch_is_half_events():
    ev = _events()
    s = EventBalancedBatchSampler(ev, batch_size=8, steps_per_epoch=50, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 50
    for b in batches:
        assert len(b) == 8 and all(0 <= i < ev.size for i in b)
        assert ev[b].sum() == 4
    odd = list(EventBalancedBatchSampler(ev, batch_size=7, steps_per_epoch=5))
    assert all(len(b) == 7 and ev[b].sum() == 4 for b in odd)  # events get the extra slot


def test_deterministic_given_seed_and_epoch():
    ev = _events()
    a = EventBalancedBatchSampler(ev, seed=5)
    b = EventBalancedBatchSampler(ev, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    # Epoch 3 does not depend on the epochs iterated before it.
    for e in range(3):
        b.set_epoch(e)
        list(b)
    b.set_epoch(3)
    fresh = EventBalancedBatchSampler(ev, seed=5)
    fresh.set_epoch(3)
    assert list(b) == list(fresh) and list(fresh) == list(fresh)
    assert list(EventBalancedBatchSampler(ev, seed=6)) != list(EventBalancedBatchSampler(ev, seed=5))


def test_each_class_cycles_through_all_cases():
    ev = _events(n=60, n_events=10)
    s = EventBalancedBatchSampler(ev, batch_size=8, steps_per_epoch=5, seed=0)
    draws = [i for b in s for i in b]
    ev_counts = Counter(i for i in draws if ev[i] == 1)
    # 5 steps x 4 events = 20 draws over 10 events: every event exactly twice.
    assert set(ev_counts) == set(np.flatnonzero(ev)) and set(ev_counts.values()) == {2}
    cens = [i for i in draws if ev[i] == 0]
    assert len(cens) == len(set(cens)) == 20  # 50 censored: no repeat within the epoch
    # Epoch 1 continues the same pass: its 20 censored draws are ones epoch 0 did not make.
    s.set_epoch(1)
    cens2 = [i for b in s for i in b if ev[i] == 0]
    assert len(set(cens) | set(cens2)) == 40


def test_small_event_class_is_sampled_with_replacement():
    ev = np.array([1, 1] + [0] * 30)
    s = EventBalancedBatchSampler(ev, batch_size=8, steps_per_epoch=10, seed=3)
    for b in s:
        assert ev[b].sum() == 4 and set(np.asarray(b)[ev[b] == 1]) <= {0, 1}


def test_no_censored_gives_all_event_batches():
    s = EventBalancedBatchSampler(np.ones(5, dtype=bool), batch_size=4, steps_per_epoch=3)
    assert all(len(b) == 4 for b in s)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(events=[0, 0, 0]), "has no event"),
        (dict(events=[]), "non-empty 1-D"),
        (dict(events=[0, 2, 1]), "events must be 0/1, got 2 at index 1"),
        (dict(events=[0, 1], batch_size=1), "batch_size must be an integer >= 2, got 1"),
        (dict(events=[0, 1], steps_per_epoch=0), "steps_per_epoch must be a positive integer"),
        (dict(events=[0, 1], seed=-1), "seed must be an integer >= 0"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EventBalancedBatchSampler(**kwargs)


def test_works_as_dataloader_batch_sampler():
    ev = _events(n=24, n_events=5)
    ds = TensorDataset(torch.arange(24), torch.as_tensor(ev))
    sampler = EventBalancedBatchSampler(ev, batch_size=6, steps_per_epoch=4, seed=9)
    loader = DataLoader(ds, batch_sampler=sampler)
    got = list(loader)
    assert len(got) == 4
    for (idx, e), ref in zip(got, list(sampler)):
        assert idx.tolist() == ref and int(e.sum()) == 3
