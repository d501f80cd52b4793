use super::*;

/// A deterministic pseudo-random fill.
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Attention written out naively over a dense per-sequence layout.
#[test]
fn equals_naive_causal_attention_with_gqa_and_scattered_blocks() {
    let d = Dims {
        heads: 4,
        kv_heads: 2,
        key_dim: 3,
        value_dim: 2,
        block_size: 2,
    };
    let blocks_a = [5u32, 0, 3];
    let blocks_b = [1u32, 4];
    let spans = [
        Span {
            offset: 0,
            len: 2,
            past: 3,
            blocks: &blocks_a,
        },
        Span {
            offset: 2,
            len: 3,
            past: 0,
            blocks: &blocks_b,
        },
    ];
    let rows = 6 * d.block_size;
    let (k, v) = (fill(rows * 2 * 3, 1), fill(rows * 2 * 2, 2));
    let q = fill(5 * 4 * 3, 3);
    let out = paged_attention(&q, &k, &v, &spans, d, 0.7);
    for span in &spans {
        for i in 0..span.len {
            let t = span.offset + i;
            for h in 0..4 {
                let g = h / 2;
                let qv = &q[(t * 4 + h) * 3..][..3];
                let seen = span.past + i + 1;
                let scores: Vec<f32> = (0..seen)
                    .map(|p| {
                        let r = span.row(p, 2);
                        qv.iter()
                            .zip(&k[(r * 2 + g) * 3..][..3])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * 0.7
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..2 {
                    let want: f32 = (0..seen)
                        .map(|p| e[p] / z * v[(span.row(p, 2) * 2 + g) * 2 + c])
                        .sum();
                    let got = out[(t * 4 + h) * 2 + c];
                    assert!(
                        (got - want).abs() < 1e-6,
                        "token {t} head {h}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn dot_handles_tails() {
    let a: Vec<f32> = (0..13).map(|x| x as f32).collect();
    assert_eq!(dot(&a, &a), (0..13).map(|x| (x * x) as f32).sum::<f32>());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx_dot_is_the_portable_dot_bit_for_bit() {
    if !crate::Isa::Avx2.supported() {
        return;
    }
    for n in [0, 5, 8, 13, 64, 128, 131] {
        let (a, b) = (fill(n, 3), fill(n, 4));
        let avx = <x86::Avx as Dot>::dot(&a, &b);
        assert_eq!(avx.to_bits(), dot(&a, &b).to_bits(), "length {n}");
        let bs = [b.clone(), fill(n, 5), fill(n, 6), fill(n, 7)];
        let four = <x86::Avx as Dot>::dot4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
        for (got, b) in four.iter().zip(&bs) {
            assert_eq!(got.to_bits(), dot(&a, b).to_bits(), "dot4, length {n}");
        }
    }
}

/// Prefill tiles (GEMMs) agree with the dot-product tiles up to summation order.
#[test]
fn gemm_tiles_match_dot_product_tiles() {
    let d = Dims {
        heads: 6,
        kv_heads: 2,
        key_dim: 64,
        value_dim: 64,
        block_size: 4,
    };
    let blocks = [3u32, 0, 5, 1, 7, 2, 6, 4];
    let span = Span {
        offset: 0,
        len: 20,
        past: 9,
        blocks: &blocks,
    };
    let rows = 8 * 4 * 2;
    let (k, v) = (fill(rows * 64, 7), fill(rows * 64, 8));
    let q = fill(20 * 6 * 64, 9);
    let it = Item {
        seq: 0,
        g: 1,
        i0: 4,
        n: 16,
    };
    assert!(it.n * 3 >= GEMM_MIN_ROWS);
    let t = Tile {
        q: &q,
        k: &k,
        v: &v,
        span: &span,
        it,
        d,
        scale: 0.125,
    };
    let want = tile_dots_body::<Portable>(&t);
    let got = tile_gemm(&t);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-5, "{i}: {g} vs {w}");
    }
    // The AVX2 build of the dot loops is the baseline build, bit for bit.
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx2.supported() {
        let baseline: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        // SAFETY: AVX2 is supported.
        let widened: Vec<u32> = unsafe { tile_dots_avx(&t) }
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(widened, baseline);
    }
}

/// The AVX-512 dot-product tiles agree with the portable ones up to summation order, for key and
/// value widths with and without a tail of 16 lanes, one to six query rows (one pass of four plus
/// a remainder) and queries that see different numbers of positions.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_dot_tiles_match_the_portable_ones() {
    if !crate::Isa::Avx512.supported() {
        return;
    }
    let blocks = [3u32, 0, 5, 1, 7, 2, 6, 4];
    for (heads, kv_heads, dk, dv, n, past) in [
        (9, 3, 64, 64, 1, 29),
        (6, 2, 64, 64, 2, 5),
        (12, 2, 19, 70, 1, 0),
        (4, 2, 3, 2, 2, 13),
        (16, 1, 128, 128, 1, 25),
    ] {
        let d = Dims {
            heads,
            kv_heads,
            key_dim: dk,
            value_dim: dv,
            block_size: 4,
        };
        let span = Span {
            offset: 1,
            len: n + 1,
            past,
            blocks: &blocks,
        };
        let rows = 8 * 4 * kv_heads;
        let (k, v) = (fill(rows * dk, 11), fill(rows * dv, 12));
        let q = fill((n + 2) * heads * dk, 13);
        for g in 0..kv_heads {
            let it = Item {
                seq: 0,
                g,
                i0: 1,
                n,
            };
            let t = Tile {
                q: &q,
                k: &k,
                v: &v,
                span: &span,
                it,
                d,
                scale: 0.3,
            };
            let want = tile_dots_body::<Portable>(&t);
            // SAFETY: AVX-512 is supported.
            let got = unsafe { avx512::tile_dots(&t) };
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5,
                    "heads {heads} dk {dk} dv {dv}: {i}: {g} vs {w}"
                );
            }
        }
    }
}
