//! Portable kernels: the reference the SIMD versions are tested against, and what runs on CPUs
//! without AVX2.
use super::QFormat;

#[inline]
pub(super) fn f16(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// `(d, m)` of a 4-bit block: `w = d * q + m` (Q4_0 stores `w = d * (q - 8)`, i.e. `m = -8 d`).
#[inline]
pub(super) fn scale_min(format: QFormat, block: &[u8]) -> (f32, f32) {
    let d = f16(block, 0);
    match format {
        QFormat::Q4_1 => (d, f16(block, 2)),
        _ => (d, -8.0 * d),
    }
}

/// Dequantize one weight row (`cols` values) as candle's `to_float` does.
pub(super) fn dequantize_row(format: QFormat, row: &[u8], out: &mut [f32]) {
    let bytes = format.block_bytes();
    for (block, out) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(32)) {
        match format {
            QFormat::Q8_0 => {
                let d = f16(block, 0);
                for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
            QFormat::Q4_0 | QFormat::Q4_1 => {
                let (d, m) = scale_min(format, block);
                let qs = &block[format.quants_at()..bytes];
                for (j, &q) in qs.iter().enumerate() {
                    // q * d is exact (4-bit times 11-bit mantissa), so this rounds like candle's
                    // `(q - 8) * d` (Q4_0) and `q * d + m` (Q4_1).
                    out[j] = f32::from(q & 0x0F) * d + m;
                    out[j + 16] = f32::from(q >> 4) * d + m;
                }
            }
        }
    }
}

/// Dot products of one weight row with `R` activation rows. `sums[r][b]` is the sum of block `b`
/// of activation row `r` (used by the 4-bit formats for their `m` term).
pub(super) fn dot_rows<const R: usize>(
    format: QFormat,
    row: &[u8],
    xs: [&[f32]; R],
    sums: [&[f32]; R],
) -> [f32; R] {
    let mut acc = [0f32; R];
    let bytes = format.block_bytes();
    for (b, block) in row.chunks_exact(bytes).enumerate() {
        match format {
            QFormat::Q8_0 => {
                let d = f16(block, 0);
                for r in 0..R {
                    let x = &xs[r][b * 32..b * 32 + 32];
                    let t: f32 = x
                        .iter()
                        .zip(&block[2..34])
                        .map(|(x, &q)| x * f32::from(q as i8))
                        .sum();
                    acc[r] += t * d;
                }
            }
            QFormat::Q4_0 | QFormat::Q4_1 => {
                let (d, m) = scale_min(format, block);
                let qs = &block[format.quants_at()..bytes];
                for r in 0..R {
                    let x = &xs[r][b * 32..b * 32 + 32];
                    let mut t = 0f32;
                    for (j, &q) in qs.iter().enumerate() {
                        t += x[j] * f32::from(q & 0x0F) + x[j + 16] * f32::from(q >> 4);
                    }
                    acc[r] += t * d + m * sums[r][b];
                }
            }
        }
    }
    acc
}

/// Dot products of one weight row with `R` rows of 8-bit activations: per block the exact integer
/// dot products with both planes, scaled by `d_w * d_x` and `d_w * d2_x`, plus the offset
/// `m * s_x`.
/// The reference the integer SIMD kernels are tested against.
pub(super) fn dot_rows_q8<const R: usize>(
    format: QFormat,
    row: &[u8],
    xs: &super::q8::Q8Rows,
    rows: [usize; R],
) -> [f32; R] {
    let mut acc = [0f32; R];
    let bytes = format.block_bytes();
    for (b, block) in row.chunks_exact(bytes).enumerate() {
        for (r, &xr) in rows.iter().enumerate() {
            let x = xs.block(xr, b);
            let (dot, d, m) = int_dot(format, block, x.q);
            let (dot2, _, _) = int_dot(format, block, x.q2);
            acc[r] += (d * x.d) * dot as f32 + (d * x.d2) * dot2 as f32 + m * x.s;
        }
    }
    acc
}

/// `(sum(q_w * q_x), d, m)` of one weight block and 32 activation quants (Q8_0: `m = 0`).
pub(super) fn int_dot(format: QFormat, block: &[u8], q: &[i8]) -> (i32, f32, f32) {
    match format {
        QFormat::Q8_0 => {
            let dot = block[2..34]
                .iter()
                .zip(q)
                .map(|(&w, &x)| i32::from(w as i8) * i32::from(x))
                .sum();
            (dot, f16(block, 0), 0.0)
        }
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let (d, m) = scale_min(format, block);
            let qs = &block[format.quants_at()..format.block_bytes()];
            let dot = qs
                .iter()
                .enumerate()
                .map(|(j, &w)| {
                    i32::from(w & 0x0F) * i32::from(q[j]) + i32::from(w >> 4) * i32::from(q[j + 16])
                })
                .sum();
            (dot, d, m)
        }
    }
}
