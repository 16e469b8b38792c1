//! The provider's side of the wire: the request head Lumen sends (path, host, credentials, the
//! client's headers less those never forwarded), writing it, and the response head the client
//! gets from the provider's (only the headers that describe the answer). A leaf of `forward`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use std::time::Duration;

use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::Stream;
use pingora::ErrorType;
use tokio::io::AsyncWriteExt;

use super::answer::{Answer, Head};
use crate::error::{GatewayError, RequestError};
use crate::openai::{body_with_usage, Endpoint, LlmRequest};
use crate::proxy::ctx::X_REQUEST_ID;
use crate::routing::Target;
use crate::translate::{messages_provider, TranslateError};
use crate::upstream::provider::{Api, Provider};

/// Request headers never passed on to a provider: hop-by-hop headers, headers we set
/// ourselves, and the client's credentials (the gateway authenticates clients; providers only
/// ever see the provider key).
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "authorization",
    "x-api-key",
    // A worker's one-time job token, and when its job was queued: for this process only.
    "x-lumen-job-token",
    "x-lumen-job-queued-us",
    "api-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "x-goog-api-key",
    "x-request-id",
    // We read usage from responses, so ask for them uncompressed.
    "accept-encoding",
    // `Expect: 100-continue` is answered at the edge (the body is already read): a provider's
    // interim `100 Continue` must never be taken for its answer.
    "expect",
];

/// Response headers passed from a provider to the client: what describes the answer itself.
/// Everything else (cookies, `server`, the provider's organisation, its `x-ratelimit-*` for our
/// provider key, framing of its connection to us) stays behind: the client's rate-limit
/// headers are Lumen's own, set once.
const RETURNED: [HeaderName; 7] = [
    http::header::CONTENT_TYPE,
    http::header::CONTENT_ENCODING,
    http::header::CACHE_CONTROL,
    http::header::RETRY_AFTER,
    HeaderName::from_static("retry-after-ms"),
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-version"),
];

/// The provider's own request id, returned under this name (for support tickets with the
/// provider); `x-request-id` is Lumen's.
const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-lumen-upstream-request-id");

/// The body a target gets, in the API its provider speaks: the client's request (its model
/// replaced, usage asked for on streams) for an OpenAI-compatible provider; for one that
/// speaks the Messages API, a Messages request's own body (its model replaced), or a chat (or
/// Responses) request translated to Messages. With it, the request fields this target is not
/// given (its API has no place for them).
pub(super) fn target_body(
    req: &LlmRequest,
    target: &Target,
) -> Result<(Vec<Bytes>, Vec<&'static str>), GatewayError> {
    let provider = &target.provider;
    if let Some(e) = unsuited(req, target) {
        return Err(invalid(e));
    }
    match (provider.api, req.endpoint) {
        // The client's own API: nothing left out.
        (Api::Responses, Endpoint::Responses) => {
            return Ok((native_responses(req, target)?, Vec::new()))
        }
        // Chat completions: what translating a Responses or Messages request left out.
        (Api::Openai | Api::Responses, _) => {
            return Ok((
                body_with_usage(req, target.model_json.as_ref()),
                req.dropped.clone(),
            ))
        }
        (Api::Anthropic, _) => {}
    }
    let mut dropped = Vec::new();
    let model = target_model(req, target);
    let body = match (req.endpoint, req.original.as_deref()) {
        (Endpoint::Messages, Some(original)) => {
            let mut body = original.clone();
            if let Some(o) = body.as_object_mut() {
                o.insert("model".into(), serde_json::Value::from(model));
            }
            body
        }
        (Endpoint::ChatCompletions | Endpoint::Responses, _) => {
            let chat: serde_json::Value = serde_json::from_slice(&req.raw)
                .map_err(|e| GatewayError::Internal(format!("chat body: {e}")))?;
            let (body, left_out) = messages_provider::request(&chat, &model).map_err(invalid)?;
            // A Responses request lost some fields on its way to chat, and more on to Messages.
            dropped.extend(req.dropped.iter().copied());
            for field in left_out {
                if !dropped.contains(&field) {
                    dropped.push(field);
                }
            }
            body
        }
        (other, _) => {
            return Err(GatewayError::Internal(format!(
                "a /{} request reached a Messages API target",
                other.label()
            )))
        }
    };
    let bytes = serde_json::to_vec(&body)
        .map_err(|e| GatewayError::Internal(format!("messages body: {e}")))?;
    Ok((vec![Bytes::from(bytes)], dropped))
}

