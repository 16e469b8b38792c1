//! `${VAR}` substitution, so secrets live in the environment rather than in the file.
//!
//! It runs on the text before YAML parsing, so line and column numbers in later errors still
//! point at the file as written. Comment lines are left alone (a commented-out `${OLD_KEY}` is
//! not an error), `${VAR:-default}` gives a default, and `$$` writes a literal `$`.
//!
//! A value is inserted as data, never as YAML: inside a double-quoted string it is escaped,
//! inside a single-quoted one its quotes are doubled, and a `${VAR}` that is a whole plain
//! scalar (`api_key: ${KEY}`) becomes a double-quoted string. So a key containing `#`, `: ` or
//! quotes, or made only of digits, arrives intact as a string and cannot change the file's
//! structure. The substituted values are returned too, so error messages can redact them.

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
) -> Result<Substituted, Vec<MissingVar>> {
    let mut values = Vec::new();
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
                let before = &line[..line.len() - rest.len() + pos];
                let after = &body[end + 1..];
                match lookup(name).or_else(|| default.map(str::to_string)) {
                    Some(value) => {
                        out.push_str(&quote(&value, before, after));
                        values.push(value);
                    }
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
        Ok(Substituted { text: out, values })
    } else {
        Err(missing)
    }
}

/// The substituted text, and the values put in (to keep them out of error messages).
#[derive(Debug)]
pub struct Substituted {
    pub text: String,
    pub values: Vec<String>,
}

impl Substituted {
    /// `message` with every substituted value of 3+ characters replaced by `***`.
    pub fn redact(&self, message: &str) -> String {
        let mut out = message.to_string();
        for v in self.values.iter().filter(|v| v.len() >= 3) {
            out = out.replace(v.as_str(), "***");
        }
        out
    }
}

/// Renders `value` for the place it goes: `before` is the line up to the `${VAR}` and
/// `after` the rest of the line.
fn quote(value: &str, before: &str, after: &str) -> String {
    let (mut in_double, mut in_single, mut escaped) = (false, false, false);
    for c in before.chars() {
        match c {
            '\\' if in_double && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !in_single && !escaped => in_double = !in_double,
            '\'' if !in_double => in_single = !in_single,
            _ => {}
        }
        escaped = false;
    }
    let json = serde_json::to_string(value).unwrap_or_default();
    if in_double {
        return json[1..json.len() - 1].to_string();
    }
    if in_single {
        return value.replace('\'', "''");
    }
    let starts_scalar = before.trim_end().is_empty()
        || before.ends_with(": ")
        || before.ends_with("- ")
        || before.ends_with(['[', '{', ','])
        || before.ends_with(", ");
    let ends_scalar =
        after.trim().is_empty() || after.starts_with([',', ']', '}']) || after.starts_with(" #");
    if starts_scalar && ends_scalar {
        json
    } else {
        value.to_string()
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
            substitute(text, env).unwrap().text,
            "a: \"sk-123\"\nb: \"x\"\nc: $5\n# d: ${GONE}\n"
        );
    }

    #[test]
    fn values_are_data_not_yaml() {
        let tricky = |_: &str| Some("a #b: 'c\" 1".to_string());
        let out = substitute(
            "x: ${V}\ny: \"pre-${V}\"\nz: 'q${V}'\nu: http://${V}/v1\n",
            tricky,
        )
        .unwrap()
        .text;
        let yaml: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(yaml["x"], "a #b: 'c\" 1");
        assert_eq!(yaml["y"], "pre-a #b: 'c\" 1");
        assert_eq!(yaml["z"], "qa #b: 'c\" 1");
        let digits = substitute("k: ${V}\n", |_| Some("12345".into())).unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&digits.text).unwrap();
        assert_eq!(yaml["k"], "12345", "an all-digit key stays a string");
        assert_eq!(digits.redact("bad value 12345 here"), "bad value *** here");
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
