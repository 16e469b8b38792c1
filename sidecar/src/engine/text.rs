//! Turns a stream of token bytes into text deltas a client may see.
//!
//! Two things make this more than concatenation. A token may end in the middle of a UTF-8
//! character (byte-fallback tokens, multi-byte BPE pieces), so bytes wait until they form whole
//! characters. And a stop string must never reach the client, even when it arrives split over
//! several tokens, so text that could still become the start of a stop string is held back until
//! the next token settles it.

/// What one token's bytes produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Text that is safe to send now (possibly empty); generation goes on.
    Text(String),
    /// A stop string appeared: send this text (what came before the stop string) and stop.
    Stopped(String),
}

#[derive(Debug)]
pub struct TextAssembler {
    /// Bytes of an unfinished UTF-8 character.
    pending: Vec<u8>,
    /// Decoded text not yet sent because it may begin a stop string.
    held: String,
    stops: Vec<String>,
}

impl TextAssembler {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            pending: Vec::new(),
            held: String::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        self.pending.extend_from_slice(bytes);
        self.decode_pending();
        self.settle()
    }

    /// The text still held at the end of generation (nothing else is coming, so a partial stop
    /// string is just text, and broken UTF-8 becomes U+FFFD).
    pub fn finish(&mut self) -> Pushed {
        if !self.pending.is_empty() {
            let tail = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.held.push_str(&tail);
        }
        if let Some(text) = self.cut_at_stop() {
            return Pushed::Stopped(text);
        }
        Pushed::Text(std::mem::take(&mut self.held))
    }

    fn decode_pending(&mut self) {
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is UTF-8 by construction.
                    self.held
                        .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            // An incomplete character at the end: wait for more bytes.
                            self.pending.drain(..valid);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn settle(&mut self) -> Pushed {
        if let Some(text) = self.cut_at_stop() {
            return Pushed::Stopped(text);
        }
        let keep = self.partial_stop_len();
        let emit_to = self.held.len() - keep;
        let text = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        Pushed::Text(text)
    }

    /// If a stop string is in the held text, returns what precedes the first one and forgets
    /// everything else.
    fn cut_at_stop(&mut self) -> Option<String> {
        let at = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()?;
        let text = self.held[..at].to_string();
        self.held.clear();
        self.pending.clear();
        Some(text)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let max = longest.saturating_sub(1).min(self.held.len());
        (1..=max)
            .rev()
            .find(|&k| {
                let start = self.held.len() - k;
                self.held.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.held[start..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let mut a = TextAssembler::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match a.push(p) {
                Pushed::Text(t) => out.push_str(&t),
                Pushed::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        match a.finish() {
            Pushed::Text(t) => {
                out.push_str(&t);
                (out, false)
            }
            Pushed::Stopped(t) => {
                out.push_str(&t);
                (out, true)
            }
        }
    }

    #[test]
    fn joins_split_utf8() {
        let euro = "€".as_bytes();
        assert_eq!(
            run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]),
            ("a€b".into(), false)
        );
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a\xffb"]), ("a\u{fffd}b".into(), false));
        assert_eq!(run(&[], &[b"a", b"\xe2\x82"]), ("a\u{fffd}".into(), false));
    }

    #[test]
    fn stop_split_over_tokens_is_never_emitted() {
        let mut a = TextAssembler::new(vec!["END".into()]);
        assert_eq!(a.push(b"hello E"), Pushed::Text("hello ".into()));
        assert_eq!(a.push(b"N"), Pushed::Text(String::new()));
        assert_eq!(a.push(b"D more"), Pushed::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut a = TextAssembler::new(vec!["END".into()]);
        assert_eq!(a.push(b"xE"), Pushed::Text("x".into()));
        assert_eq!(a.push(b"Nx"), Pushed::Text("ENx".into()));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &[b"abcd"]), ("a".into(), true));
    }

    #[test]
    fn partial_stop_at_the_end_is_plain_text() {
        assert_eq!(run(&["STOP"], &[b"ab", b"ST"]), ("abST".into(), false));
    }

    #[test]
    fn stop_inside_a_multibyte_neighbourhood() {
        assert_eq!(run(&["é!"], &["aé".as_bytes(), b"!z"]), ("a".into(), true));
    }
}
