//! The TC connection tracker's flows (`LB_CT_EST` and `LB_CT`) as pairs of entries,
//! their state, and their expiry: the daemon's garbage collector and `lb ct` read them
//! the same way.
//!
//! The programs keep two entries per flow (forward: the client's packets; reply: the
//! backend's) and mark each with what its direction saw (`CT_F_REPLIED`, `CT_F_FIN`,
//! `CT_F_RST`); a flow's state is the union of both. LRU eviction alone would let
//! idle flows linger until a burst pushes live ones out: the collector removes a flow
//! once it has been idle longer than its state allows (kube-proxy's conntrack
//! timeouts), or once what it was balanced to is gone.

use std::{collections::HashMap, time::Duration};

use lb_common::{
    Addr, CT_F_FIN, CT_F_REPLIED, CT_F_RST, CT_F_STATEFUL, CT_FORWARD, CT_REPLY, CtKey, CtValue,
    IPPROTO_TCP, IPPROTO_UDP,
};

/// How long a flow may stay idle, by state (`--conntrack-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP, answered and open (kube-proxy's `--conntrack-tcp-timeout-established`).
    pub tcp_established: Duration,
    /// TCP after a FIN (`--conntrack-tcp-timeout-close-wait`).
    pub tcp_close_wait: Duration,
    /// TCP SYN not answered yet.
    pub tcp_syn: Duration,
    /// TCP after a reset.
    pub tcp_reset: Duration,
    /// UDP not answered (`--conntrack-udp-timeout`).
    pub udp: Duration,
    /// UDP answered (`--conntrack-udp-timeout-stream`).
    pub udp_stream: Duration,
}

impl Default for CtTimeouts {
    /// kube-proxy's defaults where it has a flag, Linux conntrack's elsewhere.
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_syn: Duration::from_secs(120),
            tcp_reset: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

impl CtTimeouts {
    /// How often the collector runs: every 10 s, more often when a timeout is short,
    /// so a flow outlives its timeout by half of it at most (never more than once a
    /// second: a walk of the table costs a system call per entry).
    pub fn collection_interval(&self) -> Duration {
        let shortest = [
            self.tcp_established,
            self.tcp_close_wait,
            self.tcp_syn,
            self.tcp_reset,
            self.udp,
            self.udp_stream,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(10));
        (shortest / 2).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }
}

/// What a flow has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// TCP: a SYN, no answer yet.
    SynSent,
    Established,
    /// TCP: a FIN went one way or both.
    Closing,
    /// TCP: reset.
    Reset,
    /// UDP (or another protocol) not answered yet.
    Unreplied,
    /// UDP answered.
    Replied,
    /// An entry written before the programs recorded state: taken as established.
    Unknown,
}

impl FlowState {
    pub fn of(proto: u8, flags: u32) -> Self {
        if flags & CT_F_STATEFUL == 0 {
            return Self::Unknown;
        }
        let replied = flags & CT_F_REPLIED != 0;
        if proto == IPPROTO_TCP {
            if flags & CT_F_RST != 0 {
                Self::Reset
            } else if flags & CT_F_FIN != 0 {
                Self::Closing
            } else if replied {
                Self::Established
            } else {
                Self::SynSent
            }
        } else if replied {
            Self::Replied
        } else {
            Self::Unreplied
        }
    }

    pub fn timeout(self, proto: u8, t: &CtTimeouts) -> Duration {
        match self {
            Self::SynSent => t.tcp_syn,
            Self::Established => t.tcp_established,
            Self::Closing => t.tcp_close_wait,
            Self::Reset => t.tcp_reset,
            Self::Unreplied => t.udp,
            Self::Replied => t.udp_stream,
            Self::Unknown if proto == IPPROTO_UDP => t.udp_stream,
            Self::Unknown => t.tcp_established,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SynSent => "syn-sent",
            Self::Established => "established",
            Self::Closing => "closing",
            Self::Reset => "reset",
            Self::Unreplied => "unreplied",
            Self::Replied => "replied",
            Self::Unknown => "unknown",
        }
    }
}

