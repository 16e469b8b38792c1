//! `lumen-mock-upstream`: the mock OpenAI-compatible provider as a process, for benchmarks and
//! for tests written in other languages (the Python SDK tests).
//!
//! Usage: `lumen-mock-upstream [--port N] [--threads N] [--record]`. Prints `listening on ADDR`
//! once ready.

use lumen_test_support::mock::MockUpstream;

fn main() {
    let mut port = 0u16;
    let mut threads = 1usize;
    let mut record = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--record" => record = true,
            other => {
                eprintln!("unknown argument `{other}`; usage: lumen-mock-upstream [--port N] [--threads N] [--record]");
                std::process::exit(2);
            }
        }
    }
    let mock = MockUpstream::start_on(port, record, threads);
    println!("listening on {}", mock.addr);
    loop {
        std::thread::park();
    }
}
