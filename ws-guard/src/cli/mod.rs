//! The command line: the daemon (`run`), offline commands (`check-config`, `teardown`, ...)
//! and the client commands that talk to a running daemon over the control socket.

mod output;

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    config::{Config, DEFAULT_CONFIG},
    control::{
        self,
        client::{ClientError, request},
        protocol::{
            ActionName, Limit, LimitChange, ListName, MaxConnections, RateLimit, Request, SortBy,
        },
    },
    daemon,
};

/// Exit code: the daemon refused or failed the request, or a local command failed.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad usage (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the daemon could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the daemon refused or failed the request (the message says why; nothing was changed),
     or a local command (run, check-config, teardown) failed
  2  usage error: unknown command or option, or an invalid value (nothing was sent)
  3  the daemon could not be reached: not running, wrong --socket, or permission denied
     (only root may use the control socket)";

/// Per-source connection limits for WebSocket servers, enforced in XDP.
#[derive(Parser)]
#[command(name = "ws-guard", version, about)]
pub struct Cli {
    /// The daemon's control socket (its `[control] socket` setting). For `run`: overrides the
    /// config file's.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the daemon's answer as JSON (stable field names) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Every command.
#[derive(Subcommand)]
pub enum Command {
    /// Load the programs, attach them and enforce the configuration until SIGINT/SIGTERM.
    Run {
        /// TOML configuration; without it, the built-in default (port 9000, see README).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where programs, links and maps are pinned (bpffs).
        #[arg(long, default_value = crate::pin::DEFAULT_ROOT)]
        pin_dir: PathBuf,
        /// On SIGINT/SIGTERM, detach and remove every pin. Without it, everything stays pinned
        /// and keeps enforcing, and the next start adopts it.
        #[arg(long)]
        detach_on_exit: bool,
        /// Where runtime changes (limits set, monitor, allow/deny) are kept; overrides the
        /// config file's `state_file`.
        #[arg(long, value_name = "PATH")]
        state_file: Option<PathBuf>,
        /// How to log (overrides the config file's `log_format`): auto (journald when systemd
        /// connected stderr to the journal, else text), text, json (JSON Lines) or journald.
        #[arg(long, value_enum, value_name = "FORMAT")]
        log_format: Option<crate::logging::LogFormat>,
    },
    /// Detach and remove everything pinned (works with no daemon running).
    Teardown {
        /// The pin root given to `run --pin-dir`.
        #[arg(long, default_value = crate::pin::DEFAULT_ROOT)]
        pin_dir: PathBuf,
    },
    /// Validate a configuration file and say what it would enforce.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the built-in default configuration.
    DefaultConfig,
    /// The configuration in force, as a TOML file `check-config` accepts.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// What is attached where, limits per port, counters and map fill. When the daemon does not
    /// answer, what the kernel enforces, read from the pinned maps (exit code 3 all the same).
    Status {
        /// Where the pins are (for when the daemon does not answer).
        #[arg(long, value_name = "DIR", default_value = crate::pin::DEFAULT_ROOT)]
        pin_dir: PathBuf,
    },
    /// Show or change per-port limits (changes take effect on the next packet and are kept
    /// across restarts in the state file).
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Sources that are never limited nor banned (still counted).
    #[command(subcommand)]
    Allow(ListCommand),
    /// Sources whose every new connection is dropped.
    #[command(subcommand)]
    Deny(ListCommand),
    /// Sources blocked for a while (by the rate limit with ban_duration, or by hand).
    #[command(subcommand)]
    Bans(BansCommand),
    /// The sources holding the most connections or refused most often.
    #[command(subcommand)]
    Sources(SourcesCommand),
    /// Monitor mode: count what would be refused, refuse nothing.
    Monitor {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Bans started and ended, and sampled refusals with their source and reason, one line
    /// each (with --json: one JSON object per line): the events the daemon keeps (its last
    /// 1,000), for fail2ban-, CrowdSec- or SIEM-style consumers.
    Events {
        /// Then print new events as they come (polled every 500 ms), until SIGINT or SIGTERM
        /// (exit code 0) or until the daemon goes away (exit code 3).
        #[arg(long, short)]
        follow: bool,
        /// Only the events after this sequence number (`seq`), e.g. the last one seen.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    Man {
        /// Write ws-guard.1, ws-guard-limits-set.1, ... and ws-guard.toml.5 (the configuration
        /// file) here instead of printing ws-guard.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

fn port_arg() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..)
}

#[derive(Subcommand)]
pub enum LimitsCommand {
    /// The limits in force and where they come from (config, runtime).
    Get {
        /// Only this port.
        #[arg(long, value_parser = port_arg())]
        port: Option<u16>,
    },
    /// Change a port's limits (a port not in the config file becomes protected).
    Set(SetArgs),
    /// Drop the runtime override of a port: back to the config file's limits.
    Reset {
        /// The TCP port (1-65535).
        #[arg(long, value_parser = port_arg())]
        port: u16,
    },
}

#[derive(Args)]
pub struct SetArgs {
    /// The TCP port (1-65535).
    #[arg(long, value_parser = port_arg())]
    pub port: u16,
    /// Concurrent connections per source, or `none`.
    #[arg(long, value_name = "N|none")]
    pub max_connections: Option<Limit<MaxConnections>>,
    /// New connections per source per window (COUNT at most 32), e.g. `9/100s`, or `none`.
    #[arg(long, value_name = "N/WINDOW|none")]
    pub new_connections: Option<Limit<RateLimit>>,
    /// What over-limit attempts get, for both limits.
    #[arg(long, value_enum, conflicts_with_all = ["connection_action", "rate_action"])]
    pub action: Option<ActionName>,
    /// What attempts over --max-connections get.
    #[arg(long, value_enum)]
    pub connection_action: Option<ActionName>,
    /// What attempts over --new-connections get.
    #[arg(long, value_enum)]
    pub rate_action: Option<ActionName>,
    /// SYN-cookie mode: new sources answered with a SYN cookie and judged at its ACK
    /// (`auto`: while the port's half-open attempts are over syn_cookie_threshold).
    #[arg(long, value_enum)]
    pub syn_cookies: Option<crate::config::CookieMode>,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration the daemon runs with, every key spelled out: its config file,
    /// or with --effective the file with the runtime changes laid over it (the iptables-save
    /// of ws-guard: paste it into the config file to keep them). Without a daemon, read from
    /// the files (--config and --state-file).
    Show {
        /// With the runtime changes (`limits set`, `allow add`, ...) laid over the file.
        #[arg(long)]
        effective: bool,
        /// The config file to read when the daemon does not answer.
        #[arg(long, value_name = "FILE", default_value = "/etc/ws-guard/config.toml")]
        config: PathBuf,
        /// The state file to read when the daemon does not answer (default: the config's
        /// `state_file`).
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ListCommand {
    /// Add CIDRs (kept across restarts): given as arguments, or one per line from a file
    /// (`-f FILE`, `-f -` for standard input; `#` starts a comment). All are added, or none.
    Add {
        #[arg(value_parser = crate::config::parse_cidr)]
        cidrs: Vec<IpNet>,
        /// A file of CIDRs, one per line; `-`: standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Remove a CIDR (also one from the config file, until `add` again).
    Remove {
        #[arg(value_parser = crate::config::parse_cidr)]
        cidr: IpNet,
    },
    /// Every CIDR in force, and whether the list is the config file's or changed at runtime.
    List,
    /// Drop the runtime changes of the list: the config file's list is in force again.
    Reset,
}

/// `status`: from the daemon, or (it does not answer) what the pins say, with exit code 3.
fn status(socket: Option<PathBuf>, json: bool, pin_dir: &std::path::Path) -> ExitCode {
    let socket = socket.unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
    let req = Request::Status;
    match request(&socket, &req) {
        Ok(data) if json => {
            print_json(data);
            ExitCode::SUCCESS
        }
        Ok(data) => match output::human(&req, data) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(json, EXIT_REFUSED, &format!("{e:#}")),
        },
        Err(ClientError::Refused(m)) => fail(json, EXIT_REFUSED, &m),
        Err(ClientError::Unreachable(m)) => {
            let pinned = crate::pinned::read(pin_dir);
            eprintln!("ws-guard: error: {m}");
            if json {
                let mut v = serde_json::json!({
                    "error": { "message": m, "exit_code": EXIT_UNREACHABLE },
                    "daemon": "down",
                });
                match &pinned {
                    Ok(p) => v["pinned"] = serde_json::to_value(p).unwrap_or_default(),
                    Err(e) => v["pinned_error"] = format!("{e:#}").into(),
                }
                print_json(v);
            } else {
                match &pinned {
                    Ok(p) => print!("{}", crate::pinned::describe(p)),
                    Err(e) => eprintln!("ws-guard: and the pins say nothing: {e:#}"),
                }
            }
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// `config show`: from the daemon, or (it does not answer) from the files.
fn config_show(
    socket: Option<PathBuf>,
    json: bool,
    effective: bool,
    config: &std::path::Path,
    state_file: Option<&std::path::Path>,
) -> ExitCode {
    let socket = socket.unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
    let text = match request(&socket, &Request::ConfigShow { effective }) {
        Ok(data) => match data["toml"].as_str() {
            Some(t) => t.to_owned(),
            None => {
                let m = format!("unexpected answer from the daemon: {data}");
                return fail(json, EXIT_REFUSED, &m);
            }
        },
        Err(ClientError::Refused(m)) => return fail(json, EXIT_REFUSED, &m),
        Err(ClientError::Unreachable(m)) => {
            eprintln!("ws-guard: {m}; showing what the files say instead");
            match config_from_files(effective, config, state_file) {
                Ok(t) => t,
                Err(e) => return fail(json, EXIT_REFUSED, &format!("{e:#}")),
            }
        }
    };
    if json {
        print_json(serde_json::json!({ "effective": effective, "toml": text }));
    } else {
        print!("{text}");
    }
    ExitCode::SUCCESS
}

/// The configuration the files give: `config`, with the runtime changes of the state file
/// when `effective`.
fn config_from_files(
    effective: bool,
    config: &std::path::Path,
    state_file: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let file = Config::load(config)?;
    if !effective {
        return Ok(crate::config::to_toml(&file));
    }
    let state = state_file.unwrap_or(&file.state_file);
    let overrides = crate::state::Overrides::load(state)?;
    let cfg = crate::state::effective(&file, &overrides).map_err(anyhow::Error::msg)?;
    Ok(crate::config::to_toml(&cfg))
}

/// The CIDRs of a file (`-`: standard input), one per line, `#` comments and blank lines
/// skipped; each checked like an argument, an error naming the file and line.
fn read_cidr_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = if path.as_os_str() == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .map_err(|e| format!("reading standard input: {e}"))?;
        t
    } else {
        crate::config::read_regular_file(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let net = crate::config::parse_cidr(line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        out.push(net.to_string());
    }
    Ok(out)
}

/// The completion script for `shell`. clap_complete's bash script names the functions of a
/// hyphenated binary's subcommands inconsistently (`cmd="ws__guard__subcmd__limits"` is set,
/// but its case is labelled `ws__subcmd__guard__subcmd__limits`), so nothing after the first
/// word completed; the labels are put right here (tests/completions.rs completes for real).
pub fn completion_script(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "ws-guard", &mut out);
    let script = String::from_utf8_lossy(&out).into_owned();
    match shell {
        clap_complete::Shell::Bash => script.replace("ws__subcmd__guard", "ws__guard"),
        _ => script,
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 10m or 1h ({e})"))?;
    crate::bans::check_ban_duration(d)?;
    Ok(d)
}

#[derive(Subcommand)]
pub enum BansCommand {
    /// Active bans with their time left.
    List,
    /// Ban a source (its address masked to the source prefix).
    Add {
        addr: IpAddr,
        /// Only on this port; without it, on every protected port.
        #[arg(long, value_parser = port_arg())]
        port: Option<u16>,
        /// How long; without it, the config's ban_duration, or 1h if that is 0.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Lift a ban.
    Remove {
        addr: IpAddr,
        /// Only on this port; without it, on every port.
        #[arg(long, value_parser = port_arg())]
        port: Option<u16>,
    },
}

#[derive(Subcommand)]
pub enum SourcesCommand {
    /// The top sources.
    Top {
        #[arg(long, value_enum, default_value = "connections")]
        by: SortBy,
        /// How many.
        #[arg(short = 'n', default_value = "10", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        n: u32,
    },
}

/// The clap definition, with the exit codes under every command's --help.
pub fn command() -> clap::Command {
    fn with_exit_codes(c: clap::Command) -> clap::Command {
        let names: Vec<String> = c
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        let mut c = c.after_help(EXIT_CODES);
        for n in names {
            c = c.mut_subcommand(n, with_exit_codes);
        }
        c
    }
    with_exit_codes(Cli::command())
}

/// Parses the command line and runs it; the process's exit code.
pub fn main() -> ExitCode {
    let cli = {
        use clap::FromArgMatches as _;
        let matches = command().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    };
    let json = cli.json;
    let socket = cli.socket.clone();
    let req = match cli.command {
        Command::Status { pin_dir } => return status(socket, json, &pin_dir),
        Command::Limits(LimitsCommand::Get { port }) => Request::LimitsGet { port },
        Command::Limits(LimitsCommand::Set(a)) => {
            let change = LimitChange {
                max_connections: a.max_connections,
                new_connections: a.new_connections,
                connection_action: a.connection_action.or(a.action),
                rate_action: a.rate_action.or(a.action),
                syn_cookies: a.syn_cookies,
            };
            if change.is_empty() {
                command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "limits set needs at least one of --max-connections, \
                         --new-connections, --action, --connection-action, --rate-action",
                    )
                    .exit();
            }
            Request::LimitsSet {
                port: a.port,
                change,
            }
        }
        Command::Limits(LimitsCommand::Reset { port }) => Request::LimitsReset { port },
        Command::Allow(c) => list_request(ListName::Allow, c),
        Command::Deny(c) => list_request(ListName::Deny, c),
        Command::Bans(BansCommand::List) => Request::BansList,
        Command::Bans(BansCommand::Add {
            addr,
            port,
            duration,
        }) => Request::BanAdd {
            addr,
            port,
            duration_ms: duration.map(|d| d.as_millis() as u64),
        },
        Command::Bans(BansCommand::Remove { addr, port }) => Request::BanRemove { addr, port },
        Command::Sources(SourcesCommand::Top { by, n }) => {
            Request::SourcesTop { by, n: n as usize }
        }
        Command::Monitor { state } => Request::Monitor {
            on: matches!(state, OnOff::On),
        },
        Command::Events { follow, since } => return events(socket, json, follow, since),
        Command::Config(ConfigCommand::Show {
            effective,
            config,
            state_file,
        }) => {
            return config_show(socket, json, effective, &config, state_file.as_deref());
        }
        local => return run_local(local, socket, cli.json),
    };
    let socket = socket.unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
    match request(&socket, &req) {
        Ok(data) => {
            if json {
                print_json(data);
            } else {
                match output::human(&req, data) {
                    Ok(text) => print!("{text}"),
                    Err(e) => return fail(json, EXIT_REFUSED, &format!("{e:#}")),
                }
            }
            ExitCode::SUCCESS
        }
        Err(ClientError::Refused(m)) => fail(json, EXIT_REFUSED, &m),
        Err(ClientError::Unreachable(m)) => fail(json, EXIT_UNREACHABLE, &m),
    }
}

/// The version of the JSON every `--json` command prints (`schema_version`), raised when a
/// field changes meaning or goes away (adding one does not).
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// Prints `data` as `--json` output: an object gets `schema_version`.
fn print_json(mut data: serde_json::Value) {
    if let Some(o) = data.as_object_mut() {
        o.insert("schema_version".into(), JSON_SCHEMA_VERSION.into());
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&data).unwrap_or_else(|_| data.to_string())
    );
}

/// Reports an error: on stderr, and with `--json` also as JSON on stdout (`{"error":
/// {"message", "exit_code"}, "schema_version"}`), so scripts read one format; the exit code.
fn fail(json: bool, code: u8, message: &str) -> ExitCode {
    eprintln!("ws-guard: error: {message}");
    if json {
        print_json(serde_json::json!({
            "error": { "message": message, "exit_code": code },
        }));
    }
    ExitCode::from(code)
}

/// How often `events --follow` asks for new events.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// `events`: the events the daemon keeps, one line each (JSON Lines with `--json`); with
/// `follow`, then the new ones every [`FOLLOW_INTERVAL`] until SIGINT or SIGTERM (exit code 0)
/// or until the daemon goes away (exit code 3). An error is one line on stderr (and with
/// `--json` one JSON object on a line of stdout).
fn events(socket: Option<PathBuf>, json: bool, follow: bool, since: Option<u64>) -> ExitCode {
    use std::io::Write as _;

    use control::protocol::EventsReply;

    let socket = socket.unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
    let fail = |code: u8, message: &str| {
        eprintln!("ws-guard: error: {message}");
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "error": { "message": message, "exit_code": code },
                    "schema_version": JSON_SCHEMA_VERSION,
                })
            );
        }
        ExitCode::from(code)
    };
    if follow {
        stop::install();
    }
    let mut since = since;
    // The daemon's last sequence number at the previous answer: a lower one means it restarted.
    let mut last: Option<u64> = None;
    let mut out = std::io::stdout().lock();
    loop {
        let reply = match request(&socket, &Request::Events { since }) {
            Ok(data) => match serde_json::from_value::<EventsReply>(data) {
                Ok(r) => r,
                Err(e) => {
                    return fail(
                        EXIT_REFUSED,
                        &format!(
                            "unexpected answer from the daemon ({e}); is it the same version?"
                        ),
                    );
                }
            },
            Err(_) if stop::requested() => return ExitCode::SUCCESS,
            Err(ClientError::Refused(m)) => return fail(EXIT_REFUSED, &m),
            Err(ClientError::Unreachable(m)) if last.is_some() => {
                return fail(EXIT_UNREACHABLE, &format!("the daemon went away: {m}"));
            }
            Err(ClientError::Unreachable(m)) => return fail(EXIT_UNREACHABLE, &m),
        };
        if last.is_some_and(|l| reply.seq < l) {
            eprintln!("ws-guard: the daemon restarted; its events follow from the first");
            (since, last) = (None, None);
            continue;
        }
        if since.is_some() && reply.lost > 0 {
            eprintln!(
                "ws-guard: {} event(s) were no longer kept by the daemon (it keeps its last {})",
                reply.lost,
                crate::events::RING_CAPACITY
            );
        }
        for e in &reply.events {
            let line = if json {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("schema_version".into(), JSON_SCHEMA_VERSION.into());
                }
                v.to_string()
            } else {
                e.line()
            };
            // The reader went away (`| head`): done.
            if writeln!(out, "{line}").is_err() {
                return ExitCode::SUCCESS;
            }
        }
        if out.flush().is_err() {
            return ExitCode::SUCCESS;
        }
        last = Some(reply.seq);
        since = Some(since.unwrap_or(0).max(reply.seq));
        if !follow {
            return ExitCode::SUCCESS;
        }
        let until = std::time::Instant::now() + FOLLOW_INTERVAL;
        while std::time::Instant::now() < until {
            if stop::requested() {
                return ExitCode::SUCCESS;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGINT and SIGTERM for `events --follow`: noted, so it ends cleanly between two polls.
mod stop {
    use std::sync::atomic::{AtomicBool, Ordering};

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }

    pub fn install() {
        let handler: extern "C" fn(libc::c_int) = on_signal;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(sig, handler as libc::sighandler_t);
            }
        }
    }

