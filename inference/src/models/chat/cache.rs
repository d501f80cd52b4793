//! Per-sequence KV cache owned by the engine, not by the model.
use candle_core::{Result, Tensor};

/// Keys and values of one sequence, per layer (layouts are the model's business; the engine only
/// creates, measures and drops caches). The chat models here keep, per layer, `[heads, capacity,
/// dim]` buffers whose first `len` positions are filled (see [`append_kv`]).
#[derive(Debug, Default)]
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

/// Smallest buffer a layer starts with, in positions.
const MIN_CAPACITY: usize = 64;

/// Write new keys/values `[heads, n, dim]` at positions `past..past + n` of a layer's buffers and
/// return views of positions `0..past + n`.
///
/// Buffers grow by doubling, so a decode step writes only its own position instead of copying the
/// whole cache (what `Tensor::cat` would do at every step). The views are strided along the
/// sequence axis, which matmul takes as they are.
pub fn append_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    past: usize,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = k.dim(1)?;
    let needed = past + n;
    let (kb, vb) = match slot.take() {
        Some((kb, vb)) if kb.dim(1)? >= needed => (kb, vb),
        old => {
            let capacity = old
                .as_ref()
                .map_or(Ok(0), |(kb, _)| kb.dim(1))?
                .saturating_mul(2)
                .max(needed)
                .max(MIN_CAPACITY);
            let kb = grown(old.as_ref().map(|(kb, _)| kb), k, capacity, past)?;
            let vb = grown(old.as_ref().map(|(_, vb)| vb), v, capacity, past)?;
            (kb, vb)
        }
    };
    kb.slice_set(&k.contiguous()?, 1, past)?;
    vb.slice_set(&v.contiguous()?, 1, past)?;
    let views = (kb.narrow(1, 0, needed)?, vb.narrow(1, 0, needed)?);
    *slot = Some((kb, vb));
    Ok(views)
}

/// A zeroed `[heads, capacity, dim]` buffer shaped like `new`, holding the first `past` positions
/// of `old`.
fn grown(old: Option<&Tensor>, new: &Tensor, capacity: usize, past: usize) -> Result<Tensor> {
    let (heads, _, dim) = new.dims3()?;
    let buf = Tensor::zeros((heads, capacity, dim), new.dtype(), new.device())?;
    if let Some(old) = old.filter(|_| past > 0) {
        buf.slice_set(&old.narrow(1, 0, past)?.contiguous()?, 1, 0)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn positions(from: u32, n: usize) -> Tensor {
        let data: Vec<f32> = (0..n as u32).map(|i| (from + i) as f32).collect();
        Tensor::from_vec(data, (1, n, 1), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_and_grows_keeping_earlier_positions() {
        let mut slot = None;
        let mut past = 0;
        for n in [3, 1, 70, 1, 200] {
            let t = positions(past as u32, n);
            let (k, v) = append_kv(&mut slot, past, &t, &t).unwrap();
            past += n;
            let want: Vec<f32> = (0..past).map(|p| p as f32).collect();
            assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
            assert_eq!(v.dims(), &[1, past, 1]);
            assert!(slot.as_ref().unwrap().0.dim(1).unwrap() >= past);
        }
        // 3 -> 64, 74 -> 128, 275 -> 275: three allocations, not one per step.
        assert_eq!(slot.unwrap().0.dim(1).unwrap(), 275);
    }
}
