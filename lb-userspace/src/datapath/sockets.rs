//! Terminating sockets whose backend went away.
//!
//! A connected UDP socket (or an established TCP connection) that the datapath pointed
//! at a pod keeps talking to that pod's address after the pod is gone: the rewrite
//! happened once, at `connect()`. Clients then send into the void until they time out,
//! the most reported failure of socket-level load balancers. When a backend leaves a
//! Service, the daemon looks up the sockets it translated to that backend (in
//! `LB_SOCK_REVNAT`, keyed by socket cookie) and destroys them through netlink
//! `SOCK_DESTROY`: TCP peers get a reset and the application `ECONNABORTED`, a UDP
//! socket gets `ECONNABORTED` and is disconnected, so the client reconnects and the
//! datapath picks a live backend.
//!
//! Sockets live in the pods' network namespaces and sock_diag only sees the caller's
//! namespace, so every namespace on the host is visited from a short-lived thread that
//! `setns()`s into it (only those whose cookie matches a socket to destroy, where the
//! kernel can tell: `SO_NETNS_COOKIE`, Linux >= 5.14). Only sockets whose cookie is in
//! the translation map *and* whose current peer is the removed backend are touched:
//! never a socket that dialled the pod directly, never an unconnected UDP socket.
//!
//! When the translation map was full, a socket's translation lives in its own storage
//! (`LB_SOCK_LOCAL`) instead, flagged as overflow. While any such socket is open, the
//! dumps also ask the kernel for that storage (`INET_DIAG_REQ_SK_BPF_STORAGES`) and a
//! socket whose overflow entry names the removed backend, and whose peer it still is,
//! is destroyed too: a full map never leaves a stale socket behind.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
    thread,
};

use anyhow::Result;
use lb_common::{
    Addr, LOCAL_OVERFLOW, SOCK_LOCAL_F_OVERFLOWED, SockLocal, SockRevKey, SockRevValue,
    addr_from_ip, addr_to_ip, port_from_net, port_to_net,
};
use tracing::{debug, warn};

use crate::reconcile::GoneBackend;

/// A socket the datapath translated to a backend that is now gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrackedSocket {
    pub cookie: u64,
    /// 0 when unknown.
    pub netns_cookie: u64,
    pub backend: SocketAddr,
    pub protocol: u8,
}

/// The reverse-translation entries (`LB_SOCK_REVNAT`) of sockets that were translated,
/// for the frontend they were translated for, to a backend that is now gone. Entries
/// of the same backend under another frontend that still has it are not selected.
pub fn sockets_of_gone(
    entries: &[(SockRevKey, SockRevValue)],
    gone: &[GoneBackend],
) -> Vec<(SockRevKey, TrackedSocket)> {
    let wanted: HashMap<(u32, Addr, u16), &GoneBackend> = gone
        .iter()
        .map(|g| {
            let key = (
                g.svc_id,
                addr_from_ip(g.backend.addr.ip),
                port_to_net(g.backend.addr.port),
            );
            (key, g)
        })
        .collect();
    entries
        .iter()
        .filter_map(|(key, value)| {
            let g = wanted.get(&(value.svc_id, key.addr, key.port))?;
            Some((
                *key,
                TrackedSocket {
                    cookie: key.cookie,
                    netns_cookie: value.netns_cookie,
                    backend: SocketAddr::new(g.backend.addr.ip, g.backend.addr.port),
                    protocol: g.backend.protocol.number(),
                },
            ))
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TerminateReport {
    /// Live sockets (established, or connected UDP) the kernel destroyed.
    pub destroyed: usize,
    /// Of which found through their own storage (the socket map was full).
    pub destroyed_overflowed: usize,
    /// Network namespaces searched.
    pub namespaces: usize,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SO_NETNS_COOKIE: i32 = 71;
/// `INET_DIAG_REQ_SK_BPF_STORAGES`, and in it `SK_DIAG_BPF_STORAGE_REQ_MAP_FD`.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// Reply attributes: `INET_DIAG_SK_BPF_STORAGES` > `SK_DIAG_BPF_STORAGE` >
/// `SK_DIAG_BPF_STORAGE_MAP_VALUE`.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// TCP states (as a sock_diag bit mask) of sockets worth destroying: ESTABLISHED,
/// SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. A
/// connected UDP socket reports ESTABLISHED.
const LIVE_STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);

fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] plain-old-data struct without padding holes that
    // matter to the kernel (all fields are integers).
    unsafe { std::slice::from_raw_parts((value as *const T).cast(), size_of::<T>()) }
}

fn read_struct<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    let mut value = T::default();
    // SAFETY: length checked; T is plain old data.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut value as *mut T).cast(),
            size_of::<T>(),
        )
    };
    Some(value)
}

