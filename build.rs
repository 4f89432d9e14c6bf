//! Records the commit the binary is built from, for `call-notifier --version`.
//!
//! An operator reading `--version` on a host must be able to tell which
//! commit runs there, not only the release: two builds of `0.2.0` may differ.
//! The commit comes from, in order:
//!
//! 1. `CALL_NOTIFIER_COMMIT` in the build's environment, for builds where
//!    git cannot answer (a source tarball, a packaging chroot);
//! 2. `git rev-parse --short HEAD`, when this crate is the top of a git
//!    work tree (a crate unpacked inside some other repository must not
//!    report that repository's commit);
//! 3. `unknown`.
//!
//! Cargo reruns this script when the variable changes or HEAD moves (the
//! work tree's `HEAD`, the branch it points to, and `packed-refs`), and not
//! on every source change.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CALL_NOTIFIER_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = std::env::var("CALL_NOTIFIER_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CALL_NOTIFIER_COMMIT={commit}");
}

/// The short commit of HEAD, when the manifest's directory is the top of a
/// git work tree; and tells Cargo which files to watch for HEAD moving.
fn git_commit() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = git(&manifest_dir, &["rev-parse", "--show-toplevel"])?;
    if !same_dir(Path::new(&top), &manifest_dir) {
        return None;
    }
    // Paths git prints relative to the work tree; absolute ones stay so.
    let path = |relative: String| manifest_dir.join(relative);
    let git_dir = path(git(&manifest_dir, &["rev-parse", "--git-dir"])?);
    let common_dir = path(git(&manifest_dir, &["rev-parse", "--git-common-dir"])?);
    let mut watched = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(branch) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common_dir.join(branch));
    }
    // A watched path that does not exist would make Cargo rerun every build.
    for file in watched.iter().filter(|f| f.exists()) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    git(&manifest_dir, &["rev-parse", "--short", "HEAD"])
}

/// Runs git in `dir`; its trimmed output when it succeeded with some.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
