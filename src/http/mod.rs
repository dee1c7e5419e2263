//! The HTTP listener: `/` (the status page, HTML), `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (configuration loaded and
//! every database reachable) and `/status` (JSON: databases and jobs with their last
//! result and next run).

mod page;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::jobs::backup::newest_backups;
use crate::jobs::BackupSource;
use crate::status::Status;

/// Where the configured backups are, for the status page's list of recent backups;
/// the daemon sets it at every (re)load. Reading the manifests is the backup
/// library's ([`crate::jobs::backup::newest_backups`]).
#[derive(Clone, Default)]
pub struct BackupShelf(Arc<Mutex<Vec<BackupSource>>>);

impl BackupShelf {
    pub fn set(&self, sources: Vec<BackupSource>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = sources;
    }

    fn sources(&self) -> Vec<BackupSource> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    status: Status,
    backups: BackupShelf,
}

pub fn router(metrics: PrometheusHandle, status: Status, backups: BackupShelf) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(AppState {
            metrics,
            status,
            backups,
        })
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
        crate::metrics::render(&app.metrics),
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
    let sources = app.backups.sources();
    // Reading manifests touches the disk: keep it off the async workers.
    let backups = tokio::task::spawn_blocking(move || newest_backups(&sources, 10))
        .await
        .unwrap_or_default();
    let html = page::render(&app.status.snapshot(), &backups, chrono::Utc::now());
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn status_json(State(app): State<AppState>) -> Response {
    Json(app.status.snapshot()).into_response()
}
