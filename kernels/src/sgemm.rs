//! Float32 matrix products `C = A B (+ bias)` with `B` packed once: panels of [`NR`] columns, each
//! stored `[k][NR]` on a 64-byte boundary, so that the kernels stream `B` contiguously and
//! broadcast `A`'s values straight from its rows as stored. Weights are packed at load; attention
//! packs keys and values per head. `A` is never copied.
//!
//! Why not gemm (which candle uses): a perf profile of the embedding server had 21% of samples in
//! gemm's scalar, strided packing of row-major activations (`pack_lhs`), redone on every call, and
//! its rayon split of small products waiting at joins. Here weights are packed once, `A` is read
//! in place, and the caller decides how work is split across threads ([`par_matmul`]).
//!
//! Kernels: AVX-512 (12 rows x 32 columns of accumulators), AVX2+FMA (6 x 16), portable Rust
//! (the reference the others are tested against), chosen at run time.
use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::{Isa, SyncPtr};

/// Columns of one packed panel (two AVX-512 or four AVX2 registers).
pub const NR: usize = 32;
/// Rows of `A` kept hot while every panel of `B` passes over them.
const MC: usize = 120;

/// `B` `[k, n]` in panels of [`NR`] columns (the last one zero-padded), plus an optional bias of
/// `n` values added to every row of the product.
#[derive(Debug, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
    /// Start of the panels in `data` (64-byte aligned).
    at: usize,
    bias: Option<Vec<f32>>,
}

impl PackedB {
    /// `B = W^T` for a linear layer's weight `W` `[n, k]` (row stride `ldw`): `C = A W^T + bias`.
    pub fn from_weight(w: &[f32], n: usize, k: usize, ldw: usize, bias: Option<&[f32]>) -> Self {
        let mut p = PackedB::default();
        p.pack_weight(w, n, k, ldw);
        p.bias = bias.map(|b| {
            assert_eq!(b.len(), n, "bias length");
            let mut padded = b.to_vec();
            padded.resize(p.panels() * NR, 0.0);
            padded
        });
        p
    }

    /// Repack `W` `[n, k]` (row stride `ldw`) as `B = W^T`, reusing this buffer; drops any bias.
    pub fn pack_weight(&mut self, w: &[f32], n: usize, k: usize, ldw: usize) {
        assert!(n == 0 || w.len() >= (n - 1) * ldw + k, "weight too short");
        let panel = self.reset(k, n);
        for j in 0..n {
            let (p, c) = (j / NR, j % NR);
            let dst = &mut self.data[self.at + p * panel..][..panel];
            for (kk, &v) in w[j * ldw..j * ldw + k].iter().enumerate() {
                dst[kk * NR + c] = v;
            }
        }
    }

    /// `B = W^T` for `n` weight rows of `k` values each, which `row(j, out)` writes (e.g.
    /// dequantizing block-quantized weights), packed on the rayon pool one panel per task; reuses
    /// this buffer without zeroing it first (every value is written) and drops any bias.
    pub fn pack_weight_rows(&mut self, n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) {
        thread_local! {
            static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        let panel = k * NR;
        let want = n.div_ceil(NR) * panel;
        (self.k, self.n, self.bias) = (k, n, None);
        if self.data.len() < want + 16 {
            self.data.resize(want + 16, 0.0);
        }
        self.at = self.data.as_ptr().align_offset(64).min(16);
        let at = self.at;
        self.data[at..at + want]
            .par_chunks_mut(panel)
            .enumerate()
            .for_each(|(p, dst)| {
                let cols = NR.min(n - p * NR);
                ROWS.with(|cell| {
                    // Taken already only if `row` itself waits on the pool.
                    let mut own = Vec::new();
                    let mut held = cell.try_borrow_mut();
                    let buf = held.as_deref_mut().unwrap_or(&mut own);
                    buf.resize(NR * k, 0.0);
                    for c in 0..cols {
                        row(p * NR + c, &mut buf[c * k..(c + 1) * k]);
                    }
                    // Rows in, columns out: strided reads of 32 rows that stay in L1, and each
                    // 128-byte line of the panel written once (a perf profile of a 16 x 64-token
                    // prefill had 7% of samples in a column-at-a-time scatter).
                    for (kk, out) in dst.chunks_exact_mut(NR).enumerate() {
                        for (c, o) in out[..cols].iter_mut().enumerate() {
                            *o = buf[c * k + kk];
                        }
                        out[cols..].fill(0.0);
                    }
                });
            });
    }

    /// Repack `B` `[k, n]` given row-major with row stride `ldb`, reusing this buffer.
    pub fn pack_rows(&mut self, b: &[f32], k: usize, n: usize, ldb: usize) {
        assert!(k == 0 || b.len() >= (k - 1) * ldb + n, "matrix too short");
        let panel = self.reset(k, n);
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            let dst = &mut self.data[self.at + p * panel..][..panel];
            for kk in 0..k {
                let src = &b[kk * ldb + p * NR..][..cols];
                dst[kk * NR..kk * NR + cols].copy_from_slice(src);
            }
        }
    }

