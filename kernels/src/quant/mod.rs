//! Linear layers over GGUF block-quantized weights (Q4_0, Q4_1, Q8_0).
//!
//! Weights stay in the file's blocks (`w = d * q + m`, 32 weights a block), so memory is that of
//! the file. Two numerics:
//! - float32 activations (`--gguf-mode auto`): products computed from the blocks as stored, equal
//!   to the product with the dequantized float32 weights up to summation order (transformers'
//!   numerics);
//! - int8 activations ([`QWeight::with_int8_activations`], `--gguf-mode quantized`): activations
//!   quantized once per matmul to two int8 planes ([`q8`]) and multiplied as integers; with
//!   AVX-512 VNNI on weights repacked 16 rows a tile ([`packed`], same bytes) for every length,
//!   else AVX2 / portable kernels on the file layout for up to [`GEMV_MAX_ROWS`] rows.
//!
//! Float32 activations:
//! - Few activation rows (decode, batched decode): each weight block is unpacked once in registers
//!   and multiplied with up to eight (AVX-512) or four (AVX2+FMA) activation rows; weight rows are
//!   split across the rayon pool. The kernels are chosen at run time, with a portable fallback.
//! - Many rows (prefill): panels of weight rows are dequantized to float32 (bit-identical to
//!   candle's dequantization) straight into [`crate::sgemm`]'s packed layout and multiplied by
//!   its microkernels: a GEMM, not repeated GEMVs.
//!
//! Profile that motivated it (perf, SmolLM2-135M Q4_1): candle's scalar `BlockQ4_1::vec_dot_unopt`
//! was 72% of decode samples in quantized mode, and dequantized float32 weights (auto mode) made
//! every decode step read ~540 MB instead of ~85 MB.
mod format;
mod gemm;
mod packed;
mod q8;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_q8;

use q8::Q8Row;
pub use q8::Q8Rows;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

pub use super::Isa;
use super::SyncPtr;
pub use format::QFormat;

/// Activation rows above which the product runs as dequantized panels times a GEMM (AVX-512 float32:
/// [`FUSED_MAX_ROWS_AVX512`]). Below it the fused kernels win: they read each weight block once
/// per four rows without writing floats.
pub const GEMV_MAX_ROWS: usize = 16;

/// [`GEMV_MAX_ROWS`] for the AVX-512 float32 kernel, whose tiles take eight rows a pass: the gemv
/// bench's 30-layer walk at 24 / 32 / 48 / 64 / 128 rows took 56-59 / 65-75 / 105-112 / 147-156
/// / 305-339 ms fused against 178-190 / 189-191 / 210-215 / 236-240 / 297-336 ms as panels,
/// which first write every weight out as a float (prompts of a few dozen tokens paid that). With
/// the panels on our sgemm (2026-11-30): 48 / 64 / 96 rows 33-36 / 39-48 / 49-74 ms fused against
/// 52-57 / 65-69 / 77-84 ms as panels, so the threshold stays.
pub const FUSED_MAX_ROWS_AVX512: usize = 96;

/// Floats of one group of dequantized panels (4 MiB: stays in L2/L3 while the GEMM walks the
/// activations).
const PANEL_FLOATS: usize = 1 << 20;

/// A `[rows, cols]` weight matrix in GGUF blocks, row-major (each row `cols / 32` blocks).
#[derive(Debug, Clone)]
pub struct QWeight {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    isa: Isa,
    /// Quantize activations to 8 bits for the few-row products ([`QWeight::with_int8_activations`]).
    int8: bool,
    /// `data` is in [`packed`] tiles (int8 activations on AVX-512 VNNI), not the file's rows.
    packed: bool,
}

impl QWeight {
    /// `data`: `rows * cols / 32` blocks of `format`.
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(QFormat::BLOCK) {
            candle_core::bail!("{format:?} weights need a multiple of 32 columns, got {cols}");
        }
        let want = rows * cols / QFormat::BLOCK * format.block_bytes();
        if data.len() != want {
            candle_core::bail!(
                "{format:?} [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            );
        }
        Ok(QWeight {
            format,
            rows,
            cols,
            data,
            isa: Isa::detect(),
            int8: false,
            packed: false,
        })
    }

