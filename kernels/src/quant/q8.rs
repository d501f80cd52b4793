//! Activations quantized to two planes of 8 bits, for the integer kernels of
//! `--gguf-mode quantized`: ggml's Q8_0 blocks (32 values, one scale `d = max|x| / 127`,
//! `q = round(x / d)`), then the rounding residual `x - d q` quantized the same way (`d2 q2`).
//! Each activation row is quantized once per matmul; every weight block is multiplied with both
//! planes as int8 x int8 (or 4-bit x int8) dot products (`vpdpbusd`: 64 multiply-adds an
//! instruction).
//!
//! Why two planes: one plane (what ggml does) moved SmolLM2's logits by up to 0.55-1.5 against
//! float32 activations, as candle's ggml kernels do, enough to flip greedy choices whose margin
//! is above 0.1; the second plane cuts the activation error about 250-fold (to `d2 / 2`, with
//! `d2 <= d / 254`) for about 1.5x the kernel time of one plane.
//!
//! Layout, shared by every instruction set: per row, blocks padded to an even count (padding
//! blocks are zeros with scale 0); per block the scales `d`, `d2` and `s = d sum(q) + d2 sum(q2)`
//! (the offset term of formats with `w = d q + m`).

/// `m` activation rows of `nb` blocks, quantized.
#[derive(Debug, Default)]
pub struct Q8Rows {
    /// Blocks per row after padding to an even count.
    pub(super) stride: usize,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    /// The second plane: the rounding residual `x - d q`, quantized the same way.
    pub(super) q2: Vec<i8>,
    pub(super) d2: Vec<f32>,
    /// `d * sum(q) + d2 * sum(q2)`.
    pub(super) s: Vec<f32>,
}

/// Pointers to one quantized row (kernels index them by block).
#[derive(Clone, Copy)]
pub(super) struct Q8Row {
    pub q: *const i8,
    pub d: *const f32,
    pub q2: *const i8,
    pub d2: *const f32,
    pub s: *const f32,
}
// SAFETY: read-only pointers into a `Q8Rows` that outlives every kernel call using them.
unsafe impl Send for Q8Row {}
unsafe impl Sync for Q8Row {}

/// One quantized activation block: `x ~ d q + d2 q2`, `s = d sum(q) + d2 sum(q2)`.
pub(super) struct Q8Block<'a> {
    pub q: &'a [i8],
    pub d: f32,
    pub q2: &'a [i8],
    pub d2: f32,
    pub s: f32,
}

impl Q8Rows {
    /// Quantize `m` rows of `k` floats (`k` a multiple of 32).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Q8Rows {
        let nb = k / 32;
        let stride = nb.next_multiple_of(2);
        let mut rows = Q8Rows {
            stride,
            q: vec![0; m * stride * 32],
            d: vec![0.0; m * stride],
            q2: vec![0; m * stride * 32],
            d2: vec![0.0; m * stride],
            s: vec![0.0; m * stride],
        };
        let block = block_quantizer();
        for (i, xb) in x.chunks_exact(32).enumerate() {
            let at = (i / nb) * stride + i % nb;
            let q: &mut [i8; 32] = (&mut rows.q[at * 32..at * 32 + 32]).try_into().unwrap();
            let (d, s) = block(xb.try_into().unwrap(), q);
            let mut residual = [0f32; 32];
            for ((r, x), q) in residual.iter_mut().zip(xb).zip(q.iter()) {
                *r = x - d * f32::from(*q);
            }
            let q2: &mut [i8; 32] = (&mut rows.q2[at * 32..at * 32 + 32]).try_into().unwrap();
            let (d2, s2) = block(&residual, q2);
            (rows.d[at], rows.d2[at], rows.s[at]) = (d, d2, s + s2);
        }
        rows
    }

    /// Pointers to every row, for the kernels.
    pub(super) fn rows(&self) -> Vec<Q8Row> {
        let m = self.d.len() / self.stride.max(1);
        (0..m)
            .map(|r| {
                let b = r * self.stride;
                Q8Row {
                    q: self.q[b * 32..].as_ptr(),
                    d: self.d[b..].as_ptr(),
                    q2: self.q2[b * 32..].as_ptr(),
                    d2: self.d2[b..].as_ptr(),
                    s: self.s[b..].as_ptr(),
                }
            })
            .collect()
    }

    /// Both planes' quants and scales and `s` of block `b` of row `r` (the scalar kernel's view).
    pub(super) fn block(&self, r: usize, b: usize) -> Q8Block<'_> {
        let at = r * self.stride + b;
        Q8Block {
            q: &self.q[at * 32..at * 32 + 32],
            d: self.d[at],
            q2: &self.q2[at * 32..at * 32 + 32],
            d2: self.d2[at],
            s: self.s[at],
        }
    }
}

