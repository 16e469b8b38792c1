//! The in-process job backend: a bounded queue, and a table of jobs kept `result_ttl` after
//! they end. Everything is lost with the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lumen_plugins::auth::Principal;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};

use super::job::{now_us, JobError, JobSettings, JobView, Status, SubmitError, Update};
use crate::openai::Endpoint;

/// A job's mutable part.
struct State {
    view: JobView,
    /// The generated text so far; a late watcher gets it first.
    text: String,
    /// Deltas so far (a watcher skips those its starting text already held).
    seq: u64,
    finished: Option<Instant>,
}

#[derive(Debug, Clone)]
enum Event {
    Status(Status),
    Delta { seq: u64, text: String },
}

/// One job.
pub struct Job {
    pub owner: Arc<Principal>,
    pub endpoint: Endpoint,
    /// The OpenAI request as JSON bytes, not a parsed tree: a job is kept for its whole TTL,
    /// and a tree of many small values costs many times its text. Parsed when it runs.
    pub body: bytes::Bytes,
    /// The submitting request's `traceparent`, when it was traced.
    pub trace: Option<String>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    cancel: watch::Sender<bool>,
}

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and tells watchers, under one lock (so a new watcher's starting
    /// state and its first event never overlap or leave a gap).
    fn update(&self, change: impl FnOnce(&mut State) -> Option<Event>) {
        let mut state = self.lock();
        if let Some(event) = change(&mut state) {
            let _ = self.events.send(event);
        }
    }

    pub fn id(&self) -> String {
        self.lock().view.id.clone()
    }

    pub fn created_us(&self) -> u64 {
        self.lock().view.created_us
    }

    /// Queued → processing; `false` if it was cancelled meanwhile.
    pub fn start(&self) -> bool {
        let mut started = false;
        self.update(|s| {
            if s.view.status != Status::Queued {
                return None;
            }
            started = true;
            s.view.status = Status::Processing;
            s.view.started_us = Some(now_us());
            Some(Event::Status(Status::Processing))
        });
        started
    }

    pub fn delta(&self, text: &str) {
        self.update(|s| {
            s.text.push_str(text);
            s.seq += 1;
            Some(Event::Delta {
                seq: s.seq,
                text: text.to_string(),
            })
        });
    }

    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    pub fn finish(&self, outcome: Result<Value, JobError>, status: Status, cost: Option<u64>) {
        self.update(|s| {
            s.view.status = status;
            s.view.cost_micros = cost;
            s.view.finished_us = Some(now_us());
            s.finished = Some(Instant::now());
            match outcome {
                Ok(result) => s.view.result = Some(result),
                Err(e) => s.view.error = Some(e),
            }
            Some(Event::Status(status))
        });
    }
}

pub struct Memory {
    /// Jobs by (owner key id, job id): another key never finds them.
    table: Mutex<HashMap<(String, String), Arc<Job>>>,
    queue: mpsc::Sender<Arc<Job>>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Arc<Job>>>,
    queued_by_key: Mutex<HashMap<String, usize>>,
    queued: AtomicUsize,
    queue_size: usize,
    max_per_key: usize,
}

