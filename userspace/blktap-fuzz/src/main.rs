//! blktap-fuzz: a seeded fuzzer of the blktap2 control and ring devices.
//!
//! It calls every ioctl of the control node and of the ring nodes with random and edge-case
//! commands and arguments, maps and unmaps the rings in every way the mm allows (wrong lengths,
//! offsets, protections, MAP_PRIVATE, MAP_FIXED, partial munmap/mprotect, mremap), writes random
//! ring contents before RESPOND, forks children that call the ring's ioctls (the wrong process),
//! and interleaves opens, closes and FREE_TAP. A model of the driver's state (which taps exist,
//! which rings are open and mapped, which disks exist and are open, the kernel's `rsp_cons`) gives
//! the errno each call must answer wherever the ABI defines it; every mismatch is reported.
//! At the end it frees every tap it allocated.
//!
//! The run is deterministic for a seed (printed first), so `--seed S --calls N` replays it.

mod fuzz;
mod sys;

use std::process::ExitCode;

use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "blktap-fuzz",
    version,
    about = "Fuzz the blktap2 control and ring devices"
)]
struct Cli {
    /// Seed of the run (default: from the clock). Printed at start.
    #[arg(long)]
    seed: Option<u64>,
    /// How many system calls to make on the devices (the run stops at the first op past it).
    #[arg(long, default_value_t = 100_000)]
    calls: u64,
    /// Most taps allocated at once.
    #[arg(long, default_value_t = 8)]
    max_taps: usize,
    /// Print every operation and its answer.
    #[arg(long, short)]
    verbose: bool,
    /// Stop at the first mismatch.
    #[arg(long)]
    fail_fast: bool,
    /// Skip mremap of the ring mappings.
    #[arg(long)]
    no_mremap: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    // Line-buffered output is lost if the run is killed: flush each line (stdout is a file).
    println!(
        "blktap-fuzz: seed {seed} (replay: blktap-fuzz --seed {seed} --calls {} --max-taps {})",
        cli.calls, cli.max_taps
    );
    let config = fuzz::Config {
        seed,
        calls: cli.calls,
        max_taps: cli.max_taps.max(1),
        verbose: cli.verbose,
        fail_fast: cli.fail_fast,
        mremap: !cli.no_mremap,
    };
    match fuzz::run(&config) {
        Ok(report) => {
            print!("{report}");
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("blktap-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let cli = Cli::try_parse_from(["blktap-fuzz"]).unwrap();
        assert_eq!((cli.seed, cli.calls, cli.max_taps), (None, 100_000, 8));
        let cli =
            Cli::try_parse_from(["blktap-fuzz", "--seed", "5", "--calls", "10", "-v"]).unwrap();
        assert_eq!((cli.seed, cli.calls, cli.verbose), (Some(5), 10, true));
        assert!(Cli::try_parse_from(["blktap-fuzz", "--calls", "x"]).is_err());
    }
}
