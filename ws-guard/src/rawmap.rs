//! Hash maps whose value size is set at load time (the source map, sized by the rate ring),
//! which aya's typed maps cannot read: they check the value size against a Rust type. The
//! three map commands this needs, on the map's descriptor.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::Context as _;
use aya::maps::MapData;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `bpf_attr` of the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// The value, or the next key.
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed, and its pointers point to
    // buffers of the map's key and value sizes (checked by the callers).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A hash map read as bytes.
pub struct RawHashMap<'a> {
    fd: BorrowedFd<'a>,
    key_size: usize,
    value_size: usize,
}

impl<'a> RawHashMap<'a> {
    /// The map behind `data`.
    pub fn new(data: &'a MapData) -> anyhow::Result<Self> {
        let info = data.info().context("reading the map's description")?;
        Ok(Self {
            fd: data.fd().as_fd(),
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
        })
    }

    fn attr(&self, key: &[u8]) -> ElemAttr {
        assert_eq!(key.len(), self.key_size, "key of the map's size");
        ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            ..ElemAttr::default()
        }
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        let mut a = self.attr(key);
        a.value = value.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `key`; false if it had no entry.
    pub fn remove(&self, key: &[u8]) -> io::Result<bool> {
        let mut a = self.attr(key);
        match bpf(BPF_MAP_DELETE_ELEM, &mut a) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The key after `key` (the first without one); `None` after the last. A key deleted
    /// meanwhile makes the walk start over, as with every hash map walk: callers bound it.
    fn next_key(&self, key: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        let mut next = vec![0u8; self.key_size];
        let mut a = match key {
            Some(k) => self.attr(k),
            None => ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                ..ElemAttr::default()
            },
        };
        a.value = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Up to `limit` entries as the walk finds them (an entry deleted between its key and its
    /// value is left out).
    pub fn entries(&self, limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        for _ in 0..limit {
            let Some(next) = self.next_key(key.as_deref())? else {
                break;
            };
            if let Some(v) = self.get(&next)? {
                out.push((next.clone(), v));
            }
            key = Some(next);
        }
        Ok(out)
    }
}

/// `T` from the first bytes of `b`.
///
/// # Panics
/// If `b` is shorter than `T`.
pub fn read_pod<T: aya::Pod>(b: &[u8]) -> T {
    assert!(b.len() >= size_of::<T>());
    // SAFETY: length checked; `Pod` types take any bit pattern.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

/// The bytes of `v`.
pub fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain data without padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}
