//! KV block allocation: the router decides where every request's K/V live on the shards.
//!
//! [`BlockAllocator`] owns the free list and the prefix cache ([`RadixAllocator`]); a
//! [`BlockAllocation`] gives its blocks back when dropped, so a request that finishes, fails or
//! is cancelled frees its memory without anyone remembering to. The state sits behind a mutex
//! held only for the bookkeeping of one call (never across an await), so dropping an
//! allocation on any task is cheap and never waits on I/O.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::{KV_BLOCKS_FREE, KV_BLOCKS_USED};
use crate::radix::RadixAllocator;

struct Inner {
    radix: RadixAllocator,
    /// Usable blocks (block 0 excluded).
    total_blocks: usize,
}

/// Hands out KV blocks; cloning shares the same pool.
#[derive(Clone)]
pub struct BlockAllocator {
    inner: Arc<Mutex<Inner>>,
    block_size: u32,
    prefix_caching: bool,
}

impl BlockAllocator {
    /// A pool of `max_batch_total_tokens / block_size` blocks, block 0 reserved for the health
    /// check. Without `prefix_caching` prompts are never looked up nor cached, which makes the
    /// radix allocator a plain free list.
    pub fn new(max_batch_total_tokens: u32, block_size: u32, prefix_caching: bool) -> Self {
        let block_size = block_size.max(1);
        let num_blocks = max_batch_total_tokens / block_size;
        let allocator = Self {
            inner: Arc::new(Mutex::new(Inner {
                radix: RadixAllocator::new(block_size, num_blocks),
                total_blocks: num_blocks.saturating_sub(1) as usize,
            })),
            block_size,
            prefix_caching,
        };
        allocator.record(&allocator.lock());
        allocator
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks a new allocation could get now (free or held only by the prefix cache).
    pub fn free_blocks(&self) -> usize {
        self.lock().radix.free_blocks()
    }

    /// Usable blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.lock().total_blocks
    }

    /// Blocks for `tokens` token positions; with `prefill_tokens` (the prompt) and prefix
    /// caching on, its longest cached prefix is reused (`prefix_len`). `None` when the pool
    /// cannot hold it now.
    pub fn allocate(&self, tokens: u32, prefill_tokens: Option<&[u32]>) -> Option<BlockAllocation> {
        let prefill_tokens = prefill_tokens.filter(|_| self.prefix_caching);
        let mut inner = self.lock();
        let allocated = inner.radix.allocate(tokens, prefill_tokens)?;
        self.record(&inner);
        drop(inner);
        Some(BlockAllocation {
            blocks: allocated.blocks,
            prefix_len: allocated.prefix_len,
            allocation_id: allocated.allocation_id,
            prompt_computed: false,
            allocator: self.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every update is a few plain
        // field writes, so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, inner: &Inner) {
        let free = inner.radix.free_blocks();
        metrics::gauge!(KV_BLOCKS_FREE).set(free as f64);
        metrics::gauge!(KV_BLOCKS_USED).set(inner.total_blocks.saturating_sub(free) as f64);
    }
}

/// One request's KV blocks; dropping it returns them to the pool (and, once its prompt was
/// computed, caches the prompt's whole blocks for later requests).
pub struct BlockAllocation {
    /// Every block of the request, cached prefix first.
    pub blocks: Vec<u32>,
    /// Prompt tokens already in the cache (a multiple of the block size).
    pub prefix_len: u32,
    allocation_id: u64,
    prompt_computed: bool,
    allocator: BlockAllocator,
}

impl BlockAllocation {
    /// Records that the shard computed the whole prompt into these blocks, so they may serve
    /// as a prefix cache for later requests once freed. Until then (queued, cancelled
    /// mid-prompt) the blocks may hold partial K/V and are never cached.
    pub fn mark_prompt_computed(&mut self) {
        self.prompt_computed = true;
    }
}

impl std::fmt::Debug for BlockAllocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockAllocation")
            .field("blocks", &self.blocks)
            .field("prefix_len", &self.prefix_len)
            .finish_non_exhaustive()
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let mut inner = self.allocator.lock();
        inner
            .radix
            .free(self.allocation_id, &self.blocks, self.prompt_computed);
        self.allocator.record(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_an_allocation_frees_its_blocks() {
        let allocator = BlockAllocator::new(64, 4, true);
        assert_eq!(allocator.total_blocks(), 15);
        let a = allocator.allocate(10, Some(&[1, 2, 3, 4, 5])).unwrap();
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(allocator.free_blocks(), 12);
        drop(a);
        assert_eq!(allocator.free_blocks(), 15);
    }

    #[test]
    fn only_computed_prompts_are_cached() {
        let allocator = BlockAllocator::new(64, 4, true);
        let prompt: Vec<u32> = (0..9).collect();
        drop(allocator.allocate(12, Some(&prompt)).unwrap());
        assert_eq!(allocator.allocate(12, Some(&prompt)).unwrap().prefix_len, 0);
        let mut a = allocator.allocate(12, Some(&prompt)).unwrap();
        a.mark_prompt_computed();
        drop(a);
        assert_eq!(allocator.allocate(12, Some(&prompt)).unwrap().prefix_len, 8);
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused() {
        let allocator = BlockAllocator::new(64, 4, false);
        let prompt: Vec<u32> = (0..9).collect();
        let mut a = allocator.allocate(12, Some(&prompt)).unwrap();
        a.mark_prompt_computed();
        drop(a);
        assert_eq!(allocator.allocate(12, Some(&prompt)).unwrap().prefix_len, 0);
        assert_eq!(allocator.free_blocks(), 15);
    }

    #[test]
    fn a_full_pool_refuses() {
        let allocator = BlockAllocator::new(16, 4, true); // 3 usable blocks
        let a = allocator.allocate(12, None).unwrap();
        assert!(allocator.allocate(1, None).is_none());
        drop(a);
        assert!(allocator.allocate(12, None).is_some());
    }
}