/// One flow: its forward and reply entries (either may have been evicted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    pub forward: Option<(CtKey, CtValue)>,
    pub reply: Option<(CtKey, CtValue)>,
}

/// The reply entry's key of a flow whose forward entry holds `forward`.
pub fn reply_key(proto: u8, forward: &CtValue) -> CtKey {
    CtKey {
        src: forward.dst,
        dst: forward.src,
        sport: forward.dport,
        dport: forward.sport,
        proto,
        dir: CT_REPLY,
        _pad: 0,
    }
}

/// The forward entry's key of a flow whose reply entry holds `reply`.
pub fn forward_key(proto: u8, reply: &CtValue) -> CtKey {
    CtKey {
        src: reply.dst,
        dst: reply.src,
        sport: reply.dport,
        dport: reply.sport,
        proto,
        dir: CT_FORWARD,
        _pad: 0,
    }
}

impl Flow {
    fn entries(&self) -> impl Iterator<Item = &(CtKey, CtValue)> {
        self.forward.iter().chain(self.reply.iter())
    }

    pub fn proto(&self) -> u8 {
        self.entries().next().map_or(0, |(k, _)| k.proto)
    }

    pub fn flags(&self) -> u32 {
        self.entries().fold(0, |f, (_, v)| f | v.flags)
    }

    pub fn state(&self) -> FlowState {
        // A pair where one entry predates state recording counts as unknown.
        if self.entries().any(|(_, v)| v.flags & CT_F_STATEFUL == 0) {
            return FlowState::Unknown;
        }
        FlowState::of(self.proto(), self.flags())
    }

    pub fn last_seen_ns(&self) -> u64 {
        self.entries()
            .map(|(_, v)| v.last_seen_ns)
            .max()
            .unwrap_or(0)
    }

    /// The value balancing decisions are read from (the forward entry's, else the
    /// reply's: both carry the frontend and backend ids).
    pub fn value(&self) -> Option<&CtValue> {
        self.entries().next().map(|(_, v)| v)
    }

    /// The client's address: the forward packet's source.
    pub fn client(&self) -> Option<Addr> {
        match (&self.forward, &self.reply) {
            (Some((key, _)), _) => Some(key.src),
            (None, Some((_, value))) => Some(value.dst),
            (None, None) => None,
        }
    }

    /// (address, port) the flow was sent to.
    pub fn backend(&self) -> Option<(Addr, u16)> {
        match (&self.forward, &self.reply) {
            (Some((_, value)), _) => Some((value.dst, value.dport)),
            (None, Some((key, _))) => Some((key.src, key.sport)),
            (None, None) => None,
        }
    }

    /// Idle longer than its state allows at `now_ns` (`bpf_ktime_get_ns`'s clock).
    pub fn expired(&self, now_ns: u64, timeouts: &CtTimeouts) -> bool {
        let idle = Duration::from_nanos(now_ns.saturating_sub(self.last_seen_ns()));
        idle > self.state().timeout(self.proto(), timeouts)
    }
}

/// `bpf_ktime_get_ns()`'s clock (CLOCK_MONOTONIC), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Groups entries into flows (forward entries with the reply entry they point at;
/// reply entries whose forward entry is gone on their own).
pub fn pair_up(entries: Vec<(CtKey, CtValue)>) -> Vec<Flow> {
    let mut replies: HashMap<CtKey, CtValue> = HashMap::new();
    let mut flows = Vec::new();
    for (key, value) in entries {
        if key.dir == CT_REPLY {
            replies.insert(key, value);
        } else {
            flows.push(Flow {
                forward: Some((key, value)),
                reply: None,
            });
        }
    }
    for flow in &mut flows {
        let (key, value) = flow.forward.expect("forward");
        let reply = reply_key(key.proto, &value);
        if let Some(reply_value) = replies.get(&reply)
            && forward_key(key.proto, reply_value) == key
        {
            flow.reply = Some((reply, replies.remove(&reply).expect("present")));
        }
    }
    flows.extend(replies.into_iter().map(|(key, value)| Flow {
        forward: None,
        reply: Some((key, value)),
    }));
    flows
}

