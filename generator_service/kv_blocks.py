"""The KV block pool of the engine: which block holds what, who uses it, and the prefix cache.

The model's paged `KVCache` is `num_blocks` blocks of `block_size` positions; a sequence
holds a block table. This module only counts: it hands out block numbers, keeps a
reference count per block, and reserves blocks for sequences admitted but not grown yet,
so a running sequence always gets its next block (admission waits instead; nothing is
ever preempted).

Prefix cache: a full block is named by a hash chain over the token IDs up to its end
(`block_hashes`); container IDs are token IDs, so an image's rows hit as text does. A
block whose hash is registered stays in the cache after its last user leaves, on an LRU
list, until a new block is needed and none is free. Each cached block is also filed under
the hash before it with its IDs (`longest_partial`): a prompt whose next block matches only
its first positions (a new question after an image that ends inside a block) can copy
those. Container IDs are unique to one (tenant, model, image), so two tenants never share
an image's blocks; a request's `cache_salt` keeps its text from hitting another salt's
blocks too.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from shared.store.token_ids import EMBEDDING_INDEX_BASE


def block_hashes(
    ids: Sequence[int], block_size: int, salt: str = "", bidirectional_images: bool = False, previous: bytes | None = None,
) -> list[bytes]:
    """The hash of each full block of `ids`: SHA-256 over the previous block's hash and this block's IDs.

    previous: the hash of the block before `ids[0]`'s (None: `ids` starts a sequence; its chain starts at the salt).

    With `bidirectional_images` (Gemma 3) a token of an image attends to the whole image, so the keys
    of a block that ends inside an image depend on the image's later tokens too: that block's hash
    also covers the IDs up to the end of the image (a run of IDs ≥ EMBEDDING_INDEX_BASE).
    """
    hashes = []
    if previous is None:
        previous = chain_root(salt)
    for end in range(block_size, len(ids) + 1, block_size):
        last = end
        if bidirectional_images:
            while last < len(ids) and ids[last] >= EMBEDDING_INDEX_BASE and ids[last - 1] >= EMBEDDING_INDEX_BASE:
                last += 1
        h = hashlib.sha256(previous)
        h.update(array("q", ids[end - block_size : end]).tobytes())
        h.update(array("q", ids[end:last]).tobytes())
        previous = h.digest()
        hashes.append(previous)
    return hashes


def chain_root(salt: str = "") -> bytes:
    """The hash before a sequence's first block: the chain starts at the salt (the tenant)."""
    return hashlib.sha256(salt.encode()).digest()


def common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading IDs `a` and `b` share."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


class BlockPool:
    """Block numbers 0 … num_blocks-1: free, in use (counted references), or cached and unused (LRU)."""

    def __init__(self, num_blocks: int, prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low numbers first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block → its hash
        self._block_of: dict[bytes, int] = {}  # hash → cached block
        self._unused: OrderedDict[int, None] = OrderedDict()  # cached blocks without users, least recently used first
        self._after: dict[bytes, dict[int, tuple[int, ...]]] = {}  # hash → the cached blocks that follow it → their IDs
        self._before: dict[int, bytes] = {}  # cached block → the hash before it
        self.reserved = 0  # blocks promised to admitted sequences, not handed out yet

    @property
    def available(self) -> int:
        """Blocks that can be promised now: free or cached without users, less those promised already."""
        return len(self._free) + len(self._unused) - self.reserved

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - len(self._free) - len(self._unused)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (the prefix must be cached block by block)."""
        found = []
        for h in hashes:
            block = self._block_of.get(h) if self.prefix_cache else None
            if block is None:
                break
            found.append(block)
        return found

    def admit(self, cached: Sequence[int], new_blocks: int) -> bool:
        """Take a reference on `cached` blocks and promise `new_blocks` more, if the pool allows; False: nothing done."""
        idle = sum(1 for b in cached if self._refs[b] == 0)  # taking them off the LRU list makes them unavailable
        if new_blocks + idle > self.available:
            return False
        for b in cached:
            self._take(b)
        self.reserved += new_blocks
        return True

    def share(self, cached: Sequence[int]) -> None:
        """Take a reference on `cached` blocks in place of as many promised ones (a sequence found them after admission)."""
        assert self.reserved >= len(cached), "share() of more blocks than were promised"
        for b in cached:
            self._take(b)
        self.reserved -= len(cached)

    def allocate(self) -> int:
        """A block for a sequence that was promised one: a free one, else the least recently used cached one."""
        assert self.reserved > 0, "allocate() without a promised block"
        self.reserved -= 1
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._unused.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            before = self._before.pop(block)
            del self._after[before][block]
            if not self._after[before]:
                del self._after[before]
        self._refs[block] = 1
        return block

    def unallocate(self, block: int) -> None:
        """Take back a block `allocate` handed out that was not cached, as a promise again (a sequence found a cached
        block for the same positions)."""
        assert self._refs[block] == 1 and block not in self._hash_of, "unallocate() of a shared or cached block"
        self._refs[block] = 0
        self._free.append(block)
        self.reserved += 1

    def release(self, blocks: Sequence[int], unused_promise: int = 0) -> None:
        """A sequence's blocks, tail first (so a chain's tail is evicted before its head), and promises it did not use."""
        self.reserved -= unused_promise
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._unused[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, h: bytes, before: bytes, ids: Sequence[int]) -> None:
        """Cache a full block whose keys and values are final under hash `h`, after the block hashed `before`,
        holding `ids` (a block cached already stays as is)."""
        if self.prefix_cache and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h
            self._before[block] = before
            self._after.setdefault(before, {})[block] = tuple(ids)

    def longest_partial(self, before: bytes, ids: Sequence[int]) -> tuple[int, int] | None:
        """(block, n): of the cached blocks after the block hashed `before`, the one whose first n IDs are the first
        n of `ids`, n largest; None when none shares even the first."""
        found = None
        for block, cached_ids in self._after.get(before, {}).items():
            same = common_start(cached_ids, ids)
            if same and (found is None or same > found[1]):
                found = (block, same)
        return found

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._unused[block]
        self._refs[block] += 1
