//! The cgroup socket hooks.
//!
//! Forward path (`connect4/6`, `sendmsg4/6`): look the destination up in `LB_SERVICES`,
//! rewrite it to the chosen backend, remember the translation: a `connect()` in
//! `LB_SOCK_REVNAT`, an unconnected UDP send in the socket's own storage
//! (`LB_SOCK_LOCAL`).
//! Reverse path (`recvmsg4/6`, `getpeername4/6`): if the socket's translation to that
//! backend is remembered, show the application the ClusterIP:port it dialled instead.
//! `sock_release` deletes a socket's `LB_SOCK_REVNAT` entry when the socket goes (its
//! own storage goes with it), so the state lives exactly as long as its socket.
//! Kernels without `sock_release` (< 5.9) use `LB_SOCK_REVNAT_LRU` for everything.
//!
//! Pods in another load-balancing mode (`LB_WORKLOADS`, by cgroup) are left alone:
//! the packet path or nothing translates their connections.
//!
//! TCP and SCTP pick a backend at random per connection; UDP hashes the socket cookie so
//! every datagram of one socket goes to one backend (DNS clients rely on that).
//!
//! Every decision is counted (`LB_STATS`, per-frontend and per-backend counters); only
//! events that mean something is wrong are logged (aya-log, forwarded by the daemon).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval,
        generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use lb_common::{
    Addr, AffinityKey, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, LOCAL_EMPTY, LOCAL_OVERFLOW,
    LOCAL_SENT, SCOPE_INTERNAL, SOCK_LOCAL_ENTRIES, SOCK_LOCAL_F_OVERFLOWED, ServiceKey, SockLocal,
    SockLocalEntry, SockRevKey, SockRevValue, addr_from_v4_raw, addr_is_v4, stat, workload_mode,
};

use crate::{
    maps::{
        LB_SOCK_LOCAL, LB_SOCK_REVNAT, LB_SOCK_REVNAT_LRU, LB_WORKLOAD_COUNT, LB_WORKLOADS, count,
        count_backend, count_frontend,
    },
    select::{Selection, hash64, select_backend},
};

/// 1 when the kernel has `bpf_set_retval` (>= 5.18) so refusals return ECONNREFUSED;
/// userspace sets 0 on older kernels (then the verifier prunes the call and refusals
/// surface as EPERM).
#[unsafe(no_mangle)]
static LB_CONFIG_HAS_SET_RETVAL: u8 = 1;

/// 1 when the kernel has `cgroup/sock_release` (>= 5.9): connected translations go to
/// `LB_SOCK_REVNAT` (deleted on release), unconnected sends to per-socket storage.
/// Userspace sets 0 on older kernels: everything goes to `LB_SOCK_REVNAT_LRU`.
#[unsafe(no_mangle)]
static LB_CONFIG_TRACK_SOCKETS: u8 = 1;

