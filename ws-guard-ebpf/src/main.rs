//! ws-guard's kernel side. The entries are thin; the logic is in the modules and, where it can
//! be pure, in `ws-guard-common`, which the host tests run too.
#![no_std]
#![no_main]
// Atomic fetch-and-add on map values: the BPF target's core has no atomic types.
#![allow(internal_features)]
#![feature(core_intrinsics)]

/// Hash-map operation counts: nothing in the shipped object (see counted.rs).
mod ops {
    #[inline(always)]
    pub fn lookup() {}
    #[inline(always)]
    pub fn insert() {}
    #[inline(always)]
    pub fn delete() {}
}

include!("programs.rs");
