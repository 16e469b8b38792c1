//! `lumen-bare-proxy`: the benchmark's reference for "Pingora as it comes": a `ProxyHttp` that
//! only picks the peer, on the same `pingora` version and features as Lumen, with Pingora's
//! default settings and one thread per core. Lumen owns its forwarding loop; this shows what
//! Pingora's generic proxy path costs on the same machine, in the same run.
//!
//! Usage: `lumen-bare-proxy --listen ADDR --upstream ADDR`. Prints `listening on ADDR` once
//! the listener is bound.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut listen = None;
    let mut upstream = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--upstream" => upstream = args.next().and_then(|v| v.parse().ok()),
            other => {
                eprintln!("unknown argument `{other}`; usage: lumen-bare-proxy --listen ADDR --upstream ADDR");
                std::process::exit(2);
            }
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        eprintln!("usage: lumen-bare-proxy --listen ADDR --upstream ADDR");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Bare { upstream });
    service.add_tcp(&listen);
    server.add_service(service);
    println!("listening on {listen}");
    server.run_forever();
}
