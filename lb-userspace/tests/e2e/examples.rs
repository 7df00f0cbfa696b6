//! The bundled examples/ run against the sandbox `cargo xtask run` builds, so the demo a
//! newcomer sees is tested too.

use std::{collections::BTreeSet, path::Path};

use anyhow::{Result, ensure};
use lb_testbed::sandbox::{REDIS_CLUSTER_IP, REDIS_PODS, Sandbox};
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
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let daemon = Daemon::start(&sandbox.testbed, &examples)?;
    ensure!(
        !daemon.log_text().contains("WARN"),
        "the examples load cleanly:\n{}",
        daemon.log_text()
    );
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(whoami(
            &sandbox.testbed,
            &sandbox.client,
            REDIS_CLUSTER_IP,
            6379,
        )?);
    }
    let expected: BTreeSet<String> = REDIS_PODS
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    ensure!(
        seen == expected,
        "answers from {seen:?}, expected every replica {expected:?}"
    );
    Ok(())
}
