//! TC programs on kernels without TCX links (< 6.6): classic `cls_bpf` filters on a
//! `clsact` qdisc, managed over rtnetlink.
//!
//! A netlink filter belongs to the interface, not to a file descriptor: it stays when
//! the daemon exits or is killed, like a pinned TCX link, and keeps running its
//! program (which keeps the pinned maps in use). Every filter of ours sits at one
//! fixed priority and handle ([`PRIORITY`], [`HANDLE`]), so a new daemon finds it and
//! replaces its program in place (`RTM_NEWTFILTER` without `NLM_F_CREATE`: cls_bpf
//! swaps the program under RCU, no packet sees no filter). The program is also pinned
//! under the pin directory's `links/` so `lb cleanup` can find the filters running it.
//!
//! aya attaches and replaces; this module adds what aya 0.14 keeps private: listing
//! the filters of a hook (to tell ours from someone else's, and for cleanup) and
//! deleting one by priority and handle.

use std::{
    ffi::CStr,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::programs::TcAttachType;

/// Our filters' priority on both clsact hooks: run first (lower runs earlier); every
/// packet that is not ours leaves the program unchanged with `TC_ACT_OK`.
pub const PRIORITY: u16 = 1;
/// Our filters' handle ("LB"): with [`PRIORITY`], what identifies them.
pub const HANDLE: u32 = 0x4c42;
/// Name prefix of the TC programs (cls_bpf keeps the program name on the filter).
pub const PROGRAM_PREFIX: &str = "lb_tc_";

const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const ETH_P_ALL: u16 = 0x0003;

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
struct TcMsg {
    family: u8,
    _pad1: u8,
    _pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    /// Priority in the upper 16 bits, protocol (network order) in the lower.
    info: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    header: NlMsgHdr,
    tc: TcMsg,
}

/// One filter on a clsact hook, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The classifier (`bpf` for ours).
    pub kind: String,
    /// The BPF program's name, for `bpf` filters.
    pub program_name: Option<String>,
    /// The BPF program's id, for `bpf` filters.
    pub program_id: Option<u32>,
}

impl Filter {
    /// Whether this is one of ours: our slot and one of our programs.
    pub fn is_ours(&self) -> bool {
        self.priority == PRIORITY
            && self.handle == HANDLE
            && self
                .program_name
                .as_deref()
                .is_some_and(|n| n.starts_with(PROGRAM_PREFIX))
    }
}

