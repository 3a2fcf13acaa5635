//! Records the git commit the binary is built from, for `wae-edge --version`. Outside a git
//! checkout (a crates.io package, a tarball) the commit is `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WAE_EDGE_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it names (a commit).
    let git = Path::new(".git");
    if git.join("HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(r) = head.strip_prefix("ref: ") {
                // A branch lives in its own file or, after `git gc`, in packed-refs; naming a
                // file that does not exist would rerun this script on every build.
                let loose = git.join(r.trim());
                let file = if loose.exists() {
                    loose
                } else {
                    git.join("packed-refs")
                };
                if file.exists() {
                    println!("cargo:rerun-if-changed={}", file.display());
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
