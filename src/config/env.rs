//! `${VAR}` substitution, so secrets live in the environment rather than in the file.
//!
//! It runs on the text before YAML parsing, so line and column numbers in later errors still
//! point at the file as written. Comment lines are left alone (a commented-out `${OLD_KEY}` is
//! not an error), `${VAR:-default}` gives a default, and `$$` writes a literal `$`.

/// A variable the file names but the environment lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    pub name: String,
    pub line: usize,
    pub column: usize,
}

/// Substitutes every `${VAR}` using `lookup`; returns every missing variable, not just the first.
pub fn substitute(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<MissingVar>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') || !line.contains('$') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    out.push_str(&rest[pos..]);
                    rest = "";
                    break;
                };
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                match lookup(name).or_else(|| default.map(str::to_string)) {
                    Some(value) => out.push_str(&value),
                    None => missing.push(MissingVar {
                        name: name.to_string(),
                        line: index + 1,
                        column: line.len() - rest.len() + pos + 1,
                    }),
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-123".to_string())
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let text = "a: ${KEY}\nb: ${NOPE:-x}\nc: $$5\n# d: ${GONE}\n";
        assert_eq!(
            substitute(text, env).unwrap(),
            "a: sk-123\nb: x\nc: $5\n# d: ${GONE}\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_place() {
        let err = substitute("a: ${X}\nb: x ${Y}\n", env).unwrap_err();
        assert_eq!(
            err,
            vec![
                MissingVar {
                    name: "X".into(),
                    line: 1,
                    column: 4
                },
                MissingVar {
                    name: "Y".into(),
                    line: 2,
                    column: 6
                },
            ]
        );
    }
}
