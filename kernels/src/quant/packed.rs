//! Weights repacked across rows for the AVX-512 VNNI kernel of `--gguf-mode quantized`.
//!
//! In the file's layout a block's 32 weights sit together, so an integer kernel must scale every
//! 32-value dot product separately (a conversion and two multiply-adds per 64 multiply-adds of
//! `vpdpbusd`). Here 16 weight rows are interleaved: for each group of 16 rows and each block
//! column, a tile holds the 16 rows' scales (f16), for Q4_1 their minimums, then the quants so
//! that each 64-byte vector holds the same four weights of all 16 rows. One `vpdpbusd` with
//! four broadcast activation bytes then serves 16 outputs, eight of them cover the block, and
//! the block's scaling is paid once per 512 multiply-adds. Tiles have exactly the bytes of the
//! 16 file blocks they replace (memory of the file; a last group of fewer rows is padded).
//!
//! All quants become unsigned bytes (`vpdpbusd` multiplies unsigned by signed): the 4-bit
//! formats' nibbles are, Q8_0's bytes are stored `+ 128`. Every format is then `w = d * q + m`
//! with `m = -8 d` (Q4_0), the stored minimum (Q4_1) or `-128 d` (Q8_0), and
//! `sum(w * x) = d * d_x * sum(q * q_x) + m * s_x` with the activation block's `s_x = d_x * sum(q_x)`.
use super::QFormat;

pub(super) const GROUP: usize = 16;

/// Byte offset of the quants in a tile (after `d`, and for Q4_1 `m`).
pub(super) const fn quants_at(format: QFormat) -> usize {
    match format {
        QFormat::Q4_1 => 4 * GROUP,
        _ => 2 * GROUP,
    }
}

/// Repack `rows` file-layout rows of `nb` blocks into tiles (zero rows pad the last group).
pub(super) fn pack(format: QFormat, rows: usize, nb: usize, data: &[u8]) -> Vec<u8> {
    let bytes = format.block_bytes();
    let tile = GROUP * bytes;
    let groups = rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * tile];
    for j in 0..rows {
        let (g, lane) = (j / GROUP, j % GROUP);
        for b in 0..nb {
            let src = &data[(j * nb + b) * bytes..(j * nb + b + 1) * bytes];
            let t = &mut out[(g * nb + b) * tile..(g * nb + b + 1) * tile];
            for (i, v) in to_tile(format, src).into_iter().enumerate() {
                if let Some(at) = tile_offset(format, lane, i) {
                    t[at] = v;
                }
            }
        }
    }
    out
}

/// The file block of row `j`, column `b`, read back from the tiles.
pub(super) fn file_block(format: QFormat, nb: usize, data: &[u8], j: usize, b: usize) -> [u8; 34] {
    let tile = GROUP * format.block_bytes();
    let (g, lane) = (j / GROUP, j % GROUP);
    let t = &data[(g * nb + b) * tile..(g * nb + b + 1) * tile];
    let mut block = [0u8; 34];
    for (i, v) in block.iter_mut().take(format.block_bytes()).enumerate() {
        if let Some(at) = tile_offset(format, lane, i) {
            *v = t[at];
        }
    }
    if format == QFormat::Q8_0 {
        block[2..].iter_mut().for_each(|q| *q ^= 0x80);
    }
    block
}

/// A file block's bytes as they go into a tile (Q8_0 quants offset by 128).
fn to_tile(format: QFormat, src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    if format == QFormat::Q8_0 {
        v[2..].iter_mut().for_each(|q| *q ^= 0x80);
    }
    v
}

/// Where byte `i` of lane `lane`'s file block goes in the tile.
fn tile_offset(format: QFormat, lane: usize, i: usize) -> Option<usize> {
    let q0 = match format {
        QFormat::Q4_1 => 4,
        _ => 2,
    };
    if i < 2 {
        return Some(2 * lane + i);
    }
    if i < q0 {
        return Some(2 * GROUP + 2 * lane + (i - 2));
    }
    // Quant byte `i - q0`: four-byte column `c`, byte `e` within it.
    let (c, e) = ((i - q0) / 4, (i - q0) % 4);
    Some(quants_at(format) + c * 4 * GROUP + 4 * lane + e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_hold_exactly_the_file_blocks() {
        for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
            let (rows, nb) = (21, 3);
            let data: Vec<u8> = (0..rows * nb * format.block_bytes())
                .map(|i| (i * 131 % 251) as u8)
                .collect();
            let packed = pack(format, rows, nb, &data);
            assert_eq!(packed.len(), 2 * GROUP * nb * format.block_bytes());
            for j in 0..rows {
                for b in 0..nb {
                    let n = format.block_bytes();
                    let want = &data[(j * nb + b) * n..(j * nb + b + 1) * n];
                    assert_eq!(&file_block(format, nb, &packed, j, b)[..n], want);
                }
            }
        }
    }
}
