//! Sending one request to a model's pods: pick a pod, send, retry on another pod when the
//! connection fails or the pod answers 503/429 (nothing has reached the client yet then), and
//! stream the chosen response back unbuffered.

use std::time::Instant;

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderMap, HeaderName, Method, StatusCode},
    response::Response,
};
use futures::StreamExt;

use super::{
    balancer::{hash_of, Lease, Pick},
    error::GatewayError,
    hold::labels,
    metrics::{GaugeGuard, RequestTimer},
    proxy::GatewayState,
    routing::Route,
};

/// What the client sent, ready to be sent again on a retry.
pub struct Outgoing<'a> {
    pub method: Method,
    pub headers: &'a HeaderMap,
    pub path_and_query: &'a str,
    pub body: Bytes,
    pub pick: Pick,
}

/// A pod's answer, with the claims that must live as long as its body.
pub struct Answer {
    response: reqwest::Response,
    lease: Lease,
}

/// Sends to the pods in `pods` (refreshed from the index before each retry), at most
/// `--gateway-max-attempts` times, each time on a pod not tried yet. When every attempt got
/// 503/429 the last pod's answer is passed through (it carries the pod's envelope and
/// Retry-After); when connections failed the error says how many attempts were made.
pub async fn send_with_retries(
    state: &GatewayState,
    route: &Route,
    mut pods: Vec<String>,
    out: &Outgoing<'_>,
) -> Result<Answer, GatewayError> {
    let labels = labels(route);
    let mut tried: Vec<String> = Vec::new();
    let mut last_error = None;
    loop {
        let Some(lease) = state.balancer().pick(&pods, &tried, out.pick) else {
            break;
        };
        tried.push(lease.address().to_owned());
        let untried_left = pods.iter().any(|p| !tried.contains(p));
        let may_retry = tried.len() < state.max_attempts() && untried_left;
        let started = Instant::now();
        let sent = send_once(state, route, lease.address(), out).await;
        state
            .metrics()
            .upstream_duration(&labels, started.elapsed().as_secs_f64());
        match sent {
            Ok(response) if may_retry && is_busy(response.status()) => {
                tracing::debug!(model = %route.source, pod = lease.address(), status = %response.status(), "pod busy: retrying on another");
            }
            Ok(response) => return Ok(Answer { response, lease }),
            // Refused, reset or closed before any answer: nothing reached the client. A pod gone
            // silent (timeout) may be generating, so that one is not sent twice.
            Err(err) if may_retry && !err.is_timeout() => {
                state
                    .metrics()
                    .upstream_error(&route.served_name, "connect");
                tracing::debug!(model = %route.source, pod = lease.address(), error = %error_chain(&err), "connection failed: retrying on another pod");
                last_error = Some(err);
            }
            Err(err) => {
                return Err(upstream_error(state, route, &err, tried.len()));
            }
        }
        state.metrics().retry(&labels);
        drop(lease);
        pods = state.ready_pods(route).unwrap_or(pods);
    }
    Err(match last_error {
        Some(err) => upstream_error(state, route, &err, tried.len()),
        None => GatewayError::HoldTimeout {
            model: route.served_name.clone(),
            waited: std::time::Duration::ZERO,
        },
    })
}

fn is_busy(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

async fn send_once(
    state: &GatewayState,
    route: &Route,
    pod: &str,
    out: &Outgoing<'_>,
) -> reqwest::Result<reqwest::Response> {
    let base = state.upstream_base(route, pod);
    // Concatenate rather than Url::join so an endpoint with a path prefix keeps it.
    let url = format!("{}{}", base.trim_end_matches('/'), out.path_and_query);
    let mut headers = forwardable(out.headers);
    headers.remove(header::CONTENT_LENGTH);
    tracing::debug!(model = %route.source, %url, "forwarding");
    state
        .client()
        .request(out.method.clone(), url)
        .headers(headers)
        .body(out.body.clone())
        .send()
        .await
}

fn upstream_error(
    state: &GatewayState,
    route: &Route,
    err: &reqwest::Error,
    attempts: usize,
) -> GatewayError {
    let model = route.served_name.clone();
    let reason = error_chain(err);
    if attempts > 1 {
        state.metrics().upstream_error(&model, "exhausted");
        return GatewayError::AllAttemptsFailed {
            model,
            attempts,
            reason,
        };
    }
    if err.is_connect() {
        state.metrics().upstream_error(&model, "connect");
        GatewayError::UpstreamUnreachable { model, reason }
    } else if err.is_timeout() {
        state.metrics().upstream_error(&model, "timeout");
        GatewayError::UpstreamTimeout { model, reason }
    } else {
        state.metrics().upstream_error(&model, "request");
        GatewayError::UpstreamFailed { model, reason }
    }
}

/// Streams the pod's answer back as it arrives. The lease, the in-flight gauge and the timer
/// live as long as the body: they end when the stream ends or the client goes away (which drops
/// the upstream response and closes its connection, cancelling the generation).
pub fn stream_back(
    state: &GatewayState,
    route: &Route,
    answer: Answer,
    in_flight: GaugeGuard,
    timer: RequestTimer,
) -> Response {
    let Answer { response, lease } = answer;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = forwardable(response.headers());
    // The body is re-chunked by our server; a stale length would corrupt the framing.
    headers.remove(header::CONTENT_LENGTH);
    let metrics = state.metrics().clone();
    let model = route.served_name.clone();
    let held = (lease, in_flight, timer);
    let body = response.bytes_stream().map(move |chunk| {
        let _held = &held;
        chunk.inspect_err(|err| {
            metrics.upstream_error(&model, "body");
            tracing::warn!(model = %model, error = %error_chain(err), "upstream body failed mid-stream");
        })
    });
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// The `PrefixHash` key of a chat request: the first `chars` characters of its messages'
/// contents, in order. `None` when the body has no messages.
pub fn prompt_key(body: &[u8], chars: usize) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let messages = value.get("messages")?.as_array()?;
    let mut prefix = String::new();
    for message in messages {
        match message.get("content") {
            Some(serde_json::Value::String(text)) => prefix.push_str(text),
            Some(serde_json::Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .for_each(|t| prefix.push_str(t)),
            _ => {}
        }
        if prefix.chars().count() >= chars {
            break;
        }
    }
    let prefix: String = prefix.chars().take(chars).collect();
    (!prefix.is_empty()).then(|| hash_of(&prefix))
}

/// End-to-end headers: everything except hop-by-hop ones (RFC 9110 §7.6.1) and `Host`.
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            *name != header::HOST
                && !HOP_BY_HOP.contains(&name.as_str())
                && !named_by_connection.contains(name)
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// reqwest's Display hides the cause ("error sending request"); the chain says why.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_key_hashes_the_first_characters_of_the_messages() {
        let a = br#"{"messages":[{"role":"system","content":"You are kind."},{"role":"user","content":"hi"}]}"#;
        let b = br#"{"messages":[{"role":"system","content":"You are kind."},{"role":"user","content":"bye"}]}"#;
        assert_eq!(prompt_key(a, 13), prompt_key(b, 13));
        assert_ne!(prompt_key(a, 15), prompt_key(b, 15));
        let parts =
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"You are kind."}]}]}"#;
        assert_eq!(prompt_key(parts, 13), prompt_key(a, 13));
        assert_eq!(prompt_key(br#"{"input":"x"}"#, 10), None);
        assert_eq!(prompt_key(br#"{"messages":[]}"#, 10), None);
    }
}
