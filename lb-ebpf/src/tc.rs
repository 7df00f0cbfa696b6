//! The TC programs: node ports, external IPs and load-balancer IPs for packets from
//! other machines, which never pass through the socket hooks.
//!
//! Ingress (`lb_tc_ingress`, on the node's external interfaces):
//! 1. a reply of a tracked flow (its `CT_REPLY` entry) is translated back to the
//!    frontend and routed to the client;
//! 2. a packet to an external-scope frontend belongs to a tracked flow (`CT_FORWARD`)
//!    or starts one: `loadBalancerSourceRanges` is checked, a backend is chosen
//!    (Maglev), the source is replaced by the node's address when the backend runs on
//!    another node and the policy is Cluster (so the reply comes back here), both
//!    directions are tracked, and the packet is rewritten and routed to the backend.
//!
//! Egress (`lb_tc_egress`): replies from backends on this node leave through the
//! external interface; their `CT_REPLY` entry turns the pod's address back into the
//! frontend's.
//!
//! Packet-mode pods (`LB_POD_INTERFACES`): `lb_tc_pod_ingress` on the host side of the
//! pod's interface runs the same ingress path on internal-scope frontends (what the
//! pod sends to a ClusterIP), and `lb_tc_egress` there translates the replies.
//!
//! Checksums are updated incrementally (IPv4 header, TCP/UDP with the pseudo header).
//! Translated ingress packets are routed with `bpf_fib_lookup` and redirected rather
//! than handed to the stack, which would drop a packet whose source is one of its own
//! addresses (after SNAT, or a reply translated back to the node port).

