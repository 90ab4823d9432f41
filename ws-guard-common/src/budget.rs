//! The work budget of the XDP program's paths, in kernel hash-map operations per packet
//! (`ws-guard-ebpf/src/xdp.rs` is written to it; `cargo xtask bench` counts the operations
//! each path makes with a build of the same programs that counts them, `ws-guard-ebpf/src/
//! counted.rs`, and checks them against it: BENCHMARKS.md "Work per path").
//!
//! Besides these counts: a refusal takes no slot or rate attempt that it then gives back (the
//! slot count is read before one is taken, the rate judged before the slot), and adds to one
//! per-source counter (its refusals) atomically.

/// Hash-map operations of one path, per packet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Which path.
    pub path: &'static str,
    /// Lookups (`WSG_SOURCES`, `WSG_FLOWS`).
    pub lookups: f64,
    /// Inserts (a flow tracked; a failed insert counts).
    pub inserts: f64,
    /// Deletes.
    pub deletes: f64,
    /// Whether a lookup of the flow is allowed on top, in the share of its source's flow
    /// filter buckets that are non-zero (the retransmission check of a refusal).
    pub filter_lookups: bool,
}

/// A frame to a port that is not protected (or not TCP): no hash-map operation.
pub const UNPROTECTED: Budget = Budget {
    path: "unprotected traffic",
    lookups: 0.0,
    inserts: 0.0,
    deletes: 0.0,
    filter_lookups: false,
};

/// A SYN refused at `max_connections` or by the rate: the source's entry, and the flow only
/// where the source's filter says the SYN may repeat a tracked attempt (a refusal of the source
/// the CPU refused last at `max_connections` makes less: [`REMEMBERED_REFUSAL`]).
pub const REFUSAL: Budget = Budget {
    path: "refusal (concurrency or rate)",
    lookups: 1.0,
    inserts: 0.0,
    deletes: 0.0,
    filter_lookups: true,
};

/// A SYN refused at `max_connections` of the source the CPU refused there last (a flood from
/// one source): no lookup of the entry (the CPU's refusal memo, [`crate::memo`]), the flow only
/// where the memo's copy of the filter says the SYN may repeat a tracked attempt.
pub const REMEMBERED_REFUSAL: Budget = Budget {
    path: "refusal of the source refused last (memo)",
    lookups: 0.0,
    inserts: 0.0,
    deletes: 0.0,
    filter_lookups: true,
};

/// A SYN admitted from a source that has an entry: its entry, and the flow's insert (which is
/// also the retransmission check).
pub const ADMISSION: Budget = Budget {
    path: "admission of a known source",
    lookups: 1.0,
    inserts: 1.0,
    deletes: 0.0,
    filter_lookups: false,
};

/// A retransmitted SYN of a half-open attempt: the source's entry, the insert that fails, and
/// the flow's entry to restart its clock.
pub const RETRANSMISSION: Budget = Budget {
    path: "retransmitted SYN",
    lookups: 2.0,
    inserts: 1.0,
    deletes: 0.0,
    filter_lookups: false,
};
