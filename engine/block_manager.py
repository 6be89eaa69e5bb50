"""The KV block pool: free list, ref counts, per-sequence block tables, copy-on-write, the prefix cache and the
CPU swap space. No torch: the model runner executes the copies this module decides.

Sharing: a forked sequence (parallel sampling, beam search) takes its parent's blocks by reference. The first
write into a block that is still shared goes to a private copy: allocate_slots records the (src, dst) pair in
`copies`, which the scheduler hands to the runner, and the runner copies every pair of a step in one batched
operation before the forward pass. The last holder of a shared block writes into it in place.

Prefix caching: once a block is full and its KV written, it is named by a chain hash
hash(previous block's hash, its token ids). A later sequence whose prompt starts with the same blocks takes them
(ref count + 1) instead of recomputing them; the stored token ids are compared on a hit, so a hash collision can
never serve the wrong KV. As in vLLM v1's KV cache manager, the lookup (get_computed_blocks) changes nothing, and
allocate_slots takes the hits and the new blocks together or, when the pool is short, nothing at all. A block
whose ref count drops to 0 keeps its hash and goes to the end of the free queue: it is evicted (its hash
forgotten) only when the pool hands it out again, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from engine.outputs import BlockState, RequestBlocks
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ComputedBlocks:
    """A fresh sequence's prefix-cache hits: the cached blocks of its leading full blocks, and the tokens they
    hold (len(block_ids) * block_size)."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


NO_COMPUTED_BLOCKS = ComputedBlocks()