const ROUND: f32 = 12_582_912.0;

type BlockFn = fn(&[f32; 32], &mut [i8; 32]) -> (f32, f32);

/// The block quantizer this CPU runs best (all give identical results).
fn block_quantizer() -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() == crate::Isa::Avx512 {
        // SAFETY: AVX-512 was detected.
        return |x, q| unsafe { quantize_block_avx512(x, q) };
    }
    quantize_block
}

/// [`quantize_block`] in AVX-512: the same operations on the same values, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block_avx512(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let a = _mm512_loadu_ps(x.as_ptr());
    let b = _mm512_loadu_ps(x.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    let round = _mm512_set1_ps(ROUND);
    let qa = _mm512_cvtps_epi32(_mm512_sub_ps(
        _mm512_add_ps(_mm512_mul_ps(a, id), round),
        round,
    ));
    let qb = _mm512_cvtps_epi32(_mm512_sub_ps(
        _mm512_add_ps(_mm512_mul_ps(b, id), round),
        round,
    ));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(qb),
    );
    (d, d * sum as f32)
}

/// One block: returns `(d, d * sum(q))`. Rounds half to even (a single SIMD rounding
/// instruction; ggml's `roundf` rounds half away from zero, which only differs on exact ties).
fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in q.iter_mut().zip(x) {
        // Adding and subtracting 1.5 * 2^23 rounds |v * id| <= 127 to the nearest integer, ties
        // to even, in two vectorisable float operations (`round_ties_even` is a libm call here).
        let r = ((v * id + ROUND) - ROUND) as i8;
        sum += i32::from(r);
        *q = r;
    }
    (d, d * sum as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_to_the_nearest_step_and_pad_to_even_counts() {
        let mut x: Vec<f32> = (0..96).map(|i| (i as f32 - 40.0) / 10.0).collect();
        x[5] = 0.0;
        x[64..].fill(0.0);
        let q = Q8Rows::quantize(&x, 1, 96);
        assert_eq!(q.stride, 4);
        for b in 0..3 {
            let blk = q.block(0, b);
            let (qs, d) = (blk.q, blk.d);
            let xb = &x[b * 32..b * 32 + 32];
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(d, amax / 127.0);
            for (v, &qv) in xb.iter().zip(qs) {
                // Within half a step of the value, and the largest value maps to +-127.
                assert!(
                    (v - d * f32::from(qv)).abs() <= d / 2.0 * 1.0001,
                    "{v} -> {qv}"
                );
            }
            // The second plane holds the residual to within half of its own step.
            for ((v, &qv), &q2) in xb.iter().zip(qs).zip(blk.q2) {
                let r = v - d * f32::from(qv);
                assert!((r - blk.d2 * f32::from(q2)).abs() <= blk.d2 / 2.0 * 1.0001 + 1e-12);
            }
            assert!(blk.d2 <= d / 254.0 * 1.0001);
            let sum = |q: &[i8]| q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32;
            assert_eq!(blk.s, d * sum(qs) + blk.d2 * sum(blk.q2));
        }
        assert_eq!(q.block(0, 0).q[0], -127);
        // The all-zero block and the padding block quantize to zeros with scale 0.
        for b in [2, 3] {
            let blk = q.block(0, b);
            assert!(blk.q.iter().all(|&v| v == 0) && blk.d == 0.0 && blk.s == 0.0);
        }
    }

    #[test]
    fn the_simd_quantizer_gives_the_portable_bits() {
        let x = crate::tests::values(32 * 64, 11);
        for xb in x.chunks_exact(32) {
            let xb: &[f32; 32] = xb.try_into().unwrap();
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let want = quantize_block(xb, &mut a);
            let got = block_quantizer()(xb, &mut b);
            assert_eq!((got, b), (want, a));
        }
    }
}
