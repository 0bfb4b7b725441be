//! The admin server: Prometheus `/metrics`, `/healthz` and `/readyz`.
use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::metrics::Prometheus;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}; choose another --metrics-addr (or `off`)")]
pub struct AdminError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the admin server; returns the bound address and the serving future.
/// Readiness: probes attached and, with Kubernetes, metadata caches synced.
pub type Ready = Arc<std::sync::atomic::AtomicBool>;

pub async fn bind(
    addr: SocketAddr,
    prometheus: Arc<Prometheus>,
    ready: Ready,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| AdminError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(std::sync::atomic::Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "starting: probes or metadata not ready\n",
                    )
                }
            }),
        )
        .with_state(prometheus);
    let serve = async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "admin server stopped");
        }
    };
    Ok((bound, serve))
}

async fn metrics(State(prometheus): State<Arc<Prometheus>>) -> impl IntoResponse {
    match prometheus.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
