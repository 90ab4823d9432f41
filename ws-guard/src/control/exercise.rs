//! Everything the daemon does with a control-socket request short of the kernel, as one
//! function that panics on a broken invariant: for the `control` fuzz target
//! (`fuzz/fuzz_targets/control.rs`) and the deterministic mutations every test run makes.

use super::{
    handler::change_overrides,
    protocol::{Request, parse_request},
};
use crate::{
    config::Config,
    state::{self, Overrides},
};

/// Runs one request line against the config file `file` and the runtime overrides `o` (which
/// it changes as the daemon would when the change is accepted). Returns whether the line was a
/// request that changed the overrides.
///
/// Invariants: parsing never panics; an accepted request encodes back to JSON that parses to
/// the same request; a change the daemon would accept gives an effective config that keeps
/// [`Config::assert_invariants`] and overrides that survive the state file's TOML round trip;
/// every error has a message.
pub fn exercise_request(line: &[u8], file: &Config, o: &mut Overrides) -> bool {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.is_empty());
            return false;
        }
    };
    let json = serde_json::to_vec(&req).expect("an accepted request encodes");
    assert_eq!(
        parse_request(&json).as_ref(),
        Ok(&req),
        "round trip of {}",
        String::from_utf8_lossy(&json)
    );
    let mut next = o.clone();
    match change_overrides(&req, &mut next, file) {
        None => {
            assert!(!matches!(
                req,
                Request::LimitsSet { .. }
                    | Request::LimitsReset { .. }
                    | Request::Monitor { .. }
                    | Request::ListAdd { .. }
                    | Request::ListAddAll { .. }
                    | Request::ListRemove { .. }
                    | Request::ListReset { .. }
            ));
            assert_eq!(&next, o, "a read-only request changed the overrides");
            false
        }
        Some(Err(e)) => {
            assert!(!e.is_empty());
            false
        }
        Some(Ok(what)) => {
            assert!(!what.is_empty());
            match state::effective(file, &next) {
                Ok(cfg) => {
                    cfg.assert_invariants();
                    let text = toml::to_string(&next).expect("overrides encode as TOML");
                    let back: Overrides = toml::from_str(&text).expect("overrides decode");
                    assert_eq!(back, next, "state file round trip:\n{text}");
                    *o = next;
                    true
                }
                Err(e) => {
                    assert!(!e.is_empty());
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;

    const SEEDS: &[&str] = &[
        r#"{"command":"status"}"#,
        r#"{"command":"limits_get","port":9000}"#,
        r#"{"command":"limits_set","port":9000,"change":{"max_connections":"5"}}"#,
        r#"{"command":"limits_set","port":9000,"change":{"new_connections":"3/10s","rate_action":"reject"}}"#,
        r#"{"command":"limits_set","port":9001,"change":{"max_connections":"none","connection_action":"drop"}}"#,
        r#"{"command":"limits_reset","port":9000}"#,
        r#"{"command":"list_add","list":"allow","cidr":"198.18.0.0/24"}"#,
        r#"{"command":"list_add","list":"deny","cidr":"2001:2::/48"}"#,
        r#"{"command":"list_remove","list":"deny","cidr":"2001:2::/48"}"#,
        r#"{"command":"list_show","list":"allow"}"#,
        r#"{"command":"list_reset","list":"deny"}"#,
        r#"{"command":"bans_list"}"#,
        r#"{"command":"ban_add","addr":"198.18.0.5","port":9000,"duration_ms":1000}"#,
        r#"{"command":"ban_remove","addr":"2001:2::5"}"#,
        r#"{"command":"sources_top","by":"drops","n":5}"#,
        r#"{"command":"monitor","on":true}"#,
    ];

    /// Every seed is a request; the changes among them are accepted in order.
    #[test]
    fn seeds_are_requests() {
        let file = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        let mut o = Overrides::default();
        for seed in SEEDS {
            assert!(parse_request(seed.as_bytes()).is_ok(), "{seed}");
        }
        let changed = SEEDS
            .iter()
            .filter(|s| exercise_request(s.as_bytes(), &file, &mut o))
            .count();
        assert_eq!(changed, 9, "{o:?}");
    }

    /// The fuzz target's job, cheaply and on stable, in every test run: every truncation of
    /// every seed, and byte flips and replacements with bytes JSON cares about, run as
    /// sequences against one set of overrides.
    #[test]
    fn mutated_requests_never_break_an_invariant() {
        let file = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        let mut o = Overrides::default();
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut accepted, mut refused) = (0, 0);
        let mut check = |bytes: &[u8], o: &mut Overrides| {
            if exercise_request(bytes, &file, o) {
                accepted += 1;
            } else {
                refused += 1;
            }
        };
        for seed in SEEDS {
            for len in 0..=seed.len() {
                check(&seed.as_bytes()[..len], &mut o);
            }
        }
        const BYTES: &[u8] = b"\0\"{}[]:,-+.0123456789/eE\\ nt\xff";
        for _ in 0..20_000 {
            let mut m = SEEDS[(next() % SEEDS.len() as u64) as usize]
                .as_bytes()
                .to_vec();
            for _ in 0..1 + next() % 3 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = match next() % 3 {
                    0 => m[i] ^ (1 << (next() % 8)),
                    1 => BYTES[(next() % BYTES.len() as u64) as usize],
                    _ => m[i].wrapping_add(1),
                };
            }
            check(&m, &mut o);
        }
        assert!(
            accepted > 100 && refused > 1000,
            "{accepted} accepted, {refused} refused"
        );
    }
}
