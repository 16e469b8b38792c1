//! Conversation prefixes, named the way the gateway names them, so that it can send each
//! conversation to the sidecar whose cache already holds it (its `prefix_affinity` routes).
//!
//! A chat's messages are hashed as a chain: `h(k) = first 8 bytes of SHA-256(h(k-1) as 8
//! little-endian bytes, role, 0, text, 0)`, from `h(0) = 0`, where `text` is the message's
//! string content, or its text parts joined (other parts and `null` count as empty). `h(k)`
//! names the conversation's first `k` messages. Each slot remembers the chain of the request it
//! last served, and `/health` lists every slot's hashes: the gateway computes the same chain for
//! a request and prefers the sidecar that holds its longest prefix. A hash is a routing hint,
//! never trusted for correctness: the slot still compares tokens (see `engine::generate`).

use sha2::{Digest, Sha256};

use crate::api::{ChatMessage, Content};

/// Most prefix hashes kept per request (a longer conversation is matched on its first ones).
pub const MAX_CHAIN: usize = 64;

/// The chain of hashes of `messages`' prefixes: `[h(1), h(2), …]`.
pub fn chain(messages: &[ChatMessage]) -> Vec<u64> {
    let mut previous = 0u64;
    messages
        .iter()
        .take(MAX_CHAIN)
        .map(|m| {
            let mut d = Sha256::new();
            d.update(previous.to_le_bytes());
            d.update(m.role.as_bytes());
            d.update([0]);
            match &m.content {
                None => {}
                Some(Content::Text(t)) => d.update(t.as_bytes()),
                Some(Content::Parts(parts)) => {
                    for p in parts.iter().filter(|p| p.kind == "text") {
                        d.update(p.text.as_deref().unwrap_or("").as_bytes());
                    }
                }
            }
            d.update([0]);
            let digest = d.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            previous = u64::from_le_bytes(first);
            previous
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway's `routing::affinity` tests pin the same values: the two must agree.
    #[test]
    fn the_chain_matches_the_gateways() {
        let messages: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}]"#,
        )
        .unwrap();
        let c = chain(&messages);
        assert_eq!(c, vec![0x74c7_32f8_13d5_e8df, 0xab1c_84b2_f333_67a4]);
    }
}
