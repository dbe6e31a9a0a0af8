//! The prefix cache: a trie of prompt prefixes cut into KV blocks, so a request whose prompt
//! starts like an earlier one reuses that one's K/V and only computes the rest.
//!
//! Each node stands for one full block of `block_size` prompt tokens (the path from the root
//! spells the prefix) and owns the KV block holding them. A partial last block is never cached:
//! the request that owns it keeps writing generated tokens into it. Nodes are ref-counted along
//! the whole path by the allocations that use them; a node nobody references stays cached until
//! the free list runs dry, then the least recently used unreferenced leaves are evicted first.
//!
//! [`RadixAllocator`] is plain data (no channels, no locks): `block_allocator.rs` owns it.

use std::collections::{BTreeSet, HashMap};

type NodeId = usize;

const ROOT: NodeId = 0;

struct Node {
    parent: NodeId,
    /// The `block_size` prompt tokens whose K/V `block` holds (empty for the root).
    key: Vec<u32>,
    block: u32,
    children: HashMap<Vec<u32>, NodeId>,
    /// Live allocations whose cached prefix runs through this node.
    ref_count: usize,
    last_access: u64,
}

/// A trie of block-aligned token prefixes with LRU eviction of unreferenced leaves.
struct PrefixTrie {
    block_size: usize,
    /// Slab of nodes; `None` marks a vacant id, reused through `vacant`.
    nodes: Vec<Option<Node>>,
    vacant: Vec<NodeId>,
    /// Unreferenced leaves by last access: the eviction order.
    evictable_leaves: BTreeSet<(u64, NodeId)>,
    /// Blocks held by unreferenced nodes (all of them can be evicted, leaves first).
    evictable_blocks: usize,
    clock: u64,
}

impl PrefixTrie {
    fn new(block_size: usize) -> Self {
        let root = Node {
            parent: ROOT,
            key: Vec::new(),
            block: u32::MAX,
            children: HashMap::new(),
            ref_count: 0,
            last_access: 0,
        };
        Self {
            block_size,
            nodes: vec![Some(root)],
            vacant: Vec::new(),
            evictable_leaves: BTreeSet::new(),
            evictable_blocks: 0,
            clock: 0,
        }
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id].as_ref().expect("live node id")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id].as_mut().expect("live node id")
    }

    fn is_evictable_leaf(&self, id: NodeId) -> bool {
        let n = self.node(id);
        id != ROOT && n.ref_count == 0 && n.children.is_empty()
    }

    /// Marks `id` as just used, keeping the eviction order in step.
    fn touch(&mut self, id: NodeId) {
        self.clock += 1;
        let now = self.clock;
        if self.is_evictable_leaf(id) {
            let old = self.node(id).last_access;
            self.evictable_leaves.remove(&(old, id));
            self.evictable_leaves.insert((now, id));
        }
        self.node_mut(id).last_access = now;
    }

    /// Walks the longest cached prefix of `tokens` (whole blocks only), appending its blocks to
    /// `blocks`; returns the deepest node reached.
    fn find(&mut self, tokens: &[u32], blocks: &mut Vec<u32>) -> NodeId {
        let mut node = ROOT;
        for chunk in tokens.chunks_exact(self.block_size) {
            let Some(&child) = self.node(node).children.get(chunk) else {
                break;
            };
            self.touch(child);
            blocks.push(self.node(child).block);
            node = child;
        }
        node
    }

    /// References `id` and its ancestors, protecting them from eviction.
    fn incref(&mut self, mut id: NodeId) {
        while id != ROOT {
            if self.node(id).ref_count == 0 {
                self.evictable_blocks -= 1;
                let last = self.node(id).last_access;
                self.evictable_leaves.remove(&(last, id));
            }
            let n = self.node_mut(id);
            n.ref_count += 1;
            id = n.parent;
        }
    }

    fn decref(&mut self, mut id: NodeId) {
        while id != ROOT {
            let n = self.node_mut(id);
            n.ref_count -= 1;
            let parent = n.parent;
            if n.ref_count == 0 {
                self.evictable_blocks += 1;
                if self.is_evictable_leaf(id) {
                    self.evictable_leaves
                        .insert((self.node(id).last_access, id));
                }
            }
            id = parent;
        }
    }

    /// Caches `blocks` as holding the whole-block prefix `tokens`. Where another allocation
    /// already cached the same prefix with its own block, the given block is not needed and is
    /// pushed to `unused`.
    fn insert(&mut self, tokens: &[u32], blocks: &[u32], unused: &mut Vec<u32>) {
        let mut node = ROOT;
        for (chunk, &block) in tokens.chunks_exact(self.block_size).zip(blocks) {
            if let Some(&child) = self.node(node).children.get(chunk) {
                if self.node(child).block != block {
                    unused.push(block);
                }
                self.touch(child);
                node = child;
                continue;
            }
            // The parent stops being a leaf.
            if self.is_evictable_leaf(node) {
                let last = self.node(node).last_access;
                self.evictable_leaves.remove(&(last, node));
            }
            self.clock += 1;
            let child = Node {
                parent: node,
                key: chunk.to_vec(),
                block,
                children: HashMap::new(),
                ref_count: 0,
                last_access: self.clock,
            };
            let id = match self.vacant.pop() {
                Some(id) => {
                    self.nodes[id] = Some(child);
                    id
                }
                None => {
                    self.nodes.push(Some(child));
                    self.nodes.len() - 1
                }
            };
            self.node_mut(node).children.insert(chunk.to_vec(), id);
            self.evictable_blocks += 1;
            self.evictable_leaves.insert((self.clock, id));
            node = id;
        }
    }

    /// Evicts up to `n` least recently used unreferenced blocks (leaves first, so a prefix is
    /// truncated from its end), pushing them to `freed`.
    fn evict(&mut self, n: usize, freed: &mut Vec<u32>) {
        for _ in 0..n {
            let Some((_, id)) = self.evictable_leaves.pop_first() else {
                return;
            };
            let node = self.nodes[id].take().expect("evictable leaf is live");
            self.vacant.push(id);
            self.evictable_blocks -= 1;
            freed.push(node.block);
            self.node_mut(node.parent).children.remove(&node.key);
            if self.is_evictable_leaf(node.parent) {
                let last = self.node(node.parent).last_access;
                self.evictable_leaves.insert((last, node.parent));
            }
        }
    }
}

