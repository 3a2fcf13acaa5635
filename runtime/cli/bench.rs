//! `wae-edge bench`: latency percentiles, fps and GFLOP/s of the bare network, per stage, with
//! an optional baseline timed in alternation, and optionally the streaming pipeline's fps on a
//! source against the bare network's (the pipeline overhead).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use wae_edge::bench::{self, Bench, BenchReport, Budget};
use wae_edge::classifier::EngineKind;
use wae_edge::gpu::{Execution, GraphMode};
use wae_edge::pipeline::{run_stream, StreamOptions};
use wae_edge::sources::{open_source, SourceOptions};
use wae_edge::stats::resident_memory;
use wae_edge::terminal::Escaped;
use wae_edge::Classifier;

use super::Placement;

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model to time.
    #[arg(long)]
    model: PathBuf,
    /// A second model timed in the same run, in alternating rounds; reports the speed-up.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1, value_parser = super::at_least_one)]
    batch: usize,
    /// CPU threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long, value_parser = super::at_least_one)]
    pub(super) threads: Option<usize>,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed phase length in seconds.
    #[arg(long, conflicts_with = "iters", value_parser = super::seconds)]
    seconds: Option<f64>,
    /// Timed iterations per model.
    #[arg(long, value_parser = super::at_least_one)]
    iters: Option<usize>,
    /// Also run the streaming pipeline on this source (e.g. synthetic:640x480) and report its
    /// fps against the bare model's.
    #[arg(long)]
    pipeline: Option<String>,
    /// Implementation: auto (native CPU path on the CPU, candle on GPUs) or candle everywhere.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineKind,
    /// One JSON object (last line) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time every conv (native CPU engine) over this many passes after the timed phase, and
    /// print their medians (JSON: `layers` in each model's object).
    #[arg(long, value_name = "PASSES", num_args = 0..=1, default_missing_value = "20")]
    layers: Option<usize>,
    /// Also draw the per-stage medians (with the baseline's beside them) as an SVG picture.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<PathBuf>,
    #[command(flatten)]
    pub(super) placement: Placement,
}

/// The per-conv medians, with each one's share of the whole pass's median.
fn layer_table(r: &BenchReport, name: &str) {
    let Some(layers) = &r.layers else { return };
    println!(
        "{name} per conv (medians; the I_H branch runs beside the backbone, so their times overlap;"
    );
    println!(
        "  weights: MB a pass, and GB/s at the median: near memory bandwidth, it waits on memory;"
    );
    println!(
        "  multiply-adds its kernel does, M a pass, and G/s at the median: near the FMA peak, it waits on arithmetic):"
    );
    for l in layers {
        println!(
            "  {:<16} {:<20} {:<16} {:>8.3} ms {:>5.1}%  {:>6.1} MB {:>5.1} GB/s  {:>7.1} M {:>6.1} G/s",
            l.layer,
            l.shape,
            l.kernel,
            l.p50_ms,
            100.0 * l.p50_ms / r.p50_ms,
            l.weight_mb,
            l.weight_gb_s,
            l.mults_m,
            l.mults_g_s
        );
    }
    let mults: f64 = layers.iter().map(|l| l.mults_m).sum();
    println!("  all convs: {mults:.0} M multiply-adds a pass");
}

fn table(r: &BenchReport, name: &str) {
    println!(
        "{name:<9} p50 {:>9.3} ms  p90 {:>9.3}  p99 {:>9.3}  min {:>9.3}  {:>9.1} img/s  {:>7.1} GFLOP/s  (init {:.0} ms, first {:.1} ms, {} iters)",
        r.p50_ms, r.p90_ms, r.p99_ms, r.min_ms, r.fps, r.gflops, r.init_ms, r.first_ms, r.iters
    );
    let stages: Vec<String> = r
        .stages
        .iter()
        .map(|(k, v)| format!("{k} {:.3}", v.p50_ms))
        .collect();
    println!("          stage p50 ms: {}", stages.join(", "));
    if let Some(ex) = &r.execution {
        println!(
            "          cuda {ex}: GPU time a pass p50 {:.3} ms (events; stages above are GPU time too)",
            r.gpu_p50_ms.unwrap_or_default()
        );
    }
    if let Some(d) = r.max_rel_diff {
        println!("          logits vs the CPU engine: max |diff| / max |logit| = {d:.2e}");
    }
}