    /// Size the buffer for `[k, n]`, zeroed; returns the floats of one panel.
    fn reset(&mut self, k: usize, n: usize) -> usize {
        self.k = k;
        self.n = n;
        self.bias = None;
        let want = n.div_ceil(NR) * k * NR;
        self.data.clear();
        self.data.resize(want + 16, 0.0);
        self.at = self.data.as_ptr().align_offset(64).min(16);
        k * NR
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn panel(&self, p: usize) -> *const f32 {
        self.data[self.at + p * self.k * NR..].as_ptr()
    }

    fn bias_at(&self, p: usize) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| &b[p * NR..(p + 1) * NR])
    }
}

/// `C = A B (+ bias)` on the calling thread. `A` is `[m, k]` with row stride `lda`, `C` `[m, n]`
/// with row stride `ldc`.
pub fn matmul(a: &[f32], lda: usize, m: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    check(a, lda, m, b, c.len(), ldc);
    // SAFETY: `check` verified the extents of A and C; all panels are in B.
    unsafe {
        matmul_raw(
            Isa::detect(),
            a,
            lda,
            m,
            b,
            c.as_mut_ptr(),
            ldc,
            0..b.panels(),
        )
    }
}

fn check(a: &[f32], lda: usize, m: usize, b: &PackedB, c_len: usize, ldc: usize) {
    if m == 0 {
        return;
    }
    assert!(lda >= b.k && a.len() >= (m - 1) * lda + b.k, "A too short");
    assert!(ldc >= b.n && c_len >= (m - 1) * ldc + b.n, "C too short");
}

/// Rows of C one [`par_matmul`] task takes at least: below `threads` x this, columns are split.
const MIN_TASK_ROWS: usize = 24;

/// `C = A B (+ bias)` over the rayon pool, `C` contiguous `[m, n]`. With enough rows, chunks of
/// rows go to tasks and `epilogue(rows_of_c, first_row)` runs on each chunk as soon as it is done
/// (cache-hot: bias, activation, residual and norm fused into one pass); with few rows (a short
/// input) the panels are split instead and `epilogue` runs once on all rows afterwards.
pub fn par_matmul<E>(a: &[f32], lda: usize, m: usize, b: &PackedB, c: &mut [f32], epilogue: E)
where
    E: Fn(&mut [f32], usize) + Sync,
{
    let n = b.n;
    check(a, lda, m, b, c.len(), n);
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let isa = Isa::detect();
    if threads == 1 || m >= threads * MIN_TASK_ROWS {
        // A few chunks per thread so that a thread the OS preempts does not hold everyone up.
        let rows = m.div_ceil(threads * 3).max(MIN_TASK_ROWS / 2);
        c[..m * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, chunk)| {
                let r0 = i * rows;
                let mr = chunk.len() / n;
                // SAFETY: rows r0..r0+mr of A are in bounds (checked), `chunk` holds mr rows of C.
                unsafe {
                    matmul_raw(
                        isa,
                        &a[r0 * lda..],
                        lda,
                        mr,
                        b,
                        chunk.as_mut_ptr(),
                        n,
                        0..b.panels(),
                    )
                };
                epilogue(chunk, r0);
            });
        return;
    }
    let panels = b.panels();
    let per_task = panels.div_ceil(threads * 2).max(1);
    let dst = SyncPtr(c.as_mut_ptr());
    (0..panels.div_ceil(per_task))
        .into_par_iter()
        .for_each(|t| {
            let range = t * per_task..((t + 1) * per_task).min(panels);
            // SAFETY: tasks write disjoint column ranges (their panels) of C, in bounds (checked).
            unsafe { matmul_raw(isa, a, lda, m, b, dst.get(), n, range) }
        });
    epilogue(&mut c[..m * n], 0);
}

/// # Safety
/// `a` holds `m` rows of stride `lda` with at least `b.k` values each; `c` points to `m` rows of
/// stride `ldc` covering the columns of `panels`; `isa` is supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    panels: Range<usize>,
) {
    let mr = match isa {
        Isa::Avx512 => 12,
        Isa::Avx2 => 6,
        Isa::Portable => 4,
    };
    let mut mb = 0;
    while mb < m {
        let mend = m.min(mb + MC);
        for p in panels.clone() {
            let cols = NR.min(b.n - p * NR);
            let bias = b.bias_at(p).map_or(std::ptr::null(), <[f32]>::as_ptr);
            let mut i = mb;
            while i < mend {
                let rows = mr.min(mend - i);
                let t = Tile {
                    k: b.k,
                    a: a.as_ptr().add(i * lda),
                    lda,
                    b: b.panel(p),
                    bias,
                    c: c.add(i * ldc + p * NR),
                    ldc,
                    cols,
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => x86::tile_avx512(rows, &t),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => x86::tile_avx2(rows, &t),
                    _ => tile_portable(rows, &t),
                }
                i += rows;
            }
        }
        mb = mend;
    }
}

