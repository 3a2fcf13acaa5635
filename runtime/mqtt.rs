//! Publishing results to an MQTT broker (`stream --mqtt`), the way a fleet collects what its
//! boxes see. Each message goes through an on-disk queue (queue-file, a crash-safe FIFO) before it
//! is published with QoS 1, and leaves the queue only when the broker has acknowledged it: a
//! broker that is away, restarts or is unreachable at start loses nothing, and a run that ends
//! while it is away leaves the rest for the next run with the same queue. The queue is bounded:
//! past its cap the oldest messages are dropped and counted.
//!
//! The pipeline never waits for the network: it hands each message to the publisher thread
//! through a bounded channel and goes on. rumqttc runs the protocol on a thread of its own; on a
//! reconnect (always a clean session, so the broker keeps nothing for us) the publisher sends
//! again everything not yet acknowledged, in order. Duplicates are possible, losses are not
//! (QoS 1: at least once).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use queue_file::QueueFile;
use rumqttc::{
    Client, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};

/// Messages in flight (published, not yet acknowledged) at once.
const WINDOW: usize = 64;
/// Messages waiting between the pipeline and the publisher thread; more are dropped and counted
/// (only a disk that stops taking writes gets there).
const HANDOFF: usize = 4096;
/// Back-off between connection attempts: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(8));
/// Largest message accepted from the queue file (a frame's JSON is a few hundred bytes).
const MAX_MESSAGE: usize = 1 << 20;

/// Why publishing cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The `--mqtt` URL is not usable.
    #[error("--mqtt: {0}")]
    Url(String),
    /// The queue file cannot be opened or written.
    #[error("{}: {cause}", path.display())]
    Queue {
        /// The queue file.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// `--mqtt-ca` cannot be read or holds no certificate.
    #[error("{}: {cause}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// The broker answered the connection with a refusal (credentials, client id, ...).
    #[error("{broker}: the broker refused the connection: {reason}")]
    Refused {
        /// `host:port`, never the credentials.
        broker: String,
        /// The broker's reason.
        reason: &'static str,
    },
}

/// Where to publish: `mqtt://[user:pass@]host[:port]/topic` or `mqtts://...`.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Broker host.
    pub host: String,
    /// Broker port (1883, or 8883 for `mqtts`).
    pub port: u16,
    /// TLS (`mqtts://`).
    pub tls: bool,
    /// User name and password, if given.
    pub credentials: Option<(String, String)>,
    /// Topic of the frames; the summary goes to `TOPIC/summary`.
    pub topic: String,
}

impl std::fmt::Debug for Target {
    /// Like [`Target::broker`]: the password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.broker(), self.topic)
    }
}

impl Target {
    /// `mqtt[s]://host:port`, without credentials: what messages may show.
    pub fn broker(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for Target {
    type Err = MqttError;

    fn from_str(s: &str) -> Result<Self, MqttError> {
        let bad = |m: &str| MqttError::Url(m.to_string());
        // The URL itself is never echoed: it may hold a password.
        let url = url::Url::parse(s).map_err(|e| {
            bad(&format!(
                "not a URL ({e}); expected mqtt://[user:pass@]host[:port]/topic"
            ))
        })?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad("the scheme must be mqtt:// or mqtts://")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no broker host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let decode = |v: &str| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("user, password and topic must be UTF-8"))
        };
        let credentials = if url.username().is_empty() {
            None
        } else {
            Some((
                decode(url.username())?,
                decode(url.password().unwrap_or(""))?,
            ))
        };
        let topic = decode(url.path().trim_start_matches('/'))?;
        check_topic(&topic).map_err(|m| bad(&m))?;
        Ok(Target {
            host,
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
            credentials,
            topic,
        })
    }
}

/// A topic a client may publish to: not empty, no wildcards, no NUL, at most 65,535 bytes.
fn check_topic(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("no topic: add it as the path, e.g. mqtt://broker/wae-edge/frames".into());
    }
    if t.contains(['+', '#', '\0']) {
        return Err("a topic to publish to has no wildcards (+, #) or NUL".into());
    }
    if t.len() > 65_535 {
        return Err("the topic is longer than MQTT allows (65,535 bytes)".into());
    }
    Ok(())
}

/// How the publisher runs.
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Broker and topic.
    pub target: Target,
    /// Directory of the on-disk queue (created if missing).
    pub queue_dir: PathBuf,
    /// Messages the queue holds at most; past it the oldest are dropped.
    pub queue_max: usize,
    /// Extra CA certificates (PEM) for `mqtts://`, beside the system's.
    pub ca: Option<PathBuf>,
    /// MQTT client id.
    pub client_id: String,
    /// Longest wait at the end of a run for the queue to empty.
    pub drain: Duration,
}

