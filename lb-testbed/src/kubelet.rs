//! A kubelet stand-in: one per simulated node. It registers the node's `Node` (podCIDR,
//! addresses, capacity, `Ready`, zone label; it lifts the `not-ready` taint the API
//! server adds), watches the Pods bound to it and runs each as a real process in a pod
//! network namespace of the node's [`World`] and in a cgroup laid out as the kubelet's
//! (`<node cgroup>/kubepods/<qos>/pod<uid>/<container>`), reports `podIP`/`podIPs`, `Running` and
//! `Ready` (once the process listens, or its readiness probe passes), and on deletion
//! runs the preStop sleep, sends SIGTERM, waits the grace period, removes the
//! namespace and deletes the Pod object, as the real kubelet does.
//!
//! Every container runs (restartable init containers, the sidecars, first; other init
//! containers are skipped), each as a process chosen from its image:
//!
//! | image        | process                               | default port |
//! |--------------|---------------------------------------|--------------|
//! | `redis*`     | redis-server (`GET whoami` = pod name) | 6379         |
//! | `nginx*`, `httpd*` | HTTP server answering `/` and `/whoami` with the pod name | 80 |
//! | `coredns*`   | dnsmasq (`whoami.test` = pod's addresses) | 53      |
//! | `agnhost*`   | upstream's agnhost with the container's `args` (`netexec`, ...) | - |
//! | anything else | `sleep infinity` (a client pod)      | -            |
//!
//! The port is the container's first `containerPort` when one is declared. A pod has
//! its own UTS namespace with its name as hostname (what agnhost answers to
//! `hostname`), unless it uses the host's network; it is ready once every container
//! is.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Container, Node, Pod as KubePod},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, watcher::Event},
};
use serde_json::json;

use crate::{
    Pod,
    k8s::{ControlPlane, WORLD_LABEL},
    output_with_timeout, servers,
    world::{NodeNet, World},
};

/// How a simulated node registers itself.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

/// A pod this kubelet runs.
struct Running {
    namespace: String,
    name: String,
    net: Pod,
    /// `hostNetwork: true`: `net` is the node's own namespace (never removed here).
    host_network: bool,
    /// The pod's cgroup, laid out as the kubelet's (`kubepods/<qos>/pod<uid>`, one
    /// directory per container inside), below the node's.
    cgroup: PathBuf,
    /// Where `exec` runs: the first container's cgroup.
    exec_cgroup: PathBuf,
    /// One process per container.
    children: Vec<Child>,
    terminating: bool,
}

type Pods = Arc<Mutex<BTreeMap<String, Running>>>;

/// A simulated node: its Node object, its kubelet loop and its pods.
pub struct SimNode {
    /// The Node object's name (unique across tests sharing a control plane).
    pub name: String,
    world: Arc<World>,
    net_name: String,
    pods: Pods,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    client: Client,
    runtime: tokio::runtime::Runtime,
}

/// A kube client for `cp`'s admin kubeconfig.
pub async fn admin_client(kubeconfig: &std::path::Path) -> Result<Client> {
    let file = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn image_kind(container: &Container) -> &'static str {
    let image = container.image.as_deref().unwrap_or("");
    let base = image.rsplit('/').next().unwrap_or(image);
    let base = base.split([':', '@']).next().unwrap_or(base);
    if base.starts_with("redis") {
        "redis"
    } else if base.starts_with("nginx") || base.starts_with("httpd") {
        "http"
    } else if base.starts_with("coredns") {
        "dns"
    } else if base.starts_with("agnhost") {
        "agnhost"
    } else {
        "sleep"
    }
}

fn container_port(container: &Container) -> Option<u16> {
    container
        .ports
        .as_ref()?
        .first()
        .map(|p| p.container_port as u16)
}

/// agnhost's arguments for a container: its `args`, after the rest of a `command`
/// that names agnhost itself (images run `/agnhost` as their entry point).
fn agnhost_args(container: &Container) -> Vec<String> {
    let mut argv: Vec<String> = match container.command.as_deref() {
        Some([program, rest @ ..]) if program.ends_with("agnhost") => rest.to_vec(),
        _ => Vec::new(),
    };
    argv.extend(container.args.iter().flatten().cloned());
    argv
}

