//! Chat routes (`/chat`, `/v1/chat/completions`), provided by the chat engine.
use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
}
