//! The TC programs on crafted packets through `BPF_PROG_TEST_RUN` (root): translation
//! with correct checksums over IPv4 and IPv6, SNAT and the reply path, a non-SYN
//! packet without a tracked flow, fragments, and source ranges.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use lb_common::stat;

use super::{Datapath, DatapathOptions, KernelMaps};
use crate::{
    model::{BackendAddr, Frontend, FrontendKey, FrontendKind, ObjectRef, Protocol, Scope},
    reconcile::{MapSet as _, Reconciler},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 253, 9, 11);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 253, 9, 100);
const POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 2);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x253, 9, 0, 0, 0, 0, 0x11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x253, 9, 0, 0, 0, 0, 0x100);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 9, 0, 0, 0, 0, 2);
const NODE_PORT: u16 = 30002;
const EXTERNAL4: Ipv4Addr = Ipv4Addr::new(10, 111, 9, 2);
const EXTERNAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x111, 9, 0, 0, 0, 0, 2);
const TC_ACT_REDIRECT: u32 = 7;
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 9, 0, 0, 0, 0, 0x10);
const CLIENT_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 9, 0, 0, 0, 0, 0x50);
/// A packet-mode pod on this node.
const CLIENT_POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 50);
/// Where `BPF_PROG_TEST_RUN` says a packet came in: the test's loopback.
const TEST_RUN_IFINDEX: u32 = 1;

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The L4 checksum over the pseudo header, as it should be in `l4` (whose checksum
/// field must read as zero for computing, or the packet's for verifying: 0 = valid).
fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, proto]);
            pseudo.extend((l4.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend((l4.len() as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, proto]);
        }
        _ => unreachable!(),
    }
    fold(sum16(l4, sum16(&pseudo, 0)))
}