/// The value of `--name=V` or `--name V` in `args`.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, arg)| {
        if let Some(value) = arg.strip_prefix(&long).and_then(|r| r.strip_prefix('=')) {
            Some(value)
        } else if *arg == long {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// What readiness means for a container: a TCP port that must accept, an HTTP path
/// that must answer 2xx/3xx, or nothing (ready once started).
#[derive(Clone, Debug)]
enum Readiness {
    Tcp(u16),
    Http(u16, String),
    Started,
}

fn named_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => Some(*n as u16),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16),
    }
}

fn readiness(container: &Container, kind: &str) -> Readiness {
    if let Some(probe) = &container.readiness_probe {
        if let Some(tcp) = &probe.tcp_socket
            && let Some(port) = named_port(container, &tcp.port)
        {
            return Readiness::Tcp(port);
        }
        if let Some(get) = &probe.http_get
            && let Some(port) = named_port(container, &get.port)
        {
            return Readiness::Http(port, get.path.clone().unwrap_or_else(|| "/".into()));
        }
    }
    match (kind, container_port(container)) {
        ("agnhost", _) => {
            let args = agnhost_args(container);
            if args.first().map(String::as_str) == Some("netexec") {
                let port = flag_value(&args, "http-port").map_or(Some(8080), |p| p.parse().ok());
                // `/healthz` answers 200 once the UDP server runs too (never
                // without one: then `/`).
                let path = if flag_value(&args, "udp-port") == Some("-1") {
                    "/"
                } else {
                    "/healthz"
                };
                port.map_or(Readiness::Started, |p| Readiness::Http(p, path.into()))
            } else {
                Readiness::Started
            }
        }
        ("dns", _) => Readiness::Tcp(53),
        ("redis", port) => Readiness::Tcp(port.unwrap_or(6379)),
        ("http", port) => Readiness::Tcp(port.unwrap_or(80)),
        (_, Some(port)) => Readiness::Tcp(port),
        _ => Readiness::Started,
    }
}

/// Seconds of a container's preStop sleep (`sleep` action, or an exec of
/// `sleep N`).
fn pre_stop_sleep(container: &Container) -> Duration {
    let Some(handler) = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
    else {
        return Duration::ZERO;
    };
    if let Some(sleep) = &handler.sleep {
        return Duration::from_secs(sleep.seconds.max(0) as u64);
    }
    let words: Vec<&str> = handler
        .exec
        .as_ref()
        .and_then(|e| e.command.as_ref())
        .map(|c| c.iter().flat_map(|w| w.split_whitespace()).collect())
        .unwrap_or_default();
    words
        .iter()
        .position(|w| *w == "sleep")
        .and_then(|i| words.get(i + 1))
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs_f64)
}

/// Checks a pod's readiness from inside the node's network namespace (where the pod
/// network is routed), on a thread that entered it once.
#[derive(Clone)]
struct Prober {
    requests: std::sync::mpsc::Sender<(SocketAddr, Readiness, std::sync::mpsc::Sender<bool>)>,
}

impl Prober {
    fn start(netns: &str) -> Result<Self> {
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
        let (tx, rx) =
            std::sync::mpsc::channel::<(SocketAddr, Readiness, std::sync::mpsc::Sender<bool>)>();
        thread::Builder::new()
            .name("prober".into())
            .spawn(move || {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on this dedicated thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return;
                }
                for (addr, readiness, reply) in rx {
                    let ok = match readiness {
                        Readiness::Started => true,
                        Readiness::Tcp(_) => {
                            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
                        }
                        Readiness::Http(_, path) => http_ok(addr, &path),
                    };
                    let _ = reply.send(ok);
                }
            })?;
        Ok(Self { requests: tx })
    }

    fn check(&self, ip: IpAddr, readiness: &Readiness) -> bool {
        let port = match readiness {
            Readiness::Tcp(p) | Readiness::Http(p, _) => *p,
            Readiness::Started => 0,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        if self
            .requests
            .send((SocketAddr::new(ip, port), readiness.clone(), tx))
            .is_err()
        {
            return false;
        }
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false)
    }
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && matches!(head[9], b'2' | b'3')
}

