//! Linear layers over GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) with float32 activations.
//!
//! Weights stay in the file's blocks (`w = d * q + m`, 32 weights a block), so memory is that of
//! the file, and products are computed from the blocks as stored: the result is the product with
//! the dequantized float32 weights up to summation order (transformers' numerics, unlike ggml's
//! kernels, which also quantize the activations to 8 bits).
//!
//! - Few activation rows (decode, batched decode): each weight block is unpacked once in registers
//!   and multiplied with up to four activation rows; weight rows are split across the rayon pool.
//!   AVX-512 or AVX2+FMA kernels are chosen at run time, with a portable fallback.
//! - Many rows (prefill): panels of weight rows are dequantized to float32 (bit-identical to
//!   candle's dequantization) and multiplied by gemm's microkernels: a GEMM, not repeated GEMVs.
//!
//! Profile that motivated it (perf, SmolLM2-135M Q4_1): candle's scalar `BlockQ4_1::vec_dot_unopt`
//! was 72% of decode samples in quantized mode, and dequantized float32 weights (auto mode) made
//! every decode step read ~540 MB instead of ~85 MB.
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// Block formats the kernels cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub const BLOCK: usize = 32;

    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(QFormat::Q4_0),
            GgmlDType::Q4_1 => Some(QFormat::Q4_1),
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one block as GGUF stores it (f16 scale, [f16 min], quants).
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }

    const fn quants_at(self) -> usize {
        match self {
            QFormat::Q4_1 => 4,
            _ => 2,
        }
    }

    fn has_sums(self) -> bool {
        self != QFormat::Q8_0
    }
}

/// Instruction sets the kernels come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU runs (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let base = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                if base && is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if base {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run kernels of this kind.
    pub fn supported(self) -> bool {
        match (self, Isa::detect()) {
            (Isa::Portable, _) => true,
            (Isa::Avx2, Isa::Avx2 | Isa::Avx512) => true,
            (a, b) => a == b,
        }
    }
}

/// Activation rows above which the product runs as dequantized panels times gemm. Below it the
/// fused kernels win: they read each weight block once per four rows without writing floats.
pub const GEMV_MAX_ROWS: usize = 16;

/// Floats of one dequantized panel (4 MiB: stays in L2/L3 while gemm walks the activations).
const PANEL_FLOATS: usize = 1 << 20;

/// A `[rows, cols]` weight matrix in GGUF blocks, row-major (each row `cols / 32` blocks).
#[derive(Debug, Clone)]
pub struct QWeight {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    isa: Isa,
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
        self.isa = isa;
        Ok(self)
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

    fn row_bytes(&self) -> usize {
        self.cols / QFormat::BLOCK * self.format.block_bytes()
    }

    fn row(&self, i: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[i * n..(i + 1) * n]
    }

    /// Row `i` as float32 (`out.len() == cols`).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
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
        if m > GEMV_MAX_ROWS {
            self.gemm(x, m, out)
        } else {
            self.gemv(x, m, out)
        }
    }

    /// Fused kernels, weight rows split across the pool, four activation rows per pass.
    fn gemv(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        let nb = k / QFormat::BLOCK;
        let sums: Vec<f32> = if self.format.has_sums() {
            x.chunks_exact(QFormat::BLOCK)
                .map(|b| b.iter().sum())
                .collect()
        } else {
            Vec::new()
        };
        let threads = rayon::current_num_threads();
        // Enough chunks to balance, big enough that scheduling stays small next to the work.
        let chunk = n.div_ceil(threads * 4).clamp(16, 256);
        let dst = SyncPtr(out.as_mut_ptr());
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(n);
            let mut r0 = 0;
            while r0 < m {
                let take = (m - r0).min(4);
                for j in rows.clone() {
                    let w = self.row(j);
                    let put = |r: usize, v: f32| {
                        // SAFETY: (r0 + r, j) is in bounds and written by this chunk only.
                        unsafe { *dst.get().add((r0 + r) * n + j) = v }
                    };
                    let xs = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
                    let ss = |r: usize| {
                        if sums.is_empty() {
                            &[][..]
                        } else {
                            &sums[(r0 + r) * nb..(r0 + r + 1) * nb]
                        }
                    };
                    match take {
                        4 => self
                            .dot(
                                [xs(0), xs(1), xs(2), xs(3)],
                                [ss(0), ss(1), ss(2), ss(3)],
                                w,
                            )
                            .iter()
                            .enumerate()
                            .for_each(|(r, v)| put(r, *v)),
                        3 => self
                            .dot([xs(0), xs(1), xs(2)], [ss(0), ss(1), ss(2)], w)
                            .iter()
                            .enumerate()
                            .for_each(|(r, v)| put(r, *v)),
                        2 => self
                            .dot([xs(0), xs(1)], [ss(0), ss(1)], w)
                            .iter()
                            .enumerate()
                            .for_each(|(r, v)| put(r, *v)),
                        _ => put(0, self.dot([xs(0)], [ss(0)], w)[0]),
                    }
                }
                r0 += take;
            }
        };
        let chunks = n.div_ceil(chunk);
        if chunks == 1 || threads == 1 {
            (0..chunks).for_each(work);
        } else {
            (0..chunks).into_par_iter().for_each(work);
        }
    }

    fn dot<const R: usize>(&self, xs: [&[f32]; R], sums: [&[f32]; R], row: &[u8]) -> [f32; R] {
        let nb = self.cols / QFormat::BLOCK;
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `row` is one weight row (nb blocks), every `xs[r]` has cols floats, every
            // `sums[r]` nb floats when the format uses them (else it is never read), and the ISA
            // was checked when the weight was built.
            Isa::Avx512 => unsafe {
                x86::dot_rows_avx512(
                    self.format,
                    row.as_ptr(),
                    nb,
                    xs.map(<[f32]>::as_ptr),
                    sums.map(<[f32]>::as_ptr),
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe {
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

    /// Dequantized panels of weight rows times gemm.
    fn gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        thread_local! {
            static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        let (n, k) = (self.rows, self.cols);
        let panel_rows = (PANEL_FLOATS / k).max(16).min(n);
        let threads = rayon::current_num_threads();
        PANEL.with(|cell| {
            let mut panel = cell.borrow_mut();
            if panel.len() < panel_rows * k {
                panel.resize(panel_rows * k, 0.0);
            }
            let mut p0 = 0;
            while p0 < n {
                let rows = panel_rows.min(n - p0);
                let panel = &mut panel[..rows * k];
                panel
                    .par_chunks_mut(k)
                    .enumerate()
                    .for_each(|(i, out)| self.dequantize_row(p0 + i, out));
                // SAFETY: dst is [m, n] with row stride n and this panel's columns p0..p0+rows;
                // lhs is [m, k] row-major; rhs is the panel read as [k, rows] (column j = weight
                // row p0 + j, contiguous). All three buffers have those sizes.
                unsafe {
                    gemm::gemm(
                        m,
                        rows,
                        k,
                        out.as_mut_ptr().add(p0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        panel.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        },
                    )
                }
                p0 += rows;
            }
        })
    }
}

/// A raw output pointer shared by workers that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used for disjoint writes (see `QWeight::gemv`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
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