impl Memory {
    pub fn new(settings: &JobSettings) -> Memory {
        let (queue, receiver) = mpsc::channel(settings.queue_size);
        Memory {
            table: Mutex::new(HashMap::new()),
            queue,
            receiver: tokio::sync::Mutex::new(receiver),
            queued_by_key: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            queue_size: settings.queue_size,
            max_per_key: settings.max_queued_per_key,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Job>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn submit(
        &self,
        owner: &Arc<Principal>,
        endpoint: Endpoint,
        body: Value,
        id: String,
        trace: Option<String>,
    ) -> Result<(JobView, bool), SubmitError> {
        let mut table = self.table();
        let key = (owner.key_id.clone(), id.clone());
        if let Some(existing) = table.get(&key) {
            return Ok((existing.lock().view.clone(), false));
        }
        {
            let mut per_key = self.queued_by_key.lock().unwrap_or_else(|e| e.into_inner());
            let mine = per_key.entry(owner.key_id.clone()).or_default();
            if *mine >= self.max_per_key {
                return Err(SubmitError::KeyFull(*mine));
            }
            *mine += 1;
        }
        let view = JobView::queued(id, now_us());
        let (events, _) = broadcast::channel(256);
        let (cancel, _) = watch::channel(false);
        let job = Arc::new(Job {
            owner: owner.clone(),
            endpoint,
            // Serialising a `Value` to bytes cannot fail.
            body: bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            trace,
            state: Mutex::new(State {
                view: view.clone(),
                text: String::new(),
                seq: 0,
                finished: None,
            }),
            events,
            cancel,
        });
        if self.queue.try_send(job.clone()).is_err() {
            self.unqueue(&owner.key_id);
            return Err(SubmitError::QueueFull(self.queue_size));
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        table.insert(key, job);
        Ok((view, true))
    }

    fn unqueue(&self, owner: &str) {
        let mut per_key = self.queued_by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_key.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_key.remove(owner);
            }
        }
    }

    fn find(&self, owner: &str, id: &str) -> Option<Arc<Job>> {
        self.table()
            .get(&(owner.to_string(), id.to_string()))
            .cloned()
    }

    pub fn get(&self, owner: &str, id: &str) -> Option<JobView> {
        Some(self.find(owner, id)?.lock().view.clone())
    }

    pub fn cancel(&self, owner: &str, id: &str) -> Option<JobView> {
        let job = self.find(owner, id)?;
        let mut running = false;
        job.update(|s| match s.view.status {
            Status::Queued => {
                // The worker that dequeues it will skip it.
                s.view.status = Status::Cancelled;
                s.view.finished_us = Some(now_us());
                s.finished = Some(Instant::now());
                s.view.error = Some(JobError::cancelled("cancelled before it started"));
                Some(Event::Status(Status::Cancelled))
            }
            Status::Processing => {
                running = true;
                None
            }
            _ => None,
        });
        if running {
            // `send_replace` stores the flag even before the worker has subscribed to it (it may
            // have dequeued the job and not yet started to listen): `send` would drop it.
            job.cancel.send_replace(true);
        }
        let view = job.lock().view.clone();
        Some(view)
    }

    pub fn subscribe(&self, owner: &str, id: &str) -> Option<(JobView, String, MemorySub)> {
        let job = self.find(owner, id)?;
        let state = job.lock();
        let rx = job.events.subscribe();
        let sub = MemorySub {
            job: job.clone(),
            rx,
            sent: state.seq,
            sent_len: state.text.len(),
            ended: state.view.status.is_final(),
        };
        Some((state.view.clone(), state.text.clone(), sub))
    }

    /// The next job to run (waits for one).
    pub async fn take(&self) -> Option<Arc<Job>> {
        let job = self.receiver.lock().await.recv().await?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.unqueue(&job.owner.key_id);
        Some(job)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Drops finished jobs older than `ttl`.
    pub fn sweep(&self, ttl: Duration) {
        self.table().retain(|_, job| {
            let state = job.lock();
            !(state.view.status.is_final() && state.finished.is_some_and(|t| t.elapsed() > ttl))
        });
    }
}

/// A watcher of one in-process job.
pub struct MemorySub {
    job: Arc<Job>,
    rx: broadcast::Receiver<Event>,
    /// Deltas already sent, by sequence number and by bytes of text.
    sent: u64,
    sent_len: usize,
    ended: bool,
}

impl MemorySub {
    pub async fn next(&mut self, idle: Duration) -> Option<Option<Update>> {
        if self.ended {
            return None;
        }
        loop {
            let next = match tokio::time::timeout(idle, self.rx.recv()).await {
                Err(_) => return Some(None),
                Ok(next) => next,
            };
            return Some(Some(match next {
                Ok(Event::Delta { seq, text }) if seq > self.sent => {
                    self.sent = seq;
                    self.sent_len += text.len();
                    Update::Delta(text)
                }
                Ok(Event::Delta { .. }) => continue,
                Ok(Event::Status(status)) => {
                    self.ended = status.is_final();
                    Update::Status(status)
                }
                // Too slow a reader: catch up from the state.
                Err(RecvError::Lagged(_)) => {
                    let state = self.job.lock();
                    let text = state.text.get(self.sent_len..).unwrap_or("").to_string();
                    self.sent = state.seq;
                    self.sent_len = state.text.len();
                    if text.is_empty() {
                        continue;
                    }
                    Update::Delta(text)
                }
                Err(RecvError::Closed) => return None,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawJobs;
    use serde_json::json;

    fn memory(queue: usize, per_key: usize) -> Memory {
        let mut problems = Vec::new();
        let settings = JobSettings::build(
            &RawJobs {
                queue_size: queue,
                max_queued_per_key: per_key,
                ..RawJobs::default()
            },
            &mut problems,
        );
        assert!(problems.is_empty());
        Memory::new(&settings)
    }

    fn owner(id: &str) -> Arc<Principal> {
        Arc::new(Principal::new(id, None, None))
    }

    /// Submits a job for `key` and takes it as a worker would: it is processing now.
    async fn running(m: &Memory, key: &str, id: &str) -> Arc<Job> {
        m.submit(
            &owner(key),
            Endpoint::ChatCompletions,
            json!({}),
            id.into(),
            None,
        )
        .unwrap();
        let job = m.take().await.unwrap();
        assert!(job.start());
        job
    }

    #[test]
    fn a_client_id_is_idempotent_per_key_and_private_to_it() {
        let m = memory(10, 10);
        let body = json!({"model": "m"});
        let (a, fresh) = m
            .submit(
                &owner("a"),
                Endpoint::ChatCompletions,
                body.clone(),
                "x".into(),
                None,
            )
            .unwrap();
        assert!(fresh);
        let (again, fresh) = m
            .submit(
                &owner("a"),
                Endpoint::ChatCompletions,
                body.clone(),
                "x".into(),
                None,
            )
            .unwrap();
        assert!(!fresh);
        assert_eq!(a.created_us, again.created_us);
        assert!(m.get("b", "x").is_none());
        let (_, fresh) = m
            .submit(
                &owner("b"),
                Endpoint::ChatCompletions,
                body,
                "x".into(),
                None,
            )
            .unwrap();
        assert!(fresh, "the same id chosen by another key is another job");
    }

    #[test]
    fn the_queue_and_each_key_are_bounded() {
        let m = memory(3, 2);
        let mut n = 0;
        let mut submit = |k: &str| {
            n += 1;
            m.submit(
                &owner(k),
                Endpoint::ChatCompletions,
                json!({}),
                format!("j{n}"),
                None,
            )
        };
        submit("a").unwrap();
        submit("a").unwrap();
        assert!(matches!(submit("a"), Err(SubmitError::KeyFull(2))));
        submit("b").unwrap();
        assert!(matches!(submit("c"), Err(SubmitError::QueueFull(3))));
    }

    #[tokio::test]
    async fn a_late_watcher_starts_from_the_text_so_far_without_repeats() {
        let m = memory(3, 3);
        let job = running(&m, "a", "j").await;
        job.delta("one ");
        let (view, text, mut sub) = m.subscribe("a", "j").unwrap();
        assert_eq!((view.status, text.as_str()), (Status::Processing, "one "));
        job.delta("two");
        job.finish(Ok(json!({})), Status::Completed, None);
        let idle = Duration::from_secs(1);
        assert!(matches!(sub.next(idle).await, Some(Some(Update::Delta(t))) if t == "two"));
        assert!(matches!(
            sub.next(idle).await,
            Some(Some(Update::Status(Status::Completed)))
        ));
        assert!(sub.next(idle).await.is_none());
        // Cancelling a finished job changes nothing.
        assert_eq!(m.cancel("a", "j").unwrap().status, Status::Completed);
    }

    #[tokio::test]
    async fn a_cancel_before_the_worker_listens_still_stops_it() {
        let m = memory(3, 3);
        let job = running(&m, "a", "j").await;
        // Cancelled between dequeue and the worker subscribing to the flag.
        m.cancel("a", "j").unwrap();
        let mut flag = job.cancelled();
        tokio::time::timeout(Duration::from_secs(1), flag.wait_for(|c| *c))
            .await
            .expect("the cancel was lost")
            .unwrap();
    }
}