/// An Ethernet frame with a TCP segment (flags given) or a UDP datagram.
fn frame(src: (IpAddr, u16), dst: (IpAddr, u16), tcp_flags: Option<u8>, frag: u16) -> Vec<u8> {
    let payload = b"GET whoami\r\n";
    let mut l4 = Vec::new();
    l4.extend(src.1.to_be_bytes());
    l4.extend(dst.1.to_be_bytes());
    let proto = if let Some(flags) = tcp_flags {
        l4.extend(1u32.to_be_bytes()); // seq
        l4.extend(0u32.to_be_bytes()); // ack
        l4.extend([0x50, flags]);
        l4.extend(65535u16.to_be_bytes());
        l4.extend([0, 0, 0, 0]); // checksum, urgent
        6
    } else {
        l4.extend(((8 + payload.len()) as u16).to_be_bytes());
        l4.extend([0, 0]);
        17
    };
    l4.extend(payload);
    let csum = l4_sum(src.0, dst.0, proto, &l4);
    let at = if proto == 6 { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend(((20 + l4.len()) as u16).to_be_bytes());
            ip.extend([0, 1]);
            ip.extend(frag.to_be_bytes());
            ip.extend([64, proto, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let csum = fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend([0x86, 0xdd]);
            out.extend([0x60, 0, 0, 0]);
            out.extend((l4.len() as u16).to_be_bytes());
            out.extend([proto, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        _ => unreachable!(),
    }
    out.extend(l4);
    out
}

/// (src, sport, dst, dport) of a frame, after checking both checksums.
fn tuple_checked(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let (src, dst, proto, l4) = if frame[12..14] == [0x08, 0x00] {
        let ip = &frame[14..34];
        assert_eq!(fold(sum16(ip, 0)), 0, "IPv4 header checksum");
        let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
        let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
        (src, dst, ip[9], &frame[34..])
    } else {
        let ip = &frame[14..54];
        let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        (src, dst, ip[6], &frame[54..])
    };
    assert_eq!(
        l4_sum(src, dst, proto, l4),
        0,
        "L4 checksum of {src} -> {dst}"
    );
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    (src, port(0), dst, port(2))
}

/// ICMP "fragmentation needed" from `router` to `to`, quoting `packet`'s header and
/// the first 8 bytes after it.
fn icmp_frag_needed(router: Ipv4Addr, to: Ipv4Addr, packet: &[u8]) -> Vec<u8> {
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend(&packet[..28]);
    let csum = fold(sum16(&icmp, 0));
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([0, 2, 0, 0, 64, 1, 0, 0]);
    ip.extend(router.octets());
    ip.extend(to.octets());
    let csum = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    out.extend(ip);
    out.extend(icmp);
    out
}

/// (outer source, outer destination, quoted tuple) of an ICMP error frame, after
/// checking the outer, ICMP and quoted IP header checksums.
fn icmp_checked(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, (IpAddr, u16, IpAddr, u16)) {
    let ip = &frame[14..34];
    assert_eq!(fold(sum16(ip, 0)), 0, "outer IPv4 checksum");
    let icmp = &frame[34..];
    assert_eq!(fold(sum16(icmp, 0)), 0, "ICMP checksum");
    let quoted = &icmp[8..];
    assert_eq!(fold(sum16(&quoted[..20], 0)), 0, "quoted IPv4 checksum");
    let v4 = |b: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap());
    let port = |at: usize| u16::from_be_bytes([quoted[at], quoted[at + 1]]);
    (
        v4(&ip[12..16]),
        v4(&ip[16..20]),
        (
            v4(&quoted[12..16]).into(),
            port(20),
            v4(&quoted[16..20]).into(),
            port(22),
        ),
    )
}

/// ICMPv6 "packet too big" from `router` to `to`, quoting `packet`'s IPv6 header and
/// the first 8 bytes after it.
fn icmp6_too_big(router: Ipv6Addr, to: Ipv6Addr, packet: &[u8]) -> Vec<u8> {
    let mut icmp = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend(&packet[..48]);
    let csum = l4_sum(router.into(), to.into(), 58, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    out.extend([0x60, 0, 0, 0]);
    out.extend((icmp.len() as u16).to_be_bytes());
    out.extend([58, 64]);
    out.extend(router.octets());
    out.extend(to.octets());
    out.extend(icmp);
    out
}

/// (outer source, outer destination, quoted tuple) of an ICMPv6 error frame, after
/// checking its checksum (over the message and the outer addresses).
fn icmp6_checked(frame: &[u8]) -> (IpAddr, IpAddr, (IpAddr, u16, IpAddr, u16)) {
    let v6 = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
    let (src, dst) = (v6(&frame[22..38]), v6(&frame[38..54]));
    let icmp = &frame[54..];
    assert_eq!(l4_sum(src, dst, 58, icmp), 0, "ICMPv6 checksum");
    let quoted = &icmp[8..];
    let port = |at: usize| u16::from_be_bytes([quoted[at], quoted[at + 1]]);
    (
        src,
        dst,
        (v6(&quoted[8..24]), port(40), v6(&quoted[24..40]), port(42)),
    )
}

fn node_port(ip: IpAddr, backend: IpAddr, source_ranges: &[&str]) -> Frontend {
    Frontend {
        key: FrontendKey {
            ip,
            port: NODE_PORT,
            protocol: Protocol::Tcp,
            scope: Scope::External,
        },
        service: ObjectRef::new("web", "shop"),
        port_name: String::new(),
        kind: FrontendKind::NodePort,
        backends: vec![BackendAddr {
            ip: backend,
            port: 6379,
        }],
        local: Default::default(),
        excluded: Vec::new(),
        affinity_timeout: None,
        created: None,
        local_policy: false,
        topology: crate::model::endpoints::Topology::Any,
        source_ranges: source_ranges
            .iter()
            .map(|c| crate::model::spec::Cidr::parse(c).unwrap())
            .collect(),
    }
}

/// Tracks a node-port flow from CLIENT4:40100 to a local backend (a LB_CT entry pair
/// as the ingress program writes it for `externalTrafficPolicy: Local`), and checks
/// the pod's answer is translated on egress.
fn loaded_local_flow(datapath: &Datapath, maps: &KernelMaps) -> (IpAddr, u16) {
    use lb_common::{CT_F_LOCAL_BACKEND, CT_FORWARD, CT_REPLY, CtKey, CtValue, addr_from_ip};
    let (client, node, pod) = (
        addr_from_ip(CLIENT4.into()),
        addr_from_ip(NODE4.into()),
        addr_from_ip(POD4.into()),
    );
    let (cport, nport, pport) = (40100u16.to_be(), NODE_PORT.to_be(), 6379u16.to_be());
    let entries = [
        (
            CtKey {
                src: client,
                dst: node,
                sport: cport,
                dport: nport,
                proto: 6,
                dir: CT_FORWARD,
                _pad: 0,
            },
            CtValue {
                src: client,
                dst: pod,
                sport: cport,
                dport: pport,
                svc_id: 1,
                backend_id: 1,
                flags: CT_F_LOCAL_BACKEND,
                last_seen_ns: 0,
            },
        ),
        (
            CtKey {
                src: pod,
                dst: client,
                sport: pport,
                dport: cport,
                proto: 6,
                dir: CT_REPLY,
                _pad: 0,
            },
            CtValue {
                src: node,
                dst: client,
                sport: nport,
                dport: cport,
                svc_id: 1,
                backend_id: 1,
                flags: CT_F_LOCAL_BACKEND,
                last_seen_ns: 0,
            },
        ),
    ];
    for (key, value) in &entries {
        super::batch::update_one(maps.ct_fd(), key, value).unwrap();
    }
    let answer = frame((POD4.into(), 6379), (CLIENT4.into(), 40100), Some(0x12), 0);
    let (_, out) = datapath.test_run_tc("lb_tc_egress", &answer).unwrap();
    assert_eq!(
        tuple_checked(&out),
        (NODE4.into(), NODE_PORT, CLIENT4.into(), 40100)
    );
    (NODE4.into(), NODE_PORT)
}

/// Runs `body` on a loaded datapath, then removes the datapath's pins, also when
/// `body` panics (tests run in parallel, each on its own pin directory).
fn removed_after(
    datapath: Datapath,
    mut maps: KernelMaps,
    body: impl FnOnce(&Datapath, &mut KernelMaps),
) {
    let pin_dir = datapath.options.pin_dir.clone();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&datapath, &mut maps)));
    drop(maps);
    drop(datapath);
    let _ = super::cleanup(&pin_dir, None);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn loaded() -> (Datapath, KernelMaps) {
    loaded_with(Default::default())
}

fn loaded_with(snat_ports: super::uplink::SnatPorts) -> (Datapath, KernelMaps) {
    loaded_with_capacities(snat_ports, Default::default())
}

fn loaded_with_capacities(
    snat_ports: super::uplink::SnatPorts,
    capacities: super::pins::Capacities,
) -> (Datapath, KernelMaps) {
    // One datapath per test: tests run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/lb-tc-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut datapath = Datapath::load(DatapathOptions {
        cgroup: super::cgroup2_root().unwrap(),
        pin_dir,
        capacities,
        devices: Some(Vec::new()),
        netns: None,
        maglev_size: 251,
        tc_attach: Default::default(),
        tc_retry: super::TC_RETRY,
        snat_ports,
    })
    .expect("loading the datapath");
    let mut maps = datapath.take_maps().unwrap();
    maps.set_node_addrs(
        Some(lb_common::addr_from_ip(NODE4.into())),
        Some(lb_common::addr_from_ip(NODE6.into())),
    )
    .unwrap();
    let mut reconciler = Reconciler::default().with_maglev_size(251);
    let no_endpoints = Frontend {
        key: FrontendKey {
            port: NODE_PORT + 1,
            ..node_port(NODE4.into(), POD4.into(), &[]).key
        },
        backends: Vec::new(),
        ..node_port(NODE4.into(), POD4.into(), &[])
    };
    // externalTrafficPolicy: Local, and the endpoints run on other nodes (the model
    // serves local ones only).
    let no_local_endpoint = Frontend {
        key: FrontendKey {
            port: NODE_PORT + 2,
            ..node_port(NODE4.into(), POD4.into(), &[]).key
        },
        backends: Vec::new(),
        local_policy: true,
        ..node_port(NODE4.into(), POD4.into(), &[])
    };
    // External IPs of a Service without endpoints.
    let unserved_ip = |ip: IpAddr| Frontend {
        key: FrontendKey {
            ip,
            port: 80,
            ..node_port(ip, POD4.into(), &[]).key
        },
        kind: FrontendKind::ExternalIp,
        backends: Vec::new(),
        ..node_port(ip, POD4.into(), &[])
    };
    // ClusterIPs, as packet-mode pods reach them: with one endpoint, and without.
    let cluster_ip = |vip: IpAddr, port: u16, backend: Option<IpAddr>| Frontend {
        key: FrontendKey {
            ip: vip,
            port,
            protocol: Protocol::Tcp,
            scope: Scope::Internal,
        },
        kind: FrontendKind::ClusterIp,
        backends: backend
            .map(|ip| BackendAddr { ip, port: 6379 })
            .into_iter()
            .collect(),
        ..node_port(vip, POD4.into(), &[])
    };
    let changes: BTreeMap<_, _> = [
        cluster_ip(VIP4.into(), 6379, Some(POD4.into())),
        cluster_ip(VIP4.into(), 6380, None),
        cluster_ip(VIP6.into(), 6379, Some(POD6.into())),
        node_port(NODE4.into(), POD4.into(), &[]),
        node_port(NODE6.into(), POD6.into(), &[]),
        no_endpoints,
        no_local_endpoint,
        unserved_ip(EXTERNAL4.into()),
        unserved_ip(EXTERNAL6.into()),
        // A "load-balancer IP" that admits 192.0.2.0/24 only.
        node_port(
            Ipv4Addr::new(10, 111, 9, 1).into(),
            POD4.into(),
            &["192.0.2.0/24"],
        ),
    ]
    .into_iter()
    .map(|f| (f.key, Some(Arc::new(f))))
    .collect();
    reconciler.apply(&mut maps, &changes).unwrap();
    maps.put_source_ranges(&[]).unwrap();
    (datapath, maps)
}