/// Now, as Kubernetes writes times (RFC 3339, seconds).
fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

impl SimNode {
    /// Registers the node `net` of `world` with `cp` and starts its kubelet loop.
    pub fn start(
        cp: &ControlPlane,
        world: Arc<World>,
        net: &str,
        options: NodeOptions,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = runtime.block_on(admin_client(&cp.kubeconfig))?;
        let node_net = world.node(net);
        let name = format!("{}-{}", world.id, node_net.name);
        runtime.block_on(register(&client, &name, &world.id, node_net, &options))?;
        let pods: Pods = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let prober = Prober::start(&node_net.netns)?;
        let handle = {
            let client = client.clone();
            let world = world.clone();
            let pods = pods.clone();
            let node_name = name.clone();
            let net_name = net.to_string();
            let runtime_handle = runtime.handle().clone();
            thread::Builder::new()
                .name(format!("kubelet-{net}"))
                .spawn(move || {
                    runtime_handle.block_on(kubelet_loop(
                        client, world, net_name, node_name, pods, prober, stop_rx,
                    ));
                })?
        };
        Ok(Self {
            name,
            world,
            net_name: net.to_string(),
            pods,
            stop: Some(stop_tx),
            thread: Some(handle),
            client,
            runtime,
        })
    }

    pub fn net(&self) -> &NodeNet {
        self.world.node(&self.net_name)
    }

    /// The world this node lives in (to add an outside client to it).
    pub fn world(&self) -> &Arc<World> {
        &self.world
    }

    /// `f` of the running pod `namespace/name`, if this node runs it.
    fn running<T>(&self, namespace: &str, name: &str, f: impl FnOnce(&Running) -> T) -> Option<T> {
        self.pods
            .lock()
            .expect("lock")
            .values()
            .find(|r| r.namespace == namespace && r.name == name)
            .map(f)
    }

    /// The network namespace of a running pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.running(namespace, name, |r| r.net.clone())
    }

    /// Names of the pods this node runs in `namespace` (terminating ones included).
    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        self.pods
            .lock()
            .expect("lock")
            .values()
            .filter(|r| r.namespace == namespace)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Runs `argv` in a pod's network namespace and in its first container's cgroup
    /// (below the node's, so this node's daemon balances it), like `kubectl exec`.
    pub fn exec(
        &self,
        namespace: &str,
        pod: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let (net, cgroup) = self
            .running(namespace, pod, |r| (r.net.clone(), r.exec_cgroup.clone()))
            .with_context(|| format!("pod {namespace}/{pod} does not run on node {}", self.name))?;
        let mut cmd = self.world.command(&net, Some(&cgroup), argv[0])?;
        cmd.args(&argv[1..]);
        output_with_timeout(cmd, timeout)
    }

    /// Runs `argv` in a pod's network namespace but in none of the node's cgroups: as
    /// a VM guest's processes (Kata, KubeVirt) send from a kernel of their own, no
    /// socket hook of the node sees their connections.
    pub fn exec_as_guest(
        &self,
        namespace: &str,
        pod: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let net = self
            .pod(namespace, pod)
            .with_context(|| format!("pod {namespace}/{pod} does not run on node {}", self.name))?;
        let mut cmd = self.world.command(&net, None, argv[0])?;
        cmd.args(&argv[1..]);
        output_with_timeout(cmd, timeout)
    }

    /// Evicts a running pod as the kubelet does under resource pressure: its containers
    /// are killed and its phase becomes `Failed` (reason `Evicted`); the Pod object
    /// stays, so the EndpointSlice controller drops it as an endpoint.
    pub fn evict(&self, namespace: &str, name: &str) -> Result<()> {
        let running = {
            let mut pods = self.pods.lock().expect("lock");
            let uid = pods
                .iter()
                .find(|(_, r)| r.namespace == namespace && r.name == name)
                .map(|(uid, _)| uid.clone())
                .with_context(|| format!("pod {namespace}/{name} does not run on {}", self.name))?;
            pods.remove(&uid)
        };
        if let Some(mut running) = running {
            self.runtime
                .block_on(stop_process(&mut running, Duration::ZERO));
            remove_pod(&self.world, &running);
        }
        let status = json!({"status": {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage.",
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": "False", "lastTransitionTime": now()},
            ],
        }});
        self.runtime.block_on(
            Api::<KubePod>::namespaced(self.client.clone(), namespace).patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            ),
        )?;
        Ok(())
    }

    /// The node's Node object, as the API server has it.
    pub fn node_object(&self) -> Result<Node> {
        Ok(self
            .runtime
            .block_on(Api::<Node>::all(self.client.clone()).get(&self.name))?)
    }
}

