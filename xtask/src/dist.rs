//! `cargo xtask dist`: the release artifacts, written to `target/dist/` (emptied first):
//!
//! - `ws-guard_<version>-1_<arch>.deb`, built by cargo-deb from `[package.metadata.deb]` in
//!   ws-guard/Cargo.toml: the binary in /usr/bin, the unit, /etc/ws-guard/config.toml as a
//!   conffile, man pages, shell completions, the Grafana dashboard and Prometheus alert rules in
//!   /usr/share/ws-guard, and the maintainer scripts of packaging/debian/.
//! - `ws-guard-<version>-<arch>-linux-gnu.tar.gz`: the same release binary (the eBPF object is
//!   embedded in it; it needs nothing but glibc, whose minimum version is printed), with
//!   packaging/ (the unit for /usr/local/bin, config, dashboard, alerts), man pages,
//!   completions and the README.
//! - `SHA256SUMS` of both, for `sha256sum -c SHA256SUMS`.
//!
//! The files generated for the package (the unit with the package's ExecStart, man pages,
//! completions) are written to `target/release/deb-assets/`: cargo-deb resolves asset paths
//! that start with `target/release/` to the real target directory.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    Ctx,
    proc::{describe, find_program, run, stdout_of, version_of},
};

/// The ExecStart of packaging/ws-guard.service (a binary installed by hand in /usr/local/bin).
const SOURCE_EXEC: &str = "ExecStart=/usr/local/bin/ws-guard ";
/// The ExecStart of the packaged unit: the package installs the binary in /usr/bin.
const PACKAGE_EXEC: &str = "ExecStart=/usr/bin/ws-guard ";

/// Shell completion scripts: the shell and the file name in deb-assets/completions/ and in the
/// tarball's completions/ (the package's destinations are in ws-guard/Cargo.toml).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "ws-guard.bash"),
    ("zsh", "_ws-guard"),
    ("fish", "ws-guard.fish"),
];

/// Files of packaging/ that go into the tarball's packaging/ as they are.
const PACKAGING_FILES: &[&str] = &[
    "ws-guard.service",
    "config.toml",
    "grafana-dashboard.json",
    "prometheus-alerts.yml",
];

fn say(msg: impl std::fmt::Display) {
    println!("xtask dist: {msg}");
}

/// Builds the release binary, the .deb, the tarball and SHA256SUMS into `target/dist/`.
pub fn dist(ctx: &Ctx) -> anyhow::Result<()> {
    let started = Instant::now();
    let version = env!("CARGO_PKG_VERSION"); // the workspace version (xtask inherits it)
    let tools = Tools::find(ctx)?;

    say("building ws-guard (release)");
    run(ctx.cargo().args(["build", "--release", "-p", "ws-guard"]))
        .context("building ws-guard failed (errors above)")?;
    let bin = ctx.target_dir.join("release/ws-guard");
    let said = version_of(&bin).with_context(|| format!("{} does not run", bin.display()))?;
    if said != format!("ws-guard {version}") {
        bail!(
            "{} --version says {said:?}, but the workspace version is {version}",
            bin.display()
        );
    }

    let assets = ctx.target_dir.join("release/deb-assets");
    generate_assets(ctx, &tools, &bin, &assets)?;

    let out = ctx.target_dir.join("dist");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing the old {}", out.display()))?;
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    say("building the Debian package (cargo deb)");
    run(ctx
        .cargo()
        .args(["deb", "-p", "ws-guard", "--no-build", "--output"])
        .arg(&out))
    .context("cargo deb failed (errors above)")?;
    let deb = only_file(&out, ".deb")?;

    let glibc = glibc_needed(&tools.objdump, &bin)?;
    let tarball = tarball(ctx, &tools, &bin, &assets, &out, version)?;

    let names = [&deb, &tarball].map(|p| p.file_name().unwrap_or_default().to_owned());
    let sums = stdout_of(Command::new(&tools.sha256sum).args(names).current_dir(&out))?;
    let sums_file = out.join("SHA256SUMS");
    fs::write(&sums_file, sums).with_context(|| format!("writing {}", sums_file.display()))?;

    say(format_args!("wrote {} ({})", deb.display(), size(&deb)));
    say(format_args!(
        "wrote {} ({}; needs glibc >= {glibc}, nothing else: the eBPF object is embedded)",
        tarball.display(),
        size(&tarball)
    ));
    say(format_args!(
        "wrote {} (check with: cd {} && sha256sum -c SHA256SUMS)",
        sums_file.display(),
        out.display()
    ));
    let secs = started.elapsed().as_secs();
    say(format_args!("done in {}m {:02}s", secs / 60, secs % 60));
    Ok(())
}

