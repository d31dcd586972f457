//! tapdisk: serves blktap2 taps from disk images.
//!
//! One process serves any number of taps. It listens for control requests on the unix socket
//! `ctl<pid>` in `/var/run/blktap-control` (or `--ctl-dir`), in two protocols told apart by a
//! connection's first bytes: the original binary `tapdisk_message_t` messages (what a Xen host's
//! `tap-ctl` sends) and newline-delimited JSON (see `blktap::ctl`). It serves each open tap's
//! ring from its image, all in one epoll loop.
//!
//! The process model is the original's: started with no arguments, tapdisk daemonizes, prints
//! its socket's path (`/var/run/blktap-control/ctl<pid>`) on stdout once it listens, and the
//! parent exits 0 (1 if the daemon could not start); `-D` stays in the foreground (and still
//! prints the path). It exits once its last tap is gone, provided it had attached one
//! (`--keep-running`: never by itself).
//!
//! Signals: SIGHUP reopens the log, SIGUSR1 writes every tap's state to it, SIGTERM and SIGINT
//! close every tap cleanly and exit.
//!
//! Logs go to `--log FILE`, else to stderr in the foreground, else to syslog.

mod binary;
mod conn;
mod daemon;
mod logging;
mod requests;
mod tap;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use blktap::ctl::CTL_DIR;
use blktap::server::ServerOptions;
use blktap::tap::TapOptions;
use clap::Parser;
use nix::unistd::{fork, pipe, setsid, ForkResult};

use crate::daemon::{Daemon, Options};
use crate::logging::{log, Sink};

#[derive(Parser, Debug)]
#[command(
    name = "tapdisk",
    version,
    about = "Serve blktap2 taps from disk images",
    long_about = "Serve blktap2 taps from disk images. With no arguments it daemonizes and \
                  prints its control socket's path, as the original tapdisk did."
)]
struct Cli {
    /// Stay in the foreground (do not daemonize).
    #[arg(short = 'D')]
    foreground: bool,
    /// Directory of the control socket (ctl<pid>).
    #[arg(long, value_name = "DIR", default_value = CTL_DIR, env = "BLKTAP_CTL_DIR")]
    ctl_dir: PathBuf,
    /// Log to FILE (appended; SIGHUP reopens it). Default: stderr in the foreground, else
    /// syslog.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Keep running after the last tap is gone (by default tapdisk exits then, as the original
    /// did, once it had attached a tap).
    #[arg(long, conflicts_with = "exit_when_idle")]
    keep_running: bool,
    /// Exit once the last tap is detached (the default; kept for older callers).
    #[arg(long, hide = true)]
    exit_when_idle: bool,
    /// How long a request may take, retries of transient errors included, before it is
    /// answered with an error (an open's per-request timeout overrides it for its tap).
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    deadline: u64,
    /// Behave like an old tapdisk: never ask the kernel for flush, FUA, discard or staged
    /// writes.
    #[arg(long)]
    no_extensions: bool,
    /// Whether to ask the kernel for staged writes: write data copied into the ring in
    /// tapdisk's context instead of on the writer's CPU (with the other extensions only).
    #[arg(long, value_name = "BOOL", default_value_t = true, env = "BLKTAP_STAGED_WRITES",
          action = clap::ArgAction::Set)]
    staged_writes: bool,
    /// Whether to ask the kernel to signal the ring only when tapdisk is about to sleep (the
    /// ring header's req_event), not for every request while it polls the ring (with the
    /// other extensions only). Off by default: measured alone, it brought nothing.
    #[arg(long, value_name = "BOOL", default_value_t = false, env = "BLKTAP_REQ_EVENT",
          action = clap::ArgAction::Set)]
    req_event: bool,
    /// The most pages (of 4 KiB) per request: 11, the default, is the standard ring; 12 to 128
    /// map each ring with that many data pages per request slot (N * 128 KiB per tap) and ask
    /// the kernel for requests that large (with the other extensions only). A kernel that
    /// refuses gets the standard ring. A tapdisk taking over a tap (recovery) needs the value
    /// the disk was created with.
    #[arg(long, value_name = "N", default_value_t = 11, env = "BLKTAP_MAX_SEGMENTS",
          value_parser = clap::value_parser!(u8).range(11..=128))]
    max_segments: u8,
    /// After answering requests, watch the rings for new ones for up to this many microseconds
    /// before sleeping in epoll (reading the ring's index in shared memory: a request that comes
    /// meanwhile is served without a wake-up or a system call); 0: sleep at once.
    #[arg(long, value_name = "US", default_value_t = daemon::DEFAULT_POLL_US, env = "BLKTAP_POLL_US",
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_us: u64,
    /// Whether the watch of `--poll-us` runs the CPU's spin-wait hint (`pause` on x86) between
    /// two looks at the rings: kind to a sibling hyperthread on hardware; under QEMU's TCG it
    /// leaves the emulated CPU's translated code each time.
    #[arg(long, value_name = "BOOL", default_value_t = true, env = "BLKTAP_POLL_PAUSE",
          action = clap::ArgAction::Set)]
    poll_pause: bool,
}