// References, not copies, of the 40- and 56-byte keys and values: the BPF stack is 512
// bytes for the whole call chain.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams, bpf_redir_neigh},
    helpers::generated::{
        bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use lb_common::{
    AFFINITY_CLIENT_IP, Addr, AffinityKey, BACKEND_F_LOCAL, CT_F_FIN, CT_F_LOCAL_BACKEND,
    CT_F_REPLIED, CT_F_RST, CT_F_SNAT, CT_F_STATEFUL, CT_FORWARD, CT_REPLY, CtKey, CtValue,
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_LOCAL, SVC_F_NODE_PORT,
    SVC_F_SOURCE_RANGES, ServiceKey, addr_from_v4_raw, stat,
};

use crate::{
    maps::{
        LB_BACKENDS, LB_CT, LB_CT_EST, LB_NODE_ADDRS, LB_POD_INTERFACES, LB_SOURCE_RANGES, count,
        count_backend, count_frontend,
    },
    select::{Selection, flow_hash, frontend, select_backend, select_external},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const NEXTHDR_FRAGMENT: u8 = 44;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
/// SNAT source ports (`--snat-ports`, set by the loader; the daemon checks they are
/// outside the node's ephemeral range): the first, and how many.
#[unsafe(no_mangle)]
static LB_CONFIG_SNAT_PORT_MIN: u32 = lb_common::DEFAULT_SNAT_PORT_MIN as u32;
#[unsafe(no_mangle)]
static LB_CONFIG_SNAT_PORTS: u32 = 65536 - lb_common::DEFAULT_SNAT_PORT_MIN as u32;
const SNAT_ATTEMPTS: u32 = 8;
/// A tracked flow's last-seen time is refreshed at most this often.
const REFRESH_NS: u64 = 1_000_000_000;

/// The tuple of one TCP/UDP packet. Every field is always initialized (the verifier
/// rejects copies of uninitialized bytes).
#[derive(Clone, Copy, Default)]
pub struct Packet {
    v6: bool,
    /// Offset of the TCP/UDP header.
    l4: usize,
    proto: u8,
    tcp_flags: u8,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
}

impl Packet {
    #[inline(always)]
    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn csum_offset(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    /// The frontend entry key of the packet's destination: external scope for
    /// packets from other machines, internal for a packet-mode pod's (it sees the
    /// Services as the socket hooks' clients do).
    #[inline(always)]
    fn frontend_key(&self, from_pod: bool) -> ServiceKey {
        let scope = if from_pod {
            SCOPE_INTERNAL
        } else {
            SCOPE_EXTERNAL
        };
        ServiceKey::new(self.dst, self.dport, self.proto, scope, 0)
    }

    /// `bpf_l4_csum_replace` flags: a zero UDP checksum (IPv4: "none") stays zero.
    #[inline(always)]
    fn l4_csum_flags(&self) -> u64 {
        if self.proto == IPPROTO_UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    fn is_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// A TCP/UDP packet, its tuple filled in.
    Packet,
    /// Not TCP/UDP over IPv4/IPv6: none of our business.
    Other,
    /// The first fragment of a TCP/UDP datagram (tuple filled in).
    FirstFragment,
    /// A later fragment (no ports), or a fragment of another protocol.
    Fragment,
    /// An unfragmented ICMPv4 message (its header at `l4`).
    Icmp,
    /// An ICMPv6 message right after the IPv6 header (its header at `l4`).
    Icmp6,
    /// An IPv4 header that is not one: version other than 4, or shorter than 20
    /// bytes (every offset after it would be wrong).
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

/// Reads the headers into `packet`.
#[inline(always)]
fn parse(ctx: &TcContext, packet: &mut Packet) -> Parsed {
    let Some(ether_type) = load::<u16>(ctx, 12) else {
        return Parsed::Other;
    };
    let ether_type = u16::from_be(ether_type);
    let (fragment, first) = if ether_type == ETH_P_IP {
        let (Some(version_ihl), Some(frag_off), Some(proto), Some(src), Some(dst)) = (
            load::<u8>(ctx, ETH_HLEN),
            load::<u16>(ctx, ETH_HLEN + 6),
            load::<u8>(ctx, ETH_HLEN + 9),
            load::<u32>(ctx, ETH_HLEN + 12),
            load::<u32>(ctx, ETH_HLEN + 16),
        ) else {
            return Parsed::Other;
        };
        if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
            return Parsed::Malformed;
        }
        let frag_off = u16::from_be(frag_off);
        packet.v6 = false;
        packet.l4 = ETH_HLEN + (version_ihl & 0x0f) as usize * 4;
        packet.proto = proto;
        packet.src = addr_from_v4_raw(src);
        packet.dst = addr_from_v4_raw(dst);
        // More fragments, or an offset: a fragment; offset 0 is the first one.
        (frag_off & 0x3fff != 0, frag_off & 0x1fff == 0)
    } else if ether_type == ETH_P_IPV6 {
        let (Some(next), Some(src), Some(dst)) = (
            load::<u8>(ctx, ETH_HLEN + 6),
            load::<Addr>(ctx, ETH_HLEN + 8),
            load::<Addr>(ctx, ETH_HLEN + 24),
        ) else {
            return Parsed::Other;
        };
        packet.v6 = true;
        packet.src = src;
        packet.dst = dst;
        if next == NEXTHDR_FRAGMENT {
            // The fragment header's next header and offset decide whether ports follow.
            let (Some(inner), Some(offset)) = (
                load::<u8>(ctx, ETH_HLEN + IPV6_HLEN),
                load::<u16>(ctx, ETH_HLEN + IPV6_HLEN + 2),
            ) else {
                return Parsed::Other;
            };
            packet.l4 = ETH_HLEN + IPV6_HLEN + 8;
            packet.proto = inner;
            (true, u16::from_be(offset) & 0xfff8 == 0)
        } else {
            packet.l4 = ETH_HLEN + IPV6_HLEN;
            packet.proto = next;
            (false, true)
        }
    } else {
        return Parsed::Other;
    };
    if packet.proto == IPPROTO_ICMP && !packet.v6 && !fragment {
        return Parsed::Icmp;
    }
    if packet.proto == IPPROTO_ICMPV6 && packet.v6 && !fragment {
        return Parsed::Icmp6;
    }
    if packet.proto != IPPROTO_TCP && packet.proto != IPPROTO_UDP {
        return if fragment {
            Parsed::Fragment
        } else {
            Parsed::Other
        };
    }
    if !first {
        return Parsed::Fragment;
    }
    let Some([sport, dport]) = load::<[u16; 2]>(ctx, packet.l4) else {
        return Parsed::Other;
    };
    packet.sport = sport;
    packet.dport = dport;
    if packet.proto == IPPROTO_TCP {
        packet.tcp_flags = load::<u8>(ctx, packet.l4 + 13).unwrap_or(0);
    }
    if fragment {
        Parsed::FirstFragment
    } else {
        Parsed::Packet
    }
}

/// Rewrites one address of `packet` (`source` or destination) to `new`, with the
/// IPv4 header and TCP/UDP checksums.
#[inline(always)]
fn rewrite_addr(ctx: &mut TcContext, packet: &Packet, source: bool, new: &Addr) -> Result<(), ()> {
    let old = if source { &packet.src } else { &packet.dst };
    if old == new {
        return Ok(());
    }
    let csum = packet.csum_offset();
    let l4_flags = packet.l4_csum_flags();
    if packet.v6 {
        let offset = if source { ETH_HLEN + 8 } else { ETH_HLEN + 24 };
        replace_addr16(ctx, offset, old, new, csum, BPF_F_PSEUDO_HDR | l4_flags)
    } else {
        let offset = if source { ETH_HLEN + 12 } else { ETH_HLEN + 16 };
        let (from, into) = (old[3] as u64, new[3] as u64);
        ctx.l4_csum_replace(csum, from, into, BPF_F_PSEUDO_HDR | 4 | l4_flags)
            .map_err(|_| ())?;
        ctx.l3_csum_replace(ETH_HLEN + 10, from, into, 4)
            .map_err(|_| ())?;
        ctx.store(offset, &new[3], 0).map_err(|_| ())
    }
}

/// Stores the 16-byte address `new` at `offset` in place of `old`, updating the
/// checksum at `csum` (`flags`: `BPF_F_PSEUDO_HDR` when the address is in its pseudo
/// header, i.e. the packet's own IPv6 header).
#[inline(always)]
fn replace_addr16(
    ctx: &mut TcContext,
    offset: usize,
    old: &Addr,
    new: &Addr,
    csum: usize,
    flags: u64,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (mut from, mut into) = (*old, *new);
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, into.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return Err(());
    }
    ctx.l4_csum_replace(csum, 0, diff as u64, flags)
        .map_err(|_| ())?;
    ctx.store(offset, new, 0).map_err(|_| ())
}

/// Rewrites one port of `packet` to `new` (network order), with the L4 checksum.
#[inline(always)]
fn rewrite_port(ctx: &mut TcContext, packet: &Packet, source: bool, new: u16) -> Result<(), ()> {
    let old = if source { packet.sport } else { packet.dport };
    if old == new {
        return Ok(());
    }
    let l4_flags = packet.l4_csum_flags();
    ctx.l4_csum_replace(packet.csum_offset(), old as u64, new as u64, 2 | l4_flags)
        .map_err(|_| ())?;
    let offset = if source { packet.l4 } else { packet.l4 + 2 };
    ctx.store(offset, &new, 0).map_err(|_| ())
}

/// Rewrites `packet`'s addresses and ports to `to`'s, updating checksums.
// Separate BPF functions (each with its own stack frame) keep every frame small.
#[inline(never)]
fn rewrite(ctx: &mut TcContext, packet: &Packet, to: &CtValue) -> i32 {
    let done = rewrite_addr(ctx, packet, true, &to.src)
        .and_then(|()| rewrite_addr(ctx, packet, false, &to.dst))
        .and_then(|()| rewrite_port(ctx, packet, true, to.sport))
        .and_then(|()| rewrite_port(ctx, packet, false, to.dport));
    if done.is_err() {
        count(stat::TC_REWRITE_FAILED);
        return -1;
    }
    0
}

/// Routes a translated ingress packet (now `src` -> `dst`) and redirects it to its
/// next hop; hands it to the stack when there is no route.
#[inline(never)]
fn route(ctx: &mut TcContext, packet: &Packet, to: &CtValue) -> i32 {
    let (v6, proto, src, dst) = (packet.v6, packet.proto, &to.src, &to.dst);
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = if v6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = proto;
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // tot_len stays 0: with it set, the helper checks that length against the MTU,
    // which a GRO-merged packet (tens of KB, segmented again on the way out) always
    // fails; without it, the kernel checks the skb itself, GSO aware.
    if v6 {
        fib.__bindgen_anon_3.ipv6_src = *src;
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    } else {
        fib.__bindgen_anon_3.ipv4_src = src[3];
        fib.__bindgen_anon_4.ipv4_dst = dst[3];
    }
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc != FIB_SUCCESS && rc != FIB_NO_NEIGH {
        count(stat::TC_FIB_MISS);
        return TC_ACT_OK;
    }
    if decrement_ttl(ctx, v6).is_err() {
        // Expired (or unreadable): the stack answers with time exceeded.
        return TC_ACT_OK;
    }
    if rc == FIB_SUCCESS {
        if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
            return TC_ACT_SHOT;
        }
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    // The next hop's MAC is unknown yet: let the kernel resolve it.
    let mut neigh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    if v6 {
        neigh.nh_family = AF_INET6 as u32;
        neigh.__bindgen_anon_1.ipv6_nh = unsafe { fib.__bindgen_anon_4.ipv6_dst };
    } else {
        neigh.nh_family = AF_INET as u32;
        neigh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    }
    unsafe {
        bpf_redirect_neigh(
            fib.ifindex,
            &mut neigh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }
    .try_into()
    .unwrap_or(TC_ACT_SHOT)
}

/// A router's duty before forwarding: TTL / hop limit down by one.
#[inline(always)]
fn decrement_ttl(ctx: &mut TcContext, v6: bool) -> Result<(), ()> {
    if v6 {
        let hop = load::<u8>(ctx, ETH_HLEN + 7).ok_or(())?;
        if hop <= 1 {
            return Err(());
        }
        ctx.store(ETH_HLEN + 7, &(hop - 1), 0).map_err(|_| ())
    } else {
        // TTL and protocol form one 16-bit word of the header checksum.
        let word = load::<u16>(ctx, ETH_HLEN + 8).ok_or(())?;
        let ttl = word.to_ne_bytes()[0];
        if ttl <= 1 {
            return Err(());
        }
        let new = u16::from_ne_bytes([ttl - 1, word.to_ne_bytes()[1]]);
        ctx.l3_csum_replace(ETH_HLEN + 10, word as u64, new as u64, 2)
            .map_err(|_| ())?;
        ctx.store(ETH_HLEN + 8, &new, 0).map_err(|_| ())
    }
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Translates `packet` by the tracked `entry` and routes it (ingress) or lets it go
/// (egress); `reply`: the entry is a reply's, counted as a reverse translation.
#[inline(always)]
fn translate_tracked(
    ctx: &mut TcContext,
    scratch: &mut Scratch,
    entry: *mut CtValue,
    ingress: bool,
    reply: bool,
    established: bool,
) -> i32 {
    count(stat::TC_CT_HIT);
    let t = now();
    // SAFETY: an LRU value, valid for this program run (RCU).
    let to = unsafe { &mut *entry };
    if t.saturating_sub(to.last_seen_ns) > REFRESH_NS {
        to.last_seen_ns = t;
    }
    // The flow's state, for the daemon's expiry: answered, closing, reset. Written
    // only when it changes (the entry is shared by every CPU the flow's packets hit).
    let mut state = to.flags;
    if reply {
        state |= CT_F_REPLIED;
    }
    if scratch.packet.proto == IPPROTO_TCP {
        if scratch.packet.tcp_flags & TCP_FLAG_FIN != 0 {
            state |= CT_F_FIN;
        }
        if scratch.packet.tcp_flags & TCP_FLAG_RST != 0 {
            state |= CT_F_RST;
        }
    }
    if state != to.flags {
        to.flags = state;
        if established && state & (CT_F_FIN | CT_F_RST) != 0 {
            finish_established(scratch, reply);
        }
    }
    let packet = &scratch.packet;
    if rewrite(ctx, packet, to) != 0 {
        return TC_ACT_SHOT;
    }
    if reply {
        count(stat::TC_REVERSE_TRANSLATED);
    }
    if ingress {
        route(ctx, packet, to)
    } else {
        TC_ACT_OK
    }
}

/// An ICMPv4 error (destination unreachable, e.g. "fragmentation needed", or time
/// exceeded) about a packet of a tracked flow: the quoted packet went out as the
/// reverse of the flow's replies, so it is translated like them, and the outer header
/// is addressed to the client (from the frontend when the error came from the backend
/// itself). The ICMP checksum is updated for every quoted change (it has no pseudo
/// header); the quoted TCP/UDP checksum is left as it was, as receivers ignore it.
#[inline(never)]
fn icmp_error(ctx: &mut TcContext, scratch: &mut Scratch, ingress: bool) -> i32 {
    let icmp = scratch.packet.l4;
    let Some(kind) = load::<u8>(ctx, icmp) else {
        return TC_ACT_OK;
    };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return TC_ACT_OK;
    }
    let quoted = icmp + 8;
    let (Some(version_ihl), Some(proto), Some(q_src), Some(q_dst)) = (
        load::<u8>(ctx, quoted),
        load::<u8>(ctx, quoted + 9),
        load::<u32>(ctx, quoted + 12),
        load::<u32>(ctx, quoted + 16),
    ) else {
        return TC_ACT_OK;
    };
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || version_ihl >> 4 != 4
        || version_ihl & 0x0f < 5
    {
        return TC_ACT_OK;
    }
    let quoted_l4 = quoted + (version_ihl & 0x0f) as usize * 4;
    let Some([q_sport, q_dport]) = load::<[u16; 2]>(ctx, quoted_l4) else {
        return TC_ACT_OK;
    };
    scratch.reply_key = CtKey {
        src: addr_from_v4_raw(q_dst),
        dst: addr_from_v4_raw(q_src),
        sport: q_dport,
        dport: q_sport,
        proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let Some(entry) = ct_get(&scratch.reply_key) else {
        return TC_ACT_OK;
    };
    scratch.reply_value = *entry;
    let to = &scratch.reply_value;
    let csum = icmp + 2;
    let done = (|| -> Result<(), ()> {
        for (offset, old, new) in [
            (quoted + 12, q_src, to.dst[3]),
            (quoted + 16, q_dst, to.src[3]),
        ] {
            if old == new {
                continue;
            }
            let before = load::<u16>(ctx, quoted + 10).ok_or(())?;
            ctx.l3_csum_replace(quoted + 10, old as u64, new as u64, 4)
                .map_err(|_| ())?;
            let after = load::<u16>(ctx, quoted + 10).ok_or(())?;
            ctx.l4_csum_replace(csum, before as u64, after as u64, 2)
                .map_err(|_| ())?;
            ctx.l4_csum_replace(csum, old as u64, new as u64, 4)
                .map_err(|_| ())?;
            ctx.store(offset, &new, 0).map_err(|_| ())?;
        }
        for (offset, old, new) in [
            (quoted_l4, q_sport, to.dport),
            (quoted_l4 + 2, q_dport, to.sport),
        ] {
            if old != new {
                ctx.l4_csum_replace(csum, old as u64, new as u64, 2)
                    .map_err(|_| ())?;
                ctx.store(offset, &new, 0).map_err(|_| ())?;
            }
        }
        // The outer header: to the client; from the frontend if the backend itself
        // complained.
        let outer_src = scratch.packet.src[3];
        let new_src = if outer_src == q_dst {
            to.src[3]
        } else {
            outer_src
        };
        for (offset, old, new) in [
            (ETH_HLEN + 12, outer_src, new_src),
            (ETH_HLEN + 16, scratch.packet.dst[3], to.dst[3]),
        ] {
            if old != new {
                ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 4)
                    .map_err(|_| ())?;
                ctx.store(offset, &new, 0).map_err(|_| ())?;
            }
        }
        scratch.forward.src = addr_from_v4_raw(new_src);
        Ok(())
    })();
    if done.is_err() {
        count(stat::TC_REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    count(stat::TC_ICMP_TRANSLATED);
    if !ingress {
        return TC_ACT_OK;
    }
    scratch.forward.dst = to.dst;
    route(ctx, &scratch.packet, &scratch.forward)
}

/// An ICMPv6 error (destination unreachable, packet too big, time exceeded) about a
/// packet of a tracked flow: translated as [`icmp_error`] does for ICMPv4, so IPv6
/// path MTU discovery works through a node port. The ICMPv6 checksum covers the
/// message and a pseudo header of the outer addresses: each rewrite updates it.
#[inline(never)]
fn icmp6_error(ctx: &mut TcContext, scratch: &mut Scratch, ingress: bool) -> i32 {
    let icmp = scratch.packet.l4;
    let Some(kind) = load::<u8>(ctx, icmp) else {
        return TC_ACT_OK;
    };
    if kind != ICMPV6_DEST_UNREACH && kind != ICMPV6_PKT_TOOBIG && kind != ICMPV6_TIME_EXCEED {
        return TC_ACT_OK;
    }
    let quoted = icmp + 8;
    let quoted_l4 = quoted + IPV6_HLEN;
    let (Some(proto), Some(q_src), Some(q_dst), Some([q_sport, q_dport])) = (
        load::<u8>(ctx, quoted + 6),
        load::<Addr>(ctx, quoted + 8),
        load::<Addr>(ctx, quoted + 24),
        load::<[u16; 2]>(ctx, quoted_l4),
    ) else {
        return TC_ACT_OK;
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return TC_ACT_OK;
    }
    scratch.reply_key = CtKey {
        src: q_dst,
        dst: q_src,
        sport: q_dport,
        dport: q_sport,
        proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let Some(entry) = ct_get(&scratch.reply_key) else {
        return TC_ACT_OK;
    };
    scratch.reply_value = *entry;
    let to = &scratch.reply_value;
    let csum = icmp + 2;
    // The error goes to the client; from the frontend if the backend itself sent it.
    let outer_src = scratch.packet.src;
    scratch.forward.src = if outer_src == q_dst {
        to.src
    } else {
        outer_src
    };
    scratch.forward.dst = to.dst;
    let done = replace_addr16(ctx, quoted + 8, &q_src, &to.dst, csum, 0)
        .and_then(|()| replace_addr16(ctx, quoted + 24, &q_dst, &to.src, csum, 0))
        .and_then(|()| {
            for (offset, old, new) in [
                (quoted_l4, q_sport, to.dport),
                (quoted_l4 + 2, q_dport, to.sport),
            ] {
                if old != new {
                    ctx.l4_csum_replace(csum, old as u64, new as u64, 2)
                        .map_err(|_| ())?;
                    ctx.store(offset, &new, 0).map_err(|_| ())?;
                }
            }
            Ok(())
        })
        .and_then(|()| {
            replace_addr16(
                ctx,
                ETH_HLEN + 8,
                &outer_src,
                &scratch.forward.src,
                csum,
                BPF_F_PSEUDO_HDR,
            )
        })
        .and_then(|()| {
            replace_addr16(
                ctx,
                ETH_HLEN + 24,
                &scratch.packet.dst,
                &scratch.forward.dst,
                csum,
                BPF_F_PSEUDO_HDR,
            )
        });
    if done.is_err() {
        count(stat::TC_REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    count(stat::TC_ICMP_TRANSLATED);
    if !ingress {
        return TC_ACT_OK;
    }
    route(ctx, &scratch.packet, &scratch.forward)
}

/// Whether `client` may reach frontend `svc_id` under its source ranges.
#[inline(always)]
fn source_allowed(svc_id: u32, client: &Addr) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        [svc_id.to_be(), client[0], client[1], client[2], client[3]],
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}

/// A source port for a flow SNATed to `node`, whose reply tuple is not tracked yet.
#[inline(always)]
fn snat_port(packet: &Packet, backend: &CtValue, node: &Addr, hash: u32) -> Option<u16> {
    let mut reply = CtKey {
        src: backend.dst,
        dst: *node,
        sport: backend.dport,
        dport: 0,
        proto: packet.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    // The flow's earlier SNAT port if it had one to this backend (a retransmitted SYN,
    // a client reusing its port): the backend then sees the same connection.
    if let Some(previous) = ct_get(&packet.key(CT_FORWARD))
        && previous.flags & CT_F_SNAT != 0
        && previous.dst == backend.dst
        && previous.dport == backend.dport
        && previous.src == *node
    {
        return Some(previous.sport);
    }
    let first = unsafe { core::ptr::read_volatile(&raw const LB_CONFIG_SNAT_PORT_MIN) };
    let count = unsafe { core::ptr::read_volatile(&raw const LB_CONFIG_SNAT_PORTS) }.max(1);
    for attempt in 0..SNAT_ATTEMPTS {
        // Independent probes (no clustering of taken ports).
        let port = first + crate::select::fmix32(hash.wrapping_add(attempt)) % count;
        reply.dport = (port as u16).to_be();
        if ct_get(&reply).is_none() {
            return Some(reply.dport);
        }
    }
    None
}

/// A client opening a connection straight to a pod (no frontend) from a port it
/// used before for a node port to the same pod: the earlier flow's reply entry has
/// exactly this connection's reply tuple and would rewrite its replies. A new
/// connection on the tuple means the old one is over, so the entry goes (SNATed
/// flows' replies are addressed to the node and cannot collide).
#[inline(always)]
fn forget_stale_reply(scratch: &mut Scratch) {
    let packet = &scratch.packet;
    scratch.reply_key = CtKey {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        proto: packet.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let key = &scratch.reply_key;
    let removed = if let Some(entry) = unsafe { LB_CT_EST.get(key) } {
        entry.flags & CT_F_SNAT == 0 && LB_CT_EST.remove(key).is_ok()
    } else if let Some(entry) = unsafe { LB_CT.get(key) } {
        entry.flags & CT_F_SNAT == 0 && LB_CT.remove(key).is_ok()
    } else {
        false
    };
    if removed {
        count(stat::TC_CT_STALE_REMOVED);
    }
}

/// A tracked entry: the established table first (answered flows live there), then
/// the table of new flows. The pointer is valid for this program run (RCU).
#[inline(always)]
fn ct_entry(key: &CtKey) -> Option<(*mut CtValue, bool)> {
    if let Some(entry) = LB_CT_EST.get_ptr_mut(key) {
        return Some((entry, true));
    }
    LB_CT.get_ptr_mut(key).map(|entry| (entry, false))
}

#[inline(always)]
fn ct_get(key: &CtKey) -> Option<&'static CtValue> {
    // SAFETY: a map value, valid for this program run (RCU).
    ct_entry(key).map(|(entry, _)| unsafe { &*entry })
}

/// The key of the other direction's entry of a flow, from this direction's value (a
/// packet rewritten to `value` is answered with the addresses and ports swapped).
#[inline(always)]
fn other_direction(value: &CtValue, proto: u8, dir: u8) -> CtKey {
    CtKey {
        src: value.dst,
        dst: value.src,
        sport: value.dport,
        dport: value.sport,
        proto,
        dir,
        _pad: 0,
    }
}

/// A new flow on a tuple whose earlier flow is in the established table (a client
/// reusing its port, a backend id reused): that flow is over, and its entries would
/// be found before the new ones, so they go.
#[inline(always)]
fn forget_established(packet: &Packet) {
    let key = packet.key(CT_FORWARD);
    let Some(old) = (unsafe { LB_CT_EST.get(&key) }) else {
        return;
    };
    let reply = other_direction(old, packet.proto, CT_REPLY);
    let _ = LB_CT_EST.remove(&reply);
    let _ = LB_CT_EST.remove(&key);
}

/// A flow of the established table that ends (a reset, or a FIN from each side) goes
/// back to the table of new flows at once, where its last packets still find it but
/// it holds no room live flows need. One flow per closing packet: never a burst.
#[inline(never)]
fn finish_established(scratch: &mut Scratch, reply: bool) {
    let Scratch {
        packet,
        forward,
        reply_value,
        ..
    } = scratch;
    let (forward_key, reply_key) = if reply {
        let reply_key = packet.key(CT_REPLY);
        let Some(value) = (unsafe { LB_CT_EST.get(&reply_key) }) else {
            return;
        };
        *reply_value = *value;
        let forward_key = other_direction(reply_value, packet.proto, CT_FORWARD);
        let Some(value) = (unsafe { LB_CT_EST.get(&forward_key) }) else {
            return;
        };
        *forward = *value;
        (forward_key, reply_key)
    } else {
        let forward_key = packet.key(CT_FORWARD);
        let Some(value) = (unsafe { LB_CT_EST.get(&forward_key) }) else {
            return;
        };
        *forward = *value;
        let reply_key = other_direction(forward, packet.proto, CT_REPLY);
        let Some(value) = (unsafe { LB_CT_EST.get(&reply_key) }) else {
            return;
        };
        *reply_value = *value;
        (forward_key, reply_key)
    };
    let flags = forward.flags | reply_value.flags;
    let both_fins = forward.flags & reply_value.flags & CT_F_FIN != 0;
    if flags & CT_F_RST == 0 && !both_fins {
        return;
    }
    // Into the new flows' table first: every packet finds the flow in one table or
    // the other throughout.
    if LB_CT.insert(&reply_key, &*reply_value, 0).is_err()
        || LB_CT.insert(&forward_key, &*forward, 0).is_err()
    {
        return;
    }
    let _ = LB_CT_EST.remove(&forward_key);
    let _ = LB_CT_EST.remove(&reply_key);
}

/// The client's packet after its flow's first answer (TCP: the handshake's last ACK)
/// moves the flow to the established table, where new flows cannot evict it. A
/// spoofed source never gets here: it never sees the answer. With the table full the
/// flow stays where it is (counted; tried again on its next packet).
#[inline(never)]
fn establish(scratch: &mut Scratch) {
    let Scratch {
        packet,
        forward,
        reply_key,
        reply_value,
        ..
    } = scratch;
    let forward_key = packet.key(CT_FORWARD);
    let Some(tracked) = (unsafe { LB_CT.get(&forward_key) }) else {
        return;
    };
    *forward = *tracked;
    *reply_key = other_direction(forward, packet.proto, CT_REPLY);
    let Some(reply) = (unsafe { LB_CT.get(&*reply_key) }) else {
        return;
    };
    // Not answered yet, or ending (a finished flow moved back stays).
    if reply.flags & CT_F_REPLIED == 0 || (forward.flags | reply.flags) & (CT_F_FIN | CT_F_RST) != 0
    {
        return;
    }
    *reply_value = *reply;
    // Reply first, as for a new flow; lookups try this table first, so every packet
    // finds its entry in one table or the other throughout.
    if LB_CT_EST.insert(&*reply_key, &*reply_value, 0).is_err() {
        count(stat::TC_CT_ESTABLISHED_FULL);
        return;
    }
    if LB_CT_EST.insert(&forward_key, &*forward, 0).is_err() {
        let _ = LB_CT_EST.remove(&*reply_key);
        count(stat::TC_CT_ESTABLISHED_FULL);
        return;
    }
    let _ = LB_CT.remove(&forward_key);
    let _ = LB_CT.remove(&*reply_key);
    count(stat::TC_CT_ESTABLISHED);
}

/// Per-CPU room for the parsed packet and a new flow's entries (too large for the
/// BPF stack together).
#[repr(C)]
pub struct Scratch {
    packet: Packet,
    forward: CtValue,
    reply_key: CtKey,
    reply_value: CtValue,
    /// Port-unreachable errors sent by this CPU in the second that started at
    /// `unreachable_since_ns` (see [`UNREACHABLE_PER_SECOND`]).
    unreachable_since_ns: u64,
    unreachable_sent: u32,
    reject: RejectBuffer,
}

/// Port-unreachable errors each CPU sends per second at most, as the kernel limits
/// its own ICMP errors: a flood to an address without endpoints is answered at a
/// bounded rate, the rest dropped.
const UNREACHABLE_PER_SECOND: u32 = 1000;

/// The one's-complement checksum of a `bpf_csum_diff` sum, ready to store.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let mut s = sum as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The `bpf_csum_diff` sum of `len` bytes at `data` (a multiple of 4), plus `seed`.
#[inline(always)]
fn sum_of(data: *mut u32, len: u32, seed: u32) -> Result<u32, ()> {
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data, len, seed) };
    if sum < 0 { Err(()) } else { Ok(sum as u32) }
}

/// Answers a packet for an external or load-balancer IP without any endpoint the way
/// kube-proxy's REJECT does: ICMP (v6: ICMPv6) port unreachable, from the address it
/// was sent to, quoting its header and 8 bytes after it, sent back out of the
/// interface it came in on. TCP clients see "connection refused", UDP ones an error
/// on their next receive. At most [`UNREACHABLE_PER_SECOND`] per CPU; packets with
/// IPv4 options (rare, and they would have to be quoted whole) are dropped.
#[inline(never)]
fn port_unreachable(ctx: &mut TcContext, scratch: &mut Scratch) -> i32 {
    let t = now();
    if t.saturating_sub(scratch.unreachable_since_ns) > 1_000_000_000 {
        scratch.unreachable_since_ns = t;
        scratch.unreachable_sent = 0;
    }
    if scratch.unreachable_sent >= UNREACHABLE_PER_SECOND {
        return TC_ACT_SHOT;
    }
    scratch.unreachable_sent += 1;
    let built = if scratch.packet.v6 {
        unreachable6(ctx, &scratch.packet, &mut scratch.reject)
    } else {
        unreachable4(ctx, &scratch.packet, &mut scratch.reject)
    };
    if built.is_err() {
        return TC_ACT_SHOT;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Room to build a port-unreachable error (too large for the BPF stack).
#[repr(C)]
pub struct RejectBuffer {
    /// The ICMP message: its header, then the quoted bytes.
    message: [u32; 14],
    /// IPv4: the new header; IPv6: the checksum's pseudo header.
    header: [u32; 10],
}

/// Swaps the Ethernet addresses: the frame goes back where it came from.
#[inline(always)]
fn turn_around(ctx: &mut TcContext) -> Result<(), ()> {
    let (dst, src) = (
        load::<[u8; 6]>(ctx, 0).ok_or(())?,
        load::<[u8; 6]>(ctx, 6).ok_or(())?,
    );
    ctx.store(0, &src, 0).map_err(|_| ())?;
    ctx.store(6, &dst, 0).map_err(|_| ())
}

#[inline(always)]
fn resize(ctx: &mut TcContext, len: u32) -> Result<(), ()> {
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Copies `N` words of the packet at `offset` into `message` after its first two
/// (the ICMP header's place).
#[inline(always)]
fn quote<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    message: &mut [u32; 14],
) -> Result<(), ()> {
    // A constant length: aya's load_bytes clamps it to the packet, which the verifier
    // then sees as possibly zero.
    // SAFETY: 4 * N bytes from word 2 lie within `message` (N <= 12).
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            message.as_mut_ptr().add(2).cast(),
            (4 * N) as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// IPv4: Ethernet, a 20-byte header, ICMP (8) and the quoted 28 bytes.
#[inline(always)]
fn unreachable4(ctx: &mut TcContext, packet: &Packet, buf: &mut RejectBuffer) -> Result<(), ()> {
    const LEN: u32 = 8 + 28;
    if packet.l4 != ETH_HLEN + 20 {
        return Err(());
    }
    // Type 3 (destination unreachable), code 3 (port).
    quote::<7>(ctx, ETH_HLEN, &mut buf.message)?;
    buf.message[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, 3, 0, 0]);
    buf.message[1] = 0;
    let csum = fold(sum_of(buf.message.as_mut_ptr(), LEN, 0)?).to_ne_bytes();
    buf.message[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, 3, csum[0], csum[1]]);
    let total = (20 + LEN as u16).to_be_bytes();
    buf.header[0] = u32::from_ne_bytes([0x45, 0, total[0], total[1]]);
    buf.header[1] = 0;
    buf.header[2] = u32::from_ne_bytes([64, IPPROTO_ICMP, 0, 0]);
    buf.header[3] = packet.dst[3];
    buf.header[4] = packet.src[3];
    let csum = fold(sum_of(buf.header.as_mut_ptr(), 20, 0)?).to_ne_bytes();
    buf.header[2] = u32::from_ne_bytes([64, IPPROTO_ICMP, csum[0], csum[1]]);
    turn_around(ctx)?;
    resize(ctx, (ETH_HLEN + 20) as u32 + LEN)?;
    let header: &[u32; 5] = buf.header[..5].try_into().map_err(|_| ())?;
    ctx.store(ETH_HLEN, header, 0).map_err(|_| ())?;
    let message: &[u32; 9] = buf.message[..9].try_into().map_err(|_| ())?;
    ctx.store(ETH_HLEN + 20, message, 0).map_err(|_| ())
}

/// IPv6: Ethernet, a 40-byte header, ICMPv6 (8) and the quoted 48 bytes.
#[inline(always)]
fn unreachable6(ctx: &mut TcContext, packet: &Packet, buf: &mut RejectBuffer) -> Result<(), ()> {
    const LEN: u32 = 8 + 48;
    // Type 1 (destination unreachable), code 4 (port unreachable).
    quote::<12>(ctx, ETH_HLEN, &mut buf.message)?;
    buf.message[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, 4, 0, 0]);
    buf.message[1] = 0;
    // The pseudo header: source, destination, length, next header.
    buf.header[0..4].copy_from_slice(&packet.dst);
    buf.header[4..8].copy_from_slice(&packet.src);
    buf.header[8] = LEN.to_be();
    buf.header[9] = (IPPROTO_ICMPV6 as u32).to_be();
    let seed = sum_of(buf.header.as_mut_ptr(), 40, 0)?;
    let csum = fold(sum_of(buf.message.as_mut_ptr(), LEN, seed)?).to_ne_bytes();
    buf.message[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, 4, csum[0], csum[1]]);
    let len = (LEN as u16).to_be_bytes();
    let head = [
        u32::from_ne_bytes([0x60, 0, 0, 0]),
        u32::from_ne_bytes([len[0], len[1], IPPROTO_ICMPV6, 64]),
    ];
    turn_around(ctx)?;
    resize(ctx, (ETH_HLEN + IPV6_HLEN) as u32 + LEN)?;
    ctx.store(ETH_HLEN, &head, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + 8, &packet.dst, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + 24, &packet.src, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV6_HLEN, &buf.message, 0)
        .map_err(|_| ())
}

#[map]
static LB_TC_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A new flow to a frontend: choose, track, translate. `from_pod`: sent by a
/// packet-mode pod (internal-scope frontends, chosen as the socket hooks choose, the
/// source kept unless the pod reaches itself) rather than from another machine.
#[inline(never)]
fn new_flow(ctx: &mut TcContext, scratch: &mut Scratch, from_pod: bool) -> i32 {
    // A pod that left packet mode keeps its tracked flows, but starts none here.
    if from_pod {
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if unsafe { LB_POD_INTERFACES.get(ifindex) }.is_none() {
            return TC_ACT_OK;
        }
    }
    let packet = &scratch.packet;
    let key = &mut packet.frontend_key(from_pod);
    let Some(fe) = frontend(key) else {
        count(stat::TC_NOT_SERVICE);
        if packet.is_syn() {
            forget_stale_reply(scratch);
        }
        return TC_ACT_OK;
    };
    // Only a SYN starts a TCP flow: anything else untracked (an expired or evicted
    // flow, or forged to fill the table) is never tracked. On a node port the stack
    // answers it with a reset; elsewhere it is dropped.
    if packet.proto == IPPROTO_TCP && !packet.is_syn() {
        count(stat::TC_CT_MISS_NON_SYN);
        return if fe.flags & SVC_F_NODE_PORT != 0 {
            TC_ACT_OK
        } else {
            TC_ACT_SHOT
        };
    }
    if fe.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(fe.svc_id, &packet.src) {
        count(stat::TC_POLICY_DROP);
        return TC_ACT_SHOT;
    }
    let hash = flow_hash(&packet.src, packet.sport, packet.proto);
    let mut client = AffinityKey {
        client: packet.src,
        svc_id: 0,
        kind: AFFINITY_CLIENT_IP,
        _pad: [0; 3],
    };
    let client_hash = flow_hash(&packet.src, 0, packet.proto);
    let selection = if from_pod {
        // Like a connect() through the socket hooks: any backend, at random.
        select_backend(key, unsafe { bpf_get_prandom_u32() }, &mut client)
    } else {
        select_external(key, hash, client_hash, &mut client)
    };
    let (backend, backend_id, svc_id) = match selection {
        Selection::Backend {
            backend,
            backend_id,
            svc_id,
        } => (backend, backend_id, svc_id),
        Selection::NotService => {
            count(stat::TC_NOT_SERVICE);
            return TC_ACT_OK;
        }
        Selection::NoBackend { svc_id } | Selection::Failed { svc_id } => {
            count(stat::TC_NO_BACKEND);
            count_frontend(svc_id, true);
            // As kube-proxy's REJECT: refused, on a node port by the node's own stack
            // (no socket there: TCP reset, ICMP port unreachable), on other addresses
            // with a port unreachable built here; under the Local policy without a
            // local endpoint, no answer (the load balancer's health check steers).
            // A pod is refused whatever the policy, as the socket hooks refuse.
            return if !from_pod && fe.flags & SVC_F_LOCAL != 0 {
                TC_ACT_SHOT
            } else if fe.flags & SVC_F_NODE_PORT != 0 {
                TC_ACT_OK
            } else if packet.proto == IPPROTO_UDP || packet.is_syn() {
                port_unreachable(ctx, scratch)
            } else {
                TC_ACT_SHOT
            };
        }
    };
    let local = backend.flags & BACKEND_F_LOCAL != 0;
    let forward = &mut scratch.forward;
    *forward = CtValue {
        src: packet.src,
        dst: backend.addr,
        sport: packet.sport,
        dport: backend.port,
        svc_id,
        backend_id,
        flags: CT_F_STATEFUL | if local { CT_F_LOCAL_BACKEND } else { 0 },
        last_seen_ns: now(),
    };
    // Cluster policy to another node: the reply must come back through this node. A
    // pod's own flows need it only when the pod reaches itself (hairpin): a packet
    // from its own address would be dropped as a martian.
    let snat = if from_pod {
        backend.addr == packet.src
    } else {
        !local && fe.flags & SVC_F_LOCAL == 0
    };
    if snat {
        let node = LB_NODE_ADDRS.get(u32::from(packet.v6)).copied();
        let Some(node) = node.filter(|a| a.iter().any(|w| *w != 0)) else {
            count(stat::TC_SNAT_NO_ADDRESS);
            return TC_ACT_SHOT;
        };
        let Some(port) = snat_port(packet, forward, &node, hash ^ packet.dport as u32) else {
            count(stat::TC_SNAT_FAILED);
            return TC_ACT_SHOT;
        };
        forward.src = node;
        forward.sport = port;
        forward.flags |= CT_F_SNAT;
        count(stat::TC_SNAT);
    }
    scratch.reply_key = other_direction(forward, packet.proto, CT_REPLY);
    scratch.reply_value = CtValue {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        ..*forward
    };
    forget_established(packet);
    // Reply first: the first answer may come back before we return.
    if LB_CT
        .insert(&scratch.reply_key, &scratch.reply_value, 0)
        .is_err()
        || LB_CT.insert(&packet.key(CT_FORWARD), &*forward, 0).is_err()
    {
        count(stat::TC_REWRITE_FAILED);
        return TC_ACT_SHOT;
    }
    count(stat::TC_CT_CREATED);
    if rewrite(ctx, packet, forward) != 0 {
        return TC_ACT_SHOT;
    }
    count(stat::TC_TRANSLATED);
    count_frontend(svc_id, false);
    count_backend(backend_id);
    route(ctx, packet, forward)
}

/// The forward entry of `packet`, if tracked and its backend id was not reused for
/// another backend. A freed id (the backend left every frontend's rotation, e.g.
/// terminating) keeps its flows draining: the daemon removes flows whose backend is
/// gone altogether (right after the sync that removes it).
#[inline(always)]
fn tracked(packet: &Packet) -> Option<(*mut CtValue, bool)> {
    let (entry, established) = ct_entry(&packet.key(CT_FORWARD))?;
    let value = unsafe { &*entry };
    match unsafe { LB_BACKENDS.get(value.backend_id) } {
        Some(backend) => (backend.addr == value.dst && backend.port == value.dport)
            .then_some((entry, established)),
        None => Some((entry, established)),
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    let scratch = LB_TC_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by one program run at a time (TC programs do not
    // nest on a CPU).
    let scratch = unsafe { &mut *scratch };
    scratch.packet = Packet::default();
    Some(scratch)
}

#[inline(always)]
fn ingress(ctx: &mut TcContext, from_pod: bool) -> i32 {
    let Some(scratch) = scratch() else {
        return TC_ACT_OK;
    };
    match parse(ctx, &mut scratch.packet) {
        Parsed::Packet => {}
        Parsed::Other => return TC_ACT_OK,
        Parsed::Icmp => return icmp_error(ctx, scratch, true),
        Parsed::Icmp6 => return icmp6_error(ctx, scratch, true),
        Parsed::Malformed => {
            count(stat::TC_MALFORMED);
            return TC_ACT_SHOT;
        }
        Parsed::Fragment => {
            count(stat::TC_FRAGMENT);
            return TC_ACT_OK;
        }
        Parsed::FirstFragment => {
            count(stat::TC_FRAGMENT);
            // Ports travel in the first fragment only: a datagram for a frontend
            // cannot be translated, so it is dropped here rather than half-delivered.
            return if frontend(&mut scratch.packet.frontend_key(from_pod)).is_some() {
                TC_ACT_SHOT
            } else {
                TC_ACT_OK
            };
        }
    }
    let packet = &scratch.packet;
    if let Some((entry, established)) = ct_entry(&packet.key(CT_REPLY)) {
        return translate_tracked(ctx, scratch, entry, true, true, established);
    }
    // A SYN starts afresh (a client reusing its port gets a current choice).
    if !packet.is_syn()
        && let Some((mut entry, established)) = tracked(packet)
    {
        let mut established = established;
        if !established {
            establish(scratch);
            // This packet's state goes to the entry that now serves the flow.
            if let Some((moved, true)) = ct_entry(&scratch.packet.key(CT_FORWARD)) {
                entry = moved;
                established = true;
            }
        }
        return translate_tracked(ctx, scratch, entry, true, false, established);
    }
    new_flow(ctx, scratch, from_pod)
}

#[inline(always)]
fn egress(ctx: &mut TcContext) -> i32 {
    let Some(scratch) = scratch() else {
        return TC_ACT_OK;
    };
    match parse(ctx, &mut scratch.packet) {
        Parsed::Packet => {}
        Parsed::Icmp => return icmp_error(ctx, scratch, false),
        Parsed::Icmp6 => return icmp6_error(ctx, scratch, false),
        _ => return TC_ACT_OK,
    }
    match ct_entry(&scratch.packet.key(CT_REPLY)) {
        Some((entry, established)) => {
            translate_tracked(ctx, scratch, entry, false, true, established)
        }
        None => TC_ACT_OK,
    }
}

#[classifier]
pub fn lb_tc_ingress(mut ctx: TcContext) -> i32 {
    ingress(&mut ctx, false)
}

/// On the host side of a packet-mode pod's interface: what the pod sends. Its replies
/// (`lb_tc_egress` on the same interface, or on the uplink they arrive by) are
/// translated back by the same tracked flows.
#[classifier]
pub fn lb_tc_pod_ingress(mut ctx: TcContext) -> i32 {
    ingress(&mut ctx, true)
}

#[classifier]
pub fn lb_tc_egress(mut ctx: TcContext) -> i32 {
    egress(&mut ctx)
}
