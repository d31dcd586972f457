//! tapdisk: serves blktap2 taps from disk images.
//!
//! One process serves any number of taps. It listens for control requests (newline-delimited
//! JSON, see `blktap::ctl`) on the unix socket `ctl<pid>` in `/var/run/blktap-control` (or
//! `--ctl-dir`), and serves each open tap's ring from its image, all in one epoll loop.
//!
//! It runs in the foreground until SIGTERM, SIGINT or SIGHUP, then closes every tap cleanly.
//! With `--exit-when-idle` (what `tap-ctl spawn` passes) it also exits by itself once its last
//! tap is gone (detached, or closed by the kernel), provided it had attached one.
//!
//! `--deadline SECS` bounds each request, retries of transient errors included (120 s);
//! `--no-extensions` never asks the kernel for flush, FUA or discard (like an old tapdisk).

mod conn;
mod daemon;
mod log;
mod requests;
mod tap;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blktap::ctl::CTL_DIR;
use blktap::server::ServerOptions;
use blktap::tap::TapOptions;
use clap::Parser;

use crate::daemon::{Daemon, Options};
use crate::log::log;

#[derive(Parser, Debug)]
#[command(
    name = "tapdisk",
    version,
    about = "Serve blktap2 taps from disk images"
)]
struct Cli {
    /// Directory of the control socket (ctl<pid>).
    #[arg(long, value_name = "DIR", default_value = CTL_DIR, env = "BLKTAP_CTL_DIR")]
    ctl_dir: PathBuf,
    /// Exit once the last tap is detached (after at least one was attached).
    #[arg(long)]
    exit_when_idle: bool,
    /// How long a request may take, retries of transient errors included, before it is
    /// answered with an error.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    deadline: u64,
    /// Behave like an old tapdisk: never ask the kernel for flush, FUA or discard.
    #[arg(long)]
    no_extensions: bool,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = Options {
        ctl_dir: cli.ctl_dir,
        exit_when_idle: cli.exit_when_idle,
        tap: TapOptions {
            server: ServerOptions {
                deadline: Duration::from_secs(cli.deadline),
            },
            extensions: !cli.no_extensions,
        },
    };
    let mut daemon = Daemon::new(&opts)?;
    log!("listening on {}", daemon.socket().display());
    daemon.run()
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let cli = Cli::try_parse_from(["tapdisk"]).unwrap();
        assert!(!cli.exit_when_idle);
        assert_eq!(cli.deadline, 120);
        assert!(!cli.no_extensions);
        let cli = Cli::try_parse_from(["tapdisk", "--deadline", "5", "--no-extensions"]).unwrap();
        assert_eq!(cli.deadline, 5);
        assert!(cli.no_extensions);
        assert!(Cli::try_parse_from(["tapdisk", "--deadline", "0"]).is_err());
        let cli =
            Cli::try_parse_from(["tapdisk", "--ctl-dir", "/tmp/x", "--exit-when-idle"]).unwrap();
        assert_eq!(cli.ctl_dir, PathBuf::from("/tmp/x"));
        assert!(cli.exit_when_idle);
        assert!(Cli::try_parse_from(["tapdisk", "extra"]).is_err());
    }
}
