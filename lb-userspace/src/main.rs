//! `lb`: an eBPF Kubernetes service load balancer (a kube-proxy replacement).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use lb::{daemon, datapath, datapath::DatapathOptions, list, privileges};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF Kubernetes service load balancer")]
struct Cli {
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath and serve the Services of the Kubernetes API (default) or of a
    /// folder of manifests.
    Daemon(Box<DaemonArgs>),
    /// Print the live service table from the pinned maps.
    List {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// A JSON array with one object per frontend.
        #[arg(long)]
        json: bool,
    },
    /// Print the connection-tracking table of the TC programs (flows from other
    /// machines to node ports, external and load-balancer IPs).
    Ct {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Detach a datapath and remove its pins (it survives daemon exits otherwise).
    /// Refused while a daemon uses the pin directory.
    Cleanup {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Remove the pins even though a daemon runs (it is not stopped: it keeps its
        /// maps open, but no program of it stays attached).
        #[arg(long)]
        force: bool,
        /// Network namespace of the daemon's devices (its `--netns`), where TC
        /// filters attached through netlink are looked for besides this namespace and
        /// those under /run/netns.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
    },
    /// Mount bpffs (mode 0700) at PATH unless one is mounted there: the DaemonSet's
    /// init container runs it on the host's /sys/fs/bpf so the datapath's pins outlive
    /// the daemon's container.
    MountBpffs {
        #[arg(value_name = "PATH", default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Folder of v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 Pod and v1
    /// Namespace manifests, watched for changes, instead of the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the API server [default: $KUBECONFIG, else the in-cluster
    /// service account].
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object gives zone and addresses; its endpoints are
    /// the local ones) [default: $NODE_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// cgroup2 directory to attach to: its processes and all below it are balanced
    /// [default: the cgroup2 root, from /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Detach the datapath and remove its pins on a graceful exit. Without it the
    /// datapath keeps balancing connections while no daemon runs (a restart, an
    /// upgrade, a crash), and the next `lb daemon` adopts it.
    #[arg(long)]
    detach_on_exit: bool,
    /// Accepted for compatibility: keeping the datapath is the default now.
    #[arg(long, hide = true, conflicts_with = "detach_on_exit")]
    keep_pinned: bool,
    /// Health endpoints (/healthz, /livez, /readyz) as kube-proxy serves them; "off"
    /// disables them.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    health_addr: String,
    /// Prometheus /metrics; "off" disables it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// /healthz fails once a change has waited this long for a successful sync.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    health_timeout: u64,
    /// Seconds between safety-net rescans of the manifest folder.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    rescan_interval: u64,
    /// Frontends (address, port, protocol, scope) the maps hold.
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_FRONTENDS)]
    max_frontends: u32,
    /// Distinct backends (pod address, port, protocol) the maps hold.
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_BACKENDS)]
    max_backends: u32,
    /// LB_SERVICES entries: one per frontend plus one per backend of each frontend.
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_SERVICE_ENTRIES)]
    max_service_entries: u32,
    /// Frontends one Service may have (ports x addresses x scopes); past this only the
    /// first are served, its ClusterIPs first, with a warning, so one Service cannot
    /// take the capacity every other Service needs.
    #[arg(long, value_name = "N", default_value_t = lb::model::DEFAULT_FRONTENDS_PER_SERVICE)]
    max_frontends_per_service: usize,
    /// Kernel memory, in MiB, that the Maglev tables of external frontends (node
    /// ports, external and load-balancer IPs) may take together; a frontend whose
    /// table does not fit is not served, and reported.
    #[arg(long, value_name = "MIB", default_value_t = lb::reconcile::DEFAULT_MAGLEV_BYTES >> 20)]
    max_maglev_memory: u64,
    /// Open translated connected sockets remembered for reverse translation and
    /// stale-socket termination (an entry lives as long as its socket; past this,
    /// translations are kept in the socket's own storage and counted as overflow).
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_SOCKETS)]
    max_sockets: u32,
    /// Session-affinity entries: (client pod, Service port) pairs remembered for
    /// `sessionAffinity: ClientIP`, least recently used forgotten first.
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_AFFINITY)]
    max_affinity_entries: u32,
    /// Interfaces that carry traffic from other machines, for the TC programs (node
    /// ports, external and load-balancer IPs) [default: the interfaces holding the
    /// node's addresses]; "none" serves those addresses to this node's own
    /// connections only.
    #[arg(long, value_name = "IF[,IF...]", value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Network namespace of the devices and of the health-check node ports (a
    /// `/run/netns/NAME` or `/proc/PID/ns/net` path) [default: the daemon's own].
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Node ports this node serves; a Service's node port outside it is ignored with
    /// a warning (the API server allocates from its own --service-node-port-range).
    #[arg(long, value_name = "MIN-MAX", default_value = "30000-32767")]
    node_port_range: String,
    /// Where a Service's external IPs and load-balancer IPs may be: others are not
    /// served, with one warning per Service [default: anywhere, as kube-proxy; see
    /// README "Security"]. Never served whatever this says: this node's addresses
    /// (other than node ports), the API server's, loopback, link-local, multicast.
    #[arg(long, value_name = "CIDR[,CIDR...]", value_delimiter = ',')]
    external_ip_cidrs: Option<Vec<String>>,
    /// Entries of each external frontend's Maglev table: a prime, ideally over 100
    /// times the frontend's backends (each table costs 4 bytes per entry in the kernel).
    #[arg(long, value_name = "M", default_value_t = lb_common::DEFAULT_MAGLEV_TABLE_SIZE)]
    maglev_table_size: u32,
    /// External flows (node ports, external and load-balancer IPs) tracked at once, in
    /// each of two tables: new flows (least recently used forgotten first) and
    /// established ones (acknowledged answers; never pushed out by new flows).
    #[arg(long, value_name = "N", default_value_t = lb_common::maps::DEFAULT_FLOWS)]
    max_flows: u32,
    /// Source ports for flows from other machines SNATed to this node's address (their
    /// backend on another node): they must lie outside the node's ephemeral ports
    /// (net.ipv4.ip_local_port_range) or be reserved from them
    /// (net.ipv4.ip_local_reserved_ports); else the TC programs are not attached, with
    /// the reason, until they do.
    #[arg(long, value_name = "MIN-MAX", default_value = "61000-65535")]
    snat_ports: String,
    /// Idle time after which an answered TCP flow from another machine is forgotten
    /// (kube-proxy's flag and default).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// ... a TCP flow after a FIN (kube-proxy's flag and default).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// ... a UDP flow not answered yet (kube-proxy's flag; Linux's default).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// ... an answered UDP flow (kube-proxy's flag; Linux's default).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// Remember sockets in an LRU as on kernels without cgroup/sock_release (< 5.9),
    /// even where the kernel has it. For testing that fallback.
    #[arg(long, hide = true)]
    legacy_socket_tracking: bool,
    /// How the TC programs are attached: TCX links where the kernel has them (6.6+),
    /// else netlink clsact filters (auto); or netlink filters everywhere. Both stay
    /// attached when the daemon exits and are replaced in place by the next one.
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    tc_attach: datapath::TcAttachMode,
    /// Seconds between tries to attach the TC programs to an interface where it
    /// failed (the interface may appear later).
    #[arg(long, value_name = "S", default_value_t = datapath::TC_RETRY.as_secs())]
    tc_retry_seconds: u64,
    /// Give pods with an Istio or Linkerd sidecar and KubeVirt launcher pods the
    /// `packet` load-balancing mode unless they (or their Namespace) say otherwise
    /// with the lb.dev/mode annotation.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    workload_detection: bool,
    /// Runtime classes whose pods get the `packet` mode unless annotated otherwise
    /// (VM sandboxes such as Kata or gVisor, whose sockets no host hook sees).
    #[arg(long, value_name = "CLASS[,CLASS...]", value_delimiter = ',')]
    packet_runtime_classes: Vec<String>,
    /// The load-balancing mode of pods that neither an annotation nor detection
    /// decides: socket, packet or off (hostNetwork pods keep socket unless annotated).
    #[arg(long, value_name = "MODE", default_value = "socket", value_parser = parse_mode)]
    default_workload_mode: lb::model::workloads::Mode,
}

