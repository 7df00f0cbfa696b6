//! Installs what a fresh Debian/Ubuntu machine lacks, so `cargo xtask run` and
//! `cargo xtask test` work as the first commands on it (as root).

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// (command that must exist, Debian package providing it)
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("dig", "dnsutils"),
    ("dnsmasq", "dnsmasq-base"),
    ("iptables-legacy", "iptables"),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    ("setpriv", "util-linux"),
    ("python3", "python3"),
    ("curl", "curl"),
    ("nft", "nftables"),
    // The Kubernetes tests: unpacking the shared binaries, the API server's
    // service-account key, and Debian's etcd 3.4 (no streaming lists).
    ("xz", "xz-utils"),
    ("openssl", "openssl"),
    ("etcd", "etcd-server"),
    // The real node (lb-testbed realnode): container runtime, CNI plugins, and gcc
    // for the sandbox image's program.
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("gcc", "gcc"),
    // Shells and tools inside the images of the real-node tests (agnhost, redis).
    ("/bin/busybox", "busybox-static"),
];

/// The bpf-linker release that links with rustc's own LLVM (../shared/DESIGN.md section 6).
const BPF_LINKER_VERSION: &str = "0.10.0";
/// cargo-audit, for the dependency audit of `cargo xtask test`.
const CARGO_AUDIT_VERSION: &str = "0.22.2";
/// cargo-fuzz, for the bounded fuzzing run of `cargo xtask test`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Whether `command` is on the PATH.
pub fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("    $ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        // Set by the cargo that runs xtask; they would pin the stable toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        eprintln!("==> installing {}", missing.join(" "));
        run("apt-get", &["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        run("apt-get", &args)?;
    }

    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is needed for the nightly toolchain that builds the eBPF programs")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    if !installed.contains("rust-src") || !installed.contains("clippy") {
        eprintln!("==> adding rust-src and clippy to the nightly toolchain");
        run(
            "rustup",
            &[
                "component",
                "add",
                "rust-src",
                "clippy",
                "--toolchain",
                "nightly",
            ],
        )?;
    }

    let fuzz = Command::new("cargo").args(["fuzz", "--version"]).output();
    if !fuzz.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        eprintln!("==> installing cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes, once)");
        run(
            "cargo",
            &[
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
            ],
        )?;
    }

    let audit = Command::new("cargo").args(["audit", "--version"]).output();
    if !audit.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_AUDIT_VERSION)) {
        eprintln!("==> installing cargo-audit {CARGO_AUDIT_VERSION} (about six minutes, once)");
        run(
            "cargo",
            &[
                "install",
                &format!("cargo-audit@{CARGO_AUDIT_VERSION}"),
                "--locked",
            ],
        )?;
    }

    let linker = Command::new("bpf-linker").arg("--version").output();
    let linker_ok =
        linker.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!("==> installing bpf-linker {BPF_LINKER_VERSION} (about two minutes, once)");
        run(
            "cargo",
            &[
                "+nightly",
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ],
        )?;
    }
    Ok(())
}