/// Bare-model fps and pipeline fps, measured in alternating rounds.
fn pipeline_overhead(clf: &Classifier, uri: &str, seconds: f64) -> Result<serde_json::Value> {
    let i = clf.config().input;
    let x1 = candle_core::Tensor::randn(
        0f32,
        1.0,
        (1, i.channels, i.height, i.width),
        clf.input_device(),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    // Decided once, as `stream` would at start, so that every round runs the same layout.
    let overlap = wae_edge::pipeline::overlap_pays(clf);
    eprintln!(
        "pipeline layout: {}",
        if overlap {
            "frames prepared on their own thread, network on all cores but one"
        } else {
            "frames prepared inline, network on every core"
        }
    );
    let (mut bare, mut piped) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < seconds / 6.0 {
            clf.logits(&x1)?;
            n += 1;
        }
        bare.push(n as f64 / t.elapsed().as_secs_f64());
        let opts = StreamOptions {
            max_bad_frames: wae_edge::pipeline::MAX_BAD_FRAMES,
            frames: None,
            seconds: Some(seconds / 6.0),
            timeout: Duration::from_secs(5),
            top_k: 1,
            reconnect: false,
            scaled_decode: true,
            overlap: Some(overlap),
        };
        let s = run_stream(
            || open_source(uri, &SourceOptions::default()),
            clf,
            &opts,
            &stop,
            |_, _, _| (),
        )?;
        piped.push(s.fps);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, p) = (med(&mut bare), med(&mut piped));
    Ok(
        json!({"source": uri, "bare_fps": b, "pipeline_fps": p, "overhead_pct": 100.0 * (1.0 - p / b)}),
    )
}

/// Writes the stage chart of the timed models (atomically), titled with the speed-up.
#[cfg(feature = "charts")]
fn write_chart(path: &std::path::Path, reports: &[BenchReport]) -> Result<()> {
    use anyhow::Context;
    // The file's stem, or its directory's name for the shipped layout (`models/NAME/model.*`).
    let name = |r: &BenchReport| {
        let p = std::path::Path::new(&r.model);
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
        match (stem.as_deref(), p.parent().and_then(|d| d.file_name())) {
            (Some("model"), Some(dir)) => dir.to_string_lossy().into_owned(),
            (Some(s), _) => s.to_string(),
            (None, _) => r.model.clone(),
        }
    };
    let names: Vec<String> = reports.iter().map(name).collect();
    let runs: Vec<(&str, &BenchReport)> = names.iter().map(String::as_str).zip(reports).collect();
    let mut title = format!("wae-edge bench, batch {}, p50 per stage", reports[0].batch);
    if let Some(b) = reports.get(1) {
        title += &format!(
            ": {:.2}x faster than {}",
            b.p50_ms / reports[0].p50_ms,
            names[1]
        );
    }
    let svg = wae_edge::charts::stage_chart_svg(&runs, &title)?;
    wae_edge::atomic::write(path, svg.as_bytes())
        .with_context(|| format!("cannot write the chart to {}", path.display()))
}

/// Without the `charts` feature there is nothing to draw with.
#[cfg(not(feature = "charts"))]
fn write_chart(_: &std::path::Path, _: &[BenchReport]) -> Result<()> {
    anyhow::bail!("this build has no charts: rebuild with the `charts` feature (on by default)")
}

