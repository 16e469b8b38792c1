//! Ordering a route's targets for one request: the route's strategy over the targets that are
//! available now (healthy, circuit not open, not rate-limited or out of quota).
//!
//! The result is the order in which `forward` tries them: the strategy's pick first, the rest
//! as fallbacks. A target that is full (as many requests in flight as it has room for, e.g. a
//! sidecar with no free slot) goes after every target with room, so "local first, spill to the
//! cloud" is a `priority` route with the sidecar listed first. Nothing here blocks or locks:
//! health is read with atomic loads, the round-robin position is one atomic add.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::config::raw::Strategy;
use crate::routing::affinity::Conversation;
use crate::routing::{Route, Target};
use crate::upstream::health::{HealthTable, ProviderHealth, TargetHealth, Unavailable};

/// Every this many requests, `lowest_latency` sends one to another target than the fastest, so
/// a target that was slow (or down) is measured again and can win back its traffic. A fixed
/// turn rather than a coin flip: exploration is guaranteed and costs no random numbers.
const EXPLORE_EVERY: usize = 20;

/// Why no target could take a request.
#[derive(Debug, Clone)]
pub struct NoTarget {
    /// Each target's provider and why it was passed over.
    pub reasons: Vec<(String, Unavailable)>,
    /// The soonest one of them may be available again, in ms (0: unknown).
    pub retry_after_ms: u64,
}

impl NoTarget {
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(p, why)| format!("{p}: {}", why.label()))
            .collect();
        parts.join(", ")
    }
}

/// The health of one of a route's targets: its provider's and its model's.
pub struct TargetState {
    pub provider: Arc<ProviderHealth>,
    pub model: Arc<TargetHealth>,
}

/// The available targets of `route` in the order to try them (indexes into `route.targets`).
/// `states[i]` is the health of `route.targets[i]`. `conversation` is the request's
/// (`affinity`), its chain empty unless the route has `prefix_affinity`: the target with room
/// that holds the longest prefix of it, past its shared instructions, goes first. (The target
/// that answers is remembered as holding all of it, by the forwarding loop when it commits.)
pub fn order(
    route: &Route,
    states: &[TargetState],
    table: &HealthTable,
    token_estimate: u64,
    conversation: &Conversation,
) -> Result<Vec<usize>, NoTarget> {
    let now = table.now_ms();
    let n = route.targets.len();
    let mut ready = Vec::with_capacity(n);
    let mut full = Vec::new();
    let mut reasons = Vec::new();
    let mut retry_after_ms = u64::MAX;
    for (i, (target, state)) in route.targets.iter().zip(states).enumerate() {
        let provider = &target.provider;
        match state
            .provider
            .availability(&state.model, now, &provider.circuit)
        {
            Ok(())
                if state.provider.busy(provider.max_in_flight)
                    || state.model.low_on_tokens(now, token_estimate) =>
            {
                full.push(i)
            }
            Ok(()) => ready.push(i),
            Err(why) => {
                let wait = state.provider.wait_ms(&state.model, now, &provider.circuit);
                retry_after_ms = retry_after_ms.min(match why {
                    // A sidecar loading its model: a second is a fair first guess.
                    Unavailable::Starting => 1000,
                    // Probes decide when an unhealthy target is back: one interval at least.
                    Unavailable::Unhealthy => provider
                        .probe
                        .as_ref()
                        .map_or(1000, |p| p.interval.as_millis() as u64),
                    _ => wait,
                });
                reasons.push((provider.name.clone(), why));
            }
        }
    }
    if ready.is_empty() && full.is_empty() {
        return Err(NoTarget {
            reasons,
            retry_after_ms: if retry_after_ms == u64::MAX {
                0
            } else {
                retry_after_ms
            },
        });
    }
    // One turn per request, whatever the lists: round robin stays even.
    let turn = route.turn.fetch_add(1, Relaxed);
    arrange(route, states, turn, &mut ready);
    arrange(route, states, turn, &mut full);
    if !conversation.chain.is_empty() {
        prefer_holder(states, conversation, &mut ready);
    }
    ready.extend(full);
    Ok(ready)
}

/// Whether a batch's line may go to `route` now: a target that can take requests has room
/// beyond what is kept for interactive requests (of a known capacity, `share` and at least
/// one slot is the batches'). With no such target but none available either, it may go (and
/// fail or fall back like any request) rather than wait for nothing.
pub fn room_for_batch(
    route: &Route,
    states: &[TargetState],
    table: &HealthTable,
    share: f64,
) -> bool {
    let now = table.now_ms();
    let mut available = false;
    for (target, state) in route.targets.iter().zip(states) {
        if state
            .provider
            .availability(&state.model, now, &target.provider.circuit)
            .is_err()
        {
            continue;
        }
        available = true;
        if batch_room(target, state, share) {
            return true;
        }
    }
    !available
}

