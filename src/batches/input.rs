//! A batch input file: JSONL, one request a line, `{custom_id, method, url, body}`, checked
//! line by line on upload so a bad file is refused then, naming its first bad line, rather
//! than failing hours later.

use serde_json::Value;

use crate::openai::Endpoint;

/// The endpoints a batch can run (the ones the job engine runs).
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// The endpoint a batch's `endpoint` (or a line's `url`) names, if a batch can run it.
pub fn endpoint(url: &str) -> Option<Endpoint> {
    ENDPOINTS
        .contains(&url)
        .then(|| Endpoint::from_path(url))
        .flatten()
}

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

/// Reads every line (blank lines are skipped, as OpenAI does); the first bad one is the
/// error, numbered from 1 as an editor shows it.
pub fn lines(data: &[u8], max_requests: usize) -> Result<Vec<Line>, String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("the file is not UTF-8 ({e})"))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, raw) in text.lines().enumerate() {
        let number = n.saturating_add(1);
        if raw.trim().is_empty() {
            continue;
        }
        if out.len() >= max_requests {
            return Err(format!(
                "the file has more than {max_requests} requests (batches.max_requests)"
            ));
        }
        let line = line(raw).map_err(|e| format!("line {number}: {e}"))?;
        if !seen.insert(line.custom_id.clone()) {
            return Err(format!(
                "line {number}: custom_id `{}` is used by an earlier line; each must be unique",
                line.custom_id
            ));
        }
        out.push(line);
    }
    if out.is_empty() {
        return Err("the file has no requests".into());
    }
    Ok(out)
}

fn line(raw: &str) -> Result<Line, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(mut obj) = v else {
        return Err("must be a JSON object {custom_id, method, url, body}".into());
    };
    let custom_id = match obj.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
        Some(Value::String(_)) => return Err("custom_id must be 1 to 512 characters".into()),
        _ => return Err("custom_id is missing or not a string".into()),
    };
    match obj.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        _ => return Err("method must be \"POST\"".into()),
    }
    let url = match obj.remove("url") {
        Some(Value::String(url)) if endpoint(&url).is_some() => url,
        Some(Value::String(url)) => {
            return Err(format!(
                "url `{url}` is not one a batch runs ({})",
                ENDPOINTS.join(", ")
            ))
        }
        _ => return Err("url is missing or not a string".into()),
    };
    let body = match obj.remove("body") {
        Some(body @ Value::Object(_)) => body,
        _ => return Err("body is missing or not a JSON object".into()),
    };
    if !body.get("model").is_some_and(Value::is_string) {
        return Err("body.model is missing or not a string".into());
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("body.stream is not supported in a batch".into());
    }
    Ok(Line {
        custom_id,
        url,
        body,
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

    #[test]
    fn good_lines_are_read_and_blank_lines_skipped() {
        let file = format!("{GOOD}\n\n{}\n", GOOD.replace("\"a\"", "\"b\""));
        let lines = lines(file.as_bytes(), 10).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].custom_id, "b");
        assert_eq!(lines[0].url, "/v1/chat/completions");
        assert_eq!(lines[0].body["model"], "m");
    }

    #[test]
    fn the_first_bad_line_is_named() {
        let cases = [
            ("{not json", "line 2: not valid JSON"),
            ("[1]", "line 2: must be a JSON object"),
            (
                r#"{"method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: custom_id is missing",
            ),
            (
                r#"{"custom_id":"x","method":"GET","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: method must be",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/rerank","body":{"model":"m"}}"#,
                "line 2: url `/v1/rerank` is not one",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":[]}"#,
                "line 2: body is missing",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{}}"#,
                "line 2: body.model",
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: custom_id `a` is used",
            ),
            (
                r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#,
                "line 2: body.stream",
            ),
        ];
        for (bad, expected) in cases {
            let file = format!("{GOOD}\n{bad}\n");
            let err = lines(file.as_bytes(), 10).unwrap_err();
            assert!(err.starts_with(expected), "{bad}: {err}");
        }
        assert!(lines(b"\n\n", 10).unwrap_err().contains("no requests"));
        assert!(lines(&[0xff, 0xfe], 10).unwrap_err().contains("UTF-8"));
        let many = format!("{GOOD}\n{}\n", GOOD.replace("\"a\"", "\"b\""));
        assert!(lines(many.as_bytes(), 1)
            .unwrap_err()
            .contains("more than 1"));
    }
}
