//! Raw map writes: `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (Linux >= 5.6), which
//! aya 0.14 does not wrap, and single-element writes for older kernels. One batch syscall
//! writes thousands of entries, which is what keeps a full sync of 10 000 Services with
//! 100 000 endpoints well under a second.
//!
//! The kernel applies a batch element by element (each element atomically, in order),
//! exactly like a loop of single updates, so make-before-break ordering between batches
//! is preserved.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The bpf(2) syscall with the attribute struct `command` expects.
///
/// # Safety
/// `attr` must be laid out as the `union bpf_attr` member of `command`, and every
/// pointer in it valid for what the kernel reads and writes there.
unsafe fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: upheld by the caller.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs one batch command; on failure returns how many elements were processed.
fn run(
    command: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), (usize, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at key/value arrays of `count` elements of the map's key and
    // value sizes, which the caller guarantees; the kernel writes back only `count`.
    unsafe { bpf(command, &mut attr) }.map_err(|err| (attr.count as usize, err))
}

/// `union bpf_attr`'s member for single-element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn elem(
    command: libc::c_long,
    fd: BorrowedFd<'_>,
    key: *const u8,
    value: *const u8,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as u64,
        value: value as u64,
        ..Default::default()
    };
    // SAFETY: key and value point at values of the map's key and value sizes.
    unsafe { bpf(command, &mut attr) }
}

