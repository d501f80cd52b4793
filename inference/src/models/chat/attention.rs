//! Attention of every sequence of a step in one computation per layer, over the paged KV pool
//! (`kv.rs`): decode tokens and prefill chunks of any lengths and positions together.
//!
//! The new keys/values are written to the pool first; then each query token attends to rows
//! `0..=position` of its own sequence. Two implementations give the same result:
//! - on the CPU in float32, a kernel that reads the key/value rows where the block table says they
//!   are (no gather, no padding) and parallelises over sequences x key/value heads x query tiles:
//!   one op per layer instead of a dozen small ops per sequence;
//! - elsewhere (GPU, other dtypes), candle ops: the step's queries and key/value rows are gathered
//!   into a padded batch `[seqs, kv_heads, rows, dim]` with a mask, then two batched matmuls with the
//!   softmax in float32. Query tiles and groups of sequences are sized so that the padded scores stay
//!   under [`GENERIC_SCRATCH_BYTES`]: a decode step of a whole batch is one group.
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::kv::{KvLayer, SeqCache};

/// Upper bound of the transient tensors of one generic attention group.
pub const GENERIC_SCRATCH_BYTES: usize = 256 << 20;

static FORCE_GENERIC: AtomicBool = AtomicBool::new(false);

/// Use the candle-ops implementation on the CPU too (tests compare both; the GPU always uses it).
#[doc(hidden)]
pub fn force_generic(on: bool) {
    FORCE_GENERIC.store(on, Ordering::Relaxed);
}

/// One sequence of the step.
#[derive(Debug, Clone)]
pub struct KvSpan {
    /// First row of its new tokens in the packed `[tokens, ...]` activations.
    pub offset: usize,
    /// New tokens.
    pub len: usize,
    /// Positions cached before this step.
    pub past: usize,
    /// Its block table.
    pub blocks: Vec<u32>,
}

impl KvSpan {
    fn row(&self, p: usize, block_size: usize) -> usize {
        self.blocks[p / block_size] as usize * block_size + p % block_size
    }
}

/// Where every sequence of a step reads and writes in the pool; built once per step, shared by all
/// layers.
#[derive(Debug)]
pub struct StepKv {
    pub spans: Vec<KvSpan>,
    block_size: usize,
    /// Pool row of each new token, packed order.
    write_rows: Vec<u32>,
    /// Absolute position of each new token, packed order.
    positions: Vec<usize>,
    write_rows_on: PerDevice,
}

impl StepKv {
    /// `steps`: each sequence's cache (already grown to hold the new tokens) and its new tokens.
    pub fn new(steps: &[(&SeqCache, usize)], block_size: usize) -> Self {
        let mut spans = Vec::with_capacity(steps.len());
        let (mut write_rows, mut positions) = (Vec::new(), Vec::new());
        for &(cache, len) in steps {
            let span = KvSpan {
                offset: positions.len(),
                len,
                past: cache.len,
                blocks: cache.blocks().to_vec(),
            };
            for p in span.past..span.past + len {
                positions.push(p);
                write_rows.push(span.row(p, block_size) as u32);
            }
            spans.push(span);
        }
        StepKv {
            spans,
            block_size,
            write_rows,
            positions,
            write_rows_on: PerDevice::default(),
        }
    }

    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    pub fn total_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Packed row of each sequence's last new token.
    pub fn last_rows(&self) -> Vec<u32> {
        self.spans
            .iter()
            .map(|s| (s.offset + s.len).saturating_sub(1) as u32)
            .collect()
    }

    /// Store this layer's new keys/values `[tokens, kv_heads, dim]`.
    pub fn write(&self, kv: &KvLayer, k: &Tensor, v: &Tensor) -> Result<()> {
        let rows = self.write_rows_on.get(k.device(), || {
            Tensor::new(self.write_rows.as_slice(), k.device())
        })?;
        kv.write(k, v, &rows)
    }
}

/// A tensor built once per step for each device that asks (layers may sit on several GPUs).
#[derive(Debug, Default)]
pub struct PerDevice(std::cell::RefCell<Vec<(Device, Tensor)>>);

