//! `lb list`: the live table, like `cilium bpf lb list`. The kernel's maps are the
//! truth of what is served; the daemon (through its status socket, when one runs)
//! adds what the maps cannot say: excluded endpoints and why, policies, frontends
//! that did not fit. It also says whether programs are attached at all, whether a
//! daemon runs, and any drift between the tables.

use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::Result;
use lb_common::{SVC_F_AFFINITY, SVC_F_LOCAL, addr_to_ip, port_from_net, stat};
use serde::Serialize;
use serde_json::Value;

use crate::{
    daemon::status,
    datapath::{self, KernelMaps, MapSnapshot},
    model::{FrontendKey, Protocol, Scope, workloads::Mode},
};

#[derive(Debug, Serialize)]
pub struct ListedBackend {
    pub address: String,
    pub port: u16,
    /// Connections (TCP/SCTP connects, UDP connects) sent to this backend since it was
    /// added.
    pub connections: u64,
}

#[derive(Debug, Serialize)]
pub struct ListedCounters {
    pub translated: u64,
    pub refused: u64,
}

#[derive(Debug, Serialize)]
pub struct ListedFrontend {
    /// Frontend id: the key of LB_FRONTEND_STATS and LB_FRONTEND_NAMES (0 when the
    /// kernel does not hold it).
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub scope: Scope,
    /// `namespace/service:port`.
    pub service: String,
    pub backends: Vec<ListedBackend>,
    pub counters: ListedCounters,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Traffic policy the backend set follows: "Cluster" or "Local".
    pub policy: String,
    /// Topology narrowing in effect (from the daemon; "none" otherwise).
    pub topology: String,
    /// Endpoints listed for the port but not used, and why (from the daemon).
    pub excluded: Vec<Value>,
    /// Why the kernel does not hold (this version of) the frontend (from the daemon).
    pub not_programmed: Option<String>,
    /// Slots that point nowhere; non-zero only while an update is in flight.
    pub missing_slots: usize,
    /// Slot entries beyond the backend count (left by an interrupted update).
    pub stale_slots: usize,
}

type StatusKey = (String, u16, String, String);

fn status_key(address: &str, port: u16, protocol: &str, scope: Scope) -> StatusKey {
    let scope = match scope {
        Scope::Internal => "internal",
        Scope::External => "external",
    };
    (
        address.to_string(),
        port,
        protocol.to_string(),
        scope.to_string(),
    )
}

