"""KV-cache blocks: who holds them, and which full blocks can be shared (prefix caching).

A full block is known by the hash of its token chain: the hash of the block before it, its tokens, and
the adapter and version that computed it (the same text under two adapters, or two versions of one, has
other K/V). Sequences whose chains match hold the same blocks (reference counts). A block whose holders
have all ended stays findable until the pool hands it out again: free blocks go out least recently
freed first, and a sequence's last blocks are freed before its first (a longer prefix is the less likely
to be asked for again)."""

import hashlib
from array import array
from collections import OrderedDict


def chain_hashes(tokens: list[int], block_size: int, key: str, known: list[bytes]) -> list[bytes]:
    """`known` extended with the hash of every further full block of `tokens`, under `key`
    (the adapter and its version: "" for the base model)."""
    hashes = list(known)
    parent = hashes[-1] if hashes else hashlib.blake2b(key.encode(), digest_size=16).digest()
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens[start : start + block_size]).tobytes())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # handed out from the front
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def cached(self) -> int:
        """Full blocks that a later sequence can share."""
        return len(self.hash_of)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest prefix of `hashes` that the pool holds."""
        found = []
        if self.caching:
            for h in hashes:
                block = self.by_hash.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def share(self, blocks: list[int], table: list[int]) -> None:
        """Appends matched blocks to an empty table, taking a reference on each."""
        assert not table, "shared blocks start a table"
        for block in blocks:
            self._hold(block)
            table.append(block)

    def _hold(self, block: int) -> None:
        """One more reference on a found block (out of the free ones if it was there)."""
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extends `table` with new blocks to hold `tokens` tokens; False (and nothing taken) if the pool is short."""
        need = self.blocks_for(tokens) - len(table)
        if need > len(self.free):
            return False
        for _ in range(max(need, 0)):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of.pop(block, None)
            if old is not None:
                del self.by_hash[old]
            self.refs[block] = 1
            table.append(block)
        return True

    def swap(self, table: list[int], start: int, blocks: list[int]) -> None:
        """Puts matched blocks in table[start : start + len(blocks)] in place of the table's own (held by it
        alone and not full), which go back to the pool."""
        for i, block in enumerate(blocks, start):
            own = table[i]
            assert self.refs[own] == 1 and own not in self.hash_of, "only a table's own block, not full"
            self.refs[own] = 0
            self.free[own] = None
            self.free.move_to_end(own, last=False)  # it holds nothing findable: the first to hand out
            self._hold(block)
            table[i] = block

    def register(self, block: int, h: bytes) -> None:
        """Makes a full block findable by its chain hash (the first block with that hash stays the one found)."""
        if self.caching and h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def release(self, table: list[int]) -> None:
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        table.clear()
