//! `GET /admin/budgets`: every dollar budget (configured keys', tenants', and the JWT callers'
//! this node has served), each window's limit, what is spent, what requests in flight hold, and
//! what is left. Read from Redis when the budgets are shared (fleet-wide), else from this
//! process; a budget Redis cannot answer for is shown from this process with the error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use utoipa::ToSchema;

use lumen_plugins::budget::shared::SharedBudgets;
use lumen_plugins::budget::{BudgetId, Charge, LocalBudgets, WindowStatus};

use crate::config::Snapshot;

/// `GET /admin/budgets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetsReport {
    /// `redis` (fleet-wide) or `memory` (this node).
    pub store: &'static str,
    pub budgets: Vec<BudgetEntry>,
}

/// One budget.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetEntry {
    /// `key` (a configured key or a JWT caller) or `tenant`.
    pub scope: String,
    pub name: String,
    /// From the config (a key's `budget:`, `tenants:`), rather than a JWT's claim.
    pub configured: bool,
    /// The share at which `lumen_budget_used_ratio` alerts, when set.
    pub alert_at: Option<f64>,
    pub windows: Vec<BudgetWindow>,
    /// Set when Redis could not be read: the windows then show this node's own count.
    pub error: Option<String>,
}

/// One window (UTC day or month) of a budget, in USD.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetWindow {
    /// `day` or `month`.
    pub period: &'static str,
    pub limit_usd: f64,
    pub used_usd: f64,
    /// Held by requests in flight (their worst case, until they settle).
    pub reserved_usd: f64,
    pub remaining_usd: f64,
    /// Seconds until the window resets.
    pub resets_in_s: u64,
}

fn usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

fn window(w: &WindowStatus) -> BudgetWindow {
    BudgetWindow {
        period: w.period,
        limit_usd: usd(w.limit),
        used_usd: usd(w.used),
        reserved_usd: usd(w.reserved),
        remaining_usd: usd(w.remaining),
        resets_in_s: w.resets_in_ms.div_ceil(1000),
    }
}

/// The report: configured budgets first (keys, then tenants, by name), then JWT callers'.
pub async fn report(
    config: &Snapshot,
    local: &LocalBudgets,
    shared: Option<&Arc<SharedBudgets>>,
) -> BudgetsReport {
    // Each budget, and whether the config names it (rather than a JWT's claim).
    let mut all: BTreeMap<BudgetId, (Charge, bool)> = BTreeMap::new();
    let configured = config
        .auth
        .principals()
        .into_iter()
        .filter_map(|p| Some((BudgetId::key(&p.key_id), p.budget.clone()?)))
        .chain(
            config
                .tenants
                .iter()
                .map(|(name, budget)| (BudgetId::tenant(name), budget.clone())),
        );
    for (id, budget) in configured {
        all.insert(id.clone(), (Charge { id, budget }, true));
    }
    // JWT callers' budgets come with their tokens: those this node has seen.
    for charge in local.seen() {
        if charge.id.name().starts_with("jwt:") {
            all.entry(charge.id.clone()).or_insert((charge, false));
        }
    }
    let mut budgets = Vec::with_capacity(all.len());
    for (charge, configured) in all.into_values() {
        let (windows, error) = match shared {
            Some(shared) => match shared.status(&charge).await {
                Ok(w) => (w, None),
                Err(e) => (
                    local.status(&charge.id, &charge.budget, SystemTime::now()),
                    Some(e.to_string()),
                ),
            },
            None => (
                local.status(&charge.id, &charge.budget, SystemTime::now()),
                None,
            ),
        };
        budgets.push(BudgetEntry {
            scope: charge.id.scope().to_string(),
            name: charge.id.name().to_string(),
            configured,
            alert_at: charge.budget.alert_at,
            windows: windows.iter().map(window).collect(),
            error,
        });
    }
    BudgetsReport {
        store: if shared.is_some() { "redis" } else { "memory" },
        budgets,
    }
}
