//! The kernels against candle's reference: `QTensor::dequantize` then a float32 matmul.
//!
//! Tolerance: both sides sum the same `k` products `x_i * w_i` in float32, only in another order
//! (and with or without fused multiply-adds). Any order of recursive summation is within
//! `k * eps * sum |x_i * w_i|` of the exact sum (Higham, eq. 4.4, first order), so two orders
//! differ by at most twice that; the test allows exactly that bound per output. The dequantized
//! weights themselves must be bit-identical.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;

/// Deterministic pseudo-random values in [-1, 1) (xorshift), with a few larger outliers so that
/// blocks get different scales.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> QTensor {
    let w = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

fn check(dtype: GgmlDType, m: usize, rows: usize, cols: usize) {
    let q = quantized(dtype, rows, cols, (m * 31 + rows * 7 + cols) as u64);
    let reference_w = q.dequantize(&Device::Cpu).unwrap();
    let w: Vec<f32> = reference_w.flatten_all().unwrap().to_vec1().unwrap();
    let x = values(m * cols, 42 + m as u64);
    let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
    let want: Vec<f32> = xt
        .matmul(&reference_w.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base = QWeight::from_qtensor(&q).unwrap().expect("covered format");
    for isa in isas() {
        let qw = base.clone().with_isa(isa).unwrap();
        let mut row = vec![0f32; cols];
        for i in 0..rows {
            qw.dequantize_row(i, &mut row);
            assert!(
                row == w[i * cols..(i + 1) * cols],
                "{dtype:?} {isa:?}: dequantized row {i} differs from candle's"
            );
        }
        let mut got = vec![f32::NAN; m * rows];
        qw.matmul(&x, m, &mut got);
        for r in 0..m {
            for j in 0..rows {
                let magnitude: f32 = (0..cols)
                    .map(|i| (x[r * cols + i] * w[j * cols + i]).abs())
                    .sum();
                let tol = 2.0 * cols as f32 * f32::EPSILON * magnitude;
                let (g, e) = (got[r * rows + j], want[r * rows + j]);
                assert!(
                    (g - e).abs() <= tol,
                    "{dtype:?} {isa:?} m={m} [{rows}x{cols}] out[{r},{j}]: {g} vs {e} (tol {tol})"
                );
            }
        }
    }
}

const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

#[test]
fn decode_shapes_match_candle_reference_for_every_isa() {
    for dtype in FORMATS {
        // One activation row, odd numbers of weight rows and of blocks per row.
        for (rows, cols) in [(1, 32), (3, 64), (13, 96), (37, 160), (300, 576)] {
            check(dtype, 1, rows, cols);
        }
    }
}

#[test]
fn row_tiles_of_every_width_match_candle_reference() {
    for dtype in FORMATS {
        // 2..=16 rows: tiles of four plus every remainder (1, 2, 3), at the GEMV limit too.
        for m in [2, 3, 5, 6, 7, GEMV_MAX_ROWS] {
            check(dtype, m, 29, 128);
        }
    }
}

#[test]
fn gemm_panels_match_candle_reference() {
    for dtype in FORMATS {
        for m in [GEMV_MAX_ROWS + 1, 40] {
            check(dtype, m, 45, 96);
        }
    }
    // More weight rows than one panel holds (PANEL_FLOATS / 4096 = 256 rows a panel).
    check(GgmlDType::Q4_1, GEMV_MAX_ROWS + 3, 600, 4096);
}

#[test]
fn uncovered_formats_and_bad_sizes_are_refused() {
    let q = quantized(GgmlDType::Q4K, 2, 256, 1);
    assert!(QWeight::from_qtensor(&q).unwrap().is_none());
    assert!(QWeight::new(QFormat::Q4_1, 2, 48, vec![0; 60]).is_err());
    assert!(QWeight::new(QFormat::Q4_1, 2, 64, vec![0; 79]).is_err());
}

#[test]
fn custom_op_keeps_leading_dims_and_refuses_other_dtypes() {
    let q = quantized(GgmlDType::Q4_1, 5, 64, 3);
    let qw = QWeight::from_qtensor(&q).unwrap().unwrap();
    let x = Tensor::from_vec(values(2 * 3 * 64, 9), (2, 3, 64), &Device::Cpu).unwrap();
    let y = x.apply_op1_no_bwd(&qw).unwrap();
    assert_eq!(y.dims(), &[2, 3, 5]);
    let bf = x.to_dtype(candle_core::DType::BF16).unwrap();
    assert!(bf.apply_op1_no_bwd(&qw).is_err());
    let narrow = x.narrow(2, 0, 32).unwrap();
    assert!(narrow.apply_op1_no_bwd(&qw).is_err());
}
