//! What the disk can do to us: directories of thousands of files with junk and non-UTF-8 names,
//! read-only output directories, and a full disk. Every writer must fail with one error line and
//! leave no partial file behind.
//!
//! The read-only and full-disk cases mount a small tmpfs inside a private mount namespace
//! (`unshare -m`), so nothing leaks to the host. That needs root or CAP_SYS_ADMIN; CI runs as
//! root. Elsewhere the read-only case falls back to `chmod 555`, and the full-disk case says it
//! was skipped.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Output;

use common::*;

/// Classifying a directory of 2,000 entries: valid images (one under a non-UTF-8 name), text
/// files, files without an extension, a sub-directory named like an image, and two corrupt
/// PNGs. Images are classified, non-images skipped, each corrupt file gets its own error line,
/// and the run ends with a count and a non-zero exit.
#[test]
fn thousands_of_files_with_junk_and_non_utf8_names() {
    let f = fixture();
    let dir = f.dir.path().join("frames");
    std::fs::create_dir(&dir).unwrap();
    let png = std::fs::read(&f.img).unwrap();
    let mut images = 0;
    for i in 0..2000 {
        match i % 4 {
            0 | 1 => {
                std::fs::write(dir.join(format!("img{i:04}.png")), &png).unwrap();
                images += 1;
            }
            2 => std::fs::write(dir.join(format!("notes{i:04}.txt")), b"not an image").unwrap(),
            _ => std::fs::write(dir.join(format!("noext{i:04}")), &png).unwrap(),
        }
    }
    // Latin-1 bytes, invalid as UTF-8.
    let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff.png"));
    std::fs::write(dir.join(&odd), &png).unwrap();
    images += 1;
    std::fs::write(dir.join("broken-a.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(dir.join("broken-b.PNG"), b"\x89PNG\r\n\x1a\nrubbish").unwrap();
    std::fs::create_dir(dir.join("looks-like.png")).unwrap();

    let out = bin()
        .args(["classify", "--json", "--model"])
        .arg(&f.model)
        .arg(&dir)
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout.clone()).expect("JSON output is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), images, "one line per good image");
    assert!(
        lines.iter().any(|l| l["input"]
            .as_str()
            .unwrap()
            .ends_with("caf\u{fffd}-\u{fffd}.png")),
        "the non-UTF-8 name is classified and shown lossily"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors.iter().any(|e| e.contains("broken-a.png")));
    assert!(errors.iter().any(|e| e.contains("broken-b.PNG")));
    assert!(stderr.contains(&format!("2 of {} inputs failed", images + 2)));
}

/// Runs `script` (sh) with `$MNT` a fresh tmpfs of `size` in a private mount namespace, mounted
/// read-only when `read_only`. `None` when this machine does not allow it.
fn in_tmpfs(size: &str, read_only: bool, script: &str) -> Option<Output> {
    let mnt = tempfile::tempdir().unwrap();
    let opts = format!("size={size}{}", if read_only { ",ro" } else { "" });
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--", "mount", "-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(mnt.path())
        .output()
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    let full = format!(
        "mount -t tmpfs -o {opts} tmpfs \"$MNT\" || exit 99\n{script}\nrc=$?\necho \"left: $(find \"$MNT\" -type f | tr '\\n' ' ')\" >&2\nexit $rc"
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "--", "sh", "-c", &full])
        .env("MNT", mnt.path())
        .env("BIN", assert_cmd::cargo::cargo_bin("wae-edge"))
        .env_remove("WAE_EDGE_MODEL")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(99), "mount failed");
    Some(out)
}

/// What the writers under test write, as shell commands using `$BIN`, `$MNT` and `$IMG`/`$MODEL`.
const WRITERS: &[(&str, &str)] = &[
    (
        "new",
        "\"$BIN\" new --preset wae-fashion -o \"$MNT/m.safetensors\"",
    ),
    (
        "export-onnx",
        "\"$BIN\" export-onnx --model \"$MODEL\" -o \"$MNT/m.onnx\"",
    ),
    (
        "decompose",
        "\"$BIN\" decompose --model \"$MODEL\" \"$IMG\" -o \"$MNT/dec\"",
    ),
    (
        "capture",
        "\"$BIN\" capture synthetic:640x480 --count 3 --label cat --out \"$MNT/data\"",
    ),
    (
        "stream --save",
        "\"$BIN\" stream --model \"$MODEL\" --frames 3 --save \"$MNT/frames\" synthetic:640x480",
    ),
];

/// Runs each writer in its own tmpfs; returns (name, output, files left behind).
fn run_writers(size: &str, read_only: bool) -> Option<Vec<(&'static str, Output, String)>> {
    let f = fixture();
    let mut results = Vec::new();
    for (name, cmd) in WRITERS {
        let script = format!(
            "IMG='{}' MODEL='{}'\n{cmd}",
            f.img.display(),
            f.model.display()
        );
        let out = in_tmpfs(size, read_only, &script)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let left = stderr
            .lines()
            .find_map(|l| l.strip_prefix("left: "))
            .unwrap_or("?")
            .trim()
            .to_string();
        let mut trimmed = out.clone();
        trimmed.stderr = stderr
            .lines()
            .filter(|l| !l.starts_with("left: "))
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes();
        results.push((*name, trimmed, left));
    }
    Some(results)
}

#[test]
fn read_only_output_directories() {
    let Some(results) = run_writers("1m", true) else {
        // Without mount rights: a directory without write permission (ignored by root).
        let d = tempfile::tempdir().unwrap();
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        let out = bin()
            .args(["new", "--preset", "wae-fashion", "-o"])
            .arg(ro.join("m.safetensors"))
            .output()
            .unwrap();
        assert_clean_failure(&out, "m.safetensors");
        return;
    };
    for (name, out, left) in results {
        assert_clean_failure(&out, "Read-only file system");
        assert!(left.is_empty(), "{name} left {left}");
    }
}

#[test]
fn full_disk_leaves_no_partial_files() {
    // 8 KiB: two pages of tmpfs, less than a model, an ONNX file or a 640x480 PNG; the small
    // decompose PNGs fill it after one file.
    let Some(results) = run_writers("8k", false) else {
        eprintln!("skipped: this machine does not allow a private tmpfs mount");
        return;
    };
    for (name, out, left) in results {
        assert_clean_failure(&out, "No space left on device");
        // Single-file writers leave nothing; multi-file ones may keep the files that were
        // completed before the disk filled, but never a temporary or truncated one.
        assert!(!left.contains("/.wae-edge-"), "{name} left {left}");
        if matches!(name, "new" | "export-onnx") {
            assert!(left.is_empty(), "{name} left {left}");
        }
    }
}
