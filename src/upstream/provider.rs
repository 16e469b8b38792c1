//! What the gateway knows of one provider: where it is, how to call it, and how its health and
//! quota are judged ([`Provider`], [`ProbeSpec`], [`QuotaSpec`]). `config` builds these from the
//! YAML; routes, the health table and the forwarder read them. Plain data: it imports only
//! `resolve` (the provider's peer) and the circuit's settings.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use lumen_plugins::rate_limit::TokenLimit;

use crate::metrics::{ProviderSeries, Series};
use crate::upstream::health::circuit::CircuitConfig;
use crate::upstream::resolve::Resolver;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// An upstream, ready to connect to: URL parsed, peer options set, headers encoded.
pub struct Provider {
    pub name: String,
    /// `name` as a header value (`x-lumen-provider`), when it is a valid one.
    pub name_value: Option<HeaderValue>,
    /// The provider's Pingora peer, built once per resolved address (connections are pooled by
    /// the peer's hash, so requests share them).
    pub peer: Resolver,
    /// `Host` header value (host, plus the port when it is not the scheme's default).
    pub host: HeaderValue,
    /// The base URL's path without a trailing slash (`/openai/v1`); endpoint paths follow it.
    pub base_path: String,
    /// Each endpoint's request target here ([`Provider::path`]) parsed once, by
    /// [`crate::openai::Endpoint::index`]: a request without a query string clones it instead
    /// of parsing its path again (`None`: parsed per request).
    pub targets: [Option<http::Uri>; crate::openai::Endpoint::COUNT],
    /// The API the provider speaks: what a request to it is translated to, if anything.
    pub api: Api,
    /// The credential header: `Authorization: Bearer <api_key>` (`x-api-key: <api_key>` for
    /// `api: anthropic`), marked sensitive so it never shows in debug output.
    pub credential: Option<(HeaderName, HeaderValue)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub expose_models: bool,
    /// Active health probes; `None`: passive health only.
    pub probe: Option<ProbeSpec>,
    pub circuit: CircuitConfig,
    pub quota: QuotaSpec,
    /// Requests it takes at once before routes prefer their next target.
    pub max_in_flight: Option<u32>,
    /// Its per-attempt metric series, resolved on first use.
    pub series: Series<ProviderSeries>,
}

impl Provider {
    /// The path a request from a client of `endpoint` goes to here, without its query.
    pub fn path(&self, endpoint: crate::openai::Endpoint) -> String {
        endpoint_path(&self.base_path, self.api, endpoint)
    }
}

/// The path under `base_path` that a provider speaking `api` takes `endpoint`'s requests on.
pub fn endpoint_path(base_path: &str, api: Api, endpoint: crate::openai::Endpoint) -> String {
    use crate::openai::Endpoint;
    let suffix = match api {
        Api::Responses if endpoint == Endpoint::Responses => "/responses",
        Api::Openai | Api::Responses => endpoint.upstream_suffix(),
        Api::Anthropic => "/messages",
    };
    let mut path = String::with_capacity(base_path.len().saturating_add(24));
    path.push_str(base_path);
    path.push_str(suffix);
    path
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the API key or the extra headers (they may carry secrets too).
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("upstream", &self.peer.upstream)
            .field("base_path", &self.base_path)
            .finish_non_exhaustive()
    }
}

/// The API a provider speaks (`api:` in its config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// OpenAI's Chat Completions and the endpoints beside it (`/completions`, `/embeddings`,
    /// `/rerank`): OpenAI, Groq, DeepSeek, Together, Fireworks, the sidecar.
    #[default]
    #[serde(alias = "chat")]
    Openai,
    /// OpenAI's API with the Responses API (`POST /responses`) beside chat completions
    /// (OpenAI itself): a Responses request goes as it is (built-in tools, reasoning and the
    /// provider's own stored responses included); every other request as for `openai`.
    Responses,
    /// Anthropic's Messages API (`POST /messages`): a Messages request goes as it is, a chat
    /// (or Responses) request is translated to it and its answer back.
    Anthropic,
}

impl Api {
    /// Whether a request from a client of `endpoint`'s API reaches this provider in that API,
    /// untranslated.
    pub fn native_for(self, endpoint: crate::openai::Endpoint) -> bool {
        use crate::openai::Endpoint;
        match self {
            Api::Openai => !endpoint.translated(),
            Api::Responses => endpoint != Endpoint::Messages,
            Api::Anthropic => endpoint == Endpoint::Messages,
        }
    }
}

/// The `anthropic-version` a provider with `api: anthropic` is sent unless its `headers:` set
/// one.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// How a provider is probed.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    /// `None`: TCP connect only; else the path on the provider's host.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Any answer below 500 means reachable (the default `GET /models`: a key that may not
    /// list models, or a provider without the endpoint, still serves completions).
    pub lenient: bool,
}

/// A provider's configured quota, as window limits.
#[derive(Debug, Clone, Default)]
pub struct QuotaSpec {
    pub requests: Vec<TokenLimit>,
    pub tokens: Vec<TokenLimit>,
}

impl QuotaSpec {
    /// Window limits from a provider's `quota:` numbers (per minute and per day).
    pub fn new(
        requests_per_minute: Option<u64>,
        requests_per_day: Option<u64>,
        tokens_per_minute: Option<u64>,
        tokens_per_day: Option<u64>,
    ) -> QuotaSpec {
        let windows = |per_minute: Option<u64>, per_day: Option<u64>| {
            [(per_minute, MINUTE), (per_day, DAY)]
                .into_iter()
                .filter_map(|(limit, window)| limit.map(|limit| TokenLimit { limit, window }))
                .collect()
        };
        QuotaSpec {
            requests: windows(requests_per_minute, requests_per_day),
            tokens: windows(tokens_per_minute, tokens_per_day),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.tokens.is_empty()
    }
}