#[test]
#[ignore = "needs root (loads the datapath); cargo xtask test runs it with --include-ignored"]
fn tc_programs_translate_crafted_packets() {
    let (datapath, maps) = loaded();
    removed_after(datapath, maps, |datapath, maps| {
        for (node, client, pod) in [
            (
                IpAddr::from(NODE4),
                IpAddr::from(CLIENT4),
                IpAddr::from(POD4),
            ),
            (NODE6.into(), CLIENT6.into(), POD6.into()),
        ] {
            // A SYN to the node port: DNAT to the pod, SNAT to the node (the backend is
            // not local), checksums right.
            let syn = frame((client, 40000), (node, NODE_PORT), Some(0x02), 0);
            let (verdict, out) = datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
            let out_syn = out.clone();
            assert_eq!(
                verdict, TC_ACT_OK,
                "{node}: routed by the stack in a test run"
            );
            let (src, sport, dst, dport) = tuple_checked(&out);
            assert_eq!((dst, dport), (pod, 6379), "{node}: DNAT");
            assert_eq!(src, node, "{node}: SNAT to the node");
            assert!(sport >= 61000, "{node}: SNAT port {sport}");

            // The pod's answer comes back to the node: translated back exactly.
            let answer = frame((pod, 6379), (node, sport), Some(0x12), 0);
            let (verdict, out) = datapath.test_run_tc("lb_tc_ingress", &answer).unwrap();
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(
                tuple_checked(&out),
                (node, NODE_PORT, client, 40000),
                "{node}: reply"
            );

            // A router on the way to the pod says the SYN was too big: the client gets
            // the error, about the packet it sent.
            if let IpAddr::V6(node6) = node {
                let router = Ipv6Addr::new(0xfd00, 0x253, 9, 0, 0, 0, 0, 1);
                let error = icmp6_too_big(router, node6, &out_syn[14..]);
                let (_, out) = datapath.test_run_tc("lb_tc_ingress", &error).unwrap();
                let (outer_src, outer_dst, quoted) = icmp6_checked(&out);
                assert_eq!((outer_src, outer_dst), (router.into(), client));
                assert_eq!(
                    quoted,
                    (client, 40000, node, NODE_PORT),
                    "the quoted IPv6 packet"
                );
            }
            if let IpAddr::V4(node4) = node {
                let router = Ipv4Addr::new(10, 253, 9, 1);
                let error = icmp_frag_needed(router, node4, &out_syn[14..]);
                let (_, out) = datapath.test_run_tc("lb_tc_ingress", &error).unwrap();
                let (outer_src, outer_dst, quoted) = icmp_checked(&out);
                assert_eq!((outer_src, outer_dst), (router, CLIENT4));
                assert_eq!(
                    quoted,
                    (client, 40000, node, NODE_PORT),
                    "the quoted packet"
                );
            }

            // The next segment of the flow goes the same way, through the tracked entry.
            let ack = frame((client, 40000), (node, NODE_PORT), Some(0x10), 0);
            let (_, out) = datapath.test_run_tc("lb_tc_ingress", &ack).unwrap();
            assert_eq!(
                tuple_checked(&out),
                (node, sport, pod, 6379),
                "{node}: tracked"
            );
        }
        // A mid-flow segment nothing tracks (expired, evicted or forged): never
        // tracked, counted, and left untouched to the node's stack, which resets it.
        let misses = maps.stat(stat::TC_CT_MISS_NON_SYN);
        let tracked_before = maps.ct_entries().unwrap().len();
        let ack = frame(
            (CLIENT4.into(), 40001),
            (NODE4.into(), NODE_PORT),
            Some(0x10),
            0,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &ack).unwrap(),
            (TC_ACT_OK, ack)
        );
        assert_eq!(maps.stat(stat::TC_CT_MISS_NON_SYN), misses + 1);
        assert_eq!(maps.ct_entries().unwrap().len(), tracked_before);

        // UDP: translated with its checksum.
        let udp = frame((CLIENT4.into(), 5353), (NODE4.into(), NODE_PORT), None, 0);
        let (verdict, out) = datapath.test_run_tc("lb_tc_ingress", &udp).unwrap();
        // No UDP frontend on this port: untouched.
        assert_eq!((verdict, out), (TC_ACT_OK, udp));

        // The first fragment of a datagram for the node port is dropped and counted;
        // anything else passes untouched.
        let fragments = maps.stat(stat::TC_FRAGMENT);
        let first = frame(
            (CLIENT4.into(), 40002),
            (NODE4.into(), NODE_PORT),
            Some(0x02),
            0x2000,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &first).unwrap().0,
            TC_ACT_SHOT
        );
        let other = frame(
            (CLIENT4.into(), 40002),
            (NODE4.into(), 22),
            Some(0x02),
            0x2000,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &other).unwrap(),
            (TC_ACT_OK, other)
        );
        assert_eq!(maps.stat(stat::TC_FRAGMENT), fragments + 2);

        // Source ranges: the client is outside 192.0.2.0/24.
        let drops = maps.stat(stat::TC_POLICY_DROP);
        let lb = frame(
            (CLIENT4.into(), 40003),
            (Ipv4Addr::new(10, 111, 9, 1).into(), NODE_PORT),
            Some(0x02),
            0,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &lb).unwrap().0,
            TC_ACT_SHOT
        );
        assert_eq!(maps.stat(stat::TC_POLICY_DROP), drops + 1);
        let allowed = frame(
            ("192.0.2.7".parse().unwrap(), 40003),
            (Ipv4Addr::new(10, 111, 9, 1).into(), NODE_PORT),
            Some(0x02),
            0,
        );
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &allowed).unwrap();
        assert_eq!(tuple_checked(&out).2, IpAddr::from(POD4));

        assert_eq!(maps.stat(stat::TC_ICMP_TRANSLATED), 2);

        // A node-port flow to a local pod, then the same client port straight to the
        // pod: the old flow's reply entry must not rewrite the new connection's replies.
        let local = loaded_local_flow(datapath, maps);
        let direct = frame((CLIENT4.into(), 40100), (POD4.into(), 6379), Some(0x02), 0);
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &direct).unwrap(),
            (TC_ACT_OK, direct)
        );
        let answer = frame((POD4.into(), 6379), (CLIENT4.into(), 40100), Some(0x12), 0);
        assert_eq!(
            datapath.test_run_tc("lb_tc_egress", &answer).unwrap(),
            (TC_ACT_OK, answer),
            "a direct connection's reply was rewritten by {local:?}"
        );
        assert_eq!(maps.stat(stat::TC_CT_STALE_REMOVED), 1);

        // Egress: a local pod's answer leaving the node (no SNAT) is translated back.
        let not_tracked = frame((POD4.into(), 6379), (CLIENT4.into(), 40009), Some(0x12), 0);
        assert_eq!(
            datapath.test_run_tc("lb_tc_egress", &not_tracked).unwrap(),
            (TC_ACT_OK, not_tracked)
        );
    });
}