async fn register(
    client: &Client,
    name: &str,
    world: &str,
    net: &NodeNet,
    options: &NodeOptions,
) -> Result<()> {
    let nodes = Api::<Node>::all(client.clone());
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert(WORLD_LABEL.into(), json!(world));
    if let Some(zone) = &options.zone {
        labels.insert("topology.kubernetes.io/zone".into(), json!(zone));
    }
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": net.pod_cidr_v4, "podCIDRs": [net.pod_cidr_v4, net.pod_cidr_v6]},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&node))
                .await?;
        }
        Err(err) => return Err(err.into()),
    }
    // The API server taints new nodes not-ready; only the (absent) node lifecycle
    // controller would lift it.
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"taints": []}})),
        )
        .await?;
    let resources = json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
    let time = now();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {
                "capacity": resources,
                "allocatable": resources,
                "addresses": [
                    {"type": "InternalIP", "address": net.ipv4.to_string()},
                    {"type": "InternalIP", "address": net.ipv6.to_string()},
                    {"type": "Hostname", "address": name},
                ],
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "simulated kubelet is posting ready status",
                    "lastHeartbeatTime": time, "lastTransitionTime": time,
                }],
                "nodeInfo": {
                    "kubeletVersion": "v1.36.2", "kubeProxyVersion": "", "operatingSystem": "linux",
                    "architecture": "amd64", "containerRuntimeVersion": "sim://1", "kernelVersion": "",
                    "osImage": "lb testbed", "machineID": "", "systemUUID": "", "bootID": "",
                },
            }})),
        )
        .await?;
    Ok(())
}

