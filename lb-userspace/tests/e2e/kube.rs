//! The daemon in Kubernetes mode against a real API server, controller-manager and
//! scheduler; only the kubelet is simulated. Objects are created with kubectl, as
//! users do, and the seed documents' manifests apply verbatim.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::Trial;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    support::Daemon,
};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "kube::seed_redis_scenario_follows_kubectl",
        seed_redis_scenario,
    )]
}

/// The seed's redis Deployment, verbatim (r-deployment.yaml).
const R_DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  labels:
    app: redis
  name: redis-master
spec:
  selector:
    matchLabels:
      app: redis
  replicas: 1
  template:
    metadata:
      labels:
        app: redis
    spec:
      containers:
      - image: redis
        name: redis-master2
        ports:
        - containerPort: 6379
"#;

/// `redis-cli GET whoami` through `vip` from the client pod: the pod that answered, or
/// the error text.
fn whoami(cluster: &Cluster, client: &str, vip: &str) -> Result<String> {
    let out = cluster
        .exec(client, &["redis-cli", "-h", vip, "-p", "6379", "GET", "whoami"])
        .with_context(|| format!("redis-cli GET whoami via {vip}; pods: {:?}", cluster.pods("app=redis")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(text)
}

fn answers(cluster: &Cluster, client: &str, vip: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(whoami(cluster, client, vip)?).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Waits until the daemon's kernel maps hold exactly `ips` (port 6379) for `vip` and
/// returns how long that took from `since`.
fn wait_backends(cluster: &Cluster, daemon: &Daemon, vip: &str, ips: &[String], since: Instant) -> Result<Duration> {
    let mut want: Vec<String> = ips.iter().map(|ip| format!("{ip}:6379")).collect();
    want.sort();
    cluster.wait(&format!("backends {want:?}"), Duration::from_secs(10), || {
        Ok((daemon.backends_of(vip, 6379, "TCP")?.as_ref() == Some(&want)).then(|| since.elapsed()))
    })
}

fn pod_ips(cluster: &Cluster, names: &[String]) -> Result<Vec<String>> {
    let pods = cluster.pods("app=redis")?;
    Ok(names
        .iter()
        .filter_map(|n| pods.iter().find(|p| &p.0 == n).map(|p| p.1.clone()))
        .collect())
}

/// The seed end to end: apply the redis Deployment, expose it, reach it from a client
/// pod through the ClusterIP the API server allocated, then scale 3 -> 1 -> 0 -> 2 and
/// delete a pod, checking that connections follow the EndpointSlices within 1 s.
fn seed_redis_scenario() -> Result<()> {
    let cp = shared_control_plane()?;
    let cluster = Cluster::new(cp, &[None])?;
    let daemon = cluster.daemon(0, &[])?;

    cluster.apply(R_DEPLOYMENT)?;
    // Slow termination (like an app draining on SIGTERM), so the terminating state is
    // observable.
    cluster.kubectl(&[
        "patch",
        "deployment",
        "redis-master",
        "-p",
        r#"{"spec":{"template":{"spec":{"terminationGracePeriodSeconds":10,"containers":[{"name":"redis-master2","lifecycle":{"preStop":{"sleep":{"seconds":3}}}}]}}}}"#,
    ])?;
    cluster.kubectl(&["scale", "deployment", "redis-master", "--replicas=3"])?;
    cluster.kubectl(&["expose", "deployment", "redis-master", "--port=6379"])?;
    cluster.kubectl(&["run", "web", "--image=busybox", "--restart=Never", "--", "sleep", "infinity"])?;
    cluster.wait_ready("run=web", 1)?;
    let three = cluster.wait_ready("app=redis", 3)?;
    let vip = cluster.cluster_ip("redis-master")?;
    ensure!(vip.starts_with("10."), "allocated ClusterIP {vip}");

    let ips = pod_ips(&cluster, &three)?;
    let t = cluster.wait_slice_ready("redis-master", &ips)?;
    let took = wait_backends(&cluster, &daemon, &vip, &ips, t)?;
    ensure!(took < Duration::from_secs(1), "3 endpoints reached the maps after {took:?}");
    let seen = answers(&cluster, "web", &vip, 60)?;
    let expected: BTreeSet<&String> = three.iter().collect();
    ensure!(
        seen.keys().collect::<BTreeSet<_>>() == expected,
        "60 connections reached {seen:?}, expected all of {three:?}"
    );

    for replicas in [1usize, 0, 2] {
        eprintln!("scaling to {replicas}");
        cluster.kubectl(&["scale", "deployment", "redis-master", &format!("--replicas={replicas}")])?;
        let names = cluster.wait_ready("app=redis", replicas)?;
        let ips = pod_ips(&cluster, &names)?;
        let changed = cluster.wait_slice_ready("redis-master", &ips)?;
        let took = wait_backends(&cluster, &daemon, &vip, &ips, changed)?;
        ensure!(
            took < Duration::from_secs(1),
            "scale to {replicas}: the maps followed the EndpointSlice after {took:?}"
        );
        if replicas == 0 {
            let started = Instant::now();
            let answer = whoami(&cluster, "web", &vip)?;
            ensure!(answer.contains("Connection refused"), "no endpoints: {answer}");
            ensure!(started.elapsed() < Duration::from_millis(800), "refused after {:?}", started.elapsed());
            continue;
        }
        // Scaled-down pods may still be terminating: connections reach current pods only.
        let seen = answers(&cluster, "web", &vip, 20)?;
        let current: BTreeSet<&String> = names.iter().collect();
        ensure!(
            seen.keys().all(|k| current.contains(k)),
            "after scaling to {replicas}: {seen:?}, current pods {names:?}"
        );
    }

    // Delete one of the two pods: while it terminates (preStop), new connections avoid
    // it; its replacement gets a new IP and receives connections.
    let before = cluster.wait_ready("app=redis", 2)?;
    let victim = before[0].clone();
    let survivor = before[1].clone();
    let victim_ip = pod_ips(&cluster, std::slice::from_ref(&victim))?[0].clone();
    cluster.kubectl(&["delete", "pod", &victim, "--wait=false"])?;
    cluster.wait(&format!("{victim} terminating in its slice"), Duration::from_secs(10), || {
        Ok(cluster
            .endpoints("redis-master")?
            .iter()
            .any(|e| e.0 == victim_ip && !e.1 && e.2 && e.3)
            .then_some(()))
    })?;
    let during = answers(&cluster, "web", &vip, 20)?;
    ensure!(
        !during.contains_key(&victim),
        "a terminating pod received new connections while ready ones exist: {during:?}"
    );
    let after = cluster.wait_ready("app=redis", 2)?;
    let replacement = after
        .iter()
        .find(|n| **n != survivor)
        .context("no replacement pod")?
        .clone();
    let ips = pod_ips(&cluster, &after)?;
    ensure!(!ips.contains(&victim_ip), "the replacement reused {victim_ip}");
    cluster.wait(&format!("the replacement {replacement} to answer"), Duration::from_secs(10), || {
        Ok((whoami(&cluster, "web", &vip)? == replacement).then_some(()))
    })?;
    cluster.wait(&format!("{victim} to leave the slice"), Duration::from_secs(15), || {
        Ok((!cluster.endpoints("redis-master")?.iter().any(|e| e.0 == victim_ip)).then_some(()))
    })?;
    let finally = answers(&cluster, "web", &vip, 30)?;
    ensure!(!finally.contains_key(&victim), "a removed pod answered: {finally:?}");
    ensure!(
        finally.keys().all(|k| *k == survivor || *k == replacement),
        "{finally:?}"
    );
    Ok(())
}
