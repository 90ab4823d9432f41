//! Bounds-checked access to the XDP frame, for the shared parser and the RST writer.

use aya_ebpf::programs::XdpContext;
use ws_guard_common::parse::{MAX_HEADER_OFFSET, Packet};

pub struct Frame<'a>(pub &'a XdpContext);

impl Packet for Frame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.0.data();
        let end = self.0.data_end();
        let len = core::mem::size_of::<T>();
        // The explicit bound keeps the offset's range small for the verifier.
        if offset > MAX_HEADER_OFFSET || start + offset + len > end {
            return None;
        }
        // SAFETY: inside [data, data_end) as checked above.
        Some(unsafe { ((start + offset) as *const T).read_unaligned() })
    }
}

/// A frame that can be read, written and resized: by packet pointers ([`Frame`]) or by helpers
/// ([`HelperFrame`]).
pub trait FrameIo: Packet {
    fn ctx(&self) -> &XdpContext;

    /// Writes `bytes` at `offset`, or does nothing and returns `None` past the end.
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Option<()>;

    /// Frame length. From the helper: the verifier forbids arithmetic between packet pointers.
    #[inline(always)]
    fn len(&self) -> usize {
        // SAFETY: the context pointer is the program's own.
        unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(self.ctx().ctx as *mut _) as usize }
    }
}

impl FrameIo for Frame<'_> {
    #[inline(always)]
    fn ctx(&self) -> &XdpContext {
        self.0
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Option<()> {
        let start = self.0.data();
        let end = self.0.data_end();
        if offset > MAX_HEADER_OFFSET || start + offset + N > end {
            return None;
        }
        // SAFETY: inside [data, data_end) as checked above.
        unsafe { ((start + offset) as *mut [u8; N]).write_unaligned(*bytes) };
        Some(())
    }
}

/// The frame read and written through the `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes`
/// helpers instead of packet pointers. Offsets given to a helper are plain arguments, so the
/// verifier need not track them exactly: paths that reach the SYN-cookie code from differently
/// shaped headers (VLAN tags, IP options) then look alike to it and are checked once, where
/// packet pointers would have it check the cookie code again for every header layout.
pub struct HelperFrame<'a>(pub &'a XdpContext);

impl Packet for HelperFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        // SAFETY: the helper writes exactly size_of::<T>() bytes into `v` or fails.
        let r = unsafe {
            aya_ebpf::helpers::bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                v.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: initialised by the successful copy (T is plain data).
        (r == 0).then(|| unsafe { v.assume_init() })
    }
}

impl FrameIo for HelperFrame<'_> {
    #[inline(always)]
    fn ctx(&self) -> &XdpContext {
        self.0
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Option<()> {
        // SAFETY: the helper reads N bytes from `bytes` and checks the frame's bounds.
        let r = unsafe {
            aya_ebpf::helpers::bpf_xdp_store_bytes(
                self.0.ctx,
                offset as u32,
                bytes.as_ptr() as *mut _,
                N as u32,
            )
        };
        (r == 0).then_some(())
    }
}
