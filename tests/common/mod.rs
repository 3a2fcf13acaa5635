//! Helpers shared by the integration tests: the real binary, and model files written by hand
//! (good and deliberately broken).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

use wae_edge::config::{preset, ModelConfig, CONFIG_KEY};

/// The `wae-edge` binary under test.
pub fn bin() -> Command {
    let mut c = Command::cargo_bin("wae-edge").expect("binary built");
    c.env_remove("WAE_EDGE_MODEL").env("RUST_BACKTRACE", "1");
    c
}

/// A tensor as raw safetensors parts.
pub use wae_edge::weights::RawTensor as Raw;

/// The tensors of a seeded random model of `preset_name`, as f16 raw parts, and its config.
pub fn raw_model(preset_name: &str) -> (ModelConfig, Vec<(String, Raw)>) {
    let (config, tensors) =
        wae_edge::weights::random_model(&preset(preset_name).unwrap(), 42).unwrap();
    let mut raws: Vec<(String, Raw)> = tensors
        .into_iter()
        .map(|(n, t)| (n, wae_edge::weights::to_f16_raw(&t).unwrap()))
        .collect();
    raws.sort_by(|a, b| a.0.cmp(&b.0));
    (config, raws)
}

/// Serialises tensors with an arbitrary metadata map.
pub fn write_raw(path: &Path, tensors: &[(String, Raw)], meta: Option<HashMap<String, String>>) {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (n.as_str(), r)), meta).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Writes a model with `config` in its metadata.
pub fn write_model(path: &Path, config: &ModelConfig, tensors: &[(String, Raw)]) {
    write_raw(
        path,
        tensors,
        Some(HashMap::from([(CONFIG_KEY.to_string(), config.to_json())])),
    );
}

/// A good seeded wae-fashion model file in `dir`.
pub fn fashion_model(dir: &Path) -> PathBuf {
    let (cfg, raws) = raw_model("wae-fashion");
    let p = dir.join("wae-fashion.safetensors");
    write_model(&p, &cfg, &raws);
    p
}

/// A 28x28 grayscale PNG with a bright rectangle.
pub fn sample_png(dir: &Path, name: &str) -> PathBuf {
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (6..22).contains(&x) && (4..24).contains(&y) {
            200
        } else {
            0
        }])
    });
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

/// Asserts a failed run: non-zero exit, exactly one `error:` line naming `needle`, no panic.
pub fn assert_clean_failure(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "want exactly one error line, got: {stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "error line lacks `{needle}`: {}",
        errors[0]
    );
    assert!(!stderr.contains("   0: "), "backtrace leaked: {stderr}");
}

/// Asserts a run succeeded, showing its stderr otherwise.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary directory holding a seeded wae-fashion model and one sample PNG.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub img: PathBuf,
}

/// A fresh [`Fixture`].
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = fashion_model(dir.path());
    let img = sample_png(dir.path(), "a.png");
    Fixture { dir, model, img }
}

/// `wae-edge classify --json [extra...] --model MODEL INPUT`.
pub fn classify_json(model: &Path, input: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .arg("classify")
        .arg("--json")
        .args(extra)
        .arg("--model")
        .arg(model)
        .arg(input)
        .output()
        .unwrap()
}

/// The tensors with every byte of those whose name passes `pick` set to 0xff (all NaN in f16).
pub fn with_nan(raws: &[(String, Raw)], pick: impl Fn(&str) -> bool) -> Vec<(String, Raw)> {
    raws.iter()
        .map(|(n, r)| {
            let mut r = r.clone();
            if pick(n) {
                r.data.iter_mut().for_each(|b| *b = 0xff);
            }
            (n.clone(), r)
        })
        .collect()
}

/// A PNG whose header claims `width` x `height` pixels of `depth` bits in color type `color`
/// (0 gray, 2 RGB, 6 RGBA), with almost no data: decoders that trust the header before
/// checking it would allocate the whole claim.
pub fn png_header(width: u32, height: u32, depth: u8, color: u8) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        c.extend_from_slice(&h.finalize().to_be_bytes());
        c
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// `wae-edge COMMAND --model MODEL ARGS...`, run to completion (at most two minutes).
pub fn run_with_model<I, S>(command: &str, model: &Path, args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    bin()
        .arg(command)
        .arg("--model")
        .arg(model)
        .args(args)
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap()
}

/// `wae-edge stream --json ARGS... SOURCE`: the output and its lines, parsed.
pub fn stream_json(
    model: &Path,
    args: &[&str],
    source: impl AsRef<std::ffi::OsStr>,
) -> (std::process::Output, Vec<serde_json::Value>) {
    let out = run_with_model(
        "stream",
        model,
        ["--json"]
            .iter()
            .chain(args)
            .map(std::ffi::OsStr::new)
            .chain([source.as_ref()]),
    );
    let lines = json_lines(&out);
    (out, lines)
}

/// A run's stdout as JSON Lines, each parsed.
pub fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}
