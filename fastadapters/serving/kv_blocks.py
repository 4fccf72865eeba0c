"""KV memory in fixed-size blocks: one pool of key and value blocks per layer, and block tables.

    pool = BlockPool(num_layers=2, kv_heads=2, head_dim=8, block_size=16, num_blocks=64)
    blocks = pool.allocate(pool.blocks_for(37))        # a request holding 37 positions: 3 blocks
    pool.write(layer, blocks, start=0, keys, values)     # keys/values (kv_heads, n, head_dim)
    k, v = pool.read(layer, blocks, length=37)           # (kv_heads, 37, head_dim) each
    slots = pool.slots(blocks, 0, 37)                    # flat slot ids: one gather / scatter per
    k, v = pool.gather(layer, slots)                     # layer for many requests at once
    pool.free(blocks)                                    # back to the pool when the request ends

Storage per layer is ``(num_blocks, block_size, kv_heads, head_dim)`` for keys and again for
values; position ``p`` of a request lives in block ``blocks[p // block_size]`` at offset
``p % block_size``, i.e. flat slot ``block * block_size + offset`` of the
``(num_blocks * block_size, kv_heads, head_dim)`` view (``reserved`` blocks after them are storage only). A request holds only the blocks its positions need (not ``max_model_len``),
and every block of every layer is freed together. ``free_blocks`` and ``used_blocks`` are what
the leak checks read. The pool is not thread-safe: the engine thread owns it.

Attention reads a request's blocks in place when they form one contiguous run (see
``paged_attention.py``), so ``allocate(n, after=last)`` takes ``last + 1 .. last + n`` when they
are all free (a request growing by a block keeps its run), else the lowest free ids on the stack.
The free stack uses lazy deletion: a block taken out of order stays on the stack and is skipped
when popped (``_free_set`` is the truth).

Prefix caching: blocks are refcounted. ``register(block, key)`` names a full, computed block by
its content key (the scheduler's chain hash of adapter load id and tokens); ``lookup(key)`` finds
it and ``share(block)`` takes another reference. A named block whose last reference is freed
stays cached (``_evictable``, least recently freed first) and counts as free: ``allocate``
evicts from there only when the free stack runs out.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["BlockPool", "OutOfBlocks"]


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the scheduler preempts or waits)."""


