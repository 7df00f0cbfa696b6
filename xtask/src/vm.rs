//! The kernel-compatibility run: this machine's test binaries inside Debian 12's Linux
//! 6.1 (the kernel of Debian 12 and Amazon Linux 2023 nodes), booted under qemu with
//! this machine's filesystem shared read-only, so the very binaries built here run
//! there. The guest has a software CPU (this machine's /dev/kvm cannot boot a stock
//! kernel), so it runs a chosen subset: every test whose behaviour depends on the
//! kernel, not the whole suite.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, prereqs::have, workspace_root};

/// Debian 12's kernel ABI that the run boots.
pub const KERNEL: &str = "6.1.0-50-amd64";

/// The kernel tests `--kernel` accepts, by the name users give.
pub fn kernel_for(name: &str) -> Result<&'static str> {
    match name {
        "6.1" | KERNEL => Ok(KERNEL),
        other => bail!("no recipe for kernel {other:?}: this run knows 6.1 ({KERNEL})"),
    }
}

/// Root-only unit tests run in the guest (`--exact` names in the library test binary).
const UNIT_TESTS: &[&str] = &[
    "datapath::tc_tests::tc_programs_translate_crafted_packets",
    "datapath::tc_tests::tc_programs_track_tcp_state_and_refuse_what_they_cannot_serve",
    "datapath::tc_tests::tc_programs_keep_answered_flows_from_floods_of_new_ones",
    "datapath::tc_tests::tc_programs_maglev_tables_read_back_as_written",
    "datapath::tc_tests::tc_programs_balance_packet_mode_pods",
    "datapath::features::tests::probes_answer_on_this_kernel",
    "datapath::sockets::tests::destroys_only_matching_sockets_by_cookie_and_peer",
    "datapath::batch::tests::large_batches_are_written_and_deleted_whole",
];

/// End-to-end tests run in the guest: the socket path (TCP, connected and
/// unconnected UDP, refusal, getpeername, stale-socket termination), the TC path
/// (node ports from outside with both traffic policies and SNAT, IPv6), restarts and
/// `kill -9` under load through both paths, adoption or migration of pins left by a
/// previous daemon, and the per-workload modes (the cgroup-ancestor lookup, the packet
/// path on a pod's interface through netlink filters).
const E2E_TESTS: &[&str] = &[
    "clusterip::redis_cli_through_cluster_ip",
    "clusterip::scale_3_to_1_to_0_refuses_at_once",
    "clusterip::restart_keeps_the_datapath_and_adopts_it",
    "udp::kube_dns_over_udp_and_tcp_ipv4",
    "udp::getpeername_shows_the_cluster_ip_ipv4",
    "udp::removed_backend_terminates_its_sockets_ipv4",
    "kernel::node_ports_survive_kill_9_with_the_kernels_tc_attachment",
    "kernel::uplinks_that_cannot_be_served_are_refused_with_the_reason",
    "external::ipv6_node_ports_from_manifests",
    "reliability::restarts_kill_9_and_upgrades_under_load_drop_nothing",
    "reliability::an_older_layout_is_migrated_while_it_serves",
    "reliability::cleanup_removes_everything_and_refuses_while_a_daemon_runs",
    "workloads::modes_from_pod_manifests",
];

/// How much longer the guest may take to start a daemon than the host.
const SLOWDOWN: u32 = 4;

/// The initramfs's `/init`: load the 9p and virtio modules, mount the host's root
/// read-only with fresh tmpfs for /tmp, /run and /root, the share read-write, cgroup2
/// (tests attach daemons to cgroups), bring up loopback, run the command, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot || { echo "9p root mount failed"; poweroff -f; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/tmp; mount -t tmpfs tmpfs /newroot/run; mount -t tmpfs tmpfs /newroot/root
mkdir -p /newroot/tmp/vmshare; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /newroot/tmp/vmshare
mkdir -p /newroot/dev/pts /newroot/dev/shm; mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
echo 1 > /newroot/proc/sys/kernel/sysrq
exec switch_root /newroot /bin/sh -c 'ip link set lo up
echo "VM-READY uptime $(cut -d" " -f1 /proc/uptime)"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb /bin/sh /tmp/vmshare/command.sh
rc=$?; echo $rc > /tmp/vmshare/rc; echo "VM-EXIT rc=$rc uptime $(cut -d" " -f1 /proc/uptime)"
sync; echo o > /proc/sysrq-trigger; sleep 10'
"#;

/// Modules the initramfs loads, in order (virtio PCI and 9p).
const MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
];

fn apt_install(packages: &[&str], env: &[(&str, &str)]) -> Result<()> {
    eprintln!("==> installing {}", packages.join(" "));
    let status = Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get update failed");
    }
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    for (key, value) in env {
        cmd.env(key, value);
    }
    if !cmd.status()?.success() {
        bail!("apt-get install {} failed", packages.join(" "));
    }
    Ok(())
}

