//! `spec.source` parsing. The CRD's CEL rule refuses bad values at admission; this parser is the
//! second line for objects created before the rule existed.

use super::BuildError;

/// Where weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `hf://org/repo[@revision]`: downloaded by an init container.
    HuggingFace {
        repo: String,
        revision: Option<String>,
    },
    /// `pvc://claim[/path]`: an existing claim mounted read-only.
    Pvc { claim: String, path: String },
    /// Absolute path baked into the image.
    Local(String),
}

impl Source {
    pub fn parse(source: &str) -> Result<Self, BuildError> {
        let invalid = || BuildError::InvalidSource(source.to_owned());
        if let Some(rest) = source.strip_prefix("hf://") {
            let (repo, revision) = match rest.split_once('@') {
                Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_owned())),
                Some(_) => return Err(invalid()),
                None => (rest, None),
            };
            let (org, name) = repo.split_once('/').ok_or_else(invalid)?;
            if !is_hf_segment(org) || !is_hf_segment(name) {
                return Err(invalid());
            }
            return Ok(Self::HuggingFace {
                repo: repo.to_owned(),
                revision,
            });
        }
        if let Some(rest) = source.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !is_dns_label(claim) || path.split('/').any(|s| s == "..") {
                return Err(invalid());
            }
            return Ok(Self::Pvc {
                claim: claim.to_owned(),
                path: path.trim_end_matches('/').to_owned(),
            });
        }
        if source.starts_with('/') && !source.split('/').any(|s| s == "..") {
            return Ok(Self::Local(source.trim_end_matches('/').to_owned()));
        }
        Err(invalid())
    }
}

fn is_hf_segment(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
