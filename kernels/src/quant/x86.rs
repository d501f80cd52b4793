//! AVX-512 and AVX2 kernels, chosen at run time ([`super::Isa`]).
//! - AVX-512 ([`tile_avx512`]): each weight block is dequantized once in registers (a nibble
//!   table lookup) and multiplied with up to eight activation rows, two weight rows a tile so
//!   that each activation vector is loaded once for both.
//! - AVX2: each weight block is unpacked once into float32 lanes and multiplied with up to four
//!   activation rows; block scales are applied per block (`acc += d * (x . q)`), the 4-bit
//!   formats' `m * sum(x)` term from the precomputed block sums. Two accumulator sets alternate
//!   between blocks so that consecutive blocks do not wait on one FMA chain.
//!
//! Safety contract of every `unsafe fn` here (checked by the safe caller in `super`): `row` holds
//! `nb` blocks of the format, each `xs[r]` holds `nb * 32` floats and each `sums[r]` `nb` floats,
//! and the CPU has the features named in `target_feature`.
use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::QFormat;

/// Bytes ahead of the block being read that the kernels prefetch. Decode streams every weight
/// once per token: in `benches/gemv.rs`, walking 30 layers' distinct matrices (weights from
/// memory, not cache) took ~15% less time with 1 KiB than with the hardware prefetcher alone,
/// which restarts at every row chunk of every matrix. With the faster AVX-512 tiles and the
/// bench timed on a pool worker, 2 KiB took ~8% less than 1 KiB for one float32 row (medians of
/// four interleaved rounds, 2.1 vs 2.3 ns a block; 4 and 8 KiB no better than 2) and 1.20-1.35 vs
/// 1.24-1.78 ns for int8.
pub(super) const PREFETCH_AHEAD: usize = 2048;

/// Calls `even(block, b)` and `odd(block, b)` for blocks `0..nb` of `row` in turn, so that
/// kernels keep one accumulator set per closure and consecutive blocks do not wait on one FMA
/// chain, prefetching [`PREFETCH_AHEAD`] bytes ahead (a hint: an address past the weights is
/// never read, hence `wrapping_add`).
#[inline(always)]
unsafe fn pairs(
    row: *const u8,
    nb: usize,
    bytes: usize,
    mut even: impl FnMut(*const u8, usize),
    mut odd: impl FnMut(*const u8, usize),
) {
    let mut b = 0;
    while b + 1 < nb {
        let blk = row.add(b * bytes);
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH_AHEAD) as *const i8);
        even(blk, b);
        odd(blk.add(bytes), b + 1);
        b += 2;
    }
    if b < nb {
        even(row.add(b * bytes), b);
    }
}

/// `(d, m)` of the 4-bit block at `blk` as a broadcast `d` and a scalar `m`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_min(blk: *const u8, has_min: bool) -> (__m128, f32) {
    if has_min {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(blk as *const i32)));
        (_mm_broadcastss_ps(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    } else {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(read_unaligned(
            blk as *const u16,
        ))));
        (_mm_broadcastss_ps(v), -8.0 * _mm_cvtss_f32(v))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(blk: *const u8) -> __m128 {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(read_unaligned(
        blk as *const u16,
    ))));
    _mm_broadcastss_ps(v)
}

// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------

/// The 32 weights of a block as two float32 vectors (weights 0..16 and 16..32), bit-identical to
/// candle's dequantization (`q * d` is exact, so `fma(q, d, m)` rounds as `q * d + m`). The 4-bit
/// formats look their nibbles up in a 16-entry table `d * i + m` built once per block (`vpermps`
/// reads only an index's low four bits, so the low nibbles need no mask): this replaces two
/// integer-to-float conversions per block and, per activation row, the scaling and the
/// `m * sum(x)` term of multiplying raw quants.
#[inline(always)]
unsafe fn weights512(format: QFormat, blk: *const u8) -> (__m512, __m512) {
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let table = match format {
        QFormat::Q8_0 => {
            let d = _mm512_broadcastss_ps(scale(blk));
            let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                blk.add(2) as *const __m128i
            )));
            let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                blk.add(18) as *const __m128i
            )));
            return (_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d));
        }
        QFormat::Q4_1 => {
            let (d, m) = scale_min(blk, true);
            _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(d), _mm512_set1_ps(m))
        }
        QFormat::Q4_0 => {
            let d = _mm512_broadcastss_ps(scale(blk));
            _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0)), d)
        }
    };
    let qi = _mm512_cvtepu8_epi32(_mm_loadu_si128(
        blk.add(format.quants_at()) as *const __m128i
    ));
    (
        _mm512_permutexvar_ps(qi, table),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(qi), table),
    )
}

