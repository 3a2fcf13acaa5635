//! `wae-edge inspect`: config, parameters and multiply-accumulates per part, against the plain
//! counterpart, plus how long loading takes and what it costs in resident memory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use wae_edge::terminal::Escaped;

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;

use wae_edge::model::macs::{self, Macs};
use wae_edge::stats::resident_memory;
use wae_edge::weights::{self, ModelFile};

/// Arguments of `inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Model file.
    model: PathBuf,
}

/// Parameter counts per part.
#[derive(Serialize, Default)]
struct Params {
    encoder: u64,
    backbone: u64,
    branch: u64,
    heads: u64,
    decoder: u64,
    /// What inference loads (decoder excluded).
    total: u64,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    config: &'a wae_edge::ModelConfig,
    params: Params,
    macs: Macs,
    macs_without_encoder: u64,
    plain_macs: u64,
    /// plain_macs / macs.total.
    macs_ratio: f64,
    file_bytes: usize,
    /// mmap + header validation + building on the CPU (f32 copies of the weights).
    load_ms: f64,
    rss_bytes_after_load: Option<u64>,
    peak_rss_bytes: Option<u64>,
}

fn params_by_part(file: &ModelFile) -> Params {
    let config = file.config();
    let mut p = Params::default();
    for (name, shape) in weights::inference_tensors(config) {
        let n = shape.iter().product::<usize>() as u64;
        let part = name.split('.').next().unwrap_or_default();
        match part {
            "encoder" => p.encoder += n,
            "backbone" => p.backbone += n,
            "branch" => p.branch += n,
            _ => p.heads += n,
        }
        p.total += n;
    }
    p.decoder = weights::param_count(&weights::decoder_tensors(config));
    p
}

pub fn run(args: Args) -> Result<ExitCode> {
    let t = Instant::now();
    let file = ModelFile::open(&args.model)?;
    let config = file.config().clone();
    let params = params_by_part(&file);
    let file_bytes = file.len();
    let net = file.build(&Device::Cpu)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let mem = resident_memory();
    drop(net);
    let m = macs::count(&config);
    let plain = macs::count(&config.plain_counterpart());
    let report = Report {
        model: args.model.to_string_lossy().into_owned(),
        config: &config,
        params,
        macs: m,
        macs_without_encoder: m.without_encoder(),
        plain_macs: plain.total,
        macs_ratio: plain.total as f64 / m.total as f64,
        file_bytes,
        load_ms,
        rss_bytes_after_load: mem.map(|m| m.0),
        peak_rss_bytes: mem.map(|m| m.1),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &config;
    let g = |v: u64| format!("{:>10.4} G", v as f64 / 1e9);
    let mp = |v: u64| format!("{:>10.3} M", v as f64 / 1e6);
    println!("{}  ({})", Escaped(&report.model), Escaped(&c.name));
    println!(
        "  kind {:?}, input {}x{}x{}, {} classes{}",
        c.arch.kind,
        c.input.channels,
        c.input.height,
        c.input.width,
        c.classes,
        if c.untrained { ", UNTRAINED" } else { "" }
    );
    println!(
        "  preprocess: {:?} resize, mean {:?}, std {:?}",
        c.preprocess.resize, c.preprocess.mean, c.preprocess.std
    );
    println!(
        "  backbone {:?}, branch width x{}, heads {:?} / {:?}",
        c.arch.backbone, c.arch.branch_width, c.arch.head_low, c.arch.head_fuse
    );
    println!("  {:<10} {:>12} {:>12}", "part", "params", "MACs");
    let p = &report.params;
    for (name, pp, mm) in [
        ("encoder", p.encoder, m.encoder),
        ("backbone", p.backbone, m.backbone),
        ("branch", p.branch, m.branch),
        ("heads", p.heads, m.heads),
        ("total", p.total, m.total),
        ("decoder*", p.decoder, m.decoder),
    ] {
        println!("  {name:<10} {} {}", mp(pp), g(mm));
    }
    println!("  * training only, never loaded for inference");
    println!(
        "  without encoder: {}   plain counterpart: {}   ratio {:.2}x",
        g(m.without_encoder()).trim(),
        g(plain.total).trim(),
        report.macs_ratio
    );
    println!(
        "  file {:.1} MB, load {:.0} ms (CPU, f32)",
        file_bytes as f64 / 1e6,
        load_ms
    );
    if let Some((rss, peak)) = mem {
        println!(
            "  resident after load {:.0} MB, peak {:.0} MB",
            rss as f64 / 1e6,
            peak as f64 / 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}
