//! The HTTP listener: `/` (the status page, HTML), `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (configuration loaded and
//! every database reachable) and `/status` (JSON: databases and jobs with their last
//! result and next run).

mod page;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    status: Status,
}

pub fn router(metrics: PrometheusHandle, status: Status) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(AppState { metrics, status })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!("HTTP listener stopped: {e}");
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(app): State<AppState>) -> Response {
    match app.status.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        )
            .into_response(),
    }
}

async fn status_page(State(app): State<AppState>) -> Response {
    let status = app.status.clone();
    // Reading manifests touches the disk: keep it off the async workers.
    let backups = tokio::task::spawn_blocking(move || status.recent_backups(10))
        .await
        .unwrap_or_default();
    let html = page::render(&app.status.snapshot(), &backups, chrono::Utc::now());
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn status_json(State(app): State<AppState>) -> Response {
    Json(app.status.snapshot()).into_response()
}