/// The kernel's frontends, joined with the daemon's view where it has one, plus the
/// daemon's frontends the kernel does not hold.
pub fn frontends(snapshot: &MapSnapshot, daemon: Option<&Value>) -> Vec<ListedFrontend> {
    let mut from_daemon: BTreeMap<StatusKey, &Value> = daemon
        .and_then(|d| d["frontends"].as_array())
        .into_iter()
        .flatten()
        .map(|f| {
            let scope = if f["scope"] == "external" {
                Scope::External
            } else {
                Scope::Internal
            };
            (
                status_key(
                    f["address"].as_str().unwrap_or(""),
                    f["port"].as_u64().unwrap_or(0) as u16,
                    f["protocol"].as_str().unwrap_or(""),
                    scope,
                ),
                f,
            )
        })
        .collect();
    let mut listed: Vec<(FrontendKey, ListedFrontend)> = snapshot
        .frontends
        .iter()
        .map(|fe| {
            let protocol = Protocol::from_number(fe.key.proto);
            let key = FrontendKey {
                ip: addr_to_ip(&fe.key.addr),
                port: port_from_net(fe.key.port),
                protocol: protocol.unwrap_or(Protocol::Tcp),
                scope: Scope::from_number(fe.key.scope).unwrap_or(Scope::Internal),
            };
            let backends = fe
                .slots
                .iter()
                .flatten()
                .filter_map(|id| snapshot.backends.get(id))
                .map(|b| ListedBackend {
                    address: addr_to_ip(&b.backend.addr).to_string(),
                    port: port_from_net(b.backend.port),
                    connections: b.connections,
                })
                .collect();
            let protocol = protocol.map_or_else(|| fe.key.proto.to_string(), |p| p.to_string());
            let address = key.ip.to_string();
            let info = from_daemon.remove(&status_key(&address, key.port, &protocol, key.scope));
            let flags = fe.value.flags;
            let listed = ListedFrontend {
                id: fe.value.svc_id,
                address,
                port: key.port,
                protocol,
                scope: key.scope,
                service: fe.name.clone(),
                backends,
                counters: ListedCounters {
                    translated: fe.stats.translated,
                    refused: fe.stats.refused,
                },
                affinity_timeout: (flags & SVC_F_AFFINITY != 0)
                    .then_some(fe.value.affinity_timeout),
                policy: if flags & SVC_F_LOCAL != 0 {
                    "Local"
                } else {
                    "Cluster"
                }
                .into(),
                topology: info
                    .and_then(|i| i["topology"].as_str())
                    .unwrap_or("none")
                    .into(),
                excluded: info
                    .and_then(|i| i["excluded"].as_array())
                    .cloned()
                    .unwrap_or_default(),
                not_programmed: info
                    .and_then(|i| i["not_programmed"].as_str())
                    .map(str::to_string),
                missing_slots: fe.slots.iter().filter(|s| s.is_none()).count(),
                stale_slots: fe.extra_slots.len(),
            };
            (key, listed)
        })
        .collect();
    // Frontends the daemon wants but the kernel does not hold: those that did not fit.
    for info in from_daemon.into_values() {
        let Some(reason) = info["not_programmed"].as_str() else {
            continue;
        };
        let scope = if info["scope"] == "external" {
            Scope::External
        } else {
            Scope::Internal
        };
        let Ok(ip) = info["address"].as_str().unwrap_or("").parse() else {
            continue;
        };
        let protocol = info["protocol"].as_str().unwrap_or("TCP");
        let key = FrontendKey {
            ip,
            port: info["port"].as_u64().unwrap_or(0) as u16,
            protocol: crate::model::Protocol::parse(Some(protocol)).unwrap_or(Protocol::Tcp),
            scope,
        };
        listed.push((
            key,
            ListedFrontend {
                id: 0,
                address: ip.to_string(),
                port: key.port,
                protocol: protocol.into(),
                scope,
                service: info["service"].as_str().unwrap_or("").into(),
                backends: Vec::new(),
                counters: ListedCounters {
                    translated: 0,
                    refused: 0,
                },
                affinity_timeout: info["affinity_timeout"].as_u64().map(|t| t as u32),
                policy: info["policy"].as_str().unwrap_or("Cluster").into(),
                topology: info["topology"].as_str().unwrap_or("none").into(),
                excluded: info["excluded"].as_array().cloned().unwrap_or_default(),
                not_programmed: Some(reason.into()),
                missing_slots: 0,
                stale_slots: 0,
            },
        ));
    }
    listed.sort_by_key(|(key, _)| *key);
    listed.into_iter().map(|(_, l)| l).collect()
}

fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

fn frontend_cell(fe: &ListedFrontend) -> String {
    let mut cell = endpoint(&fe.address, fe.port);
    if fe.scope == Scope::External {
        cell.push_str(" (ext)");
    }
    cell
}

/// What the datapath remembers about translated sockets.
fn sockets_line(snapshot: &MapSnapshot) -> String {
    let stat = |i: u32| snapshot.stats.get(i as usize).copied().unwrap_or(0);
    let table = snapshot.sockets;
    if table.legacy {
        return format!(
            "sockets: {} of {} remembered in {} (an LRU: this kernel has no cgroup/sock_release, \
             so entries of closed sockets stay until evicted)",
            snapshot.sock_revnat_entries,
            table.capacity,
            table.map_name()
        );
    }
    let overflowed = stat(stat::OVERFLOWED_SOCKETS).saturating_sub(stat(stat::OVERFLOWED_RELEASED));
    let mut line = format!(
        "sockets: {} of {} open connected sockets tracked in {} (deleted when the socket closes); \
         {} open sockets with per-socket storage (unconnected UDP)",
        snapshot.sock_revnat_entries,
        table.capacity,
        table.map_name(),
        stat(stat::LOCAL_CREATED).saturating_sub(stat(stat::LOCAL_RELEASED)),
    );
    if overflowed > 0 {
        line.push_str(&format!(
            "; {overflowed} open sockets OVERFLOWED (the map was full: raise --max-sockets)"
        ));
    }
    line
}

