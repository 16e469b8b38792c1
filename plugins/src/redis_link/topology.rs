//! What the fleet's Redis looks like from this node: its servers, which are primaries, which are
//! up, and the failovers this node has noticed. Asked every few seconds by the prober (it is also
//! the Redis health check) and shown by `/health` and `lumen status`.
//!
//! A failover is noticed when a server that was a replica the last time is now a primary
//! (Cluster), or when Sentinel names another master (then every connection made to the old one
//! is dropped, so the next call goes to the new one without waiting for an error).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The fleet's Redis as last seen.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Topology {
    /// `server`, `cluster` or `sentinel`.
    pub kind: &'static str,
    pub nodes: Vec<TopologyNode>,
    /// Failovers this node has seen since it started.
    pub failovers_seen: u64,
    /// When the last one was seen (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failover_at: Option<u64>,
}

/// One server.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopologyNode {
    /// `host:port`.
    pub addr: String,
    /// `primary`, `replica` or `sentinel`.
    pub role: &'static str,
    /// Not marked failed (Cluster's `fail`, Sentinel's `s_down`/`o_down`).
    pub up: bool,
    /// Hash slots it serves (Cluster primaries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// The primary it replicates (replicas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
}

/// The last view and the failovers seen, kept by the link.
#[derive(Default)]
pub(crate) struct Seen {
    state: Mutex<SeenState>,
}

#[derive(Default)]
struct SeenState {
    /// Identities (Cluster node ids; addresses otherwise) that were replicas last time.
    replicas: Vec<String>,
    /// Sentinel's master last time.
    master: Option<String>,
    failovers: u64,
    last_failover_at: Option<u64>,
    last: Option<Topology>,
}

/// A server as the topology query reports it, with its identity for failover tracking.
pub(crate) struct Found {
    id: String,
    node: TopologyNode,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeenState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The view last recorded.
    pub(crate) fn last(&self) -> Option<Topology> {
        self.lock().last.clone()
    }

    /// Records a view of a `kind` topology (`sentinel`: the master is whichever Sentinel
    /// names); returns it, and whether Sentinel now names another master than last time.
    pub(crate) fn record(&self, kind: &'static str, found: Vec<Found>) -> (Topology, bool) {
        let mut state = self.lock();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let promoted = found
            .iter()
            .any(|f| f.node.role == "primary" && state.replicas.contains(&f.id));
        let master = if kind == "sentinel" {
            found
                .iter()
                .find(|f| f.node.role == "primary")
                .map(|f| f.node.addr.clone())
        } else {
            None
        };
        let moved = master.is_some() && state.master.is_some() && master != state.master;
        if promoted || moved {
            state.failovers = state.failovers.saturating_add(1);
            state.last_failover_at = Some(now);
            tracing::warn!(
                failovers = state.failovers,
                "redis failover seen: a replica is now the primary"
            );
        }
        if master.is_some() {
            state.master = master;
        }
        state.replicas = found
            .iter()
            .filter(|f| f.node.role == "replica")
            .map(|f| f.id.clone())
            .collect();
        let topology = Topology {
            kind,
            nodes: found.into_iter().map(|f| f.node).collect(),
            failovers_seen: state.failovers,
            last_failover_at: state.last_failover_at,
        };
        state.last = Some(topology.clone());
        (topology, moved)
    }
}

/// `ROLE` of one server: itself, and its replicas when it is a primary.
pub(crate) fn parse_role(addr: &str, role: &[redis::Value]) -> Vec<Found> {
    let text = |v: Option<&redis::Value>| -> String {
        match v {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            Some(redis::Value::Int(i)) => i.to_string(),
            _ => String::new(),
        }
    };
    let me = |role: &'static str, primary: Option<String>| Found {
        id: addr.to_string(),
        node: TopologyNode {
            addr: addr.to_string(),
            role,
            up: true,
            slots: None,
            primary,
        },
    };
    match text(role.first()).as_str() {
        "master" => {
            let mut found = vec![me("primary", None)];
            if let Some(redis::Value::Array(replicas)) = role.get(2) {
                for r in replicas {
                    if let redis::Value::Array(fields) = r {
                        let at = format!("{}:{}", text(fields.first()), text(fields.get(1)));
                        found.push(Found {
                            id: at.clone(),
                            node: TopologyNode {
                                addr: at,
                                role: "replica",
                                up: true,
                                slots: None,
                                primary: Some(addr.to_string()),
                            },
                        });
                    }
                }
            }
            found
        }
        "slave" => {
            let primary = format!("{}:{}", text(role.get(1)), text(role.get(2)));
            vec![me("replica", Some(primary))]
        }
        _ => vec![me("primary", None)],
    }
}