async fn kubelet_loop(
    client: Client,
    world: Arc<World>,
    net: String,
    node_name: String,
    pods: Pods,
    prober: Prober,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let api = Api::<KubePod>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = std::pin::pin!(watcher(api, config));
    loop {
        let event = tokio::select! {
            _ = &mut stop => break,
            event = stream.next() => event,
        };
        let pod = match event {
            Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => pod,
            Some(Ok(Event::Delete(pod))) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let removed = pods.lock().expect("lock").remove(&uid);
                if let Some(mut running) = removed {
                    stop_process(&mut running, Duration::ZERO).await;
                    remove_pod(&world, &running);
                }
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => break,
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let known = pods.lock().expect("lock").contains_key(&uid);
        if deleting {
            let start_termination = {
                let mut pods = pods.lock().expect("lock");
                match pods.get_mut(&uid) {
                    Some(running) if !running.terminating => {
                        running.terminating = true;
                        true
                    }
                    _ => false,
                }
            };
            if start_termination || !known {
                tokio::spawn(terminate(client.clone(), world.clone(), pods.clone(), pod));
            }
        } else if !known {
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            if let Err(err) = start_pod(&client, &world, &net, &pods, &prober, pod).await {
                eprintln!("kubelet {node_name}: {err:#}");
            }
        }
    }
    // Stopping: end every pod this node runs.
    let running: Vec<Running> = std::mem::take(&mut *pods.lock().expect("lock"))
        .into_values()
        .collect();
    for mut pod in running {
        stop_process(&mut pod, Duration::ZERO).await;
        remove_pod(&world, &pod);
        let _ = Api::<KubePod>::namespaced(client.clone(), &pod.namespace)
            .delete(&pod.name, &DeleteParams::default().grace_period(0))
            .await;
    }
    let _ = Api::<Node>::all(client)
        .delete(&node_name, &DeleteParams::default())
        .await;
}

async fn start_pod(
    client: &Client,
    world: &Arc<World>,
    net: &str,
    pods: &Pods,
    prober: &Prober,
    pod: KubePod,
) -> Result<()> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().context("pod has no spec")?;
    // Sidecars (restartable init containers) start first, as the kubelet starts them.
    let containers: Vec<Container> = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .chain(&spec.containers)
        .cloned()
        .collect();
    ensure!(!containers.is_empty(), "pod has no container");
    let node = world.node(net);
    // hostNetwork: the node's own namespace and addresses (and a pod cgroup below the
    // node's, like every pod, so the node's socket hooks apply), as a kubelet runs it.
    let host_network = spec.host_network == Some(true);
    let pod_net = if host_network {
        Pod {
            name: name.clone(),
            netns: node.netns.clone(),
            ipv4: node.ipv4,
            ipv6: node.ipv6,
        }
    } else {
        world.add_pod(node, &name)?
    };
    let work = pod_dir(&pod_net);
    std::fs::create_dir_all(&work)?;
    let cgroup = pod_cgroup_path(&node.cgroup.path, &pod, &uid);
    let mut children = Vec::new();
    let mut readiness_checks = Vec::new();
    for container in &containers {
        let kind = image_kind(container);
        let container_cgroup = cgroup.join(&container.name);
        let started = std::fs::create_dir_all(&container_cgroup)
            .with_context(|| format!("creating cgroup {}", container_cgroup.display()))
            .and_then(|()| {
                start_container(
                    world,
                    &container_cgroup,
                    &pod_net,
                    host_network,
                    &work,
                    container,
                    kind,
                )
            });
        match started {
            Ok(child) => children.push(child),
            Err(err) => {
                for mut child in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                crate::remove_cgroup_tree(&cgroup);
                if !host_network {
                    world.remove_pod(&pod_net);
                }
                return Err(err.context(format!(
                    "starting container {} of pod {namespace}/{name}",
                    container.name
                )));
            }
        }
        readiness_checks.push((readiness(container, kind), kind));
    }
    pods.lock().expect("lock").insert(
        uid.clone(),
        Running {
            namespace: namespace.clone(),
            name: name.clone(),
            net: pod_net.clone(),
            host_network,
            exec_cgroup: cgroup.join(&containers[0].name),
            cgroup,
            children,
            terminating: false,
        },
    );
    let started = now();
    let api = Api::<KubePod>::namespaced(client.clone(), &namespace);
    let (host_v4, host_v6) = (node.ipv4.to_string(), node.ipv6.to_string());
    let (pod_v4, pod_v6) = (pod_net.ipv4.to_string(), pod_net.ipv6.to_string());
    let names_and_images: Vec<(String, String)> = containers
        .iter()
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect();
    let status = move |ready: bool| {
        let ready_s = if ready { "True" } else { "False" };
        json!({"status": {
            "phase": "Running",
            "hostIP": host_v4,
            "hostIPs": [{"ip": host_v4}, {"ip": host_v6}],
            "podIP": pod_v4,
            "podIPs": [{"ip": pod_v4}, {"ip": pod_v6}],
            "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready_s},
                {"type": "Ready", "status": ready_s, "lastTransitionTime": now()},
            ],
            "containerStatuses": names_and_images.iter().map(|(name, image)| json!({
                "name": name, "image": image,
                "imageID": "", "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            })).collect::<Vec<_>>(),
        }})
    };
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&status(false)),
    )
    .await?;

    // Readiness of every container (after the longest `initialDelaySeconds`, as the
    // kubelet probes no container before its delay), then the identity redis answers.
    let initial_delay = containers
        .iter()
        .filter_map(|c| c.readiness_probe.as_ref()?.initial_delay_seconds)
        .max()
        .map_or(Duration::ZERO, |s| Duration::from_secs(s.max(0) as u64));
    let prober = prober.clone();
    let pods = pods.clone();
    let world = world.clone();
    tokio::spawn(async move {
        tokio::time::sleep(initial_delay).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let alive = pods
                .lock()
                .expect("lock")
                .get(&uid)
                .is_some_and(|r| !r.terminating);
            if !alive || Instant::now() > deadline {
                return;
            }
            let ip = IpAddr::V4(pod_net.ipv4);
            let probe = prober.clone();
            let checks: Vec<Readiness> = readiness_checks.iter().map(|(r, _)| r.clone()).collect();
            let ready = tokio::task::spawn_blocking(move || {
                checks.iter().all(|check| probe.check(ip, check))
            })
            .await
            .unwrap_or(false);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (readiness, kind) in &readiness_checks {
            if *kind == "redis" {
                let port = match readiness {
                    Readiness::Tcp(p) => *p,
                    _ => 6379,
                };
                set_redis_identity(&world, &pod_net, port, &name);
            }
        }
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status(true)))
            .await;
    });
    Ok(())
}