pub fn run(a: Args) -> Result<ExitCode> {
    let device = a.placement.open()?;
    if a.layers.is_some() && !(device.is_cpu() && a.engine == EngineKind::Auto) {
        anyhow::bail!("--layers times the native CPU engine's convs: use it with --device cpu and --engine auto");
    }
    let graph = a.placement.cuda_graph;
    let load = |path: &std::path::Path, mode| Bench::load(path, &device, a.batch, a.engine, mode);
    let mut models = vec![load(&a.model, graph)?];
    let mut roles = vec!["model"];
    if let Some(b) = &a.baseline {
        models.push(load(b, graph)?);
        roles.push("baseline");
    }
    if let Some(ex) = models[0].engine.execution() {
        eprintln!("cuda: {ex}");
        // A graph's saving is measured against the same engine launching eagerly, in this run.
        if ex == Execution::Graph {
            models.push(load(&a.model, GraphMode::Off)?);
            roles.push("eager");
            if let Some(b) = &a.baseline {
                models.push(load(b, GraphMode::Off)?);
                roles.push("baseline_eager");
            }
        }
    }
    let budget = match (a.iters, a.seconds) {
        (Some(n), _) => Budget::Iters(n),
        (None, Some(s)) => Budget::Seconds(s),
        (None, None) => Budget::Seconds(10.0),
    };
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("timing {bar:40} {elapsed}<{eta}").expect("static template"),
    );
    bench::run(&mut models, a.warmup, budget, |f| {
        bar.set_position((f * 1000.0) as u64)
    })?;
    bar.finish_and_clear();
    let mut reports: Vec<BenchReport> = models.iter().map(Bench::report).collect();
    for (r, m) in reports.iter_mut().zip(&models) {
        r.max_rel_diff = m.rel_diff_to_cpu()?;
    }
    if let Some(passes) = a.layers {
        for (r, m) in reports.iter_mut().zip(&models) {
            r.layers = m.layers(passes)?;
        }
    }
    let pipeline = match &a.pipeline {
        Some(uri) => Some(pipeline_overhead(
            &a.placement.load(&a.model, &device, a.engine)?,
            uri,
            match budget {
                Budget::Seconds(s) => s,
                Budget::Iters(_) => 6.0,
            },
        )?),
        None => None,
    };
    let threads = candle_core::utils::get_num_threads();
    let peak = resident_memory().map(|m| m.1);
    let mut out = json!({"engine": models[0].engine.name(), "threads": threads, "device": wae_edge::device::describe(&device), "peak_rss_bytes": peak});
    for (role, r) in roles.iter().zip(&reports) {
        out[*role] = json!(r);
    }
    let baseline = roles
        .iter()
        .position(|r| *r == "baseline")
        .map(|i| &reports[i]);
    if let Some(b) = baseline {
        out["speedup"] = json!(b.p50_ms / reports[0].p50_ms);
    }
    if let Some(p) = &pipeline {
        out["pipeline"] = p.clone();
    }
    if let Some(path) = &a.chart {
        // The model and its baseline, which come first; eager twins are a CUDA detail.
        write_chart(path, &reports[..1 + usize::from(baseline.is_some())])?;
    }
    if a.json {
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} threads, batch {}, device {}, engine {}",
        threads,
        a.batch,
        wae_edge::device::describe(&device),
        models[0].engine.name()
    );
    for (role, r) in roles.iter().zip(&reports) {
        table(r, role);
    }
    if let Some(b) = baseline {
        println!(
            "speed-up (baseline p50 / model p50): {:.2}x",
            b.p50_ms / reports[0].p50_ms
        );
    }
    if let Some(p) = pipeline {
        println!(
            "pipeline on {}: {:.1} fps vs bare {:.1} fps: overhead {:.1}%",
            Escaped(p["source"].as_str().unwrap_or_default()),
            p["pipeline_fps"].as_f64().unwrap_or_default(),
            p["bare_fps"].as_f64().unwrap_or_default(),
            p["overhead_pct"].as_f64().unwrap_or_default()
        );
    }
    if let Some(peak) = peak {
        println!("peak resident memory {:.0} MB", peak as f64 / 1e6);
    }
    for (r, name) in reports.iter().zip(&roles) {
        layer_table(r, name);
    }
    Ok(ExitCode::SUCCESS)
}
