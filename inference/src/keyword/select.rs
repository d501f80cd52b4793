//! Choosing keywords among embedded candidates, as KeyBERT 0.9.0 does: plain cosine ranking,
//! Maximal Marginal Relevance (`_mmr.py`) and Max Sum Distance (`_maxsum.py`).
//!
//! Similarities are sklearn's `cosine_similarity` in float32: each vector is scaled to unit length
//! (a zero vector stays zero, so its similarities are 0), then dot products. Selection works on
//! candidate indices; scores are rounded at the end exactly as Python's `round(x, 4)` does.

/// Candidates and document as unit vectors, with the document similarity of every candidate.
pub(crate) struct Space {
    candidates: Vec<Vec<f32>>,
    /// Cosine of each candidate with the document (KeyBERT's `distances[0]`).
    pub(crate) doc_sim: Vec<f32>,
}

impl Space {
    pub(crate) fn new(doc: &[f32], candidates: &[Vec<f32>]) -> Self {
        let doc = unit(doc);
        let candidates: Vec<Vec<f32>> = candidates.iter().map(|c| unit(c)).collect();
        let doc_sim = candidates.iter().map(|c| dot(&doc, c)).collect();
        Space {
            candidates,
            doc_sim,
        }
    }

    fn sim(&self, a: usize, b: usize) -> f32 {
        match (self.candidates.get(a), self.candidates.get(b)) {
            (Some(x), Some(y)) => dot(x, y),
            _ => 0.0,
        }
    }

    fn len(&self) -> usize {
        self.doc_sim.len()
    }
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| x / norm).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices sorted by ascending value, ties in index order: what numpy's `argsort` gives for the
/// small arrays it insertion-sorts (exact float ties between different phrases do not occur in
/// practice, so larger arrays are not worth emulating beyond this).
fn argsort(values: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    idx
}