/// Where the kubelet (cgroupfs driver) puts a pod's cgroup: `kubepods/pod<uid>` for
/// Guaranteed pods, `kubepods/burstable/...` and `kubepods/besteffort/...` for the
/// others, below the node's cgroup.
fn pod_cgroup_path(node_cgroup: &Path, pod: &KubePod, uid: &str) -> PathBuf {
    let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
    let kubepods = node_cgroup.join("kubepods");
    let parent = match qos {
        Some("Guaranteed") => kubepods,
        Some("Burstable") => kubepods.join("burstable"),
        _ => kubepods.join("besteffort"),
    };
    parent.join(format!("pod{uid}"))
}

/// Starts one container's process in the pod's network namespace and the container's
/// cgroup, logging to `<pod dir>/<container>.log`.
fn start_container(
    world: &World,
    cgroup: &Path,
    pod_net: &Pod,
    host_network: bool,
    work: &std::path::Path,
    container: &Container,
    kind: &str,
) -> Result<Child> {
    let argv: Vec<String> = match kind {
        "redis" => servers::redis(pod_net, container_port(container).unwrap_or(6379), work),
        "http" => {
            servers::http_root(work, &pod_net.name)?;
            servers::http(work, container_port(container).unwrap_or(80))
        }
        "dns" => servers::dnsmasq(pod_net, &[]),
        "agnhost" => {
            let agnhost = crate::k8s::extra_binary("agnhost")?;
            std::iter::once(agnhost.to_string_lossy().into_owned())
                .chain(agnhost_args(container))
                .collect()
        }
        _ => vec!["sleep".into(), "infinity".into()],
    };
    let mut cmd = world.command(pod_net, Some(cgroup), &argv[0])?;
    let log = std::fs::File::create(work.join(format!("{}.log", container.name)))?;
    use std::os::unix::process::CommandExt as _;
    // Its own process group, as a container would be: a terminal's Ctrl-C stops the
    // demo, which stops the pods.
    cmd.process_group(0);
    if !host_network {
        crate::with_hostname(&mut cmd, &pod_net.name)?;
    }
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn().with_context(|| format!("starting {}", argv[0]))
}

fn set_redis_identity(world: &World, pod: &Pod, port: u16, name: &str) {
    if let Ok(mut cmd) = world.command(pod, None, "redis-cli") {
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "SET",
            "whoami",
            name,
        ]);
        let _ = output_with_timeout(cmd, Duration::from_secs(5));
    }
}

/// Where a pod's files live (its container log, an HTTP server's documents).
fn pod_dir(pod: &Pod) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{}", pod.netns, pod.name))
}

/// Removes a stopped pod's network namespace and files.
fn remove_pod(world: &World, running: &Running) {
    // Anything its containers left behind (forked daemons) goes with the cgroup.
    let _ = std::fs::write(running.cgroup.join("cgroup.kill"), "1");
    crate::remove_cgroup_tree(&running.cgroup);
    if !running.host_network {
        world.remove_pod(&running.net);
    }
    let _ = std::fs::remove_dir_all(pod_dir(&running.net));
}

