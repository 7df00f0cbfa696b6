//! Host preconditions: privileges, cgroup2, bpffs.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use tracing::info;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root (loading eBPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        );
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-parameter.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64)
}

/// The cgroup2 directory to attach to: `path` itself, or on hybrid hosts (cgroup v1
/// with the unified hierarchy beside it) `path/unified`, so a DaemonSet can mount the
/// host's /sys/fs/cgroup and name it whatever the host's layout.
pub fn resolve_cgroup2(path: &Path) -> Result<PathBuf> {
    let magic =
        fs_magic(path).with_context(|| format!("cgroup {} is not accessible", path.display()))?;
    if magic == CGROUP2_SUPER_MAGIC {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    if fs_magic(&unified).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC) {
        return Ok(unified);
    }
    bail!(
        "{} is not a cgroup2 directory (pass --cgroup with a cgroup v2 path)",
        path.display()
    )
}

/// The cgroup2 mount point, read from /proc/self/mountinfo (`/sys/fs/cgroup` on pure-v2
/// hosts, `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_cgroup2_mount(&mountinfo).ok_or_else(|| {
        anyhow::anyhow!("no cgroup2 file system is mounted (mount one, or pass --cgroup)")
    })
}

/// Finds the first cgroup2 mount point in mountinfo text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let code = u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(code as char);
            i += 4;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// Takes an exclusive lock on the pin directory itself, so two daemons never drive the
/// same maps (the second would adopt, then fight over, the first one's state). The lock
/// dies with the process, even on a crash, and leaves no file behind.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another lb daemon is using pin directory {}",
            pin_dir.display()
        );
    }
    Ok(dir)
}

/// The pid of the process holding `pin_dir`'s lock (a running daemon), from
/// /proc/locks. Read-only: taking the lock to test it could make a starting daemon fail.
pub fn lock_holder(pin_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(pin_dir).ok()?;
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let inode = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (inode == meta.ino()).then(|| fields.get(4)?.parse().ok())?
    })
}

/// Makes sure `pin_dir` can hold pins: its bpffs is mounted (mounting /sys/fs/bpf when
/// absent) and the directory exists.
pub fn bpffs_prepare(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    let default_bpffs = Path::new("/sys/fs/bpf");
    if !parent.exists() {
        bail!("{} does not exist", parent.display());
    }
    if fs_magic(parent)? != BPF_FS_MAGIC {
        if parent == default_bpffs {
            mount_bpffs_once(default_bpffs)?;
        } else {
            bail!(
                "{} is not on a bpf file system; choose a --pin-dir under /sys/fs/bpf",
                pin_dir.display()
            );
        }
    }
    create_private_dir(pin_dir)
}

/// Creates `dir` (and parents) if needed and makes it accessible to root only: the
/// pins in it grant access to the datapath's maps and links.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to root", dir.display()))?;
    Ok(())
}

const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
const BPF_FUNC_SK_STORAGE_GET: i32 = 107;
const BPF_FUNC_SET_RETVAL: i32 = 187;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov_r1_0() -> Insn {
    Insn {
        code: 0xb7,
        regs: 0x01,
        off: 0,
        imm: 0,
    }
}

const fn call(helper: i32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}

/// `r0 = 1; exit`.
const RETURN_1: [Insn; 2] = [
    Insn {
        code: 0xb7,
        regs: 0x00,
        off: 0,
        imm: 1,
    },
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// Loads a probe program; Ok if the kernel accepted it, else the errno and the
/// verifier's log.
fn probe_load(prog_type: u32, attach_type: u32, body: &[Insn]) -> Result<(), (i32, String)> {
    probe_load_fd(prog_type, attach_type, body).map(drop)
}

/// [`probe_load`], keeping the program.
fn probe_load_fd(
    prog_type: u32,
    attach_type: u32,
    body: &[Insn],
) -> Result<std::os::fd::OwnedFd, (i32, String)> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    #[repr(C)]
    #[derive(Default)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut insns = body.to_vec();
    insns.extend_from_slice(&RETURN_1);
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = LoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    // SAFETY: a valid BPF_PROG_LOAD attribute pointing at live instruction, license
    // and log buffers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut LoadAttr,
            std::mem::size_of::<LoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        return Err((errno, String::from_utf8_lossy(&log[..end]).into_owned()));
    }
    // SAFETY: the kernel returned a program descriptor we own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// Whether TC programs can be attached as TCX links (Linux >= 6.6), asked of the