/// `frame` with `options` (a multiple of 4 bytes) after its IPv4 header: IHL, total
/// length and header checksum fixed up.
fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    let mut out = frame[..34].to_vec();
    out.extend(options);
    out.extend(&frame[34..]);
    let header = 20 + options.len();
    out[14] = 0x40 | (header / 4) as u8;
    let total = (out.len() - 14) as u16;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let csum = fold(sum16(&out[14..14 + header], 0));
    out[24..26].copy_from_slice(&csum.to_be_bytes());
    out
}

#[test]
#[ignore = "needs root (loads the datapath); cargo xtask test runs it with --include-ignored"]
fn tc_programs_track_tcp_state_and_refuse_what_they_cannot_serve() {
    use lb_common::{CT_F_FIN, CT_F_REPLIED, CT_F_RST, CT_F_STATEFUL, CT_FORWARD, CT_REPLY};
    // `--snat-ports 20000-21023`.
    let (datapath, maps) = loaded_with(super::uplink::SnatPorts {
        first: 20000,
        last: 21023,
    });
    removed_after(datapath, maps, |datapath, maps| {
        let flags = |dir: u8, port: u16| -> u32 {
            maps.ct_entries()
                .unwrap()
                .into_iter()
                .find(|(k, _)| {
                    k.dir == dir
                        && (if dir == CT_FORWARD { k.sport } else { k.dport }) == port.to_be()
                })
                .map(|(_, v)| v.flags)
                .unwrap_or_else(|| panic!("no entry for port {port}, direction {dir}"))
        };
        // SYN: tracked, both entries marked as recording state, nothing seen yet.
        let client = (IpAddr::from(CLIENT4), 41000);
        let syn = frame(client, (NODE4.into(), NODE_PORT), Some(0x02), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
        let (_, snat_port, _, _) = tuple_checked(&out);
        assert!(
            (20000..=21023).contains(&snat_port),
            "SNAT port {snat_port}"
        );
        assert_eq!(
            flags(CT_FORWARD, 41000) & (CT_F_STATEFUL | CT_F_REPLIED),
            CT_F_STATEFUL
        );
        assert_eq!(flags(CT_REPLY, snat_port) & CT_F_REPLIED, 0);
        // The pod answers: the reply entry says so.
        let answer = frame(
            (POD4.into(), 6379),
            (NODE4.into(), snat_port),
            Some(0x12),
            0,
        );
        datapath.test_run_tc("lb_tc_ingress", &answer).unwrap();
        assert_ne!(flags(CT_REPLY, snat_port) & CT_F_REPLIED, 0);
        // The client closes (FIN|ACK), the pod resets.
        let fin = frame(client, (NODE4.into(), NODE_PORT), Some(0x11), 0);
        datapath.test_run_tc("lb_tc_ingress", &fin).unwrap();
        assert_ne!(flags(CT_FORWARD, 41000) & CT_F_FIN, 0);
        assert_eq!(flags(CT_FORWARD, 41000) & CT_F_RST, 0);
        let rst = frame(
            (POD4.into(), 6379),
            (NODE4.into(), snat_port),
            Some(0x04),
            0,
        );
        datapath.test_run_tc("lb_tc_ingress", &rst).unwrap();
        assert_ne!(flags(CT_REPLY, snat_port) & CT_F_RST, 0);
        // A new SYN from the same port starts the flow afresh, state cleared.
        datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
        assert_eq!(flags(CT_FORWARD, 41000) & (CT_F_FIN | CT_F_RST), 0);

        // IPv4 options move the TCP header: still translated, checksums right.
        let optioned = with_ip_options(
            &frame(
                (CLIENT4.into(), 41001),
                (NODE4.into(), NODE_PORT),
                Some(0x02),
                0,
            ),
            &[1, 1, 1, 0],
        );
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &optioned).unwrap();
        assert_eq!(fold(sum16(&out[14..38], 0)), 0, "IPv4 header checksum");
        let l4 = &out[38..];
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap());
        assert_eq!(dst, POD4);
        assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 6379);
        let src = Ipv4Addr::from(<[u8; 4]>::try_from(&out[26..30]).unwrap());
        assert_eq!(l4_sum(src.into(), dst.into(), 6, l4), 0, "TCP checksum");

        // A header length under 20 bytes, or another version: dropped and counted.
        let malformed = maps.stat(stat::TC_MALFORMED);
        for first_byte in [0x44, 0x40, 0x65] {
            let mut bad = frame(
                (CLIENT4.into(), 41002),
                (NODE4.into(), NODE_PORT),
                Some(0x02),
                0,
            );
            bad[14] = first_byte;
            assert_eq!(
                datapath.test_run_tc("lb_tc_ingress", &bad).unwrap().0,
                TC_ACT_SHOT,
                "first byte {first_byte:#x}"
            );
        }
        assert_eq!(maps.stat(stat::TC_MALFORMED), malformed + 3);

        // A node port without endpoints: left to the stack, which refuses it; without
        // a local endpoint under the Local policy: dropped, as kube-proxy does.
        let no_backend = maps.stat(stat::TC_NO_BACKEND);
        let refused = frame(
            (CLIENT4.into(), 41003),
            (NODE4.into(), NODE_PORT + 1),
            Some(0x02),
            0,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &refused).unwrap(),
            (TC_ACT_OK, refused)
        );
        let dropped = frame(
            (CLIENT4.into(), 41004),
            (NODE4.into(), NODE_PORT + 2),
            Some(0x02),
            0,
        );
        assert_eq!(
            datapath.test_run_tc("lb_tc_ingress", &dropped).unwrap().0,
            TC_ACT_SHOT
        );
        assert_eq!(maps.stat(stat::TC_NO_BACKEND), no_backend + 2);

        // An external IP without endpoints answers a SYN with port unreachable, from
        // itself, quoting the SYN, sent back out (kube-proxy's REJECT); a segment
        // other than a SYN is dropped.
        for (external, client) in [
            (IpAddr::from(EXTERNAL4), IpAddr::from(CLIENT4)),
            (EXTERNAL6.into(), CLIENT6.into()),
        ] {
            let syn = frame((client, 41005), (external, 80), Some(0x02), 0);
            let (verdict, out) = datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
            assert_eq!(verdict, TC_ACT_REDIRECT, "{external}");
            assert_eq!(&out[..6], &syn[6..12], "back to the sender's MAC");
            let (outer_src, outer_dst, quoted) = if external.is_ipv4() {
                assert_eq!(out.len(), 14 + 20 + 8 + 28);
                assert_eq!((out[34], out[35]), (3, 3), "ICMP port unreachable");
                let (s, d, q) = icmp_checked(&out);
                (IpAddr::from(s), IpAddr::from(d), q)
            } else {
                assert_eq!(out.len(), 14 + 40 + 8 + 48);
                assert_eq!((out[54], out[55]), (1, 4), "ICMPv6 port unreachable");
                icmp6_checked(&out)
            };
            assert_eq!((outer_src, outer_dst), (external, client));
            assert_eq!(quoted, (client, 41005, external, 80), "the quoted SYN");
            let ack = frame((client, 41005), (external, 80), Some(0x10), 0);
            assert_eq!(
                datapath.test_run_tc("lb_tc_ingress", &ack).unwrap().0,
                TC_ACT_SHOT
            );
        }
    });
}

