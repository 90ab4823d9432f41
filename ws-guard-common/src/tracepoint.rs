//! The `sock:inet_sock_set_state` record: field offsets (userspace checks them against the
//! format in tracefs before attaching) and which transitions matter.

/// Offset of `int oldstate`.
pub const OLDSTATE: usize = 16;
/// Offset of `int newstate`.
pub const NEWSTATE: usize = 20;
/// Offset of `__u16 sport` (host order).
pub const SPORT: usize = 24;
/// Offset of `__u16 dport` (host order).
pub const DPORT: usize = 26;
/// Offset of `__u16 family`.
pub const FAMILY: usize = 28;
/// Offset of `__u16 protocol`.
pub const PROTOCOL: usize = 30;
/// Offset of `__u8 saddr[4]`.
pub const SADDR: usize = 32;
/// Offset of `__u8 daddr[4]`.
pub const DADDR: usize = 36;
/// Offset of `__u8 saddr_v6[16]`.
pub const SADDR_V6: usize = 40;
/// Offset of `__u8 daddr_v6[16]`.
pub const DADDR_V6: usize = 56;

/// Every field the program reads: (name in the format file, offset, size).
pub const FIELDS: [(&str, usize, usize); 10] = [
    ("oldstate", OLDSTATE, 4),
    ("newstate", NEWSTATE, 4),
    ("sport", SPORT, 2),
    ("dport", DPORT, 2),
    ("family", FAMILY, 2),
    ("protocol", PROTOCOL, 2),
    ("saddr", SADDR, 4),
    ("daddr", DADDR, 4),
    ("saddr_v6", SADDR_V6, 16),
    ("daddr_v6", DADDR_V6, 16),
];

pub const IPPROTO_TCP: u16 = 6;
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;

/// What a state change means for the accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A server socket finished its handshake (SYN_RECV to ESTABLISHED). The child socket's
    /// earlier LISTEN to SYN_RECV change is reported before its addresses are set, so it is
    /// not used.
    Established,
    /// Any socket reached CLOSE: every way a connection ends (FIN either side, RST either way,
    /// timeouts, a child that never finished its handshake) passes through it. TIME_WAIT is
    /// entered after it, so a connection in TIME_WAIT no longer holds a slot.
    Closed,
    /// Nothing to do.
    Other,
}

/// Classifies a state change.
#[inline(always)]
pub fn transition(old: i32, new: i32) -> Transition {
    if new == TCP_CLOSE && old != TCP_CLOSE {
        Transition::Closed
    } else if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        Transition::Established
    } else {
        Transition::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        assert_eq!(
            transition(TCP_SYN_RECV, TCP_ESTABLISHED),
            Transition::Established
        );
        // LISTEN -> SYN_RECV (child created, addresses not yet set) is ignored.
        assert_eq!(transition(10, TCP_SYN_RECV), Transition::Other);
        for old in [1, 3, 4, 5, 8, 9, 11] {
            assert_eq!(transition(old, TCP_CLOSE), Transition::Closed);
        }
        assert_eq!(transition(TCP_ESTABLISHED, 8), Transition::Other);
    }
}