fn parse_mode(value: &str) -> Result<lb::model::workloads::Mode, String> {
    value.parse()
}

fn init_logging(level: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
}

/// A duration as kube-proxy's flags take it: numbers with units, e.g. `24h`,
/// `1h30m`, `90s`, `500ms`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = value.trim();
    if rest.is_empty() {
        return Err("an empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{value:?}: expected a number before each unit"))?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            other => return Err(format!("{value:?}: unknown unit {other:?} (h, m, s or ms)")),
        };
        total = scale
            .checked_mul(u32::try_from(number).map_err(|_| format!("{value:?} is too long"))?)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| format!("{value:?} is too long"))?;
        rest = &rest[unit..];
    }
    if total.is_zero() {
        return Err(format!("{value:?}: must be longer than zero"));
    }
    Ok(total)
}

fn parse_addr(flag: &str, value: &str) -> Result<Option<SocketAddr>> {
    if value == "off" || value.is_empty() {
        return Ok(None);
    }
    if let Ok(addr) = value.parse() {
        return Ok(Some(addr));
    }
    // An IPv6 address without brackets, as `$(NODE_IP):10256` expands to on an
    // IPv6 node: the last colon separates the port.
    if let Some((ip, port)) = value.rsplit_once(':')
        && let (Ok(ip), Ok(port)) = (ip.parse::<std::net::Ipv6Addr>(), port.parse::<u16>())
    {
        return Ok(Some(SocketAddr::from((ip, port))));
    }
    bail!("--{flag} {value:?} is not an address:port (or \"off\")")
}

