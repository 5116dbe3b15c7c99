"""What the training loop does across ranks, in two real gloo processes (no Ray needed): the
same initial weights, different dropout masks, reductions on the training device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stm.config import TrainConfig
from stm.train import loop

from tiny import TINY  # tests/tiny.py

CFG = TrainConfig(
    model=dataclasses.replace(TINY, motion_dropout=0.5), num_workers=2, batch_size=8, bn_batch=4
)


def _rank(rank: int, world: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = loop.build_worker_model(CFG, rank)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        mask = model.dropout["motion"].train()(torch.ones(4096))  # 0 or 2 per element
        sums = loop.all_reduce_sum(np.array([rank + 1.0, 10.0 * rank]), torch.device("cpu"))
        out[rank] = (weights[:1000].clone(), mask.clone(), sums)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_weights_but_not_dropout_masks(tmp_path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, init, out), nprocs=2, join=True)
        (w0, m0, s0), (w1, m1, s1) = out[0], out[1]
    assert torch.equal(w0, w1)  # one initial model (DDP would broadcast rank 0's anyway)
    assert not torch.equal(m0, m1)  # each rank drops its own units
    assert 0.4 < (m0 == 0).float().mean() < 0.6 and 0.4 < (m1 == 0).float().mean() < 0.6
    assert np.array_equal(s0, [3.0, 10.0]) and np.array_equal(s1, [3.0, 10.0])


def test_reductions_run_on_the_training_device(tmp_path, monkeypatch) -> None:
    """The per-epoch sums are reduced on the device they are asked for (NCCL reduces only
    CUDA tensors), and come back as float64 numpy."""
    seen: list[torch.device] = []
    real = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device)
        return real(tensor, *args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_reduce", spy)
        sums = loop.all_reduce_sum(np.array([[1, 2], [3, 4]]), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert seen == [torch.device("cpu")]
    assert sums.dtype == np.float64 and np.array_equal(sums, [[1, 2], [3, 4]])
    # without a process group the values pass through
    assert np.array_equal(loop.all_reduce_sum(np.array([5.0]), torch.device("cpu")), [5.0])


@pytest.mark.parametrize("rank", [0, 1, 7])
def test_rank_seeds_differ_and_repeat(rank) -> None:
    assert loop.rank_seed(0, rank) == loop.rank_seed(0, rank)
    assert loop.rank_seed(0, rank) != loop.rank_seed(0, rank + 1)
    assert loop.rank_seed(0, rank) != loop.rank_seed(1, rank)
