//! The same programs as main.rs, with the hash-map operations of `WSG_SOURCES` and `WSG_FLOWS`
//! counted in a per-CPU array, for the benchmark's work-per-path check
//! (`ws_guard_common::budget`). Never shipped or attached.
#![no_std]
#![no_main]
// Atomic fetch-and-add on map values: the BPF target's core has no atomic types.
#![allow(internal_features)]
#![feature(core_intrinsics)]

/// Counts each hash-map operation in `WSG_OPS` (lookups, inserts, deletes).
mod ops {
    use aya_ebpf::{macros::map, maps::PerCpuArray};
    use ws_guard_common::names::{OP_DELETES, OP_INSERTS, OP_LOOKUPS, OPS_COUNTED};

    #[map]
    static WSG_OPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(OPS_COUNTED, 0);

    #[inline(always)]
    fn bump(i: u32) {
        if let Some(p) = WSG_OPS.get_ptr_mut(i) {
            // SAFETY: a per-CPU slot, no other writer while this program runs on this CPU.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    pub fn lookup() {
        bump(OP_LOOKUPS)
    }

    #[inline(always)]
    pub fn insert() {
        bump(OP_INSERTS)
    }

    #[inline(always)]
    pub fn delete() {
        bump(OP_DELETES)
    }
}

include!("programs.rs");