class BlockPool:
    RUN_SEARCH_LIMIT = 1 << 16  # allocate_run scans at most this many free blocks

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", reserved: int = 0):
        for label, v in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                         ("block_size", block_size), ("num_blocks", num_blocks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockPool: {label} must be an integer >= 1, got {v!r}")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        if isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0:
            raise ValueError(f"BlockPool: reserved must be an integer >= 0, got {reserved!r}")
        self.block_size, self.num_blocks = block_size, num_blocks
        # blocks past num_blocks exist in storage but are never handed out (nor counted free or used):
        # scratch space, e.g. where the padding rows of a CUDA-graph decode step write their keys/values
        self.reserved_blocks = list(range(num_blocks, num_blocks + reserved))
        shape = (num_blocks + reserved, block_size, kv_heads, head_dim)
        self.dtype = dtype
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # (num_blocks * block_size, kv_heads, head_dim) views: where the engine's cache writes new tokens
        self.flat_keys = [self._flat(k) for k in self.keys]
        self.flat_values = [self._flat(v) for v in self.values]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first (may hold stale ids)
        self._free_set: set[int] = set(self._free)
        self._used: set[int] = set()
        self._refs: dict[int, int] = {}
        self._key_of: dict[int, object] = {}
        self._cached: dict[object, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def free_blocks(self) -> int:
        return len(self._free_set) + len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    # -- prefix caching ----------------------------------------------------------------------------
    def lookup(self, key) -> int | None:
        return self._cached.get(key)

    def share(self, block: int) -> None:
        """One more reference to a cached block (from the evictable list if nobody held it)."""
        if block in self._evictable:
            del self._evictable[block]
            self._used.add(block)
            self._refs[block] = 1
        elif block in self._used:
            self._refs[block] += 1
        else:
            raise ValueError(f"KV block {block} is neither in use nor cached")

    def register(self, block: int, key) -> None:
        """Name a full, computed block by its content key (first come keeps the name)."""
        if key in self._cached or block in self._key_of or block not in self._used:
            return
        self._cached[key] = block
        self._key_of[block] = key

    def _evict(self, n: int) -> None:
        for _ in range(n):
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(b)]
            self._free_set.add(b)
            self._free.append(b)

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    def blocks_for(self, positions: int) -> int:
        """Blocks needed to hold ``positions`` positions."""
        return -(-max(positions, 0) // self.block_size)

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """``n`` free blocks: ``after + 1 .. after + n`` when all free (one run with the caller's last
        block), else the lowest ids on the free stack."""
        free = self._free_set
        if n > self.free_blocks:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.free_blocks} free of {self.num_blocks}")
        if n > len(free):
            self._evict(n - len(free))
        if after is not None and all(b in free for b in range(after + 1, after + 1 + n)):
            out = list(range(after + 1, after + 1 + n))
        else:
            out = []
            while len(out) < n:
                b = self._free.pop()
                if b in free and b not in out:
                    out.append(b)
        free.difference_update(out)
        self._used.update(out)
        for b in out:
            self._refs[b] = 1
        if len(self._free) > 4 * self.num_blocks:  # stale entries piled up: rebuild the stack
            self._free = sorted(free, reverse=True)
        return out

    def allocate_run(self, n: int) -> list[int] | None:
        """``n`` consecutive free blocks (the lowest such run), or None when no run is that long.
        O(free blocks): the scheduler calls it once per admitted request."""
        if n < 1 or n > len(self._free_set) or len(self._free_set) > self.RUN_SEARCH_LIMIT:
            return None  # (a huge pool: the O(free) search per admission is not worth it)
        start, length, prev = -1, 0, -2
        for b in sorted(self._free_set):
            if b == prev + 1:
                length += 1
            else:
                start, length = b, 1
            prev = b
            if length == n:
                out = list(range(start, start + n))
                self._free_set.difference_update(out)
                self._used.update(out)
                for b in out:
                    self._refs[b] = 1
                return out
        return None

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV block {b} freed twice or never allocated")
            self._refs[b] -= 1
            if self._refs[b]:
                continue  # another request still reads it
            del self._refs[b]
            self._used.remove(b)
            if b in self._key_of:  # cached: kept until the space is needed
                self._evictable[b] = None
            else:
                self._free_set.add(b)
                self._free.append(b)
        blocks.clear()

    def slots(self, blocks: list[int], start: int, n: int) -> torch.Tensor:
        """Flat slot ids (n,) of positions start..start+n-1 of a request holding ``blocks``."""
        if start + n > len(blocks) * self.block_size:
            raise ValueError(f"positions {start}..{start + n - 1} do not fit in {len(blocks)} blocks "
                             f"of {self.block_size}")
        pos = torch.arange(start, start + n)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _flat(self, pool: torch.Tensor) -> torch.Tensor:
        return pool.view(-1, self.kv_heads, self.head_dim)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` as (kv_heads, len(slots), head_dim) each (copies)."""
        idx = slots.to(self.keys[layer].device)
        return (self._flat(self.keys[layer]).index_select(0, idx).transpose(0, 1),
                self._flat(self.values[layer]).index_select(0, idx).transpose(0, 1))

    def scatter(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (kv_heads, len(slots), head_dim) at ``slots``."""
        idx = slots.to(self.keys[layer].device)
        self._flat(self.keys[layer]).index_copy_(0, idx, keys.transpose(0, 1).to(self.keys[layer].dtype))
        self._flat(self.values[layer]).index_copy_(0, idx, values.transpose(0, 1).to(self.values[layer].dtype))

    def write(self, layer: int, blocks: list[int], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (kv_heads, n, head_dim) at positions start..start+n-1."""
        self.scatter(layer, self.slots(blocks, start, keys.shape[-2]), keys, values)

    def read(self, layer: int, blocks: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..length-1 as (kv_heads, length, head_dim) keys and values (copies)."""
        return self.gather(layer, self.slots(blocks, 0, length))
