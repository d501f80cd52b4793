//! [`paged_attention`]: causal attention of a step's packed query tokens over a paged KV pool,
//! in float32, parallel over sequences x key/value heads x query tiles.
use rayon::prelude::*;

use crate::rows::softmax as softmax_in_place;

/// One sequence of a step.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    /// First row of its new tokens in the packed queries.
    pub offset: usize,
    /// New tokens.
    pub len: usize,
    /// Positions cached before them (the new tokens sit at `past .. past + len`).
    pub past: usize,
    /// Its block table: position `p` is pool row `blocks[p / block_size] * block_size + p % block_size`.
    pub blocks: &'a [u32],
}

#[cfg(test)]
impl Span<'_> {
    fn row(&self, p: usize, block_size: usize) -> usize {
        self.blocks[p / block_size] as usize * block_size + p % block_size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub block_size: usize,
}

/// Upper bound of one work item's score rows.
const TILE_BYTES: usize = 1 << 20;

/// Query tokens `i0 .. i0 + n` of span `seq` against key/value head `g`.
#[derive(Debug, Clone, Copy)]
struct Item {
    seq: usize,
    g: usize,
    i0: usize,
    n: usize,
}

/// `q`: `[tokens, heads, key_dim]` (packed in span order); `k`: `[rows, kv_heads, key_dim]`;
/// `v`: `[rows, kv_heads, value_dim]`, every position of every span already written. Token `i` of a
/// span attends to its span's positions `0 ..= past + i`; query head `h` reads key/value head
/// `h / (heads / kv_heads)`. Returns `[tokens, heads, value_dim]`.
///
/// Numerics as the reference's eager attention: scores `q.k * scale`, softmax (max subtracted,
/// exponentiated, divided by the sum), then the probability-weighted sum of values.
pub fn paged_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    spans: &[Span],
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let tokens: usize = spans.iter().map(|s| s.len).sum();
    let groups = (d.heads / d.kv_heads.max(1)).max(1);
    let mut items = Vec::new();
    for (seq, span) in spans.iter().enumerate() {
        let kv_len = (span.past + span.len).max(1);
        let tile = (TILE_BYTES / (groups * kv_len * 4)).clamp(1, 32);
        for g in 0..d.kv_heads {
            for i0 in (0..span.len).step_by(tile) {
                items.push(Item {
                    seq,
                    g,
                    i0,
                    n: tile.min(span.len - i0),
                });
            }
        }
    }
    let parts: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&it| {
            tile(&Tile {
                q,
                k,
                v,
                span: &spans[it.seq],
                it,
                d,
                scale,
            })
        })
        .collect();
    let mut out = vec![0f32; tokens * d.heads * d.value_dim];
    let width = groups * d.value_dim;
    for (it, part) in items.iter().zip(parts) {
        let span = &spans[it.seq];
        for (i, src) in part.chunks_exact(width).enumerate() {
            let dst = ((span.offset + it.i0 + i) * d.heads + it.g * groups) * d.value_dim;
            out[dst..dst + width].copy_from_slice(src);
        }
    }
    out
}

/// Rows `r = i * groups + h` (query token `i0 + i`, head `g * groups + h`): scores, softmax, weighted
/// values, reading each key and value row once. Returns `[n * groups, value_dim]`.
fn tile(t: &Tile) -> Vec<f32> {
    if t.it.n * (t.d.heads / t.d.kv_heads) >= GEMM_MIN_ROWS {
        tile_gemm(t)
    } else {
        tile_dots(t)
    }
}

/// One work item with everything it reads.
#[derive(Clone, Copy)]
struct Tile<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    span: &'a Span<'a>,
    it: Item,
    d: Dims,
    scale: f32,
}

impl Tile<'_> {
    /// Rows of positions `0..kv_len` for this tile's key/value head in the `[rows, kv_heads, _]`
    /// pools (times key_dim or value_dim: the offset of the key or value). Walking the block table,
    /// not dividing each position by the block size: in a 16-stream decode profile the two
    /// divisions per position (keys, then values) cost about as much as the position's dot
    /// product and value update.
    fn kv_slots(&self, kv_len: usize) -> Vec<usize> {
        let (bs, heads, g) = (self.d.block_size, self.d.kv_heads, self.it.g);
        self.span
            .blocks
            .iter()
            .flat_map(|&b| (0..bs).map(move |o| (b as usize * bs + o) * heads + g))
            .take(kv_len)
            .collect()
    }
}

/// Sizes shared by both ways of computing a tile.
struct Geom {
    groups: usize,
    dk: usize,
    dv: usize,
    /// Score rows: `n * groups`.
    rows: usize,
    /// Position of the tile's first query.
    first: usize,
    /// Positions its last query sees.
    kv_len: usize,
}

