//! The accept loop: hyper HTTP/1.1 connections with the bounds `axum::serve` does not set.
//!
//! - `header_read_timeout`: a request's headers must arrive within it (hyper's timer; it runs from
//!   the connection's start or the end of its previous response, so it also closes idle
//!   keep-alive connections). Slow-loris clients trickling headers are cut off.
//! - `write_timeout`: a client that accepts no response bytes for this long (it stopped reading,
//!   e.g. a stalled stream consumer) loses its connection, which cancels its generation.
//! - `max_connections`: connections open at once; beyond it the server stops accepting (the
//!   kernel's backlog holds new ones) instead of running out of file descriptors.
//! - `shutdown_timeout`: after the shutdown signal, open connections (streams included) get this
//!   long to finish; the rest are closed.
//!
//! The body read timeout and admission control live in the router (`http::admission`), so that
//! they answer with the error envelope.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// Connection-level bounds (from the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then drain within the shutdown timeout.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        // Shutdown first: once signalled, no further connection is taken.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        // Small SSE events must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteTimeout::new(stream, config.write_timeout));
        let service = TowerToHyperService::new(app.clone());
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let open = config.max_connections.max(1) - slots.available_permits();
    tracing::info!(
        open_connections = open,
        deadline_secs = config.shutdown_timeout.as_secs(),
        "no longer accepting; waiting for open requests and streams"
    );
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        let open = config.max_connections.max(1) - slots.available_permits();
        tracing::warn!(
            open_connections = open,
            "shutdown deadline passed; closing the connections still open"
        );
    }
}

/// Errors of `accept` that concern one connection are skipped; others (out of file descriptors)
/// get a pause so that the loop does not spin (what `axum::serve` does).
async fn accept_error(e: io::Error) {
    let per_connection = matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    );
    if !per_connection {
        tracing::error!(error = %e, "accept failed; retrying in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A stream (a TCP connection) whose writes fail with `TimedOut` once a write has made no
/// progress for `timeout` (the client's receive window stayed full). Reads are not timed here:
/// hyper times request heads, the router times bodies, and a request being processed reads
/// nothing.
struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write is pending; reset by every write that makes progress.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            deadline: None,
        }
    }

    /// Track `poll` of a write operation: pending arms (or checks) the deadline, anything else
    /// disarms it.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.deadline = None;
            return poll;
        }
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.deadline = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client accepted no response bytes for {} s (--write-timeout-secs)",
                    timeout.as_secs()
                ),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    // In-memory pipes of 64 bytes and paused time: the tests are about the deadline's logic, not
    // about TCP buffers or a busy machine's scheduling.

    #[tokio::test(start_paused = true)]
    async fn writes_to_a_peer_that_stopped_reading_time_out() {
        let (server, _client) = duplex(64);
        let mut server = WriteTimeout::new(server, Duration::from_millis(300));
        let started = Instant::now();
        let err = server.write_all(&[b'x'; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("--write-timeout-secs"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_slowly_but_steadily_is_not_cut() {
        // 64 bytes every 100 ms: 16 KiB take 25 s, a hundred times the timeout, but no single
        // write waits longer than 100 ms.
        let (server, mut client) = duplex(64);
        let mut server = WriteTimeout::new(server, Duration::from_millis(250));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let started = Instant::now();
        server
            .write_all(&[b'y'; 16 << 10])
            .await
            .expect("no timeout while the peer reads");
        assert!(started.elapsed() > Duration::from_secs(20));
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), 16 << 10);
    }
}
