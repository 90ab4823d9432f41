//! ws-guard's benchmark (what `cargo xtask bench` runs; needs root).
//!
//! ```text
//! wsg-bench [--smoke] [--layer 1|2] [--filters ID,..] [--scenarios ID,..] [--out DIR]
//! ```
//!
//! `--smoke`: tiny counts, seconds. `--layer N`: only that layer. `--filters` / `--scenarios`:
//! only these cells of layer 2 (ids as in bench.json, e.g. `xdp_drop,ws_guard_cookies` and
//! `random_65k`). `--out DIR` (default `target/bench`): where bench.md, bench.json and the PNG
//! charts go.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};
use ws_guard_tests::bench::{Machine, layer1, layer2, report};

fn main() -> anyhow::Result<()> {
    let mut smoke = false;
    let mut layers = vec![1, 2];
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    let mut filters: Option<Vec<layer2::Filter>> = None;
    let mut scenarios: Option<Vec<layer2::Scenario>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--layer" => {
                let n = args.next().context("--layer needs 1 or 2")?;
                layers = match n.as_str() {
                    "1" => vec![1],
                    "2" => vec![2],
                    _ => bail!("--layer {n}: expected 1 or 2"),
                };
            }
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--filters" => {
                let list = args.next().context("--filters needs a list of ids")?;
                let mut v = Vec::new();
                for id in list.split(',') {
                    let f = layer2::Filter::ALL
                        .into_iter()
                        .find(|f| f.id() == id)
                        .with_context(|| format!("--filters: no filter {id:?}"))?;
                    v.push(f);
                }
                filters = Some(v);
            }
            "--scenarios" => {
                let list = args.next().context("--scenarios needs a list of ids")?;
                let mut v = Vec::new();
                for id in list.split(',') {
                    let s = layer2::Scenario::ALL
                        .into_iter()
                        .find(|s| s.id() == id)
                        .with_context(|| format!("--scenarios: no scenario {id:?}"))?;
                    v.push(s);
                }
                scenarios = Some(v);
            }
            "-h" | "--help" => {
                println!(
                    "usage: wsg-bench [--smoke] [--layer 1|2] [--filters ID,..] \
                     [--scenarios ID,..] [--out DIR]"
                );
                return Ok(());
            }
            _ => bail!("unknown argument {a:?} (see --help)"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (BPF, XDP, network namespaces)");
    }
    let t0 = Instant::now();
    let mut log = |s: &str| println!("wsg-bench: {s}");
    let machine = Machine::detect();
    log(&format!(
        "{} CPUs ({}), Linux {}, ws-guard {}",
        machine.cpus, machine.cpu_model, machine.kernel, machine.commit
    ));
    let layer1 = if layers.contains(&1) {
        let opts = if smoke {
            layer1::Options::smoke()
        } else {
            layer1::Options::full()
        };
        Some(layer1::run(&opts, &mut log)?)
    } else {
        None
    };
    let layer2 = if layers.contains(&2) {
        let mut opts = if smoke {
            layer2::Options::smoke()
        } else {
            layer2::Options::full()
        };
        if let Some(f) = filters {
            opts.filters = f;
        }
        if let Some(s) = scenarios {
            opts.scenarios = s;
        }
        Some(layer2::run(&opts, &mut log)?)
    } else {
        None
    };
    let results = report::Results {
        machine,
        mode: if smoke { "smoke" } else { "full" },
        layer1,
        layer2,
        skipped: report::not_measured(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let files = report::write_all(&results, &out)?;
    println!();
    print!("{}", report::markdown(&results));
    println!();
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
