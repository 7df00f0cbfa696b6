//! Arbitrary sequences of Service and EndpointSlice changes, conflicts, write
//! failures, frontends the kernel refuses and small capacities, applied as the daemon
//! applies them (failures isolated per frontend), through the model and the
//! reconciler into an
//! in-memory map set that checks after every write what a concurrent connect() relies
//! on. After every step (and a resync from the maps after a failure, as the daemon
//! does) nothing in the maps is unreachable and every frontend that fits is exactly
//! what the model wants.
#![no_main]

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use arbitrary::Arbitrary;
use lb::{
    model::{Model, ObjectRef, Protocol, ServiceSpec, SliceSpec, spec},
    reconcile::{Limits, Reconciler, memory::MemoryMaps, service_key},
};
use lb_common::addr_to_ip;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Service {
        id: u8,
        ip: u8,
        port: u8,
        udp: bool,
    },
    RemoveService {
        id: u8,
    },
    Slice {
        id: u8,
        endpoints: Vec<(u8, bool, bool)>,
    },
    RemoveSlice {
        id: u8,
    },
    FailNextWrites {
        after: u8,
    },
    /// The kernel refuses (or takes again) the writes of one ClusterIP's frontends.
    Refuse {
        ip: u8,
        refused: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    frontends: u8,
    backends: u8,
    entries: u8,
    ops: Vec<Op>,
}

fn service(id: u8, ip: u8, port: u8, udp: bool) -> Arc<ServiceSpec> {
    Arc::new(ServiceSpec {
        id: ObjectRef::new("f", format!("s{}", id % 16)),
        service_type: spec::ServiceType::ClusterIP,
        cluster_ips: vec![IpAddr::from([10, 96, 0, ip % 8])],
        ports: vec![spec::ServicePortSpec {
            name: String::new(),
            port: 80 + (port % 3) as u16,
            protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
            target_port: spec::TargetPort::Number(8080),
            node_port: None,
        }],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
        affinity_timeout: None,
        internal_local: false,
        external_local: false,
        health_check_node_port: None,
        traffic_distribution: None,
        created: None,
    })
}

fn slice(id: u8, endpoints: &[(u8, bool, bool)]) -> Arc<SliceSpec> {
    Arc::new(SliceSpec {
        id: ObjectRef::new("f", format!("s{}-x", id % 16)),
        service: ObjectRef::new("f", format!("s{}", id % 16)),
        address_type: Some(spec::AddressType::Ipv4),
        ports: vec![
            spec::SlicePort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp,
            },
            spec::SlicePort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Udp,
            },
        ],
        endpoints: endpoints
            .iter()
            .take(40)
            .map(|(host, ready, terminating)| spec::SliceEndpoint {
                address: IpAddr::from([10, 244, 1, host % 30]),
                ready: *ready,
                serving: true,
                terminating: *terminating,
                placement: Default::default(),
            })
            .collect(),
        trigger_time: None,
    })
}

fn adopt(limits: Limits, maps: &MemoryMaps) -> Reconciler {
    Reconciler::adopt(
        limits,
        maps.services.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.names.iter().map(|(k, v)| (*k, v.clone())),
        maps.members.iter().copied(),
    )
}

fuzz_target!(|input: Input| {
    let limits = Limits {
        frontends: 2 + (input.frontends % 16) as u32,
        backends: 2 + (input.backends % 32) as u32,
        service_entries: 2 + (input.entries % 64) as u32,
        ..Limits::default()
    };
    let mut maps = MemoryMaps::with_limits(limits);
    let mut rec = Reconciler::new(limits);
    let mut model = Model::default();
    for op in input.ops.iter().take(200) {
        match op {
            Op::Service { id, ip, port, udp } => {
                model.upsert_service(service(*id, *ip, *port, *udp))
            }
            Op::RemoveService { id } => {
                model.remove_service(&ObjectRef::new("f", format!("s{}", id % 16)))
            }
            Op::Slice { id, endpoints } => model.upsert_slice(slice(*id, endpoints)),
            Op::RemoveSlice { id } => {
                model.remove_slice(&ObjectRef::new("f", format!("s{}-x", id % 16)))
            }
            Op::FailNextWrites { after } => {
                maps.fail_put_at = Some(maps.puts() + 1 + (*after % 8) as usize);
                continue;
            }
            Op::Refuse { ip, refused } => {
                let ip = IpAddr::from([10, 96, 0, ip % 8]);
                if *refused {
                    maps.refused_addrs.insert(ip);
                } else {
                    maps.refused_addrs.remove(&ip);
                }
            }
        }
        let changes = model.recompute_until(&|| false);
        let mut refusals_left = 4;
        let result = rec.apply_isolating(&mut maps, &changes.frontends, &mut refusals_left);
        maps.fail_put_at = None;
        match result {
            Err(_) => {
                rec = adopt(limits, &maps);
                let diff = rec.diff_all(model.frontends());
                rec.apply_isolating(&mut maps, &diff, &mut refusals_left)
                    .expect("a resync without injected failures succeeds");
            }
            Ok(stats) if stats.freed_space() || rec.has_refused() => {
                let mut retry = rec.pending();
                retry.extend(rec.refused().map(|(key, f)| (key, Some(f))));
                rec.apply_isolating(&mut maps, &retry, &mut refusals_left)
                    .expect("a retry succeeds");
            }
            Ok(_) => {}
        }
        for (key, _) in rec.refused() {
            assert!(
                maps.refused_addrs.contains(&key.ip) || refusals_left == 0,
                "{key} refused for no reason"
            );
        }
        assert!(maps.unreachable().is_empty(), "{:?}", maps.unreachable());
        for (key, frontend) in model.frontends() {
            if rec.unprogrammed().contains_key(key) {
                continue;
            }
            let want: BTreeSet<IpAddr> = frontend.backends.iter().map(|b| b.ip).collect();
            let got: BTreeSet<IpAddr> = maps
                .reachable(&service_key(key, 0))
                .iter()
                .map(|b| addr_to_ip(&b.addr))
                .collect();
            assert_eq!(got, want, "{key}");
        }
        assert_eq!(rec.service_entry_count(), maps.services.len());
    }
});
