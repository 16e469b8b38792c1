//! `multipart/form-data` (RFC 7578), as `POST /v1/files` receives it from the SDKs and curl:
//! the body is already in memory (bounded by `batches.max_file_bytes`), so the parts are
//! slices of it, found with one scan for the boundary.

use bytes::Bytes;

/// One part: its form field name, its file name if it is a file, and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: Bytes,
}

/// Most parts a form may have (`POST /v1/files` has two).
const MAX_PARTS: usize = 16;

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

/// The parts of `body`; an error says what is malformed.
pub fn parts(body: &Bytes, boundary: &str) -> Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    // Delimiters start a line (RFC 2046); a form has a few parts, so a body of many is not
    // one (and is not buffered as a list of millions of offsets).
    let mut starts = Vec::new();
    for at in finder.find_iter(body) {
        let line_start = at == 0 || body.get(at.saturating_sub(2)..at) == Some(b"\r\n".as_slice());
        if !line_start {
            continue;
        }
        if starts.len() > MAX_PARTS {
            return Err(format!("a multipart body of more than {MAX_PARTS} parts"));
        }
        starts.push(at);
    }
    let Some(&first) = starts.first() else {
        return Err("no multipart boundary in the body".into());
    };
    let mut out = Vec::new();
    let mut at = first;
    for &next in starts.get(1..).unwrap_or_default() {
        // The part runs from after the delimiter's line to the CRLF before the next delimiter.
        let Some(part) = body.get(at.saturating_add(delimiter.len())..next) else {
            break;
        };
        at = next;
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let Some(split) = memchr::memmem::find(part, b"\r\n\r\n") else {
            return Err("a multipart part has no header end".into());
        };
        let (head, rest) = part.split_at(split);
        let data_start = rest.get(4..).unwrap_or_default();
        let head = std::str::from_utf8(head).map_err(|_| "a multipart header is not UTF-8")?;
        let Some((name, filename)) = disposition(head) else {
            return Err("a multipart part has no Content-Disposition name".into());
        };
        out.push(Part {
            name,
            filename,
            data: body.slice_ref(data_start),
        });
    }
    let closed = body
        .get(at.saturating_add(delimiter.len())..)
        .is_some_and(|rest| rest.starts_with(b"--"));
    if !closed {
        return Err("the multipart body is cut short (no closing boundary)".into());
    }
    Ok(out)
}

/// `Content-Disposition: form-data; name="file"; filename="in.jsonl"` → (name, filename).
fn disposition(head: &str) -> Option<(String, Option<String>)> {
    let line = head.lines().find(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
    })?;
    let (_, value) = line.split_once(':')?;
    let mut name = None;
    let mut filename = None;
    for param in value.split(';').skip(1) {
        let Some((k, v)) = param.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            _ => {}
        }
    }
    Some((name?, filename))
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

    #[test]
    fn the_parts_of_an_sdk_upload_are_read() {
        let ct = "multipart/form-data; boundary=\"abc123\"";
        let b = boundary(ct).unwrap();
        assert_eq!(b, "abc123");
        let body = Bytes::from(
            "--abc123\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --abc123\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{\"a\":1}\r\n{\"b\":2}\r\n\r\n--abc123--\r\n",
        );
        let parts = parts(&body, &b).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(parts[0].data, "batch");
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(parts[1].data, "{\"a\":1}\r\n{\"b\":2}\r\n");
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(boundary("application/json").is_none());
        assert!(boundary("multipart/form-data").is_none());
        assert!(parts(&Bytes::from("nothing"), "x").is_err());
        assert!(parts(&Bytes::from("--x\r\nno header end--x--"), "x").is_err());
        assert!(
            parts(&Bytes::from("--x\r\nA: b\r\n\r\ndata"), "x").is_err(),
            "unclosed"
        );
        let no_name = Bytes::from("--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--");
        assert!(parts(&no_name, "x").is_err());
        let many = "--x\r\n".repeat(40) + "--x--";
        assert!(parts(&Bytes::from(many), "x")
            .unwrap_err()
            .contains("more than"));
        for cut in 0..40 {
            let body =
                Bytes::from("--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--x--");
            let _ = parts(&body.slice(..cut.min(body.len())), "x");
        }
    }
}
