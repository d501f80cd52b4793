//! Per-sequence KV cache owned by the engine, not by the model.
use candle_core::Tensor;

/// Keys and values of one sequence, per layer: `[kv_heads, seq, head_dim]` tensors (layouts are the
/// model's business; the engine only creates, measures and drops caches).
#[derive(Debug, Default, Clone)]
pub struct SeqCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of positions already cached.
    pub len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        SeqCache {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
