//! What the gateway answers itself on the proxy listener, with no upstream: `/healthz`,
//! `/readyz`, and the model list built from the routing table.

use bytes::Bytes;
use http::{Method, StatusCode};

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

/// `Some` when `path` is one of ours (answered or refused here), `None` to go on.
pub fn answer(
    method: &Method,
    path: &str,
    config: &Snapshot,
) -> Option<Result<Reply, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let known =
        matches!(path, "/healthz" | "/readyz" | "/v1/models") || path.starts_with("/v1/models/");
    if !known {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
        }));
    }
    Some(match path {
        // Alive: the process answers.
        "/healthz" => Ok(Reply::json(
            StatusCode::OK,
            serde_json::json!({"status": "ok"}),
        )),
        // Ready: a config is loaded and serving (target health joins this with the health issue).
        "/readyz" => Ok(Reply::json(
            StatusCode::OK,
            serde_json::json!({"status": "ready", "config": config.source.hash}),
        )),
        "/v1/models" => Ok(Reply::json(
            StatusCode::OK,
            serde_json::json!({
                "object": "list",
                "data": config.routes.model_names().map(model_object).collect::<Vec<_>>(),
            }),
        )),
        _ => {
            let id = &path["/v1/models/".len()..];
            match config.routes.model_names().find(|m| *m == id) {
                Some(m) => Ok(Reply::json(StatusCode::OK, model_object(m))),
                None => Err(GatewayError::ModelNotFound(id.to_string())),
            }
        }
    })
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "lumen"})
}