#[test]
#[ignore = "needs root (loads the datapath); cargo xtask test runs it with --include-ignored"]
fn tc_programs_keep_answered_flows_from_floods_of_new_ones() {
    use lb_common::{CT_FORWARD, CT_REPLY};
    // 64 flows: 128 entries in each table.
    let (datapath, maps) = loaded_with_capacities(
        Default::default(),
        super::pins::Capacities {
            flows: 64,
            ..Default::default()
        },
    );
    removed_after(datapath, maps, |datapath, maps| {
        let node_port = (IpAddr::from(NODE4), NODE_PORT);
        // A handshake from `port`: returns the flow's SNAT port.
        let handshake = |port: u16| -> u16 {
            let client = (IpAddr::from(CLIENT4), port);
            let syn = frame(client, node_port, Some(0x02), 0);
            let (_, out) = datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
            let (_, snat_port, _, _) = tuple_checked(&out);
            let syn_ack = frame(
                (POD4.into(), 6379),
                (NODE4.into(), snat_port),
                Some(0x12),
                0,
            );
            datapath.test_run_tc("lb_tc_ingress", &syn_ack).unwrap();
            let ack = frame(client, node_port, Some(0x10), 0);
            datapath.test_run_tc("lb_tc_ingress", &ack).unwrap();
            snat_port
        };
        let established = |port: u16| {
            maps.ct_established_keys()
                .iter()
                .any(|k| k.dir == CT_FORWARD && k.sport == port.to_be())
        };

        // Answered and acknowledged: both entries move to the established table. A
        // SYN and its answer alone do not move a flow (a spoofed client never sends
        // the last ACK).
        let client = (IpAddr::from(CLIENT4), 42000);
        let syn = frame(client, node_port, Some(0x02), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &syn).unwrap();
        let (_, snat_port, _, _) = tuple_checked(&out);
        let syn_ack = frame(
            (POD4.into(), 6379),
            (NODE4.into(), snat_port),
            Some(0x12),
            0,
        );
        datapath.test_run_tc("lb_tc_ingress", &syn_ack).unwrap();
        assert!(maps.ct_established_keys().is_empty());
        let ack = frame(client, node_port, Some(0x10), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &ack).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (NODE4.into(), snat_port, POD4.into(), 6379)
        );
        assert_eq!(maps.ct_established_keys().len(), 2);
        assert_eq!(maps.stat(stat::TC_CT_ESTABLISHED), 1);

        // 1 000 spoofed SYNs, eight times the table of new flows: the established
        // flow still translates both ways.
        for port in 50000..51000 {
            let spoofed = frame((CLIENT4.into(), port), node_port, Some(0x02), 0);
            datapath.test_run_tc("lb_tc_ingress", &spoofed).unwrap();
        }
        let data = frame(client, node_port, Some(0x18), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &data).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (NODE4.into(), snat_port, POD4.into(), 6379)
        );
        let answer = frame(
            (POD4.into(), 6379),
            (NODE4.into(), snat_port),
            Some(0x18),
            0,
        );
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &answer).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (NODE4.into(), NODE_PORT, CLIENT4.into(), 42000)
        );

        // Completed handshakes beyond the established table's room: counted, and
        // still served from the table of new flows.
        for port in 43000..43080 {
            handshake(port);
        }
        assert_eq!(maps.ct_established_keys().len(), 128);
        assert!(maps.stat(stat::TC_CT_ESTABLISHED_FULL) > 0);
        let late = frame((CLIENT4.into(), 43079), node_port, Some(0x18), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &late).unwrap();
        assert_eq!(tuple_checked(&out).2, IpAddr::from(POD4));
        assert!(established(42000));

        // The client closes: still established until the pod closes too; then the
        // flow goes back to the table of new flows, and its last ACK does not move
        // it again.
        let fin = frame(client, node_port, Some(0x11), 0);
        datapath.test_run_tc("lb_tc_ingress", &fin).unwrap();
        assert!(established(42000));
        let pod_fin = frame(
            (POD4.into(), 6379),
            (NODE4.into(), snat_port),
            Some(0x11),
            0,
        );
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &pod_fin).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (NODE4.into(), NODE_PORT, CLIENT4.into(), 42000)
        );
        assert!(!established(42000));
        let last_ack = frame(client, node_port, Some(0x10), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_ingress", &last_ack).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (NODE4.into(), snat_port, POD4.into(), 6379)
        );
        assert!(!established(42000));
        let reply_tracked = maps
            .ct_entries()
            .unwrap()
            .iter()
            .any(|(k, _)| k.dir == CT_REPLY && k.dport == snat_port.to_be());
        assert!(reply_tracked, "the closing flow's reply entry");
        // A reset ends an established flow at once.
        let reset_port = 43000;
        assert!(established(reset_port));
        let rst = frame((CLIENT4.into(), reset_port), node_port, Some(0x04), 0);
        datapath.test_run_tc("lb_tc_ingress", &rst).unwrap();
        assert!(!established(reset_port));
    });
}

