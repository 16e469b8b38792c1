//! A minimal HTTP/1.1 client over one keep-alive TCP connection: enough to drive the gateway
//! in tests and benchmarks, and to see each response chunk with the time it arrived (which a
//! buffering client would hide).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A complete response, with the body's chunks as they arrived.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// (time since the request was sent, chunk bytes) for chunked bodies; one entry otherwise.
    pub chunks: Vec<(Duration, Vec<u8>)>,
    /// Time from sending the request to the response head.
    pub head_after: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }

    /// The assistant text of a chat completion stream: every `delta.content`, in order.
    pub fn chat_stream_text(&self) -> String {
        self.sse_data()
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// One connection; requests on it go one after another (keep-alive).
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let sent = self.send(method, path, headers, body).await?;
        self.read_response(sent, method == "HEAD").await
    }

    /// Sends a request and reads only the response head (the returned body is empty): read a
    /// chunked body as it arrives with [`Client::next_chunk`] (an SSE stream, event by event),
    /// or stop reading it to play a client that stalls or goes away.
    pub async fn request_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let sent = self.send(method, path, headers, body).await?;
        self.read_head(sent).await
    }

    /// The next chunk of a chunked body whose head [`Client::request_head`] read; `None` after
    /// the last one.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let size_line = String::from_utf8_lossy(&self.read_line().await?).into_owned();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, size_line.clone()))?;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            while !self.read_line().await?.is_empty() {}
            return Ok(None);
        }
        let chunk = self.read_exact_buf(size).await?;
        self.read_line().await?;
        Ok(Some(chunk))
    }

    /// Writes a request; returns when it was sent.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Instant> {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            // The address connected to, as real clients send it.
            let host = self
                .stream
                .peer_addr()
                .map_or_else(|_| "localhost".to_string(), |a| a.to_string());
            head.push_str(&format!("host: {host}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body);
        let sent = Instant::now();
        self.stream.write_all(&wire).await?;
        Ok(sent)
    }

    /// `POST` a JSON body.
    pub async fn post_json(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> io::Result<Response> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.request("POST", path, &all, &serde_json::to_vec(body)?)
            .await
    }

    /// Writes `bytes` exactly as given (pipelined, malformed or trickled requests); read the
    /// answers with [`Client::response`].
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads the next response on the connection (after [`Client::send_raw`]).
    pub async fn response(&mut self) -> io::Result<Response> {
        self.read_response(Instant::now(), false).await
    }

    /// Waits until the server closes the connection (EOF or reset), discarding what it sends;
    /// `Err` when it is still open after `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> Result<Duration, Duration> {
        let started = Instant::now();
        let mut tmp = [0u8; 4096];
        loop {
            match tokio::time::timeout_at((started + limit).into(), self.stream.read(&mut tmp))
                .await
            {
                Err(_) => return Err(started.elapsed()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..pos].to_vec();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn read_exact_buf(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads a status line and headers; the body is left on the connection.
    async fn read_head(&mut self, sent: Instant) -> io::Result<Response> {
        let status_line = String::from_utf8_lossy(&self.read_line().await?).into_owned();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
        let head_after = sent.elapsed();
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok(Response {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
            head_after,
        })
    }

    async fn read_response(&mut self, sent: Instant, head_only: bool) -> io::Result<Response> {
        let mut response = self.read_head(sent).await?;
        if head_only || response.status == 204 || response.status == 304 {
            return Ok(response);
        }
        let get = |name: &str| {
            response
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            while let Some(chunk) = self.next_chunk().await? {
                response.body.extend_from_slice(&chunk);
                response.chunks.push((sent.elapsed(), chunk));
            }
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let body = self.read_exact_buf(len).await?;
            response.chunks.push((sent.elapsed(), body.clone()));
            response.body = body;
        } else {
            // Close-delimited.
            loop {
                match self.fill().await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    Client::connect(addr)
        .await?
        .request(method, path, headers, body)
        .await
}
