//! Loading Hugging Face `tokenizer.json` files the way the reference libraries use them.
use std::path::Path;

use crate::models::ModelError;

/// Load `tokenizer.json` from a model folder with its own padding and truncation switched off:
/// sentence-transformers and transformers' chat path truncate by themselves and never pad a single
/// input, and some snapshots (all-MiniLM-L6-v2) ship padding/truncation settings that would change ids.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let file = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| ModelError::load(&file, format!("cannot load tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| ModelError::load(&file, format!("cannot disable truncation: {e}")))?;
    Ok(tok)
}
