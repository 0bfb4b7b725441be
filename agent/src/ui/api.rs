//! HTTP endpoints of the live view, merged into the admin server:
//!
//! - `GET /` — the page (HTML, CSS and JS embedded in the binary).
//! - `GET /api/graph?window=60|300|900` — nodes and edges with requests,
//!   errors, rate, error rate, p50/p99 (ms) over the window; each node's
//!   routes; each edge's recent errors.
//! - `GET /api/traces?service=&route=&status=&min_ms=&limit=` — recent
//!   traces (newest first, at most 200) with a span matching every filter;
//!   `status` is `error`, `ok` or a status prefix (`5`, `404`).
//! - `GET /api/traces/{trace_id}` — that trace's kept spans with their
//!   exported attributes (404 when none is kept).
//!
//! Read-only; the JSON shapes are documented in docs/ui.md.
use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde::Deserialize;

use super::{traces, Live};

/// The page: one file, no external assets.
const PAGE: &str = include_str!("page.html");

/// Windows the map offers (seconds).
pub const WINDOWS: [u64; 3] = [60, 300, 900];

pub fn router(live: Live) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/graph", get(graph))
        .route("/api/traces", get(search))
        .route("/api/traces/{id}", get(trace))
        .with_state(live)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn bad_request(why: String) -> Response {
    (StatusCode::BAD_REQUEST, why + "\n").into_response()
}

#[derive(Deserialize)]
struct Window {
    window: Option<u64>,
}

async fn graph(State(live): State<Live>, Query(w): Query<Window>) -> Response {
    let window = w.window.unwrap_or(300);
    if !WINDOWS.contains(&window) {
        return bad_request(format!("window must be one of {WINDOWS:?} (seconds)"));
    }
    json(&live.graph(window))
}

async fn search(State(live): State<Live>, Query(q): Query<traces::Query>) -> Response {
    if q.limit.is_some_and(|l| l == 0 || l > traces::MAX_LIST) {
        return bad_request(format!("limit must be 1..={}", traces::MAX_LIST));
    }
    json(&live.search(&q))
}

async fn trace(State(live): State<Live>, Path(id): Path<String>) -> Response {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad_request("a trace id is 32 hex digits".into());
    }
    let spans = live.trace(&id.to_ascii_lowercase());
    if spans.is_empty() {
        return (StatusCode::NOT_FOUND, "no span of this trace is kept\n").into_response();
    }
    json(&spans)
}
