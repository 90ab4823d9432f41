//! The benchmark's outputs: a Markdown report, a JSON file and PNG charts.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};
use serde_json::{Value, json};

use super::{Machine, layer1, layer2};

/// Everything one run of the benchmark produced.
#[derive(Clone, Debug)]
pub struct Results {
    pub machine: Machine,
    /// "full" or "smoke".
    pub mode: &'static str,
    pub layer1: Option<layer1::Report>,
    pub layer2: Option<layer2::Report>,
    /// What was not run, and why (printed in the report).
    pub skipped: Vec<String>,
    pub seconds: f64,
}

fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "n/a".into()
    }
}

fn machine_md(m: &Machine) -> String {
    format!(
        "Machine: {} CPUs ({}), {:.1} GiB, Linux {}; ws-guard {}; {}.",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.commit, m.date
    )
}

/// The layer-1 table.
pub fn layer1_table(r: &layer1::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | method | ns/packet | spread | over floor | target | met |"
    );
    let _ = writeln!(s, "|---|---|---:|---|---:|---|---|");
    for m in &r.measurements {
        let (target, met) = match (m.target, m.met()) {
            (Some(t), Some(ok)) => (
                format!("<= {} ns", t.max_overhead_ns),
                if ok {
                    "met".to_owned()
                } else {
                    format!("MISSED by {} ns", f(m.overhead_ns - t.max_overhead_ns, 1))
                },
            ),
            _ => ("".into(), "".into()),
        };
        let over = if m.is_floor {
            "(floor)".to_owned()
        } else {
            f(m.overhead_ns, 1)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}..{} | {} | {} | {} |",
            m.label,
            m.method.name(),
            f(m.ns_per_packet, 1),
            f(m.low_ns, 0),
            f(m.high_ns, 0),
            over,
            target,
            met
        );
    }
    s
}

/// The work-per-path table: hash-map operations per packet against the budget.
pub fn work_table(r: &layer1::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| path | scenario | runs | lookups | inserts | deletes | budget (lookups / inserts / \
         deletes) | within |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|---|");
    for w in &r.work {
        let b = &w.budget;
        let lookups = if b.filter_lookups {
            format!(
                "{} + {} (the source's filter buckets in use)",
                b.lookups,
                f(w.filter_share, 2)
            )
        } else {
            format!("{}", b.lookups)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |",
            b.path,
            w.label,
            w.runs,
            f(w.lookups, 2),
            f(w.inserts, 2),
            f(w.deletes, 2),
            lookups,
            b.inserts,
            b.deletes,
            if w.within_budget() { "yes" } else { "NO" }
        );
    }
    s
}

/// The layer-2 table.
pub fn layer2_table(r: &layer2::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | filter | offered Mpps | processed Mpps | lost before the receiver | \
         CPU ns/packet (softirq) | program ns/packet | verdicts | map memory |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---:|");
    for m in &r.measurements {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}% | {} | {} | {} | {} |",
            m.scenario,
            m.filter,
            f(m.offered_mpps, 3),
            f(m.processed_mpps, 3),
            f(m.lost_share * 100.0, 1),
            m.cpu
                .as_ref()
                .map(|c| format!(
                    "{} ({})",
                    f(c.system_ns + c.softirq_ns, 0),
                    f(c.softirq_ns, 0)
                ))
                .unwrap_or_else(|| "-".into()),
            m.program_ns.map(|x| f(x, 1)).unwrap_or_else(|| "-".into()),
            if m.verdicts.is_empty() {
                "-".to_owned()
            } else {
                m.verdicts.clone()
            },
            m.map_memory
                .as_ref()
                .map(|mm| format!(
                    "{:.1} MiB ({} B/source)",
                    mm.total_bytes as f64 / (1 << 20) as f64,
                    f(mm.bytes_per_source, 0)
                ))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}

