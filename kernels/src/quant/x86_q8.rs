//! Integer kernels of `--gguf-mode quantized`: weight blocks times 8-bit activations
//! ([`super::q8::Q8Rows`]), several activation rows per pass over the weights. Each weight block
//! is unpacked once to bytes and its f16 scales converted once; per activation row a block costs
//! integer dot products, one conversion and two multiply-adds (`acc += (d_w d_x) dot + m_w s_x`).
//!
//! - AVX-512 VNNI: `vpdpbusd` (unsigned x signed bytes, summed in fours into int32 lanes) on
//!   weights repacked 16 rows a tile ([`super::packed`]), 16 outputs per instruction.
//! - AVX2: one block per 256-bit step, `vpmaddubsw` + `vpmaddwd`; Q8_0 takes `|w|` and the
//!   activations with `w`'s sign (ggml's trick), which cannot saturate the 16-bit pair sums.
//!
//! Safety contract of every `unsafe fn` here (checked by the safe caller in `super`): `row` holds
//! `nb` blocks of the format, every `xs[r]` points at a quantized row of at least `nb` blocks
//! padded to an even count, and the CPU has the features named in `target_feature`.
use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::packed::{self, GROUP};
use super::q8::Q8Row;
use super::x86::PREFETCH_AHEAD;
use super::QFormat;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> i16 {
    read_unaligned(p as *const i16)
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI, on weights repacked 16 rows a tile (super::packed)
// ---------------------------------------------------------------------------------------------

/// `out[r][0..lanes] = ` the dot products of one group of 16 packed weight rows (`nb` tiles
/// from `tiles`) with activation rows `xs[r]`: per block, eight `vpdpbusd` of the 16 rows' four
/// weights with four broadcast activation bytes, then one scaling for all 16 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn group_q8_vnni<const R: usize>(
    format: QFormat,
    tiles: *const u8,
    nb: usize,
    xs: &[Q8Row; R],
    out: [*mut f32; R],
    lanes: usize,
) {
    let tile = GROUP * format.block_bytes();
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let t = tiles.add(b * tile);
        // A tile is 16 rows' blocks (288-544 bytes): one prefetch per cache line of the tile
        // PREFETCH_AHEAD bytes on.
        for line in (0..tile).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(PREFETCH_AHEAD + line) as *const i8);
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
        let m = match format {
            QFormat::Q4_1 => {
                _mm512_cvtph_ps(_mm256_loadu_si256(t.add(2 * GROUP) as *const __m256i))
            }
            QFormat::Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            QFormat::Q8_0 => _mm512_mul_ps(d, _mm512_set1_ps(-128.0)),
        };
        let q = t.add(packed::quants_at(format));
        let mut w = [_mm512_setzero_si512(); 8];
        if format == QFormat::Q8_0 {
            for (c, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(q.add(64 * c) as *const _);
            }
        } else {
            for c in 0..4 {
                let v = _mm512_loadu_si512(q.add(64 * c) as *const _);
                w[c] = _mm512_and_si512(v, nib);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
            }
        }
        for r in 0..R {
            let x = xs[r].q.add(b * 32) as *const i32;
            let x2 = xs[r].q2.add(b * 32) as *const i32;
            let (mut p0, mut p1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for (c, &w) in w.iter().enumerate() {
                p0 = _mm512_dpbusd_epi32(p0, w, _mm512_set1_epi32(read_unaligned(x.add(c))));
                p1 = _mm512_dpbusd_epi32(p1, w, _mm512_set1_epi32(read_unaligned(x2.add(c))));
            }
            let dx = _mm512_set1_ps(*xs[r].d.add(b));
            let dx2 = _mm512_set1_ps(*xs[r].d2.add(b));
            let sx = _mm512_set1_ps(*xs[r].s.add(b));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(d, dx), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(d, dx2), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, sx, acc[r]);
        }
    }
    let mask = if lanes >= GROUP {
        0xFFFF
    } else {
        ((1u32 << lanes) - 1) as u16
    };
    for r in 0..R {
        _mm512_mask_storeu_ps(out[r], mask, acc[r]);
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32(h: i16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h as u16))))
}

/// One block's dot product with 32 activation quants, as eight int32 lanes in float32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot8(format: QFormat, w: __m256i, wabs: __m256i, xq: *const i8) -> __m256 {
    let xq = _mm256_loadu_si256(xq as *const __m256i);
    let pairs = if format == QFormat::Q8_0 {
        _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, w))
    } else {
        _mm256_maddubs_epi16(w, xq)
    };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_avx2<const R: usize>(
    format: QFormat,
    blk: *const u8,
    b: usize,
    xs: &[Q8Row; R],
    acc: &mut [__m256; R],
) {
    let d = f16_to_f32(f16_at(blk));
    let (w, m) = if format == QFormat::Q8_0 {
        (_mm256_loadu_si256(blk.add(2) as *const __m256i), 0.0)
    } else {
        let raw = _mm_loadu_si128(blk.add(format.quants_at()) as *const __m128i);
        let nib = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, nib);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), nib);
        let m = if format == QFormat::Q4_1 {
            f16_to_f32(f16_at(blk.add(2)))
        } else {
            -8.0 * d
        };
        (_mm256_set_m128i(hi, lo), m)
    };
    let wabs = _mm256_abs_epi8(w);
    // Eight lanes each add `m / 8 * s_x` (exact scaling by a power of two).
    let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m * 0.125));
    for r in 0..R {
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*xs[r].d.add(b)));
        let dot = dot8(format, w, wabs, xs[r].q.add(b * 32));
        acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
        let scale2 = _mm256_mul_ps(d, _mm256_set1_ps(*xs[r].d2.add(b)));
        let dot2 = dot8(format, w, wabs, xs[r].q2.add(b * 32));
        acc[r] = _mm256_fmadd_ps(dot2, scale2, acc[r]);
        if format != QFormat::Q8_0 {
            acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(*xs[r].s.add(b)), acc[r]);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_avx2<const R: usize>(
    format: QFormat,
    row: *const u8,
    nb: usize,
    xs: &[Q8Row; R],
) -> [f32; R] {
    let bytes = format.block_bytes();
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = row.add(b * bytes);
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH_AHEAD) as *const i8);
        step_avx2(format, blk, b, xs, &mut acc);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = super::x86::hsum256(acc[r]);
    }
    out
}