/// Forks; the parent waits until the child says it listens (exit 0) or failed (exit 1). The
/// child gets the writing end of that channel, in a new session, in `/`, with its standard
/// streams on `/dev/null`.
fn daemonize() -> anyhow::Result<File> {
    let (r, w) = pipe().context("pipe")?;
    // SAFETY: no other thread exists yet; the child goes on with this single-threaded program.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => {
            drop(w);
            let mut status = Vec::new();
            let _ = File::from(r).read_to_end(&mut status);
            if status.first() == Some(&b'0') {
                std::process::exit(0);
            }
            let why = String::from_utf8_lossy(status.get(1..).unwrap_or_default());
            eprintln!("tapdisk: the daemon did not start: {}", why.trim());
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(r);
            setsid().context("setsid")?;
            std::env::set_current_dir("/").context("chdir /")?;
            let null = File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("/dev/null")?;
            nix::unistd::dup2_stdin(&null).context("dup2")?;
            nix::unistd::dup2_stdout(&null).context("dup2")?;
            nix::unistd::dup2_stderr(&null).context("dup2")?;
            Ok(File::from(w))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The socket's path goes to the stdout the caller gave (daemonizing puts /dev/null there).
    let mut out = File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("dup stdout")?,
    );
    let ctl_dir = std::path::absolute(&cli.ctl_dir).context("--ctl-dir")?;
    let log_path = cli
        .log
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--log")?;
    let mut ready = if cli.foreground {
        None
    } else {
        Some(daemonize()?)
    };
    let sink = match (log_path, cli.foreground) {
        (Some(path), _) => Sink::File(path),
        (None, true) => Sink::Stderr,
        (None, false) => Sink::Syslog,
    };
    let started = (|| {
        logging::init(sink).context("cannot open the log")?;
        raise_open_files_limit();
        let opts = Options {
            ctl_dir,
            exit_when_idle: !cli.keep_running,
            poll: Duration::from_micros(cli.poll_us),
            poll_pause: cli.poll_pause,
            tap: TapOptions {
                server: ServerOptions {
                    deadline: Duration::from_secs(cli.deadline),
                },
                extensions: !cli.no_extensions,
                staged_writes: cli.staged_writes,
                req_event: cli.req_event,
                max_segments: cli.max_segments.into(),
            },
        };
        Daemon::new(&opts)
    })();
    let mut daemon = match started {
        Ok(d) => d,
        Err(e) => {
            if let Some(mut r) = ready.take() {
                let _ = write!(r, "1{e:#}");
            }
            return Err(e);
        }
    };
    log!("listening on {}", daemon.socket().display());
    let _ = writeln!(out, "{}", daemon.socket().display());
    drop(out);
    if let Some(mut r) = ready.take() {
        let _ = r.write_all(b"0");
    }
    daemon.run()
}

/// Raises the soft limit on open files to the hard one. Every image is open twice (with and
/// without `O_DIRECT`), a `vhd:` chain's files again by its worker, and one tapdisk may serve
/// many taps: the usual soft limit of 1024 (kept low for `select`, which tapdisk does not use)
/// would refuse a tap long before memory runs short. Failing leaves the limit as it was.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log!("cannot raise the open-files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => log!("cannot read the open-files limit: {e}"),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e:#}");
            eprintln!("tapdisk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(256);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        raise_open_files_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    #[test]
    fn command_line() {
        let cli = Cli::try_parse_from(["tapdisk"]).unwrap();
        assert!(!cli.foreground && !cli.keep_running);
        assert_eq!(cli.deadline, 120);
        assert!(!cli.no_extensions);
        assert_eq!(cli.ctl_dir, PathBuf::from("/var/run/blktap-control"));
        let cli = Cli::try_parse_from(["tapdisk", "-D"]).unwrap();
        assert!(cli.foreground);
        let cli = Cli::try_parse_from(["tapdisk", "--deadline", "5", "--no-extensions"]).unwrap();
        assert_eq!(cli.deadline, 5);
        assert!(cli.no_extensions);
        assert!(Cli::try_parse_from(["tapdisk", "--deadline", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "tapdisk",
            "-D",
            "--ctl-dir",
            "/tmp/x",
            "--exit-when-idle",
            "--log",
            "/tmp/l",
        ])
        .unwrap();
        assert_eq!(cli.ctl_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cli.log, Some(PathBuf::from("/tmp/l")));
        assert!(
            Cli::try_parse_from(["tapdisk", "--keep-running"])
                .unwrap()
                .keep_running
        );
        assert!(Cli::try_parse_from(["tapdisk", "--keep-running", "--exit-when-idle"]).is_err());
        assert!(Cli::try_parse_from(["tapdisk", "extra"]).is_err());
        assert_eq!(cli_poll(&["tapdisk"]), Some((100, true)));
        assert_eq!(cli_poll(&["tapdisk", "--poll-us", "0"]), Some((0, true)));
        assert_eq!(
            cli_poll(&["tapdisk", "--poll-pause", "false"]),
            Some((100, false))
        );
        assert_eq!(cli_poll(&["tapdisk", "--poll-pause", "maybe"]), None);
        assert_eq!(cli_poll(&["tapdisk", "--poll-us", "10001"]), None);
    }

    fn cli_poll(args: &[&str]) -> Option<(u64, bool)> {
        Cli::try_parse_from(args)
            .ok()
            .map(|c| (c.poll_us, c.poll_pause))
    }
}