/// Blocks handed out by [`RadixAllocator::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// Pass back to [`RadixAllocator::free`].
    pub allocation_id: u64,
    /// Cached prefix blocks first, then fresh ones; enough for every token position (the
    /// shard derives position `p`'s slot: `blocks[p / bs] * bs + p % bs`).
    pub blocks: Vec<u32>,
    /// Prompt tokens whose K/V the cached blocks already hold (a multiple of the block size).
    pub prefix_len: u32,
}

struct LiveAllocation {
    /// Deepest trie node of the cached prefix it uses (referenced until freed).
    prefix_node: NodeId,
    /// The whole-block part of its prompt, cached when it is freed; `None` = do not cache.
    prompt: Option<Vec<u32>>,
}

/// KV block allocator with a prefix cache. Block 0 is never handed out: the health check's
/// liveness request writes there.
pub struct RadixAllocator {
    block_size: u32,
    free_blocks: Vec<u32>,
    trie: PrefixTrie,
    allocations: HashMap<u64, LiveAllocation>,
    next_allocation_id: u64,
}

impl RadixAllocator {
    /// `num_blocks` blocks of `block_size` slots (`block_size` ≥ 1), block 0 reserved.
    pub fn new(block_size: u32, num_blocks: u32) -> Self {
        assert!(block_size > 0, "block size must be at least 1");
        Self {
            block_size,
            // Popped from the end: the highest blocks go first.
            free_blocks: (1..num_blocks).collect(),
            trie: PrefixTrie::new(block_size as usize),
            allocations: HashMap::new(),
            next_allocation_id: 0,
        }
    }

    /// Blocks an allocation could get now: the free list plus unreferenced cached blocks.
    pub fn free_blocks(&self) -> usize {
        self.free_blocks.len() + self.trie.evictable_blocks
    }

    /// Blocks for `tokens` token positions. With `prefill_tokens` (the prompt), the longest
    /// cached prefix of it is reused and reported in `prefix_len`. `None` when there are not
    /// enough blocks even after evicting every unreferenced cached block.
    pub fn allocate(&mut self, tokens: u32, prefill_tokens: Option<&[u32]>) -> Option<Allocated> {
        let bs = self.block_size as usize;
        let total_blocks = (tokens as usize).div_ceil(bs);
        let mut blocks = Vec::with_capacity(total_blocks);
        let prefix_node = match prefill_tokens {
            // A prefix never covers more positions than the allocation holds.
            Some(prompt) => {
                let usable = prompt.len().min(tokens as usize);
                self.trie.find(&prompt[..usable], &mut blocks)
            }
            None => ROOT,
        };
        self.trie.incref(prefix_node);
        let prefix_len = (blocks.len() * bs) as u32;
        let needed = total_blocks - blocks.len();
        if self.free_blocks.len() < needed {
            let missing = needed - self.free_blocks.len();
            self.trie.evict(missing, &mut self.free_blocks);
        }
        if self.free_blocks.len() < needed {
            self.trie.decref(prefix_node);
            return None;
        }
        blocks.extend(self.free_blocks.drain(self.free_blocks.len() - needed..));
        let allocation_id = self.next_allocation_id;
        self.next_allocation_id += 1;
        let prompt = prefill_tokens.map(|p| {
            let whole = (p.len().min(tokens as usize) / bs) * bs;
            p[..whole].to_vec()
        });
        self.allocations.insert(
            allocation_id,
            LiveAllocation {
                prefix_node,
                prompt,
            },
        );
        Some(Allocated {
            allocation_id,
            blocks,
            prefix_len,
        })
    }

