//! rogue-tapdisk: a tapdisk that answers ring requests wrongly on purpose, to test how the
//! kernel module defends itself.
//!
//! It maps the ring of an already allocated tap, creates a disk, and answers the requests that
//! come according to `--mode`, printing one line per action. After `--count` bad answers it
//! exits 0, unless `--then-good` asks it to go on answering correctly (and to also answer each
//! request it answered wrongly, so the disk stays usable) until SIGTERM or SIGINT. Mode `good`
//! answers correctly until then. On exit it removes the disk (if it can) and unmaps the ring.
//! Mode `random` gives `--count` seeded random actions (good, bad and garbage answers, random
//! indices and timing), then settles (answers everything) if `--then-good`, else exits.

mod chaos;
mod rogue;

use std::process::ExitCode;

use anyhow::Context;
use blktap::ring::{DiskParams, Ring, SharedRing, RING_MESSAGE_CLOSE};
use clap::Parser;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::chaos::Chaos;
use crate::rogue::{describe, Mode, Rogue};

#[derive(Parser, Debug)]
#[command(
    name = "rogue-tapdisk",
    version,
    about = "A tapdisk that answers requests wrongly"
)]
struct Cli {
    /// The tap (already allocated) whose ring to serve.
    #[arg(long)]
    minor: u32,
    /// How to answer.
    #[arg(long, value_enum)]
    mode: Mode,
    /// How many bad answers to give.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Capacity of the disk, in 512-byte sectors.
    #[arg(long, default_value_t = 2048)]
    sectors: u64,
    /// After the bad answers, answer correctly until SIGTERM.
    #[arg(long)]
    then_good: bool,
    /// Seed of modes `garbage` and `random` (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

fn say(line: &str) {
    println!("rogue-tapdisk: {line}");
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("cannot block signals")?;
    let signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).context("cannot create a signalfd")?;

    let ring = Ring::open(cli.minor)?;
    ring.create_device(&DiskParams::new(cli.sectors, false, "rogue"))?;
    say(&format!(
        "tap {}: disk of {} sectors created; mode {:?}, {} bad answer(s){}",
        cli.minor,
        cli.sectors,
        cli.mode,
        cli.count,
        if cli.then_good {
            ", then good ones"
        } else {
            ""
        }
    ));
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if matches!(cli.mode, Mode::Garbage | Mode::Random) {
        say(&format!("seed {seed}"));
    }
    if cli.mode == Mode::Random {
        let mut chaos = Chaos::new(ring, cli.sectors, seed, cli.count);
        let served = serve_chaos(cli, &mut chaos, &signals);
        say(&format!("{} random action(s) given", chaos.actions()));
        return finish(chaos.memory(), served);
    }
    let mut rogue = Rogue::new(ring, cli.sectors, seed);
    let served = serve(cli, &mut rogue, &signals);
    finish(rogue.memory(), served)
}

/// Removes the disk (if it can) on the way out.
fn finish(ring: &Ring, served: anyhow::Result<()>) -> anyhow::Result<()> {
    match ring.remove_device() {
        Ok(()) => say("disk removed"),
        Err(e) => say(&format!("cannot remove the disk: {e}")),
    }
    say("exiting");
    served
}

/// Mode `random`: acts at every wake-up and every 10 ms, until the actions are given (and, with
/// `--then-good`, until a signal), or the kernel closes the ring.
fn serve_chaos(cli: &Cli, chaos: &mut Chaos<Ring>, signals: &SignalFd) -> anyhow::Result<()> {
    let mut waiter = Waiter::new(chaos.memory(), signals)?;
    loop {
        let Some(n) = waiter.wait(chaos.memory(), EpollTimeout::from(10u16))? else {
            return Ok(());
        };
        for line in chaos.step(n == 0) {
            say(&line);
        }
        if chaos.settled() && !cli.then_good {
            return Ok(());
        }
    }
}