/// What the publisher did, at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReport {
    /// Messages the broker acknowledged (including ones queued by earlier runs).
    pub delivered: u64,
    /// Messages left in the queue (delivered by the next run with the same queue).
    pub queued: u64,
    /// Messages dropped: the queue's oldest past its cap, or (rarely) a full hand-off.
    pub dropped: u64,
    /// Times the connection to the broker was (re)established.
    pub connections: u64,
}

/// Counters shared with the pipeline's side.
#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    delivered: AtomicU64,
    connections: AtomicU64,
    queued: AtomicU64,
}

/// A message kind, its first byte in the queue file.
#[derive(Clone, Copy)]
enum Kind {
    Frame = 0,
    Summary = 1,
}

enum Handoff {
    Message(Kind, Vec<u8>),
    Finish,
}

/// The publisher: a thread that queues messages on disk and publishes them.
pub struct Publisher {
    tx: SyncSender<Handoff>,
    counters: Arc<Counters>,
    fatal: Arc<Mutex<Option<MqttError>>>,
    thread: Option<JoinHandle<Result<(), MqttError>>>,
}

impl Publisher {
    /// Opens the queue (what an earlier run left in it is published first) and starts the
    /// publisher and protocol threads. An absent broker is not an error: it is retried.
    pub fn start(o: PublisherOptions) -> Result<Publisher, MqttError> {
        let queue_path = o.queue_dir.join("queue.qf");
        let qerr = |cause: String| MqttError::Queue {
            path: queue_path.clone(),
            cause,
        };
        std::fs::create_dir_all(&o.queue_dir).map_err(|e| MqttError::Queue {
            path: o.queue_dir.clone(),
            cause: e.to_string(),
        })?;
        // One writer per queue: two streams appending to one file would interleave records.
        let lock = std::fs::File::create(o.queue_dir.join("queue.lock"))
            .map_err(|e| qerr(e.to_string()))?;
        if lock.try_lock().is_err() {
            return Err(qerr(
                "in use by another wae-edge; give each stream its own --mqtt-queue".into(),
            ));
        }
        let mut queue = QueueFile::open(&queue_path).map_err(|e| qerr(e.to_string()))?;
        // Synchronous writes would fsync every frame; a process that ends (even killed) keeps
        // what it wrote, and only a power cut can lose the last few.
        queue.set_sync_writes(false);
        let mut mqtt = MqttOptions::new(&o.client_id, &o.target.host, o.target.port);
        mqtt.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(15))
            .set_inflight(WINDOW as u16);
        if let Some((user, pass)) = &o.target.credentials {
            mqtt.set_credentials(user, pass);
        }
        if o.target.tls {
            mqtt.set_transport(Transport::Tls(tls_config(o.ca.as_deref())?));
        }
        let (client, connection) = Client::new(mqtt, WINDOW);
        let counters = Arc::new(Counters::default());
        counters
            .queued
            .store(queue.size() as u64, Ordering::Relaxed);
        let fatal = Arc::new(Mutex::new(None));
        let (tx, rx) = sync_channel(HANDOFF);
        let (events_tx, events_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("mqtt-protocol".into())
            .spawn(move || protocol_loop(connection, events_tx))
            .map_err(|e| qerr(format!("starting the publisher: {e}")))?;
        let worker = Worker {
            _lock: lock,
            queue,
            client,
            options: o,
            counters: counters.clone(),
            fatal: fatal.clone(),
            handed: VecDeque::new(),
            head_seq: 0,
            connected: false,
        };
        let thread = std::thread::Builder::new()
            .name("mqtt-publish".into())
            .spawn(move || worker.run(&rx, &events_rx))
            .map_err(|e| qerr(format!("starting the publisher: {e}")))?;
        Ok(Publisher {
            tx,
            counters,
            fatal,
            thread: Some(thread),
        })
    }