/// Why the collector removed a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Removal {
    /// Idle past its state's timeout.
    Expired,
    /// Its frontend is no longer served.
    FrontendGone,
    /// Its client is outside the frontend's `loadBalancerSourceRanges` now.
    SourceRange,
    /// Its backend left the frontend (not merely terminating).
    BackendGone,
}

impl Removal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::FrontendGone => "frontend_gone",
            Self::SourceRange => "source_range",
            Self::BackendGone => "backend_gone",
        }
    }
}

/// Whether `client` falls in the `prefix_len`-bit prefix `addr` (the layout of
/// `LB_SOURCE_RANGES` keys without their 32 bits of frontend id).
pub fn prefix_contains(addr: &Addr, prefix_bits: u32, client: &Addr) -> bool {
    let mut bits = prefix_bits.min(128);
    for (a, c) in addr.iter().zip(client) {
        if bits == 0 {
            return true;
        }
        let take = bits.min(32);
        let mask = if take == 32 {
            u32::MAX
        } else {
            !(u32::MAX >> take)
        };
        if u32::from_be(*a) & mask != u32::from_be(*c) & mask {
            return false;
        }
        bits -= take;
    }
    true
}

#[cfg(test)]
mod tests {
    use lb_common::{CT_F_SNAT, addr_from_ip};

    use super::*;

    fn addr(ip: &str) -> Addr {
        addr_from_ip(ip.parse().unwrap())
    }

    /// A node-port flow 10.253.0.100:40000 -> 10.253.0.11:30002, SNATed to the node
    /// and sent to 10.244.2.5:6379, as the ingress program writes it.
    fn flow(proto: u8, forward_flags: u32, reply_flags: u32) -> (Vec<(CtKey, CtValue)>, Flow) {
        let forward_key = CtKey {
            src: addr("10.253.0.100"),
            dst: addr("10.253.0.11"),
            sport: 40000u16.to_be(),
            dport: 30002u16.to_be(),
            proto,
            dir: CT_FORWARD,
            _pad: 0,
        };
        let forward = CtValue {
            src: addr("10.253.0.11"),
            dst: addr("10.244.2.5"),
            sport: 61234u16.to_be(),
            dport: 6379u16.to_be(),
            svc_id: 7,
            backend_id: 3,
            flags: CT_F_SNAT | forward_flags,
            last_seen_ns: 1_000,
        };
        let reply = CtValue {
            src: forward_key.dst,
            dst: forward_key.src,
            sport: forward_key.dport,
            dport: forward_key.sport,
            flags: CT_F_SNAT | reply_flags,
            last_seen_ns: 5_000,
            ..forward
        };
        let reply_key = reply_key(proto, &forward);
        (
            vec![(forward_key, forward), (reply_key, reply)],
            Flow {
                forward: Some((forward_key, forward)),
                reply: Some((reply_key, reply)),
            },
        )
    }

    #[test]
    fn entries_pair_up_into_flows_and_orphans_stand_alone() {
        let (entries, expected) = flow(IPPROTO_TCP, CT_F_STATEFUL, CT_F_STATEFUL);
        assert_eq!(pair_up(entries.clone()), vec![expected.clone()]);
        // The reply entry evicted: the forward entry alone, and the other way round.
        let forward_only = pair_up(vec![entries[0]]);
        assert_eq!(forward_only.len(), 1);
        assert!(forward_only[0].reply.is_none());
        let reply_only = pair_up(vec![entries[1]]);
        assert!(reply_only[0].forward.is_none());
        assert_eq!(reply_only[0].client(), expected.client());
        assert_eq!(reply_only[0].backend(), expected.backend());
        assert_eq!(expected.last_seen_ns(), 5_000);
    }

