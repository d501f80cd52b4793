//! Optional API keys, from a Secret the gateway watches (never read per request): every data
//! entry is one key, named by its data key. Requests carry `Authorization: Bearer <key>`; the
//! key is compared in constant time against every configured key, and counted by its *name*.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use k8s_openapi::api::core::v1::Secret;
use kube::{runtime::watcher, Api};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::{error::GatewayError, lifecycle::Readiness, metrics::GatewayMetrics};

/// `(name, key)` pairs.
type Keys = Arc<Vec<(String, Vec<u8>)>>;

/// The configured keys, or none (authentication off).
#[derive(Clone, Debug)]
pub struct ApiKeys(Option<watch::Receiver<Keys>>);

impl ApiKeys {
    /// Every request is let through.
    pub fn disabled() -> Self {
        Self(None)
    }

    /// Keys that change with the channel (the Secret watch, or a test).
    pub fn watched(keys: watch::Receiver<Keys>) -> Self {
        Self(Some(keys))
    }

    /// Checks the request's bearer key; counts it by key name.
    pub fn check(&self, headers: &HeaderMap, metrics: &GatewayMetrics) -> Result<(), GatewayError> {
        let Some(keys) = &self.0 else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default()
            .as_bytes();
        let keys = Arc::clone(&keys.borrow());
        // No early exit: every key is compared, so timing tells nothing about which matched.
        let mut matched: Option<&str> = None;
        for (name, key) in keys.iter() {
            let equal: bool = key.as_slice().ct_eq(presented).into();
            if equal && !presented.is_empty() {
                matched = Some(name);
            }
        }
        match matched {
            Some(name) => {
                metrics.api_key(name, "accepted");
                Ok(())
            }
            None => {
                metrics.api_key("", "rejected");
                Err(GatewayError::Unauthorized)
            }
        }
    }
}

/// The keys of a Secret: each data entry, trailing whitespace (a newline from `echo`) removed.
pub fn keys_of(secret: Option<&Secret>) -> Vec<(String, Vec<u8>)> {
    let Some(data) = secret.and_then(|s| s.data.as_ref()) else {
        return Vec::new();
    };
    data.iter()
        .map(|(name, value)| (name.clone(), value.0.trim_ascii_end().to_vec()))
        .filter(|(_, key)| !key.is_empty())
        .collect()
}

/// `NAMESPACE/NAME` of `--gateway-api-keys-secret`.
pub fn parse_secret_ref(raw: &str) -> Result<(String, String), String> {
    raw.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .ok_or_else(|| format!("--gateway-api-keys-secret {raw:?}: expected NAMESPACE/NAME"))
}

/// Watches the one Secret; a missing Secret means no valid key (every request gets 401: fail
/// closed).
pub async fn maintain_keys(
    api: Api<Secret>,
    name: String,
    keys: watch::Sender<Keys>,
    metrics: GatewayMetrics,
    readiness: Readiness,
) {
    super::watch::reflect(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
        metrics,
        |secrets| {
            let next = keys_of(secrets.first().map(Arc::as_ref));
            if next.is_empty() {
                tracing::warn!(secret = %name, "API key Secret missing or empty: every request is refused");
            }
            keys.send_replace(Arc::new(next));
        },
        || readiness.mark_keys_synced(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = auth.parse() {
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn bearer_keys_are_checked_and_counted_by_name() {
        let metrics = GatewayMetrics::new().unwrap_or_else(|e| panic!("{e}"));
        let (_tx, rx) = watch::channel(Arc::new(vec![
            ("team-a".to_owned(), b"sk-aaa".to_vec()),
            ("team-b".to_owned(), b"sk-bbb".to_vec()),
        ]));
        let keys = ApiKeys::watched(rx);
        assert!(keys.check(&headers("Bearer sk-bbb"), &metrics).is_ok());
        for bad in ["Bearer sk-bb", "Bearer sk-bbbb", "sk-bbb", "Bearer ", ""] {
            assert!(
                matches!(
                    keys.check(&headers(bad), &metrics),
                    Err(GatewayError::Unauthorized)
                ),
                "{bad:?}"
            );
        }
        let text = metrics.render().unwrap_or_default();
        assert!(
            text.contains(
                r#"glm_gateway_api_key_requests_total{key="team-b",outcome="accepted"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("sk-"), "a key leaked into metrics: {text}");
        assert!(ApiKeys::disabled()
            .check(&HeaderMap::new(), &metrics)
            .is_ok());
    }

    #[test]
    fn secret_entries_become_named_keys() {
        let secret: Secret = serde_yaml::from_str(
            "metadata: {name: keys}\ndata: {team-a: c2stYWFhCg==, empty: ''}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            keys_of(Some(&secret)),
            [("team-a".to_owned(), b"sk-aaa".to_vec())]
        );
        assert!(keys_of(None).is_empty());
        assert_eq!(
            parse_secret_ref("glm-system/keys"),
            Ok(("glm-system".into(), "keys".into()))
        );
        assert!(parse_secret_ref("keys").is_err());
    }
}
