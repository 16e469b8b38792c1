//! Prices and the cost of a request.
//!
//! `prices:` in the config (and the catalog a `prices_file:` names) give USD per million tokens
//! per provider and model: `input`, `output`, `cached_input` (prompt tokens read from the
//! provider's prompt cache), `reasoning` (where a provider bills a model's hidden reasoning
//! apart from its answer) and a `per_request` fee. USD per million tokens is micro-dollars per
//! token, so prices are kept in pico-dollars per token (exact to 10^-6 USD per million) and a
//! cost is summed in integers and rounded once, to the micro-dollar.
//!
//! A price is looked up by the provider's name and the model name the provider is sent (globs
//! allowed, so `gpt-4o-mini*` also prices the dated names a provider answers with): the
//! operator's entries first, in file order, then the catalog's. A target with no price costs
//! nothing (a local model) and `lumen check` says so.
//!
//! Imports: the plugins' budget units only.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use lumen_plugins::budget::Micros;
use lumen_plugins::sse::usage::UsageReport;
use serde::Deserialize;

/// Pico-dollars per micro-dollar (and per USD-per-million-tokens, per token: 10^6).
const PICO_PER_MICRO: u128 = 1_000_000;

/// Largest price accepted per million tokens, USD 100,000: keeps every sum far from overflow.
const MAX_PRICE_USD: f64 = 100_000.0;

/// One `prices:` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// The provider's name in `providers:`, or `*` for any.
    pub provider: String,
    /// The model name the provider is sent; globs with `*` and `?`. Default `*`.
    #[serde(default = "any")]
    pub model: String,
    /// USD per million prompt tokens.
    pub input: f64,
    /// USD per million completion tokens.
    pub output: f64,
    /// USD per million prompt tokens read from the provider's cache; default `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// USD per million reasoning tokens, where billed apart; default `output`.
    #[serde(default)]
    pub reasoning: Option<f64>,
    /// USD per request, on top of its tokens.
    #[serde(default)]
    pub per_request: Option<f64>,
}

fn any() -> String {
    "*".into()
}

/// A price catalog file (`prices_file:`), e.g. the bundled `conf/prices.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPriceFile {
    /// The day the prices were read off the providers' pages (`2026-11-01`).
    pub as_of: String,
    pub prices: Vec<RawPrice>,
}

/// A validated price, in pico-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    input: u64,
    output: u64,
    cached_input: u64,
    reasoning: u64,
    per_request: u64,
}

/// USD (per million tokens, or per request) as pico-dollars (per token, or micro-micro-dollars).
fn pico(usd: f64, scale: f64) -> Option<u64> {
    (usd.is_finite() && (0.0..=MAX_PRICE_USD).contains(&usd)).then(|| (usd * scale).round() as u64)
}

impl Price {
    /// Validates an entry; the error names the field.
    pub fn from_raw(raw: &RawPrice) -> Result<Price, String> {
        let field = |name: &str, usd: f64, scale: f64| {
            pico(usd, scale).ok_or_else(|| {
                format!("`{name}` must be from 0 to {MAX_PRICE_USD} USD (got {usd})")
            })
        };
        // USD per million tokens = micro-dollars per token = 10^6 pico-dollars per token.
        let per_token = 1e6;
        let input = field("input", raw.input, per_token)?;
        let output = field("output", raw.output, per_token)?;
        Ok(Price {
            input,
            output,
            cached_input: match raw.cached_input {
                Some(v) => field("cached_input", v, per_token)?,
                None => input,
            },
            reasoning: match raw.reasoning {
                Some(v) => field("reasoning", v, per_token)?,
                None => output,
            },
            per_request: match raw.per_request {
                Some(v) => field("per_request", v, 1e12)?,
                None => 0,
            },
        })
    }

    /// What `usage` costs, rounded to the nearest micro-dollar.
    pub fn cost(&self, usage: &UsageReport) -> Micros {
        let cached = usage.cached.min(usage.prompt);
        let reasoning = usage.reasoning.min(usage.completion);
        let parts = [
            (usage.prompt.saturating_sub(cached), self.input),
            (cached, self.cached_input),
            (usage.completion.saturating_sub(reasoning), self.output),
            (reasoning, self.reasoning),
        ];
        let pico = parts
            .iter()
            .fold(u128::from(self.per_request), |sum, (n, p)| {
                sum.saturating_add(u128::from(*n).saturating_mul(u128::from(*p)))
            });
        to_micros(pico.saturating_add(PICO_PER_MICRO / 2))
    }

    /// The most a request can cost with `prompt` prompt tokens and up to `completion` more,
    /// rounded up: what a budget reserves before the request is forwarded.
    pub fn worst_case(&self, prompt: u64, completion: u64) -> Micros {
        let pico = u128::from(prompt)
            .saturating_mul(u128::from(self.input.max(self.cached_input)))
            .saturating_add(
                u128::from(completion).saturating_mul(u128::from(self.output.max(self.reasoning))),
            )
            .saturating_add(u128::from(self.per_request));
        to_micros(pico.saturating_add(PICO_PER_MICRO.saturating_sub(1)))
    }
}

fn to_micros(pico: u128) -> Micros {
    u64::try_from(pico / PICO_PER_MICRO).unwrap_or(u64::MAX)
}

/// One entry of the table.
#[derive(Debug, Clone)]
struct Entry {
    provider: String,
    model: String,
    price: Price,
}

