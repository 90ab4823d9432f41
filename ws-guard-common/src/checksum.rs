//! The Internet checksum (RFC 1071), over fixed-size byte arrays so the eBPF verifier sees
//! bounded loops.

/// Adds `bytes` as big-endian 16-bit words to the running sum `acc`.
#[inline(always)]
pub fn add<const N: usize>(mut acc: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    if N % 2 == 1 {
        acc += (bytes[N - 1] as u32) << 8;
    }
    acc
}

/// Folds the running sum and complements it: the value to store in a checksum field.
#[inline(always)]
pub fn finish(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2 (before complement).
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(add(0, &b)), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(
            finish(add(0, &[0x12, 0x34, 0x56])),
            finish(add(0, &[0x12, 0x34, 0x56, 0]))
        );
    }

    #[test]
    fn a_correct_checksum_sums_to_zero() {
        let mut h = [
            0x45u8, 0, 0, 0x28, 0, 0, 0x40, 0, 0x40, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        let c = finish(add(0, &h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(finish(add(0, &h)), 0);
    }
}
