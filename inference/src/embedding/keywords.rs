//! `/keyword` (KeyBERT): candidates from `keyword::plan`, the document and the candidates embedded
//! through the queue, `keyword::select` ranking them (plain cosine, MMR or Max Sum).
use std::sync::Arc;

use super::{blocking, EmbedError, EmbeddingService};
use crate::keyword::{self as kw, Keyword, KeywordLimits, KeywordOptions};

impl EmbeddingService {
    /// The `top_n` keywords of `doc`. Embedding goes `chunk` inputs at a time (see
    /// [`EmbeddingService::embed_texts`]); planning and selection are CPU work bounded by the
    /// `--keyword-*` limits, run on the blocking pool.
    pub async fn keywords(
        self: &Arc<Self>,
        doc: String,
        opts: KeywordOptions,
        limits: KeywordLimits,
        chunk: usize,
    ) -> Result<Vec<Keyword>, EmbedError> {
        let (plan_opts, dims) = (opts.clone(), self.info.dimensions);
        let plan = blocking("keyword planning", move || {
            kw::plan(&doc, &plan_opts, &limits, dims)
        })
        .await??;
        if plan.candidates.is_empty() {
            return Ok(Vec::new());
        }
        // KeyBERT embeds through sentence-transformers, which truncates at max_seq_length.
        let texts = std::iter::once(&plan.doc)
            .chain(&plan.candidates)
            .cloned()
            .collect();
        let mut vectors = self.embed_texts(texts, chunk).await?.into_iter();
        let doc_vec = vectors.next().ok_or_else(|| EmbedError::Task {
            what: "keyword embedding",
            message: "no document embedding".into(),
        })?;
        let candidate_vecs: Vec<Vec<f32>> = vectors.collect();
        blocking("keyword selection", move || {
            kw::select(&plan, &doc_vec, &candidate_vecs, &opts)
        })
        .await
    }
}
