//! A real OTLP trace receiver, the collector's side of the wire: OTLP/HTTP (protobuf bodies
//! posted to `/v1/traces`) or OTLP/gRPC (HTTP/2, `TraceService/Export`), the messages decoded
//! with `opentelemetry-proto`. It keeps every span it receives for tests to read.
//!
//! [`OtlpReceiver::stuck`] is a collector that accepts connections and never answers, to show
//! that a collector in trouble never slows or fails a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One received span, its ids in lower-case hex (as in `traceparent`).
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    /// 1 internal, 2 server, 3 client (OTLP's `SpanKind`).
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// 2: error (OTLP's `StatusCode`).
    pub status: i32,
    /// The spans it links to: (trace id, span id).
    pub links: Vec<(String, String)>,
}

impl Span {
    pub fn attr(&self, key: &str) -> &serde_json::Value {
        self.attributes.get(key).unwrap_or(&serde_json::Value::Null)
    }
}

type Store = Arc<Mutex<Vec<Span>>>;

/// A receiver on 127.0.0.1, on its own runtime thread; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Store,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone, Copy)]
enum Mode {
    Http,
    Grpc,
    Stuck,
}

impl OtlpReceiver {
    /// OTLP/HTTP: `tracing: { otlp: <url()> }`.
    pub fn http() -> OtlpReceiver {
        OtlpReceiver::start(Mode::Http)
    }

    /// OTLP/gRPC: `tracing: { otlp: <url()>, protocol: grpc }`.
    pub fn grpc() -> OtlpReceiver {
        OtlpReceiver::start(Mode::Grpc)
    }

    /// Accepts connections, reads what comes, never answers.
    pub fn stuck() -> OtlpReceiver {
        OtlpReceiver::start(Mode::Stuck)
    }

    fn start(mode: Mode) -> OtlpReceiver {
        let spans: Store = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let store = spans.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                ready_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("ready");
                let accept = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        let store = store.clone();
                        tokio::spawn(async move {
                            match mode {
                                Mode::Http => http_connection(stream, store).await,
                                Mode::Grpc => grpc_connection(stream, store).await,
                                Mode::Stuck => stuck_connection(stream).await,
                            }
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver started");
        OtlpReceiver {
            addr,
            spans,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `done` holds for the spans received (or panics after `limit`).
    pub fn wait_for(&self, limit: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not get the spans wanted; it has {}: {:#?}",
                spans.len(),
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> serde_json::Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone().into(),
        Some(Any::BoolValue(b)) => (*b).into(),
        Some(Any::IntValue(i)) => (*i).into(),
        Some(Any::DoubleValue(d)) => (*d).into(),
        Some(Any::ArrayValue(a)) => a.values.iter().map(|v| value(Some(v))).collect(),
        _ => serde_json::Value::Null,
    }
}

/// Decodes one export request into `store`.
fn keep(body: &[u8], store: &Store) -> bool {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return false;
    };
    let mut out = store.lock().unwrap_or_else(|p| p.into_inner());
    for rs in &request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| value(kv.value.as_ref()))
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(Span {
                    service: service.clone(),
                    name: s.name.clone(),
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                        .collect(),
                    status: s.status.as_ref().map_or(0, |st| st.code),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    true
}

/// HTTP/1.1 with keep-alive: `POST /v1/traces` with a protobuf body (a length, not chunks).
async fn http_connection(mut stream: TcpStream, store: Store) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
        let ok = head.starts_with("post /v1/traces ") && keep(&body, &store);
        let answer: &[u8] = if ok {
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// gRPC over HTTP/2: each message is a 5-byte prefix (compressed flag, length) and protobuf.
async fn grpc_connection(stream: TcpStream, store: Store) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let store = store.clone();
        tokio::spawn(async move {
            let path = request.uri().path().to_string();
            let mut body = request.into_body();
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let ok = path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                && data.len() >= 5
                && data[0] == 0
                && keep(&data[5..], &store);
            let head = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .expect("response head");
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            if ok {
                // An empty ExportTraceServiceResponse.
                let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false);
            }
            let mut trailers = http::HeaderMap::new();
            let status = if ok { "0" } else { "3" };
            trailers.insert("grpc-status", http::HeaderValue::from_static(status));
            let _ = send.send_trailers(trailers);
        });
    }
}

async fn stuck_connection(mut stream: TcpStream) {
    let mut sink = [0u8; 65536];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}
