//! tap-ctl: control blktap2 taps, shaped like the original tool.
//!
//! Exit status is 0 on success, otherwise the errno of what failed (as the original's was), with a
//! message on stderr naming the errno and what it means.

use std::io::IsTerminal;
use std::process::ExitCode;

use blktap::control::Control;
use blktap::sysfs::{self, DeviceKind};
use blktap::Error;
use blktap_abi as abi;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tap-ctl", version, about = "Control blktap2 taps and tapdisks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List taps: pid, minor, state, type and file of each.
    List {
        /// Only the tap with this minor.
        #[arg(short = 'm')]
        minor: Option<u32>,
        /// Only taps served by this tapdisk.
        #[arg(short = 'p')]
        pid: Option<i32>,
        /// Only images of this type.
        #[arg(short = 't')]
        image_type: Option<String>,
        /// Only this image file.
        #[arg(short = 'f')]
        file: Option<String>,
    },
    /// Allocate a tap; prints its disk's node.
    Allocate {
        /// Name to give the tap (its sysfs `name`).
        #[arg(short = 'd')]
        name: Option<String>,
    },
    /// Free a tap.
    Free {
        /// The tap's minor.
        #[arg(short = 'm')]
        minor: u32,
    },
    /// Print the block major of tapdevs (-c: the ring char major).
    Major {
        /// The block major (default).
        #[arg(short = 'b', conflicts_with = "char")]
        block: bool,
        /// The ring char major.
        #[arg(short = 'c')]
        char: bool,
    },
    /// Check whether the environment is suitable for tapdisk.
    Check,
}

/// One row of `tap-ctl list`.
struct Row {
    pid: Option<i32>,
    minor: Option<u32>,
    state: Option<u32>,
    image: Option<(String, String)>,
}

impl Row {
    /// The format the original printed to a terminal.
    fn table(&self) -> String {
        let dash = || "-".to_string();
        format!(
            "{:>8} {:>4} {:>4} {:>10} {}",
            self.pid.map_or_else(dash, |p| p.to_string()),
            self.minor.map_or_else(dash, |m| m.to_string()),
            self.state.map_or_else(dash, |s| format!("{s:#x}")),
            self.image.as_ref().map_or("-", |i| i.0.as_str()),
            self.image.as_ref().map_or("-", |i| i.1.as_str()),
        )
    }

    /// The `key=value` format the original printed to a pipe, for scripts.
    fn dict(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.pid {
            parts.push(format!("pid={p}"));
        }
        if let Some(m) = self.minor {
            parts.push(format!("minor={m}"));
        }
        if let Some(s) = self.state {
            parts.push(format!("state={s:#x}"));
        }
        if let Some((t, f)) = &self.image {
            parts.push(format!("args={t}:{f}"));
        }
        parts.join(" ")
    }
}

fn list(
    minor: Option<u32>,
    pid: Option<i32>,
    image_type: Option<&str>,
    file: Option<&str>,
) -> Result<(), Error> {
    let tty = std::io::stdout().is_terminal();
    for tap in sysfs::list_taps()? {
        let row = Row {
            pid: tap.task()?,
            minor: Some(tap.minor),
            state: None,
            image: None,
        };
        if minor.is_some_and(|m| m != tap.minor) || pid.is_some_and(|p| Some(p) != row.pid) {
            continue;
        }
        let image = row.image.as_ref();
        if image_type.is_some_and(|t| image.is_some_and(|i| i.0 != t))
            || file.is_some_and(|f| image.is_some_and(|i| i.1 != f))
        {
            continue;
        }
        println!("{}", if tty { row.table() } else { row.dict() });
    }
    Ok(())
}

fn allocate(name: Option<&str>) -> Result<(), Error> {
    let control = Control::open()?;
    let info = control.allocate()?;
    if let Some(name) = name {
        let named = sysfs::find_tap(info.minor).and_then(|t| t.set_attr("name", name));
        if let Err(e) = named {
            // Do not leave a tap behind that the caller was never told about.
            let _ = control.free(info.minor);
            return Err(e);
        }
    }
    println!("{}", abi::device_path(info.minor));
    Ok(())
}

fn check() -> Result<String, Error> {
    blktap::control::control_minor()?;
    sysfs::major(DeviceKind::Block, abi::BLOCK_MAJOR_NAME)?;
    sysfs::major(DeviceKind::Char, abi::RING_REGION_NAME)?;
    sysfs::list_taps()?;
    Ok("ok".into())
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::List {
            minor,
            pid,
            image_type,
            file,
        } => list(minor, pid, image_type.as_deref(), file.as_deref()),
        Command::Allocate { name } => allocate(name.as_deref()),
        Command::Free { minor } => Control::open()?.free(minor),
        Command::Major { char, .. } => {
            let major = if char {
                sysfs::major(DeviceKind::Char, abi::RING_REGION_NAME)?
            } else {
                sysfs::major(DeviceKind::Block, abi::BLOCK_MAJOR_NAME)?
            };
            println!("{major}");
            Ok(())
        }
        Command::Check => {
            println!("{}", check()?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tap-ctl: {e}");
            ExitCode::from(u8::try_from(e.errno()).unwrap_or(1).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_print_like_the_original() {
        let row = Row {
            pid: None,
            minor: Some(3),
            state: None,
            image: None,
        };
        assert_eq!(row.table(), "       -    3    -          - -");
        assert_eq!(row.dict(), "minor=3");
        let row = Row {
            pid: Some(1234),
            minor: Some(0),
            state: Some(0),
            image: Some(("aio".into(), "/var/tmp/disk.raw".into())),
        };
        assert_eq!(
            row.table(),
            "    1234    0  0x0        aio /var/tmp/disk.raw"
        );
        assert_eq!(
            row.dict(),
            "pid=1234 minor=0 state=0x0 args=aio:/var/tmp/disk.raw"
        );
    }

    #[test]
    fn the_command_line_matches_the_original_flags() {
        let cli = Cli::try_parse_from(["tap-ctl", "free", "-m", "7"]).unwrap();
        assert!(matches!(cli.command, Command::Free { minor: 7 }));
        let cli = Cli::try_parse_from(["tap-ctl", "list", "-m", "2", "-p", "99"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::List {
                minor: Some(2),
                pid: Some(99),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["tap-ctl", "free"]).is_err());
        assert!(Cli::try_parse_from(["tap-ctl", "free", "-m", "x"]).is_err());
    }
}