/// Maglev tables go in through a shared mapping and one batched install: read back
/// entry by entry, each holds what was written (an array's elements are 8 bytes
/// apart), tables of other sizes and replacements included, and a batched delete
/// removes them.
#[test]
#[ignore = "needs root (loads the datapath); cargo xtask test runs it with --include-ignored"]
fn tc_programs_maglev_tables_read_back_as_written() {
    let (datapath, maps) = loaded();
    removed_after(datapath, maps, |_, maps| {
        let table_a: Vec<u32> = (0..251).map(|i| 1000 + i * 7).collect();
        let table_b: Vec<u32> = (0..13).map(|i| u32::MAX - i).collect();
        maps.put_maglev(&[(7, table_a.clone()), (8, table_b.clone())])
            .expect("installing two tables");
        assert_eq!(maps.maglev_table(7, 251).unwrap(), Some(table_a));
        assert_eq!(maps.maglev_table(8, 13).unwrap(), Some(table_b));
        let replaced: Vec<u32> = (0..251).rev().collect();
        maps.put_maglev(&[(7, replaced.clone())])
            .expect("replacing a table");
        assert_eq!(maps.maglev_table(7, 251).unwrap(), Some(replaced));
        maps.delete_maglev(&[7, 8, 9])
            .expect("deleting, one of them unknown");
        assert_eq!(maps.maglev_table(7, 251).unwrap(), None);
        assert_eq!(maps.maglev_table(8, 13).unwrap(), None);
        // More tables than one install group.
        let many: Vec<(u32, Vec<u32>)> = (100..400).map(|id| (id, vec![id; 7])).collect();
        maps.put_maglev(&many).expect("installing 300 tables");
        for id in [100, 355, 399] {
            assert_eq!(maps.maglev_table(id, 7).unwrap(), Some(vec![id; 7]));
        }
        let ids: Vec<u32> = (100..400).collect();
        maps.delete_maglev(&ids).expect("deleting 300 tables");
        assert_eq!(maps.maglev_table(399, 7).unwrap(), None);
    });
}

