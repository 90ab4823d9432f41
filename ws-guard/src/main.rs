//! The ws-guard command line (see [`ws_guard::cli`]).

fn main() -> std::process::ExitCode {
    ws_guard::cli::main()
}
