//! End-to-end tests on the real kernel: each test builds its own namespaces ("pods" on a
//! bridge), cgroup and pin directory, runs real servers (redis-server, dnsmasq), runs the
//! real `lb daemon` on manifests or against a real control plane (etcd, kube-apiserver,
//! controller-manager, scheduler; kubelet stand-ins run the pods), and drives real
//! clients (redis-cli, dig, curl) from a client pod that has no route out of the
//! sandbox. They need root, like the daemon.
//!
//! Tests run in parallel (each on its own cgroup subtree and pin directory); the number
//! of threads defaults to 2 to keep timing assertions honest on small machines.

mod agnhost;
mod cluster;
mod clusterip;
mod examples;
mod external;
mod kernel;
mod kube;
mod probe;
mod realnode;
mod reliability;
mod security;
mod semantics;
mod sockets;
mod support;
mod udp;
mod workloads;

use libtest_mimic::{Arguments, Failed, Trial};

/// Tests run beside each other under the read side; a test that loads the machine
/// enough to upset others' timing (two real kubelets with containerd) takes the write
/// side and runs alone.
static SHARED_MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Wraps a test body returning anyhow::Result.
fn trial(name: &'static str, body: fn() -> anyhow::Result<()>) -> Trial {
    Trial::test(name, move || {
        let _beside_others = SHARED_MACHINE.read().unwrap_or_else(|e| e.into_inner());
        body().map_err(|e| Failed::from(format!("{e:#}")))
    })
}

/// [`trial`] for a test that runs with no other test beside it.
fn trial_alone(name: &'static str, body: fn() -> anyhow::Result<()>) -> Trial {
    Trial::test(name, move || {
        let _alone = SHARED_MACHINE.write().unwrap_or_else(|e| e.into_inner());
        body().map_err(|e| Failed::from(format!("{e:#}")))
    })
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(probe::PROBE_ARG) {
        probe::main(&argv[2..]);
    }
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(2);
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the end-to-end tests load eBPF programs and create network namespaces: run them as root"
        );
        std::process::exit(1);
    }
    let mut trials = Vec::new();
    trials.extend(clusterip::trials());
    trials.extend(examples::trials());
    trials.extend(udp::trials());
    trials.extend(sockets::trials());
    trials.extend(semantics::trials());
    trials.extend(agnhost::trials());
    trials.extend(external::trials());
    trials.extend(kernel::trials());
    trials.extend(kube::trials());
    trials.extend(reliability::trials());
    trials.extend(security::trials());
    trials.extend(realnode::trials());
    trials.extend(workloads::trials());
    // `LB_E2E_ONLY=a,b,c`: exactly these tests (libtest-mimic takes one filter; the
    // kernel-compatibility run names its subset this way).
    if let Ok(only) = std::env::var("LB_E2E_ONLY") {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        let unknown: Vec<&&str> = wanted
            .iter()
            .filter(|w| !trials.iter().any(|t| t.name() == **w))
            .collect();
        if !unknown.is_empty() {
            eprintln!("LB_E2E_ONLY names tests that do not exist: {unknown:?}");
            std::process::exit(1);
        }
        trials.retain(|t| wanted.contains(&t.name()));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    // The shared control plane outlives single tests; stop it before exiting.
    cluster::shutdown();
    conclusion.exit();
}