/// One tile of C: `rows` x `cols` (<= NR) at `c`, from `rows` rows of A and one panel of B.
struct Tile {
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
}

/// The portable kernel: sums in the same order as the SIMD ones (bias, then k ascending).
unsafe fn tile_portable(rows: usize, t: &Tile) {
    let mut acc = [[0f32; NR]; 4];
    for (i, row) in acc.iter_mut().enumerate().take(rows) {
        if !t.bias.is_null() {
            row.copy_from_slice(std::slice::from_raw_parts(t.bias, NR));
        }
        let a = std::slice::from_raw_parts(t.a.add(i * t.lda), t.k);
        for (kk, &av) in a.iter().enumerate() {
            let b = std::slice::from_raw_parts(t.b.add(kk * NR), NR);
            for (o, &bv) in row.iter_mut().zip(b) {
                *o = av.mul_add(bv, *o);
            }
        }
        std::ptr::copy_nonoverlapping(row.as_ptr(), t.c.add(i * t.ldc), t.cols);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, NR};

    macro_rules! dispatch {
        ($f:ident, $rows:expr, $t:expr, [$($n:literal),*]) => {
            match $rows {
                $($n => $f::<$n>($t),)*
                _ => unreachable!("tile rows"),
            }
        };
    }

    /// # Safety
    /// AVX-512F and FMA are available; `t` describes valid memory (see `matmul_raw`).
    pub(super) unsafe fn tile_avx512(rows: usize, t: &Tile) {
        dispatch!(k512, rows, t, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn k512<const MR: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !t.bias.is_null() {
            let b = [_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(16))];
            acc = [b; MR];
        }
        let mut a = [std::ptr::null::<f32>(); MR];
        for (i, p) in a.iter_mut().enumerate() {
            *p = t.a.add(i * t.lda);
        }
        let mut bp = t.b;
        for kk in 0..t.k {
            let b0 = _mm512_load_ps(bp);
            let b1 = _mm512_load_ps(bp.add(16));
            for i in 0..MR {
                let av = _mm512_set1_ps(*a[i].add(kk));
                acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
            }
            bp = bp.add(NR);
        }
        let lo = (1u32 << t.cols.min(16)) - 1;
        let hi = (1u32 << t.cols.saturating_sub(16)) - 1;
        for (i, acc) in acc.iter().enumerate() {
            let c = t.c.add(i * t.ldc);
            if t.cols == NR {
                _mm512_storeu_ps(c, acc[0]);
                _mm512_storeu_ps(c.add(16), acc[1]);
            } else {
                _mm512_mask_storeu_ps(c, lo as u16, acc[0]);
                _mm512_mask_storeu_ps(c.add(16), hi as u16, acc[1]);
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA are available; `t` describes valid memory (see `matmul_raw`).
    pub(super) unsafe fn tile_avx2(rows: usize, t: &Tile) {
        for half in 0..2 {
            let cols = t.cols.saturating_sub(half * 16).min(16);
            if cols == 0 {
                break;
            }
            let h = Tile {
                b: t.b.add(half * 16),
                bias: if t.bias.is_null() {
                    t.bias
                } else {
                    t.bias.add(half * 16)
                },
                c: t.c.add(half * 16),
                cols,
                ..*t
            };
            dispatch!(k256, rows, &h, [1, 2, 3, 4, 5, 6]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn k256<const MR: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if !t.bias.is_null() {
            let b = [_mm256_loadu_ps(t.bias), _mm256_loadu_ps(t.bias.add(8))];
            acc = [b; MR];
        }
        let mut bp = t.b;
        for kk in 0..t.k {
            let b0 = _mm256_load_ps(bp);
            let b1 = _mm256_load_ps(bp.add(8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*t.a.add(i * t.lda + kk));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
            bp = bp.add(NR);
        }
        for (i, acc) in acc.iter().enumerate() {
            let c = t.c.add(i * t.ldc);
            if t.cols == 16 {
                _mm256_storeu_ps(c, acc[0]);
                _mm256_storeu_ps(c.add(8), acc[1]);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), c, t.cols);
            }
        }
    }
}

#[cfg(test)]
mod tests;