    /// Returns an allocation's blocks. With `cache_prompt` (its prompt's K/V were computed),
    /// the whole blocks of its prompt join the cache for later requests; the rest are freed.
    pub fn free(&mut self, allocation_id: u64, blocks: &[u32], cache_prompt: bool) {
        let Some(a) = self.allocations.remove(&allocation_id) else {
            return;
        };
        self.trie.decref(a.prefix_node);
        let bs = self.block_size as usize;
        let kept = match a.prompt {
            Some(prompt) if cache_prompt => {
                let n = (prompt.len() / bs).min(blocks.len());
                self.trie
                    .insert(&prompt[..n * bs], &blocks[..n], &mut self.free_blocks);
                n
            }
            // Blocks of the cached prefix belong to the trie; the others are ours to return.
            _ => self.prefix_blocks(a.prefix_node),
        };
        self.free_blocks
            .extend_from_slice(&blocks[kept.min(blocks.len())..]);
    }

    /// Depth of `node`: the number of cached blocks on its path.
    fn prefix_blocks(&self, mut node: NodeId) -> usize {
        let mut depth = 0;
        while node != ROOT {
            depth += 1;
            node = self.trie.node(node).parent;
        }
        depth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(len: u32, offset: u32) -> Vec<u32> {
        (offset..offset + len).collect()
    }

    #[test]
    fn block_zero_is_reserved() {
        let mut a = RadixAllocator::new(4, 3);
        assert_eq!(a.free_blocks(), 2);
        let got = a.allocate(6, None).unwrap();
        assert!(!got.blocks.contains(&0));
        assert_eq!(got.blocks.len(), 2);
        assert_eq!(got.prefix_len, 0);
        assert!(a.allocate(1, None).is_none());
    }

    #[test]
    fn freeing_returns_blocks() {
        let mut a = RadixAllocator::new(4, 9);
        let x = a.allocate(10, None).unwrap();
        assert_eq!(a.free_blocks(), 5);
        a.free(x.allocation_id, &x.blocks, true);
        assert_eq!(a.free_blocks(), 8);
        // Freeing twice is harmless.
        a.free(x.allocation_id, &x.blocks, true);
        assert_eq!(a.free_blocks(), 8);
    }

    #[test]
    fn a_shared_prefix_is_reused() {
        let mut a = RadixAllocator::new(4, 20);
        let p = prompt(10, 100);
        let first = a.allocate(14, Some(&p)).unwrap();
        assert_eq!(first.prefix_len, 0);
        a.free(first.allocation_id, &first.blocks, true);

        // Same first 8 tokens (two whole blocks), different tail.
        let mut q = p[..8].to_vec();
        q.extend([1, 2, 3]);
        let second = a.allocate(15, Some(&q)).unwrap();
        assert_eq!(second.prefix_len, 8);
        assert_eq!(second.blocks[..2], first.blocks[..2]);
        assert!(!second.blocks[2..]
            .iter()
            .any(|b| first.blocks[..2].contains(b)));

        // A prompt differing in the first block shares nothing.
        let mut r = p.clone();
        r[0] = 7;
        let third = a.allocate(12, Some(&r)).unwrap();
        assert_eq!(third.prefix_len, 0);
    }

    #[test]
    fn the_partial_last_block_is_never_shared() {
        let mut a = RadixAllocator::new(4, 20);
        let p = prompt(6, 0);
        let first = a.allocate(9, Some(&p)).unwrap();
        a.free(first.allocation_id, &first.blocks, true);
        // Only the first block (tokens 0..4) was cached: tokens 4..6 sat in a block that also
        // held generated tokens.
        let again = a.allocate(9, Some(&p)).unwrap();
        assert_eq!(again.prefix_len, 4);
        assert_eq!(again.blocks[0], first.blocks[0]);
    }

    #[test]
    fn a_prompt_not_computed_is_not_cached() {
        let mut a = RadixAllocator::new(4, 20);
        let p = prompt(8, 0);
        let first = a.allocate(12, Some(&p)).unwrap();
        a.free(first.allocation_id, &first.blocks, false);
        assert_eq!(a.allocate(12, Some(&p)).unwrap().prefix_len, 0);
        assert_eq!(a.free_blocks(), 19 - 3);
    }

    #[test]
    fn cached_blocks_are_evicted_when_the_free_list_runs_dry() {
        // 8 usable blocks.
        let mut a = RadixAllocator::new(2, 9);
        let p = prompt(8, 0);
        let x = a.allocate(8, Some(&p)).unwrap();
        a.free(x.allocation_id, &x.blocks, true);
        // All 4 blocks are cached but still count as free.
        assert_eq!(a.free_blocks(), 8);
        let big = a.allocate(16, None).unwrap();
        assert_eq!(big.blocks.len(), 8);
        assert_eq!(a.free_blocks(), 0);
        a.free(big.allocation_id, &big.blocks, true);
        // The cache was evicted to make room.
        assert_eq!(a.allocate(8, Some(&p)).unwrap().prefix_len, 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_leaf_first() {
        let mut a = RadixAllocator::new(2, 7); // 6 usable blocks
        let old = prompt(4, 0);
        let new = prompt(4, 50);
        let x = a.allocate(4, Some(&old)).unwrap();
        a.free(x.allocation_id, &x.blocks, true);
        let y = a.allocate(4, Some(&new)).unwrap();
        a.free(y.allocation_id, &y.blocks, true);
        // Needs 3 blocks: 2 free + 1 evicted, which must be the tail of the older prompt.
        let _held = a.allocate(6, None).unwrap();
        let w = a.allocate(4, Some(&new)).unwrap();
        assert_eq!(w.prefix_len, 4);
        a.free(w.allocation_id, &w.blocks, true);
        let v = a.allocate(4, Some(&old)).unwrap();
        assert_eq!(v.prefix_len, 2);
    }

    #[test]
    fn referenced_prefixes_are_not_evicted() {
        let mut a = RadixAllocator::new(2, 7); // 6 usable blocks
        let p = prompt(4, 0);
        let x = a.allocate(4, Some(&p)).unwrap();
        a.free(x.allocation_id, &x.blocks, true);
        // Reuse the cached prefix: its 2 blocks are now referenced.
        let user = a.allocate(6, Some(&p)).unwrap();
        assert_eq!(user.prefix_len, 4);
        assert_eq!(a.free_blocks(), 3);
        // 4 blocks cannot be found without evicting referenced ones.
        assert!(a.allocate(8, None).is_none());
        assert_eq!(a.free_blocks(), 3);
        let rest = a.allocate(6, None).unwrap();
        assert_eq!(a.free_blocks(), 0);
        a.free(rest.allocation_id, &rest.blocks, true);
        a.free(user.allocation_id, &user.blocks, true);
        assert_eq!(a.free_blocks(), 6);
    }

    #[test]
    fn a_prefix_cached_twice_returns_the_duplicate_blocks() {
        let mut a = RadixAllocator::new(2, 11); // 10 usable blocks
        let p = prompt(4, 0);
        // Both start before either is cached: neither gets a prefix.
        let x = a.allocate(5, Some(&p)).unwrap();
        let y = a.allocate(5, Some(&p)).unwrap();
        assert_eq!((x.prefix_len, y.prefix_len), (0, 0));
        a.free(x.allocation_id, &x.blocks, true);
        a.free(y.allocation_id, &y.blocks, true);
        assert_eq!(a.free_blocks(), 10);
        // Exactly one copy is cached: 2 blocks, the other 8 on the free list.
        assert_eq!(a.free_blocks.len(), 8);
        let z = a.allocate(5, Some(&p)).unwrap();
        assert_eq!(z.prefix_len, 4);
        assert_eq!(z.blocks[..2], x.blocks[..2]);
    }

    #[test]
    fn failed_allocation_releases_its_prefix_reference() {
        let mut a = RadixAllocator::new(2, 5); // 4 usable blocks
        let p = prompt(4, 0);
        let x = a.allocate(4, Some(&p)).unwrap();
        a.free(x.allocation_id, &x.blocks, true);
        assert!(a.allocate(20, Some(&p)).is_none());
        // The cached prefix is unreferenced again: evictable, so all 4 blocks can be had.
        assert_eq!(a.allocate(8, None).unwrap().blocks.len(), 4);
    }
}
