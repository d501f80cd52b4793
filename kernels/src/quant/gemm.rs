//! Products over packed tiles (int8 activations on AVX-512 VNNI, every row count) and, past
//! [`super::GEMV_MAX_ROWS`] rows with float32 activations, dequantized panels times our GEMM.
use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::q8::{Q8Row, Q8Rows};
use super::{packed, QFormat, QWeight, PANEL_FLOATS};
#[cfg(target_arch = "x86_64")]
use super::{x86, x86_q8};
use crate::SyncPtr;

impl QWeight {
    /// Integer kernels on packed weights: activations quantized once here, eight activation
    /// rows per pass over a group of 16 weight rows, groups split across the pool.
    pub(super) fn gemm_packed(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, nb) = (self.rows, self.cols / QFormat::BLOCK);
        let q = Q8Rows::quantize(x, m, self.cols);
        let ptrs = q.rows();
        let groups = n.div_ceil(packed::GROUP);
        let tile_group = nb * packed::GROUP * self.format.block_bytes();
        let threads = rayon::current_num_threads();
        let chunk = groups.div_ceil(threads * 4).clamp(1, 16);
        let dst = SyncPtr(out.as_mut_ptr());
        let work = |c: usize| {
            let mut r0 = 0;
            while r0 < m {
                let take = [8, 4, 2, 1].into_iter().find(|&w| w <= m - r0).unwrap_or(1);
                for g in c * chunk..((c + 1) * chunk).min(groups) {
                    let j = g * packed::GROUP;
                    // SAFETY: rows r0..r0 + take of `out`, columns j..j + lanes: in bounds and
                    // written by this task only (its groups).
                    let outs = |r: usize| unsafe { dst.get().add((r0 + r) * n + j) };
                    let tiles = self.data[g * tile_group..].as_ptr();
                    let lanes = (n - j).min(packed::GROUP);
                    let xs = &ptrs[r0..r0 + take];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `tiles` holds this group's nb tiles, every activation row has nb
                    // blocks (padded to even), `outs` as above; VNNI was detected at packing.
                    unsafe {
                        match take {
                            8 => group::<8>(self.format, tiles, nb, xs, outs, lanes),
                            4 => group::<4>(self.format, tiles, nb, xs, outs, lanes),
                            2 => group::<2>(self.format, tiles, nb, xs, outs, lanes),
                            _ => group::<1>(self.format, tiles, nb, xs, outs, lanes),
                        }
                    }
                }
                r0 += take;
            }
        };
        super::for_each_chunk(groups.div_ceil(chunk), work);
    }

    /// Float32 activations on AVX-512: tiles of two weight rows times up to eight activation rows
    /// ([`x86::tile_avx512`]), weight rows split across the pool.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn gemv_avx512(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let n = self.rows;
        let threads = rayon::current_num_threads();
        // Even, so that no pair of weight rows straddles two chunks.
        let chunk = n.div_ceil(threads * 4).clamp(16, 256).next_multiple_of(2);
        let dst = SyncPtr(out.as_mut_ptr());
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(n);
            let mut r0 = 0;
            while r0 < m {
                let take = [8, 4, 2, 1].into_iter().find(|&w| w <= m - r0).unwrap_or(1);
                match take {
                    8 => self.tiles::<8>(x, r0, rows.clone(), dst),
                    4 => self.tiles::<4>(x, r0, rows.clone(), dst),
                    2 => self.tiles::<2>(x, r0, rows.clone(), dst),
                    _ => self.tiles::<1>(x, r0, rows.clone(), dst),
                }
                r0 += take;
            }
        };
        super::for_each_chunk(n.div_ceil(chunk), work);
    }

    /// Activation rows `r0..r0 + R` times weight rows `rows`, two weight rows a tile, into
    /// `dst` (`[m, self.rows]`); each task passes its own `rows`.
    #[cfg(target_arch = "x86_64")]
    fn tiles<const R: usize>(&self, x: &[f32], r0: usize, rows: Range<usize>, dst: SyncPtr) {
        let (n, k) = (self.rows, self.cols);
        let nb = k / QFormat::BLOCK;
        let xs: [*const f32; R] = std::array::from_fn(|r| x[(r0 + r) * k..].as_ptr());
        let store = |j: usize, v: [f32; R]| {
            for (r, v) in v.into_iter().enumerate() {
                // SAFETY: (r0 + r, j) is in bounds and written by this task only.
                unsafe { *dst.get().add((r0 + r) * n + j) = v }
            }
        };
        let mut j = rows.start;
        while j + 1 < rows.end {
            let pair = [self.row(j).as_ptr(), self.row(j + 1).as_ptr()];
            // SAFETY: both rows hold nb blocks, every xs[r] cols floats, and AVX-512 was
            // detected when the weight was built.
            let [a, b] = unsafe { x86::tile_avx512::<R, 2>(self.format, pair, nb, xs) };
            store(j, a);
            store(j + 1, b);
            j += 2;
        }
        if j < rows.end {
            // SAFETY: as above, one row.
            let [a] =
                unsafe { x86::tile_avx512::<R, 1>(self.format, [self.row(j).as_ptr()], nb, xs) };
            store(j, a);
        }
    }

    /// Dequantized panels of weight rows times our float32 GEMM ([`crate::sgemm`]): weight rows
    /// are dequantized straight into its packed layout, a group of panels at a time, then chunks
    /// of activation rows go to the pool. It replaced gemm's `gemm` on dequantized row-major
    /// panels, which packed each panel again on every call: a 1,000-token prompt's TTFT fell by
    /// ~8% (perf: 59% of a 16 x 64-token prefill in gemm's microkernel plus 6% in its packing).
    pub(super) fn gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        use crate::sgemm::PackedB;
        thread_local! {
            static PANELS: RefCell<PackedB> = RefCell::new(PackedB::default());
        }
        PANELS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut panels) => self.gemm_with(&mut panels, x, m, out),
            // This thread is already inside a product: waiting in its parallel part, the pool
            // worker took up another product (e.g. another sequence batch's or model's pass).
            Err(_) => self.gemm_with(&mut PackedB::default(), x, m, out),
        })
    }

    /// [`QWeight::gemm`] with `b` as the buffer for a group of panels.
    fn gemm_with(&self, b: &mut crate::sgemm::PackedB, x: &[f32], m: usize, out: &mut [f32]) {
        use crate::sgemm::{matmul_raw, NR};
        let (n, k) = (self.rows, self.cols);
        let group = (PANEL_FLOATS / k / NR * NR).max(NR).min(n);
        let threads = rayon::current_num_threads();
        let chunk = m.div_ceil(threads * 3).max(12);
        let mut p0 = 0;
        while p0 < n {
            let rows = group.min(n - p0);
            b.pack_weight_rows(rows, k, |j, row| self.dequantize_row(p0 + j, row));
            let b = &*b;
            let dst = SyncPtr(out.as_mut_ptr());
            (0..m.div_ceil(chunk)).into_par_iter().for_each(|t| {
                let r0 = t * chunk;
                let mr = chunk.min(m - r0);
                // SAFETY: x holds m rows of k; out is [m, n] and this task writes rows
                // r0..r0 + mr, columns p0..p0 + rows only; the weight's ISA was detected.
                unsafe {
                    matmul_raw(
                        self.isa,
                        &x[r0 * k..],
                        k,
                        mr,
                        b,
                        dst.get().add(r0 * n + p0),
                        n,
                        0..b.panels(),
                    )
                }
            });
            p0 += rows;
        }
    }
}

/// One group of packed weight rows times `R` activation rows (`xs.len() == R`).
///
/// # Safety
/// As [`x86_q8::group_q8_vnni`]: `tiles` holds `nb` tiles, `xs` rows of `nb` (padded) blocks,
/// `outs(r)` has room for `lanes` floats, and the CPU has AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
unsafe fn group<const R: usize>(
    format: QFormat,
    tiles: *const u8,
    nb: usize,
    xs: &[Q8Row],
    outs: impl Fn(usize) -> *mut f32,
    lanes: usize,
) {
    let Ok(xs) = <&[Q8Row; R]>::try_from(xs) else {
        unreachable!("a slice of R rows")
    };
    x86_q8::group_q8_vnni(format, tiles, nb, xs, std::array::from_fn(outs), lanes)
}
