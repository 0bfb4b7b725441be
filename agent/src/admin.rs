//! The admin server: Prometheus `/metrics`, `/healthz` and `/readyz`, and
//! with `--ui` the live map and trace view (`/`, `/api/*`, see [`crate::ui`]).
//!
//! `/healthz` fails (503, with the reason) when a supervised stage died or
//! stalled ([`crate::health`]): a liveness probe then restarts the agent.
//! `/readyz` is ready once probes are attached and metadata synced, and
//! while every stage is healthy.
use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::{health::Health, metrics::Prometheus};

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
    health: Health,
    ui: Option<Router>,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| AdminError { addr, source })?;
    let h = health.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(move || async move { healthz(&h) }))
        .route("/readyz", get(move || async move { readyz(&ready, &health) }))
        .with_state(prometheus);
    let app = match ui {
        Some(ui) => app.merge(ui),
        None => app,
    };
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

fn healthz(health: &Health) -> (StatusCode, String) {
    let problems = health.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", problems.join("; ")),
        )
    }
}

fn readyz(ready: &Ready, health: &Health) -> (StatusCode, String) {
    let problems = health.problems();
    if !problems.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    } else if ready.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: probes or metadata not ready\n".to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_names_the_stage_that_stopped_and_readyz_follows() {
        let health = Health::default();
        let ready: Ready = Arc::default();
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let hb = health.stage("correlate");
        assert_eq!(healthz(&health).0, StatusCode::OK);
        assert_eq!(readyz(&ready, &health).0, StatusCode::OK);
        hb.fail("input channel closed");
        let (code, body) = healthz(&health);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("correlate stage stopped: input channel closed"), "{body}");
        assert_eq!(readyz(&ready, &health).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
