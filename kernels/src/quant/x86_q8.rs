//! Integer kernels of `--gguf-mode quantized`: weight blocks times 8-bit activations
//! ([`super::q8::Q8Rows`]), up to 16 activation rows per pass over a weight row. Each weight
//! block is unpacked once to bytes (4-bit formats: unsigned nibbles, Q8_0: signed bytes) and its
//! f16 scales converted once; per activation row a block costs one integer dot product, one
//! conversion and two multiply-adds (`acc += (d_w d_x) * dot + m_w s_x`).
//!
//! - AVX-512 VNNI: two blocks per 512-bit step, `vpdpbusd` (unsigned x signed bytes, summed in
//!   fours into int32 lanes). The 4-bit formats put the nibbles on the unsigned side; Q8_0 puts
//!   the activations there as `q + 128` (a sign-bit flip) and subtracts `128 * sum(w)`, computed
//!   once per weight block.
//! - AVX2: one block per 256-bit step, `vpmaddubsw` + `vpmaddwd`; Q8_0 takes `|w|` and the
//!   activations with `w`'s sign (ggml's trick), which cannot saturate the 16-bit pair sums.
//!
//! Safety contract of every `unsafe fn` here (checked by the safe caller in `super`): `row` holds
//! `nb` blocks of the format, every `xs[r]` points at a quantized row of at least `nb` blocks
//! padded to an even count, and the CPU has the features named in `target_feature`.
use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use super::q8::{Q8Row, LANES};
use super::QFormat;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> i16 {
    read_unaligned(p as *const i16)
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------------

/// Two weight blocks (`b` absent for an odd tail: zeros) unpacked for `vpdpbusd`.
struct Pair {
    w: __m512i,
    /// `d` of block a in lanes 0-7, of block b in lanes 8-15.
    d: __m512,
    /// 4-bit formats: the offset `m` per lane; Q8_0: `128 * sum(w)` per int32 lane (as bits).
    m: __m512,
    corr: __m512i,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn halves(a: i16, b: i16) -> __m512 {
    _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(b), _mm_set1_epi16(a)))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair(format: QFormat, a: *const u8, b: *const u8, has_b: bool) -> Pair {
    let db = if has_b { f16_at(b) } else { 0 };
    let d = halves(f16_at(a), db);
    if format == QFormat::Q8_0 {
        let wa = _mm256_loadu_si256(a.add(2) as *const __m256i);
        let wb = if has_b {
            _mm256_loadu_si256(b.add(2) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(wa), wb);
        let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), w);
        return Pair {
            w,
            d,
            m: _mm512_setzero_ps(),
            corr: _mm512_slli_epi32::<7>(sum),
        };
    }
    let off = format.quants_at();
    let qa = _mm_loadu_si128(a.add(off) as *const __m128i);
    let qb = if has_b {
        _mm_loadu_si128(b.add(off) as *const __m128i)
    } else {
        _mm_setzero_si128()
    };
    let y = _mm256_set_m128i(qb, qa);
    // [a lo, b lo, a hi, b hi] nibbles, then reordered to the activations' [a 0-31, b 0-31].
    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(y), _mm256_srli_epi16::<4>(y));
    let z = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
    let w = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z);
    let m = if format == QFormat::Q4_1 {
        let mb = if has_b { f16_at(b.add(2)) } else { 0 };
        halves(f16_at(a.add(2)), mb)
    } else {
        _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
    };
    Pair {
        w,
        d,
        m,
        corr: _mm512_setzero_si512(),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_vnni<const R: usize>(
    format: QFormat,
    row: *const u8,
    nb: usize,
    xs: &[Q8Row; R],
) -> [f32; R] {
    let bytes = format.block_bytes();
    let mut acc = [_mm512_setzero_ps(); R];
    // One loop body (an odd last block pairs with zeros), so that it is inlined whole.
    for p in 0..nb.div_ceil(2) {
        let a = row.add(2 * p * bytes);
        let w = pair(format, a, a.add(bytes), 2 * p + 1 < nb);
        for r in 0..R {
            let xq = _mm512_loadu_si512(xs[r].q.add(p * 64) as *const _);
            let dot = if format == QFormat::Q8_0 {
                let xu = _mm512_xor_si512(xq, _mm512_set1_epi8(-128));
                _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, w.w), w.corr)
            } else {
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.w, xq)
            };
            let scale = _mm512_mul_ps(w.d, _mm512_loadu_ps(xs[r].d.add(p * 2 * LANES)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            if format != QFormat::Q8_0 {
                let s = _mm512_loadu_ps(xs[r].s.add(p * 2 * LANES));
                acc[r] = _mm512_fmadd_ps(w.m, s, acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32(h: i16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h as u16))))
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
    let ones = _mm256_set1_epi16(1);
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
    let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
    for r in 0..R {
        let xq = _mm256_loadu_si256(xs[r].q.add(b * 32) as *const __m256i);
        let pairs = if format == QFormat::Q8_0 {
            _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xq, w))
        } else {
            _mm256_maddubs_epi16(w, xq)
        };
        let dot = _mm256_madd_epi16(pairs, ones);
        let scale = _mm256_mul_ps(d, _mm256_loadu_ps(xs[r].d.add(b * LANES)));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
        if format != QFormat::Q8_0 {
            acc[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs[r].s.add(b * LANES)), acc[r]);
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
        step_avx2(format, row.add(b * bytes), b, xs, &mut acc);
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = super::x86::hsum256(acc[r]);
    }
    out
}
