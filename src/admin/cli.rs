//! `lumen status`, `lumen usage` and `lumen models`: the admin API as tables for an operator
//! at a terminal (`--json` for scripts). Exit codes: 0 healthy, 1 something needs attention
//! (a provider down, a circuit open, a failed reload), 2 the gateway could not be asked.
//!
//! The admin listener is plain HTTP on loopback, so a few lines of blocking std I/O suffice.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// Where the admin API is and how to authenticate to it.
pub struct Target {
    /// `host:port`.
    pub addr: String,
    pub key: Option<String>,
}

/// Why a command could not get its answer (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no gateway answers at http://{addr} ({reason}); is it running? (`systemctl status lumen`, or `lumen serve`)")]
    Unreachable { addr: String, reason: String },
    #[error("the admin API refused the request: HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the admin API answered something that is not JSON")]
    NotJson,
}

impl Target {
    /// `GET path`, the JSON answer.
    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let unreachable = |reason: String| CliError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let addr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let auth = self
            .key
            .as_ref()
            .map(|k| format!("authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: {}\r\n{auth}connection: close\r\n\r\n",
            self.addr
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| unreachable(e.to_string()))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| unreachable("not an HTTP answer".into()))?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body: Value =
            serde_json::from_slice(&raw[split + 4..]).map_err(|_| CliError::NotJson)?;
        if status != 200 {
            return Err(CliError::Refused {
                status,
                message: body["error"]["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(body)
    }
}

/// Lines of a table with aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

/// A usage table's cell: dollars to the micro-dollar, the rest as [`text`] shows it.
fn cell(field: &str, v: &Value) -> String {
    match (field, v.as_f64()) {
        ("cost_usd", Some(usd)) => format!("{usd:.6}"),
        _ => text(v),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// `lumen status`: the report, and whether everything is healthy.
pub fn status(target: &Target) -> Result<(String, Value, bool), CliError> {
    let config = target.get("/admin/config")?;
    let providers = target.get("/admin/providers")?;
    let redis = target.get("/admin/redis")?;
    let mut healthy = config["last_reload"]["result"] != "error";
    if redis["connected"] == Value::Bool(false) {
        healthy = false;
    }
    let mut rows = Vec::new();
    let mut model_rows = Vec::new();
    for p in providers["providers"].as_array().into_iter().flatten() {
        let probe = text(&p["probe"]["state"]);
        if probe == "unhealthy" {
            healthy = false;
        }
        rows.push(vec![
            text(&p["name"]),
            probe,
            text(&p["in_flight"]),
            text(&p["capacity"]),
            text(&p["quota"]["requests_left"]),
            text(&p["quota"]["tokens_left"]),
            text(&p["usage_today"]["requests"]),
            p["last_error"]["message"]
                .as_str()
                .map_or("-".into(), |m| m.chars().take(60).collect()),
        ]);
        for m in p["models"].as_array().into_iter().flatten() {
            let circuit = text(&m["circuit"]["state"]);
            if circuit == "open" {
                healthy = false;
            }
            model_rows.push(vec![
                text(&p["name"]),
                text(&m["model"]),
                text(&m["available"]),
                circuit,
                text(&m["latency_ewma_ms"]),
            ]);
        }
    }
    let reload = match config["last_reload"]["result"].as_str() {
        None => "no reload since start".to_string(),
        Some("ok") => format!(
            "last reload ok ({})",
            text(&config["last_reload"]["trigger"])
        ),
        Some(_) => format!(
            "LAST RELOAD FAILED: {}",
            text(&config["last_reload"]["error"])
        ),
    };
    let report = format!(
        "config {} ({}), {} routes, {} providers; {reload}\n{}\n{}\n\n{}\n",
        text(&config["hash"]),
        text(&config["path"]),
        text(&config["routes"]),
        text(&config["providers"]),
        redis_report(&redis),
        table(
            &[
                "PROVIDER",
                "PROBE",
                "IN FLIGHT",
                "CAPACITY",
                "REQ LEFT",
                "TOK LEFT",
                "REQS TODAY",
                "LAST ERROR"
            ],
            &rows
        ),
        table(
            &["PROVIDER", "MODEL", "AVAILABLE", "CIRCUIT", "LATENCY MS"],
            &model_rows
        ),
    );
    let json = serde_json::json!({"healthy": healthy, "config": config, "providers": providers["providers"], "redis": redis});
    Ok((report, json, healthy))
}

/// `lumen status`'s Redis lines: whether it answers, and each server with its role.
fn redis_report(redis: &Value) -> String {
    if redis["configured"] != Value::Bool(true) {
        return "redis: not configured (limits, cache and jobs are this node's own)\n".into();
    }
    let answer = match redis["connected"].as_bool() {
        Some(true) => "answers",
        Some(false) => "DOES NOT ANSWER",
        None => "not asked yet",
    };
    let topology = &redis["topology"];
    let failovers = match topology["failovers_seen"].as_u64() {
        Some(0) | None => "no failover seen".to_string(),
        Some(n) => format!(
            "{n} failover(s) seen, the last at {} (Unix)",
            text(&topology["last_failover_at"])
        ),
    };
    let rows: Vec<Vec<String>> = topology["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            vec![
                text(&n["addr"]),
                text(&n["role"]),
                if n["up"] == Value::Bool(true) {
                    "up"
                } else {
                    "DOWN"
                }
                .to_string(),
                text(&n["slots"]),
                text(&n["primary"]),
            ]
        })
        .collect();
    format!(
        "redis ({}): {answer}; {failovers}\n{}\n",
        text(&topology["kind"]),
        table(&["REDIS NODE", "ROLE", "STATE", "SLOTS", "PRIMARY"], &rows)
    )
}

/// Parses `24h`, `7d`, `90m` into whole days back from today (at least today itself).
pub fn since_days(since: &str) -> Option<i64> {
    let (num, unit) = since.split_at(since.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let hours = match unit {
        "h" => n,
        "d" => n * 24,
        "m" => (n + 59) / 60,
        _ => return None,
    };
    Some((hours + 23) / 24)
}

/// `lumen usage`: the rows and total of `/admin/usage` with the given query.
pub fn usage(target: &Target, query: &str) -> Result<(String, Value), CliError> {
    let report = target.get(&format!("/admin/usage{query}"))?;
    let fields = [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "errors",
        "cache_hits",
        "cost_usd",
    ];
    let mut rows: Vec<Vec<String>> = report["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let mut row = vec![
                text(&r["day"]),
                text(&r["key"]),
                text(&r["tenant"]),
                text(&r["provider"]),
                text(&r["model"]),
            ];
            row.extend(fields.iter().map(|f| cell(f, &r[*f])));
            row
        })
        .collect();
    let mut total = vec![
        "TOTAL".to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ];
    total.extend(fields.iter().map(|f| cell(f, &report["total"][*f])));
    rows.push(total);
    let out = format!(
        "{} to {} ({})\n\n{}\n",
        text(&report["from"]),
        text(&report["to"]),
        text(&report["backend"]),
        table(
            &[
                "DAY",
                "KEY",
                "TENANT",
                "PROVIDER",
                "MODEL",
                "REQUESTS",
                "PROMPT",
                "COMPLETION",
                "ERRORS",
                "CACHE HITS",
                "COST USD"
            ],
            &rows
        )
    );
    Ok((out, report))
}

/// `lumen models`: each route and what it resolves to.
pub fn models(target: &Target) -> Result<(String, Value), CliError> {
    let routes = target.get("/admin/routes")?;
    let rows: Vec<Vec<String>> = routes["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let targets: Vec<String> = r["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{}/{}", text(&t["provider"]), text(&t["model"])))
                .collect();
            vec![
                text(&r["model"]),
                text(&r["strategy"]),
                targets.join(", "),
                if r["cache"] == Value::Bool(true) {
                    "yes".into()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    Ok((
        format!(
            "{}\n",
            table(&["MODEL", "STRATEGY", "TARGETS", "CACHE"], &rows)
        ),
        routes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_since_as_days_back() {
        assert_eq!(since_days("24h"), Some(1));
        assert_eq!(since_days("25h"), Some(2));
        assert_eq!(since_days("7d"), Some(7));
        assert_eq!(since_days("30m"), Some(1));
        assert_eq!(since_days("soon"), None);
        assert_eq!(since_days("5w"), None);
    }

    #[test]
    fn aligns_table_columns() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1");
    }

    #[test]
    fn an_unreachable_gateway_is_one_clear_error() {
        let target = Target {
            addr: "127.0.0.1:1".into(),
            key: None,
        };
        let e = target.get("/admin/config").unwrap_err().to_string();
        assert!(
            e.starts_with("no gateway answers at http://127.0.0.1:1"),
            "{e}"
        );
    }
}