    /// The blocks of a 2-D CPU `QTensor` of a covered format; `None` for other formats/devices.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let Some(format) = QFormat::from_ggml(t.dtype()) else {
            return Ok(None);
        };
        if !t.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        Ok(Some(QWeight::new(
            format,
            rows,
            cols,
            t.data()?.into_owned(),
        )?))
    }

    /// The same weights run by kernels of another instruction set (tests compare them).
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        if !isa.supported() {
            candle_core::bail!("this CPU cannot run {isa:?} kernels");
        }
        if self.packed {
            candle_core::bail!("choose the kernels' ISA before int8 activations repack weights");
        }
        self.isa = isa;
        Ok(self)
    }

    /// Products quantize the activations to 8-bit blocks and run integer kernels (ggml's
    /// numerics: faster, with an error of up to half a step, 1/254 of each block's largest
    /// activation, per value); `false` keeps float32 activations. With AVX-512 VNNI the weights
    /// are repacked 16 rows a tile (same bytes) and every product runs on integers; otherwise
    /// products of up to [`GEMV_MAX_ROWS`] rows do, and longer ones run float32 GEMM panels.
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8 = on;
        let vnni = self.isa == Isa::Avx512 && super::has_vnni();
        if on && vnni && !self.packed {
            self.data = packed::pack(self.format, self.rows, self.cols / 32, &self.data);
            self.packed = true;
        }
        self
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// The rows of `parts` one after the other as one matrix, so that projections of the same
    /// input run as one product: one stream through the weights and one fork-join instead of
    /// several (`benches/gemv.rs`: a decode step's weight walk with q/k/v and gate/up joined took
    /// ~18% less time with float32 activations, ~10% with int8). `None` when the parts differ in
    /// format, columns, kernels or numerics, or when packed tiles would straddle two parts (rows
    /// not a multiple of 16).
    pub fn concat_rows(parts: &[&QWeight]) -> Option<QWeight> {
        let first = parts.first()?;
        let joinable = parts.iter().all(|p| {
            (p.format, p.cols, p.isa, p.int8, p.packed)
                == (
                    first.format,
                    first.cols,
                    first.isa,
                    first.int8,
                    first.packed,
                )
                && (!p.packed || p.rows.is_multiple_of(packed::GROUP))
        });
        joinable.then(|| QWeight {
            rows: parts.iter().map(|p| p.rows).sum(),
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            format: first.format,
            cols: first.cols,
            isa: first.isa,
            int8: first.int8,
            packed: first.packed,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QFormat::BLOCK * self.format.block_bytes()
    }

    fn row(&self, i: usize) -> &[u8] {
        debug_assert!(!self.packed, "file-layout row of packed weights");
        let n = self.row_bytes();
        &self.data[i * n..(i + 1) * n]
    }

    /// Row `i` as float32 (`out.len() == cols`).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        if self.packed {
            let (nb, bytes) = (self.cols / 32, self.format.block_bytes());
            for (b, out) in out.chunks_exact_mut(32).enumerate() {
                let block = packed::file_block(self.format, nb, &self.data, i, b);
                scalar::dequantize_row(self.format, &block[..bytes], out);
            }
            return;
        }
        let row = self.row(i);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `row` has cols / 32 blocks, `out` cols floats, and the ISA was detected.
            Isa::Avx512 => unsafe {
                x86::dequantize_row_avx512(
                    self.format,
                    row.as_ptr(),
                    self.cols / 32,
                    out.as_mut_ptr(),
                )
            },
            _ => scalar::dequantize_row(self.format, row, out),
        }
    }

    /// `out[m, rows] = x[m, cols] W^T`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "matmul: activations length");
        assert_eq!(out.len(), m * self.rows, "matmul: output length");
        if m == 0 || self.rows == 0 {
            return;
        }
        if self.packed {
            self.gemm_packed(x, m, out)
        } else if m > self.fused_max_rows() {
            self.gemm(x, m, out)
        } else if self.int8 {
            self.gemv_q8(x, m, out)
        } else {
            self.gemv(x, m, out)
        }
    }

    /// Activation rows up to which float32 products run fused kernels rather than panels.
    fn fused_max_rows(&self) -> usize {
        if self.isa == Isa::Avx512 && !self.int8 {
            FUSED_MAX_ROWS_AVX512
        } else {
            GEMV_MAX_ROWS
        }
    }

    /// Fused float32 kernels, four activation rows per pass (AVX-512: [`QWeight::gemv_avx512`]).
    fn gemv(&self, x: &[f32], m: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            return self.gemv_avx512(x, m, out);
        }
        let k = self.cols;
        let nb = k / QFormat::BLOCK;
        let sums: Vec<f32> = if self.format.has_sums() {
            x.chunks_exact(QFormat::BLOCK)
                .map(|b| b.iter().sum())
                .collect()
        } else {
            Vec::new()
        };
        let xs = |r: usize| &x[r * k..(r + 1) * k];
        let ss = |r: usize| {
            if sums.is_empty() {
                &[][..]
            } else {
                &sums[r * nb..(r + 1) * nb]
            }
        };
        self.row_passes(m, out, &[4, 3, 2, 1], |w, r, res| match res.len() {
            4 => res.copy_from_slice(&self.dot(
                [xs(r), xs(r + 1), xs(r + 2), xs(r + 3)],
                [ss(r), ss(r + 1), ss(r + 2), ss(r + 3)],
                w,
            )),
            3 => res.copy_from_slice(&self.dot(
                [xs(r), xs(r + 1), xs(r + 2)],
                [ss(r), ss(r + 1), ss(r + 2)],
                w,
            )),
            2 => res.copy_from_slice(&self.dot([xs(r), xs(r + 1)], [ss(r), ss(r + 1)], w)),
            _ => res[0] = self.dot([xs(r)], [ss(r)], w)[0],
        });
    }

    /// Integer kernels on activations quantized once here, up to 16 activation rows per pass.
    fn gemv_q8(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let q = Q8Rows::quantize(x, m, self.cols);
        let q = (q.rows(), q);
        self.row_passes(m, out, &[16, 8, 4, 2, 1], |w, r, res| match res.len() {
            16 => res.copy_from_slice(&self.dot_q8::<16>(&q, r, w)),
            8 => res.copy_from_slice(&self.dot_q8::<8>(&q, r, w)),
            4 => res.copy_from_slice(&self.dot_q8::<4>(&q, r, w)),
            2 => res.copy_from_slice(&self.dot_q8::<2>(&q, r, w)),
            _ => res[0] = self.dot_q8::<1>(&q, r, w)[0],
        });
    }

    /// Runs `dot(weight_row, first_activation_row, results)` over every weight row (split across
    /// the pool) and every activation row, taking activation rows in the widest of `widths` that
    /// is left, and writes `out[m, rows]`.
    fn row_passes<F>(&self, m: usize, out: &mut [f32], widths: &[usize], dot: F)
    where
        F: Fn(&[u8], usize, &mut [f32]) + Sync,
    {
        let n = self.rows;
        let threads = rayon::current_num_threads();
        // Enough chunks to balance, big enough that scheduling stays small next to the work.
        let chunk = n.div_ceil(threads * 4).clamp(16, 256);
        let dst = SyncPtr(out.as_mut_ptr());
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(n);
            let mut res = [0f32; 16];
            let mut r0 = 0;
            while r0 < m {
                let take = widths.iter().copied().find(|&w| w <= m - r0).unwrap_or(1);
                for j in rows.clone() {
                    dot(self.row(j), r0, &mut res[..take]);
                    for (r, v) in res[..take].iter().enumerate() {
                        // SAFETY: (r0 + r, j) is in bounds and written by this chunk only.
                        unsafe { *dst.get().add((r0 + r) * n + j) = *v }
                    }
                }
                r0 += take;
            }
        };
        for_each_chunk(n.div_ceil(chunk), work);
    }

    fn dot_q8<const R: usize>(
        &self,
        (ptrs, q): &(Vec<Q8Row>, Q8Rows),
        r0: usize,
        row: &[u8],
    ) -> [f32; R] {
        let nb = self.cols / QFormat::BLOCK;
        let Ok(xs) = <&[Q8Row; R]>::try_from(&ptrs[r0..r0 + R]) else {
            unreachable!("a slice of R rows")
        };
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `row` is one weight row (nb blocks); every row of `q` has nb blocks padded
            // to an even count (Q8Rows::quantize of this weight's cols); features were checked.
            Isa::Avx512 | Isa::Avx2 => unsafe {
                x86_q8::dot_q8_avx2(self.format, row.as_ptr(), nb, xs)
            },
            _ => scalar::dot_rows_q8(self.format, row, q, std::array::from_fn(|i| r0 + i)),
        }
    }

    fn dot<const R: usize>(&self, xs: [&[f32]; R], sums: [&[f32]; R], row: &[u8]) -> [f32; R] {
        let nb = self.cols / QFormat::BLOCK;
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `row` is one weight row (nb blocks), every `xs[r]` has cols floats, every
            // `sums[r]` nb floats when the format uses them (else it is never read), and the ISA
            // was checked when the weight was built (AVX-512 products run in `gemv_avx512`).
            Isa::Avx2 | Isa::Avx512 => unsafe {
                x86::dot_rows_avx2(
                    self.format,
                    row.as_ptr(),
                    nb,
                    xs.map(<[f32]>::as_ptr),
                    sums.map(<[f32]>::as_ptr),
                )
            },
            _ => scalar::dot_rows(self.format, row, xs, sums),
        }
    }
}

/// `work(c)` for chunks `0..chunks`, across the pool when there is more than one chunk and
/// more than one thread.
fn for_each_chunk(chunks: usize, work: impl Fn(usize) + Sync + Send) {
    if chunks == 1 || rayon::current_num_threads() == 1 {
        (0..chunks).for_each(work);
    } else {
        (0..chunks).into_par_iter().for_each(work);
    }
}

/// `x.apply_op1_no_bwd(&weight)`: `[.., cols]` float32 -> `[.., rows]`.
impl CustomOp1 for QWeight {
    fn name(&self) -> &'static str {
        "qweight-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("quantized linear takes float32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized linear needs contiguous activations");
        };
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!("activations {dims:?} do not end in {} columns", self.cols);
        }
        let m = (end - start) / self.cols;
        let mut out = vec![0f32; m * self.rows];
        self.matmul(&data[start..end], m, &mut out);
        if let Some(last) = dims.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests;
