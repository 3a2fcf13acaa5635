//! The live preview (`stream --serve ADDR`): a small HTTP server for an edge box without a
//! screen. `/` is a page with the annotated video and live numbers, `/stream.mjpg` the annotated
//! frames as `multipart/x-mixed-replace` JPEG (what browsers and VLC show as video), and
//! `/stats.json` the numbers as one JSON object.
//!
//! The pipeline never waits for a viewer: it hands the newest frame to an encoder thread, which
//! annotates and encodes only the newest one, and only while somebody watches. Each viewer's
//! thread sends the newest JPEG whenever its socket takes it and skips the rest; a viewer whose
//! socket stays full for [`IO_TIMEOUT`] is dropped. Requests are parsed with `httparse`; every
//! connection is answered and closed (no keep-alive), so a connection costs one short-lived
//! thread, and at most [`MAX_CONNECTIONS`] exist at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use image::DynamicImage;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::pipeline::FrameResult;
use crate::Prediction;

/// The environment variable `--serve-token` falls back to.
pub const TOKEN_ENV: &str = "WAE_EDGE_SERVE_TOKEN";
/// Viewers of `/stream.mjpg` at once, by default; more get 503.
pub const MAX_VIEWERS: usize = 4;
/// Open connections at once (viewers included); more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest a viewer's socket may refuse data, or a client take to send its request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Frames whose stage times make the live p50s.
const STAGE_WINDOW: usize = 64;
/// How often `/stats.json` is rebuilt from the frames: often enough for a page polling twice a
/// second, rarely enough to cost nothing at thousands of frames a second.
const STATS_EVERY: Duration = Duration::from_millis(100);
/// Frames shorter than this are enlarged for the preview.
const MIN_SHOWN_HEIGHT: u32 = 240;
/// JPEG quality of the preview frames.
const JPEG_QUALITY: u8 = 80;

/// The page: inline script and style only, nothing fetched from elsewhere.
const PAGE: &str = include_str!("preview.html");

/// Why the preview cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The address cannot be bound.
    #[error("--serve {addr}: {cause}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// What the preview serves and to whom.
#[derive(Clone, Debug)]
pub struct PreviewOptions {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Required on every request (`?token=` or `Authorization: Bearer`), if set.
    pub token: Option<String>,
    /// Viewers of the MJPEG stream at once.
    pub max_viewers: usize,
    /// The model's name, shown on the page.
    pub model: String,
}

/// The newest encoded frame and its sequence number.
#[derive(Default)]
struct Encoded {
    seq: u64,
    jpeg: Arc<Vec<u8>>,
}