pub fn run(pin_dir: &Path, json: bool) -> Result<()> {
    let maps = KernelMaps::open_pinned(pin_dir)?;
    let snapshot = maps.snapshot()?;
    let daemon = status::fetch(pin_dir);
    let listed = frontends(&snapshot, daemon.as_ref());
    let attached = datapath::attached_programs(pin_dir);
    let mut out = std::io::stdout().lock();
    if json {
        return write_json(&mut out, &listed);
    }
    writeln!(
        out,
        "{:<34} {:<5} {:<34} {:>10} {:>8}  BACKENDS (connections)",
        "FRONTEND", "PROTO", "SERVICE", "TRANSLATED", "REFUSED"
    )?;
    for fe in &listed {
        let backends = if let Some(reason) = fe.not_programmed.as_ref().filter(|_| fe.id == 0) {
            format!("NOT PROGRAMMED: {reason}")
        } else if fe.backends.is_empty() {
            "(none: connections refused)".to_string()
        } else {
            fe.backends
                .iter()
                .map(|b| format!("{} ({})", endpoint(&b.address, b.port), b.connections))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "{:<34} {:<5} {:<34} {:>10} {:>8}  {}",
            frontend_cell(fe),
            fe.protocol,
            fe.service,
            fe.counters.translated,
            fe.counters.refused,
            backends
        )?;
        let mut notes = Vec::new();
        if let Some(timeout) = fe.affinity_timeout {
            notes.push(format!("sessionAffinity ClientIP {timeout}s"));
        }
        if fe.policy != "Cluster" {
            notes.push(format!("traffic policy {}", fe.policy));
        }
        if fe.topology != "none" {
            notes.push(format!("topology {}", fe.topology));
        }
        if let Some(reason) = fe.not_programmed.as_ref().filter(|_| fe.id != 0) {
            notes.push(format!(
                "update not programmed ({reason}); serving the previous version"
            ));
        }
        if !fe.excluded.is_empty() {
            let excluded: Vec<String> = fe
                .excluded
                .iter()
                .map(|e| {
                    format!(
                        "{} ({})",
                        endpoint(
                            e["address"].as_str().unwrap_or(""),
                            e["port"].as_u64().unwrap_or(0) as u16
                        ),
                        e["reason"].as_str().unwrap_or("")
                    )
                })
                .collect();
            notes.push(format!("excluded: {}", excluded.join(", ")));
        }
        if !notes.is_empty() {
            writeln!(out, "    {}", notes.join("; "))?;
        }
    }
    writeln!(out)?;
    let counters: Vec<String> = snapshot
        .stats
        .iter()
        .enumerate()
        .filter(|(i, _)| stat::NAMES[*i] != "reserved")
        .map(|(i, v)| format!("{}={v}", stat::NAMES[i]))
        .collect();
    writeln!(
        out,
        "{} frontends, {} backends; datapath counters: {}",
        snapshot.frontends.len(),
        snapshot.backends.len(),
        counters.join(" ")
    )?;
    writeln!(out, "{}", sockets_line(&snapshot))?;
    match attached {
        (0, 0) => writeln!(
            out,
            "NO PROGRAM ATTACHED: the maps are pinned but nothing uses them, so nothing is \
             balanced. A daemon attaches its programs after its first sync (see its log); \
             `lb cleanup --pin-dir {}` removes a datapath that will not come back.",
            pin_dir.display()
        )?,
        (linked, 0) => writeln!(
            out,
            "datapath: {linked} programs attached through pinned links"
        )?,
        (linked, netlink) => writeln!(
            out,
            "datapath: {linked} programs attached through pinned links, {netlink} TC programs \
             through netlink filters"
        )?,
    }
    match (&daemon, datapath::lock_holder(pin_dir)) {
        (Some(d), _) => writeln!(
            out,
            "daemon: pid {}, node {}, source {}{}",
            d["pid"],
            d["node"].as_str().unwrap_or(""),
            d["source"].as_str().unwrap_or(""),
            if d["ready"] == true {
                ", ready"
            } else {
                ", not ready yet (first sync pending)"
            }
        )?,
        (None, Some(pid)) => writeln!(
            out,
            "daemon: pid {pid} holds the pin directory (its status socket does not answer)"
        )?,
        (None, None) => writeln!(
            out,
            "daemon: none running; the datapath keeps serving what it was last given"
        )?,
    }
    write_workloads(&mut out, &maps, daemon.as_ref())?;
    if let Some(daemon) = &daemon {
        write_kernel_section(&mut out, daemon)?;
        for note in daemon["unserved"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "NOT SERVED: Service {}: {}",
                note["service"].as_str().unwrap_or("?"),
                note["why"].as_str().unwrap_or("?")
            )?;
        }
    }
    let unprogrammed = listed.iter().filter(|f| f.not_programmed.is_some()).count();
    if unprogrammed > 0 {
        writeln!(
            out,
            "{unprogrammed} frontends are not programmed (marked above, with why): raise the \
             --max-* flag named, or see the daemon's log for what the kernel refused"
        )?;
    }
    if !snapshot.orphan_slots.is_empty() || !snapshot.unreferenced_backends.is_empty() {
        writeln!(
            out,
            "drift: {} slot entries without a frontend, {} backends no frontend points at \
             (left by an interrupted update; the daemon's next resync removes them)",
            snapshot.orphan_slots.len(),
            snapshot.unreferenced_backends.len()
        )?;
    }
    Ok(())
}

