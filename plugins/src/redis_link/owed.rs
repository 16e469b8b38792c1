//! What requests served while Redis could not be asked still owe it: their tokens and dollars,
//! summed per target (a budget's windows, a token bucket's windows) and sent by one task once
//! Redis answers again, so the fleet's totals still add up to what was used.
//!
//! Summed, not one write per request: while Redis is down a node may serve thousands of
//! requests a second, and what it must remember is one number per target, however long the
//! outage lasts. Each target has at most one write in flight, under a gateway-made id, sent
//! again each second until Redis takes it (it applies once however often it is sent); what is
//! owed meanwhile waits beside it for the next write. Nothing owed is given up while the
//! process lives; a node that stops (or is killed) before Redis is back loses what it owed.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{write_id, SharedError};

/// Targets owed at most (each one number); an amount for a new target beyond it is dropped.
const TARGETS_AT_MOST: usize = 100_000;

/// How often the sums owed are sent while there are any.
const SEND_EVERY: Duration = Duration::from_secs(1);

/// A write that charges `amount` to a target once, under the write id `id`.
pub type Charge = Pin<Box<dyn Future<Output = Result<(), SharedError>> + Send>>;

/// Who is owed: holds the sums ([`Owed`]) and charges an amount to a target in Redis, once
/// per id.
pub trait Creditor: Send + Sync + Sized + 'static {
    type Target: Eq + Hash + Clone + Send + Sync + 'static;
    /// The operation its writes are counted under (`lumen_redis_errors_total{op}`).
    const OP: &'static str;
    fn owed(&self) -> &Owed<Self>;
    fn charge(self: Arc<Self>, target: Self::Target, id: String, amount: u64) -> Charge;
}

/// Sums owed to a [`Creditor`], per target; kept by the creditor itself.
pub struct Owed<C: Creditor> {
    state: Mutex<State<C::Target>>,
    /// Whether the task that sends the sums is running.
    sending: AtomicBool,
}

struct State<T> {
    /// Owed and not yet in a write.
    sums: HashMap<T, u64>,
    /// The write in flight per target: its id and amount.
    flying: HashMap<T, (String, u64)>,
}

impl<C: Creditor> Default for Owed<C> {
    fn default() -> Owed<C> {
        Owed {
            state: Mutex::new(State {
                sums: HashMap::new(),
                flying: HashMap::new(),
            }),
            sending: AtomicBool::new(false),
        }
    }
}

impl<C: Creditor> Owed<C> {
    fn add(&self, target: C::Target, amount: u64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        // Targets are callers' budgets and buckets (a JWT's subjects among them): bounded, so
        // that a long outage with very many callers cannot grow the map without end.
        let known = state.sums.contains_key(&target) || state.flying.contains_key(&target);
        if !known && state.sums.len().saturating_add(state.flying.len()) >= TARGETS_AT_MOST {
            tracing::warn!(
                op = C::OP,
                "too many targets owed to redis; this amount is dropped"
            );
            return;
        }
        let sum = state.sums.entry(target).or_insert(0);
        *sum = sum.saturating_add(amount);
    }

    /// The writes to send now: every one in flight, a target's sum becoming its write when
    /// it has none in flight.
    fn due(&self) -> Vec<(C::Target, String, u64)> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        let State { sums, flying } = &mut *state;
        let ready: Vec<C::Target> = sums
            .keys()
            .filter(|t| !flying.contains_key(*t))
            .cloned()
            .collect();
        for target in ready {
            let (Some(amount), Ok(id)) = (sums.remove(&target), write_id()) else {
                continue;
            };
            flying.insert(target, (id, amount));
        }
        flying
            .iter()
            .map(|(t, (id, amount))| (t.clone(), id.clone(), *amount))
            .collect()
    }

    fn landed(&self, target: &C::Target) {
        if let Ok(mut state) = self.state.lock() {
            state.flying.remove(target);
        }
    }

    fn is_empty(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.sums.is_empty() && s.flying.is_empty())
            .unwrap_or(true)
    }
}

/// Adds `amount` to what `creditor` is owed for `target`: sent within a second or so of Redis
/// answering again.
pub fn owe<C: Creditor>(creditor: &Arc<C>, target: C::Target, amount: u64) {
    if amount == 0 {
        return;
    }
    let owed = creditor.owed();
    owed.add(target, amount);
    if owed.sending.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        owed.sending.store(false, Ordering::Release);
        return;
    };
    runtime.spawn(send(creditor.clone()));
}

/// Clears the sending flag if the task is dropped before it is done (its runtime shut down),
/// so that a later sum starts a new one.
struct Sending<C: Creditor> {
    creditor: Arc<C>,
    armed: bool,
}

impl<C: Creditor> Drop for Sending<C> {
    fn drop(&mut self) {
        if self.armed {
            self.creditor.owed().sending.store(false, Ordering::Release);
        }
    }
}

/// Sends what is owed each second until nothing is.
async fn send<C: Creditor>(creditor: Arc<C>) {
    let mut guard = Sending {
        creditor: creditor.clone(),
        armed: true,
    };
    loop {
        tokio::time::sleep(SEND_EVERY).await;
        let owed = creditor.owed();
        for (target, id, amount) in owed.due() {
            let sent = creditor.clone().charge(target.clone(), id, amount).await;
            match sent {
                Ok(()) => owed.landed(&target),
                // Redis is still away: everything waits for the next round.
                Err(_) => break,
            }
        }
        if owed.is_empty() {
            owed.sending.store(false, Ordering::Release);
            // A sum added between the check and the flag is sent too.
            if owed.is_empty() || owed.sending.swap(true, Ordering::AcqRel) {
                guard.armed = false;
                return;
            }
        }
    }
}
