//! Prefix affinity: a chat request goes to the target whose prompt cache already holds the
//! longest part of its conversation, so a sidecar reuses its KV cache instead of reading the
//! whole history again (routes with `prefix_affinity: true`; the strategy decides otherwise).
//!
//! A conversation is named by a chain of hashes, one per message: `h(k) = first 8 bytes of
//! SHA-256(h(k-1) as 8 little-endian bytes, role, 0, text, 0)` from `h(0) = 0`, where `text` is
//! the string content or the text parts joined (anything else counts as empty). The sidecar
//! hashes what it serves the same way and lists the hashes its slots hold in `/health`
//! (`sidecar/src/affinity.rs`; the tests of both pin the same values). Providers remember what
//! was reported and what this node sent them (`upstream::health::prefixes`).
//!
//! Holding only the leading instructions (system and developer messages) does not count: many
//! conversations share them, and a sidecar that answered one would otherwise draw every new
//! conversation to itself as soon as its health answer listed the shared system prompt (the
//! other sidecars get that prompt from their own first request, and copy it between slots).

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Most messages hashed (as the sidecar: a longer conversation is matched on its first ones).
const MAX_CHAIN: usize = 64;

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// A chat's prefix hashes (`chain[k-1]` names its first `k` messages), and how many of its
/// first messages are instructions that many conversations share.
#[derive(Debug, Default)]
pub struct Conversation {
    pub chain: Vec<u64>,
    pub instructions: usize,
}

impl Conversation {
    /// Whether a cache holding the first `held` messages holds any of this conversation's own.
    pub fn holds_own(&self, held: usize) -> bool {
        held > self.instructions
    }
}

/// The conversation of a chat completions body; its chain is empty when it has no messages
/// (or is not a chat body): such a request gets no affinity.
pub fn conversation(body: &[u8]) -> Conversation {
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        return Conversation::default();
    };
    let instructions = body
        .messages
        .iter()
        .take_while(|m| m.role == "system" || m.role == "developer")
        .count();
    let mut previous = 0u64;
    let mut out = Vec::with_capacity(body.messages.len().min(MAX_CHAIN));
    for m in body.messages.iter().take(MAX_CHAIN) {
        let mut hasher = Sha256::new();
        hasher.update(previous.to_le_bytes());
        hasher.update(m.role.as_bytes());
        hasher.update([0]);
        match &m.content {
            Some(Content::Text(t)) => hasher.update(t.as_bytes()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .for_each(|p| hasher.update(p.text.as_deref().unwrap_or_default().as_bytes())),
            Some(Content::Other(_)) | None => {}
        }
        hasher.update([0]);
        let digest = hasher.finalize();
        previous = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        out.push(previous);
    }
    Conversation {
        chain: out,
        instructions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sidecar/src/affinity.rs` pins the same values: the two must agree.
    #[test]
    fn the_chain_matches_the_sidecars() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}]}"#;
        let c = conversation(body);
        assert_eq!(c.chain, vec![0x74c7_32f8_13d5_e8df, 0xab1c_84b2_f333_67a4]);
        // The system prompt is shared; the user's message is the conversation's own.
        assert_eq!(c.instructions, 1);
        assert!(!c.holds_own(1));
        assert!(c.holds_own(2));
    }

    #[test]
    fn a_body_without_messages_has_no_chain() {
        assert!(conversation(br#"{"model":"m","prompt":"x"}"#)
            .chain
            .is_empty());
        assert!(conversation(b"not json").chain.is_empty());
        // A null or odd content still hashes (as empty).
        let odd = conversation(
            br#"{"messages":[{"role":"assistant","content":null},{"role":"user","content":7}]}"#,
        );
        assert_eq!((odd.chain.len(), odd.instructions), (2, 0));
        assert!(odd.holds_own(1));
    }
}
