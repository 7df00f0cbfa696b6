//! A test's share of a real Kubernetes control plane: its own simulated nodes (a
//! [`World`] of node namespaces with kubelet stand-ins), its own namespace (whose pods
//! only land on those nodes), and daemons in Kubernetes mode on those nodes.
//!
//! Tests that can share one control plane do ([`shared_control_plane`]); it is
//! stopped when the test run ends ([`shutdown`]).

use std::{
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client, api::ListParams};
use lb_testbed::{
    k8s::{ControlPlane, Etcd},
    kubelet::{NodeOptions, SimNode, admin_client},
    world::World,
};
use libtest_mimic::Trial;
use serde_json::Value;

use crate::support::{Daemon, READY};

static SHARED: Mutex<Option<Arc<ControlPlane>>> = Mutex::new(None);

/// The control plane tests share (started by the first test that needs it).
pub fn shared_control_plane() -> Result<Arc<ControlPlane>> {
    let mut shared = SHARED.lock().expect("lock");
    if let Some(cp) = shared.as_ref() {
        return Ok(cp.clone());
    }
    let cp = Arc::new(ControlPlane::start(Etcd::Bundled)?);
    *shared = Some(cp.clone());
    Ok(cp)
}

/// Stops the shared control plane (end of the run).
pub fn shutdown() {
    SHARED.lock().expect("lock").take();
}

/// A trial that needs control-plane binaries: without them it fails with the reason
/// on CI (`CI` set) and is reported as ignored elsewhere.
pub fn trial(name: &'static str, body: fn() -> Result<()>) -> Trial {
    match lb_testbed::k8s::unavailable() {
        Some(reason) if std::env::var_os("CI").is_some() => {
            Trial::test(name, move || Err(reason.clone().into()))
        }
        Some(_) => crate::trial(name, body).with_ignored_flag(true),
        None => crate::trial(name, body),
    }
}

pub struct Cluster {
    pub cp: Arc<ControlPlane>,
    pub nodes: Vec<SimNode>,
    pub namespace: String,
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl Cluster {
    /// Nodes named `a`, `b`, ... with the given zones, and a namespace for the test.
    pub fn new(cp: Arc<ControlPlane>, zones: &[Option<&str>]) -> Result<Self> {
        let names: Vec<String> = (0..zones.len())
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let world = Arc::new(World::new(&name_refs)?);
        let mut nodes = Vec::new();
        for (name, zone) in names.iter().zip(zones) {
            nodes.push(SimNode::start(
                &cp,
                world.clone(),
                name,
                NodeOptions {
                    zone: zone.map(str::to_string),
                },
            )?);
        }
        let namespace = world.id.clone();
        cp.create_namespace(&namespace, &world.id)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(admin_client(&cp.kubeconfig))?;
        Ok(Self {
            cp,
            nodes,
            namespace,
            runtime,
            client,
        })
    }

    /// kubectl in the test's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        self.cp.kubectl(&all)
    }

    /// Writes `ip` as the load-balancer address in Service `name`'s status, as a cloud
    /// controller would.
    pub fn set_load_balancer_ip(&self, name: &str, ip: &str) -> Result<()> {
        let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        self.kubectl(&[
            "patch",
            "service",
            name,
            "--subresource=status",
            "-p",
            &status.to_string(),
        ])?;
        Ok(())
    }