/// `CLUSTER NODES`: one line per node,
/// `<id> <ip:port@cport[,hostname]> <flags> <primary id|-> <ping> <pong> <epoch> <link> <slots…>`.
pub(crate) fn parse_cluster_nodes(text: &str) -> Vec<Found> {
    let mut addr_of = BTreeMap::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, addr, flags, primary, _ping, _pong, _epoch, link, slots @ ..] = fields.as_slice()
        else {
            continue;
        };
        let addr = addr.split(['@', ',']).next().unwrap_or(addr).to_string();
        addr_of.insert(id.to_string(), addr.clone());
        rows.push((
            id.to_string(),
            addr,
            *flags,
            *primary,
            *link,
            slots.to_vec(),
        ));
    }
    rows.into_iter()
        .map(|(id, addr, flags, primary, link, slots)| {
            let flags: Vec<&str> = flags.split(',').collect();
            let role = if flags.contains(&"master") {
                "primary"
            } else {
                "replica"
            };
            let up = !flags.iter().any(|f| *f == "fail" || *f == "fail?")
                && (link == "connected" || flags.contains(&"myself"));
            let served = slots
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                        (Ok(a), Ok(b)) => b.saturating_sub(a).saturating_add(1),
                        _ => 0,
                    },
                    None => u32::from(s.parse::<u32>().is_ok()),
                })
                .fold(0u32, u32::saturating_add);
            Found {
                node: TopologyNode {
                    addr,
                    role,
                    up,
                    slots: (role == "primary").then_some(served),
                    primary: (primary != "-")
                        .then(|| addr_of.get(primary).cloned())
                        .flatten(),
                },
                id,
            }
        })
        .collect()
}

/// Sentinel's view of the master, its replicas and the Sentinels watching it.
pub(crate) fn sentinel_view(
    master: &HashMap<String, String>,
    replicas: &[HashMap<String, String>],
    sentinels: &[HashMap<String, String>],
    asked: &str,
) -> Vec<Found> {
    let addr = |m: &HashMap<String, String>| {
        format!(
            "{}:{}",
            m.get("ip").map_or("?", String::as_str),
            m.get("port").map_or("?", String::as_str)
        )
    };
    let up = |m: &HashMap<String, String>| {
        m.get("flags")
            .is_none_or(|f| !f.split(',').any(|f| f == "s_down" || f == "o_down"))
    };
    let master_addr = addr(master);
    let mut found = vec![Found {
        id: master_addr.clone(),
        node: TopologyNode {
            addr: master_addr.clone(),
            role: "primary",
            up: up(master),
            slots: None,
            primary: None,
        },
    }];
    for r in replicas {
        let at = addr(r);
        found.push(Found {
            id: at.clone(),
            node: TopologyNode {
                addr: at,
                role: "replica",
                up: up(r),
                slots: None,
                primary: Some(master_addr.clone()),
            },
        });
    }
    let mut watching = vec![asked.to_string()];
    watching.extend(sentinels.iter().map(addr));
    for at in watching {
        found.push(Found {
            id: at.clone(),
            node: TopologyNode {
                addr: at,
                role: "sentinel",
                up: true,
                slots: None,
                primary: None,
            },
        });
    }
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_give_roles_slots_and_health() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master,fail - 0 0 2 disconnected
c3 127.0.0.1:7002@17002,host-c master - 0 0 3 connected 5461-10922 10923-16383 [77->-b2]
d4 127.0.0.1:7003@17003 slave a1 0 0 1 connected
";
        let found = parse_cluster_nodes(text);
        let nodes: Vec<_> = found.iter().map(|f| &f.node).collect();
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].role, "primary");
        assert_eq!(nodes[0].slots, Some(5461));
        assert!(nodes[0].up);
        assert!(!nodes[1].up, "a node flagged fail is down");
        assert_eq!(nodes[1].slots, Some(0));
        assert_eq!(nodes[2].addr, "127.0.0.1:7002");
        assert_eq!(nodes[2].slots, Some(16383 - 5461 + 1));
        assert_eq!(nodes[3].role, "replica");
        assert_eq!(nodes[3].slots, None);
        assert_eq!(nodes[3].primary.as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(found[3].id, "d4");
    }

    #[test]
    fn role_of_a_primary_lists_its_replicas() {
        use redis::Value::{Array, BulkString, Int};
        let role = vec![
            BulkString(b"master".to_vec()),
            Int(100),
            Array(vec![Array(vec![
                BulkString(b"10.0.0.2".to_vec()),
                BulkString(b"6380".to_vec()),
                BulkString(b"100".to_vec()),
            ])]),
        ];
        let found = parse_role("10.0.0.1:6379", &role);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].node.addr, "10.0.0.2:6380");
        assert_eq!(found[1].node.role, "replica");
    }

    #[test]
    fn sentinel_view_marks_subjectively_down_servers() {
        let m = |ip: &str, port: &str, flags: &str| {
            HashMap::from([
                ("ip".to_string(), ip.to_string()),
                ("port".to_string(), port.to_string()),
                ("flags".to_string(), flags.to_string()),
            ])
        };
        let found = sentinel_view(
            &m("127.0.0.1", "7000", "master"),
            &[m("127.0.0.1", "7001", "s_down,slave")],
            &[m("127.0.0.1", "26380", "sentinel")],
            "127.0.0.1:26379",
        );
        let roles: Vec<_> = found.iter().map(|f| (f.node.role, f.node.up)).collect();
        assert_eq!(
            roles,
            vec![
                ("primary", true),
                ("replica", false),
                ("sentinel", true),
                ("sentinel", true)
            ]
        );
    }
}