/// Pods the socket hooks leave alone: the kernel's count by mode, then each pod as
/// the daemon decided it.
fn write_workloads(
    out: &mut impl Write,
    maps: &KernelMaps,
    daemon: Option<&serde_json::Value>,
) -> Result<()> {
    let programmed = maps.workloads()?;
    let pods = daemon
        .and_then(|d| d["workloads"].as_array())
        .cloned()
        .unwrap_or_default();
    if programmed.is_empty() && pods.is_empty() {
        return Ok(());
    }
    let by_mode: Vec<String> = Mode::ALL
        .iter()
        .filter_map(|mode| {
            let n = programmed
                .values()
                .filter(|v| Mode::from_map_value(**v) == Some(*mode))
                .count();
            (n > 0).then(|| format!("{n} {mode}"))
        })
        .collect();
    writeln!(
        out,
        "pods not balanced by the socket hooks: {} cgroups in the kernel ({})",
        programmed.len(),
        by_mode.join(", ")
    )?;
    for pod in &pods {
        let cgroup = match (pod["cgroup"].as_str(), pod["interface"].as_str()) {
            (None, _) => "WAITING for its cgroup (balanced by the socket hooks meanwhile)".into(),
            (Some(path), Some(interface)) => format!("cgroup {path}; interface {interface}"),
            (Some(path), None) if pod["mode"] == "packet" => format!(
                "cgroup {path}; WAITING for its interface (balanced by the socket hooks meanwhile)"
            ),
            (Some(path), None) => format!("cgroup {path}"),
        };
        writeln!(
            out,
            "    {} mode {} ({}); {cgroup}",
            pod["pod"].as_str().unwrap_or("?"),
            pod["mode"].as_str().unwrap_or("?"),
            pod["why"].as_str().unwrap_or("?"),
        )?;
    }
    Ok(())
}

/// The daemon's kernel features and TC interfaces, one line each.
fn write_kernel_section(out: &mut impl Write, daemon: &Value) -> Result<()> {
    if let Some(features) = daemon["kernel"]["features"].as_array() {
        writeln!(
            out,
            "kernel {}:",
            daemon["kernel"]["release"].as_str().unwrap_or("?")
        )?;
        for feature in features {
            writeln!(
                out,
                "    {:<13} {:<3} (since {}): {}",
                feature["name"].as_str().unwrap_or(""),
                if feature["available"] == true {
                    "yes"
                } else {
                    "no"
                },
                feature["since"].as_str().unwrap_or("?"),
                feature["in_use"].as_str().unwrap_or("")
            )?;
        }
    }
    for device in daemon["tc_devices"].as_array().into_iter().flatten() {
        let name = device["device"].as_str().unwrap_or("");
        match device["attachment"].as_str() {
            Some(via) => writeln!(out, "TC on {name}: attached ({via})")?,
            None => writeln!(
                out,
                "TC on {name}: NOT ATTACHED: {} (tried again periodically, see the daemon's log)",
                device["error"].as_str().unwrap_or("unknown error"),
            )?,
        }
    }
    Ok(())
}

