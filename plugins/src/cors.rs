//! CORS: lets browser apps call the gateway from the origins an operator lists.
//!
//! Closed by default: with no `cors:` section no CORS header is ever sent, so browsers refuse
//! cross-origin calls. `allow_origins: ["*"]` opens it to every origin (what a public demo wants;
//! not combinable with `allow_credentials`, which browsers would reject anyway). Preflights
//! (`OPTIONS` with `Access-Control-Request-Method`) are answered here and never reach auth or
//! an upstream; a preflight from an origin that is not allowed gets 403.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, ORIGIN, VARY,
};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use serde::Deserialize;

use crate::{error_body, Decision};

/// The `cors:` section of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `"*"` for any.
    pub allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a browser may send; `"*"` echoes whatever the preflight asks for.
    #[serde(default = "default_headers")]
    pub allow_headers: Vec<String>,
    /// Response headers a browser script may read.
    #[serde(default = "default_expose")]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer.
    #[serde(default = "default_max_age")]
    pub max_age: u32,
    #[serde(default)]
    pub allow_credentials: bool,
}

fn default_methods() -> Vec<String> {
    ["GET", "POST", "DELETE", "OPTIONS"]
        .map(String::from)
        .to_vec()
}

fn default_headers() -> Vec<String> {
    [
        "authorization",
        "content-type",
        "x-api-key",
        "x-request-id",
        "openai-beta",
    ]
    .map(String::from)
    .to_vec()
}

fn default_expose() -> Vec<String> {
    [
        "x-request-id",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "retry-after",
    ]
    .map(String::from)
    .to_vec()
}

fn default_max_age() -> u32 {
    600
}

/// A config value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CorsError {
    #[error("allow_origins must not be empty (leave out the `cors:` section to keep CORS closed)")]
    NoOrigins,
    #[error("allow_origins \"*\" cannot be combined with allow_credentials: true")]
    WildcardWithCredentials,
    #[error("`{0}` is not a valid header value")]
    BadValue(String),
}

/// The compiled policy: header values encoded once, at config load.
#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
    credentials: bool,
}

fn join(values: &[String]) -> Result<Option<HeaderValue>, CorsError> {
    if values.is_empty() {
        return Ok(None);
    }
    let joined = values.join(", ");
    HeaderValue::from_str(&joined)
        .map(Some)
        .map_err(|_| CorsError::BadValue(joined))
}

impl Cors {
    pub fn new(config: CorsConfig) -> Result<Cors, CorsError> {
        if config.allow_origins.is_empty() {
            return Err(CorsError::NoOrigins);
        }
        let any_origin = config.allow_origins.iter().any(|o| o == "*");
        if any_origin && config.allow_credentials {
            return Err(CorsError::WildcardWithCredentials);
        }
        let echo_headers = config.allow_headers.iter().any(|h| h == "*");
        Ok(Cors {
            any_origin,
            origins: config
                .allow_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            methods: join(&config.allow_methods)?.unwrap_or(HeaderValue::from_static("POST")),
            headers: if echo_headers {
                None
            } else {
                join(&config.allow_headers)?
            },
            expose: join(&config.expose_headers)?,
            max_age: HeaderValue::from(config.max_age),
            credentials: config.allow_credentials,
        })
    }

    /// The `Access-Control-Allow-Origin` value for this request's origin, if it is allowed.
    fn allowed_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_origin {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?.to_ascii_lowercase();
        self.origins.contains(&text).then(|| origin.clone())
    }
}

