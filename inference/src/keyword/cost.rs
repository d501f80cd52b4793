//! What a keyword selection costs, in multiply-adds, checked before anything is embedded.
//!
//! - every method: unit vectors and document similarities of the `n` candidates (`n * dims`);
//! - MMR: each of its `min(top_n, n)` picks compares every remaining candidate with the newest
//!   pick (`min(top_n, n) * n * dims`);
//! - Max Sum: the similarity matrix of its pool (`pool^2 * dims`) plus one addition per pair of
//!   every combination (`C(pool, top_n) * top_n * (top_n - 1)`), pool = `min(nr_candidates, n)`.
use super::{KeywordError, KeywordOptions};

pub(super) fn max_sum_applies(opts: &KeywordOptions) -> bool {
    opts.use_maxsum && !opts.use_mmr
}

/// Refuse the selection `opts` asks for over `n` candidates of `dims` dimensions when it would
/// take more than `limit` multiply-adds.
pub(super) fn check(
    n: usize,
    dims: usize,
    opts: &KeywordOptions,
    limit: u64,
) -> Result<(), KeywordError> {
    let (n64, d64) = (n as u64, dims as u64);
    let base = n64.saturating_mul(d64);
    let (method, cost, combinations, lower) = if opts.use_mmr {
        let picks = opts.top_n.min(n) as u64;
        let cost = base.saturating_add(picks.saturating_mul(n64).saturating_mul(d64));
        ("MMR", cost, "", "top")
    } else if max_sum_applies(opts) {
        if opts.top_n > n {
            return Ok(()); // KeyBERT returns [] without combining anything.
        }
        let pool = opts.nr_candidates.min(n) as u64;
        let matrix = pool.saturating_mul(pool).saturating_mul(d64);
        let k = opts.top_n as u64;
        let per_combination = k.saturating_mul(k.saturating_sub(1));
        let budget = limit.saturating_sub(base.saturating_add(matrix));
        let combos = match per_combination {
            0 => 0,
            per => {
                binomial_up_to(pool, k, budget / per).map_or(u64::MAX, |c| c.saturating_mul(per))
            }
        };
        let cost = base.saturating_add(matrix).saturating_add(combos);
        let what = " and every top_n-combination of the pool";
        ("Max Sum", cost, what, "nr_candidates or top")
    } else {
        ("ranking", base, "", "the number of candidates")
    };
    if cost > limit {
        return Err(KeywordError::SelectionTooCostly {
            method,
            candidates: n,
            dimensions: dims,
            cost,
            limit,
            combinations,
            lower,
        });
    }
    Ok(())
}

/// `C(n, k)` when it is at most `limit`, else `None`. The running values `C(n - k + i, i)` only
/// grow with `i`, so the first one above `limit` decides and nothing overflows.
pub(super) fn binomial_up_to(n: u64, k: u64, limit: u64) -> Option<u64> {
    if k > n {
        return Some(0);
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 1..=k {
        c = c * u128::from(n - k + i) / u128::from(i);
        if c > u128::from(limit) {
            return None;
        }
    }
    u64::try_from(c).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(top_n: usize, mmr: bool, maxsum: bool, nr_candidates: usize) -> KeywordOptions {
        KeywordOptions {
            top_n,
            use_mmr: mmr,
            use_maxsum: maxsum,
            nr_candidates,
            ..KeywordOptions::default()
        }
    }

    #[test]
    fn binomials() {
        assert_eq!(binomial_up_to(20, 5, u64::MAX), Some(15_504));
        assert_eq!(binomial_up_to(20, 10, u64::MAX), Some(184_756));
        assert_eq!(binomial_up_to(5, 5, 1), Some(1));
        assert_eq!(binomial_up_to(3, 4, 1), Some(0));
        assert_eq!(binomial_up_to(1000, 500, 1_000_000), None);
    }

    #[test]
    fn max_sum_counts_the_similarity_matrix() {
        // top_n 1 has no pairs: only the matrix counts. 4,095 candidates of 384 dimensions in
        // the pool: 4095^2 * 384 = 6.4e9 multiply-adds, refused; KeyBERT's default pool of 20 is not.
        let wide = opts(1, false, true, 4095);
        let err = check(4095, 384, &wide, 100_000_000).unwrap_err();
        assert!(
            matches!(err, KeywordError::SelectionTooCostly { method: "Max Sum", cost, .. } if cost > 6_000_000_000),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("--keyword-max-selection-cost"),
            "{err}"
        );
        assert!(check(4095, 384, &opts(1, false, true, 20), 100_000_000).is_ok());
        // The defaults: 20 * 384 + 400 * 384 + C(20, 5) * 20 = 471,360.
        assert!(check(20, 384, &opts(5, false, true, 20), 471_360).is_ok());
        assert!(check(20, 384, &opts(5, false, true, 20), 471_359).is_err());
    }

    #[test]
    fn mmr_cost_grows_with_top_n() {
        assert!(check(4096, 384, &opts(5, true, false, 20), 100_000_000).is_ok());
        let err = check(4096, 384, &opts(4096, true, false, 20), 100_000_000).unwrap_err();
        assert_eq!(err.option(), "top_n");
    }
}