/// The clsact parent of a hook (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS/EGRESS)`).
fn parent(direction: TcAttachType) -> u32 {
    match direction {
        TcAttachType::Egress => 0xFFFF_FFF3,
        _ => 0xFFFF_FFF2,
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The kernel always answers; should it not, the sync must not hang on it.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn send<T: Copy>(fd: &OwnedFd, request: &T) -> io::Result<()> {
    // SAFETY: `request` is one of the plain-old-data requests above, of the length
    // given.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (request as *const T).cast(),
            size_of::<T>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// The attributes (type without flag bits, payload) packed in `buf`.
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while buf.len() >= 4 {
        let len = read_u16(buf, 0) as usize;
        let kind = read_u16(buf, 2) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        found.push((kind, &buf[4..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    found
}

fn c_string(payload: &[u8]) -> String {
    CStr::from_bytes_until_nul(payload)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned())
}

/// Parses one `RTM_NEWTFILTER` message body (tcmsg and attributes).
fn parse_filter(body: &[u8]) -> Option<Filter> {
    if body.len() < size_of::<TcMsg>() {
        return None;
    }
    let handle = read_u32(body, 8);
    let info = read_u32(body, 16);
    let mut filter = Filter {
        priority: (info >> 16) as u16,
        handle,
        kind: String::new(),
        program_name: None,
        program_id: None,
    };
    for (kind, payload) in attributes(&body[size_of::<TcMsg>()..]) {
        match kind {
            TCA_KIND => filter.kind = c_string(payload),
            TCA_OPTIONS => {
                for (option, value) in attributes(payload) {
                    match option {
                        TCA_BPF_NAME => filter.program_name = Some(c_string(value)),
                        TCA_BPF_ID if value.len() >= 4 => {
                            filter.program_id = Some(read_u32(value, 0))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(filter)
}

/// Reads replies until the dump ends or the request is acknowledged, handing the body
/// of every message of type `kind` to `each`.
fn receive(
    fd: &OwnedFd,
    seq: u32,
    kind_wanted: u16,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into a buffer we own, of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<NlMsgHdr>() {
            let len = read_u32(rest, 0) as usize;
            let kind = read_u16(rest, 4);
            let msg_seq = read_u32(rest, 8);
            if len < size_of::<NlMsgHdr>() || len > rest.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            let body = &rest[size_of::<NlMsgHdr>()..len];
            if msg_seq == seq {
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = if body.len() >= 4 {
                            i32::from_ne_bytes([body[0], body[1], body[2], body[3]])
                        } else {
                            -libc::EIO
                        };
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    kind if kind == kind_wanted => each(body),
                    _ => {}
                }
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The filters on `ifindex`'s clsact hook for `direction` (none if it has no clsact).
pub fn filters(ifindex: u32, direction: TcAttachType) -> io::Result<Vec<Filter>> {
    let fd = socket()?;
    let seq = 1;
    let request = Request {
        header: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: RTM_GETTFILTER,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            pid: 0,
        },
        tc: TcMsg {
            ifindex: ifindex as i32,
            parent: parent(direction),
            ..Default::default()
        },
    };
    send(&fd, &request)?;
    let mut found = Vec::new();
    match receive(&fd, seq, RTM_NEWTFILTER, |body| {
        found.extend(parse_filter(body))
    }) {
        Ok(()) => {}
        // No clsact qdisc (or no such hook): nothing attached.
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
        Err(err) => return Err(err),
    }
    // A dump also lists each priority's chain head (handle 0, no program).
    found.retain(|f| f.handle != 0);
    Ok(found)
}

/// Deletes the filter at `priority`/`handle` on `ifindex`'s hook.
pub fn delete(ifindex: u32, direction: TcAttachType, priority: u16, handle: u32) -> io::Result<()> {
    let fd = socket()?;
    let seq = 2;
    let request = Request {
        header: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: RTM_DELTFILTER,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq,
            pid: 0,
        },
        tc: TcMsg {
            ifindex: ifindex as i32,
            handle,
            parent: parent(direction),
            info: (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be()),
            ..Default::default()
        },
    };
    send(&fd, &request)?;
    receive(&fd, seq, RTM_NEWTFILTER, |_| {})
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_LINK: u16 = 5;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IfInfoMsg {
    family: u8,
    _pad: u8,
    kind: u16,
    index: i32,
    flags: u32,
    change: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LinkRequest {
    header: NlMsgHdr,
    link: IfInfoMsg,
}

/// The peer of interface `ifindex` of the current namespace (`IFLA_LINK`: for a
/// veth, its other end's index in the other end's namespace), if it has one. How a
/// pod's host-side interface is found from inside the pod.
pub fn link_peer(ifindex: u32) -> io::Result<Option<u32>> {
    let fd = socket()?;
    let seq = 3;
    let request = LinkRequest {
        header: NlMsgHdr {
            len: size_of::<LinkRequest>() as u32,
            kind: RTM_GETLINK,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq,
            pid: 0,
        },
        link: IfInfoMsg {
            index: ifindex as i32,
            ..Default::default()
        },
    };
    send(&fd, &request)?;
    let mut peer = None;
    receive(&fd, seq, RTM_NEWLINK, |body| {
        if body.len() < size_of::<IfInfoMsg>() {
            return;
        }
        for (kind, payload) in attributes(&body[size_of::<IfInfoMsg>()..]) {
            if kind == IFLA_LINK && payload.len() >= 4 {
                peer = Some(read_u32(payload, 0));
            }
        }
    })?;
    // An interface that is its own link (most, when the attribute is present) has no
    // peer.
    Ok(peer.filter(|&p| p != ifindex && p != 0))
}

/// Every interface of the current network namespace (index, name).
pub fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = list;
    loop {
        // SAFETY: within the list, up to and including its terminator.
        let entry = unsafe { &*cursor };
        if entry.if_index == 0 {
            break;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { CStr::from_ptr(entry.if_name) }
            .to_string_lossy()
            .into_owned();
        found.push((entry.if_index, name));
        // SAFETY: not past the terminator (checked above).
        cursor = unsafe { cursor.add(1) };
    }
    // SAFETY: the list if_nameindex returned.
    unsafe { libc::if_freenameindex(list) };
    Ok(found)
}

/// Deletes our filters that run one of `program_ids`, on every interface of the
/// current network namespace; returns how many.
pub fn delete_running(program_ids: &[u32]) -> io::Result<usize> {
    let mut deleted = 0;
    for (ifindex, _) in interfaces()? {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            for filter in filters(ifindex, direction)? {
                if filter.is_ours()
                    && filter
                        .program_id
                        .is_some_and(|id| program_ids.contains(&id))
                {
                    match delete(ifindex, direction, filter.priority, filter.handle) {
                        Ok(()) => deleted += 1,
                        // Gone meanwhile (the interface or the filter).
                        Err(err)
                            if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
                        Err(err) => return Err(err),
                    }
                }
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((payload.len() + 4) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_a_bpf_filter_and_tells_ours() {
        let tc = TcMsg {
            ifindex: 3,
            handle: HANDLE,
            parent: parent(TcAttachType::Ingress),
            info: (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be()),
            ..Default::default()
        };
        // SAFETY: TcMsg is plain old data.
        let mut body = unsafe {
            std::slice::from_raw_parts((&tc as *const TcMsg).cast::<u8>(), size_of::<TcMsg>())
        }
        .to_vec();
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut options = attr(TCA_BPF_NAME, b"lb_tc_ingress\0");
        options.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        body.extend(attr(TCA_OPTIONS, &options));
        let filter = parse_filter(&body).expect("parsed");
        assert_eq!(
            filter,
            Filter {
                priority: PRIORITY,
                handle: HANDLE,
                kind: "bpf".into(),
                program_name: Some("lb_tc_ingress".into()),
                program_id: Some(42),
            }
        );
        assert!(filter.is_ours());
        let someone_else = Filter {
            program_name: Some("cil_from_netdev".into()),
            ..filter.clone()
        };
        assert!(!someone_else.is_ours());
        let other_slot = Filter {
            handle: 1,
            ..filter
        };
        assert!(!other_slot.is_ours());
    }

    #[test]
    fn truncated_attributes_stop_parsing() {
        assert!(attributes(&[8, 0, 1, 0, b'b']).is_empty());
        assert!(parse_filter(&[0; 4]).is_none());
    }
}