/// The programs dist runs besides cargo, found before the (long) build starts.
struct Tools {
    objdump: PathBuf,
    strip: PathBuf,
    tar: PathBuf,
    gzip: PathBuf,
    sha256sum: PathBuf,
}

impl Tools {
    fn find(ctx: &Ctx) -> anyhow::Result<Self> {
        let need = |name: &str, package: &str| {
            find_program(name).ok_or_else(|| {
                anyhow!(
                    "{name} not found: install the Debian package {package} (`cargo xtask \
                     setup` does)"
                )
            })
        };
        let mut deb = ctx.cargo();
        deb.args(["deb", "--version"]);
        if let Err(e) = stdout_of(&mut deb) {
            bail!(
                "cargo-deb does not run ({e:#}): `cargo xtask setup` installs it (or: cargo \
                 install cargo-deb --locked)"
            );
        }
        // cargo-deb computes the package's Depends (libc6 version) with dpkg-shlibdeps.
        need("dpkg-shlibdeps", "dpkg-dev")?;
        Ok(Self {
            objdump: need("objdump", "binutils")?,
            strip: need("strip", "binutils")?,
            tar: need("tar", "tar")?,
            gzip: need("gzip", "gzip")?,
            sha256sum: need("sha256sum", "coreutils")?,
        })
    }
}

/// Writes into `dir` (emptied first) what the package installs but the repository does not
/// hold: the unit with the package's ExecStart, the man pages and the completion scripts.
fn generate_assets(ctx: &Ctx, tools: &Tools, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    let completions = dir.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;

    let source = ctx.root.join("packaging/ws-guard.service");
    let text =
        fs::read_to_string(&source).with_context(|| format!("reading {}", source.display()))?;
    let unit = dir.join("ws-guard.service");
    fs::write(&unit, packaged_unit(&text)?)
        .with_context(|| format!("writing {}", unit.display()))?;

    let man = dir.join("man");
    run(Command::new(bin).args(["man", "--dir"]).arg(&man)).context("generating the man pages")?;
    // Debian installs man pages gzipped (cargo-deb compresses only files it did not build);
    // -n: no name or time stamp in them, so the package's bytes depend only on the pages.
    let pages = man_pages(&man)?;
    run(Command::new(&tools.gzip)
        .args(["-9", "-n", "-k"])
        .args(pages.iter().filter_map(|p| p.file_name()))
        .current_dir(&man))
    .context("compressing the man pages")?;

    for (shell, file) in COMPLETIONS {
        let script = stdout_of(Command::new(bin).args(["completions", shell]))?;
        let path = completions.join(file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    say(format_args!(
        "generated the packaged unit, man pages and completions in {}",
        dir.display()
    ));
    Ok(())
}

/// packaging/ws-guard.service with the ExecStart of the package (/usr/bin/ws-guard) and a
/// header saying where it comes from.
fn packaged_unit(source: &str) -> anyhow::Result<String> {
    let execs = source.matches(SOURCE_EXEC).count();
    if execs != 1 {
        bail!(
            "packaging/ws-guard.service has {execs} lines with `{SOURCE_EXEC}`, expected 1: \
             update xtask/src/dist.rs (the package installs the binary as /usr/bin/ws-guard)"
        );
    }
    let header = "# Installed by the ws-guard Debian package: packaging/ws-guard.service with the\n\
                  # package's binary, /usr/bin/ws-guard (generated by `cargo xtask dist`).\n\
                  # Change settings with `systemctl edit ws-guard`, not here.\n";
    Ok(format!(
        "{header}{}",
        source.replace(SOURCE_EXEC, PACKAGE_EXEC)
    ))
}

/// The `*.1` files in `dir`.
fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        // Section 1 (the commands) and 5 (ws-guard.toml, the configuration file).
        .filter(|p| p.extension().is_some_and(|x| x == "1" || x == "5"))
        .collect();
    pages.sort();
    if pages.is_empty() {
        bail!("no man pages in {}", dir.display());
    }
    Ok(pages)
}

/// The one file in `dir` whose name ends with `suffix`.
fn only_file(dir: &Path, suffix: &str) -> anyhow::Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one *{suffix} in {}, found {found:?}",
            dir.display()
        ),
    }
}

