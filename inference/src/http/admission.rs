//! Admission control. A request first has its body read whole, within `--max-body-bytes` and
//! `--body-read-timeout-secs`; only then does it take a concurrency permit (so that clients that
//! trickle bodies cannot hold permits), and the permit stays with the response body until that
//! is sent or dropped (so that a stream counts as in flight for its whole life, not only until
//! its headers).
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use crate::error::ApiError;

/// Which per-route pool a request draws from besides the global one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// Chat and embeddings: bounded by the global pool and their model's own queue.
    Inference,
    /// `/keyword`: `--max-concurrent-keyword`.
    Keyword,
    /// `/tokenize`, `/detokenize`: `--max-concurrent-tokenize`.
    Tokenize,
}

/// The permit pools.
#[derive(Debug, Clone)]
pub struct Pools {
    global: Pool,
    keyword: Pool,
    tokenize: Pool,
}

#[derive(Debug, Clone)]
struct Pool {
    permits: Arc<Semaphore>,
    limit: usize,
    flag: &'static str,
    what: &'static str,
}

impl Pool {
    fn new(limit: usize, flag: &'static str, what: &'static str) -> Self {
        Pool {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            flag,
            what,
        }
    }

    fn try_take(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::Overloaded(format!(
                "too many concurrent {} (limit {}, {}); retry later",
                self.what, self.limit, self.flag
            ))
        })
    }
}

impl Pools {
    pub fn new(global: usize, keyword: usize, tokenize: usize) -> Self {
        Pools {
            global: Pool::new(global, "--max-concurrent-requests", "requests"),
            keyword: Pool::new(keyword, "--max-concurrent-keyword", "/keyword requests"),
            tokenize: Pool::new(
                tokenize,
                "--max-concurrent-tokenize",
                "/tokenize and /detokenize requests",
            ),
        }
    }

    /// Permits in use in the global pool.
    pub fn in_flight(&self) -> usize {
        self.global.limit - self.global.permits.available_permits()
    }

    fn take(&self, class: RouteClass) -> Result<Vec<OwnedSemaphorePermit>, ApiError> {
        let route = match class {
            RouteClass::Inference => None,
            RouteClass::Keyword => Some(self.keyword.try_take()?),
            RouteClass::Tokenize => Some(self.tokenize.try_take()?),
        };
        let global = self.global.try_take()?;
        Ok(std::iter::once(global).chain(route).collect())
    }
}

/// Read the whole body under the size and time limits, then hand the request on with the body in
/// memory. A body that does not arrive in time is a 408 and the connection is closed.
pub async fn read_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return close(ApiError::PayloadTooLarge { limit }.into_response());
    }
    let (parts, body) = req.into_parts();
    let timeout = state.limits.body_read_timeout;
    let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    let bytes: Bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return close(ApiError::PayloadTooLarge { limit }.into_response())
        }
        Ok(Err(e)) => {
            return close(
                ApiError::BadRequest(format!("cannot read the request body: {e}")).into_response(),
            )
        }
        Err(_) => return close(ApiError::BodyTimeout(timeout.as_secs()).into_response()),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The connection cannot carry another request: the rest of this one's body is unread.
fn close(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Refuse with 503 while not ready (starting, shutting down), with 429 when the global pool or
/// the route's pool is empty; otherwise run the request holding its permits until its response
/// body is finished.
pub async fn admit(
    State((state, class)): State<(AppState, RouteClass)>,
    req: Request,
    next: Next,
) -> Response {
    if !state.is_ready() {
        return ApiError::Unavailable("the server is not ready (starting or shutting down)".into())
            .into_response();
    }
    let permits = match state.pools.take(class) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = next.run(req).await;
    resp.map(|body| {
        Body::new(Holding {
            body,
            _permits: permits,
        })
    })
}

/// A response body that keeps its request's permits until it is dropped.
struct Holding {
    body: Body,
    _permits: Vec<OwnedSemaphorePermit>,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