    fn send(&self, kind: Kind, json: Vec<u8>) {
        match self.tx.try_send(Handoff::Message(kind, json)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues one frame's JSON for the topic; never blocks.
    pub fn frame(&self, json: Vec<u8>) {
        self.send(Kind::Frame, json);
    }

    /// Queues the run's summary for `TOPIC/summary`; never blocks.
    pub fn summary(&self, json: Vec<u8>) {
        self.send(Kind::Summary, json);
    }

    /// A refusal from the broker (or a queue that cannot be written): the run should end.
    pub fn failed(&self) -> bool {
        self.fatal.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    /// Waits up to the drain time for the queue to empty, stops the threads and reports.
    pub fn finish(mut self) -> Result<PublishReport, MqttError> {
        let _ = self.tx.send(Handoff::Finish);
        let outcome = self
            .thread
            .take()
            .map(|t| t.join().unwrap_or(Ok(())))
            .unwrap_or(Ok(()));
        if let Some(e) = self.fatal.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        outcome?;
        Ok(PublishReport {
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            queued: self.counters.queued.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            connections: self.counters.connections.load(Ordering::Relaxed),
        })
    }
}

/// Runs rumqttc's event loop, forwarding every event; waits with back-off after a failed
/// connection. Ends when the client is dropped.
fn protocol_loop(
    mut connection: rumqttc::Connection,
    events: std::sync::mpsc::Sender<Result<Event, ConnectionError>>,
) {
    let mut backoff = BACKOFF.0;
    for event in connection.iter() {
        let failed = event.is_err();
        if let Ok(Event::Incoming(Packet::ConnAck(_))) = &event {
            backoff = BACKOFF.0;
        }
        if events.send(event).is_err() {
            return;
        }
        if failed {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }
}

/// A message handed to rumqttc and not yet acknowledged.
struct Handed {
    /// Its position in the queue since this run started (head_seq + index).
    seq: u64,
    /// The packet id rumqttc gave it, once sent.
    pkid: Option<u16>,
    acked: bool,
}

/// The publisher thread's state.
struct Worker {
    /// Held (locked) for as long as the queue is in use.
    _lock: std::fs::File,
    queue: QueueFile,
    client: Client,
    options: PublisherOptions,
    counters: Arc<Counters>,
    fatal: Arc<Mutex<Option<MqttError>>>,
    /// Messages from the queue's head handed to rumqttc, in order.
    handed: VecDeque<Handed>,
    /// Sequence number of the queue's head.
    head_seq: u64,
    connected: bool,
}

impl Worker {
    fn run(
        mut self,
        rx: &Receiver<Handoff>,
        events: &Receiver<Result<Event, ConnectionError>>,
    ) -> Result<(), MqttError> {
        let mut deadline: Option<Instant> = None;
        let mut warned = false;
        loop {
            while let Ok(ev) = events.try_recv() {
                if let Err(e) = self.on_event(ev, &mut warned) {
                    self.set_fatal(e);
                    return Ok(());
                }
            }
            if self.connected {
                if let Err(e) = self.publish_more() {
                    self.set_fatal(e);
                    return Ok(());
                }
            }
            self.counters
                .queued
                .store(self.queue.size() as u64, Ordering::Relaxed);
            if let Some(d) = deadline {
                if self.queue.is_empty() || Instant::now() >= d {
                    let _ = self.client.try_disconnect();
                    return self.queue.sync_all().map_err(|e| self.queue_error(e));
                }
            }
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Handoff::Message(kind, json)) => {
                    if let Err(e) = self.enqueue(kind, &json) {
                        self.set_fatal(e);
                        return Ok(());
                    }
                }
                Ok(Handoff::Finish) | Err(RecvTimeoutError::Disconnected) => {
                    deadline.get_or_insert_with(|| Instant::now() + self.options.drain);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn set_fatal(&self, e: MqttError) {
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(e);
        }
    }

    fn queue_error(&self, e: queue_file::Error) -> MqttError {
        MqttError::Queue {
            path: self.options.queue_dir.join("queue.qf"),
            cause: e.to_string(),
        }
    }

    /// Appends a message; past the cap, drops the oldest.
    fn enqueue(&mut self, kind: Kind, json: &[u8]) -> Result<(), MqttError> {
        let mut item = Vec::with_capacity(json.len() + 1);
        item.push(kind as u8);
        item.extend_from_slice(json);
        self.queue.add(&item).map_err(|e| self.queue_error(e))?;
        while self.queue.size() > self.options.queue_max {
            self.queue.remove().map_err(|e| self.queue_error(e))?;
            if self.handed.front().is_some_and(|h| h.seq == self.head_seq) {
                self.handed.pop_front();
            }
            self.head_seq += 1;
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Hands the next messages after those in flight to rumqttc, up to the window.
    fn publish_more(&mut self) -> Result<(), MqttError> {
        let room = WINDOW.saturating_sub(self.handed.len());
        if room == 0 || self.queue.size() <= self.handed.len() {
            return Ok(());
        }
        let start = self.handed.len();
        let items: Vec<Vec<u8>> = self.queue.iter().skip(start).take(room).collect();
        for (i, item) in items.iter().enumerate() {
            let (topic, payload) = match item.split_first() {
                Some((1, json)) => (format!("{}/summary", self.options.target.topic), json),
                Some((_, json)) => (self.options.target.topic.clone(), json),
                None => (self.options.target.topic.clone(), &item[..]),
            };
            if payload.len() > MAX_MESSAGE {
                continue;
            }
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .is_err()
            {
                // rumqttc's request channel is full; the rest go on the next round.
                break;
            }
            self.handed.push_back(Handed {
                seq: self.head_seq + (start + i) as u64,
                pkid: None,
                acked: false,
            });
        }
        Ok(())
    }

    fn on_event(
        &mut self,
        ev: Result<Event, ConnectionError>,
        warned: &mut bool,
    ) -> Result<(), MqttError> {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    return Err(self.refused(ack.code));
                }
                // A clean session: rumqttc dropped what it had in flight, so everything not
                // acknowledged goes again from the queue's head.
                self.connected = true;
                self.handed.clear();
                self.counters.connections.fetch_add(1, Ordering::Relaxed);
                if *warned {
                    eprintln!("mqtt: connected to {} again", self.options.target.broker());
                    *warned = false;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(h) = self.handed.iter_mut().find(|h| h.pkid.is_none()) {
                    h.pkid = Some(pkid);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(h) = self
                    .handed
                    .iter_mut()
                    .find(|h| h.pkid == Some(ack.pkid) && !h.acked)
                {
                    h.acked = true;
                }
                // Out of the queue only in order: the head goes once it is acknowledged.
                while self.handed.front().is_some_and(|h| h.acked) {
                    self.handed.pop_front();
                    self.queue.remove().map_err(|e| self.queue_error(e))?;
                    self.head_seq += 1;
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Err(self.refused(code)),
            Err(e) => {
                self.connected = false;
                self.handed.clear();
                if !*warned {
                    eprintln!(
                        "mqtt: {} unreachable ({e}); queuing in {} and retrying",
                        self.options.target.broker(),
                        self.options.queue_dir.display()
                    );
                    *warned = true;
                }
            }
        }
        Ok(())
    }

    fn refused(&self, code: ConnectReturnCode) -> MqttError {
        MqttError::Refused {
            broker: self.options.target.broker(),
            reason: match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorised",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version (MQTT 3.1.1)",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::Success => "no reason given",
            },
        }
    }
}

/// rustls with the system's CA certificates and those of `ca` (PEM), ring as the provider.
fn tls_config(ca: Option<&Path>) -> Result<TlsConfiguration, MqttError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca {
        use rustls::pki_types::pem::PemObject;
        let err = |cause: String| MqttError::Ca {
            path: path.into(),
            cause,
        };
        let pem =
            crate::regular_file::read_bounded(path, 1 << 20).map_err(|e| err(e.to_string()))?;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("not PEM certificates ({e})")))?;
        if certs.is_empty() {
            return Err(err("no certificate in it".into()));
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(err("no usable certificate in it".into()));
        }
    }
    // ring rather than rustls' aws-lc-rs default: it builds with nothing but a C compiler on
    // a Jetson and in cross builds. rustls deprecates it for lacking post-quantum key exchange,
    // which MQTT brokers do not ask for yet.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Url(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_has_one_writer_and_keeps_what_it_could_not_deliver() {
        let d = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = PublisherOptions {
            target: format!("mqtt://127.0.0.1:{port}/t").parse().unwrap(),
            queue_dir: d.path().to_path_buf(),
            queue_max: 3,
            ca: None,
            client_id: "unit".into(),
            drain: Duration::ZERO,
        };
        let first = Publisher::start(options.clone()).unwrap();
        let e = Publisher::start(options.clone()).err().unwrap().to_string();
        assert!(e.contains("in use by another wae-edge"), "{e}");
        for i in 0..5u8 {
            first.frame(vec![b'0' + i]);
        }
        let r = first.finish().unwrap();
        assert_eq!((r.delivered, r.queued, r.dropped), (0, 3, 2));
        // The lock went with the first; the newest three wait in order.
        drop(Publisher::start(options).unwrap());
        let q = QueueFile::open(d.path().join("queue.qf")).unwrap();
        let items: Vec<Vec<u8>> = q.iter().collect();
        assert_eq!(items, [vec![0, b'2'], vec![0, b'3'], vec![0, b'4']]);
    }

    #[test]
    fn urls_parse_without_leaking_the_password() {
        let t: Target = "mqtt://dev%40ice:p%3Ass@broker.local/fleet/cam-1"
            .parse()
            .unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls, t.topic.as_str()),
            ("broker.local", 1883, false, "fleet/cam-1")
        );
        assert_eq!(t.credentials, Some(("dev@ice".into(), "p:ss".into())));
        assert_eq!(format!("{t:?}"), "mqtt://broker.local:1883/fleet/cam-1");
        let t: Target = "mqtts://[::1]:9000/a".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 9000, true));
        assert_eq!("mqtts://h/x".parse::<Target>().unwrap().port, 8883);
        for bad in [
            "mqtt://user:secret@host",
            "mqtt://user:secret@host/a/+",
            "mqtt://user:secret@host/#",
            "http://user:secret@host/a",
            "user:secret@host/a",
        ] {
            let e = bad.parse::<Target>().unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
