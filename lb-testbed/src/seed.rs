//! The seed scenario on real nodes, as its documents run it: `lb` deployed from
//! `deploy/`, a DNS pod behind the `kube-dns` Service, and the seed's manifests
//! applied verbatim (`examples/cluster/`): the redis Deployment with `image: redis`
//! (pulled, from the test registry), its `redis-master-sr` Service, a NodePort, and a
//! client pod that finds redis through the environment the kubelet injects and
//! through cluster DNS. `cargo xtask run --cluster --real-node` shows it; the
//! real-node e2e test asserts it.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Pod,
    cluster_dns::{self, ClusterDnsFeed, KUBE_DNS_IP},
    image::{Image, lb_image},
    k8s::{ControlPlane, workspace_root},
    realnode::{self, NodeOptions, PodDns, RealNode},
    registry::Registry,
    world::World,
};

/// The seed's manifests, applied as they are.
pub const DEPLOYMENT: &str = "examples/cluster/r-deployment.yaml";
pub const SERVICE: &str = "examples/cluster/redis-master-sr.yaml";
pub const NODE_PORT_SERVICE: &str = "examples/cluster/redis-nodeport.yaml";
/// The NodePort of [`NODE_PORT_SERVICE`].
pub const NODE_PORT: u16 = 30002;

/// The seed's `image: redis` (docker.io/library/redis:latest): redis-server and
/// redis-cli, serving other pods as the official image does (protected mode off), and
/// busybox for a shell and its tools.
pub fn redis_image() -> Result<Image> {
    let mut redis = Image::new("docker.io/library/redis:latest");
    redis
        .add_program(
            Path::new("/usr/bin/redis-server"),
            "/usr/local/bin/redis-server",
        )?
        .add_program(Path::new("/usr/bin/redis-cli"), "/usr/local/bin/redis-cli")?
        .add_busybox(&[])?
        .add_dir("/tmp", 0o1777)
        .add_dir("/data", 0o755);
    redis.entrypoint = vec!["/usr/local/bin/redis-server".into()];
    redis.cmd = vec!["--protected-mode".into(), "no".into()];
    Ok(redis)
}

/// Real nodes with `lb` and cluster DNS, ready for the seed's manifests. Dropping it
/// removes the DaemonSet's pins, the nodes, the registry and the control plane.
pub struct SeedCluster {
    dns: Option<ClusterDnsFeed>,
    /// A client outside the cluster: it reaches the nodes' addresses only.
    pub outside: Pod,
    pub world: World,
    pub registry: Registry,
    pub cp: ControlPlane,
    pub nodes: Vec<RealNode>,
    /// (pod, node) of each lb pod.
    pub lb_pods: Vec<(String, String)>,
    lb: PathBuf,
    /// Print each kubectl command and its output (the demo).
    pub echo: bool,
}

impl SeedCluster {
    /// A control plane and real nodes named `node_names`, `lb` (the binary at `lb`,
    /// in the DaemonSet's image) deployed from `deploy/` and Ready on each, and the
    /// DNS pod Ready behind `kube-dns`.
    pub fn start(lb: &Path, node_names: &[&str], echo: bool) -> Result<Self> {
        let cp = ControlPlane::start_for_real_nodes()?;
        let world = World::new(node_names)?;
        let outside = world.add_outside("outside")?;
        let images_dir = cp.dir.join("images");
        fs::create_dir_all(&images_dir)?;
        let (shipped, lb_name) = realnode::shipped_daemonset()?;
        // The DaemonSet's image and the sandbox image are imported as an operator
        // preloads them; the seed's images are pulled.
        lb_image(lb, &lb_name)?.write_docker_archive(&images_dir.join("lb.tar"))?;
        realnode::pause_image(&images_dir.join("pause.tar"))?;
        let registry = realnode::start_registry(&[redis_image()?, cluster_dns::dns_image()?])?;
        let options = NodeOptions {
            dns: PodDns::Server(KUBE_DNS_IP),
            registry_mirrors: registry.mirrors(),
            zone: None,
        };
        let preloaded = [images_dir.join("lb.tar"), images_dir.join("pause.tar")];
        let nodes = world
            .nodes
            .iter()
            .map(|n| RealNode::start_with(&cp, n, &preloaded, &options))
            .collect::<Result<Vec<_>>>()?;
        let mut this = Self {
            dns: None,
            outside,
            world,
            registry,
            cp,
            nodes,
            lb_pods: Vec::new(),
            lb: lb.to_path_buf(),
            echo,
        };
        this.show("# lb as users deploy it: RBAC and the DaemonSet from deploy/");
        realnode::deploy_lb(&this.cp, &shipped)?;
        this.lb_pods =
            realnode::wait_lb_ready(&this.cp, this.nodes.len(), Duration::from_secs(120))
                .with_context(|| this.describe())?;

        // Cluster DNS: records from the API, served by a dnsmasq pod behind kube-dns.
        let records = this.cp.dir.join("cluster-dns");
        fs::create_dir_all(&records)?;
        fs::write(records.join("hosts"), "")?;
        let cgroups: Vec<PathBuf> = this
            .nodes
            .iter()
            .map(RealNode::pods_cgroup)
            .collect::<Result<_>>()?;
        this.dns = Some(ClusterDnsFeed::start(
            &this.cp,
            vec![records.join("hosts")],
            move || {
                cluster_dns::reload_dnsmasq(cgroups.iter().flat_map(|c| realnode::pids_below(c)))
            },
        )?);
        this.show(&format!(
            "# cluster DNS: a dnsmasq pod behind the kube-dns Service ({KUBE_DNS_IP})"
        ));
        cluster_dns::deploy_dns_pod(&this.cp, &records)?;
        this.wait_ready("kube-system", "k8s-app=kube-dns", Duration::from_secs(60))?;
        Ok(this)
    }

