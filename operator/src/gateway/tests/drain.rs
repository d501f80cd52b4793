//! Shutdown of a gateway over real sockets: readiness first, then the listener, then the
//! in-flight streams up to the drain deadline.

use super::*;

/// A gateway whose shutdown the test triggers; the chat upstream streams what the test pushes.
struct Stoppable {
    base: String,
    chunks: mpsc::Sender<Bytes>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn stoppable(drain: crate::gateway::Drain) -> Stoppable {
    let (chat, chunks_tx, _seen) = chat_upstream().await;
    let records = [record(
        "glm4",
        "glm-4-9b-chat",
        &[],
        format!("http://{chat}"),
        true,
    )];
    let readiness = Readiness::synced();
    let state = static_state(
        &records,
        pods(&[("glm4", &[chat])]),
        Duration::from_secs(1),
        1 << 20,
        readiness.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::gateway::lifecycle::serve_with_drain(
        listener,
        router(state),
        readiness,
        drain,
        async move {
            let _ = stop_rx.await;
        },
    ));
    Stoppable {
        base: format!("http://{addr}"),
        chunks: chunks_tx,
        stop,
        server,
    }
}

/// A client that opens a new connection per request: probes must not ride on a pooled one.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(TIMEOUT)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn poll_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_stream(base: &str) -> impl futures::Stream<Item = reqwest::Result<Bytes>> + Unpin {
    let response = fresh_client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "glm-4-9b-chat", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    Box::pin(response.bytes_stream())
}

#[tokio::test]
async fn shutdown_fails_readiness_then_lets_streams_finish() {
    let g = stoppable(crate::gateway::Drain {
        delay: Duration::from_millis(500),
        timeout: Duration::from_secs(30),
    })
    .await;
    let ready = |base: String| async move {
        match fresh_client().get(format!("{base}/ready")).send().await {
            Ok(r) => Some(r.status()),
            Err(_) => None,
        }
    };
    assert_eq!(ready(g.base.clone()).await, Some(StatusCode::OK));
    let mut stream = start_stream(&g.base).await;
    g.chunks
        .send(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_chunk(&mut stream).await, "data: 1\n\n");

    let _ = g.stop.send(());
    // Still accepting, but no longer ready: the Service withdraws the pod meanwhile.
    let base = g.base.clone();
    poll_until("/ready answers 503", || {
        let base = base.clone();
        async move { ready(base).await == Some(StatusCode::SERVICE_UNAVAILABLE) }
    })
    .await;
    // Then the listener closes ...
    poll_until("the listener closes", || {
        let base = base.clone();
        async move { ready(base).await.is_none() }
    })
    .await;
    // ... while the stream that began before goes on to its end.
    g.chunks
        .send(Bytes::from_static(b"data: 2\n\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_chunk(&mut stream).await, "data: 2\n\n");
    drop(g.chunks);
    let rest = tokio::time::timeout(TIMEOUT, stream.next()).await;
    assert!(
        matches!(rest, Ok(None)),
        "stream did not end cleanly: {rest:?}"
    );
    let served = tokio::time::timeout(TIMEOUT, g.server)
        .await
        .unwrap_or_else(|_| panic!("the gateway did not stop after draining"));
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
}

#[tokio::test]
async fn the_drain_deadline_cuts_a_stream_that_never_ends() {
    let g = stoppable(crate::gateway::Drain {
        delay: Duration::ZERO,
        timeout: Duration::from_millis(300),
    })
    .await;
    let mut stream = start_stream(&g.base).await;
    g.chunks
        .send(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_chunk(&mut stream).await, "data: 1\n\n");
    let _ = g.stop.send(());
    let served = tokio::time::timeout(TIMEOUT, g.server)
        .await
        .unwrap_or_else(|_| panic!("the drain deadline did not end the gateway"));
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
    // The upstream never finished: the client sees its stream end or fail, not hang.
    let rest = tokio::time::timeout(TIMEOUT, stream.next()).await;
    assert!(!matches!(rest, Ok(Some(Ok(_)))), "{rest:?}");
    drop(g.chunks);
}
