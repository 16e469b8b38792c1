//! Whether a text is a prefix of a JSON object: what a grammar-constrained generation that
//! `max_tokens` cut off must be. `serde_json` can only tell a whole document from a broken one.

/// Whether `s` is a prefix of some valid JSON text (what a grammar-constrained generation cut
/// off by `max_tokens` must be). A small recursive-descent checker: `Err` on an invalid byte,
/// `Ok(true)` when the input ran out mid-value, `Ok(false)` when a value ended cleanly.
pub fn is_json_prefix(s: &str) -> bool {
    struct P<'a> {
        b: &'a [u8],
        i: usize,
    }
    type R = Result<bool, ()>; // Ok(true): input exhausted (still a prefix)
    impl P<'_> {
        fn ws(&mut self) -> bool {
            while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\n' | b'\t' | b'\r') {
                self.i += 1;
            }
            self.i >= self.b.len()
        }
        fn lit(&mut self, word: &[u8]) -> R {
            for &c in word {
                if self.i >= self.b.len() {
                    return Ok(true);
                }
                if self.b[self.i] != c {
                    return Err(());
                }
                self.i += 1;
            }
            Ok(false)
        }
        fn string(&mut self) -> R {
            self.i += 1; // opening quote
            loop {
                if self.i >= self.b.len() {
                    return Ok(true);
                }
                match self.b[self.i] {
                    b'"' => {
                        self.i += 1;
                        return Ok(false);
                    }
                    b'\\' => {
                        self.i += 1;
                        if self.i >= self.b.len() {
                            return Ok(true);
                        }
                        match self.b[self.i] {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                            b'u' => {
                                self.i += 1;
                                for _ in 0..4 {
                                    if self.i >= self.b.len() {
                                        return Ok(true);
                                    }
                                    if !self.b[self.i].is_ascii_hexdigit() {
                                        return Err(());
                                    }
                                    self.i += 1;
                                }
                            }
                            _ => return Err(()),
                        }
                    }
                    c if c < 0x20 => return Err(()),
                    _ => self.i += 1,
                }
            }
        }
        fn number(&mut self) -> R {
            let start = self.i;
            while self.i < self.b.len()
                && matches!(
                    self.b[self.i],
                    b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                )
            {
                self.i += 1;
            }
            let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| ())?;
            if self.i >= self.b.len() {
                return Ok(true); // a number may continue
            }
            text.parse::<f64>().map(|_| false).map_err(|_| ())
        }
        fn value(&mut self) -> R {
            if self.ws() {
                return Ok(true);
            }
            match self.b[self.i] {
                b'{' => self.seq(b'}', true),
                b'[' => self.seq(b']', false),
                b'"' => self.string(),
                b't' => self.lit(b"true"),
                b'f' => self.lit(b"false"),
                b'n' => self.lit(b"null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => Err(()),
            }
        }
        fn seq(&mut self, close: u8, object: bool) -> R {
            self.i += 1;
            if self.ws() {
                return Ok(true);
            }
            if self.b[self.i] == close {
                self.i += 1;
                return Ok(false);
            }
            loop {
                if object {
                    if self.ws() {
                        return Ok(true);
                    }
                    if self.b[self.i] != b'"' {
                        return Err(());
                    }
                    if self.string()? {
                        return Ok(true);
                    }
                    if self.ws() {
                        return Ok(true);
                    }
                    if self.b[self.i] != b':' {
                        return Err(());
                    }
                    self.i += 1;
                }
                if self.value()? {
                    return Ok(true);
                }
                if self.ws() {
                    return Ok(true);
                }
                match self.b[self.i] {
                    b',' => self.i += 1,
                    c if c == close => {
                        self.i += 1;
                        return Ok(false);
                    }
                    _ => return Err(()),
                }
            }
        }
    }
    let mut p = P {
        b: s.as_bytes(),
        i: 0,
    };
    if p.ws() {
        return true;
    }
    if p.b[p.i] != b'{' {
        return false;
    }
    match p.value() {
        Ok(true) => true,
        Ok(false) => p.ws(), // only whitespace may follow the object
        Err(()) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_json_prefix;

    #[test]
    fn json_prefix_checker_works() {
        for ok in [
            "",
            "{",
            "{\"a",
            "{\"a\":",
            "{\"a\": [1, tr",
            "{\"a\":\"\\u00",
            "{} ",
            "{\"a\":1.5e",
        ] {
            assert!(is_json_prefix(ok), "{ok:?} should be a prefix");
        }
        for bad in ["[", "{a", "{\"a\" 1", "{}x", "{\"a\":tx", "{\"a\":1,}"] {
            assert!(!is_json_prefix(bad), "{bad:?} should not be a prefix");
        }
    }
}