    fn show(&self, line: &str) {
        if self.echo {
            println!("{line}");
        }
    }

    /// kubectl, echoed with its output when [`SeedCluster::echo`] is set.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        // Quoted as a shell needs it, so the echoed line can be pasted.
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(['{', ' ', '"', '$']) {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        self.show(&format!("$ kubectl {}", shown.join(" ")));
        let out = self.cp.kubectl(args)?;
        for line in out.lines() {
            self.show(&format!("    {line}"));
        }
        Ok(out)
    }

    /// `kubectl apply -f <file>` for a manifest of the workspace, unchanged.
    pub fn apply(&self, file: &str) -> Result<String> {
        let path = workspace_root().join(file);
        self.show(&format!("$ kubectl apply -f {file}"));
        let out = self
            .cp
            .kubectl(&["apply", "-f", &path.display().to_string()])?;
        for line in out.lines() {
            self.show(&format!("    {line}"));
        }
        Ok(out)
    }

    /// The first Ready pod matching `selector`, with its node.
    pub fn wait_ready(
        &self,
        namespace: &str,
        selector: &str,
        timeout: Duration,
    ) -> Result<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pod) = realnode::ready_pods(&self.cp, namespace, selector)
                .into_iter()
                .next()
            {
                return Ok(pod);
            }
            if Instant::now() > deadline {
                bail!(
                    "no Ready pod {selector} in {namespace} within {timeout:?}\n{}",
                    self.describe()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Pods, events and each kubelet's last lines, for an error.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "pods:\n{}\nevents:\n{}",
            self.cp
                .kubectl(&["get", "pods", "-A", "-o", "wide"])
                .unwrap_or_default(),
            self.cp
                .kubectl(&["get", "events", "-A"])
                .unwrap_or_default(),
        );
        for node in &self.nodes {
            text.push_str(&format!(
                "\nkubelet of {}:\n{}",
                node.name,
                node.log_tail("kubelet")
            ));
        }
        text
    }

    /// The seed: its Deployment, Service and NodePort applied verbatim, and the client
    /// pod `web` (`image: redis`, a shell that waits) on a node other than redis's,
    /// started after the Service so the kubelet gives it the Service's environment.
    pub fn apply_seed(&self) -> Result<Seed> {
        self.apply(DEPLOYMENT)?;
        self.apply(SERVICE)?;
        self.apply(NODE_PORT_SERVICE)?;
        let (redis_pod, redis_node) =
            self.wait_ready("default", "app=redis", Duration::from_secs(90))?;
        let client_node = self
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != redis_node)
            .unwrap_or_else(|| redis_node.clone());
        self.kubectl(&[
            "run",
            "web",
            "--image=redis",
            "--restart=Never",
            "--labels=role=client",
            &format!(r#"--overrides={{"spec":{{"nodeName":"{client_node}"}}}}"#),
            "--command",
            "--",
            "sleep",
            "infinity",
        ])?;
        self.wait_ready("default", "role=client", Duration::from_secs(90))?;
        let cluster_ip = self
            .cp
            .kubectl(&[
                "get",
                "service",
                "redis-master-sr",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])?
            .trim()
            .to_string();
        Ok(Seed {
            redis_pod,
            redis_node,
            client_node,
            cluster_ip,
        })
    }

    /// `kubectl exec <pod> -- sh -c <script>` in the default namespace.
    pub fn sh(&self, pod: &str, script: &str) -> Result<String> {
        self.show(&format!("$ kubectl exec {pod} -- sh -c '{script}'"));
        let out = self.cp.kubectl(&["exec", pod, "--", "sh", "-c", script])?;
        for line in out.lines() {
            self.show(&format!("    {line}"));
        }
        Ok(out)
    }
}

impl Drop for SeedCluster {
    fn drop(&mut self) {
        self.dns = None;
        let _ = self.cp.kubectl(&[
            "delete",
            "daemonset",
            "-n",
            "kube-system",
            "lb",
            "--wait=false",
        ]);
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.nodes.clear();
        realnode::remove_lb_pins(&self.lb, &names);
    }
}

/// What [`SeedCluster::apply_seed`] made.
pub struct Seed {
    pub redis_pod: String,
    pub redis_node: String,
    pub client_node: String,
    /// redis-master-sr's ClusterIP, as the API server allocated it.
    pub cluster_ip: String,
}
