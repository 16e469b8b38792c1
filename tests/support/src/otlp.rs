//! A real OTLP trace receiver, the collector's side of the wire: OTLP/HTTP (protobuf bodies
//! posted to `/v1/traces`) or OTLP/gRPC (HTTP/2, `TraceService/Export`), the messages decoded
//! with `opentelemetry-proto`. It keeps every span it receives for tests to read.
//!
//! [`OtlpReceiver::stuck`] is a collector that accepts connections and never answers, to show
//! that a collector in trouble never slows or fails a request. [`OtlpReceiver::tls`] serves
//! either protocol over TLS (an https:// collector), with a certificate from
//! [`crate::harness::test_ca`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

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

/// What the receiver got: the spans, and the headers of every export request.
#[derive(Default)]
struct Got {
    spans: Vec<Span>,
    headers: Vec<(String, String)>,
}

type Store = Arc<Mutex<Got>>;

/// A receiver on 127.0.0.1, on its own runtime thread; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    got: Store,
    tls: bool,
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
        OtlpReceiver::start(Mode::Http, None)
    }

    /// OTLP/gRPC: `tracing: { otlp: <url()>, protocol: grpc }`.
    pub fn grpc() -> OtlpReceiver {
        OtlpReceiver::start(Mode::Grpc, None)
    }

    /// Accepts connections, reads what comes, never answers.
    pub fn stuck() -> OtlpReceiver {
        OtlpReceiver::start(Mode::Stuck, None)
    }

    /// OTLP/HTTP (`grpc`: false) or gRPC over TLS, with the certificate and key (PEM) given;
    /// `url()` is https://.
    pub fn tls(grpc: bool, cert_pem: &[u8], key_pem: &[u8]) -> OtlpReceiver {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(key_pem).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mode = if grpc { Mode::Grpc } else { Mode::Http };
        OtlpReceiver::start(
            mode,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    fn start(mode: Mode, tls: Option<tokio_rustls::TlsAcceptor>) -> OtlpReceiver {
        let got: Store = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let store = got.clone();
        let secure = tls.is_some();
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
                        let (store, tls) = (store.clone(), tls.clone());
                        tokio::spawn(async move {
                            match tls {
                                None => serve(mode, stream, store).await,
                                Some(tls) => {
                                    if let Ok(stream) = tls.accept(stream).await {
                                        serve(mode, stream, store).await;
                                    }
                                }
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
            got,
            tls: secure,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap_or_else(|p| p.into_inner());
        got.spans.clone()
    }

    /// The values of header `name` on the export requests received so far.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let got = self.got.lock().unwrap_or_else(|p| p.into_inner());
        got.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
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

/// One connection, whatever carries it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mode: Mode,
    stream: S,
    store: Store,
) {
    match mode {
        Mode::Http => http_connection(stream, store).await,
        Mode::Grpc => grpc_connection(stream, store).await,
        Mode::Stuck => stuck_connection(stream).await,
    }
}

/// Decodes one export request (its `headers`, its protobuf `body`) into `store`.
fn keep(headers: Vec<(String, String)>, body: &[u8], store: &Store) -> bool {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return false;
    };
    let mut got = store.lock().unwrap_or_else(|p| p.into_inner());
    got.headers.extend(headers);
    let out = &mut got.spans;
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
async fn http_connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, store: Store) {
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
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let ok = head.starts_with("post /v1/traces ") && keep(headers, &body, &store);
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
async fn grpc_connection<S: AsyncRead + AsyncWrite + Unpin>(stream: S, store: Store) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let store = store.clone();
        tokio::spawn(async move {
            let path = request.uri().path().to_string();
            let headers = request
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let mut body = request.into_body();
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let ok = path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                && data.len() >= 5
                && data[0] == 0
                && keep(headers, &data[5..], &store);
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

async fn stuck_connection<S: AsyncRead + Unpin>(mut stream: S) {
    let mut sink = [0u8; 65536];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}
