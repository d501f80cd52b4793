//! [`super::tile_dots`] on AVX-512 with fused multiply-adds: up to four query rows (the query
//! heads that share a key/value head) take one pass over the keys and one over the values, each
//! key or value row loaded once for all of them.
//!
//! Why: in a 16-stream decode profile (SmolLM2, 64-token prompts, 160 tokens generated) the
//! eight-lane dot products and value sums, kept bit-identical to the portable loops (products
//! rounded, then added), were 15% of samples. Sixteen lanes with one FMA per product need a
//! quarter of the instructions; the results differ from the portable loops by summation order
//! and rounding only (tested against them).
use std::arch::x86_64::*;

use super::{softmax_in_place, Geom, Tile};

/// Query rows that share a pass: 4 rows x 4 keys (or 4 rows x 64 value columns) of accumulators
/// fit the 32 registers with the loaded keys or values.
const ROWS: usize = 4;

/// Key or value rows ahead of the one in use whose lines are prefetched.
const AHEAD: usize = 8;

/// # Safety
/// The CPU has AVX-512F and FMA; `t` is a valid tile (as for [`super::tile_dots`]).
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn tile_dots(t: &Tile) -> Vec<f32> {
    let g = Geom::new(t.span, t.it, t.d);
    let (span, it, d) = (t.span, t.it, t.d);
    let q_row = |r: usize| {
        let at = ((span.offset + it.i0 + r / g.groups) * d.heads + it.g * g.groups + r % g.groups)
            * g.dk;
        t.q[at..at + g.dk].as_ptr()
    };
    let seen = |r: usize| g.first + r / g.groups + 1;
    let slots = t.kv_slots(g.kv_len);
    let keys: Vec<*const f32> = slots.iter().map(|&s| t.k[s * g.dk..].as_ptr()).collect();
    let values: Vec<*const f32> = slots.iter().map(|&s| t.v[s * g.dv..].as_ptr()).collect();
    let mut scores = vec![0f32; g.rows * g.kv_len];
    let mut out = vec![0f32; g.rows * g.dv];
    for r0 in (0..g.rows).step_by(ROWS) {
        let r1 = g.rows.min(r0 + ROWS);
        // Positions the group's last row sees; earlier rows' extra scores are zeroed below.
        let n = seen(r1 - 1);
        let rows = &mut scores[r0 * g.kv_len..r1 * g.kv_len];
        let out = &mut out[r0 * g.dv..r1 * g.dv];
        macro_rules! pass {
            ($r:literal) => {{
                let qs: [*const f32; $r] = std::array::from_fn(|i| q_row(r0 + i));
                let base = rows.as_mut_ptr();
                let sp: [*mut f32; $r] = std::array::from_fn(|i| base.add(i * g.kv_len));
                dots::<$r>(qs, &keys[..n], g.dk, t.scale, sp);
                for (i, row) in rows.chunks_exact_mut(g.kv_len).enumerate() {
                    let s = seen(r0 + i);
                    softmax_in_place(&mut row[..s]);
                    row[s..n].fill(0.0);
                }
                let base = rows.as_ptr();
                let ps: [*const f32; $r] = std::array::from_fn(|i| base.add(i * g.kv_len));
                let base = out.as_mut_ptr();
                let os: [*mut f32; $r] = std::array::from_fn(|i| base.add(i * g.dv));
                weighted_sums::<$r>(ps, &values[..n], g.dv, os);
            }};
        }
        match r1 - r0 {
            4 => pass!(4),
            3 => pass!(3),
            2 => pass!(2),
            _ => pass!(1),
        }
    }
    out
}

/// Lanes of a row of `len` floats from column `c`: all 16, or a mask for the tail.
#[inline(always)]
fn lanes(len: usize, c: usize) -> __mmask16 {
    let left = len - c;
    if left >= 16 {
        0xFFFF
    } else {
        (1u16 << left) - 1
    }
}

/// `s[r][j] = (q[r] . keys[j]) * scale` for every query row and key.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots<const R: usize>(
    q: [*const f32; R],
    keys: &[*const f32],
    dk: usize,
    scale: f32,
    s: [*mut f32; R],
) {
    let mut j = 0;
    while j + 4 <= keys.len() {
        for &k in keys.iter().skip(j + AHEAD).take(4) {
            for line in (0..dk).step_by(16) {
                _mm_prefetch::<_MM_HINT_T0>(k.add(line) as *const i8);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for c in (0..dk).step_by(16) {
            let m = lanes(dk, c);
            let mut k = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                k[i] = _mm512_maskz_loadu_ps(m, keys[j + i].add(c));
            }
            for r in 0..R {
                let x = _mm512_maskz_loadu_ps(m, q[r].add(c));
                for i in 0..4 {
                    acc[r][i] = _mm512_fmadd_ps(x, k[i], acc[r][i]);
                }
            }
        }
        for (acc, s) in acc.iter().zip(s) {
            for (i, &a) in acc.iter().enumerate() {
                *s.add(j + i) = _mm512_reduce_add_ps(a) * scale;
            }
        }
        j += 4;
    }
    for (j, &key) in keys.iter().enumerate().skip(j) {
        let mut acc = [_mm512_setzero_ps(); R];
        for c in (0..dk).step_by(16) {
            let m = lanes(dk, c);
            let k = _mm512_maskz_loadu_ps(m, key.add(c));
            for r in 0..R {
                acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q[r].add(c)), k, acc[r]);
            }
        }
        for r in 0..R {
            *s[r].add(j) = _mm512_reduce_add_ps(acc[r]) * scale;
        }
    }
}

/// `out[r] = sum_j p[r][j] * values[j]`, 64 columns at a time in registers.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weighted_sums<const R: usize>(
    p: [*const f32; R],
    values: &[*const f32],
    dv: usize,
    out: [*mut f32; R],
) {
    for c0 in (0..dv).step_by(64) {
        let mut m = [0 as __mmask16; 4];
        for (i, m) in m.iter_mut().enumerate() {
            if c0 + 16 * i < dv {
                *m = lanes(dv, c0 + 16 * i);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (j, &v) in values.iter().enumerate() {
            if let Some(&ahead) = values.get(j + AHEAD) {
                for line in (0..64.min(dv - c0)).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(c0 + line) as *const i8);
                }
            }
            let mut x = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                // Past the row only where the mask is empty: nothing is read there.
                x[i] = _mm512_maskz_loadu_ps(m[i], v.wrapping_add(c0 + 16 * i));
            }
            for r in 0..R {
                let w = _mm512_set1_ps(*p[r].add(j));
                for i in 0..4 {
                    acc[r][i] = _mm512_fmadd_ps(w, x[i], acc[r][i]);
                }
            }
        }
        for r in 0..R {
            for i in 0..4 {
                _mm512_mask_storeu_ps(out[r].wrapping_add(c0 + 16 * i), m[i], acc[r][i]);
            }
        }
    }
}
