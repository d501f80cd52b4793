//! The GGUF block formats the kernels read, and their byte layout.

use candle_core::quantized::GgmlDType;

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

    pub(super) const fn quants_at(self) -> usize {
        match self {
            QFormat::Q4_1 => 4,
            _ => 2,
        }
    }

    pub(super) fn has_sums(self) -> bool {
        self != QFormat::Q8_0
    }
}