impl PerDevice {
    pub fn get(&self, device: &Device, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        if let Some((_, t)) = self.0.borrow().iter().find(|(d, _)| d.same_device(device)) {
            return Ok(t.clone());
        }
        let t = make()?;
        self.0.borrow_mut().push((device.clone(), t.clone()));
        Ok(t)
    }
}

/// `q`: `[tokens, heads, key_dim]`, the step's queries in packed order (rotary applied); the step's
/// keys/values must already be written to `kv`. Returns `[tokens, heads, value_dim]`. Query head
/// `h` reads key/value head `h / (heads / kv_heads)`.
pub fn paged_attention(q: &Tensor, kv: &KvLayer, step: &StepKv, scale: f64) -> Result<Tensor> {
    let (_, heads, _) = q.dims3()?;
    let kv_heads = kv.k.dim(1)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("{heads} query heads do not share {kv_heads} key/value heads evenly");
    }
    let cpu_f32 = q.device().is_cpu() && q.dtype() == DType::F32 && kv.k.dtype() == DType::F32;
    if cpu_f32 && !FORCE_GENERIC.load(Ordering::Relaxed) {
        let op = CpuPagedAttention {
            spans: &step.spans,
            block_size: step.block_size,
            scale: scale as f32,
        };
        return q.contiguous()?.apply_op3_no_bwd(&kv.k, &kv.v, &op);
    }
    generic(q, kv, step, scale)
}

// ---------------------------------------------------------------------------------------------
// CPU kernel (glm-kernels)
// ---------------------------------------------------------------------------------------------

struct CpuPagedAttention<'a> {
    spans: &'a [KvSpan],
    block_size: usize,
    scale: f32,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("paged attention takes contiguous tensors"),
    }
}