fn sock_addr(family: u8, addr: &[u8; 16], port: [u8; 2]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(port);
    let ip = match family as i32 {
        libc::AF_INET => IpAddr::from([addr[0], addr[1], addr[2], addr[3]]),
        libc::AF_INET6 => IpAddr::from(*addr),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Same endpoint, treating an IPv4-mapped IPv6 address as the IPv4 one.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }`.
fn storage_request(map: BorrowedFd<'_>) -> Vec<u8> {
    let fd = map.as_raw_fd() as u32;
    let mut inner = Vec::new();
    inner.extend_from_slice(&8u16.to_ne_bytes());
    inner.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
    inner.extend_from_slice(&fd.to_ne_bytes());
    let mut outer = Vec::new();
    outer.extend_from_slice(&((4 + inner.len()) as u16).to_ne_bytes());
    outer.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
    outer.extend_from_slice(&inner);
    outer
}

/// Netlink attributes in `data`: (type without flags, payload).
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    out
}

/// The socket-storage value in a sock_diag reply's attributes (one map was asked
/// for, so the first value is its).
fn storage_value(attrs: &[u8]) -> Option<SockLocal> {
    let (_, storages) = attributes(attrs)
        .into_iter()
        .find(|(kind, _)| *kind == INET_DIAG_SK_BPF_STORAGES)?;
    let (_, storage) = attributes(storages)
        .into_iter()
        .find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = attributes(storage)
        .into_iter()
        .find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    read_struct::<SockLocal>(value)
}

/// The backend an overflowed socket was translated to, if it is one of `gone` (for the
/// frontend it was translated for).
fn overflowed_to_gone(local: &SockLocal, gone: &[GoneBackend]) -> Option<SocketAddr> {
    if local.flags & SOCK_LOCAL_F_OVERFLOWED == 0 {
        return None;
    }
    local
        .entries
        .iter()
        .filter(|e| e.kind == LOCAL_OVERFLOW)
        .find_map(|e| {
            let backend = SocketAddr::new(addr_to_ip(&e.backend), port_from_net(e.backend_port));
            gone.iter()
                .any(|g| {
                    g.svc_id == e.svc_id
                        && same_endpoint(
                            backend,
                            SocketAddr::new(g.backend.addr.ip, g.backend.addr.port),
                        )
                })
                .then_some(backend)
        })
}

struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// The network namespace cookie (Linux >= 5.14), or None if the kernel cannot say.
    fn netns_cookie(&self) -> Option<u64> {
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid out-pointers sized for a u64.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(cookie)
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        req: &InetDiagReqV2,
        attrs: &[u8],
    ) -> io::Result<u32> {
        self.seq += 1;
        let header = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + size_of::<InetDiagReqV2>() + attrs.len()) as u32,
            kind,
            flags,
            seq: self.seq,
            pid: 0,
        };
        let mut message = Vec::with_capacity(header.len as usize);
        message.extend_from_slice(as_bytes(&header));
        message.extend_from_slice(as_bytes(req));
        message.extend_from_slice(attrs);
        // SAFETY: sending an initialised buffer on our socket (to the kernel, address 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives messages until DONE (dumps) or an ERROR/ACK (requests); `on_msg` gets
    /// each data message's payload.
    fn receive(&self, seq: u32, mut on_msg: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut data = &buf[..n as usize];
            while let Some(header) = read_struct::<NlMsgHdr>(data) {
                let len = header.len as usize;
                if len < size_of::<NlMsgHdr>() || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[size_of::<NlMsgHdr>()..len];
                if header.seq == seq {
                    match header.kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                                .unwrap_or(0);
                            return if code == 0 {
                                Ok(())
                            } else {
                                Err(io::Error::from_raw_os_error(-code))
                            };
                        }
                        _ => on_msg(payload),
                    }
                }
                let aligned = (len + 3) & !3;
                data = &data[aligned.min(data.len())..];
            }
        }
    }

    /// The sockets of one family and protocol in the current namespace that still
    /// talk to a peer: established (or connected, for UDP) and half-closed ones; not
    /// TIME_WAIT or closed sockets, which have nothing left to reset. With
    /// `storage_map`, each comes with its value in that socket-storage map, if any.
    fn dump(
        &mut self,
        family: u8,
        protocol: u8,
        storage_map: Option<BorrowedFd<'_>>,
    ) -> io::Result<Vec<(InetDiagMsg, Option<SockLocal>)>> {
        let req = InetDiagReqV2 {
            family,
            protocol,
            states: LIVE_STATES,
            ..Default::default()
        };
        let attrs = storage_map.map(storage_request).unwrap_or_default();
        let seq = self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &req,
            &attrs,
        )?;
        let mut sockets = Vec::new();
        self.receive(seq, |payload| {
            if let Some(msg) = read_struct::<InetDiagMsg>(payload) {
                let storage =
                    storage_map.and_then(|_| storage_value(&payload[size_of::<InetDiagMsg>()..]));
                sockets.push((msg, storage));
            }
        })?;
        Ok(sockets)
    }

    fn destroy(&mut self, protocol: u8, msg: &InetDiagMsg) -> io::Result<()> {
        let req = InetDiagReqV2 {
            family: msg.family,
            protocol,
            states: u32::MAX,
            id: msg.id,
            ..Default::default()
        };
        let seq = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req, &[])?;
        self.receive(seq, |_| {})
    }
}

/// Whether the kernel can destroy sockets through sock_diag (`CONFIG_INET_DIAG_DESTROY`):
/// destroying a TCP socket that does not exist fails with ENOENT where it can, and
/// with EOPNOTSUPP where it cannot.
pub fn probe_destroy() -> bool {
    let Ok(mut diag) = SockDiag::open() else {
        return false;
    };
    let msg = InetDiagMsg {
        family: libc::AF_INET as u8,
        ..Default::default()
    };
    !matches!(
        diag.destroy(libc::IPPROTO_TCP as u8, &msg),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP)
    )
}

/// Sockets whose translation overflowed into their own storage, to be found through
/// sock_diag.
#[derive(Clone, Copy)]
pub struct Overflowed<'a> {
    /// `LB_SOCK_LOCAL`.
    pub storage_map: BorrowedFd<'a>,
    pub gone: &'a [GoneBackend],
}

/// Destroys `sockets` (and overflowed sockets of `overflowed`) in the current thread's
/// network namespace; returns how many of each, or None if the namespace was skipped.
fn destroy_here(
    sockets: &[TrackedSocket],
    wanted_netns: &BTreeSet<u64>,
    overflowed: Option<Overflowed<'_>>,
) -> io::Result<Option<(usize, usize)>> {
    let mut diag = SockDiag::open()?;
    // Overflowed sockets carry no namespace cookie: every namespace is searched then.
    if overflowed.is_none()
        && let Some(cookie) = diag.netns_cookie()
        && !wanted_netns.contains(&cookie)
        && !wanted_netns.contains(&0)
    {
        return Ok(None);
    }
    let by_cookie: BTreeMap<u64, &TrackedSocket> = sockets.iter().map(|s| (s.cookie, s)).collect();
    let mut protocols: BTreeSet<u8> = sockets.iter().map(|s| s.protocol).collect();
    if let Some(o) = overflowed {
        protocols.extend(o.gone.iter().map(|g| g.backend.protocol.number()));
    }
    let (mut destroyed, mut destroyed_overflowed) = (0, 0);
    for protocol in protocols {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for (msg, storage) in diag.dump(family, protocol, overflowed.map(|o| o.storage_map))? {
                let cookie = msg.id.cookie[0] as u64 | (msg.id.cookie[1] as u64) << 32;
                let peer = sock_addr(msg.family, &msg.id.dst, msg.id.dport);
                // The socket must still be connected to the removed backend.
                let tracked = by_cookie.get(&cookie).is_some_and(|t| {
                    t.protocol == protocol && peer.is_some_and(|p| same_endpoint(p, t.backend))
                });
                let overflow = !tracked
                    && overflowed.is_some_and(|o| {
                        storage
                            .as_ref()
                            .and_then(|local| overflowed_to_gone(local, o.gone))
                            .is_some_and(|backend| peer.is_some_and(|p| same_endpoint(p, backend)))
                    });
                if !tracked && !overflow {
                    continue;
                }
                match diag.destroy(protocol, &msg) {
                    Ok(()) => {
                        destroyed += 1;
                        destroyed_overflowed += usize::from(overflow);
                    }
                    // Closed in the meantime.
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(Some((destroyed, destroyed_overflowed)))
}

/// Every network namespace on the host, once each: those of running processes and
/// those bind-mounted under /run/netns.
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    };
    consider(PathBuf::from("/proc/self/ns/net"));
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            consider(entry.path());
        }
    }
    paths
}

/// Destroys the given sockets (and overflowed ones) wherever they live. Namespaces
/// are visited one thread each (a thread's `setns` does not affect the rest of the
/// daemon).
pub fn terminate(
    sockets: &[TrackedSocket],
    overflowed: Option<Overflowed<'_>>,
) -> Result<TerminateReport> {
    let mut report = TerminateReport::default();
    if sockets.is_empty() && overflowed.is_none_or(|o| o.gone.is_empty()) {
        return Ok(report);
    }
    let wanted_netns: BTreeSet<u64> = sockets.iter().map(|s| s.netns_cookie).collect();
    for path in network_namespaces() {
        let Ok(ns) = fs::File::open(&path) else {
            continue;
        };
        let result = thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<Option<(usize, usize)>> {
                    // SAFETY: setns on this (short-lived, dedicated) thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    destroy_here(sockets, &wanted_netns, overflowed)
                })
                .join()
        });
        match result {
            Ok(Ok(Some((destroyed, destroyed_overflowed)))) => {
                report.namespaces += 1;
                report.destroyed += destroyed;
                report.destroyed_overflowed += destroyed_overflowed;
            }
            Ok(Ok(None)) => {}
            Ok(Err(err)) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                warn!(
                    "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off); stale sockets stay until the client gives up"
                );
                break;
            }
            // A process (and its namespace) may vanish while we look.
            Ok(Err(err)) => debug!(netns = %path.display(), "skipping namespace: {err}"),
            Err(_) => warn!(netns = %path.display(), "socket termination thread panicked"),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;
    use crate::{
        model::{BackendAddr, Protocol},
        reconcile::BackendIdentity,
    };

    fn cookie_of(fd: i32) -> u64 {
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SO_COOKIE = 57
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                57,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        cookie
    }

    fn revnat(cookie: u64, backend: &str, svc_id: u32) -> (SockRevKey, SockRevValue) {
        let backend: SocketAddr = backend.parse().unwrap();
        (
            SockRevKey {
                cookie,
                addr: addr_from_ip(backend.ip()),
                port: port_to_net(backend.port()),
                _pad: [0; 3],
            },
            SockRevValue {
                svc_id,
                netns_cookie: 4242,
                ..Default::default()
            },
        )
    }

    fn gone(svc_id: u32, backend: &str, protocol: Protocol) -> GoneBackend {
        let backend: SocketAddr = backend.parse().unwrap();
        GoneBackend {
            svc_id,
            backend: BackendIdentity {
                addr: BackendAddr {
                    ip: backend.ip(),
                    port: backend.port(),
                },
                protocol,
            },
        }
    }

    #[test]
    fn only_sockets_of_the_gone_backend_under_its_frontend_are_selected() {
        let entries = [
            revnat(1, "10.244.1.21:53", 7),    // kube-dns UDP -> dns-1: gone
            revnat(2, "10.244.1.22:53", 7),    // kube-dns UDP -> dns-2: stays
            revnat(3, "10.244.1.21:53", 8),    // kube-dns TCP -> dns-1: frontend 8 keeps it
            revnat(4, "10.244.1.21:54", 7),    // another port on the same pod
            revnat(5, "[fd00:244::15]:53", 9), // IPv6 frontend -> dns-1: gone too
        ];
        let selected = sockets_of_gone(
            &entries,
            &[
                gone(7, "10.244.1.21:53", Protocol::Udp),
                gone(9, "[fd00:244::15]:53", Protocol::Udp),
            ],
        );
        let cookies: Vec<u64> = selected.iter().map(|(_, s)| s.cookie).collect();
        assert_eq!(cookies, vec![1, 5]);
        let first = selected[0].1;
        assert_eq!(first.netns_cookie, 4242);
        assert_eq!(first.protocol, lb_common::IPPROTO_UDP);
        assert_eq!(first.backend, "10.244.1.21:53".parse().unwrap());
        assert!(sockets_of_gone(&entries, &[]).is_empty());
    }

    /// Builds one netlink attribute (4-byte aligned).
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn overflowed(svc_id: u32, backend: &str) -> SockLocal {
        let backend: SocketAddr = backend.parse().unwrap();
        let mut local = SockLocal {
            flags: SOCK_LOCAL_F_OVERFLOWED,
            ..Default::default()
        };
        local.entries[1] = lb_common::SockLocalEntry {
            backend: addr_from_ip(backend.ip()),
            backend_port: port_to_net(backend.port()),
            svc_id,
            kind: LOCAL_OVERFLOW,
            ..Default::default()
        };
        local
    }

    #[test]
    fn storage_values_are_found_in_nested_reply_attributes() {
        let local = overflowed(7, "10.244.1.21:6379");
        // SK_DIAG_BPF_STORAGE { MAP_ID, MAP_VALUE }, after an unrelated attribute, with
        // the nested flag set as the kernel sends it.
        let value = unsafe {
            std::slice::from_raw_parts(
                (&local as *const SockLocal).cast::<u8>(),
                size_of::<SockLocal>(),
            )
        };
        let storage = [
            attr(2, &42u32.to_ne_bytes()),
            attr(SK_DIAG_BPF_STORAGE_MAP_VALUE, value),
        ]
        .concat();
        let storages = attr(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
        let reply = [
            attr(8, &[1]), // INET_DIAG_SHUTDOWN
            attr(INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, &storages),
        ]
        .concat();
        assert_eq!(storage_value(&reply), Some(local));
        assert_eq!(storage_value(&attr(8, &[1])), None);
        // Truncated input is not misread.
        assert_eq!(storage_value(&reply[..reply.len() - 8]), None);
    }

    #[test]
    fn overflowed_sockets_match_only_their_frontend_and_backend() {
        let local = overflowed(7, "10.244.1.21:6379");
        let backend: SocketAddr = "10.244.1.21:6379".parse().unwrap();
        assert_eq!(
            overflowed_to_gone(&local, &[gone(7, "10.244.1.21:6379", Protocol::Tcp)]),
            Some(backend)
        );
        // Another frontend lost that backend; another backend left this frontend.
        assert_eq!(
            overflowed_to_gone(&local, &[gone(8, "10.244.1.21:6379", Protocol::Tcp)]),
            None
        );
        assert_eq!(
            overflowed_to_gone(&local, &[gone(7, "10.244.1.22:6379", Protocol::Tcp)]),
            None
        );
        // Unconnected sends (not flagged) are never terminated.
        let sent = SockLocal { flags: 0, ..local };
        assert_eq!(
            overflowed_to_gone(&sent, &[gone(7, "10.244.1.21:6379", Protocol::Tcp)]),
            None
        );
    }

    #[test]
    fn mapped_and_plain_ipv4_are_the_same_endpoint() {
        let a: SocketAddr = "10.244.1.11:53".parse().unwrap();
        let b: SocketAddr = "[::ffff:10.244.1.11]:53".parse().unwrap();
        assert!(same_endpoint(a, b));
        assert!(!same_endpoint(a, "10.244.1.11:54".parse().unwrap()));
    }

    /// Destroys a real loopback UDP socket and a real TCP connection by cookie, and
    /// leaves a socket with the right cookie but another peer alone.
    #[test]
    #[ignore = "needs root (SOCK_DESTROY); cargo xtask test runs it with --include-ignored"]
    fn destroys_only_matching_sockets_by_cookie_and_peer() {
        assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
        use std::os::fd::AsRawFd;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        other.connect(server.local_addr().unwrap()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, _) = listener.accept().unwrap();

        let tracked = [
            TrackedSocket {
                cookie: cookie_of(client.as_raw_fd()),
                netns_cookie: 0,
                backend: server.local_addr().unwrap(),
                protocol: libc::IPPROTO_UDP as u8,
            },
            TrackedSocket {
                cookie: cookie_of(tcp.as_raw_fd()),
                netns_cookie: 0,
                backend: listener.local_addr().unwrap(),
                protocol: libc::IPPROTO_TCP as u8,
            },
            // Right cookie, wrong peer: must survive.
            TrackedSocket {
                cookie: cookie_of(other.as_raw_fd()),
                netns_cookie: 0,
                backend: "127.0.0.1:1".parse().unwrap(),
                protocol: libc::IPPROTO_UDP as u8,
            },
        ];
        let destroyed = destroy_here(&tracked, &BTreeSet::from([0]), None).unwrap();
        assert_eq!(destroyed, Some((2, 0)));
        let err = client.send(b"x").unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ECONNABORTED) | Some(libc::EDESTADDRREQ)
            ),
            "{err}"
        );
        let mut buf = [0u8; 1];
        use std::io::Read as _;
        let err = (&tcp).read(&mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        other.send(b"still fine").unwrap();
    }
}
