//! `lb list`: the live table read from the pinned maps, like `cilium bpf lb list`.

use std::{io::Write, path::Path};

use anyhow::Result;
use lb_common::{addr_to_ip, port_from_net, stat};
use serde::Serialize;

use crate::{
    datapath::{KernelMaps, MapSnapshot, check_pin_dir_exists},
    model::{FrontendKey, Protocol, Scope},
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
    /// Frontend id: the key of LB_FRONTEND_STATS and LB_FRONTEND_NAMES.
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// `namespace/service:port`.
    pub service: String,
    pub backends: Vec<ListedBackend>,
    pub counters: ListedCounters,
    /// Slots that point nowhere; non-zero only while an update is in flight.
    pub missing_slots: usize,
    /// Slot entries beyond the backend count (left by an interrupted update).
    pub stale_slots: usize,
}

pub fn frontends(snapshot: &MapSnapshot) -> Vec<ListedFrontend> {
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
            let listed = ListedFrontend {
                id: fe.value.svc_id,
                address: key.ip.to_string(),
                port: key.port,
                protocol: protocol.map_or_else(|| fe.key.proto.to_string(), |p| p.to_string()),
                service: fe.name.clone(),
                backends,
                counters: ListedCounters {
                    translated: fe.stats.translated,
                    refused: fe.stats.refused,
                },
                missing_slots: fe.slots.iter().filter(|s| s.is_none()).count(),
                stale_slots: fe.extra_slots.len(),
            };
            (key, listed)
        })
        .collect();
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

pub fn run(pin_dir: &Path, json: bool) -> Result<()> {
    check_pin_dir_exists(pin_dir)?;
    let maps = KernelMaps::open_pinned(pin_dir)?;
    let snapshot = maps.snapshot()?;
    let listed = frontends(&snapshot);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &listed)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<28} {:<5} {:<34} {:>10} {:>8}  BACKENDS (connections)",
        "FRONTEND", "PROTO", "SERVICE", "TRANSLATED", "REFUSED"
    )?;
    for fe in &listed {
        let backends = if fe.backends.is_empty() {
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
            "{:<28} {:<5} {:<34} {:>10} {:>8}  {}",
            endpoint(&fe.address, fe.port),
            fe.protocol,
            fe.service,
            fe.counters.translated,
            fe.counters.refused,
            backends
        )?;
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
        "{} frontends, {} backends, {} tracked sockets; datapath counters: {}",
        listed.len(),
        snapshot.backends.len(),
        snapshot.sock_revnat_entries,
        counters.join(" ")
    )?;
    if !snapshot.orphan_slots.is_empty() {
        writeln!(
            out,
            "{} orphan slot entries (left by an interrupted update; the daemon removes them)",
            snapshot.orphan_slots.len()
        )?;
    }
    Ok(())
}
