//! The `lumen` command: `serve` runs the gateway, `worker` runs async-job workers only, `check`
//! validates a config (like `nginx -t`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc malloc showed up in the gateway's profile (arena contention, mprotect on growth);
// mimalloc's thread-local free lists suit a proxy's many short-lived buffers.
#[global_allocator]
static GLOBAL: Allocator = Allocator;

/// mimalloc, through its plain entry points when the alignment asked for is one every block
/// has anyway. `mimalloc::MiMalloc` sends every allocation through `mi_malloc_aligned`, whose
/// fast path only covers small blocks: the rest (request futures, buffers) took the generic
/// path, about 1% of a request's instructions.
struct Allocator;

/// What mimalloc's plain allocations are aligned to: 16 bytes for blocks of 16 bytes or
/// more, 8 for smaller ones (as glibc's, and as Rust's `System` allocator assumes).
fn plain(layout: std::alloc::Layout) -> bool {
    layout.align() <= 8 || (layout.align() <= 16 && layout.size() >= 16)
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from
// either entry point); an alignment mimalloc's plain calls do not promise goes through its
// aligned calls, as `mimalloc::MiMalloc` does.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        if plain(layout) {
            // SAFETY: any size is valid for mi_malloc.
            unsafe { mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: `Layout` guarantees a power-of-two alignment.
            unsafe { mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        if plain(layout) {
            // SAFETY: as in `alloc`.
            unsafe { mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: as in `alloc`.
            unsafe { mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        let grown = std::alloc::Layout::from_size_align(new_size, layout.align());
        if plain(layout) && grown.is_ok_and(plain) {
            // SAFETY: `ptr` came from mimalloc; the new block keeps a plain alignment.
            unsafe { mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: as in `alloc`; `ptr` came from mimalloc.
            unsafe { mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

#[derive(Parser)]
#[command(
    name = "lumen",
    version,
    about = "An OpenAI-compatible LLM gateway for the edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short, default_value = "conf/lumen.yaml")]
        config: PathBuf,
        /// Take the listening sockets over from the running Lumen (then send it SIGQUIT):
        /// a binary upgrade that drops no connection.
        #[arg(long)]
        upgrade: bool,
    },
    /// Run async-job workers only: no listeners, jobs taken from the fleet's Redis queue
    /// (the config must set `redis:`), so a fleet scales by adding workers.
    Worker {
        #[arg(long, short, default_value = "conf/lumen.yaml")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 1 with every problem listed otherwise.
    Check {
        #[arg(long, short, default_value = "conf/lumen.yaml")]
        config: PathBuf,
    },
    /// The gateway's state from its admin API: providers, circuits, load, quota, last errors,
    /// the config and its last reload. Exit code 1 when something needs attention, 2 when the
    /// gateway cannot be asked.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Usage per key, provider, model and day (requests, tokens, errors, cache hits).
    Usage {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// How far back: `24h`, `7d`, `90m` (whole UTC days; default today).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The routes and what each resolves to.
    Models {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// API keys: make one, or hash one for the `keys:` list (keys are stored hashed).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// Where the admin API is: `--admin`, else `admin_listen` of `--config`, else the default.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin listener, `host:port` or `http://host:port`.
    #[arg(long)]
    admin: Option<String>,
    /// Read `admin_listen` from this config when `--admin` is not given.
    #[arg(long, short, default_value = "conf/lumen.yaml")]
    config: PathBuf,
    /// The admin key (when `admin_key:` is set); also read from LUMEN_ADMIN_KEY.
    #[arg(long)]
    admin_key: Option<String>,
}

impl AdminArgs {
    fn target(&self) -> lumen::admin::cli::Target {
        let addr = match &self.admin {
            Some(a) => a
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            None => lumen::config::load(&self.config)
                .map(|s| s.admin_listen.clone())
                .unwrap_or_else(|_| "127.0.0.1:9090".into()),
        };
        lumen::admin::cli::Target {
            addr,
            key: self.admin_key.clone().or_else(|| {
                std::env::var("LUMEN_ADMIN_KEY")
                    .ok()
                    .filter(|k| !k.is_empty())
            }),
        }
    }
}

/// Prints a command's answer: the table, or the JSON with `--json`.
fn print_answer(
    answer: Result<(String, serde_json::Value), lumen::admin::cli::CliError>,
    json: bool,
) -> ExitCode {
    match answer {
        Ok((table, value)) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            } else {
                print!("{table}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lumen: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key and the `sha256` to put in the config.
    Generate,
    /// Read a key from stdin and print its `sha256`.
    Hash,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, upgrade } => {
            init_logging();
            if let Err(e) = lumen::run(&config, upgrade) {
                eprintln!("lumen: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Worker { config } => {
            init_logging();
            if let Err(e) = lumen::run_worker(&config) {
                eprintln!("lumen: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Keys { command } => keys(command),
        Command::Status { admin, json } => match lumen::admin::cli::status(&admin.target()) {
            Ok((table, value, healthy)) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&value).unwrap_or_default()
                    );
                } else {
                    print!("{table}");
                }
                if healthy {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("lumen: {e}");
                ExitCode::from(2)
            }
        },
        Command::Usage {
            admin,
            key,
            provider,
            model,
            since,
            json,
        } => {
            let mut query = Vec::new();
            for (name, value) in [("key", key), ("provider", provider), ("model", model)] {
                if let Some(v) = value {
                    query.push(format!("{name}={}", encode(&v)));
                }
            }
            if let Some(since) = since {
                let Some(days) = lumen::admin::cli::since_days(&since) else {
                    eprintln!(
                        "lumen: --since takes a duration such as 24h, 7d or 90m, not `{since}`"
                    );
                    return ExitCode::from(2);
                };
                let from = lumen::ledger::Day::today().minus(days.saturating_sub(1).max(0));
                query.push(format!("from={from}"));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            print_answer(lumen::admin::cli::usage(&admin.target(), &query), json)
        }
        Command::Models { admin, json } => {
            print_answer(lumen::admin::cli::models(&admin.target()), json)
        }
        Command::Check { config } => match lumen::config::load(&config) {
            Ok(snapshot) => {
                for warning in snapshot.auth.warnings() {
                    eprintln!("warning: {warning}");
                }
                for warning in snapshot.unpriced() {
                    eprintln!("warning: {warning}");
                }
                if let Some((file, as_of)) = &snapshot.prices.catalog {
                    println!(
                        "prices: {file} (as of {as_of}) and {} entries in all",
                        snapshot.prices.len()
                    );
                }
                let (keys, issuers) = snapshot.auth.counts();
                println!(
                    "{}: ok ({} providers, {} routes, {keys} keys, {issuers} JWT issuers)",
                    config.display(),
                    snapshot.providers.len(),
                    snapshot.routes.model_names().count()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs go to stderr through a background writer thread, so a slow terminal or journal never
/// blocks a request. `LUMEN_LOG` (or `RUST_LOG`) sets the filter; `LUMEN_LOG_FORMAT=json` for
/// structured output.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("LUMEN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    // The guard flushes on drop. The process lives until it exits, and a drained node exits
    // from the library (`std::process::exit`, which runs no destructors): the guard is kept
    // for the exit hook, which drops it so the last lines are written.
    static GUARD: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
        std::sync::Mutex::new(None);
    if let Ok(mut slot) = GUARD.lock() {
        *slot = Some(guard);
    }
    lumen::drain::set_exit_hook(|| {
        if let Ok(mut slot) = GUARD.lock() {
            drop(slot.take());
        }
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    if std::env::var("LUMEN_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn keys(command: KeysCommand) -> ExitCode {
    match command {
        KeysCommand::Generate => {
            let (key, hash) = lumen_plugins::auth::generate_key();
            println!("key:    {key}");
            println!("sha256: {hash}");
            eprintln!("Give the key to the client once; put only the sha256 in the config.");
            ExitCode::SUCCESS
        }
        KeysCommand::Hash => {
            let mut input = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                eprintln!("lumen: cannot read the key from stdin: {e}");
                return ExitCode::FAILURE;
            }
            let key = input.trim_end_matches(['\n', '\r']);
            if key.is_empty() {
                eprintln!("lumen: no key on stdin (try: printf %s \"$KEY\" | lumen keys hash)");
                return ExitCode::FAILURE;
            }
            println!("{}", lumen_plugins::auth::hash_key(key));
            ExitCode::SUCCESS
        }
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
