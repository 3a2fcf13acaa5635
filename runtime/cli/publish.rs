//! `stream --mqtt`: which frames go to the broker, with what around them, and the report at the
//! end. The queueing and the protocol are the library's (`wae_edge::mqtt`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use wae_edge::mqtt::{PublishReport, Publisher, PublisherOptions, Target};
use wae_edge::pipeline::FrameResult;
use wae_edge::terminal::Escaped;

/// Arguments of `stream` for publishing.
#[derive(clap::Args, Debug)]
pub struct MqttArgs {
    /// Publish every frame's result to an MQTT broker with QoS 1:
    /// mqtt://[user:pass@]host[:port]/topic or mqtts://...; the summary goes to TOPIC/summary.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// Device id put in every message (default: the host name).
    #[arg(long)]
    device_id: Option<String>,
    /// Publish every Nth classified frame.
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one)]
    mqtt_every: usize,
    /// Publish only when the top-1 label changes, plus a heartbeat (--mqtt-heartbeat).
    #[arg(long)]
    mqtt_on_change: bool,
    /// With --mqtt-on-change: seconds between messages when nothing changes.
    #[arg(long, default_value_t = 10.0, value_parser = super::seconds)]
    mqtt_heartbeat: f64,
    /// Directory of the on-disk queue of unacknowledged messages (default:
    /// $XDG_STATE_HOME/wae-edge/mqtt, else ~/.local/state/wae-edge/mqtt).
    #[arg(long, value_name = "DIR")]
    mqtt_queue: Option<PathBuf>,
    /// Messages the queue holds at most; past it the oldest are dropped and counted.
    #[arg(long, default_value_t = 100_000, value_parser = super::at_least_one)]
    mqtt_queue_max: usize,
    /// Extra CA certificates (PEM) to trust for mqtts://, beside the system's.
    #[arg(long, value_name = "FILE")]
    mqtt_ca: Option<PathBuf>,
    /// Seconds to wait at the end for queued messages to be acknowledged.
    #[arg(long, default_value_t = 5.0, value_parser = super::seconds)]
    mqtt_drain: f64,
}

/// The default queue directory.
fn default_queue() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    state.join("wae-edge/mqtt")
}

/// The machine's host name, the default device id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wae-edge".into())
}

/// A running `--mqtt`: the publisher and what decides which frames it gets.
pub struct Publishing {
    publisher: Publisher,
    queue_dir: PathBuf,
    device: String,
    model: String,
    every: usize,
    on_change: Option<Duration>,
    seen: u64,
    last_label: Option<String>,
    last_sent: Option<Instant>,
}

impl Publishing {
    /// Starts publishing if `--mqtt` is given.
    pub fn start(a: &MqttArgs, model: &str) -> Result<Option<Publishing>> {
        let Some(url) = &a.mqtt else {
            return Ok(None);
        };
        // Parsed here, not by clap: clap's errors repeat the value, and it may hold a password.
        let target: Target = url.parse()?;
        let device = a.device_id.clone().unwrap_or_else(host_name);
        let safe: String = device
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let queue_dir = a.mqtt_queue.clone().unwrap_or_else(default_queue);
        let publisher = Publisher::start(PublisherOptions {
            target: target.clone(),
            queue_dir: queue_dir.clone(),
            queue_max: a.mqtt_queue_max,
            ca: a.mqtt_ca.clone(),
            client_id: format!("wae-edge-{safe}-{}", std::process::id()),
            drain: Duration::from_secs_f64(a.mqtt_drain),
        })?;
        eprintln!(
            "mqtt: publishing to {} topic {} as device {} (queue {})",
            target.broker(),
            Escaped(&target.topic),
            Escaped(&device),
            Escaped(queue_dir.display())
        );
        Ok(Some(Publishing {
            publisher,
            queue_dir,
            device,
            model: model.to_string(),
            every: a.mqtt_every,
            on_change: a
                .mqtt_on_change
                .then(|| Duration::from_secs_f64(a.mqtt_heartbeat)),
            seen: 0,
            last_label: None,
            last_sent: None,
        }))
    }

    /// The frame's JSON, with the device and the model.
    fn message(&self, mut v: Value) -> Vec<u8> {
        if let Value::Object(m) = &mut v {
            m.insert("device".into(), self.device.clone().into());
            m.insert("model".into(), self.model.clone().into());
        }
        serde_json::to_vec(&v).expect("plain data serialises")
    }

    /// Publishes the frame if `--mqtt-every` / `--mqtt-on-change` say so; stops the stream
    /// when the broker has refused us.
    pub fn frame(&mut self, r: &FrameResult, stop: &AtomicBool) {
        self.seen += 1;
        if self.publisher.failed() {
            stop.store(true, Ordering::Relaxed);
            return;
        }
        if !(self.seen - 1).is_multiple_of(self.every as u64) {
            return;
        }
        let label = r.top.first().map(|p| p.label.as_str());
        if let Some(heartbeat) = self.on_change {
            let changed = self.last_label.as_deref() != label;
            let due = self.last_sent.is_none_or(|t| t.elapsed() >= heartbeat);
            if !changed && !due {
                return;
            }
        }
        self.last_label = label.map(str::to_string);
        self.last_sent = Some(Instant::now());
        let v = serde_json::to_value(r).expect("plain data serialises");
        self.publisher.frame(self.message(v));
    }

    /// Publishes the summary, waits for the queue to drain (up to `--mqtt-drain`) and reports.
    pub fn finish(self, summary: Value) -> Result<PublishReport> {
        self.publisher.summary(self.message(summary));
        let report = self.publisher.finish()?;
        eprintln!(
            "mqtt: {} delivered, {} queued, {} dropped",
            report.delivered, report.queued, report.dropped
        );
        if report.queued > 0 {
            eprintln!(
                "mqtt: {} message(s) still queued in {}; the next run with this queue delivers them",
                report.queued,
                Escaped(self.queue_dir.display())
            );
        }
        Ok(report)
    }
}