/// One BPF_MAP_UPDATE_ELEM, for kernels without batch operations.
pub fn update_one<K, V>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    elem(
        BPF_MAP_UPDATE_ELEM,
        fd,
        (key as *const K).cast(),
        (value as *const V).cast(),
    )
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// One BPF_MAP_LOOKUP_ELEM; `None` when the key is absent.
pub fn lookup_one<K, V: Copy + Default>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    match elem(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        (key as *const K).cast(),
        // The kernel writes the value through this pointer.
        (&mut value as *mut V).cast::<u8>().cast_const(),
    ) {
        Ok(()) => Ok(Some(value)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// One BPF_MAP_DELETE_ELEM, for kernels without batch operations.
pub fn delete_one<K>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    elem(
        BPF_MAP_DELETE_ELEM,
        fd,
        (key as *const K).cast(),
        std::ptr::null(),
    )
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The key after `key` (the first key for `None`): BPF_MAP_GET_NEXT_KEY, for map
/// types without batch lookups (LPM tries).
pub fn next_key<K: Copy + Default>(fd: BorrowedFd<'_>, key: Option<&K>) -> io::Result<Option<K>> {
    let mut next = K::default();
    let result = elem(
        BPF_MAP_GET_NEXT_KEY,
        fd,
        key.map_or(std::ptr::null(), |k| (k as *const K).cast()),
        (&mut next as *mut K).cast(),
    );
    match result {
        Ok(()) => Ok(Some(next)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The kernel's internal ENOTSUPP, which BPF commands can return to userspace.
const ENOTSUPP: i32 = 524;

/// Whether an error means "this kernel or map type has no batch operations".
pub fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// Writes `entries` (keys and values of exactly the map's sizes).
pub fn update<K: Copy + Sync, V: Copy + Sync>(
    fd: BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<()> {
    in_parallel(entries, |part| update_in_order(fd, part))
}

/// Entries from which one batch is written by several threads. The kernel's hash
/// inserts are most of a large sync (a million backends and as many slots: about
/// 2 s on one core), and inserts into different buckets do not contend. Batches are
/// still written one after another, so the ordering between them holds; within one
/// batch no order is needed (a phase writes only entries nothing points at yet).
const PARALLEL_FROM: usize = 16_384;

/// Runs `write` over `entries` in one piece, or in one piece per core (at most four)
/// when there are many; the first error wins.
fn in_parallel<T: Sync>(
    entries: &[T],
    write: impl Fn(&[T]) -> io::Result<()> + Sync,
) -> io::Result<()> {
    if entries.len() < PARALLEL_FROM {
        return write(entries);
    }
    // (Reads the cgroup's CPU quota: only asked for large batches.)
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if workers < 2 {
        return write(entries);
    }
    let write = &write;
    std::thread::scope(|scope| {
        let parts: Vec<_> = entries
            .chunks(entries.len().div_ceil(workers))
            .map(|part| scope.spawn(move || write(part)))
            .collect();
        parts
            .into_iter()
            .map(|part| {
                part.join()
                    .unwrap_or_else(|_| Err(io::Error::other("map writer panicked")))
            })
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    })
}

fn update_in_order<K: Copy, V: Copy>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> io::Result<()> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    let mut done = 0;
    while done < entries.len() {
        let key_ptr = keys[done..].as_ptr().cast::<u8>();
        let value_ptr = values[done..].as_ptr().cast::<u8>();
        match run(
            BPF_MAP_UPDATE_BATCH,
            fd,
            key_ptr,
            value_ptr,
            entries.len() - done,
        ) {
            Ok(()) => return Ok(()),
            Err((0, err)) => return Err(err),
            Err((processed, _)) => done += processed,
        }
    }
    Ok(())
}

/// Deletes `keys`; keys already gone are skipped.
pub fn delete<K: Copy + Sync>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    in_parallel(keys, |part| delete_in_order(fd, part))
}

fn delete_in_order<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let key_ptr = keys[done..].as_ptr().cast::<u8>();
        match run(
            BPF_MAP_DELETE_BATCH,
            fd,
            key_ptr,
            std::ptr::null(),
            keys.len() - done,
        ) {
            Ok(()) => return Ok(()),
            // The kernel stops at the first missing key: step over it.
            Err((processed, err)) if err.raw_os_error() == Some(libc::ENOENT) => {
                done += processed + 1
            }
            Err((_, err)) => return Err(err),
        }
    }
    Ok(())
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Reads every entry of a hash map with `BPF_MAP_LOOKUP_BATCH` (a few syscalls for
/// hundreds of thousands of entries, where iterating costs two per entry). Entries
/// added or deleted meanwhile may or may not be seen, as with any iteration.
pub fn lookup_all<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    const CHUNK: usize = 4096;
    let mut out = Vec::new();
    // The batch position is opaque (a bucket index for hash maps); a key-sized buffer
    // holds any of the kernel's forms.
    let token_len = size_of::<K>().max(8);
    let mut in_token = vec![0u8; token_len];
    let mut out_token = vec![0u8; token_len];
    let mut first = true;
    let mut chunk = CHUNK;
    loop {
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: key, value and token buffers are sized for `count` elements of the
        // map's key and value types; the kernel writes at most that much.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = attr.count as usize;
        match result {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(got));
                return Ok(out);
            }
            // One bucket holds more than a chunk: retry it with room for all.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 2;
                continue;
            }
            Err(err) => return Err(err),
        }
        out.extend(keys.into_iter().zip(values).take(got));
        in_token.copy_from_slice(&out_token);
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use super::*;

    /// `union bpf_attr`'s `BPF_MAP_CREATE` member, as far as needed here.
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    /// A hash map of u32 to u64 that allocates on insert, like the datapath's.
    fn hash_map(max_entries: u32) -> io::Result<OwnedFd> {
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        let mut attr = CreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 4,
            value_size: 8,
            max_entries,
            map_flags: lb_common::BPF_F_NO_PREALLOC,
        };
        // SAFETY: a BPF_MAP_CREATE attribute; the kernel returns a new descriptor.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &mut attr as *mut CreateAttr,
                size_of::<CreateAttr>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just handed to this process alone.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Batches large enough to be written from several threads land whole, and so do
    /// deletes; what was not deleted keeps its value.
    #[test]
    #[ignore = "needs root (creates a BPF map); cargo xtask test runs it with --include-ignored"]
    fn large_batches_are_written_and_deleted_whole() {
        let map = hash_map(300_000).expect("a BPF hash map");
        let entries: Vec<(u32, u64)> = (1..=200_000u32).map(|k| (k, u64::from(k) * 3)).collect();
        assert!(entries.len() >= 2 * PARALLEL_FROM);
        update(map.as_fd(), &entries).unwrap();
        let mut read: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        read.sort();
        assert_eq!(read, entries);
        let gone: Vec<u32> = (1..=200_000u32).filter(|k| k % 2 == 0).collect();
        delete(map.as_fd(), &gone).unwrap();
        // Deleting what is gone already is no error.
        delete(map.as_fd(), &gone).unwrap();
        let mut left: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        left.sort();
        let kept: Vec<(u32, u64)> = entries.into_iter().filter(|(k, _)| k % 2 == 1).collect();
        assert_eq!(left, kept);
    }
}