/// What the server threads share.
struct Shared {
    options: PreviewOptions,
    /// The newest classified frame and its best class, waiting for the encoder.
    raw: Mutex<Option<(DynamicImage, Prediction)>>,
    raw_ready: Condvar,
    /// The newest JPEG, for viewers.
    encoded: Mutex<Encoded>,
    encoded_ready: Condvar,
    /// The `/stats.json` object.
    stats: Mutex<Value>,
    viewers: AtomicUsize,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// The counter of open connections.
fn connections(s: &Shared) -> &AtomicUsize {
    &s.connections
}

/// The counter of video viewers.
fn viewers(s: &Shared) -> &AtomicUsize {
    &s.viewers
}

/// One of a bounded number of places (a connection, a viewer), counted for as long as it lives.
struct Slot {
    shared: Arc<Shared>,
    counter: fn(&Shared) -> &AtomicUsize,
}

impl Slot {
    /// A place if fewer than `max` are taken.
    fn take(
        shared: &Arc<Shared>,
        counter: fn(&Shared) -> &AtomicUsize,
        max: usize,
    ) -> Option<Slot> {
        let c = counter(shared);
        if c.fetch_add(1, Ordering::AcqRel) >= max {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            shared: shared.clone(),
            counter,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.counter)(&self.shared).fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until `ready_now` holds for the value behind `m`, woken by `ready` (and every 500 ms to
/// look at `stop`); `None` once the server stops.
fn wait_until<'a, T>(
    m: &'a Mutex<T>,
    ready: &Condvar,
    stop: &AtomicBool,
    ready_now: impl Fn(&T) -> bool,
) -> Option<MutexGuard<'a, T>> {
    let mut guard = lock(m);
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        if ready_now(&guard) {
            return Some(guard);
        }
        guard = ready
            .wait_timeout(guard, Duration::from_millis(500))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// A poisoned lock only means a viewer thread panicked mid-update; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running preview server. Dropping it stops the threads.
pub struct Preview {
    shared: Arc<Shared>,
    addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
    /// The last [`STAGE_WINDOW`] frames' stage times, per stage.
    recent: std::collections::BTreeMap<&'static str, std::collections::VecDeque<f64>>,
    /// When `/stats.json` was last rebuilt.
    built: Option<std::time::Instant>,
}

impl Preview {
    /// Binds `options.addr` and starts the accept and encoder threads.
    pub fn start(options: PreviewOptions) -> Result<Preview, PreviewError> {
        let listener = TcpListener::bind(options.addr).map_err(|cause| PreviewError::Bind {
            addr: options.addr,
            cause,
        })?;
        let addr = listener.local_addr().unwrap_or(options.addr);
        let shared = Arc::new(Shared {
            options,
            raw: Mutex::new(None),
            raw_ready: Condvar::new(),
            encoded: Mutex::new(Encoded::default()),
            encoded_ready: Condvar::new(),
            stats: Mutex::new(serde_json::json!({"fps": 0.0, "frames": 0, "top": []})),
            viewers: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("preview-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawn preview thread")
        };
        let encoder = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("preview-encode".into())
                .spawn(move || encode_loop(&shared))
                .expect("spawn preview thread")
        };
        Ok(Preview {
            shared,
            addr,
            threads: vec![accept, encoder],
            recent: Default::default(),
            built: None,
        })
    }

    /// The address actually bound (port 0 picks a free one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether anybody watches the video: frames are worth handing over only then.
    pub fn wants_frames(&self) -> bool {
        self.shared.viewers.load(Ordering::Relaxed) > 0
    }

    /// Offers the newest classified frame (replacing one not yet encoded).
    pub fn offer_frame(&self, img: &DynamicImage, best: &Prediction) {
        if !self.wants_frames() {
            return;
        }
        *lock(&self.shared.raw) = Some((img.clone(), best.clone()));
        self.shared.raw_ready.notify_one();
    }

    /// Replaces the `/stats.json` object.
    pub fn set_stats(&self, stats: Value) {
        *lock(&self.shared.stats) = stats;
    }

    /// Takes one classified frame into the live numbers: `fps` now, `frames` so far, and the
    /// frame's classes, stage times and warnings. `/stats.json` is rebuilt at most every
    /// [`STATS_EVERY`].
    pub fn observe(&mut self, r: &FrameResult, fps: f64, frames: u64) {
        for (name, ms) in &r.ms {
            let w = self.recent.entry(name).or_default();
            if w.len() == STAGE_WINDOW {
                w.pop_front();
            }
            w.push_back(*ms);
        }
        if self.built.is_some_and(|t| t.elapsed() < STATS_EVERY) {
            return;
        }
        self.built = Some(std::time::Instant::now());
        let p50: serde_json::Map<String, Value> = self
            .recent
            .iter()
            .map(|(name, w)| {
                let mut v: Vec<f64> = w.iter().copied().collect();
                v.sort_by(f64::total_cmp);
                (name.to_string(), v[v.len() / 2].into())
            })
            .collect();
        self.set_stats(serde_json::json!({
            "fps": fps,
            "frames": frames,
            "frame": r.frame,
            "top": r.top,
            "stages_p50_ms": p50,
            "warnings": r.warnings,
            "model": self.shared.options.model,
        }));
    }
}

impl Drop for Preview {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.raw_ready.notify_all();
        self.shared.encoded_ready.notify_all();
        // Wakes the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// True when binding `addr` exposes the preview beyond this machine.
pub fn is_public(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut stream) = stream else {
            // Out of descriptors, say: wait a little rather than spin on the error.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let Some(slot) = Slot::take(shared, connections, MAX_CONNECTIONS) else {
            let _ = respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                b"busy\n",
            );
            continue;
        };
        // Out of threads, the connection goes, and its slot with it.
        let _ = std::thread::Builder::new()
            .name("preview-conn".into())
            .spawn(move || {
                let _ = serve(stream, &slot.shared);
            });
    }
}

/// Annotates and encodes the newest frame whenever one is offered.
fn encode_loop(shared: &Shared) {
    loop {
        let Some(mut raw) = wait_until(
            &shared.raw,
            &shared.raw_ready,
            &shared.stop,
            Option::is_some,
        ) else {
            return;
        };
        let Some((img, best)) = raw.take() else {
            continue;
        };
        drop(raw);
        // A 28x28 frame would show as a smudge under an unreadable label: small frames are
        // enlarged (whole multiples, nearest neighbour, so pixels stay sharp) before annotating.
        let factor = MIN_SHOWN_HEIGHT.div_ceil(img.height().max(1)).max(1);
        let img = if factor > 1 {
            img.resize(
                img.width() * factor,
                img.height() * factor,
                image::imageops::FilterType::Nearest,
            )
        } else {
            img
        };
        let rgb = crate::overlay::annotated(&img, &best);
        let mut jpeg = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY);
        if rgb.write_with_encoder(enc).is_err() {
            continue;
        }
        let mut e = lock(&shared.encoded);
        e.seq += 1;
        e.jpeg = Arc::new(jpeg);
        shared.encoded_ready.notify_all();
    }
}

