//! Recording a cacheable miss's answer as it streams to its client: for the store (complete
//! 200 answers only) and for the coalesced followers behind it. A stream watcher (see
//! `proxy::forward::watch`); a leaf of `proxy::cache`.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lumen_plugins::cache::flight::{Head, Leader};
use lumen_plugins::cache::store::Entry;
use lumen_plugins::cache::ClientControl;
use lumen_plugins::sse::{Assembler, Kind};

use super::plan::Plan;

/// Records a cacheable miss's answer as it streams to its client: for the store (when the
/// client allowed it) and for followers.
pub struct Fill {
    key: String,
    ttl: Duration,
    limit: usize,
    store: bool,
    leader: Option<Leader>,
    kind: Option<Kind>,
    status: u16,
    sse: bool,
    provider: String,
    assembler: Option<Assembler>,
    body: BytesMut,
    too_large: bool,
}

impl Fill {
    pub fn new(plan: &Plan, leader: Option<Leader>) -> Fill {
        Fill {
            key: plan.key.clone(),
            ttl: plan.policy.ttl,
            limit: plan.policy.max_entry_bytes,
            store: plan.control != ClientControl::Bypass,
            leader,
            kind: plan.api.kind(),
            status: 0,
            sse: false,
            provider: String::new(),
            assembler: None,
            body: BytesMut::new(),
            too_large: false,
        }
    }

    pub fn head(&mut self, status: u16, sse: bool, provider: &str) {
        self.status = status;
        self.sse = sse;
        self.provider = provider.to_string();
        if sse {
            // Streams are assembled into the non-stream answer (the stored shape).
            // SSE carries the answer two to three times over; the assembled body is checked
            // against the limit itself.
            self.assembler = self
                .kind
                .map(|k| Assembler::new(k, self.limit.saturating_mul(4)));
        }
        if let Some(leader) = self.leader.as_mut() {
            leader.head(Head {
                status,
                sse,
                provider: provider.to_string(),
            });
        }
    }

    pub fn chunk(&mut self, chunk: &Bytes) {
        if let Some(leader) = self.leader.as_mut() {
            leader.chunk(chunk);
        }
        if let Some(assembler) = self.assembler.as_mut() {
            assembler.push(chunk);
        } else if !self.sse && !self.too_large {
            if self.body.len().saturating_add(chunk.len()) > self.limit {
                self.too_large = true;
                self.body = BytesMut::new();
            } else {
                self.body.extend_from_slice(chunk);
            }
        }
    }

    /// The answer went out whole: completes the flight and returns what to store, if the
    /// answer is a complete success within the size limit.
    pub fn finish(self) -> Option<(String, Entry)> {
        let body: Option<Bytes> = if self.status != 200 {
            None
        } else if self.sse {
            self.assembler
                .and_then(Assembler::finish)
                .filter(|b| b.len() <= self.limit)
                .map(Bytes::from)
        } else if self.too_large || !is_json_object(&self.body) {
            None
        } else {
            Some(self.body.freeze())
        };
        if let Some(leader) = self.leader {
            leader.complete(body.clone());
        }
        let body = body.filter(|_| self.store)?;
        Some((self.key, Entry::new(body, self.ttl, &self.provider)))
    }
}

fn is_json_object(body: &[u8]) -> bool {
    body.first() == Some(&b'{') && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::sync::Arc;

    use lumen_plugins::cache::flight::{End, Flights, Join};
    use lumen_plugins::cache::{Api, CachePolicy, Scope, When};

    use super::*;

    const ANSWER: &[u8] = br#"{"id":"c1","object":"chat.completion","choices":[]}"#;
    const STREAM: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

    fn plan(stream: bool) -> Plan {
        Plan {
            key: "k".into(),
            policy: CachePolicy {
                ttl: Duration::from_secs(60),
                scope: Scope::Key,
                max_entry_bytes: 1 << 20,
                when: When::Always,
                charge_tokens: false,
            },
            control: ClientControl::Normal,
            api: Api::Chat,
            stream,
            include_usage: false,
            items: None,
        }
    }

    fn fill(status: u16, sse: bool, body: &[u8]) -> Option<(String, Entry)> {
        let mut fill = Fill::new(&plan(sse), None);
        fill.head(status, sse, "p");
        fill.chunk(&Bytes::copy_from_slice(body));
        fill.finish()
    }

    #[test]
    fn a_complete_200_answer_is_stored() {
        let (key, entry) = fill(200, false, ANSWER).unwrap();
        assert_eq!(key, "k");
        assert_eq!(&entry.body[..], ANSWER);
        assert!(
            fill(200, true, STREAM).is_some(),
            "a stream is stored assembled"
        );
    }

    #[test]
    fn a_non_200_answer_is_never_stored() {
        for status in [201, 206, 400, 404, 429, 500, 503] {
            assert!(fill(status, false, ANSWER).is_none(), "{status}");
            assert!(fill(status, true, STREAM).is_none(), "{status} stream");
        }
    }

    #[test]
    fn a_non_200_answer_fails_the_followers_instead_of_feeding_them() {
        let flights = Arc::new(Flights::new());
        let Join::Leader(leader) = flights.join("k", 1 << 20) else {
            panic!("the first request leads");
        };
        let Join::Follower(flight) = flights.join("k", 1 << 20) else {
            panic!("the second follows");
        };
        let mut fill = Fill::new(&plan(false), Some(leader));
        fill.head(503, false, "p");
        fill.chunk(&Bytes::from_static(br#"{"error":{"message":"busy"}}"#));
        assert!(fill.finish().is_none());
        let end = end_soon(&flight);
        assert!(
            matches!(end, Some(End::Complete(None)) | Some(End::Failed)),
            "followers get no body from an error answer"
        );
    }

    /// How the flight ended (waiting briefly).
    fn end_soon(flight: &lumen_plugins::cache::flight::Flight) -> Option<End> {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(flight.end(Duration::from_millis(100)))
    }
}
