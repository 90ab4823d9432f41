//! The ws-guard command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ws_guard::{
    config::{Config, DEFAULT_CONFIG},
    daemon,
};

/// Per-source connection limits for WebSocket servers, enforced in XDP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them and enforce the configuration until SIGINT/SIGTERM.
    Run {
        /// TOML configuration; without it, the built-in default (port 9000, see README).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where programs, links and maps are pinned (bpffs).
        #[arg(long, default_value = ws_guard::pin::DEFAULT_ROOT)]
        pin_dir: PathBuf,
        /// On SIGINT/SIGTERM, detach and remove every pin. Without it, everything stays pinned
        /// and keeps enforcing, and the next start adopts it.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Detach and remove everything pinned (works with no daemon running).
    Teardown {
        /// The pin root given to `run --pin-dir`.
        #[arg(long, default_value = ws_guard::pin::DEFAULT_ROOT)]
        pin_dir: PathBuf,
    },
    /// Validate a configuration file and say what it would enforce.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the built-in default configuration.
    DefaultConfig,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain of context, one line, no backtrace: what failed and why.
            eprintln!("ws-guard: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            pin_dir,
            detach_on_exit,
        } => {
            let cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::parse(DEFAULT_CONFIG, "built-in default config")?,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(daemon::run(
                    cfg,
                    config,
                    daemon::RunOptions {
                        pin_root: pin_dir,
                        detach_on_exit,
                    },
                ))
        }
        Command::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            println!("{}: valid", file.display());
            for line in daemon::describe(&cfg) {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Teardown { pin_dir } => {
            let removed = ws_guard::pin::teardown(&pin_dir)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", pin_dir.display());
            } else {
                for p in &removed {
                    println!("removed {}", p.display());
                }
            }
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
    }
}