impl CustomOp3 for CpuPagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, heads, key_dim) = ql.shape().dims3()?;
        let (_, kv_heads, kdk) = kl.shape().dims3()?;
        let (_, _, value_dim) = vl.shape().dims3()?;
        if kdk != key_dim {
            candle_core::bail!("query dim {key_dim} differs from key dim {kdk}");
        }
        let spans: Vec<glm_kernels::Span> = self
            .spans
            .iter()
            .map(|s| glm_kernels::Span {
                offset: s.offset,
                len: s.len,
                past: s.past,
                blocks: &s.blocks,
            })
            .collect();
        let dims = glm_kernels::Dims {
            heads,
            kv_heads,
            key_dim,
            value_dim,
            block_size: self.block_size,
        };
        let out = glm_kernels::paged_attention(
            contiguous_f32(qs, ql)?,
            contiguous_f32(ks, kl)?,
            contiguous_f32(vs, vl)?,
            &spans,
            dims,
            self.scale,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((tokens, heads, value_dim)),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Generic (candle ops, any device)
// ---------------------------------------------------------------------------------------------

/// A query tile: tokens `i0 .. i0 + n` of span `seq`.
#[derive(Debug, Clone, Copy)]
struct QueryTile {
    seq: usize,
    i0: usize,
    n: usize,
    /// Keys it sees: positions `0 .. kv_len`.
    kv_len: usize,
}

fn generic(q: &Tensor, kv: &KvLayer, step: &StepKv, scale: f64) -> Result<Tensor> {
    let (_, heads, dk) = q.dims3()?;
    let kv_heads = kv.k.dim(1)?;
    let dv = kv.v.dim(2)?;
    let per_score = heads * 4 * 3; // scores, masked scores, probabilities (float32)
    let mut tiles = Vec::new();
    for (seq, span) in step.spans.iter().enumerate() {
        let kv_len = span.past + span.len;
        let tile = (GENERIC_SCRATCH_BYTES / (per_score * kv_len.max(1))).clamp(1, 512);
        for i0 in (0..span.len).step_by(tile) {
            let n = tile.min(span.len - i0);
            tiles.push(QueryTile {
                seq,
                i0,
                n,
                kv_len: span.past + i0 + n,
            });
        }
    }
    let row_bytes = kv_heads * (dk + dv) * kv.k.dtype().size_in_bytes() * 2;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < tiles.len() {
        // Grow the group while its padded scratch stays within budget (at least one tile).
        let (mut end, mut nmax, mut lmax) = (start, 0, 0);
        while end < tiles.len() {
            let (n2, l2) = (nmax.max(tiles[end].n), lmax.max(tiles[end].kv_len));
            let bytes = (end + 1 - start) * (n2 * l2 * per_score + l2 * row_bytes);
            if end > start && bytes > GENERIC_SCRATCH_BYTES {
                break;
            }
            (nmax, lmax, end) = (n2, l2, end + 1);
        }
        outs.push(generic_group(q, kv, step, &tiles[start..end], scale)?);
        start = end;
    }
    // Tiles come in packed token order, so the groups' rows do too.
    Tensor::cat(&outs, 0)
}

/// One padded batch: `[tiles, kv_heads, groups * nmax, dk] x [tiles, kv_heads, dk, lmax]`.
fn generic_group(
    q: &Tensor,
    kv: &KvLayer,
    step: &StepKv,
    tiles: &[QueryTile],
    scale: f64,
) -> Result<Tensor> {
    let device = q.device();
    let (_, heads, dk) = q.dims3()?;
    let (kv_heads, dv) = (kv.k.dim(1)?, kv.v.dim(2)?);
    let groups = heads / kv_heads;
    let s = tiles.len();
    let nmax = tiles.iter().map(|t| t.n).max().unwrap_or(1);
    let lmax = tiles.iter().map(|t| t.kv_len).max().unwrap_or(1);
    let (mut kidx, mut qidx, mut keep) = (Vec::new(), Vec::new(), Vec::new());
    let mut mask = Vec::with_capacity(s * nmax * lmax);
    for (ti, t) in tiles.iter().enumerate() {
        let span = &step.spans[t.seq];
        // Padding rows repeat a real row (position 0 or the tile's last query) and are masked or
        // dropped, so no row is all -inf.
        for j in 0..lmax {
            let p = if j < t.kv_len { j } else { 0 };
            kidx.push(span.row(p, step.block_size) as u32);
        }
        for i in 0..nmax {
            let real = i.min(t.n - 1);
            qidx.push((span.offset + t.i0 + real) as u32);
            if i < t.n {
                keep.push((ti * nmax + i) as u32);
            }
            let sees = span.past + t.i0 + real;
            mask.extend((0..lmax).map(|j| if j <= sees { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    let kidx = Tensor::from_vec(kidx, s * lmax, device)?;
    let gather = |pool: &Tensor, dim: usize| -> Result<Tensor> {
        pool.index_select(&kidx, 0)?
            .reshape((s, lmax, kv_heads, dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = (gather(&kv.k, dk)?, gather(&kv.v, dv)?);
    let qidx = Tensor::from_vec(qidx, s * nmax, device)?;
    let qs = q
        .index_select(&qidx, 0)?
        .reshape((s, nmax, kv_heads, groups, dk))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((s, kv_heads, groups * nmax, dk))?;
    let scores = (qs.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let mask = Tensor::from_vec(mask, (s, 1, 1, nmax, lmax), device)?;
    let scores = scores
        .reshape((s, kv_heads, groups, nmax, lmax))?
        .broadcast_add(&mask)?
        .reshape((s, kv_heads, groups * nmax, lmax))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    let out = probs
        .matmul(&v)?
        .reshape((s, kv_heads, groups, nmax, dv))?
        .permute((0, 3, 1, 2, 4))?
        .reshape((s * nmax, heads, dv))?;
    let keep_len = keep.len();
    out.index_select(&Tensor::from_vec(keep, keep_len, device)?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::chat::kv::{BlockAllocator, KvShape};

    /// Plain causal attention per sequence, written out with candle ops on dense tensors.
    fn reference(
        q: &Tensor,
        keys: &[Tensor],
        values: &[Tensor],
        step: &StepKv,
        heads: usize,
        scale: f64,
    ) -> Tensor {
        let mut outs = Vec::new();
        for (s, span) in step.spans.iter().enumerate() {
            let kv_heads = keys[s].dim(1).unwrap();
            let groups = heads / kv_heads;
            for i in 0..span.len {
                let p = span.past + i;
                let qi = q.get(span.offset + i).unwrap(); // [heads, dk]
                let mut rows = Vec::new();
                for h in 0..heads {
                    let k = keys[s]
                        .narrow(0, 0, p + 1)
                        .unwrap()
                        .get_on_dim(1, h / groups)
                        .unwrap();
                    let v = values[s]
                        .narrow(0, 0, p + 1)
                        .unwrap()
                        .get_on_dim(1, h / groups)
                        .unwrap();
                    let sc = (k.matmul(&qi.get(h).unwrap().unsqueeze(1).unwrap()).unwrap() * scale)
                        .unwrap();
                    let pr = candle_nn::ops::softmax(&sc.squeeze(1).unwrap(), 0).unwrap();
                    rows.push(
                        pr.unsqueeze(0)
                            .unwrap()
                            .matmul(&v)
                            .unwrap()
                            .squeeze(0)
                            .unwrap(),
                    );
                }
                outs.push(Tensor::stack(&rows, 0).unwrap());
            }
        }
        Tensor::stack(&outs, 0).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Three sequences (a prefill chunk after cached positions, a fresh prompt, a decode token) with
    /// scattered blocks, GQA 6 heads over 2, distinct key and value widths.
    #[test]
    fn both_implementations_equal_plain_causal_attention() {
        let dev = Device::Cpu;
        let (heads, shape) = (
            6,
            KvShape {
                kv_heads: 2,
                key_dim: 8,
                value_dim: 5,
            },
        );
        let alloc = BlockAllocator::new(16, 4);
        let layer = KvLayer::zeros(64, shape, DType::F32, &dev).unwrap();
        let plan = [(5usize, 7usize), (0, 9), (11, 1)];
        let mut caches: Vec<SeqCache> = Vec::new();
        let _spacer = alloc.try_reserve(4).map(|mut c| {
            c.grow(4).unwrap();
            c
        });
        for &(past, len) in &plan {
            let mut c = alloc.try_reserve(past + len).unwrap();
            c.grow(past + len).unwrap();
            c.len = past;
            caches.push(c);
        }
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        // Earlier positions written by a previous "step".
        for (c, &(past, len)) in caches.iter().zip(&plan) {
            let k = Tensor::randn(0f32, 1., (past + len, 2, 8), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (past + len, 2, 5), &dev).unwrap();
            if past > 0 {
                let rows: Vec<u32> = (0..past).map(|p| c.row(p) as u32).collect();
                let rows = Tensor::new(rows.as_slice(), &dev).unwrap();
                layer
                    .write(
                        &k.narrow(0, 0, past).unwrap(),
                        &v.narrow(0, 0, past).unwrap(),
                        &rows,
                    )
                    .unwrap();
            }
            keys.push(k);
            values.push(v);
        }
        let steps: Vec<(&SeqCache, usize)> =
            caches.iter().zip(&plan).map(|(c, p)| (c, p.1)).collect();
        let step = StepKv::new(&steps, 4);
        let new_k: Vec<Tensor> = keys
            .iter()
            .zip(&plan)
            .map(|(k, p)| k.narrow(0, p.0, p.1).unwrap())
            .collect();
        let new_v: Vec<Tensor> = values
            .iter()
            .zip(&plan)
            .map(|(v, p)| v.narrow(0, p.0, p.1).unwrap())
            .collect();
        step.write(
            &layer,
            &Tensor::cat(&new_k, 0).unwrap(),
            &Tensor::cat(&new_v, 0).unwrap(),
        )
        .unwrap();
        let q = Tensor::randn(0f32, 1., (17, heads, 8), &dev).unwrap();
        let want = reference(&q, &keys, &values, &step, heads, 0.3);
        let fast = paged_attention(&q, &layer, &step, 0.3).unwrap();
        assert_eq!(fast.dims(), &[17, heads, 5]);
        assert!(
            max_diff(&fast, &want) < 1e-5,
            "cpu kernel {}",
            max_diff(&fast, &want)
        );
        let generic = generic(&q, &layer, &step, 0.3).unwrap();
        assert!(
            max_diff(&generic, &want) < 1e-5,
            "generic {}",
            max_diff(&generic, &want)
        );
    }
}
