//! The `lumen` command: `serve` runs the gateway, `check` validates a config (like `nginx -t`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc malloc showed up in the gateway's profile (arena contention, mprotect on growth);
// mimalloc's thread-local free lists suit a proxy's many short-lived buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Validate a config file and exit: 0 when valid, 1 with every problem listed otherwise.
    Check {
        #[arg(long, short, default_value = "conf/lumen.yaml")]
        config: PathBuf,
    },
    /// API keys: make one, or hash one for the `keys:` list (keys are stored hashed).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
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
        Command::Keys { command } => keys(command),
        Command::Check { config } => match lumen::config::load(&config) {
            Ok(snapshot) => {
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
    // The guard flushes on drop; the process lives until exit, so it is leaked on purpose.
    std::mem::forget(guard);
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