    /// `kubectl apply -f -` in the test's namespace.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.cp
            .kubectl_with_input(&["-n", &self.namespace, "apply", "-f", "-"], Some(yaml))
    }

    /// Starts `lb daemon` in Kubernetes mode as node `index`'s kube-proxy replacement
    /// (attached to that node's cgroup, named after its Node) and waits until ready.
    pub fn daemon(&self, index: usize, extra: &[&str]) -> Result<Daemon> {
        let mut daemon =
            self.launch_daemon(index, &self.cp.kubeconfig.display().to_string(), extra)?;
        daemon.wait_for_log(READY, Duration::from_secs(30))?;
        Ok(daemon)
    }

    pub fn launch_daemon(&self, index: usize, kubeconfig: &str, extra: &[&str]) -> Result<Daemon> {
        let node = &self.nodes[index];
        let work_dir = std::env::temp_dir().join(&node.name);
        std::fs::create_dir_all(&work_dir)?;
        Daemon::launch_source(
            &format!("/sys/fs/bpf/{}", node.name),
            &node.net().cgroup.path,
            &work_dir,
            vec![
                "--kubeconfig".into(),
                kubeconfig.into(),
                "--node-name".into(),
                node.name.clone(),
                // TC on the node's own uplink, health-check ports in its namespace.
                "--netns".into(),
                format!("/run/netns/{}", node.net().netns),
            ],
            extra,
        )
    }

    /// Runs a client pod `name` (busybox, sleeping) and waits until it is ready.
    pub fn run_client(&self, name: &str) -> Result<()> {
        self.kubectl(&[
            "run",
            name,
            "--image=busybox",
            "--restart=Never",
            "--",
            "sleep",
            "infinity",
        ])?;
        self.wait_ready(&format!("run={name}"), 1)?;
        Ok(())
    }

    /// Polls `check` every 10 ms until it returns `Some`, or fails after `timeout`.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check()? {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The node running pod `name`, and the pod's network namespace.
    pub fn pod_node(&self, name: &str) -> Option<&SimNode> {
        self.nodes
            .iter()
            .find(|n| n.pod(&self.namespace, name).is_some())
    }

    /// Runs `argv` inside pod `name` (its network namespace, its node's cgroup).
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<std::process::Output> {
        self.exec_within(pod, argv, Duration::from_secs(10))
    }

    /// [`Self::exec`] for a command that runs longer than 10 s.
    pub fn exec_within(
        &self,
        pod: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output> {
        let node = self
            .pod_node(pod)
            .with_context(|| format!("pod {pod} runs on none of this test's nodes"))?;
        node.exec(&self.namespace, pod, argv, timeout)
    }

    /// Pods of the namespace matching `selector`, as (name, podIP, ready).
    pub fn pods(&self, selector: &str) -> Result<Vec<(String, String, bool)>> {
        let json: Value =
            serde_json::from_str(&self.kubectl(&["get", "pods", "-l", selector, "-o", "json"])?)?;
        Ok(json["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (
                    p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    p["status"]["podIP"].as_str().unwrap_or("").to_string(),
                    ready,
                )
            })
            .collect())
    }

    /// Waits until `n` pods matching `selector` are ready; returns their names.
    pub fn wait_ready(&self, selector: &str, n: usize) -> Result<Vec<String>> {
        self.wait_ready_within(selector, n, Duration::from_secs(60))
    }

    /// [`Cluster::wait_ready`] with a timeout of its own.
    pub fn wait_ready_within(
        &self,
        selector: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        self.wait(&format!("{n} ready pods {selector}"), timeout, || {
            let pods = self.pods(selector)?;
            let ready: Vec<String> = pods.iter().filter(|p| p.2).map(|p| p.0.clone()).collect();
            Ok((pods.len() == n && ready.len() == n).then_some(ready))
        })
    }

    pub fn cluster_ip(&self, service: &str) -> Result<String> {
        Ok(self
            .kubectl(&[
                "get",
                "service",
                service,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])?
            .trim()
            .to_string())
    }

    /// The endpoints of a Service's slices: (address, ready, serving, terminating).
    pub fn endpoints(&self, service: &str) -> Result<Vec<(String, bool, bool, bool)>> {
        let api = Api::<EndpointSlice>::namespaced(self.client.clone(), &self.namespace);
        let slices = self.runtime.block_on(api.list(
            &ListParams::default().labels(&format!("kubernetes.io/service-name={service}")),
        ))?;
        let mut out = Vec::new();
        for slice in slices {
            for ep in slice.endpoints.unwrap_or_default() {
                let c = ep.conditions.unwrap_or_default();
                out.push((
                    ep.addresses.first().cloned().unwrap_or_default(),
                    c.ready.unwrap_or(true),
                    c.serving.unwrap_or(true),
                    c.terminating.unwrap_or(false),
                ));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Waits until the endpoints a proxy must use for `service` (the ready ones, or
    /// with none ready the serving-terminating ones) are exactly `addresses`, and
    /// returns when that was first seen.
    pub fn wait_slice_ready(&self, service: &str, addresses: &[String]) -> Result<Instant> {
        let mut want: Vec<String> = addresses.to_vec();
        want.sort();
        self.wait(
            &format!("slice of {service} to list {want:?}"),
            Duration::from_secs(60),
            || {
                let endpoints = self.endpoints(service)?;
                let any_ready = endpoints.iter().any(|e| e.1);
                let mut got: Vec<String> = endpoints
                    .into_iter()
                    .filter(|e| if any_ready { e.1 } else { e.2 && e.3 })
                    .map(|e| e.0)
                    .collect();
                got.sort();
                Ok((got == want).then(Instant::now))
            },
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .cp
            .kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
        // Nodes stop their pods and delete their Node objects.
        for node in self.nodes.drain(..) {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&node.name));
        }
    }
}
