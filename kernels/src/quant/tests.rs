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
    let mut v = crate::tests::values(n, seed);
    v.iter_mut().step_by(97).for_each(|x| *x *= 8.0);
    v
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
        // 2..=16 rows: tiles of eight (AVX-512) and four plus every remainder (1, 2, 3), at the
        // GEMV limit too.
        for m in [2, 3, 5, 6, 7, 8, 9, 13, 15, GEMV_MAX_ROWS] {
            check(dtype, m, 29, 128);
        }
    }
}

#[test]
fn gemm_panels_match_candle_reference() {
    for dtype in FORMATS {
        // Panels for every ISA past FUSED_MAX_ROWS_AVX512 (fused kernels below it on AVX-512).
        for m in [GEMV_MAX_ROWS + 1, 40, FUSED_MAX_ROWS_AVX512 + 1] {
            check(dtype, m, 45, 96);
        }
    }
    // More weight rows than one panel holds (PANEL_FLOATS / 4096 = 256 rows a panel).
    check(GgmlDType::Q4_1, GEMV_MAX_ROWS + 3, 600, 4096);
}

/// Products handed to the pool from outside at once (as the engines of two chat models do): a
/// worker waiting inside one product's parallel part takes up another queued product on the same
/// stack, which must neither find the thread's panel buffer taken (a `RefCell` borrow panic, which
/// aborts the pool) nor change any result.
#[test]
fn products_queued_on_the_pool_together_equal_one_at_a_time() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (rows, cols, m) = (256, 512, 2 * FUSED_MAX_ROWS_AVX512);
    let q = quantized(GgmlDType::Q4_1, rows, cols, 5);
    let w = std::sync::Arc::new(QWeight::from_qtensor(&q).unwrap().expect("covered format"));
    let xs: Vec<Vec<f32>> = (0..12).map(|i| values(m * cols, 100 + i)).collect();
    let product = move |w: &QWeight, x: &[f32]| {
        let mut out = vec![0f32; m * rows];
        w.matmul(x, m, &mut out);
        out
    };
    let one_at_a_time: Vec<Vec<f32>> = pool.install(|| xs.iter().map(|x| product(&w, x)).collect());
    for _ in 0..5 {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, x) in xs.iter().enumerate() {
            let (w, x, tx) = (w.clone(), x.clone(), tx.clone());
            pool.spawn(move || tx.send((i, product(&w, &x))).expect("receiver alive"));
        }
        drop(tx);
        let mut together: Vec<(usize, Vec<f32>)> = rx.iter().collect();
        together.sort_by_key(|r| r.0);
        assert_eq!(together.len(), xs.len());
        assert!(together.iter().map(|r| &r.1).eq(one_at_a_time.iter()));
    }
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

/// The integer kernels against the scalar reference of the same arithmetic (exact integer block
/// dot products, then float scaling) and against the float32 product of the dequantized weights.
///
/// Against the reference the integer parts are exact; only the float32 scaling and summation
/// order differ (lanes of four products are converted and scaled separately), bounded by
/// `(nb + 32) * eps` times the sum of the magnitudes of the scaled terms. Against float32 the
/// error is that of the second plane's rounding (step `d2_x`): at most `d2_x / 2` per value, so
/// `sum_b d2_x,b / 2 * sum_i |w_i|` per output, plus the float32 slack of both sides.
fn check_int8(dtype: GgmlDType, m: usize, rows: usize, cols: usize) {
    let q = quantized(dtype, rows, cols, (m * 17 + rows * 5 + cols) as u64);
    let w: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let x = values(m * cols, 7 + m as u64);
    let xq = Q8Rows::quantize(&x, m, cols);
    let plain = QWeight::from_qtensor(&q).unwrap().expect("covered format");
    let format = plain.format();
    let nb = cols / 32;
    for isa in isas() {
        let qw = plain
            .clone()
            .with_isa(isa)
            .unwrap()
            .with_int8_activations(true);
        let mut got = vec![f32::NAN; m * rows];
        qw.matmul(&x, m, &mut got);
        let mut row_f32 = vec![0f32; cols];
        for r in 0..m {
            for j in 0..rows {
                qw.dequantize_row(j, &mut row_f32);
                assert!(row_f32 == w[j * cols..(j + 1) * cols], "{isa:?}: row {j}");
                let row = plain.row(j);
                let want = scalar::dot_rows_q8(format, row, &xq, [r])[0];
                let (mut scaled, mut step_err) = (0f32, 0f32);
                for b in 0..nb {
                    let block = &row[b * format.block_bytes()..(b + 1) * format.block_bytes()];
                    let xb = xq.block(r, b);
                    let (_, d, mw) = scalar::int_dot(format, block, xb.q);
                    for (plane, dx) in [(xb.q, xb.d), (xb.q2, xb.d2)] {
                        let abs_qx: Vec<i8> = plane.iter().map(|v| v.saturating_abs()).collect();
                        let abs_dot = abs_int_dot(format, block, &abs_qx);
                        // Packed Q8_0 weights are stored + 128 (m = -128 d): terms of that size.
                        let offset = if format == QFormat::Q8_0 {
                            let sum_abs: i32 = abs_qx.iter().map(|&v| i32::from(v)).sum();
                            (d * dx).abs() * 128.0 * sum_abs as f32
                        } else {
                            0.0
                        };
                        scaled += (d * dx).abs() * abs_dot as f32 + 2.0 * offset;
                    }
                    scaled += (mw * xb.s).abs();
                    let dx = xb.d2;
                    let wsum: f32 = w[j * cols + b * 32..j * cols + b * 32 + 32]
                        .iter()
                        .map(|v| v.abs())
                        .sum();
                    step_err += dx / 2.0 * wsum;
                }
                let tol = (nb + 32) as f32 * f32::EPSILON * scaled;
                let g = got[r * rows + j];
                // Without VNNI, long products run float32 GEMM panels (checked against float32).
                assert!(
                    !(qw.packed || m <= GEMV_MAX_ROWS) || (g - want).abs() <= tol,
                    "{dtype:?} {isa:?} m={m} out[{r},{j}]: {g} vs int8 reference {want} (tol {tol})"
                );
                let exact: f64 = (0..cols)
                    .map(|i| f64::from(x[r * cols + i]) * f64::from(w[j * cols + i]))
                    .sum();
                let bound = f64::from(step_err) * 1.0001 + f64::from(tol) * 2.0 + 1e-6;
                assert!(
                    (f64::from(g) - exact).abs() <= bound,
                    "{dtype:?} {isa:?} m={m} out[{r},{j}]: {g} vs float32 {exact} (bound {bound})"
                );
            }
        }
    }
}