/// `--node-name`, else `$NODE_NAME` (the DaemonSet's downward API), else the hostname.
fn node_name(flag: Option<String>) -> Result<String> {
    if let Some(name) = flag
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
    {
        return Ok(name);
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_lowercase();
    if name.is_empty() {
        bail!("cannot tell this node's name: pass --node-name or set NODE_NAME");
    }
    Ok(name)
}

/// The fewest external flows `--max-flows` may ask for.
const MIN_FLOWS: u32 = 1024;

fn capacities(args: &DaemonArgs) -> Result<datapath::Capacities> {
    for (flag, value) in [
        ("max-frontends", args.max_frontends),
        ("max-backends", args.max_backends),
        ("max-service-entries", args.max_service_entries),
        ("max-sockets", args.max_sockets),
        ("max-affinity-entries", args.max_affinity_entries),
        ("max-flows", args.max_flows),
    ] {
        if !(16..=1 << 26).contains(&value) {
            bail!("--{flag} {value} is out of range (16 to {})", 1u32 << 26);
        }
    }
    // Measured: a flood of new flows through a table of 256 reset a flow in use (the
    // kernel's LRU frees entries in per-CPU batches, so a few hundred entries churn
    // as one); from 1024 up, ten times the table in new flows leave it alone.
    if args.max_flows < MIN_FLOWS {
        bail!(
            "--max-flows {} is too small: at least {MIN_FLOWS}, or a burst of new flows \
             evicts flows still in use",
            args.max_flows
        );
    }
    Ok(datapath::Capacities {
        frontends: args.max_frontends,
        backends: args.max_backends,
        service_entries: args.max_service_entries,
        sockets: args.max_sockets,
        affinity: args.max_affinity_entries,
        flows: args.max_flows,
        legacy_sockets: args.legacy_socket_tracking,
    })
}

/// glibc tuning for a daemon whose memory is a few large tables:
/// - each thread that allocates concurrently gets its own arena, which keeps freed
///   memory: the parallel parse of a large sync then leaves several arenas' worth
///   behind (10 000 Services / 100 000 endpoints on 2 cores: peak RSS 98 MB by default,
///   84 MB with two arenas, the sync as fast). Only a sync allocates from many threads.
/// - a fixed mmap threshold (glibc's initial 128 KiB) instead of the dynamic one, which
///   rises to 32 MiB once a large block is freed: the tables that grow by reallocation
///   (the backend slab, hash tables, batch vectors) then move with `mremap` instead of
///   being copied inside the heap, where each old copy stays resident as a hole
///   (100 000 Services / 1 000 000 endpoints: peak RSS 351 -> 316 MB).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// `--node-port-range MIN-MAX`.
fn node_port_range(text: &str) -> Result<(u16, u16)> {
    let parsed = text.split_once('-').and_then(|(min, max)| {
        let (min, max) = (
            min.trim().parse::<u16>().ok()?,
            max.trim().parse::<u16>().ok()?,
        );
        (min > 0 && min <= max).then_some((min, max))
    });
    parsed.ok_or_else(|| {
        anyhow::anyhow!("--node-port-range {text:?} is not MIN-MAX with 1 <= MIN <= MAX <= 65535")
    })
}

fn daemon(args: DaemonArgs) -> Result<()> {
    tune_malloc();
    let capacities = capacities(&args)?;
    let node_ports = node_port_range(&args.node_port_range)?;
    let maglev_size = args.maglev_table_size;
    if !(7..=(1 << 20)).contains(&maglev_size) || !lb::reconcile::maglev::is_prime(maglev_size) {
        bail!(
            "--maglev-table-size {maglev_size} must be a prime between 7 and 1048576 (e.g. 251, 4093, 16381, 65521)"
        );
    }
    let devices = match args.devices {
        Some(list) if list.iter().all(|d| d == "none" || d.is_empty()) => Some(Vec::new()),
        other => other,
    };
    let netns = args
        .netns
        .as_deref()
        .map(datapath::netns::check)
        .transpose()?;
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => datapath::cgroup2_root()?,
    };
    let source = match args.manifests {
        Some(dir) => daemon::SourceOptions::Manifests {
            dir,
            rescan_interval: Duration::from_secs(args.rescan_interval.max(1)),
        },
        None => daemon::SourceOptions::Kubernetes {
            kubeconfig: args.kubeconfig,
        },
    };
    let options = daemon::DaemonOptions {
        source,
        datapath: DatapathOptions {
            cgroup,
            pin_dir: args.pin_dir,
            capacities,
            devices,
            netns,
            maglev_size,
            tc_attach: args.tc_attach,
            tc_retry: Duration::from_secs(args.tc_retry_seconds.max(1)),
            snat_ports: datapath::uplink::SnatPorts::parse(&args.snat_ports)?,
        },
        node_ports,
        external_ip_cidrs: match &args.external_ip_cidrs {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|c| lb::model::spec::Cidr::parse(c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| anyhow::anyhow!("--external-ip-cidrs: {e}"))?,
            ),
        },
        frontends_per_service: args.max_frontends_per_service.max(1),
        maglev_bytes: args.max_maglev_memory.saturating_mul(1 << 20),
        ct_timeouts: lb::datapath::flows::CtTimeouts {
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
            udp: args.conntrack_udp_timeout,
            udp_stream: args.conntrack_udp_timeout_stream,
            ..Default::default()
        },
        workload_detection: lb::model::workloads::Detection {
            enabled: args.workload_detection,
            packet_runtime_classes: args.packet_runtime_classes,
            default_mode: args.default_workload_mode,
        },
        detach_on_exit: args.detach_on_exit,
        node_name: node_name(args.node_name)?,
        health_addr: parse_addr("health-addr", &args.health_addr)?,
        metrics_addr: parse_addr("metrics-addr", &args.metrics_addr)?,
        health_timeout: Duration::from_secs(args.health_timeout.max(1)),
    };
    let _ = args.keep_pinned;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The runtime's threads serve HTTP, the watchers and the log ring: CAP_BPF at
        // most (see privileges.rs).
        .on_thread_start(|| privileges::limit_thread(privileges::OTHER))
        .enable_all()
        .build()?
        .block_on(daemon::run(options))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => daemon(*args),
        Command::Ct { pin_dir, json } => list::run_ct(&pin_dir, json),
        Command::List { pin_dir, json } => list::run(&pin_dir, json),
        Command::MountBpffs { path } => {
            datapath::check_root()?;
            if datapath::ensure_bpffs(&path)? {
                eprintln!("mounted bpffs at {}", path.display());
            } else {
                eprintln!("bpffs already mounted at {}", path.display());
            }
            Ok(())
        }
        Command::Cleanup {
            pin_dir,
            force,
            netns,
        } => {
            datapath::check_root()?;
            let holder = datapath::lock_holder(&pin_dir);
            if let Some(pid) = holder
                && !force
            {
                bail!(
                    "lb daemon (pid {pid}) is using {}: stop it first (the datapath stays \
                     pinned when it exits), then run lb cleanup again; --force removes the pins \
                     anyway",
                    pin_dir.display()
                );
            }
            datapath::cleanup(&pin_dir, netns.as_deref())?;
            eprintln!("removed the datapath pinned at {}", pin_dir.display());
            if let Some(pid) = holder {
                eprintln!(
                    "lb daemon (pid {pid}) still runs: it was not stopped, keeps its maps open, \
                     and has no program attached any more (restarting it attaches a new datapath)"
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `lb list | head`: the reader went away, nothing is wrong.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            // One line: the reason and its causes.
            eprintln!("lb: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_ipv6_brackets() {
        let parse = |v: &str| parse_addr("health-addr", v).unwrap();
        assert_eq!(
            parse("10.0.0.5:10256"),
            Some("10.0.0.5:10256".parse().unwrap())
        );
        assert_eq!(
            parse("[fd00::5]:10256"),
            Some("[fd00::5]:10256".parse().unwrap())
        );
        // `$(NODE_IP):10256` on an IPv6 node.
        assert_eq!(
            parse("fd00::5:10256"),
            Some("[fd00::5]:10256".parse().unwrap())
        );
        assert_eq!(parse("off"), None);
        assert!(parse_addr("health-addr", "10.0.0.5").is_err());
        assert!(parse_addr("health-addr", ":10256").is_err());
    }

    #[test]
    fn durations_parse_as_kube_proxy_flags_take_them() {
        let secs = |v: &str| parse_duration(v).unwrap().as_secs_f64();
        assert_eq!(secs("24h"), 86_400.0);
        assert_eq!(secs("24h0m0s"), 86_400.0);
        assert_eq!(secs("1h30m"), 5_400.0);
        assert_eq!(secs("90s"), 90.0);
        assert_eq!(secs("1500ms"), 1.5);
        for bad in ["", "0s", "10", "h", "5d", "1.5h", "-1s", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
