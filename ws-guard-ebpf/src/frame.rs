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

impl Frame<'_> {
    /// Writes `bytes` at `offset`, or does nothing and returns `None` past the end.
    #[inline(always)]
    pub fn store<const N: usize>(&self, offset: usize, bytes: &[u8; N]) -> Option<()> {
        let start = self.0.data();
        let end = self.0.data_end();
        if offset > MAX_HEADER_OFFSET || start + offset + N > end {
            return None;
        }
        // SAFETY: inside [data, data_end) as checked above.
        unsafe { ((start + offset) as *mut [u8; N]).write_unaligned(*bytes) };
        Some(())
    }

    /// Frame length. From the helper: the verifier forbids arithmetic between packet pointers.
    #[inline(always)]
    pub fn len(&self) -> usize {
        // SAFETY: the context pointer is the program's own.
        unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(self.0.ctx as *mut _) as usize }
    }
}
