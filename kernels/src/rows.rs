//! Row-wise float32 operations of transformer layers on plain slices: LayerNorm (with a residual
//! added first), softmax and exp, vectorised by the compiler for the AVX-512 / AVX2 code paths
//! picked at run time. Reductions keep 16 partial sums so that they vectorise (float addition is
//! not associative, so the compiler will not reorder a plain running sum).
use super::Isa;

/// Compile `body` three times (AVX-512, AVX2+FMA, baseline) and call the best this CPU runs.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { body($($arg),*) }
                match Isa::detect() {
                    // SAFETY: the features were detected on this CPU.
                    Isa::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { v3($($arg),*) },
                    Isa::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}

const LANES: usize = 16;

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// float32 `exp` (Cephes `expf`: `2^n * p(r)`, |r| <= ln2 / 2, degree-6 polynomial; within 2
/// ulp), branch-free so that loops over it vectorise. Inputs below -87.3 give 2^-126, above 88
/// give 2^127 (softmax only feeds values <= 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.0);
    let t = x.mul_add(LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((k + 127) as u32) << 23)
}

multiversion! {
    /// Each row of `rows` (`width` values each) becomes `softmax(scale * row)`.
    pub fn softmax_rows(rows: &mut [f32], width: usize, scale: f32) {
        for row in rows.chunks_exact_mut(width) {
            row.iter_mut().for_each(|x| *x *= scale);
            let m = max(row);
            row.iter_mut().for_each(|x| *x = exp(*x - m));
            let inv = 1.0 / sum(row);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

multiversion! {
    /// `xs` becomes `softmax(xs)` as candle's `softmax_last_dim` computes it (max subtracted,
    /// exponentiated, divided by the sum), with [`exp`] in vector lanes. In a profile of a
    /// 1,000-token chat prefill, libm's scalar `expf` in this loop and in SiLU was 12% of samples.
    pub fn softmax(xs: &mut [f32]) {
        let m = max(xs);
        xs.iter_mut().for_each(|x| *x = exp(*x - m));
        let s = sum(xs);
        xs.iter_mut().for_each(|x| *x /= s);
    }
}

multiversion! {
    /// `out[r] = silu(gu[r][..width]) * gu[r][width..]` for rows `[gate | up]` of `2 * width`
    /// values (a joined gate/up projection's output), `silu(x) = x / (1 + exp(-x))` as candle
    /// computes it, with [`exp`] in vector lanes: one pass instead of candle's copy of the gate
    /// half, its scalar-`expf` SiLU and the product.
    pub fn silu_mul(gu: &[f32], width: usize, out: &mut [f32]) {
        for (row, out) in gu.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
            let (gate, up) = row.split_at(width);
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        }
    }
}

multiversion! {
    /// `rows` (`[.., width]`) becomes `LayerNorm(rows + residual) * weight + bias` row by row;
    /// `residual` may be empty (no residual).
    pub fn add_layer_norm(rows: &mut [f32], residual: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        let width = weight.len();
        if !residual.is_empty() {
            rows.iter_mut().zip(residual).for_each(|(x, r)| *x += r);
        }
        for row in rows.chunks_exact_mut(width) {
            let mean = sum(row) / width as f32;
            let mut sq = [0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|x| (x - mean) * (x - mean)).sum();
            for c in chunks {
                for (a, x) in sq.iter_mut().zip(c) {
                    *a += (x - mean) * (x - mean);
                }
            }
            let var = (sq.iter().sum::<f32>() + tail) / width as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
                *x = ((*x - mean) * rstd).mul_add(*w, *b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(
            worst <= 2.0 * f64::from(f32::EPSILON),
            "max relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn softmax_and_layer_norm_match_float64() {
        let width = 37;
        let v: Vec<f32> = (0..width * 3)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let mut s = v.clone();
        softmax_rows(&mut s, width, 0.5);
        for (row, got) in v.chunks(width).zip(s.chunks(width)) {
            let m = row.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x) * 0.5));
            let e: Vec<f64> = row
                .iter()
                .map(|&x| (f64::from(x) * 0.5 - m).exp())
                .collect();
            let total: f64 = e.iter().sum();
            for (g, e) in got.iter().zip(&e) {
                assert!((f64::from(*g) - e / total).abs() < 1e-6);
            }
        }
        let w: Vec<f32> = (0..width).map(|i| 1.0 + i as f32 / 50.0).collect();
        let b: Vec<f32> = (0..width).map(|i| i as f32 / 100.0).collect();
        let res: Vec<f32> = v.iter().map(|x| x / 3.0).collect();
        let mut n = v.clone();
        add_layer_norm(&mut n, &res, &w, &b, 1e-12);
        for ((row, r), got) in v.chunks(width).zip(res.chunks(width)).zip(n.chunks(width)) {
            let x: Vec<f64> = row.iter().zip(r).map(|(a, b)| f64::from(*a + *b)).collect();
            let mean = x.iter().sum::<f64>() / width as f64;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            for (j, g) in got.iter().enumerate() {
                let want = (x[j] - mean) / (var + 1e-12).sqrt() * f64::from(w[j]) + f64::from(b[j]);
                assert!((f64::from(*g) - want).abs() < 1e-5, "{g} vs {want}");
            }
        }
    }

    #[test]
    fn one_row_softmax_and_silu_mul_match_float64() {
        let v: Vec<f32> = (0..53)
            .map(|i| ((i * 7919) % 101) as f32 / 7.0 - 9.0)
            .collect();
        let mut s = v.clone();
        softmax(&mut s);
        let m = v.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x)));
        let total: f64 = v.iter().map(|&x| (f64::from(x) - m).exp()).sum();
        for (x, g) in v.iter().zip(&s) {
            let want = (f64::from(*x) - m).exp() / total;
            assert!((f64::from(*g) - want).abs() < 1e-6, "softmax {g} vs {want}");
        }
        // Two rows of [gate | up], gates spanning where exp(-g) over- and underflows.
        let width = 41;
        let gu: Vec<f32> = (0..4 * width).map(|i| (i as f32 - 82.0) * 2.5).collect();
        let mut out = vec![0f32; 2 * width];
        silu_mul(&gu, width, &mut out);
        for (row, got) in gu.chunks(2 * width).zip(out.chunks(width)) {
            for ((g, u), o) in row[..width].iter().zip(&row[width..]).zip(got) {
                let (g, u) = (f64::from(*g), f64::from(*u));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!(
                    (f64::from(*o) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "silu({g}) * {u}: {o} vs {want}"
                );
            }
        }
    }
}
