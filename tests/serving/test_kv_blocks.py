"""The KV block pool: positions round-trip through scattered blocks, allocation limits, double frees."""
from __future__ import annotations

import pytest
import torch

from fastadapters.serving.kv_blocks import BlockPool, OutOfBlocks


def test_positions_round_trip_across_blocks_odd_sizes():
    pool = BlockPool(num_layers=2, kv_heads=3, head_dim=5, block_size=4, num_blocks=16)
    g = torch.Generator().manual_seed(0)
    a = pool.allocate(pool.blocks_for(13))  # 4 blocks for 13 positions
    b = pool.allocate(pool.blocks_for(1))
    assert len(a) == 4 and len(b) == 1 and pool.used_blocks == 5 and pool.free_blocks == 11
    ka, va = torch.randn(3, 13, 5, generator=g), torch.randn(3, 13, 5, generator=g)
    kb, vb = torch.randn(3, 1, 5, generator=g), torch.randn(3, 1, 5, generator=g)
    pool.write(1, a, 0, ka[:, :6], va[:, :6])  # in two pieces, the second starting mid-block
    pool.write(1, a, 6, ka[:, 6:], va[:, 6:])
    pool.write(1, b, 0, kb, vb)
    k, v = pool.read(1, a, 13)
    assert torch.equal(k, ka) and torch.equal(v, va)
    k, v = pool.read(1, a, 7)
    assert torch.equal(k, ka[:, :7])
    both = torch.cat([pool.slots(a, 0, 13), pool.slots(b, 0, 1)])
    k, v = pool.gather(1, both)  # two requests in one gather
    assert torch.equal(k, torch.cat([ka, kb], dim=1)) and torch.equal(v, torch.cat([va, vb], dim=1))
    assert pool.keys[0].abs().sum() == 0  # the other layer untouched


def test_allocation_limits_and_frees():
    pool = BlockPool(1, 1, 2, block_size=2, num_blocks=3)
    blocks = pool.allocate(3)
    with pytest.raises(OutOfBlocks, match="asked for 1 KV blocks, 0 free of 3"):
        pool.allocate(1)
    with pytest.raises(ValueError, match="do not fit"):
        pool.write(0, blocks[:1], 1, torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    held = list(blocks)
    pool.free(blocks)
    assert blocks == [] and pool.free_blocks == 3 and pool.used_blocks == 0
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(held[:1])
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        BlockPool(1, 1, 2, block_size=0, num_blocks=3)


def test_runs_growth_in_place_and_refcounted_cached_blocks():
    pool = BlockPool(1, 1, 2, block_size=2, num_blocks=8)
    run = pool.allocate_run(3)
    assert run == [0, 1, 2]
    assert pool.allocate(2, after=2) == [3, 4]  # the next blocks, when free: the run grows
    other = pool.allocate(1, after=0)  # 1 is taken: the lowest free id instead
    assert other == [5] and pool.allocate_run(3) is None and pool.allocate_run(2) == [6, 7]
    held = [0, 1, 2, 3, 4]
    pool.register(0, "k0")
    pool.share(0)  # a second request reads block 0
    pool.free(held)
    assert pool.lookup("k0") == 0 and pool.used_blocks == 4  # still referenced once
    pool.free([0])
    assert pool.used_blocks == 3 and pool.free_blocks == 5 and pool.cached_blocks == 1  # cached, counted free
    pool.share(0)  # a hit brings it back
    assert pool.used_blocks == 4 and pool.free_blocks == 4
    pool.free([0])
    got = pool.allocate(5)  # needs the cached block too: evicted, its name forgotten
    assert 0 in got and pool.lookup("k0") is None and pool.free_blocks == 0
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