/// The legitimate clients' table (one row per scenario, filter and SYN cookies setting).
pub fn clients_table(r: &layer2::Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | filter | SYN cookies | connected | after a SYN retransmission | p50 ms | \
         p99 ms | timed out | refused | other | flood Mpps meanwhile | frames the veth pair \
         dropped (in / back) | target |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for m in &r.measurements {
        for c in &m.clients {
            let share = c.success_share();
            let target = if m.filter_id == "ws_guard" {
                if share >= 0.99 {
                    ">= 99%: met".to_owned()
                } else {
                    format!(">= 99%: MISSED by {} points", f((0.99 - share) * 100.0, 1))
                }
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {}/{} ({}%) | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                m.scenario,
                // The cookies are the next column's.
                m.filter.trim_end_matches(" (SYN cookies)"),
                if c.syn_cookies { "on" } else { "off" },
                c.succeeded,
                c.attempts,
                f(share * 100.0, 1),
                c.syn_retransmitted,
                layer2::report_ms(c.p50_ms),
                layer2::report_ms(c.p99_ms),
                c.timed_out,
                c.refused,
                c.other_failures,
                f(c.flood_mpps, 3),
                c.frames_dropped_in,
                c.replies_dropped,
                target
            );
        }
    }
    s
}

/// The whole Markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ws-guard benchmark ({})\n", r.mode);
    let _ = writeln!(s, "{}\n", machine_md(&r.machine));
    if let Some(l1) = &r.layer1 {
        let _ = writeln!(
            s,
            "## Layer 1: ns per packet (BPF_PROG_TEST_RUN; repeat = {} x {} rounds, {} single \
             runs)\n",
            l1.options.repeat, l1.options.rounds, l1.options.singles
        );
        s.push_str(&layer1_table(l1));
        s.push('\n');
        if !l1.default_memory.is_empty() {
            let bytes = l1.default_memory_bytes();
            let mib = bytes as f64 / (1 << 20) as f64;
            let _ = writeln!(
                s,
                "Map memory at the shipped configuration's capacities (as \
                 ws_guard_map_memory_bytes reports it): {} MiB ({}); target < 48 MiB: {}\n",
                f(mib, 1),
                l1.default_memory
                    .iter()
                    .map(|(m, b)| format!("{m} {} MiB", f(*b as f64 / (1 << 20) as f64, 1)))
                    .collect::<Vec<_>>()
                    .join(", "),
                if mib < 48.0 { "met" } else { "MISSED" }
            );
            let _ = writeln!(
                s,
                "Source map memory with a rate window of 32 attempts (the largest count): {} \
                 bytes per source; target <= 256: {}\n",
                f(l1.bytes_per_source_ring32, 0),
                if l1.bytes_per_source_ring32 <= 256.0 {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        if !l1.work.is_empty() {
            let _ = writeln!(
                s,
                "### Work per path (hash-map operations per packet, counted by the programs built \
                 to count them, WSG_OPS; budget: ws_guard_common::budget)\n"
            );
            s.push_str(&work_table(l1));
            s.push('\n');
        }
    }
    if let Some(l2) = &r.layer2 {
        let _ = writeln!(
            s,
            "## Layer 2: SYN floods through veth ({} s per run, generator and receiver on CPU \
             {})\n",
            f(l2.seconds_per_run, 1),
            l2.cpu
        );
        s.push_str(&layer2_table(l2));
        s.push('\n');
        if l2.measurements.iter().any(|m| !m.clients.is_empty()) {
            let c = l2
                .measurements
                .iter()
                .flat_map(|m| m.clients.first())
                .next();
            let _ = writeln!(
                s,
                "### Legitimate clients during the floods (listen backlog {}, \
                 tcp_max_syn_backlog {})\n",
                c.map(|c| c.backlog).unwrap_or_default(),
                c.map(|c| c.max_syn_backlog).unwrap_or_default()
            );
            s.push_str(&clients_table(l2));
            s.push('\n');
        }
        for line in l2.target_lines() {
            let _ = writeln!(s, "- {line}");
        }
        s.push('\n');
    }
    for why in &r.skipped {
        let _ = writeln!(s, "Not measured: {why}");
    }
    let _ = writeln!(s, "\nTotal time: {} s.", f(r.seconds, 0));
    s
}

/// The JSON document.
pub fn json(r: &Results) -> Value {
    let m = &r.machine;
    let l1 = r.layer1.as_ref().map(|l1| {
        json!({
            "repeat": l1.options.repeat,
            "rounds": l1.options.rounds,
            "singles": l1.options.singles,
            "measurements": l1.measurements.iter().map(|m| json!({
                "id": m.id,
                "label": m.label,
                "method": m.method.name(),
                "floor": m.is_floor,
                "runs": m.runs,
                "ns_per_packet": m.ns_per_packet,
                "low_ns": m.low_ns,
                "high_ns": m.high_ns,
                "overhead_ns": m.overhead_ns,
                "target_max_overhead_ns": m.target.map(|t| t.max_overhead_ns),
                "target": m.target.map(|t| t.what),
                "met": m.met(),
                "verdict": m.verdict,
                "counter": m.counter,
            })).collect::<Vec<_>>(),
            "default_memory": l1.default_memory.iter().map(|(m, b)| json!({"map": m, "bytes": b})).collect::<Vec<_>>(),
            "default_memory_bytes": l1.default_memory_bytes(),
            "bytes_per_source_ring32": l1.bytes_per_source_ring32,
            "work": l1.work.iter().map(|w| json!({
                "id": w.id,
                "path": w.budget.path,
                "runs": w.runs,
                "lookups": w.lookups,
                "inserts": w.inserts,
                "deletes": w.deletes,
                "filter_share": w.filter_share,
                "budget": {
                    "lookups": w.budget.lookups,
                    "inserts": w.budget.inserts,
                    "deletes": w.budget.deletes,
                    "filter_lookups": w.budget.filter_lookups,
                },
                "within_budget": w.within_budget(),
            })).collect::<Vec<_>>(),
        })
    });
    let l2 = r.layer2.as_ref().map(|l2| l2.to_json());
    json!({
        "mode": r.mode,
        "machine": {
            "cpus": m.cpus,
            "cpu_model": m.cpu_model,
            "kernel": m.kernel,
            "memory_gib": m.memory_gib,
            "commit": m.commit,
            "date": m.date,
        },
        "layer1": l1,
        "layer2": l2,
        "not_measured": r.skipped,
        "seconds": r.seconds,
    })
}

/// Registers the embedded DejaVu Sans as plotters' "sans-serif" (no system fonts needed).
fn fonts() -> anyhow::Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    anyhow::ensure!(ok, "the embedded DejaVu Sans font did not load");
    Ok(())
}

/// One bar of a horizontal bar chart.
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// Text after the bar.
    pub note: String,
    pub color: RGBColor,
}