/// SIGTERM to every container, then SIGKILL after `grace`.
async fn stop_process(running: &mut Running, grace: Duration) {
    let mut children = std::mem::take(&mut running.children);
    for child in &children {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace.max(Duration::from_millis(100));
    loop {
        children.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kubelet's part of a pod deletion: preStop, SIGTERM, grace period, cleanup, and
/// the final delete of the object.
async fn terminate(client: Client, world: Arc<World>, pods: Pods, pod: KubePod) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let grace = Duration::from_secs(
        pod.metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64,
    );
    let started = Instant::now();
    // Every container's preStop hook runs at once.
    let pre_stop = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(pre_stop_sleep)
        .max()
        .unwrap_or_default();
    tokio::time::sleep(pre_stop.min(grace)).await;
    let running = pods.lock().expect("lock").remove(&uid);
    if let Some(mut running) = running {
        stop_process(&mut running, grace.saturating_sub(started.elapsed())).await;
        remove_pod(&world, &running);
    }
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    let _ = Api::<KubePod>::namespaced(client, &namespace)
        .delete(&name, &params)
        .await;
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(yaml: &str) -> Container {
        serde_json::from_value(serde_json::to_value(serde_yaml_from(yaml)).unwrap()).unwrap()
    }

    fn serde_yaml_from(yaml: &str) -> serde_json::Value {
        // Tiny YAML subset for tests: JSON is YAML.
        serde_json::from_str(yaml).unwrap()
    }

    #[test]
    fn images_map_to_processes_and_probes() {
        let redis = container(
            r#"{"name": "r", "image": "docker.io/library/redis:7", "ports": [{"containerPort": 6380}]}"#,
        );
        assert_eq!(image_kind(&redis), "redis");
        assert!(matches!(readiness(&redis, "redis"), Readiness::Tcp(6380)));
        let nginx = container(
            r#"{"name": "n", "image": "nginx", "readinessProbe": {"httpGet": {"path": "/healthz", "port": "web"}}, "ports": [{"name": "web", "containerPort": 8080}]}"#,
        );
        assert_eq!(image_kind(&nginx), "http");
        assert!(
            matches!(readiness(&nginx, "http"), Readiness::Http(8080, ref p) if p == "/healthz")
        );
        let busybox = container(r#"{"name": "b", "image": "busybox"}"#);
        assert_eq!(image_kind(&busybox), "sleep");
        assert!(matches!(readiness(&busybox, "sleep"), Readiness::Started));
        let slow = container(
            r#"{"name": "s", "image": "redis", "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "sleep 3"]}}}}"#,
        );
        assert_eq!(pre_stop_sleep(&slow), Duration::from_secs(3));
        let sleep = container(
            r#"{"name": "s", "image": "redis", "lifecycle": {"preStop": {"sleep": {"seconds": 2}}}}"#,
        );
        assert_eq!(pre_stop_sleep(&sleep), Duration::from_secs(2));
        // agnhost: its args (after a command naming agnhost); netexec is ready when
        // its /healthz answers, on the default or the given HTTP port.
        let netexec = container(
            r#"{"name": "a", "image": "registry.k8s.io/e2e-test-images/agnhost:2.63.0", "args": ["netexec", "--http-port", "8081", "--udp-port=81"], "ports": [{"containerPort": 81, "protocol": "UDP"}]}"#,
        );
        assert_eq!(image_kind(&netexec), "agnhost");
        assert_eq!(agnhost_args(&netexec)[3], "--udp-port=81");
        assert!(
            matches!(readiness(&netexec, "agnhost"), Readiness::Http(8081, ref p) if p == "/healthz")
        );
        let command = container(
            r#"{"name": "a", "image": "agnhost", "command": ["/agnhost", "netexec"], "args": ["--udp-port=80"]}"#,
        );
        assert_eq!(agnhost_args(&command), ["netexec", "--udp-port=80"]);
        assert!(matches!(
            readiness(&command, "agnhost"),
            Readiness::Http(8080, _)
        ));
        let http_only = container(
            r#"{"name": "a", "image": "agnhost", "args": ["netexec", "--http-port=80", "--udp-port=-1"]}"#,
        );
        assert!(matches!(readiness(&http_only, "agnhost"), Readiness::Http(80, ref p) if p == "/"));
        let pause = container(r#"{"name": "a", "image": "agnhost", "args": ["pause"]}"#);
        assert!(matches!(readiness(&pause, "agnhost"), Readiness::Started));
    }
}
