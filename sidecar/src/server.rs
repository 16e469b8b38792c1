//! The HTTP server: routes and the operational endpoints (`/health`, `/metrics`,
//! `/v1/models`). The OpenAI endpoints live in `completions` and `embeddings`; the state they
//! share lives in `app`.
//!
//! The listener is bound before any model loads, so `/health` answers 503 `loading` from the
//! first moment and a supervisor can tell "starting" from "dead".

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::app::App;
use crate::config::Pooling;
use crate::engine::{Capability, EngineFailure};
use crate::error::ApiError;
use crate::{completions, embeddings, metrics, tokens};

/// Largest request body accepted; far above any prompt that fits these models' contexts.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// After SIGTERM/SIGINT, in-flight responses get this long to finish before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/rerank", post(embeddings::rerank))
        .route("/rerank", post(embeddings::rerank))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .fallback(|uri: Uri| async move { ApiError::NotFound(uri.path().to_string()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Serves until SIGINT/SIGTERM, or until an engine fails (then returns that failure, so the
/// process exits non-zero and its supervisor restarts it).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    mut failures: mpsc::Receiver<EngineFailure>,
) -> Result<(), EngineFailure> {
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(async {
        shutdown_signal().await;
        tracing::info!("shutting down");
        tokio::spawn(async {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::warn!("grace period over; exiting with responses still open");
            std::process::exit(0);
        });
    });
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "server error");
            }
            Ok(())
        }
        Some(failure) = failures.recv() => Err(failure),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn kind_name(c: Capability) -> &'static str {
    match c {
        Capability::Chat => "chat",
        Capability::Embed(Pooling::Rank) => "rerank",
        Capability::Embed(_) => "embedding",
    }
}

/// 503 `{"status":"loading"}` until every model is loaded; then 200 with each model's slots.
async fn health(State(app): State<Arc<App>>) -> Response {
    let mut models = serde_json::Map::new();
    let mut all_loaded = true;
    for (alias, m) in &app.models {
        let loaded = m.metrics.loaded.load(Relaxed);
        all_loaded &= loaded;
        let total = m.metrics.slots_total.load(Relaxed);
        let busy = m.metrics.slots_busy.load(Relaxed);
        let mut entry = json!({
            "loaded": loaded,
            "kind": kind_name(m.capability),
            "slots_total": total,
            "slots_busy": busy,
            "slots_free": total.saturating_sub(busy),
            "queue_depth": m.metrics.queue_depth.load(Relaxed),
        });
        if m.capability == Capability::Chat {
            // The conversations the slots' caches hold, for the gateway's prefix affinity.
            let prefixes: Vec<String> = m
                .metrics
                .cached_prefixes
                .lock()
                .map(|p| p.iter().map(|h| format!("{h:016x}")).collect())
                .unwrap_or_default();
            entry["prefixes"] = json!(prefixes);
        }
        models.insert(alias.clone(), entry);
    }
    let (status, word) = if all_loaded {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (
        status,
        axum::Json(json!({"status": word, "models": models})),
    )
        .into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let body = metrics::render(
        app.models
            .iter()
            .map(|(alias, m)| (alias.as_str(), m.metrics.as_ref())),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn list_models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<_> = app
        .models
        .values()
        .map(|m| {
            json!({
                "id": m.alias,
                "object": "model",
                "created": app.started(),
                "owned_by": "lumen-llama",
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