/// Answers requests until done, a signal, or the kernel closing the ring.
fn serve(cli: &Cli, rogue: &mut Rogue<Ring>, signals: &SignalFd) -> anyhow::Result<()> {
    let mut waiter = Waiter::new(rogue.memory(), signals)?;
    let mut bad_done = 0u64;
    let done = |bad_done: u64| cli.mode != Mode::Good && !cli.then_good && bad_done >= cli.count;
    while !done(bad_done) {
        if waiter.wait(rogue.memory(), EpollTimeout::NONE)?.is_none() {
            return Ok(());
        }
        let mut notes = Vec::new();
        let requests = rogue.fetch(&mut notes);
        for note in notes {
            say(&note);
        }
        for req in &requests {
            if cli.mode != Mode::Good && bad_done < cli.count {
                say(&rogue.bad(cli.mode, req));
                bad_done += 1;
                if cli.then_good && cli.mode.leaves_request_pending() {
                    say(&rogue.good(req));
                }
            } else if cli.mode == Mode::Good || cli.then_good {
                say(&rogue.good(req));
            } else {
                say(&format!("{} left unanswered", describe(req)));
            }
        }
    }
    say(&format!("{bad_done} bad answer(s) given"));
    Ok(())
}

/// The ring (edge-triggered: one event per wake-up, however long requests stay unanswered) and
/// the termination signals, in one epoll.
struct Waiter {
    epoll: Epoll,
    events: [EpollEvent; 4],
}

impl Waiter {
    const RING: u64 = 1;
    const SIGNALS: u64 = 2;

    fn new(ring: &Ring, signals: &SignalFd) -> anyhow::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("cannot create epoll")?;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll
            .add(ring.fd(), EpollEvent::new(flags, Self::RING))
            .context("cannot poll the ring")?;
        epoll
            .add(signals, EpollEvent::new(EpollFlags::EPOLLIN, Self::SIGNALS))
            .context("cannot poll the signalfd")?;
        Ok(Self {
            epoll,
            events: [EpollEvent::empty(); 4],
        })
    }

    /// Waits up to `timeout`: `None` when serving must stop (a signal, an error on the ring fd,
    /// or the kernel closing the ring), else the number of events (0: the time ran out).
    fn wait(&mut self, ring: &Ring, timeout: EpollTimeout) -> anyhow::Result<Option<usize>> {
        let n = loop {
            match self.epoll.wait(&mut self.events, timeout) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
        };
        let mut ring_events = EpollFlags::empty();
        for ev in &self.events[..n] {
            if ev.data() == Self::SIGNALS {
                say("signal received");
                return Ok(None);
            }
            ring_events |= ev.events();
        }
        if ring_events.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            say(&format!("ring fd reports {ring_events:?}"));
            return Ok(None);
        }
        if SharedRing::new(ring).msg() == RING_MESSAGE_CLOSE {
            say("the kernel closes the ring");
            return Ok(None);
        }
        Ok(Some(n))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rogue-tapdisk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let cli =
            Cli::try_parse_from(["rogue-tapdisk", "--minor", "3", "--mode", "bad-id"]).unwrap();
        assert_eq!(
            (cli.minor, cli.mode, cli.count, cli.sectors),
            (3, Mode::BadId, 1, 2048)
        );
        assert!(!cli.then_good);
        let cli = Cli::try_parse_from([
            "rogue-tapdisk",
            "--minor",
            "0",
            "--mode",
            "rsp-ahead",
            "--count",
            "5",
            "--sectors",
            "4096",
            "--then-good",
            "--seed",
            "9",
        ])
        .unwrap();
        assert_eq!(cli.mode, Mode::RspAhead);
        assert_eq!((cli.count, cli.sectors, cli.seed), (5, 4096, Some(9)));
        assert!(cli.then_good);
        for mode in [
            "free-slot",
            "wrong-op",
            "duplicate",
            "garbage",
            "good",
            "random",
        ] {
            assert!(Cli::try_parse_from(["rogue-tapdisk", "--minor", "0", "--mode", mode]).is_ok());
        }
        assert!(Cli::try_parse_from(["rogue-tapdisk", "--minor", "0", "--mode", "nice"]).is_err());
        assert!(Cli::try_parse_from(["rogue-tapdisk", "--mode", "good"]).is_err());
    }
}