/// qemu, busybox and the kernel package, installed if missing.
fn ensure_prereqs(kernel: &str) -> Result<()> {
    let mut missing = Vec::new();
    for (command, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
        ("modinfo", "kmod"),
        ("gzip", "gzip"),
    ] {
        if !have(command) {
            missing.push(package);
        }
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        apt_install(&missing, &[])?;
    }
    if !Path::new(&format!("/boot/vmlinuz-{kernel}")).exists() {
        // The generic (not -cloud) kernel: it has 9p as modules. No initrd of its
        // own: the run brings its own.
        apt_install(
            &[&format!("linux-image-{kernel}-unsigned")],
            &[("INITRD", "No")],
        )?;
    }
    Ok(())
}

/// The initramfs for `kernel` under target/vm/, built once per init script.
fn initramfs(kernel: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let digest = INIT.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("initrd-{kernel}-{digest:016x}.gz"));
    if path.exists() {
        return Ok(path);
    }
    let staging = tempdir(&dir, "initrd")?;
    for sub in ["bin", "mods", "proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(staging.join(sub))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox")).context("copying busybox")?;
    let mut order = String::new();
    for module in MODULES {
        let out = Command::new("modinfo")
            .args(["-k", kernel, "-n", module])
            .output()?;
        let source = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || source.is_empty() {
            bail!("module {module} of kernel {kernel} not found");
        }
        let target = staging.join(format!("mods/{module}.ko"));
        if source.ends_with(".xz") {
            let data = Command::new("xz").args(["-dc", &source]).output()?;
            fs::write(&target, data.stdout)?;
        } else {
            fs::copy(&source, &target)?;
        }
        order.push_str(module);
        order.push('\n');
    }
    fs::write(staging.join("mods/order"), order)?;
    fs::write(staging.join("init"), INIT)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(staging.join("init"), fs::Permissions::from_mode(0o755))?;
    let partial = dir.join("initrd.partial");
    let status = Command::new("sh")
        .current_dir(&staging)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > {}",
            partial.display()
        ))
        .status()?;
    fs::remove_dir_all(&staging)?;
    if !status.success() {
        bail!("packing the initramfs failed");
    }
    fs::rename(&partial, &path)?;
    Ok(path)
}

fn tempdir(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Builds the library and e2e test binaries; their paths.
fn test_binaries() -> Result<(PathBuf, PathBuf)> {
    let out = cargo()
        .args([
            "test",
            "-p",
            "lb-userspace",
            "--lib",
            "--test",
            "e2e",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let (mut lib, mut e2e) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        if msg["profile"]["test"] != true {
            continue;
        }
        let kinds = msg["target"]["kind"].to_string();
        if kinds.contains("\"lib\"") {
            lib = Some(PathBuf::from(exe));
        } else if msg["target"]["name"] == "e2e" {
            e2e = Some(PathBuf::from(exe));
        }
    }
    Ok((
        lib.context("no library test binary")?,
        e2e.context("no e2e test binary")?,
    ))
}

/// Runs the kernel-compatibility subset inside `kernel`; fails if any test fails.
pub fn run_suite(kernel: &str) -> Result<()> {
    ensure_prereqs(kernel)?;
    let initrd = initramfs(kernel)?;
    let (lib, e2e) = test_binaries()?;
    let share = tempdir(Path::new("/tmp"), "lb-vmshare")?;
    let script = format!(
        "set -u\ncd {root}\nuname -r\nfailed=0\n\
         {lib} --include-ignored --exact --test-threads 1 {units} || failed=1\n\
         LB_E2E_SLOWDOWN={SLOWDOWN} LB_E2E_ONLY={e2e_tests} {e2e} --test-threads 2 || failed=1\n\
         exit $failed\n",
        root = workspace_root().display(),
        lib = lib.display(),
        units = UNIT_TESTS.join(" "),
        e2e = e2e.display(),
        e2e_tests = E2E_TESTS.join(","),
    );
    fs::write(share.join("command.sh"), script)?;
    let log_path = workspace_root().join(format!("target/vm/kernel-{kernel}.log"));
    eprintln!(
        "    booting Linux {kernel} under qemu (software CPU); the guest's console is copied to {}",
        log_path.display()
    );
    let started = Instant::now();
    let mut child = Command::new("timeout")
        .arg("1500")
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "3G"])
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-net", "none"])
        .arg("-kernel")
        .arg(format!("/boot/vmlinuz-{kernel}"))
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-fsdev",
            "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
            "-fsdev",
        ])
        .arg(format!(
            "local,id=s,path={},security_model=none,multidevs=remap",
            share.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=s,mount_tag=share"])
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu")?;
    let mut log = fs::File::create(&log_path)?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        let _ = writeln!(log, "{line}");
        eprintln!("    [{kernel}] {line}");
    }
    let status = child.wait()?;
    let rc = fs::read_to_string(share.join("rc")).ok();
    let _ = fs::remove_dir_all(&share);
    let elapsed = started.elapsed();
    match rc.as_deref().map(str::trim) {
        Some("0") => {
            eprintln!(
                "    kernel-compatibility suite passed on {kernel} in {:.0?}",
                round(elapsed)
            );
            Ok(())
        }
        Some(rc) => bail!(
            "kernel-compatibility suite failed on {kernel} (exit {rc}); see {}",
            log_path.display()
        ),
        None => bail!(
            "the {kernel} guest ended without a result ({status}, after {:.0?}); see {}",
            round(elapsed),
            log_path.display()
        ),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
