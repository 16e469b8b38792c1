//! The mutation loop every target runs under: seeds in, mutated inputs out, for a time budget.
//!
//! No coverage instrumentation (that needs a nightly toolchain or a rebuilt dependency tree):
//! the feedback is the target's *outcome*, a hash of what the input reached (which error, which
//! flags of a parsed request). An input that reaches an outcome not seen before joins the corpus
//! and is mutated further, so the loop walks past the first rejection instead of mutating the
//! seeds forever. Mutations are byte edits, dictionary tokens (from the seeds and the target),
//! splices of two corpus entries and, for JSON targets, edits of the parsed tree.
//!
//! A failing input is shrunk (ranges removed while it still fails), written under the cargo
//! target tmpdir and printed as a byte string, with the seed that reproduces the run.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Seconds each target runs when `LUMEN_FUZZ_SECS` is not set: small enough for CI (eight
/// targets, two at a time on two cores), long enough for some ten thousand inputs each.
const DEFAULT_SECS: f64 = 2.0;

/// Most inputs the corpus keeps; past it a new entry replaces a random one.
const CORPUS_CAP: usize = 2048;

/// An execution running this long is reported as a hang (with its input) and aborts the run.
const HANG_SECS: u64 = 30;

/// One fuzz target: where it starts, what it may insert, how large an input may grow.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    /// Tokens to insert besides those taken from the seeds.
    pub dict: Vec<Vec<u8>>,
    pub max_len: usize,
    /// Inputs are JSON documents: also mutate them as trees.
    pub json: bool,
}

