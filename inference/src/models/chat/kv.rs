//! The paged KV cache: one pool of fixed-size blocks per model, shared by every sequence.
//!
//! Design note. Each layer keeps its keys and values in two preallocated tensors
//! `[blocks * BLOCK_SIZE, kv_heads, head_dim]` (a flat row per cached position); a sequence owns a
//! list of blocks (its block table), so position `p` lives in row `table[p / BLOCK_SIZE] *
//! BLOCK_SIZE + p % BLOCK_SIZE` of every layer. Chosen over one slot of `max_len` rows per sequence
//! because contexts here reach 128K positions while most requests use a few hundred: slots would
//! spend the pool on padding and cap concurrency at `pool / max_len`, blocks waste less than one
//! block per sequence. The price, an indirection per key row, is paid inside the attention kernel
//! (see `attention.rs`), which reads the rows where they are.
//!
//! Admission is by worst case: a sequence reserves the blocks for its prompt plus its `max_tokens`
//! (capped at the context) before it runs, and takes them from the free list only as it grows.
//! Since reservations never exceed the pool, a running sequence can always grow: running out of KV
//! memory is impossible by construction, and nothing is ever preempted. Dropping a [`SeqCache`]
//! returns its blocks and its reservation.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Tensor};

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

/// Block bookkeeping of one model's pool (the same block ids index every layer's tensors).
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    total_blocks: usize,
    state: Mutex<AllocState>,
}

#[derive(Debug)]
struct AllocState {
    free: Vec<u32>,
    /// Blocks promised to live caches, taken or not.
    reserved: usize,
}

static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

impl BlockAllocator {
    pub fn new(total_blocks: usize, block_size: usize) -> Arc<Self> {
        // Popped from the end: block 0 first, so that a lone sequence's rows are contiguous.
        let free = (0..total_blocks as u32).rev().collect();
        Arc::new(BlockAllocator {
            block_size: block_size.max(1),
            total_blocks,
            state: Mutex::new(AllocState { free, reserved: 0 }),
        })
    }

