//! Every kernel against a float64 product. Tolerance: the kernels sum `bias + sum_k a_k b_k` in
//! float32 with fused multiply-adds in one fixed order; any order of recursive summation is within
//! `k * eps * (|bias| + sum |a_k b_k|)` of the exact sum (Higham, eq. 4.4, first order), which is
//! the bound allowed per output.
use super::*;

use crate::tests::values;

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

/// `(exact, bound)` of `C = A W^T + bias` in float64.
fn reference(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let b0 = bias.map_or(0.0, |b| f64::from(b[j]));
            let (mut s, mut abs) = (b0, b0.abs());
            for kk in 0..k {
                let p = f64::from(a[i * lda + kk]) * f64::from(w[j * k + kk]);
                s += p;
                abs += p.abs();
            }
            out.push((s, (k as f64 + 1.0) * f64::from(f32::EPSILON) * abs + 1e-30));
        }
    }
    out
}

fn assert_close(got: &[f32], ldc: usize, n: usize, want: &[(f64, f64)], what: &str) {
    for (idx, &(w, bound)) in want.iter().enumerate() {
        let (i, j) = (idx / n, idx % n);
        let g = f64::from(got[i * ldc + j]);
        assert!(
            (g - w).abs() <= bound,
            "{what}: C[{i},{j}] = {g}, want {w} (bound {bound})"
        );
    }
}

#[test]
fn kernels_match_float64_on_odd_shapes() {
    for &(m, n, k) in &[
        (1, 1, 1),
        (5, 31, 7),
        (13, 32, 64),
        (12, 33, 385),
        (130, 100, 96),
        (25, 64, 1),
    ] {
        let lda = k + 3;
        let a = values(m * lda, (m * 7 + n) as u64);
        let w = values(n * k, (n * 11 + k) as u64);
        let bias = values(n, 5);
        for with_bias in [false, true] {
            let bias = with_bias.then_some(&bias[..]);
            let packed = PackedB::from_weight(&w, n, k, k, bias);
            let want = reference(&a, lda, m, &w, n, k, bias);
            for isa in isas() {
                let ldc = n + 2;
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: A and C have the extents matmul_raw needs; the ISA is supported.
                unsafe {
                    matmul_raw(
                        isa,
                        &a,
                        lda,
                        m,
                        &packed,
                        c.as_mut_ptr(),
                        ldc,
                        0..n.div_ceil(NR),
                    )
                };
                assert_close(&c, ldc, n, &want, &format!("{isa:?} m={m} n={n} k={k}"));
                // Columns between n and ldc are never written.
                for i in 0..m {
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }
}

#[test]
fn packing_rows_equals_packing_the_transposed_weight() {
    let (k, n) = (19, 45);
    let w = values(n * k, 3);
    let mut b = vec![0f32; k * (n + 4)];
    for j in 0..n {
        for kk in 0..k {
            b[kk * (n + 4) + j] = w[j * k + kk];
        }
    }
    let x = PackedB::from_weight(&w, n, k, k, None);
    let mut y = PackedB::default();
    y.pack_rows(&b, k, n, n + 4);
    let panels = |p: &PackedB| p.data[p.at..p.at + n.div_ceil(NR) * k * NR].to_vec();
    assert_eq!(panels(&x), panels(&y));
}

#[test]
fn packing_generated_rows_into_a_used_buffer_equals_packing_the_weight() {
    let (k, n) = (19, 45);
    let w = values(n * k, 5);
    let want = PackedB::from_weight(&w, n, k, k, None);
    // A buffer that held a larger product first: its stale values must not survive.
    let mut got = PackedB::from_weight(&values(100 * 40, 6), 100, 40, 40, None);
    got.pack_weight_rows(n, k, |j, row| row.copy_from_slice(&w[j * k..(j + 1) * k]));
    let panels = |p: &PackedB| p.data[p.at..p.at + n.div_ceil(NR) * k * NR].to_vec();
    assert_eq!((got.k(), got.n()), (k, n));
    assert_eq!(panels(&got), panels(&want));
}

#[test]
fn parallel_products_split_rows_or_columns_and_run_the_epilogue_once_per_row() {
    for &(m, n, k) in &[(3, 70, 40), (200, 40, 33)] {
        let a = values(m * k, 9);
        let w = values(n * k, 10);
        let packed = PackedB::from_weight(&w, n, k, k, None);
        let want = reference(&a, k, m, &w, n, k, None);
        let mut c = vec![0f32; m * n];
        let seen = std::sync::Mutex::new(vec![0u32; m]);
        par_matmul(&a, k, m, &packed, &mut c, |rows, first| {
            let mut seen = seen.lock().unwrap();
            for r in first..first + rows.len() / n {
                seen[r] += 1;
            }
        });
        assert_close(&c, n, n, &want, &format!("par m={m}"));
        assert!(seen.into_inner().unwrap().iter().all(|&s| s == 1));
    }
}
