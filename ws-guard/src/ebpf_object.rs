//! The eBPF object as loaded: the embedded one, with the source map's values sized for the
//! rate ring the configuration needs (see `ws_guard_common::maps::source_value_size`).

use anyhow::{Context as _, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use ws_guard_common::maps::{RATE_SLOTS, SourceState, source_value_size};
use ws_guard_common::names;

/// Offset of `value_size` in a legacy `maps`-section map definition (`struct bpf_map_def`:
/// type, key_size, value_size, max_entries, map_flags, id, pinning).
const VALUE_SIZE_AT: usize = 8;
const MAP_DEF_LEN: u64 = 28;

/// A copy of an eBPF object, aligned for aya (which wants 4-byte alignment).
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    /// The bytes, for `EbpfLoader::load`.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes of the u64 buffer, which holds at least that many.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// `object` with `WSG_SOURCES`' value size set for a rate ring of `ring` stamps (1 to
/// [`RATE_SLOTS`]).
pub fn with_rate_ring(object: &[u8], ring: u32) -> anyhow::Result<Object> {
    ensure!(
        (1..=RATE_SLOTS as u32).contains(&ring),
        "a rate ring of {ring} attempts (1 to {RATE_SLOTS})"
    );
    let at = value_size_offset(object)?;
    let mut out = Object {
        words: vec![0; object.len().div_ceil(8)],
        len: object.len(),
    };
    out.bytes_mut().copy_from_slice(object);
    let field = &mut out.bytes_mut()[at..at + 4];
    let declared = u32::from_le_bytes(field.try_into().expect("4 bytes"));
    ensure!(
        declared as usize == size_of::<SourceState>(),
        "{} is declared with {declared}-byte values, not a SourceState's {}",
        names::MAP_SOURCES,
        size_of::<SourceState>()
    );
    field.copy_from_slice(&(source_value_size(ring) as u32).to_le_bytes());
    Ok(out)
}

/// Where `WSG_SOURCES`' value size is in the object's bytes.
fn value_size_offset(object: &[u8]) -> anyhow::Result<usize> {
    let file = object::File::parse(object).context("parsing the eBPF object")?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(names::MAP_SOURCES))
        .with_context(|| format!("the eBPF object has no symbol {}", names::MAP_SOURCES))?;
    let index = sym
        .section_index()
        .with_context(|| format!("{} is in no section", names::MAP_SOURCES))?;
    let section = file.section_by_index(index)?;
    if section.name()? != "maps" || sym.size() != MAP_DEF_LEN {
        bail!(
            "{} is not a {MAP_DEF_LEN}-byte map definition in section \"maps\"",
            names::MAP_SOURCES
        );
    }
    let (start, len) = section
        .file_range()
        .with_context(|| format!("section of {} has no data", names::MAP_SOURCES))?;
    ensure!(
        sym.address() + MAP_DEF_LEN <= len,
        "map definition past its section"
    );
    Ok((start + sym.address()) as usize + VALUE_SIZE_AT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_map_gets_the_ring_size_and_nothing_else_changes() {
        let original = crate::guard::OBJECT;
        let at = value_size_offset(original).unwrap();
        for ring in [1, 9, 32] {
            let o = with_rate_ring(original, ring).unwrap();
            let b = o.bytes();
            assert_eq!(b.len(), original.len());
            assert_eq!(b.as_ptr() as usize % 8, 0);
            assert_eq!(
                u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize,
                source_value_size(ring)
            );
            let differing = b.iter().zip(original).filter(|(x, y)| x != y).count();
            assert!(differing <= 4, "{differing} bytes changed");
        }
        assert!(with_rate_ring(original, 0).is_err());
        assert!(with_rate_ring(original, 33).is_err());
    }
}
