//! Cluster DNS for real nodes: `<service>.<namespace>.svc.cluster.local` answered
//! from the API. A feed ([`ClusterDnsFeed`]) turns Services and EndpointSlices into a
//! hosts file once a second; dnsmasq serves it, either on each node's address
//! (`PodDns::NodeLocal`, what `cargo xtask conformance` uses) or as a DNS pod behind
//! the `kube-dns` Service ([`deploy_dns_pod`]), as clusters run CoreDNS.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{image::Image, k8s::ControlPlane};

/// The kube-dns Service's address, as kubeadm clusters with 10.96.0.0/12 have it.
pub const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The DNS pod's image (written here and served by the test registry).
pub const DNS_IMAGE: &str = "lb.test/cluster-dns:1";

/// Keeps hosts files in step with the API, once a second, calling `reload` after
/// each change; stopped on drop.
pub struct ClusterDnsFeed {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ClusterDnsFeed {
    pub fn start(
        cp: &ControlPlane,
        files: Vec<PathBuf>,
        reload: impl Fn() + Send + 'static,
    ) -> Result<Self> {
        let mut kubectl = cp.kubectl_command();
        kubectl.args(["get", "services,endpointslices", "-A", "-o", "json"]);
        let program = kubectl.get_program().to_owned();
        let args: Vec<_> = kubectl.get_args().map(ToOwned::to_owned).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut last = None;
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(out) = Command::new(&program).args(&args).output()
                    && let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                {
                    let records = dns_records(&list);
                    if last.as_ref() != Some(&records) {
                        for path in &files {
                            // Whole files only: dnsmasq may read at any moment.
                            let tmp = path.with_extension("tmp");
                            if fs::write(&tmp, &records).is_ok() {
                                let _ = fs::rename(&tmp, path);
                            }
                        }
                        reload();
                        last = Some(records);
                    }
                }
                thread::sleep(Duration::from_secs(1));
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ClusterDnsFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends SIGHUP (reread the hosts files) to every dnsmasq among `pids`.
pub fn reload_dnsmasq(pids: impl IntoIterator<Item = i32>) {
    for pid in pids {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "dnsmasq" {
            // SAFETY: a signal to a process this test bed started.
            unsafe { libc::kill(pid, libc::SIGHUP) };
        }
    }
}

/// Hosts-file lines for a `kubectl get services,endpointslices -o json` list.
/// An ExternalName Service whose target is a name listed here gets its target's
/// addresses (a hosts file cannot hold a CNAME; clients see the same addresses).
pub fn dns_records(list: &serde_json::Value) -> String {
    let lines = address_records(list);
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in &lines {
        if let Some((ip, name)) = line.split_once(' ') {
            by_name.entry(name).or_default().push(ip);
        }
    }
    let mut aliases = BTreeSet::new();
    for item in list["items"].as_array().into_iter().flatten() {
        if item["kind"] != "Service" || item["spec"]["type"] != "ExternalName" {
            continue;
        }
        let ns = item["metadata"]["namespace"].as_str().unwrap_or("");
        let name = item["metadata"]["name"].as_str().unwrap_or("");
        let target = item["spec"]["externalName"].as_str().unwrap_or("");
        for ip in by_name
            .get(target.trim_end_matches('.'))
            .into_iter()
            .flatten()
        {
            aliases.insert(format!("{ip} {name}.{ns}.svc.cluster.local"));
        }
    }
    lines
        .iter()
        .chain(&aliases)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `<address> <name>` for every Service's ClusterIPs and headless Services' ready
/// endpoints.
fn address_records(list: &serde_json::Value) -> BTreeSet<String> {
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let mut lines = BTreeSet::new();
    for item in &items {
        let ns = item["metadata"]["namespace"].as_str().unwrap_or("");
        match item["kind"].as_str() {
            Some("Service") => {
                let name = item["metadata"]["name"].as_str().unwrap_or("");
                for ip in item["spec"]["clusterIPs"].as_array().into_iter().flatten() {
                    if let Some(ip) = ip.as_str().filter(|ip| *ip != "None") {
                        lines.insert(format!("{ip} {name}.{ns}.svc.cluster.local"));
                    }
                }
            }
            Some("EndpointSlice") => {
                // Headless Services resolve to their ready endpoints.
                let service = item["metadata"]["labels"]["kubernetes.io/service-name"]
                    .as_str()
                    .unwrap_or("");
                let headless = items.iter().any(|s| {
                    s["kind"] == "Service"
                        && s["metadata"]["namespace"] == ns
                        && s["metadata"]["name"] == service
                        && s["spec"]["clusterIP"] == "None"
                });
                if !headless {
                    continue;
                }
                for endpoint in item["endpoints"].as_array().into_iter().flatten() {
                    if endpoint["conditions"]["ready"] == false {
                        continue;
                    }
                    for ip in endpoint["addresses"].as_array().into_iter().flatten() {
                        if let Some(ip) = ip.as_str() {
                            lines.insert(format!("{ip} {service}.{ns}.svc.cluster.local"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    lines
}

/// The DNS pod's image: Debian's dnsmasq and the libraries it loads.
pub fn dns_image() -> Result<Image> {
    let mut image = Image::new(DNS_IMAGE);
    image
        .add_program(Path::new("/usr/sbin/dnsmasq"), "/usr/sbin/dnsmasq")
        .context("the DNS pod needs dnsmasq (apt-get install dnsmasq-base)")?;
    // `--user=root` looks the user up.
    image.add_bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/false\n", 0o644);
    image.add_bytes("/etc/group", "root:x:0:\n", 0o644);
    image.entrypoint = vec!["/usr/sbin/dnsmasq".into()];
    Ok(image)
}

/// The `kube-dns` Service at [`KUBE_DNS_IP`] (53 over UDP and TCP) and a Deployment
/// of one dnsmasq pod that serves `records_dir/hosts` (a hostPath the feed writes),
/// authoritative for `cluster.local` and never forwarding anything.
pub fn deploy_dns_pod(cp: &ControlPlane, records_dir: &Path) -> Result<()> {
    let manifest = format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  clusterIP: {KUBE_DNS_IP}
  selector:
    k8s-app: kube-dns
  ports:
  - name: dns
    port: 53
    protocol: UDP
  - name: dns-tcp
    port: 53
    protocol: TCP
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      dnsPolicy: Default
      containers:
      - name: dnsmasq
        image: {DNS_IMAGE}
        args: [--keep-in-foreground, --no-resolv, --no-hosts, --addn-hosts=/etc/cluster-dns/hosts,
               --local=/cluster.local/, --user=root, --pid-file=, --log-facility=-]
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        readinessProbe:
          tcpSocket:
            port: 53
          periodSeconds: 1
        volumeMounts:
        - {{name: records, mountPath: /etc/cluster-dns, readOnly: true}}
      volumes:
      - name: records
        hostPath:
          path: {records}
          type: Directory
"#,
        records = records_dir.display()
    );
    cp.kubectl_with_input(&["apply", "-f", "-"], Some(&manifest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_records_cover_cluster_ips_headless_endpoints_and_external_names() {
        let list = serde_json::json!({"items": [
            {"kind": "Service", "metadata": {"namespace": "n", "name": "web"},
             "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"]}},
            {"kind": "Service", "metadata": {"namespace": "n", "name": "db"},
             "spec": {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]}},
            {"kind": "EndpointSlice", "metadata": {"namespace": "n",
              "labels": {"kubernetes.io/service-name": "db"}},
             "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.8"], "conditions": {"ready": false}}]},
            {"kind": "Service", "metadata": {"namespace": "n", "name": "alias"},
             "spec": {"type": "ExternalName", "externalName": "web.n.svc.cluster.local."}},
            {"kind": "Service", "metadata": {"namespace": "n", "name": "outside"},
             "spec": {"type": "ExternalName", "externalName": "example.com"}},
        ]});
        assert_eq!(
            dns_records(&list),
            "10.244.1.7 db.n.svc.cluster.local\n\
             10.96.0.5 web.n.svc.cluster.local\n\
             10.96.0.5 alias.n.svc.cluster.local\n"
        );
    }
}