/// First index of the largest value (`np.argmax`), `None` when empty.
fn argmax(values: impl IntoIterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in values.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Plain KeyBERT: `distances.argsort()[0][-top_n:][::-1]`, most similar first.
pub(crate) fn top_similar(space: &Space, top_n: usize) -> Vec<usize> {
    let order = argsort(&space.doc_sim);
    let from = order.len().saturating_sub(top_n);
    order[from..].iter().rev().copied().collect()
}

/// Maximal Marginal Relevance: start from the most similar candidate, then repeatedly take the
/// candidate maximising `(1 - diversity) * sim(doc) - diversity * max sim(already chosen)`.
/// Returned in choice order; KeyBERT then sorts by rounded score (see `super::select`).
pub(crate) fn mmr(space: &Space, top_n: usize, diversity: f32) -> Vec<usize> {
    let Some(first) = argmax(space.doc_sim.iter().copied()) else {
        return Vec::new();
    };
    let mut chosen = vec![first];
    let mut remaining: Vec<usize> = (0..space.len()).filter(|&i| i != first).collect();
    // Running max similarity of every candidate to the chosen ones: the same values as KeyBERT's
    // `np.max(word_similarity[candidates][:, keywords])`, updated with each new choice instead
    // of recomputed, which keeps this linear in the number of candidates per step.
    let mut nearest: Vec<f32> = (0..space.len()).map(|i| space.sim(i, first)).collect();
    // numpy multiplies the float32 arrays by the Python floats cast to float32.
    let keep = (1.0 - f64::from(diversity)) as f32;
    let steps = top_n.saturating_sub(1).min(space.len().saturating_sub(1));
    for _ in 0..steps {
        let scores = remaining
            .iter()
            .map(|&i| keep * space.doc_sim[i] - diversity * nearest[i]);
        let Some(pos) = argmax(scores) else { break };
        let pick = remaining.remove(pos);
        chosen.push(pick);
        for &i in &remaining {
            nearest[i] = nearest[i].max(space.sim(i, pick));
        }
    }
    chosen
}

/// Max Sum Distance: among the `nr_candidates` candidates most similar to the document, the
/// `top_n`-combination with the smallest summed pairwise similarity (first one found on ties, in
/// `itertools.combinations` order). Returned in ascending document similarity, as KeyBERT does.
/// Empty when there are fewer than `top_n` candidates. The caller bounds the number of
/// combinations (see `super::max_sum_cost`).
pub(crate) fn max_sum(space: &Space, top_n: usize, nr_candidates: usize) -> Vec<usize> {
    if top_n > space.len() {
        return Vec::new();
    }
    let order = argsort(&space.doc_sim);
    let pool = &order[order.len().saturating_sub(nr_candidates)..];
    let pair: Vec<Vec<f32>> = pool
        .iter()
        .map(|&a| pool.iter().map(|&b| space.sim(a, b)).collect())
        .collect();
    let mut best: Option<Vec<usize>> = None;
    let mut best_sum = 100_000.0_f32;
    let mut comb = Combinations::new(pool.len(), top_n);
    while let Some(c) = comb.next_slice() {
        // Same float32 summation order as KeyBERT's `sum([... for i in c for j in c if i != j])`.
        let mut sum = 0.0_f32;
        for &i in c {
            for &j in c {
                if i != j {
                    sum += pair[i][j];
                }
            }
        }
        if sum < best_sum {
            best_sum = sum;
            best = Some(c.to_vec());
        }
    }
    best.unwrap_or_default()
        .into_iter()
        .map(|p| pool[p])
        .collect()
}

/// `k`-combinations of `0..n` in lexicographic order, like `itertools.combinations(range(n), k)`.
struct Combinations {
    n: usize,
    idx: Vec<usize>,
    started: bool,
}

impl Combinations {
    fn new(n: usize, k: usize) -> Self {
        Combinations {
            n,
            idx: (0..k).collect(),
            started: false,
        }
    }

    fn next_slice(&mut self) -> Option<&[usize]> {
        let k = self.idx.len();
        if !self.started {
            self.started = true;
            return (k <= self.n).then_some(self.idx.as_slice());
        }
        // Rightmost position that can still move right.
        let i = (0..k).rev().find(|&i| self.idx[i] != i + self.n - k)?;
        self.idx[i] += 1;
        for j in i + 1..k {
            self.idx[j] = self.idx[j - 1] + 1;
        }
        Some(self.idx.as_slice())
    }
}

/// Python's `round(x, 4)` on the float64 value of a float32 score: correctly rounded, ties to even
/// (Rust's `{:.4}` formats the exact binary value with the same rule).
pub(crate) fn round4(x: f32) -> f32 {
    format!("{:.4}", f64::from(x))
        .parse::<f64>()
        .map_or(x, |r| r as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit vector at `deg` degrees in the plane: cosines are then cosines of angle differences.
    fn at(deg: f32) -> Vec<f32> {
        let r = deg.to_radians();
        vec![r.cos(), r.sin()]
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round4(0.43244), 0.4324);
        assert_eq!(round4(0.43246), 0.4325);
        // 0.03125 and 0.09375 are exact binary halves at the 4th decimal: Python rounds to even.
        assert_eq!(round4(0.03125), 0.0312);
        assert_eq!(round4(0.09375), 0.0938);
        assert_eq!(round4(-0.00004), -0.0);
    }

    #[test]
    fn cosine_ignores_length_and_zero_vectors_score_zero() {
        let space = Space::new(
            &[2.0, 0.0],
            &[vec![0.0, 3.0], vec![5.0, 0.0], vec![0.0, 0.0]],
        );
        assert_eq!(space.doc_sim, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn plain_ranking_is_descending_and_ties_put_later_columns_first() {
        // doc at 0 deg; candidates at 60, 10, 60, 30 deg -> sims .5, .985, .5, .866.
        let space = Space::new(&at(0.0), &[at(60.0), at(10.0), at(60.0), at(30.0)]);
        assert_eq!(top_similar(&space, 3), vec![1, 3, 2]);
        assert_eq!(top_similar(&space, 10), vec![1, 3, 2, 0]);
    }

    #[test]
    fn mmr_trades_relevance_for_diversity() {
        // doc at 0; A at 5 (best), B at 10 (close to A), C at -40 (far from A).
        // diversity 0.5: B scores .5*cos10 - .5*cos5 < 0, C scores .5*cos40 - .5*cos45 > 0 -> C.
        let space = Space::new(&at(0.0), &[at(5.0), at(10.0), at(-40.0)]);
        assert_eq!(mmr(&space, 2, 0.5), vec![0, 2]);
        // diversity 0 is plain ranking.
        assert_eq!(mmr(&space, 3, 0.0), vec![0, 1, 2]);
        // top_n larger than the candidates stops when they run out.
        assert_eq!(mmr(&space, 9, 0.5).len(), 3);
    }

    #[test]
    fn mmr_uses_the_nearest_chosen_keyword() {
        // doc 0; A 0 (first), B 90, C 45, D 80. diversity 0.5.
        // Step 2: C .5*cos45-.5*cos45 = 0; D .5*cos80-.5*cos80 = 0; B .5*0-.5*0 = 0 -> ties: first
        // remaining in index order, B.
        // Step 3 (A, B chosen): C: .5*.707-.5*max(.707,.707)=0; D: .5*.174-.5*max(.174,.985)<0 -> C.
        let space = Space::new(&at(0.0), &[at(0.0), at(90.0), at(45.0), at(80.0)]);
        assert_eq!(mmr(&space, 3, 0.5), vec![0, 1, 2]);
    }

    #[test]
    fn max_sum_picks_the_least_similar_pair_among_the_best() {
        // doc 0; sims: A(10) .985, B(15) .966, C(-50) .643, D(80) .174.
        // nr_candidates 3 keeps A, B, C (ascending: C, B, A); the least similar pair is C with A
        // or B: cos60 (C,A) = .5 > cos65 (C,B) = .42 -> (C, B), reported in ascending sim.
        let space = Space::new(&at(0.0), &[at(10.0), at(15.0), at(-50.0), at(80.0)]);
        assert_eq!(max_sum(&space, 2, 3), vec![2, 1]);
        // With all four, D(80) and C(-50) are 130 deg apart: the least similar pair, D first as
        // the less similar to the document.
        assert_eq!(max_sum(&space, 2, 4), vec![3, 2]);
        // Fewer candidates than top_n: nothing.
        assert!(max_sum(&space, 5, 20).is_empty());
    }

    #[test]
    fn combinations_follow_itertools_order() {
        let mut c = Combinations::new(4, 2);
        let mut all = Vec::new();
        while let Some(s) = c.next_slice() {
            all.push(s.to_vec());
        }
        let want = [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]];
        assert_eq!(all, want.map(|p| p.to_vec()));
        assert!(Combinations::new(2, 3).next_slice().is_none());
        assert_eq!(Combinations::new(3, 0).next_slice(), Some(&[][..]));
    }
}