    pub fn requested() -> bool {
        STOP.load(Ordering::SeqCst)
    }
}

fn list_request(list: ListName, c: ListCommand) -> Request {
    match c {
        ListCommand::Add { cidrs, file } => {
            let mut all: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            if let Some(path) = file {
                match read_cidr_file(&path) {
                    Ok(more) => all.extend(more),
                    Err(e) => command()
                        .error(clap::error::ErrorKind::ValueValidation, e)
                        .exit(),
                }
            }
            match all.len() {
                0 => command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "add needs a CIDR, or -f FILE",
                    )
                    .exit(),
                1 => Request::ListAdd {
                    list,
                    cidr: all.remove(0),
                },
                _ => Request::ListAddAll { list, cidrs: all },
            }
        }
        ListCommand::Remove { cidr } => Request::ListRemove {
            list,
            cidr: cidr.to_string(),
        },
        ListCommand::List => Request::ListShow { list },
        ListCommand::Reset => Request::ListReset { list },
    }
}

/// The commands that do not talk to a daemon.
fn run_local(cmd: Command, socket: Option<PathBuf>, json: bool) -> ExitCode {
    let output = crate::logging::init(log_format_of(&cmd));
    if matches!(cmd, Command::Run { .. }) {
        // The daemon's last word is a record like the others: one line, and in JSON or in the
        // journal (priority err) when it logs there.
        return match local(cmd, socket, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let message = crate::logging::one_line(&format!("{e:#}"));
                match output {
                    crate::logging::Output::Text => fail(json, EXIT_REFUSED, &message),
                    crate::logging::Output::Json => {
                        log::error!("{message}");
                        ExitCode::from(EXIT_REFUSED)
                    }
                    crate::logging::Output::Journald => {
                        log::error!("{message}");
                        if !crate::logging::stderr_is_journal() {
                            return fail(json, EXIT_REFUSED, &message);
                        }
                        ExitCode::from(EXIT_REFUSED)
                    }
                }
            }
        };
    }
    // check-config --json reports an invalid file in its own JSON.
    let own_json_errors = matches!(cmd, Command::CheckConfig { .. });
    match local(cmd, socket, json) {
        Ok(()) => ExitCode::SUCCESS,
        // The whole chain of context, one line, no backtrace: what failed and why.
        Err(e) if own_json_errors => {
            eprintln!("ws-guard: error: {e:#}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => fail(json, EXIT_REFUSED, &format!("{e:#}")),
    }
}

/// The log format of a local command: for `run`, its `--log-format`, else the config file's
/// `log_format` (read on its own, before the file is loaded and checked, so that even a file
/// refused for another reason is reported in the format it asks for); `auto` otherwise.
fn log_format_of(cmd: &Command) -> crate::logging::LogFormat {
    let Command::Run {
        config, log_format, ..
    } = cmd
    else {
        return crate::logging::LogFormat::Auto;
    };
    if let Some(f) = log_format {
        return *f;
    }
    let text = match config {
        Some(path) => crate::config::read_regular_file(path).ok(),
        None => Some(DEFAULT_CONFIG.to_owned()),
    };
    text.and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("log_format")?.clone().try_into().ok())
        .unwrap_or_default()
}

fn local(cmd: Command, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    match cmd {
        Command::Run {
            config,
            pin_dir,
            detach_on_exit,
            state_file,
            log_format: _,
        } => {
            let cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::parse(DEFAULT_CONFIG, "built-in default config")?,
            };
            let control_socket = socket.unwrap_or_else(|| cfg.control.socket.clone());
            let state_file = state_file.unwrap_or_else(|| cfg.state_file.clone());
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
                        control_socket,
                        state_file,
                    },
                ))
        }
        Command::CheckConfig { file } if json => {
            let report = match Config::load(&file) {
                Ok(cfg) => serde_json::json!({
                    "file": file,
                    "valid": true,
                    "enforces": daemon::describe(&cfg),
                }),
                Err(e) => {
                    let (line, column, field) = match &e {
                        crate::config::ConfigError::Invalid { line, field, .. } => {
                            (*line, None, Some(field.clone()))
                        }
                        crate::config::ConfigError::Parse {
                            line: Some((l, c)), ..
                        } => (Some(*l), Some(*c), None),
                        _ => (None, None, None),
                    };
                    serde_json::json!({
                        "file": file,
                        "valid": false,
                        "error": {
                            "line": line,
                            "column": column,
                            "field": field,
                            "message": e.to_string(),
                        },
                    })
                }
            };
            let valid = report["valid"] == true;
            print_json(report);
            if valid {
                Ok(())
            } else {
                anyhow::bail!("{} is not valid", file.display())
            }
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
            let removed = crate::pin::teardown(&pin_dir)?;
            if json {
                print_json(serde_json::json!({ "removed": removed }));
            } else if removed.is_empty() {
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
        Command::Completions { shell } => {
            print!("{}", completion_script(shell));
            Ok(())
        }
        Command::Man { dir: None } => clap_mangen::Man::new(command())
            .render(&mut std::io::stdout())
            .context("writing the man page"),
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command(), &dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            let toml5 = dir.join("ws-guard.toml.5");
            std::fs::write(
                &toml5,
                crate::config_reference::man_page(env!("CARGO_PKG_VERSION")),
            )
            .with_context(|| format!("writing {}", toml5.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
        _ => unreachable!("client commands are sent to the daemon"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn man_page_and_completions_come_from_the_definitions() {
        let mut page = Vec::new();
        clap_mangen::Man::new(command()).render(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.contains(".TH ws-guard 1") && page.contains("Exit codes"),
            "{page}"
        );
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command(), "ws-guard", &mut out);
            let out = String::from_utf8(out).unwrap();
            assert!(
                out.contains("max-connections") && out.contains("sources"),
                "{shell}"
            );
        }
    }

    #[test]
    fn default_paths_are_the_default_configs() {
        let c = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(c.control.socket, PathBuf::from(control::DEFAULT_SOCKET));
        assert_eq!(
            c.state_file,
            PathBuf::from(crate::state::DEFAULT_STATE_FILE)
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "0",
                "--max-connections",
                "3",
            ][..],
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "65536",
                "--max-connections",
                "3",
            ],
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "80",
                "--new-connections",
                "3/0s",
            ],
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "80",
                "--new-connections",
                "33/1s",
            ],
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "80",
                "--max-connections",
                "0",
            ],
            &[
                "ws-guard",
                "limits",
                "set",
                "--port",
                "80",
                "--action",
                "drop",
                "--rate-action",
                "drop",
            ],
            &["ws-guard", "allow", "add", "10.0.0.1/8"],
            &["ws-guard", "bans", "add", "10.0.0.1", "--duration", "0s"],
            &["ws-guard", "sources", "top", "-n", "0"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        assert!(
            Cli::try_parse_from([
                "ws-guard",
                "--json",
                "limits",
                "set",
                "--port",
                "80",
                "--max-connections",
                "none"
            ])
            .is_ok()
        );
    }
}