impl Cors {
    /// Called once the request head is read, before authentication: a preflight is answered
    /// here.
    pub fn on_request(&self, req: &http::request::Parts) -> Decision {
        let is_preflight = req.method == Method::OPTIONS
            && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        if !is_preflight {
            return Decision::Continue;
        }
        let allowed = req
            .headers
            .get(ORIGIN)
            .and_then(|origin| self.allowed_origin(origin));
        let mut builder = Response::builder();
        let Some(allow_origin) = allowed else {
            let response = builder
                .status(StatusCode::FORBIDDEN)
                .header(VARY, "Origin")
                .header(CONTENT_TYPE, "application/json")
                .body(error_body(
                    "this origin is not allowed by the gateway's CORS policy",
                    "invalid_request_error",
                    "cors_origin_not_allowed",
                ));
            return response.map_or(Decision::Continue, Decision::Respond);
        };
        builder = builder
            .status(StatusCode::NO_CONTENT)
            .header(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin)
            .header(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone())
            .header(ACCESS_CONTROL_MAX_AGE, self.max_age.clone())
            .header(VARY, "Origin, Access-Control-Request-Headers");
        let requested = req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(headers) = self.headers.clone().or_else(|| requested.cloned()) {
            builder = builder.header(ACCESS_CONTROL_ALLOW_HEADERS, headers);
        }
        if self.credentials {
            builder = builder.header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        builder
            .body(Vec::new())
            .map_or(Decision::Continue, Decision::Respond)
    }

    /// Called before the response head is written, for every response (success or error):
    /// the headers pushed onto `add` are appended to it.
    pub fn on_response(
        &self,
        req: &http::request::Parts,
        add: &mut Vec<(HeaderName, HeaderValue)>,
    ) {
        // The answer depends on the origin whenever not every origin is allowed: say so, so a
        // shared cache never serves one origin's answer to another.
        if !self.any_origin {
            add.push((VARY, HeaderValue::from_static("Origin")));
        }
        let Some(origin) = req.headers.get(ORIGIN) else {
            return;
        };
        let Some(allow_origin) = self.allowed_origin(origin) else {
            return;
        };
        add.push((ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin));
        if let Some(expose) = &self.expose {
            add.push((ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone()));
        }
        if self.credentials {
            add.push((
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        Cors::new(CorsConfig {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_methods: default_methods(),
            allow_headers: default_headers(),
            expose_headers: default_expose(),
            max_age: 600,
            allow_credentials: false,
        })
        .unwrap()
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/v1/chat/completions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn preflight_from_allowed_origin_is_answered_at_the_edge() {
        let req = request(
            Method::OPTIONS,
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let Decision::Respond(resp) = cors(&["https://app.example"]).on_request(&req) else {
            panic!("preflight not answered");
        };
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            resp.headers()[ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        assert!(resp.headers()[ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .contains("authorization"));
    }

    #[test]
    fn preflight_from_other_origin_is_refused() {
        let req = request(
            Method::OPTIONS,
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let Decision::Respond(resp) = cors(&["https://app.example"]).on_request(&req) else {
            panic!("preflight not answered");
        };
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert!(resp.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[test]
    fn responses_carry_headers_only_for_allowed_origins() {
        let policy = cors(&["https://app.example"]);
        let mut add = Vec::new();
        policy.on_response(
            &request(Method::POST, &[("origin", "https://evil.example")]),
            &mut add,
        );
        assert!(!add.iter().any(|(k, _)| k == ACCESS_CONTROL_ALLOW_ORIGIN));
        assert!(
            add.iter().any(|(k, _)| k == VARY),
            "caches must key on the origin"
        );
        policy.on_response(
            &request(Method::POST, &[("origin", "https://app.example")]),
            &mut add,
        );
        assert!(add
            .iter()
            .any(|(k, v)| k == ACCESS_CONTROL_ALLOW_ORIGIN && v == "https://app.example"));
        assert!(add.iter().any(|(k, _)| k == VARY));
    }

    #[test]
    fn wildcard_opens_to_all_but_not_with_credentials() {
        let mut add = Vec::new();
        cors(&["*"]).on_response(
            &request(Method::POST, &[("origin", "https://x.example")]),
            &mut add,
        );
        assert!(add
            .iter()
            .any(|(k, v)| k == ACCESS_CONTROL_ALLOW_ORIGIN && v == "*"));
        let err = Cors::new(CorsConfig {
            allow_origins: vec!["*".into()],
            allow_methods: default_methods(),
            allow_headers: default_headers(),
            expose_headers: default_expose(),
            max_age: 1,
            allow_credentials: true,
        })
        .unwrap_err();
        assert!(matches!(err, CorsError::WildcardWithCredentials));
    }

    #[test]
    fn non_preflight_requests_continue() {
        let req = request(Method::POST, &[("origin", "https://app.example")]);
        assert!(matches!(cors(&["*"]).on_request(&req), Decision::Continue));
    }
}
