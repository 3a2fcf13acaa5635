//! `stream --mqtt` against a real broker: Debian's mosquitto, started on a free loopback port
//! (`scripts/setup.sh` installs it), and a subscriber with a persistent session.
#![cfg(feature = "mqtt")]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// A mosquitto process on a loopback port, with its config and persistence in a directory.
struct Broker {
    child: Option<Child>,
    port: u16,
    conf: std::path::PathBuf,
}

impl Broker {
    /// Starts mosquitto with `extra` config lines, persisting sessions (so a subscriber's
    /// queued messages survive a restart).
    fn start(dir: &Path, extra: &str) -> Broker {
        Broker::start_on(dir, free_port(), extra)
    }

    /// [`Broker::start`] on a given port.
    fn start_on(dir: &Path, port: u16, extra: &str) -> Broker {
        // Started as root, mosquitto drops to its own user, which must be able to write there.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n{extra}\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            port,
            conf,
        };
        b.resume();
        b
    }

    /// (Re)starts the process on the same port and waits until it accepts connections.
    fn resume(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs (scripts/setup.sh installs it)");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it the way a service manager does (SIGTERM; it saves its sessions).
    fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with our child's pid and a valid signal.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    fn url(&self, userinfo: &str, topic: &str) -> String {
        format!("mqtt://{userinfo}127.0.0.1:{}/{topic}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port nothing listens on (at the moment of asking).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (delivered, queued, dropped) from a `--json` run's summary.
fn mqtt_counts(out: &std::process::Output) -> (u64, u64, u64) {
    let m = json_lines(out).pop().unwrap()["summary"]["mqtt"].clone();
    let n = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{m}"));
    (n("delivered"), n("queued"), n("dropped"))
}

type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A QoS 1 subscriber to `cams/#` with a persistent session: it gets what was published while
/// either side was away. Returns once subscribed.
fn subscribe(port: u16, user: Option<(&str, &str)>) -> Received {
    let got: Received = Arc::default();
    let mut o = MqttOptions::new("test-subscriber", "127.0.0.1", port);
    o.set_clean_session(false);
    if let Some((u, p)) = user {
        o.set_credentials(u, p);
    }
    let (client, mut connection) = Client::new(o, 16);
    client.subscribe("cams/#", QoS::AtLeastOnce).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = got.clone();
    std::thread::spawn(move || {
        let _client = client;
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap();
                    sink.lock().unwrap().push((p.topic.clone(), v));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    got
}

/// Waits until `done` holds for what the subscriber got.
fn wait_until(got: &Received, what: &str, done: impl Fn(&[(String, serde_json::Value)]) -> bool) {
    let t = Instant::now();
    while !done(&got.lock().unwrap()) {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "{what}: {} messages so far",
            got.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn frames_on(got: &[(String, serde_json::Value)], topic: &str) -> Vec<u64> {
    got.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, v)| v["frame"].as_u64().unwrap())
        .collect()
}

fn summaries(got: &[(String, serde_json::Value)], topic: &str) -> usize {
    let t = format!("{topic}/summary");
    got.iter().filter(|(x, _)| *x == t).count()
}

#[test]
fn every_frame_arrives_across_a_broker_restart() {
    let d = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(d.path(), "allow_anonymous true");
    let got = subscribe(broker.port, None);
    // 600 frames at 100 fps: six seconds, with the broker away for three of them.
    let mut stream = Command::new(assert_cmd::cargo::cargo_bin("wae-edge"))
        .args(["stream", "--json", "--device-id", "cam-7", "--mqtt"])
        .arg(broker.url("", "cams/a"))
        .arg("--mqtt-queue")
        .arg(d.path().join("queue"))
        .args(["--mqtt-drain", "30", "synthetic:64x48@100+600"])
        // Files, not pipes: nobody reads a pipe while the test waits, and 600 lines fill one.
        .stdout(std::fs::File::create(d.path().join("out")).unwrap())
        .stderr(std::fs::File::create(d.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    broker.pause();
    std::thread::sleep(Duration::from_secs(3));
    broker.resume();
    let t = Instant::now();
    while stream.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the stream did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = std::process::Output {
        status: stream.wait().unwrap(),
        stdout: std::fs::read(d.path().join("out")).unwrap(),
        stderr: std::fs::read(d.path().join("err")).unwrap(),
    };
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unreachable") && err.contains("connected to"),
        "{err}"
    );
    // A paced source is live: on a loaded machine the pipeline may skip a stale frame, and the
    // summary counts it as dropped. Every frame it classified (plus the summary) must arrive.
    let summary = json_lines(&out).pop().unwrap();
    let s = &summary["summary"];
    let frames = s["frames"].as_u64().unwrap();
    assert!((500..=600).contains(&frames), "{s}");
    assert_eq!(mqtt_counts(&out), (frames + 1, 0, 0));
    let m = &s["mqtt"];
    assert!(m["connections"].as_u64().unwrap() >= 2, "{m}");

    wait_until(&got, "every frame and the summary", |g| {
        frames_on(g, "cams/a")
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len() as u64
            == frames
            && summaries(g, "cams/a") >= 1
    });
    let got = got.lock().unwrap();
    let (_, first) = got.iter().find(|(t, _)| t == "cams/a").unwrap();
    assert_eq!(first["device"], "cam-7");
    assert_eq!(first["model"], "wae-fashion");
    assert!(first["top"][0]["label"].is_string(), "{first}");
}

#[test]
fn a_refused_login_is_one_line_and_the_right_one_publishes() {
    let d = tempfile::tempdir().unwrap();
    let pw = d.path().join("passwords");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["edge", "right-pass"])
        .output()
        .expect("mosquitto_passwd runs");
    assert!(made.status.success(), "{made:?}");
    let broker = Broker::start(
        d.path(),
        &format!("allow_anonymous false\npassword_file {}", pw.display()),
    );
    let out = bin()
        .args(["stream", "--frames", "50", "--mqtt"])
        .arg(broker.url("edge:wrong-pass@", "cams/b"))
        .arg("--mqtt-queue")
        .arg(d.path().join("q1"))
        .arg("synthetic:64x48")
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert_clean_failure(&out, "the broker refused the connection");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("wrong-pass"), "{err}");

    let got = subscribe(broker.port, Some(("edge", "right-pass")));
    let out = bin()
        .args(["stream", "--frames", "40", "--mqtt-every", "10", "--mqtt"])
        .arg(broker.url("edge:right-pass@", "cams/b"))
        .arg("--mqtt-queue")
        .arg(d.path().join("q2"))
        .arg("synthetic:64x48")
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    // Every 10th frame: 0, 10, 20, 30.
    wait_until(&got, "every 10th frame", |g| summaries(g, "cams/b") == 1);
    assert_eq!(frames_on(&got.lock().unwrap(), "cams/b"), [0, 10, 20, 30]);
}

#[test]
fn an_absent_broker_fills_the_queue_to_its_cap_and_the_next_run_delivers_it() {
    let d = tempfile::tempdir().unwrap();
    let queue = d.path().join("queue");
    let port = free_port();
    let run = |frames: &str, max: &str| {
        bin()
            .args(["stream", "--json", "--mqtt"])
            .arg(format!("mqtt://127.0.0.1:{port}/cams/c"))
            .arg("--mqtt-queue")
            .arg(&queue)
            .args(["--mqtt-queue-max", max, "--mqtt-drain", "1"])
            .arg(format!("synthetic:64x48+{frames}"))
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap()
    };
    // Nobody listens: 200 frames and the summary, the queue keeps the newest 50.
    let out = run("200", "50");
    assert_success(&out);
    assert_eq!(mqtt_counts(&out), (0, 50, 151));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("50 message(s) still queued"), "{err}");

    // The broker comes up; the next run delivers what was left, then its own.
    let dir = tempfile::tempdir().unwrap();
    let _broker = Broker::start_on(dir.path(), port, "allow_anonymous true");
    let got = subscribe(port, None);
    let out = run("1", "1000");
    assert_success(&out);
    assert_eq!(mqtt_counts(&out), (52, 0, 0));
    wait_until(&got, "the queue and the new run", |g| {
        summaries(g, "cams/c") == 2
    });
    let frames = frames_on(&got.lock().unwrap(), "cams/c");
    // The first run's newest 49 frames (151-199), in order, then the second run's frame 0.
    let expected: Vec<u64> = (151..200).chain([0]).collect();
    assert_eq!(frames, expected);
}

#[test]
fn on_change_publishes_a_steady_label_once_and_tls_verifies_the_broker() {
    let d = tempfile::tempdir().unwrap();
    // A CA and a broker certificate for 127.0.0.1, made with openssl.
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null \
        && openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout broker.key -out broker.csr 2>/dev/null \
        && printf 'subjectAltName=IP:127.0.0.1\\n' > ext.cnf \
        && openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out broker.pem 2>/dev/null \
        && chmod 644 broker.key");
    let dir = d.path().display();
    // The TLS listener for wae-edge, and a plain one for the test's subscriber.
    let plain = free_port();
    let broker = Broker::start(
        d.path(),
        &format!(
            "allow_anonymous true\ncafile {dir}/ca.pem\ncertfile {dir}/broker.pem\nkeyfile {dir}/broker.key\nlistener {plain} 127.0.0.1"
        ),
    );
    let got = subscribe(plain, None);
    let trouser =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-wae/samples/01_trouser.png");
    let url = format!("mqtts://127.0.0.1:{}/cams/d", broker.port);
    // Without the CA the broker's certificate is not trusted: a clean failure, not a hang.
    let out = bin()
        .args([
            "stream",
            "--loop",
            "--frames",
            "300",
            "--mqtt",
            &url,
            "--mqtt-drain",
            "2",
        ])
        .arg("--mqtt-queue")
        .arg(d.path().join("q0"))
        .arg(&trouser)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable") && err.contains("TLS"), "{err}");
    assert!(err.contains("still queued"), "{err}");
    // With it, 300 frames of one steady label make one message (and the summary).
    let out = bin()
        .args(["stream", "--loop", "--frames", "300", "--mqtt", &url])
        .args(["--mqtt-on-change", "--mqtt-heartbeat", "600", "--mqtt-ca"])
        .arg(d.path().join("ca.pem"))
        .arg("--mqtt-queue")
        .arg(d.path().join("q1"))
        .arg(&trouser)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    wait_until(&got, "the summary", |g| summaries(g, "cams/d") == 1);
    let got = got.lock().unwrap();
    assert_eq!(frames_on(&got, "cams/d"), [0]);
    assert_eq!(got[0].1["top"][0]["label"], "Trouser");
}
