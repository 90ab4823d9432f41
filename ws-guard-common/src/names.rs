//! Kernel object names. The kernel keeps only the first 15 bytes of a map or program name, so
//! every name is checked here at compile time and against the built object by a test.

/// The XDP program that enforces the limits on ingress.
pub const PROG_XDP: &str = "wsg_xdp";
/// The `sock:inet_sock_set_state` tracepoint program that learns connection state.
pub const PROG_SOCK_STATE: &str = "wsg_sock_state";
/// An XDP program never attached, run by userspace with BPF_PROG_TEST_RUN to change accounting
/// state atomically inside the kernel (see [`crate::maps::ControlOp`]).
pub const PROG_CONTROL: &str = "wsg_control";

/// Per-port limits, an array indexed by TCP port.
pub const MAP_PORTS: &str = "WSG_PORTS";
/// Global settings (prefix lengths, monitor mode), a one-element array.
pub const MAP_GLOBAL: &str = "WSG_GLOBAL";
/// Per source key: live connections, the flow filter and the new-connection rate window.
pub const MAP_SOURCES: &str = "WSG_SOURCES";
/// Tracked connections: admitted attempts whose handshake has not completed yet, and
/// connections the kernel has established (`FlowValue::state`).
pub const MAP_FLOWS: &str = "WSG_FLOWS";
/// One all-zero source state: the initial value of new entries (too large for the BPF stack).
pub const MAP_ZERO: &str = "WSG_ZERO";
/// Per-CPU decision counters: a [`crate::maps::Counter`] array per protected port and address
/// family (see [`crate::maps::stats_bucket`]).
pub const MAP_STATS: &str = "WSG_STATS";

/// Allowlist: a longest-prefix-match trie of CIDRs (see [`crate::policy::cidr_key`]).
pub const MAP_ALLOW: &str = "WSG_ALLOW";
/// Denylist: a longest-prefix-match trie of CIDRs.
pub const MAP_DENY: &str = "WSG_DENY";
/// Banned source keys and until when ([`crate::maps::BanValue`]); never evicted from.
pub const MAP_BANS: &str = "WSG_BANS";
/// Ring buffer of [`crate::maps::BanEvent`]s, from the XDP program to the daemon.
pub const MAP_EVENTS: &str = "WSG_EVENTS";

/// Per-CPU scratch space for the headers handed to the kernel's SYN-cookie helpers.
pub const MAP_SCRATCH: &str = "WSG_SCRATCH";
/// Cookies already used by an admitted connection (flow -> cookie), so a replayed ACK is not
/// another connection; LRU (only sources that completed a handshake ever have an entry).
pub const MAP_COOKIES: &str = "WSG_COOKIES";

/// The SYN-cookie half of the XDP limiter, tail-called by [`PROG_XDP`] through [`MAP_JUMP`]
/// (a program of its own: the verifier checks it apart, with a stack of its own).
pub const PROG_COOKIE: &str = "wsg_cookie";
/// The tail-call table of [`PROG_XDP`]: index 0 is [`PROG_COOKIE`].
pub const MAP_JUMP: &str = "WSG_JUMP";
/// [`PROG_COOKIE`]'s per-CPU copy of the segment it handles.
pub const MAP_SEG: &str = "WSG_SEG";

/// Per-CPU refusal memos ([`crate::maps::RefusalMemo`], see [`crate::memo`]).
pub const MAP_MEMO: &str = "WSG_MEMO";
/// The memos' epoch: a one-element array, moved on by whatever may end a refusal.
pub const MAP_EPOCH: &str = "WSG_EPOCH";

/// The benchmark's object only (`ws-guard-ebpf-counted`): counts of hash-map operations.
pub const MAP_OPS: &str = "WSG_OPS";
/// [`MAP_OPS`] slot: lookups of `WSG_SOURCES` and `WSG_FLOWS`.
pub const OP_LOOKUPS: u32 = 0;
/// [`MAP_OPS`] slot: inserts (failed ones included).
pub const OP_INSERTS: u32 = 1;
/// [`MAP_OPS`] slot: deletes.
pub const OP_DELETES: u32 = 2;
/// Slots of [`MAP_OPS`].
pub const OPS_COUNTED: u32 = 3;

/// Every program name.
pub const PROGRAMS: [&str; 4] = [PROG_XDP, PROG_SOCK_STATE, PROG_CONTROL, PROG_COOKIE];
/// Every map name the program defines (the aya-log map excluded).
pub const MAPS: [&str; 16] = [
    MAP_PORTS,
    MAP_ZERO,
    MAP_GLOBAL,
    MAP_SOURCES,
    MAP_FLOWS,
    MAP_STATS,
    MAP_ALLOW,
    MAP_DENY,
    MAP_BANS,
    MAP_EVENTS,
    MAP_SCRATCH,
    MAP_COOKIES,
    MAP_JUMP,
    MAP_SEG,
    MAP_MEMO,
    MAP_EPOCH,
];

/// The kernel's limit on object names (BPF_OBJ_NAME_LEN - 1).
pub const MAX_NAME_LEN: usize = 15;

const fn all_fit(names: &[&str]) -> bool {
    let mut i = 0;
    while i < names.len() {
        if names[i].len() > MAX_NAME_LEN {
            return false;
        }
        i += 1;
    }
    true
}
const _: () = assert!(all_fit(&PROGRAMS) && all_fit(&MAPS));
const _: () = assert!(BANS_LAYOUT_SINCE <= LAYOUT_VERSION);

/// Version of the map layouts; part of the pin directory so a daemon never adopts maps whose
/// layout it does not know.
pub const LAYOUT_VERSION: u32 = 6;

/// The first layout version whose ban map (`SourceKey` -> `BanValue`, and what they mean) is
/// this version's: an upgrade from it or later carries the bans in force over. Raise it to
/// `LAYOUT_VERSION` when either type changes.
pub const BANS_LAYOUT_SINCE: u32 = 3;
