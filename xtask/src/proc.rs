//! Running commands and describing them in messages.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

/// The command line as a user could type it (environment overrides first).
pub fn describe(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with its output going to the terminal; fails unless it exits with 0.
/// Stdin is closed so nothing can wait for input (CI has none).
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    println!("    $ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` capturing its output. `Err` only if it could not be started.
pub fn capture(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

/// Stdout of `cmd` if it started and exited with 0; otherwise an error with its stderr.
pub fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let line = describe(cmd);
    let out = capture(cmd).with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("`{line}` failed ({}): {}", out.status, first.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First line of `<program> --version`, or why it does not run.
pub fn version_of(program: &Path) -> anyhow::Result<String> {
    let out = stdout_of(Command::new(program).arg("--version"))?;
    Ok(out.lines().next().unwrap_or("").trim().to_owned())
}

/// `program` on PATH, also looking in the sbin directories a non-root PATH often lacks.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if let Ok(path) = which::which(program) {
        return Some(path);
    }
    ["/usr/local/sbin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