    #[test]
    fn state_is_the_union_of_both_directions_and_sets_the_timeout() {
        let t = CtTimeouts::default();
        let cases = [
            (
                IPPROTO_TCP,
                CT_F_STATEFUL,
                CT_F_STATEFUL,
                FlowState::SynSent,
                t.tcp_syn,
            ),
            (
                IPPROTO_TCP,
                CT_F_STATEFUL,
                CT_F_STATEFUL | CT_F_REPLIED,
                FlowState::Established,
                t.tcp_established,
            ),
            (
                IPPROTO_TCP,
                CT_F_STATEFUL | CT_F_FIN,
                CT_F_STATEFUL | CT_F_REPLIED,
                FlowState::Closing,
                t.tcp_close_wait,
            ),
            (
                IPPROTO_TCP,
                CT_F_STATEFUL | CT_F_FIN,
                CT_F_STATEFUL | CT_F_REPLIED | CT_F_RST,
                FlowState::Reset,
                t.tcp_reset,
            ),
            (
                IPPROTO_UDP,
                CT_F_STATEFUL,
                CT_F_STATEFUL,
                FlowState::Unreplied,
                t.udp,
            ),
            (
                IPPROTO_UDP,
                CT_F_STATEFUL,
                CT_F_STATEFUL | CT_F_REPLIED,
                FlowState::Replied,
                t.udp_stream,
            ),
            // Written by an older program: never cut short.
            (IPPROTO_TCP, 0, 0, FlowState::Unknown, t.tcp_established),
            (
                IPPROTO_TCP,
                CT_F_STATEFUL,
                0,
                FlowState::Unknown,
                t.tcp_established,
            ),
            (IPPROTO_UDP, 0, 0, FlowState::Unknown, t.udp_stream),
        ];
        for (proto, forward, reply, state, timeout) in cases {
            let (_, flow) = flow(proto, forward, reply);
            assert_eq!(flow.state(), state, "{proto} {forward:#x} {reply:#x}");
            assert_eq!(flow.state().timeout(proto, &t), timeout, "{state:?}");
            // Idle exactly the timeout: kept; a nanosecond more: expired.
            let last = flow.last_seen_ns();
            let limit = last + timeout.as_nanos() as u64;
            assert!(!flow.expired(limit, &t), "{state:?}");
            assert!(flow.expired(limit + 1, &t), "{state:?}");
        }
    }

    #[test]
    fn the_collector_runs_often_enough_for_the_shortest_timeout() {
        let t = CtTimeouts::default();
        // tcp_reset (10 s) is the shortest default.
        assert_eq!(t.collection_interval(), Duration::from_secs(5));
        let short = CtTimeouts {
            udp: Duration::from_secs(1),
            ..t
        };
        assert_eq!(short.collection_interval(), Duration::from_secs(1));
    }

    #[test]
    fn prefixes_contain_what_they_should() {
        let client = addr("192.0.2.77");
        // IPv4 prefixes are stored mapped: 96 bits of ::ffff:0:0/96 first.
        assert!(prefix_contains(&addr("192.0.2.0"), 96 + 24, &client));
        assert!(!prefix_contains(&addr("192.0.3.0"), 96 + 24, &client));
        assert!(prefix_contains(&addr("192.0.2.64"), 96 + 26, &client));
        assert!(!prefix_contains(&addr("192.0.2.0"), 96 + 26, &client));
        assert!(prefix_contains(&addr("0.0.0.0"), 96, &client));
        assert!(prefix_contains(&addr("192.0.2.77"), 128, &client));
        assert!(!prefix_contains(&addr("192.0.2.76"), 128, &client));
        let v6 = addr("fd00:1::5");
        assert!(prefix_contains(&addr("fd00:1::"), 64, &v6));
        assert!(!prefix_contains(&addr("fd00:2::"), 64, &v6));
        assert!(!prefix_contains(&addr("fd00:1::"), 64, &client));
        assert!(prefix_contains(&addr("::"), 0, &client));
    }
}
