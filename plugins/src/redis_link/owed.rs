//! What requests served while Redis could not be asked still owe it: their tokens and dollars,
//! summed per target (a budget's windows, a token bucket's windows) and sent by one task once
//! Redis answers again, so the fleet's totals still add up to what was used.
//!
//! Summed, not one write per request: while Redis is down a node may serve thousands of
//! requests a second, and what it must remember is one number per budget, however long the
//! outage lasts. Each sum goes out as one write under a gateway-made id, sent again until
//! Redis takes it (see [`RedisLink::resend`]): it applies once however often it is sent.

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

use super::{write_id, RedisLink, SharedError};

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
    fn link(&self) -> &Arc<RedisLink>;
    fn charge(self: Arc<Self>, target: Self::Target, id: String, amount: u64) -> Charge;
}

/// Sums owed to a [`Creditor`], per target; kept by the creditor itself.
pub struct Owed<C: Creditor> {
    sums: Mutex<HashMap<C::Target, u64>>,
    /// Whether the task that sends the sums is running.
    sending: AtomicBool,
}

impl<C: Creditor> Default for Owed<C> {
    fn default() -> Owed<C> {
        Owed {
            sums: Mutex::new(HashMap::new()),
            sending: AtomicBool::new(false),
        }
    }
}

impl<C: Creditor> Owed<C> {
    fn add(&self, target: C::Target, amount: u64) {
        if let Ok(mut sums) = self.sums.lock() {
            let sum = sums.entry(target).or_insert(0);
            *sum = sum.saturating_add(amount);
        }
    }

    fn drain(&self) -> Vec<(C::Target, u64)> {
        match self.sums.lock() {
            Ok(mut sums) => sums.drain().collect(),
            Err(_) => Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.sums.lock().map(|s| s.is_empty()).unwrap_or(true)
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

/// Sends what is owed each second until nothing is: each sum as one write, sent again until
/// Redis takes it.
async fn send<C: Creditor>(creditor: Arc<C>) {
    loop {
        tokio::time::sleep(SEND_EVERY).await;
        let owed = creditor.owed();
        let due = owed.drain();
        if due.is_empty() {
            owed.sending.store(false, Ordering::Release);
            // A sum added between the drain and the flag is sent too.
            if !owed.is_empty() && !owed.sending.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
        for (target, amount) in due {
            let Ok(id) = write_id() else {
                // No id, no write that applies once: kept for the next round.
                owed.add(target, amount);
                continue;
            };
            let to = creditor.clone();
            creditor.link().resend(C::OP, move || {
                to.clone().charge(target.clone(), id.clone(), amount)
            });
        }
    }
}