impl Geom {
    fn new(span: &Span, it: Item, d: Dims) -> Geom {
        let groups = d.heads / d.kv_heads;
        let first = span.past + it.i0;
        Geom {
            groups,
            dk: d.key_dim,
            dv: d.value_dim,
            rows: it.n * groups,
            first,
            kv_len: first + it.n,
        }
    }
}

/// [`tile`] by dot products (decode: a few rows). On AVX-512, [`avx512::tile_dots`] (FMAs,
/// several query rows a pass). On AVX2: perf of single-stream decode (SmolLM2, auto mode) had 12%
/// of samples in these loops as LLVM vectorises them (four lanes with shuffles); the dot products
/// run on eight-lane AVX vectors with the same eight partial sums in the same order, so results
/// are bit for bit those of the portable loops.
fn tile_dots(t: &Tile) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    match crate::Isa::detect() {
        // SAFETY: AVX-512F and FMA were detected on this CPU.
        crate::Isa::Avx512 => return unsafe { avx512::tile_dots(t) },
        // SAFETY: AVX2 (hence AVX) was detected on this CPU.
        crate::Isa::Avx2 => return unsafe { tile_dots_avx(t) },
        crate::Isa::Portable => {}
    }
    tile_dots_body::<Portable>(t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_dots_avx(t: &Tile) -> Vec<f32> {
    tile_dots_body::<x86::Avx>(t)
}

/// The dot product of [`tile_dots`], per instruction set.
trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;

    /// Four dot products with `a`, each summed as [`Dot::dot`] sums it.
    #[inline(always)]
    fn dot4(a: &[f32], bs: [&[f32]; 4]) -> [f32; 4] {
        bs.map(|b| Self::dot(a, b))
    }
}

struct Portable;

impl Dot for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