/// The newest `GLIBC_x.y` symbol version `bin` needs (`objdump -T`).
fn glibc_needed(objdump: &Path, bin: &Path) -> anyhow::Result<String> {
    let symbols = stdout_of(Command::new(objdump).arg("-T").arg(bin))?;
    max_glibc(&symbols)
        .ok_or_else(|| anyhow!("no GLIBC_ symbol version in `objdump -T {}`", bin.display()))
}

/// The highest `GLIBC_<n>.<n>...` version in `objdump -T` output (GLIBC_PRIVATE is ignored).
fn max_glibc(objdump_output: &str) -> Option<String> {
    objdump_output
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|n| n.parse().ok()).collect();
            parts.map(|p| (p, v))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v.to_owned())
}

/// `ws-guard-<version>-<arch>-linux-gnu.tar.gz` in `out`: one directory with the stripped
/// binary, the README, packaging/, man/ and completions/.
fn tarball(
    ctx: &Ctx,
    tools: &Tools,
    bin: &Path,
    assets: &Path,
    out: &Path,
    version: &str,
) -> anyhow::Result<PathBuf> {
    let name = format!("ws-guard-{version}-{}-linux-gnu", std::env::consts::ARCH);
    let top = out.join(&name);
    let copy = |from: &Path, to: &Path, mode: u32| -> anyhow::Result<()> {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        fs::set_permissions(to, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", to.display()))
    };

    copy(bin, &top.join("ws-guard"), 0o755)?;
    run(Command::new(&tools.strip).arg(top.join("ws-guard")))
        .context("stripping the tarball's binary")?;
    copy(&ctx.root.join("README.md"), &top.join("README.md"), 0o644)?;
    // README's links lead into docs/.
    for e in fs::read_dir(ctx.root.join("docs")).context("listing docs/")? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "md")
            && let Some(name) = path.file_name()
        {
            copy(&path, &top.join("docs").join(name), 0o644)?;
        }
    }
    for file in PACKAGING_FILES {
        copy(
            &ctx.root.join("packaging").join(file),
            &top.join("packaging").join(file),
            0o644,
        )?;
    }
    for page in man_pages(&assets.join("man"))? {
        if let Some(file) = page.file_name() {
            copy(&page, &top.join("man").join(file), 0o644)?;
        }
    }
    for (_, file) in COMPLETIONS {
        copy(
            &assets.join("completions").join(file),
            &top.join("completions").join(file),
            0o644,
        )?;
    }

    let archive = out.join(format!("{name}.tar.gz"));
    let mut tar = Command::new(&tools.tar);
    tar.args([
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "-czf",
    ])
    .arg(&archive)
    .arg("-C")
    .arg(out)
    .arg(&name);
    run(&mut tar).with_context(|| format!("creating the tarball ({})", describe(&tar)))?;
    fs::remove_dir_all(&top).with_context(|| format!("removing {}", top.display()))?;
    Ok(archive)
}

fn size(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!("{:.1} MB", m.len() as f64 / 1e6),
        Err(e) => format!("size unknown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary() {
        let source = "[Service]\nType=notify\nExecStart=/usr/local/bin/ws-guard run --config \
                      /etc/ws-guard/config.toml\nRestart=on-failure\n";
        let unit = packaged_unit(source).unwrap();
        assert!(
            unit.contains("\nExecStart=/usr/bin/ws-guard run --config /etc/ws-guard/config.toml\n")
        );
        assert!(!unit.contains("/usr/local/bin"));
        assert!(unit.ends_with("Restart=on-failure\n"));
        assert!(unit.lines().take(2).all(|l| l.starts_with('#')));
        assert!(packaged_unit("[Service]\nExecStart=/opt/ws-guard run\n").is_err());
    }

    #[test]
    fn the_shipped_unit_can_be_packaged() {
        let shipped = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ws-guard.service"),
        )
        .unwrap();
        assert!(packaged_unit(&shipped).is_ok());
    }

    #[test]
    fn glibc_version_from_objdump() {
        let out = "\
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) write
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.9)  pipe2
0000000000000000      DF *UND*  0000000000000000  GLIBC_PRIVATE _dl_x
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.33) fstat64
";
        assert_eq!(max_glibc(out).as_deref(), Some("2.34"));
        assert_eq!(max_glibc("no versions here"), None);
    }
}