/// kernel itself: a TCX link request for an interface index that does not exist
/// fails with ENODEV where TCX exists, and with EINVAL (unknown attach type) where it
/// does not. Nothing is attached either way.
pub fn probe_tcx() -> bool {
    use std::os::fd::AsRawFd as _;
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
    }
    // `r0 = -1 (TC_ACT_UNSPEC); exit` would do; any accepted program is enough.
    let Ok(program) = probe_load_fd(BPF_PROG_TYPE_SCHED_CLS, 0, &[]) else {
        return false;
    };
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: i32::MAX as u32,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    // SAFETY: a valid BPF_LINK_CREATE attribute.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &mut attr as *mut LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as libc::c_uint,
        )
    };
    if rc >= 0 {
        // Cannot happen (no such interface); never keep a link.
        // SAFETY: a descriptor the kernel just returned.
        unsafe { libc::close(rc as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV)
}

/// Whether programs of this type may call `helper`. The probe passes no valid
/// arguments, so the verifier refuses it either way; what matters is whether it
/// knew the helper.
fn helper_known(prog_type: u32, attach_type: u32, helper: i32) -> bool {
    match probe_load(prog_type, attach_type, &[mov_r1_0(), call(helper)]) {
        Ok(()) => true,
        Err((_, log)) => !log.contains("unknown func") && !log.is_empty(),
    }
}

/// Whether the kernel lets cgroup sock_addr programs call `bpf_set_retval` (Linux
/// >= 5.18).
pub fn probe_set_retval() -> bool {
    probe_load(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        &[mov_r1_0(), call(BPF_FUNC_SET_RETVAL)],
    )
    .is_ok()
}

/// What per-socket state lifetimes need, or why it is missing: a `cgroup/sock_release`
/// hook that can read the socket cookie (Linux >= 5.9) and socket storage in both
/// that hook and the socket-address hooks.
pub fn probe_socket_tracking() -> Result<(), String> {
    if let Err((errno, _)) = probe_load(
        BPF_PROG_TYPE_CGROUP_SOCK,
        BPF_CGROUP_INET_SOCK_RELEASE,
        &[call(BPF_FUNC_GET_SOCKET_COOKIE)],
    ) {
        return Err(format!(
            "the kernel has no cgroup/sock_release hook ({})",
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    for (prog_type, attach_type, hook) in [
        (
            BPF_PROG_TYPE_CGROUP_SOCK,
            BPF_CGROUP_INET_SOCK_RELEASE,
            "cgroup/sock_release",
        ),
        (
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            BPF_CGROUP_INET4_CONNECT,
            "cgroup/connect4",
        ),
    ] {
        if !helper_known(prog_type, attach_type, BPF_FUNC_SK_STORAGE_GET) {
            return Err(format!("{hook} programs cannot use socket storage"));
        }
    }
    Ok(())
}

/// Mounts bpffs at `target` unless another process just did: daemons starting
/// together (parallel tests, two instances on one node) would otherwise each see no
/// bpffs and stack one mount over the other.
fn mount_bpffs_once(target: &Path) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    // Under /run/lb, the one writable place of the DaemonSet's container.
    const LOCK: &str = "/run/lb/bpffs-mount.lock";
    create_private_dir(Path::new("/run/lb"))?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("opening {LOCK}"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {LOCK}"));
    }
    if fs_magic(target)? == BPF_FS_MAGIC {
        return Ok(());
    }
    mount_bpffs(target)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory
/// cgroup). Raise the soft limit to the hard one (no privilege needed), or to
/// unlimited where CAP_SYS_RESOURCE allows; on later kernels this changes nothing.
pub fn raise_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid out-parameter.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return;
        }
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit);
        }
    }
}

/// `lb mount-bpffs`: what the DaemonSet's init container runs so that pins live on
/// the host's bpffs (mounted there with bidirectional propagation) and survive the
/// daemon's container. Idempotent.
pub fn ensure_bpffs(target: &Path) -> Result<bool> {
    if fs_magic(target)? == BPF_FS_MAGIC {
        return Ok(false);
    }
    mount_bpffs(target)?;
    Ok(true)
}

fn mount_bpffs(target: &Path) -> Result<()> {
    let target_c = CString::new(target.as_os_str().as_bytes())?;
    let bpf = CString::new("bpf")?;
    // Root only: pins are the datapath's maps and links.
    let data = CString::new("mode=0700")?;
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target_c.as_ptr(),
            bpf.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", target.display()));
    }
    info!(path = %target.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_pure_v2_mount_with_optional_fields_and_escapes() {
        let mountinfo = "41 31 0:38 / /sys/fs/cgroup rw,relatime shared:1 master:2 - cgroup2 cgroup2 rw\n\
                         42 31 0:39 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(unescape_mountinfo("/mnt/my\\040cg"), "/mnt/my cg");
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(
            parse_cgroup2_mount("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