/// A parsed request: method, path and the token it carries.
struct Request {
    method: String,
    path: String,
    token: Option<String>,
}

/// Reads and parses one request head.
fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let bearer = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_string);
                let query_token = form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "token")
                    .map(|(_, v)| v.into_owned());
                return Some(Request {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    token: bearer.or(query_token),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return None,
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Answers one connection.
fn serve(mut stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream) else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
        );
    };
    if let Some(want) = &shared.options.token {
        let given = req.token.as_deref().unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(want.as_bytes())) {
            return respond(
                &mut stream,
                "401 Unauthorized",
                "text/plain",
                b"token required\n",
            );
        }
    }
    if req.method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    match req.path.as_str() {
        "/" | "/index.html" => {
            let token = req.token.as_deref().unwrap_or("");
            let query = format!(
                "?{}",
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("token", token)
                    .finish()
            );
            let page = PAGE
                .replace("{{QUERY}}", if token.is_empty() { "" } else { &query })
                .replace("{{MODEL}}", &html_escape(&shared.options.model));
            respond(
                &mut stream,
                "200 OK",
                "text/html; charset=utf-8",
                page.as_bytes(),
            )
        }
        "/stats.json" => {
            let body = serde_json::to_vec(&*lock(&shared.stats)).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body)
        }
        "/stream.mjpg" => stream_mjpeg(stream, shared),
        _ => respond(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// Sends the newest frame whenever the socket takes it, until the viewer goes or the server
/// stops.
fn stream_mjpeg(mut stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let Some(_viewer) = Slot::take(shared, viewers, shared.options.max_viewers) else {
        return respond(
            &mut stream,
            "503 Service Unavailable",
            "text/plain",
            b"too many viewers\n",
        );
    };
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
    )?;
    let mut last = 0u64;
    loop {
        let ready = |e: &Encoded| e.seq != last;
        let Some(e) = wait_until(&shared.encoded, &shared.encoded_ready, &shared.stop, ready)
        else {
            return Ok(());
        };
        last = e.seq;
        let jpeg = e.jpeg.clone();
        drop(e);
        let head = format!(
            "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(&jpeg)?;
        stream.write_all(b"\r\n")?;
        stream.flush()?;
    }
}

/// Escapes text for HTML (the model's name comes from a file).
fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str, extra: &str) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (
            String::from_utf8_lossy(&out[..split]).into_owned(),
            out[split..].to_vec(),
        )
    }

    fn start(token: Option<&str>) -> Preview {
        Preview::start(PreviewOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: token.map(str::to_string),
            max_viewers: 1,
            model: "<b>m</b>".into(),
        })
        .unwrap()
    }

    #[test]
    fn routes_tokens_and_escaping() {
        let p = start(Some("s3cret"));
        let a = p.local_addr();
        assert!(get(a, "/", "").0.starts_with("HTTP/1.1 401"));
        assert!(get(a, "/stats.json?token=wrong", "")
            .0
            .starts_with("HTTP/1.1 401"));
        let (head, body) = get(a, "/?token=s3cret", "");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let page = String::from_utf8(body).unwrap();
        assert!(page.contains("/stream.mjpg?token=s3cret"), "{page}");
        assert!(page.contains("&lt;b&gt;m&lt;/b&gt;") && !page.contains("<b>m</b>"));
        p.set_stats(serde_json::json!({"fps": 3.5, "frames": 7, "top": []}));
        let (head, body) = get(a, "/stats.json", "Authorization: Bearer s3cret\r\n");
        assert!(head.contains("application/json"), "{head}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["frames"], 7);
        for path in ["/etc/passwd", "/../", "/static/", "/stream.mjpg/x"] {
            let (head, _) = get(a, &format!("{path}?token=s3cret"), "");
            assert!(head.starts_with("HTTP/1.1 404"), "{path}: {head}");
        }
        assert!(!p.wants_frames(), "nobody watches: no frames wanted");
        let best = Prediction {
            label: "x".into(),
            class: 0,
            score: 1.0,
        };
        p.offer_frame(&DynamicImage::new_rgb8(8, 8), &best);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            lock(&p.shared.encoded).seq,
            0,
            "nothing encoded without viewers"
        );
    }
}
