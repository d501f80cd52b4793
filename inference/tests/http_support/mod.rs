//! Start the real `glm-inference` binary on a free loopback port and talk to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_glm-inference");

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real all-MiniLM-L6-v2 snapshot (`scripts/fetch-models.sh` puts it in `.models/`).
pub fn minilm_dir() -> PathBuf {
    let models = std::env::var_os("GLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".models"));
    let dir = models.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set GLM_MODELS_DIR)",
        dir.display()
    );
    dir
}

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("GLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures"))
}

pub fn fixture_json(rel: &str) -> serde_json::Value {
    let path = fixtures_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} missing ({e}); set GLM_FIXTURES_DIR",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    log: mpsc::Receiver<String>,
}

impl Server {
    /// Start with MiniLM served as `minilm` plus `extra` flags; waits until it listens.
    pub fn minilm(extra: &[&str]) -> Server {
        let model = format!("minilm={}", minilm_dir().display());
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        Server::start(&args, &[])
    }

    /// Start on a free loopback port with these flags and environment variables.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let listen = ["--host", "127.0.0.1", "--port", "0"];
        Server::spawn(&[&listen[..], args].concat(), env)
    }

    /// Start with exactly these flags and variables (no listen flags added; the caller sets
    /// `API_HOST` / `API_PORT` or the flags itself).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        for var in ["GLM_MODELS", "GLM_MODEL", "API_KEY", "API_PORT", "API_HOST"] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn glm-inference");
        let (tx, log) = mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        break addr
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string();
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "server did not start listening; output:\n{}",
                        seen.join("\n")
                    );
                }
            }
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        Server {
            child,
            base,
            client,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        read(req.send().await.expect("request")).await
    }

    /// POST a body the server refuses before reading it all (over `--max-body-bytes`). A server
    /// answers 413 and closes while such a body is still arriving, so the upload may fail with a
    /// broken pipe; reqwest then loses the response. Over a raw socket the response is read while
    /// the body is written, as curl does.
    pub async fn post_oversized(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://").to_string();
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let writer = tokio::spawn(async move {
            // The server may stop reading once it has decided; a write error is expected then.
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(&body).await;
            let _ = wr.shutdown().await;
        });
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut raw)).await;
        writer.abort();
        // A reset after the response arrived still leaves the response in `raw`.
        if let Ok(Err(e)) = &read {
            assert!(!raw.is_empty(), "no response to an oversized body: {e}");
        }
        assert!(read.is_ok(), "no response to an oversized body within 60 s");
        parse_http_response(&raw)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        read(
            self.client
                .get(self.url(path))
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM to this server (by its pid) and wait for it to exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn read(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, body)
}

/// Status and JSON body of a raw HTTP/1.1 response with a Content-Length body.
fn parse_http_response(raw: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let body =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string()));
    (status, body)
}

/// Assert an OpenAI error envelope with the given status.
pub fn assert_envelope(status: u16, body: &serde_json::Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
    assert!(e["type"].is_string(), "{what}: no type: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {body}"
    );
}

/// Run a binary to completion (for starts that must fail); returns status and stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(BIN)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env_remove("GLM_MODELS")
        .env_remove("GLM_MODEL")
        .output()
        .expect("run glm-inference");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