    /// A pool holding at least `tokens` positions.
    pub fn with_capacity(tokens: usize) -> Arc<Self> {
        BlockAllocator::new(tokens.div_ceil(BLOCK_SIZE), BLOCK_SIZE)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks * self.block_size
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub fn reserved_blocks(&self) -> usize {
        self.lock().reserved
    }

    /// Reserved share of the pool, 0..=1 (`glm_kv_cache_usage_ratio`).
    pub fn usage_ratio(&self) -> f64 {
        if self.total_blocks == 0 {
            return 0.0;
        }
        self.reserved_blocks() as f64 / self.total_blocks as f64
    }

    /// Reserve room for `tokens` positions. `None` when the blocks not yet promised are too few.
    pub fn try_reserve(self: &Arc<Self>, tokens: usize) -> Option<SeqCache> {
        let blocks = self.blocks_for(tokens.max(1));
        let mut state = self.lock();
        if state.reserved + blocks > self.total_blocks {
            return None;
        }
        state.reserved += blocks;
        drop(state);
        Some(SeqCache {
            len: 0,
            blocks: Vec::new(),
            reserved: blocks,
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            alloc: self.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, AllocState> {
        // The state stays consistent even if a holder panicked: every update is a single step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One sequence's share of the pool: its block table and how many positions are cached.
pub struct SeqCache {
    /// Positions already cached; the model advances it after a successful forward pass.
    pub len: usize,
    blocks: Vec<u32>,
    /// Blocks reserved, `>= blocks.len()`.
    reserved: usize,
    id: u64,
    alloc: Arc<BlockAllocator>,
}

impl std::fmt::Debug for SeqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqCache")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl SeqCache {
    /// Unique among the caches of this process (mock models key their state by it).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this sequence may ever hold.
    pub fn capacity(&self) -> usize {
        self.reserved * self.alloc.block_size
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Whether the cache was reserved from `alloc`.
    pub fn belongs_to(&self, alloc: &Arc<BlockAllocator>) -> bool {
        Arc::ptr_eq(&self.alloc, alloc)
    }

    /// Take blocks from the reservation so that positions `0..tokens` have rows.
    pub fn grow(&mut self, tokens: usize) -> Result<()> {
        let need = self.alloc.blocks_for(tokens);
        if need > self.reserved {
            candle_core::bail!(
                "sequence needs {tokens} positions but reserved {} (a bug in admission)",
                self.capacity()
            );
        }
        if need > self.blocks.len() {
            let mut state = self.alloc.lock();
            while self.blocks.len() < need {
                // Reservations never exceed the pool, so a reserved block is always free.
                let Some(b) = state.free.pop() else {
                    candle_core::bail!("KV pool exhausted despite the reservation (a bug)");
                };
                self.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Pool row of position `p` (within the blocks taken).
    pub fn row(&self, p: usize) -> usize {
        let bs = self.alloc.block_size;
        self.blocks[p / bs] as usize * bs + p % bs
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        let mut state = self.alloc.lock();
        state.free.append(&mut self.blocks);
        state.reserved = state.reserved.saturating_sub(self.reserved);
    }
}

/// One layer's share of the pool, on the layer's device.
#[derive(Debug, Clone)]
pub struct KvLayer {
    /// `[rows, kv_heads, key_dim]`.
    pub k: Tensor,
    /// `[rows, kv_heads, value_dim]`.
    pub v: Tensor,
}

/// What one layer stores per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
}

impl KvShape {
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        self.kv_heads * (self.key_dim + self.value_dim) * dtype.size_in_bytes()
    }
}

impl KvLayer {
    /// Zeroed rows (on the CPU the pages are only committed once written).
    pub fn zeros(rows: usize, shape: KvShape, dtype: DType, device: &Device) -> Result<Self> {
        Ok(KvLayer {
            k: Tensor::zeros((rows, shape.kv_heads, shape.key_dim), dtype, device)?,
            v: Tensor::zeros((rows, shape.kv_heads, shape.value_dim), dtype, device)?,
        })
    }

    /// Store the step's new keys/values `[tokens, kv_heads, dim]` at their rows.
    pub fn write(&self, k: &Tensor, v: &Tensor, rows: &Tensor) -> Result<()> {
        scatter_rows(&self.k, k, rows)?;
        scatter_rows(&self.v, v, rows)
    }
}

fn scatter_rows(pool: &Tensor, new: &Tensor, rows: &Tensor) -> Result<()> {
    let (t, h, d) = new.dims3()?;
    let idx = rows
        .reshape((t, 1, 1))?
        .broadcast_as((t, h, d))?
        .contiguous()?;
    pool.scatter_set(&idx, &new.to_dtype(pool.dtype())?.contiguous()?, 0)
}

/// Every layer's tensors plus the shared block bookkeeping.
#[derive(Debug)]
pub struct KvPool {
    pub blocks: Arc<BlockAllocator>,
    pub layers: Vec<KvLayer>,
}

impl KvPool {
    /// A pool of `tokens` positions (rounded up to whole blocks) for layers of the given shapes,
    /// each on its own device.
    pub fn new(tokens: usize, layers: &[(KvShape, Device)], dtype: DType) -> Result<Self> {
        let blocks = BlockAllocator::with_capacity(tokens);
        let rows = blocks.capacity_tokens();
        let layers = layers
            .iter()
            .map(|(shape, device)| KvLayer::zeros(rows, *shape, dtype, device))
            .collect::<Result<_>>()?;
        Ok(KvPool { blocks, layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_bound_the_pool_and_come_back_on_drop() {
        let alloc = BlockAllocator::new(4, 16);
        let a = alloc.try_reserve(40).unwrap(); // 3 blocks
        assert!(alloc.try_reserve(17).is_none()); // needs 2, 1 left
        let b = alloc.try_reserve(16).unwrap();
        assert_eq!(alloc.usage_ratio(), 1.0);
        drop(a);
        assert_eq!(alloc.reserved_blocks(), 1);
        drop(b);
        assert!(alloc.try_reserve(64).is_some());
    }

    #[test]
    fn caches_grow_within_their_reservation_and_map_positions_to_rows() {
        let alloc = BlockAllocator::new(8, 4);
        let mut other = alloc.try_reserve(4).unwrap();
        let mut c = alloc.try_reserve(10).unwrap();
        other.grow(1).unwrap();
        c.grow(6).unwrap();
        assert_eq!(c.blocks().len(), 2);
        assert_eq!(c.row(5), c.blocks()[1] as usize * 4 + 1);
        assert!(c.grow(13).is_err());
        c.grow(12).unwrap();
        let taken: Vec<u32> = c.blocks().iter().chain(other.blocks()).copied().collect();
        let mut unique = taken.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), taken.len(), "blocks are never shared");
    }

    #[test]
    fn writes_land_in_the_given_rows() {
        let shape = KvShape {
            kv_heads: 2,
            key_dim: 3,
            value_dim: 1,
        };
        let layer = KvLayer::zeros(6, shape, DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 3))
            .unwrap();
        let v = Tensor::new(&[[[7f32], [8.]], [[9.], [10.]]], &Device::Cpu).unwrap();
        let rows = Tensor::new(&[4u32, 1], &Device::Cpu).unwrap();
        layer.write(&k, &v, &rows).unwrap();
        let kk = layer.k.to_vec3::<f32>().unwrap();
        assert_eq!(kk[4], vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        assert_eq!(kk[1], vec![vec![6., 7., 8.], vec![9., 10., 11.]]);
        assert_eq!(kk[0], vec![vec![0.; 3]; 2]);
        let vv = layer.v.to_vec3::<f32>().unwrap();
        assert_eq!((vv[4][1][0], vv[1][0][0]), (8., 9.));
    }
}
