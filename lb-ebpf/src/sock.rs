//! The cgroup socket-address hooks.
//!
//! Forward path (`connect4/6`, `sendmsg4/6`): look the destination up in `LB_SERVICES`,
//! rewrite it to the chosen backend, remember the translation in `LB_SOCK_REVNAT`.
//! Reverse path (`recvmsg4/6`, `getpeername4/6`): if `LB_SOCK_REVNAT` knows (socket,
//! backend), show the application the ClusterIP:port it dialled instead.
//!
//! TCP and SCTP pick a backend at random per connection; UDP hashes the socket cookie so
//! every datagram of one socket goes to one backend (DNS clients rely on that).
//!
//! Every decision is counted (`LB_STATS`, per-frontend and per-backend counters); only
//! events that mean something is wrong are logged (aya-log, forwarded by the daemon).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use lb_common::{
    Addr, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL, ServiceKey, SockRevKey,
    SockRevValue, addr_from_v4_raw, addr_is_v4, stat,
};

use crate::{
    maps::{LB_SOCK_REVNAT, count, count_backend, count_frontend},
    select::{Selection, hash64, select_backend},
};

/// 1 when the kernel has `bpf_set_retval` (>= 5.18) so refusals return ECONNREFUSED;
/// userspace sets 0 on older kernels (then the verifier prunes the call and refusals
/// surface as EPERM).
#[unsafe(no_mangle)]
static LB_CONFIG_HAS_SET_RETVAL: u8 = 1;

const ECONNREFUSED: i32 = 111;
/// cgroup sock_addr return codes.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Where a hook was called from; decides the selection hash and whether the socket is
/// remembered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    Sendmsg,
}

#[inline(always)]
fn refuse() -> i32 {
    if unsafe { read_volatile(&LB_CONFIG_HAS_SET_RETVAL) } != 0 {
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    DENY
}

/// The socket's protocol if it is one we balance.
#[inline(always)]
fn balanced_proto(sa: *const bpf_sock_addr) -> Option<u8> {
    let proto = unsafe { read_volatile(addr_of!((*sa).protocol)) } as u8;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => Some(proto),
        _ => None,
    }
}

#[inline(always)]
fn read_ip6(sa: *const bpf_sock_addr) -> Addr {
    // One 32-bit load per word: the verifier rejects wider context loads.
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: *mut bpf_sock_addr, addr: &Addr) {
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), addr[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), addr[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), addr[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), addr[3]);
    }
}

#[inline(always)]
fn read_port(sa: *const bpf_sock_addr) -> u16 {
    // `user_port` holds the network-order port in the low 16 bits of a u32.
    unsafe { read_volatile(addr_of!((*sa).user_port)) as u16 }
}

#[inline(always)]
fn write_port(sa: *mut bpf_sock_addr, port: u16) {
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), port as u32) };
}

/// Forward translation shared by the v4 and v6 hooks. `ipv4_socket` says whether the
/// destination lives in `user_ip4` (AF_INET) or `user_ip6` (AF_INET6, possibly
/// IPv4-mapped).
#[inline(always)]
fn translate(ctx: &SockAddrContext, hook: Hook, ipv4_socket: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = balanced_proto(sa) else {
        return ALLOW;
    };
    let dst = if ipv4_socket {
        addr_from_v4_raw(unsafe { read_volatile(addr_of!((*sa).user_ip4)) })
    } else {
        read_ip6(sa)
    };
    let port = read_port(sa);
    let mut key = ServiceKey::new(dst, port, proto, SCOPE_INTERNAL, 0);

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let hash = if proto == IPPROTO_UDP {
        hash64(cookie)
    } else {
        unsafe { bpf_get_prandom_u32() }
    };

    match select_backend(&mut key, hash) {
        Selection::NotService => {
            count(stat::NOT_SERVICE);
            ALLOW
        }
        Selection::NoBackend { svc_id } => {
            count(stat::REFUSED_NO_BACKEND);
            count_frontend(svc_id, true);
            refuse()
        }
        Selection::Failed { svc_id } => {
            warn!(
                ctx,
                "frontend {}: slot or backend missing after retries; refused", svc_id
            );
            count(stat::LOOKUP_FAILED);
            count_frontend(svc_id, true);
            refuse()
        }
        Selection::Backend {
            backend,
            backend_id,
            svc_id,
        } => {
            if ipv4_socket {
                if !addr_is_v4(&backend.addr) {
                    // An AF_INET socket cannot reach an IPv6 pod; the model never
                    // pairs families like this, so treat it as an inconsistency.
                    warn!(
                        ctx,
                        "frontend {}: IPv6 backend {} for an IPv4 socket; refused",
                        svc_id,
                        backend_id
                    );
                    count(stat::LOOKUP_FAILED);
                    return refuse();
                }
                unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), backend.addr[3]) };
            } else {
                write_ip6(sa, &backend.addr);
            }
            write_port(sa, backend.port);

            let rev_key = SockRevKey {
                cookie,
                addr: backend.addr,
                port: backend.port,
                _pad: [0; 3],
            };
            let rev_value = SockRevValue {
                addr: dst,
                port,
                _pad: 0,
                svc_id,
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            };
            // Unconnected UDP passes here once per datagram: write only what is new.
            let known = hook == Hook::Sendmsg
                && unsafe { LB_SOCK_REVNAT.get(rev_key) }.is_some_and(|v| *v == rev_value);
            if !known && let Err(err) = LB_SOCK_REVNAT.insert(rev_key, rev_value, 0) {
                warn!(
                    ctx,
                    "frontend {}: recording the translated socket failed ({})", svc_id, err
                );
                count(stat::REVNAT_UPDATE_FAILED);
            }

            count(stat::TRANSLATED);
            count_frontend(svc_id, false);
            if hook == Hook::Connect {
                count_backend(backend_id);
            }
            ALLOW
        }
    }
}

/// Reverse translation shared by recvmsg and getpeername: backend -> ClusterIP.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, ipv4_socket: bool) -> i32 {
    let sa = ctx.sock_addr;
    if balanced_proto(sa).is_none() {
        return ALLOW;
    }
    let src = if ipv4_socket {
        addr_from_v4_raw(unsafe { read_volatile(addr_of!((*sa).user_ip4)) })
    } else {
        read_ip6(sa)
    };
    let rev_key = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: src,
        port: read_port(sa),
        _pad: [0; 3],
    };
    let Some(orig) = (unsafe { LB_SOCK_REVNAT.get(rev_key) }).copied() else {
        return ALLOW;
    };
    if ipv4_socket {
        if !addr_is_v4(&orig.addr) {
            return ALLOW;
        }
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), orig.addr[3]) };
    } else {
        write_ip6(sa, &orig.addr);
    }
    write_port(sa, orig.port);
    count(stat::REVNAT_HIT);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Hook::Connect, true)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Hook::Connect, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Hook::Sendmsg, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Hook::Sendmsg, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}