/// Whether `target` has room for a batch's line: no known capacity, or fewer requests in
/// flight than `share` of it (at least one).
pub fn batch_room(target: &Target, state: &TargetState, share: f64) -> bool {
    match state.provider.capacity(target.provider.max_in_flight) {
        None => true,
        Some(cap) => {
            let allowed = ((f64::from(cap) * share).floor() as u32).max(1);
            state.provider.in_flight() < allowed
        }
    }
}

/// Puts the targets without room for a batch's line after those with room (a local-first
/// route's sidecar keeps its share for interactive requests, the line goes on to the cloud).
pub fn batch_order(route: &Route, states: &[TargetState], share: f64, order: &mut [usize]) {
    order.sort_by_key(|&i| {
        let room = route
            .targets
            .get(i)
            .zip(states.get(i))
            .is_some_and(|(t, s)| batch_room(t, s, share));
        !room
    });
}

/// Moves the candidate holding the longest prefix of `conversation` to the front (the first
/// in strategy order among equals); the order stays as it is when none holds any of the
/// conversation's own messages (see `affinity`: shared instructions draw nothing).
fn prefer_holder(states: &[TargetState], conversation: &Conversation, candidates: &mut [usize]) {
    let held = candidates
        .iter()
        .map(|&i| states[i].provider.prefixes.longest(&conversation.chain));
    if let Some(at) = holder(held, conversation) {
        candidates[..=at].rotate_right(1);
    }
}

/// Which of the candidates, holding `held[at]` leading messages each, the conversation should
/// go back to: the first that holds the most, if that is more than its shared instructions.
fn holder(held: impl IntoIterator<Item = usize>, conversation: &Conversation) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (at, n) in held.into_iter().enumerate() {
        if best.is_none_or(|(_, most)| n > most) {
            best = Some((at, n));
        }
    }
    best.filter(|&(_, n)| conversation.holds_own(n))
        .map(|(at, _)| at)
}

/// Puts `candidates` (in config order) in the route's strategy order.
fn arrange(route: &Route, states: &[TargetState], turn: usize, candidates: &mut [usize]) {
    if candidates.len() < 2 {
        return;
    }
    match route.strategy {
        Strategy::Priority => {}
        Strategy::RoundRobin => {
            candidates.rotate_left(turn % candidates.len());
        }
        Strategy::Weighted => {
            let order = &route.weighted_order;
            if order.is_empty() {
                return;
            }
            // The unrolled order names whose turn it is; if that target is unavailable now,
            // the next one in the unrolled order that is available takes it.
            let first = (0..order.len())
                .map(|k| order[(turn + k) % order.len()])
                .find(|i| candidates.contains(i));
            if let Some(first) = first {
                // Fallbacks after it: heaviest first.
                candidates
                    .sort_by_key(|&i| (i != first, std::cmp::Reverse(route.targets[i].weight), i));
            }
        }
        Strategy::LeastBusy => {
            // Ties (commonly: all idle) rotate, so idle targets share the load evenly.
            candidates.rotate_left(turn % candidates.len());
            candidates.sort_by_key(|&i| states[i].provider.in_flight());
        }
        Strategy::LowestLatency => {
            // Unmeasured targets sort first (0): each is measured before being judged (any
            // answer is measured, so a target that only fails does not stay "unmeasured").
            candidates.sort_by_key(|&i| states[i].model.latency().map_or(0, |d| d.as_micros()));
            if turn % EXPLORE_EVERY == EXPLORE_EVERY - 1 {
                // The others take turns being explored, keeping the rest in latency order.
                let pick = 1 + (turn / EXPLORE_EVERY) % (candidates.len() - 1);
                candidates[..=pick].rotate_right(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::holder;
    use crate::routing::affinity::Conversation;

    #[test]
    fn a_conversation_goes_back_to_the_target_holding_its_own_messages() {
        // A system prompt, then the conversation's own turns.
        let c = Conversation {
            chain: vec![1, 2, 3, 4],
            instructions: 1,
        };
        assert_eq!(holder([2, 1], &c), Some(0));
        assert_eq!(holder([1, 3], &c), Some(1));
        // The first of equals (strategy order decides).
        assert_eq!(holder([0, 2, 2], &c), Some(1));
        // Holding only the shared system prompt draws nothing: otherwise the first sidecar to
        // report it would take every new conversation.
        assert_eq!(holder([1, 0], &c), None);
        assert_eq!(holder([0, 0], &c), None);
        assert_eq!(holder([], &c), None);
        // Without instructions, the first message is the conversation's own.
        let bare = Conversation {
            chain: vec![7, 8],
            instructions: 0,
        };
        assert_eq!(holder([0, 1], &bare), Some(1));
    }
}