/// Pretty JSON and a newline; errors as io::Error, so `lb list --json | head` ends
/// quietly like the table.
fn write_json(out: &mut impl Write, value: &impl Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// One tracked external flow, as `lb ct` shows it.
#[derive(Debug, Serialize)]
pub struct ListedFlow {
    pub protocol: String,
    /// `forward` (client -> frontend, as received) or `reply` (backend -> node).
    pub direction: &'static str,
    pub from: String,
    pub to: String,
    /// What a matching packet is rewritten to.
    pub rewritten_from: String,
    pub rewritten_to: String,
    pub frontend_id: u32,
    pub snat: bool,
    /// The flow's state, from both its entries (`syn-sent`, `established`, `closing`,
    /// `reset`, `unreplied`, `replied`; `unknown` for entries of an older program).
    pub state: &'static str,
    /// `established` (answered and acknowledged: never evicted by new flows) or `new`.
    pub table: &'static str,
    pub idle_seconds: u64,
}

/// `lb ct list`: the TC connection-tracking table.
pub fn run_ct(pin_dir: &Path, json: bool) -> Result<()> {
    use lb_common::{CT_F_SNAT, CT_FORWARD};
    let maps = KernelMaps::open_pinned(pin_dir)?;
    let now = crate::datapath::flows::monotonic_ns();
    let cell = |addr: &lb_common::Addr, port: u16| {
        endpoint(&addr_to_ip(addr).to_string(), port_from_net(port))
    };
    let (established, new) = maps.ct_tables()?;
    let established_keys: std::collections::HashSet<lb_common::CtKey> =
        established.iter().map(|(key, _)| *key).collect();
    let entries = established.into_iter().chain(new).collect();
    let mut flows: Vec<ListedFlow> = crate::datapath::flows::pair_up(entries)
        .into_iter()
        .flat_map(|flow| {
            let state = flow.state().name();
            flow.forward
                .into_iter()
                .chain(flow.reply)
                .map(move |entry| (entry, state))
        })
        .map(|((key, value), state)| ListedFlow {
            protocol: crate::model::Protocol::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            direction: if key.dir == CT_FORWARD {
                "forward"
            } else {
                "reply"
            },
            from: cell(&key.src, key.sport),
            to: cell(&key.dst, key.dport),
            rewritten_from: cell(&value.src, value.sport),
            rewritten_to: cell(&value.dst, value.dport),
            frontend_id: value.svc_id,
            snat: value.flags & CT_F_SNAT != 0,
            state,
            table: if established_keys.contains(&key) {
                "established"
            } else {
                "new"
            },
            idle_seconds: now.saturating_sub(value.last_seen_ns) / 1_000_000_000,
        })
        .collect();
    flows.sort_by(|a, b| {
        (a.frontend_id, &a.from, a.direction).cmp(&(b.frontend_id, &b.from, b.direction))
    });
    let mut out = std::io::stdout().lock();
    if json {
        return write_json(&mut out, &flows);
    }
    writeln!(
        out,
        "{:<5} {:<8} {:<46} {:<46} {:>5} {:<11} {:<11} {:>5}",
        "PROTO",
        "DIR",
        "PACKET (from -> to)",
        "REWRITTEN TO (from -> to)",
        "FE",
        "STATE",
        "TABLE",
        "IDLE"
    )?;
    for flow in &flows {
        writeln!(
            out,
            "{:<5} {:<8} {:<46} {:<46} {:>5} {:<11} {:<11} {:>4}s{}",
            flow.protocol,
            flow.direction,
            format!("{} -> {}", flow.from, flow.to),
            format!("{} -> {}", flow.rewritten_from, flow.rewritten_to),
            flow.frontend_id,
            flow.state,
            flow.table,
            flow.idle_seconds,
            if flow.snat { "  snat" } else { "" }
        )?;
    }
    writeln!(out, "{} tracked entries (two per flow)", flows.len())?;
    Ok(())
}