/// Products of `W` weight rows with `R` activation rows: each weight block is dequantized once
/// ([`weights512`]) for the `R` rows, and each activation vector loaded once for the `W` weight
/// rows. `sum(x * w)` in float32 lanes, as the product with candle's dequantized weights up to
/// summation order.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile_avx512<const R: usize, const W: usize>(
    format: QFormat,
    rows: [*const u8; W],
    nb: usize,
    xs: [*const f32; R],
) -> [[f32; R]; W] {
    // One loop per format: with the format a run-time value LLVM kept its branches inside the
    // block loop.
    match format {
        QFormat::Q4_0 => tile512::<R, W, 0>(rows, nb, xs),
        QFormat::Q4_1 => tile512::<R, W, 1>(rows, nb, xs),
        QFormat::Q8_0 => tile512::<R, W, 2>(rows, nb, xs),
    }
}

/// [`tile_avx512`] for the format `[Q4_0, Q4_1, Q8_0][F]`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile512<const R: usize, const W: usize, const F: usize>(
    rows: [*const u8; W],
    nb: usize,
    xs: [*const f32; R],
) -> [[f32; R]; W] {
    let format = [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0][F];
    let bytes = format.block_bytes();
    // A block's two halves go to separate accumulators (independent chains) while that fits in
    // the 32 registers; past it the R * W chains are independent enough.
    let h = usize::from(R * W <= 8);
    let mut acc = [[[_mm512_setzero_ps(); 2]; R]; W];
    for b in 0..nb {
        // Plain loops, not `array::from_fn`: its closure was not inlined into this function.
        let mut w = [(_mm512_setzero_ps(), _mm512_setzero_ps()); W];
        for i in 0..W {
            let blk = rows[i].add(b * bytes);
            // A hint: an address past the weights is never read, hence `wrapping_add`.
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH_AHEAD) as *const i8);
            w[i] = weights512(format, blk);
        }
        for r in 0..R {
            let x = xs[r].add(b * 32);
            let (x0, x1) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
            for i in 0..W {
                acc[i][r][0] = _mm512_fmadd_ps(x0, w[i].0, acc[i][r][0]);
                acc[i][r][h] = _mm512_fmadd_ps(x1, w[i].1, acc[i][r][h]);
            }
        }
    }
    let mut out = [[0f32; R]; W];
    for i in 0..W {
        for r in 0..R {
            out[i][r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][r][0], acc[i][r][1]));
        }
    }
    out
}

/// One row of `nb` blocks to float32, bit-identical to candle's `to_float` ([`weights512`]).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dequantize_row_avx512(
    format: QFormat,
    row: *const u8,
    nb: usize,
    out: *mut f32,
) {
    let bytes = format.block_bytes();
    for b in 0..nb {
        let (w0, w1) = weights512(format, row.add(b * bytes));
        _mm512_storeu_ps(out.add(b * 32), w0);
        _mm512_storeu_ps(out.add(b * 32 + 16), w1);
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen8_signed(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_256<const R: usize>(
    format: QFormat,
    blk: *const u8,
    b: usize,
    xs: &[*const f32; R],
    sums: &[*const f32; R],
    acc: &mut [__m256; R],
    macc: &mut [f32; R],
) {
    // The block's 32 weights as four float32 vectors of eight, in x order.
    let (q, d, m) = if format == QFormat::Q8_0 {
        let lo = _mm_loadu_si128(blk.add(2) as *const __m128i);
        let hi = _mm_loadu_si128(blk.add(18) as *const __m128i);
        let q = [
            widen8_signed(lo),
            widen8_signed(_mm_srli_si128::<8>(lo)),
            widen8_signed(hi),
            widen8_signed(_mm_srli_si128::<8>(hi)),
        ];
        (q, scale(blk), 0.0)
    } else {
        let has_min = format == QFormat::Q4_1;
        let (d, m) = scale_min(blk, has_min);
        let raw = _mm_loadu_si128(blk.add(if has_min { 4 } else { 2 }) as *const __m128i);
        let nib = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, nib);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), nib);
        let q = [
            widen8(lo),
            widen8(_mm_srli_si128::<8>(lo)),
            widen8(hi),
            widen8(_mm_srli_si128::<8>(hi)),
        ];
        (q, d, m)
    };
    let d = _mm256_broadcastss_ps(d);
    for r in 0..R {
        let x = xs[r].add(b * 32);
        let mut t = _mm256_mul_ps(_mm256_loadu_ps(x), q[0]);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), q[1], t);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16)), q[2], t);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(24)), q[3], t);
        acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
        if format != QFormat::Q8_0 {
            macc[r] = m.mul_add(*sums[r].add(b), macc[r]);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_avx2<const R: usize>(
    format: QFormat,
    row: *const u8,
    nb: usize,
    xs: [*const f32; R],
    sums: [*const f32; R],
) -> [f32; R] {
    let bytes = format.block_bytes();
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let mut macc = [0f32; R];
    let mut macc1 = [0f32; R];
    pairs(
        row,
        nb,
        bytes,
        |blk, b| step_256(format, blk, b, &xs, &sums, &mut acc0, &mut macc),
        |blk, b| step_256(format, blk, b, &xs, &sums, &mut acc1, &mut macc1),
    );
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r])) + (macc[r] + macc1[r]);
    }
    out
}