pub const FLOOR: RGBColor = RGBColor(150, 150, 150);
pub const OK: RGBColor = RGBColor(46, 125, 50);
pub const MISSED: RGBColor = RGBColor(198, 40, 40);
pub const NEUTRAL: RGBColor = RGBColor(21, 101, 192);
pub const OTHER: RGBColor = RGBColor(239, 108, 0);

/// Draws a horizontal bar chart with labels, values and an optional reference line.
pub fn bar_chart(
    path: &Path,
    title: &str,
    unit: &str,
    bars: &[Bar],
    reference: Option<(f64, &str)>,
) -> anyhow::Result<()> {
    fonts()?;
    let row = 34u32;
    let (w, h) = (1400u32, 110 + row * bars.len() as u32 + 40);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let font = |size: u32| ("sans-serif", size).into_font();
    root.draw_text(
        title,
        &font(26).style(FontStyle::Bold).color(&BLACK),
        (20, 20),
    )
    .map_err(err)?;
    let label_w = 620i32;
    let bar_x0 = label_w + 20;
    let bar_max_w = (w as i32 - bar_x0 - 200) as f64;
    let max = bars
        .iter()
        .map(|b| b.value)
        .chain(reference.map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let y0 = 80i32;
    for (i, b) in bars.iter().enumerate() {
        let y = y0 + (i as i32) * row as i32;
        root.draw_text(&b.label, &font(17).color(&BLACK), (20, y + 7))
            .map_err(err)?;
        let bw = if b.value.is_finite() {
            (b.value / max * bar_max_w).max(1.0) as i32
        } else {
            0
        };
        root.draw(&Rectangle::new(
            [(bar_x0, y + 4), (bar_x0 + bw, y + row as i32 - 6)],
            b.color.filled(),
        ))
        .map_err(err)?;
        root.draw_text(
            &format!("{} {unit}{}", f(b.value, 2), b.note),
            &font(16).color(&BLACK),
            (bar_x0 + bw + 8, y + 8),
        )
        .map_err(err)?;
    }
    if let Some((v, what)) = reference {
        let x = bar_x0 + (v / max * bar_max_w) as i32;
        let y1 = y0 + row as i32 * bars.len() as i32;
        root.draw(&PathElement::new(
            vec![(x, y0 - 6), (x, y1)],
            BLACK.stroke_width(2),
        ))
        .map_err(err)?;
        root.draw_text(what, &font(15).color(&BLACK), (x + 4, y1 + 8))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The layer-1 chart: ns/packet per scenario, the floor as a line.
pub fn layer1_chart(r: &layer1::Report, path: &Path) -> anyhow::Result<()> {
    let floor = r
        .measurements
        .iter()
        .find(|m| m.is_floor && m.method == layer1::Method::Repeat)
        .map(|m| m.ns_per_packet);
    let bars: Vec<Bar> = r
        .measurements
        .iter()
        .map(|m| Bar {
            label: format!("{} [{}]", short(m.label), m.method.name()),
            value: m.ns_per_packet,
            note: if m.is_floor {
                " (floor)".into()
            } else {
                format!(" ({:+.1})", m.overhead_ns)
            },
            color: match (m.is_floor, m.met()) {
                (true, _) => FLOOR,
                (_, Some(true)) => OK,
                (_, Some(false)) => MISSED,
                _ => NEUTRAL,
            },
        })
        .collect();
    bar_chart(
        path,
        "ws-guard XDP: ns per packet (BPF_PROG_TEST_RUN); green/red: target met/missed",
        "ns",
        &bars,
        floor.map(|v| (v, "empty program (repeat)")),
    )
}

/// A label cut to fit the chart.
fn short(label: &str) -> String {
    let cut = label.split(" (").next().unwrap_or(label);
    let cut = cut.split(':').next().unwrap_or(cut);
    if cut.chars().count() > 58 {
        cut.chars().take(57).collect::<String>() + "…"
    } else {
        cut.to_owned()
    }
}

/// Writes bench.md, bench.json and the charts into `dir`; returns the files written.
pub fn write_all(r: &Results, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let md = dir.join("bench.md");
    std::fs::write(&md, markdown(r)).with_context(|| format!("writing {}", md.display()))?;
    files.push(md);
    let js = dir.join("bench.json");
    std::fs::write(&js, serde_json::to_string_pretty(&json(r))? + "\n")
        .with_context(|| format!("writing {}", js.display()))?;
    files.push(js);
    if let Some(l1) = &r.layer1 {
        let p = dir.join("layer1.png");
        layer1_chart(l1, &p)?;
        files.push(p);
    }
    if let Some(l2) = &r.layer2 {
        let p = dir.join("layer2.png");
        l2.chart(&p)?;
        files.push(p);
    }
    Ok(files)
}

/// What the issue asks for that this benchmark does not measure yet (printed with every report,
/// so no figure is mistaken for one of these).
pub fn not_measured() -> Vec<String> {
    [
        "legitimate clients during the 1M-source (IPv6) flood, and over IPv6",
        "the floods' Mpps with SYN cookies off (only the clients' phase runs with them off)",
        "the daemon's sweep and tracepoint during the floods (only the XDP program is attached, \
         so half-open attempts admitted during a flood keep their slot for the run)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