/// `sum |q_w| * |q_x|` of a block (the 4-bit quants are unsigned, so `|q_w| = q_w`).
fn abs_int_dot(format: QFormat, block: &[u8], abs_qx: &[i8]) -> i32 {
    if format == QFormat::Q8_0 {
        return block[2..34]
            .iter()
            .zip(abs_qx)
            .map(|(&w, &x)| i32::from((w as i8).unsigned_abs()) * i32::from(x))
            .sum();
    }
    scalar::int_dot(format, block, abs_qx).0
}

#[test]
fn int8_kernels_match_their_reference_and_float32_within_the_rounding_step() {
    for dtype in FORMATS {
        // Odd and even block counts (the AVX-512 kernel pairs blocks), every pass width (16, 8,
        // 4, 2, 1) and remainders of them.
        for (m, rows, cols) in [(1, 37, 160), (1, 300, 576), (3, 29, 128), (7, 13, 96)] {
            check_int8(dtype, m, rows, cols);
        }
        for m in [2, 5, 15, GEMV_MAX_ROWS] {
            check_int8(dtype, m, 21, 224);
        }
    }
}

#[test]
fn int8_prefill_lengths_and_partial_row_groups_match_their_reference() {
    for dtype in FORMATS {
        // More rows than one pass takes, weight rows that leave a partial group of 16.
        for (m, rows) in [(GEMV_MAX_ROWS + 1, 45), (40, 16), (11, 3)] {
            check_int8(dtype, m, rows, 96);
        }
    }
}

/// A joined matrix gives each part's outputs bit for bit (the same kernel per row), with float32
/// and int8 activations; parts that cannot share one layout are refused.
#[test]
fn joined_rows_give_each_parts_products() {
    for int8 in [false, true] {
        let parts: Vec<QWeight> = [(32, 64), (16, 64), (48, 64)]
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                let q = quantized(GgmlDType::Q4_1, r, c, 90 + i as u64);
                QWeight::from_qtensor(&q)
                    .unwrap()
                    .unwrap()
                    .with_int8_activations(int8)
            })
            .collect();
        let refs: Vec<&QWeight> = parts.iter().collect();
        let joined = QWeight::concat_rows(&refs).expect("joinable parts");
        assert_eq!(joined.dims(), (96, 64));
        for m in [1, 3, 20] {
            let x = values(m * 64, 7 + m as u64);
            let mut all = vec![0f32; m * 96];
            joined.matmul(&x, m, &mut all);
            let mut offset = 0;
            for p in &parts {
                let rows = p.dims().0;
                let mut own = vec![0f32; m * rows];
                p.matmul(&x, m, &mut own);
                for r in 0..m {
                    let got = &all[r * 96 + offset..r * 96 + offset + rows];
                    let want = &own[r * rows..(r + 1) * rows];
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(want), "int8 {int8}, m {m}, row {r}");
                }
                offset += rows;
            }
        }
    }
    let a = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 16, 64, 1))
        .unwrap()
        .unwrap();
    let other_cols = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 16, 32, 2))
        .unwrap()
        .unwrap();
    let other_format = QWeight::from_qtensor(&quantized(GgmlDType::Q8_0, 16, 64, 3))
        .unwrap()
        .unwrap();
    assert!(QWeight::concat_rows(&[&a, &other_cols]).is_none());
    assert!(QWeight::concat_rows(&[&a, &other_format]).is_none());
    assert!(QWeight::concat_rows(&[]).is_none());
}
