//! The dependency audit of `cargo xtask test`: cargo-audit against the offline RustSec
//! snapshot in `../shared/advisory-db/` (the database's own host is not reachable from
//! CI), over every lockfile of the repository. Any advisory fails the run, warnings
//! (unmaintained, unsound) included.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

/// The snapshot, a git bundle; `LB_ADVISORY_DB` may name a newer one (a bundle or a
/// checkout of rustsec/advisory-db).
fn snapshot() -> PathBuf {
    std::env::var_os("LB_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/advisory-db/advisory-db.bundle"))
}

fn audit(db: &std::path::Path, lockfile: &std::path::Path) -> Result<(bool, String)> {
    let out = Command::new("cargo")
        // Offline and repeatable: the snapshot may be old (--stale), and yanked
        // versions would need the live crates.io index (--no-yanked).
        .args([
            "audit",
            "--no-fetch",
            "--stale",
            "--no-yanked",
            "--deny",
            "warnings",
            "--db",
        ])
        .arg(db)
        .arg("--file")
        .arg(lockfile)
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running cargo audit")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

pub fn run() -> Result<()> {
    let source = snapshot();
    if !source.exists() {
        bail!(
            "no RustSec advisory database at {} (set LB_ADVISORY_DB to a bundle or checkout)",
            source.display()
        );
    }
    let db = workspace_root().join("target/advisory-db");
    let _ = std::fs::remove_dir_all(&db);
    let status = Command::new("git")
        .args(["clone", "-q"])
        .arg(&source)
        .arg(&db)
        .status()
        .context("running git clone")?;
    if !status.success() {
        bail!("git clone {} failed", source.display());
    }
    // The canary lockfile holds smallvec 1.6.0 (RUSTSEC-2021-0003): an audit that
    // passes it has not read the database, and its pass on ours would mean nothing.
    let canary = workspace_root().join("xtask/audit-canary/Cargo.lock");
    let (passed, text) = audit(&db, &canary)?;
    if passed || !text.contains("RUSTSEC-2021-0003") {
        bail!("the audit did not flag the canary lockfile's known advisory:\n{text}");
    }
    for lockfile in ["Cargo.lock", "fuzz/Cargo.lock"] {
        let (passed, text) = audit(&db, &workspace_root().join(lockfile))?;
        if !passed {
            bail!("dependency audit of {lockfile} failed:\n{text}");
        }
        let scanned = text
            .lines()
            .find(|l| l.contains("Scanning"))
            .unwrap_or("")
            .trim();
        eprintln!("    {lockfile}: no advisories ({scanned})");
    }
    Ok(())
}