#[test]
#[ignore = "needs root (loads the datapath); cargo xtask test runs it with --include-ignored"]
fn tc_programs_balance_packet_mode_pods() {
    let (datapath, maps) = loaded();
    removed_after(datapath, maps, |datapath, maps| {
        let (client, vip, pod, node) = (
            IpAddr::from(CLIENT_POD4),
            IpAddr::from(VIP4),
            IpAddr::from(POD4),
            IpAddr::from(NODE4),
        );
        let syn = frame((client, 40000), (vip, 6379), Some(0x02), 0);
        // Not a packet-mode pod's interface: left alone.
        let (verdict, out) = datapath.test_run_tc("lb_tc_pod_ingress", &syn).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, syn, "translated on an interface not in packet mode");

        maps.set_pod_interface(TEST_RUN_IFINDEX, true).unwrap();
        let (verdict, out) = datapath.test_run_tc("lb_tc_pod_ingress", &syn).unwrap();
        assert_eq!(verdict, TC_ACT_OK, "routed by the stack in a test run");
        assert_eq!(
            tuple_checked(&out),
            (client, 40000, pod, 6379),
            "DNAT to the pod, the pod's own address kept"
        );
        // The pod's answer, on its way to the client pod: from the ClusterIP.
        let answer = frame((pod, 6379), (client, 40000), Some(0x12), 0);
        let (verdict, out) = datapath.test_run_tc("lb_tc_egress", &answer).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(tuple_checked(&out), (vip, 6379, client, 40000), "reply");
        // The rest of the flow follows it.
        let ack = frame((client, 40000), (vip, 6379), Some(0x10), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_pod_ingress", &ack).unwrap();
        assert_eq!(tuple_checked(&out), (client, 40000, pod, 6379));

        // The pod reaches itself through its Service: SNAT to the node, and back.
        let hairpin = frame((pod, 40001), (vip, 6379), Some(0x02), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_pod_ingress", &hairpin).unwrap();
        let (src, sport, dst, dport) = tuple_checked(&out);
        assert_eq!((src, dst, dport), (node, pod, 6379), "hairpin SNAT");
        let answer = frame((pod, 6379), (node, sport), Some(0x12), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_pod_ingress", &answer).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (vip, 6379, pod, 40001),
            "hairpin reply"
        );

        // No endpoints: refused with a port unreachable from the ClusterIP.
        let empty = frame((client, 40002), (vip, 6380), Some(0x02), 0);
        let (verdict, out) = datapath.test_run_tc("lb_tc_pod_ingress", &empty).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
        let (outer_src, outer_dst, quoted) = icmp_checked(&out);
        assert_eq!((outer_src, outer_dst), (VIP4, CLIENT_POD4));
        assert_eq!(quoted, (client, 40002, vip, 6380));

        // IPv6: the same translation, both ways, checksums right.
        let (client6, vip6, pod6) = (
            IpAddr::from(CLIENT_POD6),
            IpAddr::from(VIP6),
            IpAddr::from(POD6),
        );
        let syn6 = frame((client6, 40000), (vip6, 6379), Some(0x02), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_pod_ingress", &syn6).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (client6, 40000, pod6, 6379),
            "IPv6 DNAT"
        );
        let answer6 = frame((pod6, 6379), (client6, 40000), Some(0x12), 0);
        let (_, out) = datapath.test_run_tc("lb_tc_egress", &answer6).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (vip6, 6379, client6, 40000),
            "IPv6 reply"
        );

        // Out of packet mode: its tracked flow goes on, a new one is not started.
        maps.set_pod_interface(TEST_RUN_IFINDEX, false).unwrap();
        let (_, out) = datapath.test_run_tc("lb_tc_pod_ingress", &ack).unwrap();
        assert_eq!(
            tuple_checked(&out),
            (client, 40000, pod, 6379),
            "tracked flow"
        );
        let new = frame((client, 40003), (vip, 6379), Some(0x02), 0);
        let (verdict, out) = datapath.test_run_tc("lb_tc_pod_ingress", &new).unwrap();
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, new),
            "a new flow after packet mode"
        );
    });
}