/// Every price of a config: the operator's entries, then the catalog's.
#[derive(Debug, Default)]
pub struct PriceTable {
    entries: Vec<Entry>,
    /// The catalog file and its date, when one is included.
    pub catalog: Option<(String, String)>,
}

impl PriceTable {
    /// Builds the table from the operator's entries and the catalog's (in that order of
    /// precedence); the error names the entry.
    pub fn build(
        operator: &[RawPrice],
        catalog: Option<(&str, &RawPriceFile)>,
    ) -> Result<PriceTable, String> {
        let mut entries = Vec::new();
        let lists = [
            ("prices", Some(operator)),
            ("catalog", catalog.map(|c| &c.1.prices[..])),
        ];
        for (name, list) in lists {
            for (i, raw) in list.unwrap_or_default().iter().enumerate() {
                if raw.provider.is_empty() || raw.model.is_empty() {
                    return Err(format!("{name}[{i}]: provider and model must not be empty"));
                }
                let price = Price::from_raw(raw).map_err(|e| format!("{name}[{i}]: {e}"))?;
                entries.push(Entry {
                    provider: raw.provider.clone(),
                    model: raw.model.clone(),
                    price,
                });
            }
        }
        Ok(PriceTable {
            entries,
            catalog: catalog.map(|(path, file)| (path.to_string(), file.as_of.clone())),
        })
    }

    /// The price of `model` at `provider`, if any entry matches.
    pub fn lookup(&self, provider: &str, model: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|e| {
                (e.provider == "*" || e.provider == provider)
                    && lumen_plugins::glob::glob_match(&e.model, model)
            })
            .map(|e| e.price)
    }

    /// Whether any entry prices models of `provider` (a pass-through target's names can only be
    /// priced by a glob).
    pub fn prices_provider(&self, provider: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.provider == "*" || e.provider == provider)
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn raw(provider: &str, model: &str, input: f64, output: f64) -> RawPrice {
        RawPrice {
            provider: provider.into(),
            model: model.into(),
            input,
            output,
            cached_input: None,
            reasoning: None,
            per_request: None,
        }
    }

    fn usage(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> UsageReport {
        UsageReport {
            prompt,
            completion,
            cached,
            reasoning,
        }
    }

    #[test]
    fn cost_is_exact_to_the_micro_dollar() {
        // gpt-4o-mini: $0.15 in, $0.60 out, $0.075 cached per million.
        let p = Price::from_raw(&RawPrice {
            cached_input: Some(0.075),
            ..raw("openai", "gpt-4o-mini*", 0.15, 0.60)
        })
        .unwrap();
        // 1M prompt tokens and 1M completion tokens: $0.75 exactly.
        assert_eq!(p.cost(&usage(1_000_000, 1_000_000, 0, 0)), 750_000);
        // Half the prompt from the cache: 0.5 × 0.15 + 0.5 × 0.075 + 0.60.
        assert_eq!(p.cost(&usage(1_000_000, 1_000_000, 500_000, 0)), 712_500);
        // 10 prompt tokens, 4 completion: 1.5 + 2.4 = 3.9 µ$, rounded to 4.
        assert_eq!(p.cost(&usage(10, 4, 0, 0)), 4);
        // A cached count above the prompt (a provider's quirk) is capped.
        assert_eq!(p.cost(&usage(10, 0, 99, 0)), 1);
        assert_eq!(p.worst_case(10, 4), 4);
        assert_eq!(p.worst_case(1, 0), 1, "worst case rounds up");
    }

    #[test]
    fn reasoning_and_request_fees_are_priced_apart() {
        let p = Price::from_raw(&RawPrice {
            reasoning: Some(10.0),
            per_request: Some(0.001),
            ..raw("x", "*", 1.0, 2.0)
        })
        .unwrap();
        // 100 in ($1/M), 50 out of which 20 reasoning: 100 + 30×2 + 20×10 + 1000 µ$.
        assert_eq!(p.cost(&usage(100, 50, 0, 20)), 100 + 60 + 200 + 1000);
        // The worst case prices every completion token at the dearer rate.
        assert_eq!(p.worst_case(100, 50), 100 + 500 + 1000);
    }

    #[test]
    fn the_operator_wins_over_the_catalog_and_globs_match_dated_names() {
        let catalog = RawPriceFile {
            as_of: "2026-11-01".into(),
            prices: vec![
                raw("openai", "gpt-4o-mini*", 0.15, 0.60),
                raw("*", "*", 9.0, 9.0),
            ],
        };
        let table = PriceTable::build(
            &[raw("openai", "gpt-4o-mini", 0.10, 0.40)],
            Some(("prices.yaml", &catalog)),
        )
        .unwrap();
        let cost = |p: &str, m: &str| {
            table
                .lookup(p, m)
                .map(|p| p.cost(&usage(1_000_000, 0, 0, 0)))
        };
        assert_eq!(cost("openai", "gpt-4o-mini"), Some(100_000));
        assert_eq!(cost("openai", "gpt-4o-mini-2024-07-18"), Some(150_000));
        assert_eq!(cost("groq", "llama"), Some(9_000_000));
        assert_eq!(table.catalog.as_ref().unwrap().1, "2026-11-01");
    }

    #[test]
    fn bad_prices_are_refused_with_their_place() {
        for bad in [-1.0, f64::NAN, 1e9] {
            let err = PriceTable::build(&[raw("a", "*", bad, 1.0)], None).unwrap_err();
            assert!(err.starts_with("prices[0]: `input`"), "{err}");
        }
    }
}
