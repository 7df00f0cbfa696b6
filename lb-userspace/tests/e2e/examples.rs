//! The bundled examples/manifests/ run against the sandbox `cargo xtask run` builds, so the demo a
//! newcomer sees is tested too.

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Result, ensure};
use lb_testbed::sandbox::{
    DNS_CLUSTER_IP, DNS_CLUSTER_IP_V6, DNS_PODS, REDIS_CLUSTER_IP, REDIS_PODS, Sandbox,
    TEST_SVC_CLUSTER_IP, WEB_PODS,
};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "examples::bundled_examples_serve_the_sandbox",
        bundled_examples_serve_the_sandbox,
    )]
}

fn bundled_examples_serve_the_sandbox() -> Result<()> {
    let sandbox = Sandbox::start()?;
    let tb = &sandbox.testbed;
    let client = &sandbox.client;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    let daemon = Daemon::start(tb, &examples)?;
    ensure!(
        !daemon.log_text().contains("WARN"),
        "the examples load cleanly:\n{}",
        daemon.log_text()
    );

    // redis-master-sr: every replica answers.
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(whoami(tb, client, REDIS_CLUSTER_IP, 6379)?);
    }
    let expected: BTreeSet<String> = REDIS_PODS
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    ensure!(
        seen == expected,
        "answers from {seen:?}, expected every replica {expected:?}"
    );

    // kube-dns resolves the Service name to its ClusterIP, over UDP and TCP, on both
    // families, the way the seed's pods use it through resolv.conf.
    for server in [DNS_CLUSTER_IP, DNS_CLUSTER_IP_V6] {
        for transport in ["+notcp", "+tcp"] {
            let out = tb.output(
                client,
                true,
                &[
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    transport,
                    &format!("@{server}"),
                    "redis-master-sr.default.svc.cluster.local",
                ],
                Duration::from_secs(5),
            )?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ensure!(
                answer == REDIS_CLUSTER_IP,
                "dig {transport} @{server}: {answer:?}"
            );
        }
    }
    let metrics = curl(tb, client, &format!("http://{DNS_CLUSTER_IP}:9153/whoami"))?;
    ensure!(
        DNS_PODS.iter().any(|(name, _)| metrics.contains(name)),
        "metrics port: {metrics:?}"
    );

    // test-svc: targetPort web-port served on 8080 by one pod and 9090 by the other.
    let mut web = BTreeSet::new();
    for _ in 0..20 {
        web.insert(curl(
            tb,
            client,
            &format!("http://{TEST_SVC_CLUSTER_IP}/whoami"),
        )?);
    }
    let expected: BTreeSet<String> = WEB_PODS
        .iter()
        .map(|(name, _, _)| name.to_string())
        .collect();
    ensure!(web == expected, "test-svc answered by {web:?}");
    Ok(())
}