const ECONNREFUSED: i32 = 111;
/// `-E2BIG`: a hash map is full.
const MAP_FULL: i32 = -7;
const TCP_CLOSE: u32 = 7;
const AF_INET6: u32 = 10;
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
fn tracking() -> bool {
    (unsafe { read_volatile(&raw const LB_CONFIG_TRACK_SOCKETS) }) != 0
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

#[inline(always)]
fn same_addr(a: &Addr, b: &Addr) -> bool {
    // Word by word: a slice comparison would call memcmp, which BPF lacks.
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// The socket's current peer (zero port when unconnected).
#[inline(always)]
fn sock_peer(sk: *const bpf_sock) -> (Addr, u16) {
    // Every field is read unconditionally and then selected: loads behind a branch
    // get merged into pointer arithmetic on the socket, which the verifier refuses.
    unsafe {
        let port = read_volatile(addr_of!((*sk).dst_port));
        let family = read_volatile(addr_of!((*sk).family));
        let ip4 = read_volatile(addr_of!((*sk).dst_ip4));
        let ip6 = [
            read_volatile(addr_of!((*sk).dst_ip6[0])),
            read_volatile(addr_of!((*sk).dst_ip6[1])),
            read_volatile(addr_of!((*sk).dst_ip6[2])),
            read_volatile(addr_of!((*sk).dst_ip6[3])),
        ];
        let addr = if family == AF_INET6 {
            ip6
        } else {
            addr_from_v4_raw(ip4)
        };
        (addr, port)
    }
}

/// Before a `connect()` is recorded: whether it will take effect at all, and the
/// entry of the address it replaces (a UDP socket connecting elsewhere, a TCP socket
/// retrying after a failed connect) deleted, so release leaves nothing behind.
#[inline(always)]
fn prepare_connect(sk: *const bpf_sock, proto: u8, cookie: u64) -> bool {
    // A second connect() on a connecting or connected TCP socket (non-blocking
    // clients poll this way) fails with EALREADY or EISCONN: nothing to record.
    if proto == IPPROTO_TCP && unsafe { read_volatile(addr_of!((*sk).state)) } != TCP_CLOSE {
        return false;
    }
    let (addr, port) = sock_peer(sk);
    if port != 0 {
        let key = SockRevKey {
            cookie,
            addr,
            port,
            _pad: [0; 3],
        };
        let _ = LB_SOCK_REVNAT.remove(key);
    }
    true
}

/// The socket's own storage, created if need be (and counted when it is).
#[inline(always)]
fn local_storage(sk: *mut bpf_sock) -> Option<&'static mut SockLocal> {
    // SAFETY: the kernel's storage for this socket, valid while the program runs; the
    // socket is locked by the hook, so no other program touches it meanwhile.
    if let Some(local) = unsafe { LB_SOCK_LOCAL.get_ptr(sk.cast(), false).as_mut() } {
        return Some(local);
    }
    let local = unsafe { LB_SOCK_LOCAL.get_ptr(sk.cast(), true).as_mut() }?;
    count(stat::LOCAL_CREATED);
    Some(local)
}

/// Adds `entry` to the socket's ring unless it is there already.
#[inline(always)]
fn remember_locally(local: &mut SockLocal, entry: &SockLocalEntry) {
    for i in 0..SOCK_LOCAL_ENTRIES {
        let e = &local.entries[i];
        if e.kind == entry.kind
            && e.svc_id == entry.svc_id
            && e.backend_port == entry.backend_port
            && e.orig_port == entry.orig_port
            && same_addr(&e.backend, &entry.backend)
            && same_addr(&e.orig, &entry.orig)
        {
            return;
        }
    }
    let slot = (local.next as usize) & (SOCK_LOCAL_ENTRIES - 1);
    local.entries[slot] = *entry;
    local.next = local.next.wrapping_add(1);
}

/// Records a translation so replies and getpeername() can be translated back and
/// the socket found if its backend goes away.
#[inline(always)]
fn record(
    ctx: &SockAddrContext,
    hook: Hook,
    sk: *mut bpf_sock,
    rev_key: &SockRevKey,
    rev_value: &SockRevValue,
) {
    let svc_id = rev_value.svc_id;
    let local_entry = |kind| SockLocalEntry {
        backend: rev_key.addr,
        orig: rev_value.addr,
        svc_id,
        backend_port: rev_key.port,
        orig_port: rev_value.port,
        kind,
        _pad: [0; 3],
    };
    if !tracking() {
        // Unconnected UDP passes here once per datagram: write only what is new.
        let known = hook == Hook::Sendmsg
            && unsafe { LB_SOCK_REVNAT_LRU.get(rev_key) }.is_some_and(|v| *v == *rev_value);
        if !known && let Err(err) = LB_SOCK_REVNAT_LRU.insert(rev_key, rev_value, 0) {
            warn!(
                ctx,
                "frontend {}: recording the translated socket failed ({})", svc_id, err
            );
            count(stat::REVNAT_UPDATE_FAILED);
        }
        return;
    }
    if hook == Hook::Sendmsg {
        // Kept with the socket: freed with it, never evicted by other sockets.
        match local_storage(sk) {
            Some(local) => remember_locally(local, &local_entry(LOCAL_SENT)),
            None => count(stat::REVNAT_UPDATE_FAILED),
        }
        return;
    }
    match LB_SOCK_REVNAT.insert(rev_key, rev_value, 0) {
        Ok(()) => {}
        Err(MAP_FULL) => {
            // Full: keep the translation with the socket and flag it, so replies still
            // translate and userspace can still find the socket (sock_diag) to
            // terminate it.
            count(stat::REVNAT_FULL);
            match local_storage(sk) {
                Some(local) => {
                    remember_locally(local, &local_entry(LOCAL_OVERFLOW));
                    if local.flags & SOCK_LOCAL_F_OVERFLOWED == 0 {
                        local.flags |= SOCK_LOCAL_F_OVERFLOWED;
                        count(stat::OVERFLOWED_SOCKETS);
                    }
                }
                None => count(stat::REVNAT_UPDATE_FAILED),
            }
        }
        Err(err) => {
            warn!(
                ctx,
                "frontend {}: recording the translated socket failed ({})", svc_id, err
            );
            count(stat::REVNAT_UPDATE_FAILED);
        }
    }
}

/// Whether the calling task's pod is balanced here: not when one of its cgroup's
/// ancestors (the pod's cgroup) is in `LB_WORKLOADS` with another mode. Ancestors are
/// looked up by level from the top, so the daemon need not know at which level of
/// the hierarchy (which its cgroup namespace may hide) pods sit.
#[inline(always)]
fn socket_balanced() -> bool {
    if LB_WORKLOAD_COUNT.get(0).copied().unwrap_or(0) == 0 {
        return true;
    }
    let mut level = 1;
    while level <= workload_mode::MAX_LEVEL {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if let Some(mode) = unsafe { LB_WORKLOADS.get(id) } {
            return *mode == workload_mode::SOCKET;
        }
        level += 1;
    }
    true
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
    if !socket_balanced() {
        count(stat::WORKLOAD_SKIPPED);
        return ALLOW;
    }
    let dst = if ipv4_socket {
        addr_from_v4_raw(unsafe { read_volatile(addr_of!((*sa).user_ip4)) })
    } else {
        read_ip6(sa)
    };
    let port = read_port(sa);
    let mut key = ServiceKey::new(dst, port, proto, SCOPE_INTERNAL, 0);

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // For session affinity, the client of socket-level balancing is the pod: its
    // network namespace.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut client = AffinityKey::netns(netns_cookie, 0);
    let hash = if proto == IPPROTO_UDP {
        hash64(cookie)
    } else {
        unsafe { bpf_get_prandom_u32() }
    };

    match select_backend(&mut key, hash, &mut client) {
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

            let sk = unsafe { (*sa).__bindgen_anon_1.sk };
            if hook == Hook::Sendmsg || !tracking() || prepare_connect(sk, proto, cookie) {
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
                    netns_cookie,
                };
                record(ctx, hook, sk, &rev_key, &rev_value);
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

/// What the socket dialled to reach the backend in `rev_key`, if it was translated.
#[inline(always)]
fn remembered(sa: *const bpf_sock_addr, rev_key: &SockRevKey) -> Option<(Addr, u16)> {
    if !tracking() {
        return unsafe { LB_SOCK_REVNAT_LRU.get(rev_key) }.map(|v| (v.addr, v.port));
    }
    if let Some(v) = unsafe { LB_SOCK_REVNAT.get(rev_key) } {
        return Some((v.addr, v.port));
    }
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    // SAFETY: as in local_storage.
    let local = unsafe { LB_SOCK_LOCAL.get_ptr(sk.cast(), false).as_ref() }?;
    for i in 0..SOCK_LOCAL_ENTRIES {
        let e = &local.entries[i];
        if e.kind != LOCAL_EMPTY
            && e.backend_port == rev_key.port
            && same_addr(&e.backend, &rev_key.addr)
        {
            return Some((e.orig, e.orig_port));
        }
    }
    None
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
    let Some((orig_addr, orig_port)) = remembered(sa, &rev_key) else {
        return ALLOW;
    };
    if ipv4_socket {
        if !addr_is_v4(&orig_addr) {
            return ALLOW;
        }
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), orig_addr[3]) };
    } else {
        write_ip6(sa, &orig_addr);
    }
    write_port(sa, orig_port);
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

/// A socket goes away: its `LB_SOCK_REVNAT` entry goes with it (the kernel frees its
/// own storage). Runs for every inet socket released in the cgroup; costs one hash
/// delete and one storage lookup.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let proto = unsafe { read_volatile(addr_of!((*sk).protocol)) } as u8;
    if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return ALLOW;
    }
    let (addr, port) = sock_peer(sk);
    if port != 0 {
        let key = SockRevKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            addr,
            port,
            _pad: [0; 3],
        };
        if LB_SOCK_REVNAT.remove(key).is_ok() {
            count(stat::REVNAT_RELEASED);
        }
    }
    // SAFETY: the released socket's storage, valid while the program runs.
    if let Some(local) = unsafe { LB_SOCK_LOCAL.get_ptr(ctx.as_ptr(), false).as_ref() } {
        count(stat::LOCAL_RELEASED);
        if local.flags & SOCK_LOCAL_F_OVERFLOWED != 0 {
            count(stat::OVERFLOWED_RELEASED);
        }
    }
    ALLOW
}