/// Hashes what an execution reached: inputs with a new outcome join the corpus.
pub fn outcome(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// An error message as an outcome: what it says before and after the input it quotes (in
/// backticks or double quotes), digits as `#`, so that "column 7" and "column 8", or two
/// unknown field names, are one outcome.
pub fn shape(message: &str) -> String {
    let quote = |c: char| c == '`' || c == '"';
    let text = match (message.find(quote), message.rfind(quote)) {
        (Some(first), Some(last)) => format!("{}…{}", &message[..first], &message[last + 1..]),
        _ => message.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars().take(120) {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

/// Random chunkings of `input` for stream targets, derived from the input alone (so a printed
/// failing input reproduces): whole, one byte at a time (short inputs), and three random ones.
pub fn chunkings(input: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut rng = fastrand::Rng::with_seed(outcome(input));
    let mut all = vec![vec![input]];
    if input.len() <= 2048 {
        all.push(input.chunks(1).collect());
    }
    for _ in 0..3 {
        let mut pieces = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let cap = 1 + rng.usize(1..64);
            let n = rng.usize(1..=rest.len().min(cap));
            let (piece, tail) = rest.split_at(n);
            pieces.push(piece);
            rest = tail;
        }
        all.push(pieces);
    }
    all
}

/// Runs `check` on mutated inputs of `target` for the time budget; panics (with the shrunk
/// input) when `check` panics. `check` returns the input's [`outcome`].
pub fn fuzz(target: Target, check: impl Fn(&[u8]) -> u64) {
    let budget = Duration::from_secs_f64(
        std::env::var("LUMEN_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .unwrap_or(DEFAULT_SECS),
    );
    let seed = std::env::var("LUMEN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let mut fuzzer = Fuzzer::new(&target, seed);
    let watchdog = Watchdog::start(target.name);
    let started = Instant::now();
    let run = |input: &[u8]| {
        watchdog.enter(input);
        match panic::catch_unwind(AssertUnwindSafe(|| check(input))) {
            Ok(reached) => reached,
            Err(payload) => fail(&target, seed, input, &*payload, &check),
        }
    };
    let mut seen = HashSet::new();
    for input in fuzzer.corpus.clone() {
        seen.insert(run(&input));
    }
    let mut execs = fuzzer.corpus.len() as u64;
    while started.elapsed() < budget {
        for _ in 0..32 {
            let input = fuzzer.mutated();
            execs += 1;
            if seen.insert(run(&input)) {
                fuzzer.keep(input);
            }
        }
    }
    watchdog.stop();
    eprintln!(
        "fuzz {}: {execs} executions in {:.1}s, {} outcomes, corpus {} (LUMEN_FUZZ_SEED={seed})",
        target.name,
        started.elapsed().as_secs_f64(),
        seen.len(),
        fuzzer.corpus.len(),
    );
}

/// Shrinks a failing input, saves it and fails the test with it.
fn fail(
    target: &Target,
    seed: u64,
    input: &[u8],
    payload: &(dyn std::any::Any + Send),
    check: &impl Fn(&[u8]) -> u64,
) -> ! {
    let message = panic_message(payload);
    // Quiet while shrinking: every attempt that still fails would print its panic.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let fails =
        |candidate: &[u8]| panic::catch_unwind(AssertUnwindSafe(|| check(candidate))).is_err();
    let small = shrink(input, fails);
    let small_message = panic::catch_unwind(AssertUnwindSafe(|| check(&small)))
        .err()
        .map(|p| panic_message(&*p))
        .unwrap_or_default();
    panic::set_hook(hook);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let file = dir.join(format!("{}-{:016x}.bin", target.name, outcome(&small)));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &small));
    panic!(
        "fuzz target `{}` failed (LUMEN_FUZZ_SEED={seed}): {message}\n\
         shrunk input ({} of {} bytes{}): b\"{}\"\n\
         shrunk input fails with: {small_message}",
        target.name,
        small.len(),
        input.len(),
        match saved {
            Ok(()) => format!(", saved to {}", file.display()),
            Err(_) => String::new(),
        },
        escape(&small),
    );
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Removes ranges, halving their size, while the input still fails (a simple ddmin), within a
/// few thousand attempts.
fn shrink(input: &[u8], fails: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut best = input.to_vec();
    let mut attempts = 0;
    let mut size = best.len() / 2;
    while size > 0 && attempts < 4000 {
        let mut at = 0;
        let mut removed = false;
        while at < best.len() && attempts < 4000 {
            let end = (at + size).min(best.len());
            let mut candidate = best[..at].to_vec();
            candidate.extend_from_slice(&best[end..]);
            attempts += 1;
            if fails(&candidate) {
                best = candidate;
                removed = true;
            } else {
                at += size;
            }
        }
        if !removed {
            size /= 2;
        }
    }
    best
}

/// Bytes as a Rust byte-string body.
pub fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// Aborts the test binary, printing the input, when one execution runs past [`HANG_SECS`].
struct Watchdog {
    current: Arc<Mutex<Vec<u8>>>,
    progress: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(name: &'static str) -> Watchdog {
        let dog = Watchdog {
            current: Arc::default(),
            progress: Arc::default(),
            done: Arc::default(),
        };
        let (current, progress, done) =
            (dog.current.clone(), dog.progress.clone(), dog.done.clone());
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = progress.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(HANG_SECS) {
                    let input = current.lock().map(|i| i.clone()).unwrap_or_default();
                    eprintln!(
                        "fuzz target `{name}` hangs (over {HANG_SECS}s) on input b\"{}\"",
                        escape(&input)
                    );
                    std::process::abort();
                }
            }
        });
        dog
    }

    fn enter(&self, input: &[u8]) {
        if let Ok(mut current) = self.current.lock() {
            current.clear();
            current.extend_from_slice(input);
        }
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn stop(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The corpus and the mutators.
struct Fuzzer {
    rng: fastrand::Rng,
    corpus: Vec<Vec<u8>>,
    dict: Vec<Vec<u8>>,
    /// Dictionary entries that are plain words: keys for JSON tree edits.
    words: Vec<String>,
    max_len: usize,
    json: bool,
}

/// Bytes that often sit on a parser's decision points.
const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\"\\{}[],:\n\r\t .-+0123456789eE$/%*?#&|>'";

/// Tokens worth inserting into any text input.
const COMMON: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "-0.0",
    "1.5",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "\"\"",
    "{}",
    "[]",
    "\\u0000",
    "\\ud800",
    "\\\"",
    "\u{feff}",
    "é",
    "\r\n",
    "\n\n",
    "data: ",
    "[DONE]",
];

impl Fuzzer {
    fn new(target: &Target, seed: u64) -> Fuzzer {
        let mut corpus: Vec<Vec<u8>> = Vec::new();
        for s in &target.seeds {
            let mut s = s.clone();
            s.truncate(target.max_len);
            if !corpus.contains(&s) {
                corpus.push(s);
            }
        }
        if corpus.is_empty() {
            corpus.push(Vec::new());
        }
        let mut dict: Vec<Vec<u8>> = COMMON.iter().map(|t| t.as_bytes().to_vec()).collect();
        dict.extend(target.dict.iter().cloned());
        for s in &corpus {
            dict.extend(tokens_of(s));
        }
        dict.sort();
        dict.dedup();
        let words = dict
            .iter()
            .filter_map(|t| std::str::from_utf8(t).ok())
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .map(str::to_string)
            .collect();
        Fuzzer {
            rng: fastrand::Rng::with_seed(seed ^ outcome(target.name)),
            corpus,
            dict,
            words,
            max_len: target.max_len,
            json: target.json,
        }
    }

    fn keep(&mut self, input: Vec<u8>) {
        if self.corpus.len() < CORPUS_CAP {
            self.corpus.push(input);
        } else {
            let at = self.rng.usize(..self.corpus.len());
            self.corpus[at] = input;
        }
    }

    fn mutated(&mut self) -> Vec<u8> {
        let base = self.rng.usize(..self.corpus.len());
        let mut data = self.corpus[base].clone();
        if self.json && self.rng.u8(..) < 96 {
            if let Some(edited) = self.edit_tree(&data) {
                data = edited;
                if self.rng.bool() {
                    data.truncate(self.max_len);
                    return data;
                }
            }
        }
        for _ in 0..1 + self.rng.usize(..4) {
            self.mutate_bytes(&mut data);
        }
        data.truncate(self.max_len);
        data
    }

    fn token(&mut self) -> Vec<u8> {
        self.dict[self.rng.usize(..self.dict.len())].clone()
    }

    fn mutate_bytes(&mut self, data: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let len = data.len();
        match rng.u8(..10) {
            0 if len > 0 => data[rng.usize(..len)] ^= 1 << rng.u8(..8),
            1 if len > 0 => data[rng.usize(..len)] = INTERESTING[rng.usize(..INTERESTING.len())],
            2 => {
                let at = rng.usize(..=len);
                let token = self.token();
                data.splice(at..at, token);
            }
            3 if len > 0 => {
                let at = self.rng.usize(..len);
                let end = (at + self.rng.usize(1..16)).min(len);
                let token = self.token();
                data.splice(at..end, token);
            }
            4 if len > 0 => {
                let at = rng.usize(..len);
                let end = (at + rng.usize(1..=16.min(len))).min(len);
                data.drain(at..end);
            }
            5 if len > 0 => {
                let at = rng.usize(..len);
                let end = (at + rng.usize(1..64)).min(len);
                let copy = data[at..end].to_vec();
                let to = rng.usize(..=len);
                data.splice(to..to, copy);
            }
            6 => {
                let other = &self.corpus[self.rng.usize(..self.corpus.len())];
                let cut = self.rng.usize(..=len);
                let from = self.rng.usize(..=other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            7 => {
                let at = rng.usize(..=len);
                let n = rng.usize(1..8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                data.splice(at..at, bytes);
            }
            8 => {
                let at = self.rng.usize(..=len);
                let times = self.rng.usize(2..80);
                let token = self.token();
                let repeated = token.repeat(times);
                data.splice(at..at, repeated);
            }
            _ if len > 0 => data.truncate(rng.usize(..len)),
            _ => data.push(rng.u8(..)),
        }
    }

    /// Parses `data` as JSON and edits one node of the tree; `None` if it is not JSON.
    fn edit_tree(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let mut tree: Value = serde_json::from_slice(data).ok()?;
        let donor = pick(&mut self.rng, &tree).clone();
        let replacement = match self.rng.u8(..4) {
            0 => donor,
            _ => self.value(),
        };
        let rng = &mut self.rng;
        let node = pick_mut(rng, &mut tree);
        match (rng.u8(..5), node) {
            (0, Value::Object(map)) if !map.is_empty() => {
                let key = map.keys().nth(rng.usize(..map.len())).cloned();
                if let Some(key) = key {
                    map.remove(&key);
                }
            }
            (1, Value::Object(map)) if !self.words.is_empty() => {
                let key = self.words[rng.usize(..self.words.len())].clone();
                map.insert(key, replacement);
            }
            (2, Value::Array(items)) => {
                let at = rng.usize(..=items.len());
                items.insert(at, replacement);
            }
            (3, node) => *node = Value::Array(vec![node.take()]),
            (_, node) => *node = replacement,
        }
        if self.rng.u8(..4) == 0 {
            serde_json::to_vec_pretty(&tree).ok()
        } else {
            serde_json::to_vec(&tree).ok()
        }
    }

    /// A small value: a scalar at a type boundary, a word from the dictionary, an empty list.
    fn value(&mut self) -> Value {
        let word = |f: &mut Fuzzer| {
            if f.words.is_empty() {
                String::new()
            } else {
                f.words[f.rng.usize(..f.words.len())].clone()
            }
        };
        match self.rng.u8(..14) {
            0 => Value::Null,
            1 => Value::Bool(self.rng.bool()),
            2 => Value::from(0),
            3 => Value::from(u64::MAX),
            4 => Value::from(i64::MIN),
            5 => Value::from(-0.5),
            6 => Value::from(1.0e300),
            7 => Value::from(self.rng.u64(..3000)),
            8 => Value::String(String::new()),
            9 => Value::Array(Vec::new()),
            10 => Value::Object(Map::new()),
            11 => Value::Array(vec![Value::String(word(self))]),
            _ => Value::String(word(self)),
        }
    }
}

/// A random node of the tree (the root, or a descendant reached by a random walk).
fn pick<'a>(rng: &mut fastrand::Rng, mut node: &'a Value) -> &'a Value {
    loop {
        if rng.u8(..3) == 0 {
            return node;
        }
        node = match node {
            Value::Object(map) if !map.is_empty() => {
                map.values().nth(rng.usize(..map.len())).unwrap_or(node)
            }
            Value::Array(items) if !items.is_empty() => &items[rng.usize(..items.len())],
            _ => return node,
        };
    }
}

fn pick_mut<'a>(rng: &mut fastrand::Rng, node: &'a mut Value) -> &'a mut Value {
    if rng.u8(..3) == 0 {
        return node;
    }
    let descend = match node {
        Value::Object(map) if !map.is_empty() => Some(rng.usize(..map.len())),
        Value::Array(items) if !items.is_empty() => Some(rng.usize(..items.len())),
        _ => None,
    };
    match (descend, node) {
        (Some(i), Value::Object(map)) => match map.values_mut().nth(i) {
            Some(child) => pick_mut(rng, child),
            None => unreachable!("index below the map's length"),
        },
        (Some(i), Value::Array(items)) => pick_mut(rng, &mut items[i]),
        (_, node) => node,
    }
}

/// Dictionary tokens found in a seed: quoted strings, words, and `key:` prefixes.
fn tokens_of(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < seed.len() {
        let b = seed[i];
        if b == b'"' {
            if let Some(end) = seed[i + 1..].iter().position(|c| *c == b'"') {
                if end <= 32 {
                    tokens.push(seed[i..i + end + 2].to_vec());
                }
            }
        }
        if b.is_ascii_alphabetic() || b == b'_' {
            let end = seed[i..]
                .iter()
                .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                .map_or(seed.len(), |n| i + n);
            if end - i <= 24 {
                tokens.push(seed[i..end].to_vec());
                if seed.get(end) == Some(&b':') {
                    tokens.push(seed[i..=end].to_vec());
                }
            }
            i = end;
            continue;
        }
        i += 1;
    }
    tokens
}
