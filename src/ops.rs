//! What the gateway answers itself on the proxy listener, with no upstream: the probes
//! `/healthz` and `/readyz` (no auth), and the model list built from the routing table (only
//! the models the caller may use).

use bytes::Bytes;
use http::{Method, StatusCode};

use lumen_plugins::auth::Principal;

use crate::config::Snapshot;
use crate::error::GatewayError;

/// A complete JSON answer.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    fn json(status: StatusCode, value: serde_json::Value) -> Reply {
        Reply {
            status,
            body: Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
        }
    }
}

/// Probes answered before authentication: `Some` for `/healthz` and `/readyz`.
pub fn answer_probe(
    method: &Method,
    path: &str,
    config: &Snapshot,
) -> Option<Result<Reply, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if !matches!(path, "/healthz" | "/readyz") {
        return None;
    }
    if let Err(e) = only_get(method, path) {
        return Some(Err(e));
    }
    Some(Ok(match path {
        // Alive: the process answers.
        "/healthz" => Reply::json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        // Ready: a config is loaded and serving (target health joins this with the health issue).
        _ => Reply::json(
            StatusCode::OK,
            serde_json::json!({"status": "ready", "config": config.source.hash}),
        ),
    }))
}

/// The model list for an authenticated caller: `Some` for `/v1/models` and `/v1/models/{id}`.
/// Only the models the caller may use are listed or found.
pub fn answer(
    method: &Method,
    path: &str,
    config: &Snapshot,
    principal: &Principal,
) -> Option<Result<Reply, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path != "/v1/models" && !path.starts_with("/v1/models/") {
        return None;
    }
    if let Err(e) = only_get(method, path) {
        return Some(Err(e));
    }
    let mut visible = config.routes.model_names().filter(|m| principal.may_use(m));
    Some(match path {
        "/v1/models" => Ok(Reply::json(
            StatusCode::OK,
            serde_json::json!({
                "object": "list",
                "data": visible.map(model_object).collect::<Vec<_>>(),
            }),
        )),
        _ => {
            let id = &path["/v1/models/".len()..];
            match visible.find(|m| *m == id) {
                Some(m) => Ok(Reply::json(StatusCode::OK, model_object(m))),
                None => Err(GatewayError::ModelNotFound(id.to_string())),
            }
        }
    })
}

fn only_get(method: &Method, path: &str) -> Result<(), GatewayError> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    Err(GatewayError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_string(),
    })
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "lumen"})
}
