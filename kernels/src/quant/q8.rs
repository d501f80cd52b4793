//! Activations quantized to 8 bits (ggml's Q8_0 blocks: 32 values, one scale `d = max|x| / 127`,
//! `q = round(x / d)`), for the integer kernels of `--gguf-mode quantized`: each activation row is
//! quantized once per matmul, then every weight block is multiplied with it as int8 x int8 (or
//! 4-bit x int8) dot products, 4x the multiply-adds per instruction of float32 (`vpdpbusd`).
//!
//! Layout, shared by every instruction set: per row, blocks padded to an even count (the AVX-512
//! kernel takes two blocks a step; padding blocks are zeros with scale 0), and each block's scale
//! `d` and `s / 8` (`s = d * sum(q)`, for the 4-bit formats' offset term) stored eight times, so
//! that a kernel's eight int32 lanes of one block load their scale without a shuffle.

/// Floats per block in the replicated scale arrays.
pub(super) const LANES: usize = 8;

/// `m` activation rows of `nb` blocks, quantized.
#[derive(Debug, Default)]
pub struct Q8Rows {
    /// Blocks per row after padding to an even count.
    pub(super) stride: usize,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
}

/// Pointers to one quantized row (kernels index them by block).
#[derive(Clone, Copy)]
pub(super) struct Q8Row {
    pub q: *const i8,
    pub d: *const f32,
    pub s: *const f32,
}
// SAFETY: read-only pointers into a `Q8Rows` that outlives every kernel call using them.
unsafe impl Send for Q8Row {}
unsafe impl Sync for Q8Row {}

impl Q8Rows {
    /// Quantize `m` rows of `k` floats (`k` a multiple of 32).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Q8Rows {
        let nb = k / 32;
        let stride = nb.next_multiple_of(2);
        let mut rows = Q8Rows {
            stride,
            q: vec![0; m * stride * 32],
            d: vec![0.0; m * stride * LANES],
            s: vec![0.0; m * stride * LANES],
        };
        for (i, xb) in x.chunks_exact(32).enumerate() {
            let at = (i / nb) * stride + i % nb;
            let q: &mut [i8; 32] = (&mut rows.q[at * 32..at * 32 + 32]).try_into().unwrap();
            let (d, s) = quantize_block(xb.try_into().unwrap(), q);
            rows.d[at * LANES..(at + 1) * LANES].fill(d);
            rows.s[at * LANES..(at + 1) * LANES].fill(s / LANES as f32);
        }
        rows
    }

    /// Pointers to every row, for the kernels.
    pub(super) fn rows(&self) -> Vec<Q8Row> {
        let m = self.d.len() / (self.stride * LANES).max(1);
        (0..m)
            .map(|r| {
                let b = r * self.stride;
                Q8Row {
                    q: self.q[b * 32..].as_ptr(),
                    d: self.d[b * LANES..].as_ptr(),
                    s: self.s[b * LANES..].as_ptr(),
                }
            })
            .collect()
    }

    /// Quants, scale and `d * sum(q)` of block `b` of row `r` (the scalar kernel's view).
    pub(super) fn block(&self, r: usize, b: usize) -> (&[i8], f32, f32) {
        let at = r * self.stride + b;
        (
            &self.q[at * 32..at * 32 + 32],
            self.d[at * LANES],
            self.s[at * LANES] * LANES as f32,
        )
    }
}

const ROUND: f32 = 12_582_912.0;

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
            let (qs, d, s) = q.block(0, b);
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
            let sum: i32 = qs.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(s, d * sum as f32);
        }
        assert_eq!(q.block(0, 0).0[0], -127);
        // The all-zero block and the padding block quantize to zeros with scale 0.
        for b in [2, 3] {
            let (qs, d, s) = q.block(0, b);
            assert!(qs.iter().all(|&v| v == 0) && d == 0.0 && s == 0.0);
        }
    }
}
