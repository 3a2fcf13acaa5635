//! `stream --serve`: the live preview over HTTP, checked with plain sockets and in a real
//! browser (Debian's headless Chromium, which `scripts/setup.sh` installs).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shipped Trouser sample: one picture, looped, so the label never changes.
fn trouser() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-wae/samples/01_trouser.png")
}

/// A `stream --serve` run in the background; killed when dropped.
struct Served {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("wae-edge"))
            .args(["stream", "--loop", "--seconds", "120", "--serve"])
            .args(extra)
            .arg(trouser())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("preview: http://") {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no preview line: {}", stderr.lock().unwrap()));
        Served {
            child,
            addr: addr.parse().unwrap(),
            stderr,
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET; the status line, the head and the body (read to the end).
fn get(addr: SocketAddr, path: &str, headers: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    (
        String::from_utf8_lossy(&out[..split]).into_owned(),
        out[split..].to_vec(),
    )
}

fn stats(addr: SocketAddr, query: &str) -> serde_json::Value {
    let (head, body) = get(addr, &format!("/stats.json{query}"), "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_slice(&body).unwrap()
}

/// Waits until the stats show `label` as the top class.
fn wait_for_label(addr: SocketAddr, query: &str, label: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = stats(addr, query);
        if s["top"][0]["label"] == label && s["fps"].as_f64() > Some(0.0) {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `/stream.mjpg` and reads `n` JPEG parts from it.
fn mjpeg_frames(addr: SocketAddr, query: &str, n: usize) -> Vec<image::DynamicImage> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s);
    write!(
        r.get_mut(),
        "GET /stream.mjpg{query} HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut frames = Vec::new();
    let mut length = 0usize;
    let mut saw_type = false;
    while frames.len() < n {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let l = line.trim_end();
        if l.starts_with("Content-Type: multipart/x-mixed-replace") {
            saw_type = true;
        } else if let Some(v) = l.strip_prefix("Content-Length: ") {
            length = v.parse().unwrap();
        } else if l.is_empty() && length > 0 {
            let mut jpeg = vec![0u8; length];
            r.read_exact(&mut jpeg).unwrap();
            frames.push(image::load_from_memory(&jpeg).unwrap());
            length = 0;
        }
    }
    assert!(saw_type);
    frames
}

#[test]
fn each_endpoint_answers_and_the_token_is_required() {
    let s = Served::start(&["127.0.0.1:0", "--serve-token", "tok en/+"]);
    let q = "?token=tok+en%2F%2B";
    for path in ["/", "/stats.json", "/stream.mjpg"] {
        let (head, _) = get(s.addr, path, "");
        assert!(head.starts_with("HTTP/1.1 401"), "{path}: {head}");
        let (head, _) = get(s.addr, &format!("{path}?token=wrong"), "");
        assert!(head.starts_with("HTTP/1.1 401"), "{path}: {head}");
    }
    let (head, _) = get(
        s.addr,
        "/nothing/here",
        "Authorization: Bearer tok en/+\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let (head, page) = get(s.addr, &format!("/{q}"), "");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/html"),
        "{head}"
    );
    let page = String::from_utf8(page).unwrap();
    assert!(page.len() < 8192, "a small page: {} bytes", page.len());
    assert!(page.contains(&format!("/stream.mjpg{q}")), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing external"
    );

    let v = wait_for_label(s.addr, q, "Trouser");
    assert!(v["fps"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["frames"].as_u64().unwrap() > 0, "{v}");
    assert!(v["stages_p50_ms"]["total"].as_f64().unwrap() > 0.0, "{v}");

    let frames = mjpeg_frames(s.addr, q, 3);
    for f in &frames {
        // The 28x28 sample, enlarged for the page, label band on top.
        assert!(
            f.height() >= 240 && f.width() == f.height(),
            "{}x{}",
            f.width(),
            f.height()
        );
    }
    assert!(
        s.log().contains("preview: http://127.0.0.1:"),
        "{}",
        s.log()
    );
    assert!(!s.log().contains("reachable from other machines"));
}

#[test]
fn a_viewer_that_never_reads_stalls_nothing_and_extra_viewers_get_503() {
    let s = Served::start(&["127.0.0.1:0", "--serve-viewers", "1"]);
    wait_for_label(s.addr, "", "Trouser");
    // A viewer that asks for the video and never reads a byte.
    let mut stalled = TcpStream::connect(s.addr).unwrap();
    write!(stalled, "GET /stream.mjpg HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The slot is taken: the next viewer is turned away, the rest still answers, and the
    // pipeline goes on classifying.
    let (head, _) = get(s.addr, "/stream.mjpg", "");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let before = stats(s.addr, "")["frames"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let after = stats(s.addr, "")["frames"].as_u64().unwrap();
    assert!(after > before + 100, "{before} -> {after}");
    // Once its socket has been full for the I/O timeout the stalled viewer is dropped, and the
    // slot serves a new one.
    let t = Instant::now();
    loop {
        let (head, _) = {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(c, "GET /stream.mjpg HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).unwrap_or(0);
            (String::from_utf8_lossy(&buf[..n]).into_owned(), ())
        };
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "the stalled viewer still holds the slot: {head}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(stalled);
}

#[test]
fn binding_beyond_loopback_warns() {
    let s = Served::start(&["0.0.0.0:0"]);
    let log = s.log();
    assert!(
        log.contains("is reachable from other machines; anyone who reaches it sees the camera"),
        "{log}"
    );
}

#[test]
fn headless_chromium_shows_the_picture_and_the_label() {
    let s = Served::start(&["127.0.0.1:0", "--serve-token", "t0k"]);
    wait_for_label(s.addr, "?token=t0k", "Trouser");
    let d = tempfile::tempdir().unwrap();
    let shot = d.path().join("shot.png");
    let url = format!("http://{}/?token=t0k", s.addr);
    let chromium = |args: &[&str]| {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=800,500",
                "--virtual-time-budget=3000",
                "--timeout=8000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                d.path().join("profile").display()
            ))
            .args(args)
            .arg(&url)
            .output()
            .expect("chromium runs (scripts/setup.sh installs it)")
    };
    let out = chromium(&[&format!("--screenshot={}", shot.display())]);
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    // The video sits at the top left: the trouser is bright on black, and its label band's
    // white text is there too.
    let video = image::imageops::crop_imm(&img, 12, 12, 240, 240).to_image();
    let bright = video
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c > 150))
        .count();
    let dark = video
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c < 40))
        .count();
    assert!(
        bright > 2000 && dark > 10000,
        "bright {bright}, dark {dark}"
    );
    // The label is drawn in green beside it (#7fdc7f): more than a dash's worth of pixels.
    let green = img
        .pixels()
        .filter(|p| p.0[1] > 180 && p.0[0] < 160 && p.0[2] < 160)
        .count();
    assert!(green > 300, "green label pixels: {green}");
    // And it reads "Trouser" once the page's script has run.
    let out = chromium(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains(r#"<div id="label">Trouser</div>"#), "{dom}");
}