/// Why `target` cannot take `req` at all (its provider's API cannot carry it): such a target is
/// passed over, not tried. A Responses request only the Responses API can serve (a built-in
/// tool), or a Messages request only the Messages API can (a server tool, a document block),
/// needs a provider that speaks that API; a provider that speaks the Messages API takes chat,
/// Responses and Messages requests only.
pub(super) fn unsuited(req: &LlmRequest, target: &Target) -> Option<TranslateError> {
    let provider = &target.provider;
    if let Some(e) = &req.untranslatable {
        if !provider.api.native_for(req.endpoint) {
            return Some((**e).clone());
        }
    }
    let chat_like = matches!(
        req.endpoint,
        Endpoint::ChatCompletions | Endpoint::Responses | Endpoint::Messages
    );
    if provider.api == Api::Anthropic && !chat_like {
        return Some(TranslateError::unsupported(
            "model",
            format!(
                "the route's target `{}` speaks the Messages API, which has no /{} endpoint",
                provider.name,
                req.endpoint.label()
            ),
        ));
    }
    None
}

fn invalid(e: TranslateError) -> GatewayError {
    GatewayError::Request(RequestError::Translate(e))
}

/// The model a target names (the client's when it names none).
pub(super) fn target_model(req: &LlmRequest, target: &Target) -> String {
    target
        .model_json
        .as_ref()
        .and_then(|m| serde_json::from_slice::<String>(m).ok())
        .unwrap_or_else(|| req.model.clone())
}

/// A Responses request to a provider that speaks the Responses API: the client's request, its
/// model replaced. A conversation stored here (`previous_response_id` of a response this
/// gateway kept) goes as its items before the input, since the provider has never seen it.
fn native_responses(req: &LlmRequest, target: &Target) -> Result<Vec<Bytes>, GatewayError> {
    let Some(original) = req.original.as_deref() else {
        return Err(GatewayError::Internal(
            "a Responses request without its body".into(),
        ));
    };
    let mut body = original.clone();
    if let Some(o) = body.as_object_mut() {
        o.insert(
            "model".into(),
            serde_json::Value::from(target_model(req, target)),
        );
        if let Some(history) = req.history.as_deref() {
            let mut input = history.clone();
            match o.remove("input") {
                Some(serde_json::Value::Array(items)) => input.extend(items),
                Some(serde_json::Value::String(text)) => {
                    input.push(serde_json::json!({"role": "user", "content": text}))
                }
                _ => {}
            }
            o.insert("input".into(), serde_json::Value::Array(input));
            o.remove("previous_response_id");
        }
    }
    let bytes = serde_json::to_vec(&body)
        .map_err(|e| GatewayError::Internal(format!("responses body: {e}")))?;
    Ok(vec![Bytes::from(bytes)])
}