def _state(block: Block) -> BlockState:
    if block.ref_count:
        return BlockState.USED if block.ref_count == 1 else BlockState.SHARED
    return BlockState.FREE if block.hash is None else BlockState.CACHED


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def chain_hash(prev_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """A cryptographic digest, not Python's hash(): prompts can come from anyone on the HTTP endpoint, and a
    crafted collision would serve another prefix's KV (vLLM moved to SHA-256 for the same reason)."""
    h = hashlib.blake2b(prev_hash or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_swap_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front first). An OrderedDict gives O(1) removal from the middle,
        # needed when a prefix hit revives a cached block that sits in the queue.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from it
        self.copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pairs not yet handed to the runner
        self.num_swap_blocks = num_swap_blocks
        self._swap_refs = [0] * num_swap_blocks
        self._swap_free = list(range(num_swap_blocks - 1, -1, -1))  # a stack: pop() hands out the lowest id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self._free if self.blocks[b].hash is not None)

    @property
    def num_shared_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.ref_count > 1)

    @property
    def num_free_swap_blocks(self) -> int:
        return len(self._swap_free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, computed: ComputedBlocks = NO_COMPUTED_BLOCKS) -> int:
        """Free-pool blocks that allocate_slots(seq, num_new_tokens, computed) takes: the new blocks, the private
        copy of a shared block written into, and the cached hits that sit in the free queue now."""
        if computed.block_ids:
            revived = sum(1 for b in computed.block_ids if self.blocks[b].ref_count == 0)
            total = blocks_for(computed.num_tokens + num_new_tokens, self.block_size)
            return total - len(computed.block_ids) + revived
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table)) + (self._shared_write_block(seq) is not None)

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in seq's table of the block its next token goes into, when that block exists and is shared."""
        i = seq.num_computed_tokens // self.block_size
        if i < len(seq.block_table) and self.blocks[seq.block_table[i]].ref_count > 1:
            return i
        return None

    def get_computed_blocks(self, seq: Sequence) -> ComputedBlocks:
        """The cached blocks of a fresh sequence's longest cached prefix. A pure lookup: nothing is taken until
        allocate_slots commits it. At most num_tokens - 1 tokens come from the cache: the last one must run
        through the model to give logits."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return NO_COMPUTED_BLOCKS
        bs = self.block_size
        hits = []
        for i, block_hash in enumerate(self.block_hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return ComputedBlocks(tuple(hits), len(hits) * bs) if hits else NO_COMPUTED_BLOCKS

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain hashes of seq's first num_blocks full blocks (memoised on the sequence: its tokens never
        change)."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            prev = hashes[-1] if hashes else None
            hashes.append(chain_hash(prev, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes[:num_blocks]

    def hashes_computed(self, seq: Sequence, start: int, end: int) -> list[bytes]:
        """The chain hashes of the blocks that computing seq's tokens [start, end) fills (none without prefix
        caching): another sequence about to compute the same blocks can wait a step and take them instead."""
        if not self.enable_prefix_caching:
            return []
        return self.block_hashes(seq, end // self.block_size)[start // self.block_size :]

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted prompt's lookup (num_tokens looked up, num_hit_tokens served) in the hit rate."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: ComputedBlocks = NO_COMPUTED_BLOCKS) -> bool:
        """Grow seq's block table to hold num_new_tokens more tokens after its computed ones (for a fresh
        sequence: after `computed`, its prefix hits, which it takes by reference first). All or nothing: False,
        and nothing changed, when the pool is short."""
        if self.blocks_needed(seq, num_new_tokens, computed) > len(self._free):
            return False
        if computed.block_ids:
            assert not seq.block_table
            for block_id in computed.block_ids:
                self._take(block_id)
            seq.block_table.extend(computed.block_ids)
            seq.num_registered_blocks = len(computed.block_ids)
            needed = blocks_for(computed.num_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        else:
            shared = self._shared_write_block(seq)
            if shared is not None:
                src, dst = seq.block_table[shared], self._pop_free()
                self.blocks[src].ref_count -= 1
                seq.block_table[shared] = dst
                self.copies.append((src, dst))
            needed = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: the cached content is about to be overwritten
            if self._hash_to_block.get(block.hash) == block_id:
                del self._hash_to_block[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep theirs: their holders may still register them)."""
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.hash is not None and self._hash_to_block.get(block.hash) == block_id:
                del self._hash_to_block[block.hash]
            block.hash = block.token_ids = None
        self._free = OrderedDict.fromkeys(self._free)  # order kept; nothing cached left to prefer

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back seq's blocks past the first blocks_for(num_tokens) (slots of drafts that were rejected)."""
        keep = blocks_for(num_tokens, self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child (a fork of parent, with a copy of its block table) now holds every block by reference too."""
        assert child.block_table == parent.block_table
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled (their KV is now written) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = seq.num_registered_blocks, seq.num_computed_tokens // bs
        if first >= last:
            return
        self.block_hashes(seq, last)
        seq.num_registered_blocks = last
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            # A block computed twice (two requests prefilling the same prompt) is not registered a second time:
            # no lookup could reach it, so it would only crowd the LRU queue.
            if block.hash is not None:
                continue
            if self._hash_to_block.setdefault(seq.block_hashes[i], block.block_id) == block.block_id:
                block.hash = seq.block_hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks. Tail blocks go first into the queue so a shared prefix outlives its tails."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is None:  # nothing to keep: hand this block out before any cached one
                self._free.move_to_end(block_id, last=False)

    # ---- swapping ---------------------------------------------------------------------------------------------
    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]] | None:
        """Move the blocks of a group's sequences to the swap space, shared blocks once. Returns the
        (device block, swap block) pairs to copy, or None (nothing changed) when the swap space is short."""
        unique = list(dict.fromkeys(b for s in seqs for b in s.block_table))
        if len(unique) > len(self._swap_free):
            return None
        mapping = {b: self._swap_free.pop() for b in unique}
        for seq in seqs:
            for b in reversed(seq.block_table):
                self._swap_refs[mapping[b]] += 1
                self._release(b)
            seq.block_table = [mapping[b] for b in seq.block_table]
            seq.num_registered_blocks = 0
        return list(mapping.items())

    def swap_in_blocks_needed(self, seqs: list[Sequence]) -> int:
        """Device blocks that swapping seqs in takes, plus one per sequence for the step that follows."""
        return len({b for s in seqs for b in s.block_table}) + len(seqs)

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring a swapped group's blocks back; returns the (swap block, device block) pairs to copy. The caller
        checked swap_in_blocks_needed(). Blocks re-enter the prefix cache after the next step (registered again)."""
        unique = list(dict.fromkeys(b for s in seqs for b in s.block_table))
        assert len(unique) <= len(self._free)
        mapping = {c: self._pop_free() for c in unique}
        for block_id in mapping.values():
            self.blocks[block_id].ref_count = 0
        for seq in seqs:
            for c in seq.block_table:
                self.blocks[mapping[c]].ref_count += 1
                self._swap_refs[c] -= 1
                if self._swap_refs[c] == 0:
                    self._swap_free.append(c)
            seq.block_table = [mapping[c] for c in seq.block_table]
        return list(mapping.items())

    def free_swapped(self, seq: Sequence) -> None:
        """Release a swapped-out sequence's swap blocks (it finished or was aborted while swapped)."""
        for c in seq.block_table:
            self._swap_refs[c] -= 1
            if self._swap_refs[c] == 0:
                self._swap_free.append(c)
        seq.block_table = []

    # ---- what one request holds --------------------------------------------------------------------------------
    def request_blocks(self, seqs: list[Sequence]) -> RequestBlocks:
        """The device blocks a request's running sequences hold (each block once), and of those the shared ones
        (RequestBlocks). A sequence's prefix-cache hits are the leading num_cached_tokens // block_size blocks of
        its table, taken at admission. Waiting and swapped sequences hold no device block."""
        held: set[int] = set()
        cached: set[int] = set()
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            held.update(seq.block_table)
            cached.update(seq.block_table[: seq.num_cached_tokens // self.block_size])
        shared = cached | {b for b in held if self.blocks[b].ref_count > 1}
        return RequestBlocks(len(held), len(shared), len(cached))

    # ---- the block map ----------------------------------------------------------------------------------------
    def block_states(self) -> bytes:
        """One BlockState byte per block: USED, SHARED (more than one holder), CACHED (free, keeps a prefix), FREE."""
        return bytes(_state(b) for b in self.blocks)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