#[inline(always)]
fn tile_dots_body<D: Dot>(t: &Tile) -> Vec<f32> {
    let Geom {
        groups,
        dk,
        dv,
        rows,
        first,
        kv_len,
    } = Geom::new(t.span, t.it, t.d);
    let Tile {
        q,
        k,
        v,
        span,
        it,
        d,
        scale,
    } = *t;
    let q_row = |r: usize| {
        let at = ((span.offset + it.i0 + r / groups) * d.heads + it.g * groups + r % groups) * dk;
        &q[at..at + dk]
    };
    let mut scores = vec![0f32; rows * kv_len];
    let slots = t.kv_slots(kv_len);
    let key = |j: usize| &k[slots[j] * dk..(slots[j] + 1) * dk];
    for r in 0..rows {
        // Query i sees position j when first + i >= j.
        let seen = first + r / groups + 1;
        let row = &mut scores[r * kv_len..r * kv_len + seen];
        let mut quads = row.chunks_exact_mut(4);
        for (c, s) in quads.by_ref().enumerate() {
            let j = 4 * c;
            let dots = D::dot4(q_row(r), [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (s, d) in s.iter_mut().zip(dots) {
                *s = d * scale;
            }
        }
        let done = seen / 4 * 4;
        for (j, s) in quads.into_remainder().iter_mut().enumerate() {
            *s = D::dot(q_row(r), key(done + j)) * scale;
        }
    }
    for r in 0..rows {
        let seen = first + r / groups + 1;
        softmax_in_place(&mut scores[r * kv_len..r * kv_len + seen]);
    }
    let mut out = vec![0f32; rows * dv];
    for (r, out) in out.chunks_exact_mut(dv).enumerate() {
        let seen = first + r / groups + 1;
        weighted_sum(out, &scores[r * kv_len..r * kv_len + seen], |j| {
            &v[slots[j] * dv..(slots[j] + 1) * dv]
        });
    }
    out
}

/// `out = sum_j p[j] * row(j)`, each element summed over `j` in ascending order (as adding one
/// scaled row at a time into `out` would), but 64 columns at a time in registers: a profile of
/// 16-stream decode had a third of this file's samples in the loads and stores of `out` when it
/// was updated in memory once per position.
#[inline(always)]
fn weighted_sum<'a>(out: &mut [f32], p: &[f32], row: impl Fn(usize) -> &'a [f32]) {
    const COLS: usize = 64;
    for c in (0..out.len()).step_by(COLS) {
        let w = COLS.min(out.len() - c);
        let mut acc = [0f32; COLS];
        if w == COLS {
            for (j, &p) in p.iter().enumerate() {
                let x: &[f32; COLS] = row(j)[c..c + COLS].try_into().expect("64 columns");
                for l in 0..COLS {
                    acc[l] += p * x[l];
                }
            }
        } else {
            for (j, &p) in p.iter().enumerate() {
                axpy(&mut acc[..w], p, &row(j)[c..c + w]);
            }
        }
        out[c..c + w].copy_from_slice(&acc[..w]);
    }
}

/// Score rows of a tile from which it runs as two float32 GEMMs (prefill): a profile of a
/// 1,000-token prefill had 55-60% of its samples in the dot-product loops of [`tile`].
const GEMM_MIN_ROWS: usize = 16;

/// [`tile`] as `softmax(Q K^T * scale) V` with [`crate::sgemm`]: the tile's queries, keys and
/// values are gathered into contiguous rows (keys and values packed once per tile, a 1/rows
/// share of the products), positions a query may not see get probability 0.
fn tile_gemm(t: &Tile) -> Vec<f32> {
    use crate::sgemm::{matmul, PackedB};
    let g = Geom::new(t.span, t.it, t.d);
    let (it, d) = (t.it, t.d);
    let mut queries = Vec::with_capacity(g.rows * g.dk);
    for i in 0..it.n {
        let at = ((t.span.offset + it.i0 + i) * d.heads + it.g * g.groups) * g.dk;
        queries.extend_from_slice(&t.q[at..at + g.groups * g.dk]);
    }
    let slots = t.kv_slots(g.kv_len);
    let gather = |src: &[f32], width: usize| {
        let mut out = Vec::with_capacity(g.kv_len * width);
        for &s in &slots {
            out.extend_from_slice(&src[s * width..(s + 1) * width]);
        }
        out
    };
    let keys = PackedB::from_weight(&gather(t.k, g.dk), g.kv_len, g.dk, g.dk, None);
    let mut scores = vec![0f32; g.rows * g.kv_len];
    matmul(&queries, g.dk, g.rows, &keys, &mut scores, g.kv_len);
    for (r, row) in scores.chunks_exact_mut(g.kv_len).enumerate() {
        let seen = g.first + r / g.groups + 1;
        row[..seen].iter_mut().for_each(|s| *s *= t.scale);
        softmax_in_place(&mut row[..seen]);
        row[seen..].fill(0.0);
    }
    let mut values = PackedB::default();
    values.pack_rows(&gather(t.v, g.dv), g.kv_len, g.dv, g.dv);
    let mut out = vec![0f32; g.rows * g.dv];
    matmul(&scores, g.kv_len, g.rows, &values, &mut out, g.dv);
    out
}

/// Eight independent sums so that the loop vectorises (one float sum cannot be reordered).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub(super) struct Avx;

    impl super::Dot for Avx {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: only instantiated inside `tile_dots_avx`, which runs where AVX2 was detected.
            unsafe { dot(a, b) }
        }

        /// Four independent chains in one loop: one dot product at a time waited on its chain of
        /// dependent adds (in a 16-stream decode profile, 40% of the attention samples sat on
        /// those adds).
        #[inline(always)]
        fn dot4(a: &[f32], bs: [&[f32]; 4]) -> [f32; 4] {
            // SAFETY: as above.
            unsafe { dot4(a, bs) }
        }
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn dot4(a: &[f32], bs: [&[f32]; 4]) -> [f32; 4] {
        let n = bs.iter().fold(a.len(), |n, b| n.min(b.len())) / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= every length.
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            for (acc, b) in acc.iter_mut().zip(&bs) {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, _mm256_loadu_ps(b.as_ptr().add(i))));
            }
            i += 8;
        }
        let mut out = [0f32; 4];
        for ((o, acc), b) in out.iter_mut().zip(acc).zip(&bs) {
            *o = reduce(acc, a, b, n);
        }
        out
    }

    /// `acc`'s lanes and the tail past `n`, summed in [`super::dot`]'s order.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn reduce(acc: __m256, a: &[f32], b: &[f32], n: usize) -> f32 {
        let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
        // [a0 + a4, a1 + a5, a2 + a6, a3 + a7]
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let hi = _mm_movehl_ps(s, s);
        let s01 = _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_movehdup_ps(s));
        let s23 = _mm_cvtss_f32(hi) + _mm_cvtss_f32(_mm_movehdup_ps(hi));
        (s01 + s23) + tail
    }

    /// [`super::dot`] on one eight-lane vector: lane `l` sums `a[i] * b[i]` for `i % 8 == l`
    /// (products rounded, then added: no fused multiply-add), reduced in the same order.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len()) / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= both lengths.
            let (x, y) = (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            );
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
            i += 8;
        }
        reduce(acc, a, b, n)
    }
}

#[inline(always)]
fn axpy(out: &mut [f32], p: f32, x: &[f32]) {
    for (o, x) in out.iter_mut().zip(x) {
        *o += p * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;