/// Builds the provider's request head: its path, host and credentials, the client's other
/// headers, our request id, and the attempt's W3C trace context (`traceparent` and maybe
/// `tracestate`) when the request is traced.
pub(super) fn upstream_request(
    client: &RequestHeader,
    provider: &Provider,
    req: &LlmRequest,
    body: &[Bytes],
    request_id: &HeaderValue,
    trace: Option<(HeaderValue, Option<HeaderValue>)>,
) -> Result<RequestHeader, GatewayError> {
    let internal =
        |e: pingora::BError| GatewayError::Internal(format!("building upstream request: {e}"));
    let query = client.uri.query().filter(|q| !q.is_empty());
    let mut parts = match (query, target_for(provider, req.endpoint)) {
        // Most requests: the target parsed when the config was loaded.
        (None, Some(uri)) => {
            let mut parts = http::Request::new(()).into_parts().0;
            parts.method = Method::POST;
            parts.uri = uri.clone();
            parts
        }
        _ => {
            let mut path = provider.path(req.endpoint);
            if let Some(query) = query {
                append_query(&mut path, query);
            }
            // No header-case map: field names go out lowercase (as in HTTP/2), which saves
            // an allocation per header and a second map per request.
            let head = RequestHeader::build_no_case(Method::POST, path.as_bytes(), None)
                .map_err(internal)?;
            http::request::Parts::from(head)
        }
    };
    // The headers go straight into `http`'s map: Pingora's `append_header` would parse every
    // name again (see `ctx::edit_headers`). The path is origin-form, which the URI carries
    // byte for byte, so nothing is lost on the way out and back.
    let map = &mut parts.headers;
    map.reserve(client.headers.len().saturating_add(6));
    // A Messages client's `anthropic-version` / `anthropic-beta` describe its own API: they
    // go to a provider that speaks it, not with the chat completions request others get.
    let translated = !provider.api.native_for(req.endpoint);
    for (name, value) in client.headers.iter() {
        let name_str = name.as_str();
        let theirs = translated && name_str.starts_with("anthropic-");
        if !NOT_FORWARDED.contains(&name_str) && !theirs {
            map.append(name.clone(), value.clone());
        }
    }
    let length: usize = body.iter().map(Bytes::len).sum();
    map.insert(HOST, provider.host.clone());
    map.insert(CONTENT_LENGTH, HeaderValue::from(length));
    if !map.contains_key(CONTENT_TYPE) {
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    map.insert(X_REQUEST_ID, request_id.clone());
    if let Some((parent, state)) = trace {
        map.insert(TRACEPARENT, parent);
        match state {
            Some(state) => map.insert(TRACESTATE, state),
            None => map.remove(TRACESTATE),
        };
    }
    if let Some((name, value)) = &provider.credential {
        map.insert(name.clone(), value.clone());
    }
    for (name, value) in &provider.headers {
        map.insert(name.clone(), value.clone());
    }
    Ok(RequestHeader::from(parts))
}

/// The target `provider` takes `endpoint`'s requests on, parsed when its config was loaded.
fn target_for(provider: &Provider, endpoint: Endpoint) -> Option<&http::Uri> {
    provider.targets.get(endpoint.index())?.as_ref()
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Query parameters that carry a client's credential (Azure-style `?api-key=`, `?key=`):
/// like the `Authorization` header, they are for the gateway, never for a provider.
const CREDENTIAL_PARAMS: &[&str] = &[
    "api-key",
    "api_key",
    "apikey",
    "key",
    "access_token",
    "token",
];

/// Appends `query` to `path` without credential parameters.
pub(super) fn append_query(path: &mut String, query: &str) {
    let mut first = true;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if CREDENTIAL_PARAMS
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
        {
            continue;
        }
        path.push(if first { '?' } else { '&' });
        path.push_str(pair);
        first = false;
    }
}

/// The client's response head made from a provider's: the provider's status and the headers
/// in [`RETURNED`], in Lumen's own HTTP version (Pingora writes it), never the provider's.
pub(super) fn client_head(upstream: &Head) -> pingora::Result<Box<ResponseHeader>> {
    // Built in `http`'s map, with no header-case map (as for the provider's request):
    // lowercase field names, parsed once (`ctx::edit_headers` says why).
    // One pass over the provider's headers (a handful) rather than a lookup per name kept.
    let mut map = HeaderMap::with_capacity(RETURNED.len().saturating_add(8));
    let mut length = None;
    let mut request_id = None;
    for (name, value) in upstream.headers.iter() {
        if RETURNED.contains(name) {
            map.append(name.clone(), value.clone());
        } else if name == CONTENT_LENGTH {
            length = length.or(Some(value));
        } else if name == X_REQUEST_ID {
            request_id = request_id.or(Some(value));
        }
    }
    // A JSON answer keeps its length (so the client sees a complete body, or a dropped
    // connection); a stream's is removed by the caller, which may change it.
    // Without a length the body is chunked to the client, whatever the provider's framing
    // (close-delimited would end the client's keep-alive connection).
    match length {
        Some(length) => map.insert(CONTENT_LENGTH, length.clone()),
        None => map.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        ),
    };
    if let Some(id) = request_id.filter(|v| v.len() <= 256) {
        map.insert(UPSTREAM_REQUEST_ID, id.clone());
    }
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = upstream.status;
    parts.headers = map;
    Ok(Box::new(ResponseHeader::from(parts)))
}

/// Bodies up to this size go out in one write with their head (most chat requests). Beyond
/// it, copying the body next to the head would cost more than the write it saves.
const ONE_WRITE_MAX: usize = 64 * 1024;

