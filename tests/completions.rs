//! Shell completion, for real: the scripts `ws-guard completions bash|zsh|fish` prints are
//! loaded into bash, zsh and fish, and words are completed as a user's Tab would (zsh through
//! a pseudo-terminal, tests/data/zsh-complete.zsh). Needs bash, zsh and fish (`cargo xtask
//! setup` installs them); a missing shell fails the test.

use std::{path::Path, process::Command};

use ws_guard_tests::binary::binary;

/// What to complete, and candidates that must be offered (subcommands after the first word
/// are where clap_complete's bash script for a hyphenated name completed nothing).
const CASES: &[(&[&str], &[&str])] = &[
    (
        &["ws-guard", ""],
        &["limits", "allow", "status", "check-config"],
    ),
    (&["ws-guard", "limits", ""], &["get", "set", "reset"]),
    (&["ws-guard", "allow", ""], &["add", "remove", "list"]),
    (
        &["ws-guard", "limits", "set", "--"],
        &["--max-connections", "--new-connections", "--port"],
    ),
    (
        &["ws-guard", "sources", "top", "--by", ""],
        &["connections", "drops"],
    ),
];

fn script(shell: &str, dir: &Path) -> std::path::PathBuf {
    let out = Command::new(binary())
        .args(["completions", shell])
        .output()
        .expect("running ws-guard completions");
    assert!(out.status.success(), "{out:?}");
    let name = if shell == "zsh" {
        "_ws-guard"
    } else {
        "ws-guard"
    };
    let path = dir.join(name);
    std::fs::write(&path, out.stdout).unwrap();
    path
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program} ({e}): install it (`cargo xtask setup` does)")
        });
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(shell: &str, words: &[&str], got: &str, want: &[&str]) {
    let got: Vec<&str> = got
        .lines()
        .map(|l| l.split('\t').next().unwrap().trim())
        .collect();
    for w in want {
        assert!(
            got.contains(w),
            "{shell}: completing {words:?} did not offer {w:?}; it offered {got:?}"
        );
    }
}

#[test]
fn bash_completes_subcommands_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let file = script("bash", dir.path());
    for (words, want) in CASES {
        let (cur, prev) = (words[words.len() - 1], words[words.len() - 2]);
        let array: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let code = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{}'; \
             _ws__guard ws-guard '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display(),
            array.join(" "),
            words.len() - 1,
            words.join(" ")
        );
        check("bash", words, &run("bash", &["-c", &code]), want);
    }
}

#[test]
fn zsh_completes_subcommands_and_options() {
    let dir = tempfile::tempdir().unwrap();
    script("zsh", dir.path());
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/zsh-complete.zsh");
    for (words, want) in CASES {
        let line = words.join(" ");
        let got = run(
            "zsh",
            &[
                "-f",
                harness.to_str().unwrap(),
                dir.path().to_str().unwrap(),
                &line,
            ],
        );
        check("zsh", words, &got, want);
    }
}

#[test]
fn fish_completes_subcommands_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let file = script("fish", dir.path());
    for (words, want) in CASES {
        let code = format!(
            "source '{}'; complete -C '{}'",
            file.display(),
            words.join(" ")
        );
        check("fish", words, &run("fish", &["-c", &code]), want);
    }
}