/// Writes the request on `stream` (HTTP/1.1: head and body in one write up to
/// [`ONE_WRITE_MAX`]: one syscall and one segment) and returns its answer to read.
/// `timeout` bounds each write and each read.
pub(super) async fn write_request(
    mut stream: Stream,
    head: &RequestHeader,
    body: &[Bytes],
    timeout: Duration,
) -> pingora::Result<Answer> {
    let wire = http_req_header_to_wire(head).ok_or_else(|| {
        pingora::Error::explain(ErrorType::InvalidHTTPHeader, "request head not writable")
    })?;
    let length = body
        .iter()
        .map(Bytes::len)
        .fold(0usize, usize::saturating_add);
    let written = pingora_timeout::timeout(timeout, async {
        if length <= ONE_WRITE_MAX {
            let mut bytes = BytesMut::with_capacity(wire.len().saturating_add(length));
            bytes.extend_from_slice(&wire);
            for piece in body {
                bytes.extend_from_slice(piece);
            }
            stream.write_all(&bytes).await?;
        } else {
            stream.write_all(&wire).await?;
            for piece in body {
                stream.write_all(piece).await?;
            }
        }
        stream.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(Answer::new(stream, timeout)),
        Ok(Err(e)) => Err(pingora::Error::because(
            ErrorType::WriteError,
            "while writing the request",
            e,
        )),
        Err(_) => pingora::Error::e_explain(ErrorType::WriteTimedout, "writing the request"),
    }
}

/// Reads a whole (small) response body, failing above `limit` bytes.
pub(super) async fn read_all(upstream: &mut Answer, limit: usize) -> Result<Bytes, ()> {
    let mut body = BytesMut::new();
    while let Some(chunk) = upstream.read_body().await.map_err(|_| ())? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::{append_query, client_head, target_for, upstream_request, Head};
    use crate::openai::Endpoint;
    use bytes::Bytes;
    use http::HeaderValue;
    use pingora::http::{RequestHeader, ResponseHeader};

    /// The target parsed at load is each API's path for each endpoint, under that endpoint's
    /// index; a request without a query goes to it, one with a query to the path built again
    /// with the query, less the client's credentials.
    #[test]
    fn the_upstream_target_is_the_providers_path_and_the_query_less_credentials() {
        let yaml = r#"
providers:
  chat: { base_url: "http://127.0.0.1:9/openai/v1/", health: { enabled: false } }
  resp: { base_url: "http://127.0.0.1:9/v1", api: responses, health: { enabled: false } }
  msgs: { base_url: "http://127.0.0.1:9/anthropic/v1", api: anthropic, health: { enabled: false } }
routes:
  - { model: m, targets: [ { provider: chat } ] }
"#;
        let snapshot = crate::config::parse(yaml, "test.yaml", |_| None).unwrap();
        let body =
            Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let req = crate::openai::parse(Endpoint::ChatCompletions, body.clone()).unwrap();
        let id = HeaderValue::from_static("req-1");
        for (name, chat_path) in [
            ("chat", "/openai/v1/chat/completions"),
            ("resp", "/v1/chat/completions"),
            ("msgs", "/anthropic/v1/messages"),
        ] {
            let provider = &snapshot.providers[name];
            for endpoint in Endpoint::ALL {
                let target = target_for(provider, endpoint).map(|u| u.to_string());
                assert_eq!(target, Some(provider.path(endpoint)), "{name} {endpoint:?}");
            }
            for (client_path, query) in [
                ("/v1/chat/completions", ""),
                ("/v1/chat/completions?", ""),
                ("/v1/chat/completions?api-key=sk-x", ""),
                (
                    "/v1/chat/completions?api-version=2024&key=sk-x&x=1",
                    "?api-version=2024&x=1",
                ),
            ] {
                let client = RequestHeader::build("POST", client_path.as_bytes(), None).unwrap();
                let head = upstream_request(
                    &client,
                    provider,
                    &req,
                    std::slice::from_ref(&body),
                    &id,
                    None,
                )
                .unwrap();
                let expected = format!("{chat_path}{query}");
                assert_eq!(head.raw_path(), expected.as_bytes(), "{name} {client_path}");
            }
        }
    }

    #[test]
    fn the_client_gets_only_the_headers_that_describe_the_answer() {
        let mut up = ResponseHeader::build(201, None).unwrap();
        for (name, value) in [
            ("Content-Type", "application/json"),
            ("Set-Cookie", "session=secret"),
            ("x-request-id", "req-1"),
            ("x-request-id", "req-2"),
            ("Content-Length", "12"),
            ("x-ratelimit-remaining-requests", "3"),
            ("openai-organization", "org-x"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "private"),
            ("retry-after-ms", "20"),
        ] {
            up.append_header(name, value).unwrap();
        }
        let head = client_head(&Head {
            status: up.status,
            headers: up.headers.clone(),
        })
        .unwrap();
        assert_eq!(head.status.as_u16(), 201);
        let mut kept: Vec<(String, String)> = head
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        kept.sort();
        let expected = [
            ("cache-control", "no-cache"),
            ("cache-control", "private"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("retry-after-ms", "20"),
            ("x-lumen-upstream-request-id", "req-1"),
        ];
        assert_eq!(
            kept,
            expected
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .to_vec()
        );

        // No length: chunked to the client; an overlong provider id is not passed on.
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.append_header("x-request-id", "x".repeat(300)).unwrap();
        let head = client_head(&Head {
            status: up.status,
            headers: up.headers.clone(),
        })
        .unwrap();
        assert_eq!(head.headers["transfer-encoding"], "chunked");
        assert_eq!(head.headers.len(), 1);
    }

    #[test]
    fn credential_query_parameters_are_never_forwarded() {
        let mut path = String::from("/v1/chat/completions");
        append_query(
            &mut path,
            "api-version=2024-06-01&api-key=sk-secret&KEY=x&user=7",
        );
        assert_eq!(path, "/v1/chat/completions?api-version=2024-06-01&user=7");
        let mut path = String::from("/p");
        append_query(&mut path, "api_key=s");
        assert_eq!(path, "/p");
    }
}
