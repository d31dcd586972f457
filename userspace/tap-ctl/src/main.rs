//! tap-ctl: control blktap2 taps and tapdisks, shaped like the original tool.
//!
//! Exit status is 0 on success, otherwise the errno of what failed (as the original's was), with a
//! message on stderr naming the errno and what it means.

mod lifecycle;
mod list;
mod tapdisk;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use blktap::backend::ImageSpec;
use blktap::control::Control;
use blktap::ctl::{CtlRequest, CTL_DIR};
use blktap::sysfs::{self, DeviceKind};
use blktap::Error;
use blktap_abi as abi;
use clap::{Parser, Subcommand};

use crate::lifecycle::CreateArgs;
use crate::list::Filter;

/// `tap-ctl --version`: the version and where the installed tapdisk is looked for (`make install`
/// checks it against its `$(LIBEXECDIR)`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (tapdisk: ",
    env!("TAPDISK_EXECDIR"),
    "/tapdisk)"
);

#[derive(Parser)]
#[command(name = "tap-ctl", version = VERSION, about = "Control blktap2 taps and tapdisks")]
struct Cli {
    /// Directory of the tapdisks' control sockets (ctl<pid>).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = CTL_DIR,
        env = "BLKTAP_CTL_DIR"
    )]
    ctl_dir: PathBuf,
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
    /// Allocate a tap, start a tapdisk, attach it and open an image; prints the disk's node.
    Create {
        /// The image, type:path (aio:/path, ram:SIZE, null:SIZE).
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        args: String,
        /// Read-only disk.
        #[arg(short = 'R')]
        readonly: bool,
        /// Name to give the tap.
        #[arg(short = 'd')]
        name: Option<String>,
        /// Use this already allocated tap.
        #[arg(short = 'm')]
        minor: Option<u32>,
        /// Log file of the tapdisk.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Create the disk with RECOVERY: when the tapdisk dies the disk and its requests stay,
        /// for `tap-ctl recover`. Fails if the kernel does not support it.
        #[arg(long)]
        recovery: bool,
        #[command(flatten)]
        tapdisk: TapdiskOptions,
    },
    /// Start a new tapdisk on a tap whose disk (created with --recovery) lost its tapdisk: it
    /// answers the requests the kernel kept; prints the disk's node.
    Recover {
        /// The tap.
        #[arg(short = 'm')]
        minor: u32,
        /// The image, type:path, of the disk's size.
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        args: String,
        /// Read-only image (writes are answered with errors).
        #[arg(short = 'R')]
        readonly: bool,
        /// Log file of the tapdisk.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        #[command(flatten)]
        tapdisk: TapdiskOptions,
    },
    /// Close, detach and free a tap.
    Destroy {
        /// The tapdisk serving it (found through sysfs or the tapdisks if left out).
        #[arg(short = 'p')]
        pid: Option<i32>,
        /// The tap.
        #[arg(short = 'm')]
        minor: u32,
    },
    /// Start a tapdisk; prints its pid. It exits after its last tap is detached.
    Spawn {
        /// Log file of the tapdisk (default: no log).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        #[command(flatten)]
        tapdisk: TapdiskOptions,
    },
    /// Attach a tapdisk to a tap (it maps the tap's ring).
    Attach(TapdiskTap),
    /// Detach a tapdisk from a tap.
    Detach(TapdiskTap),
    /// Open an image on an attached tap and create its disk.
    Open {
        #[command(flatten)]
        tap: TapdiskTap,
        /// The image, type:path.
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        args: String,
        /// Read-only disk.
        #[arg(short = 'R')]
        readonly: bool,
    },
    /// Remove a tap's disk and close its image.
    Close(TapdiskTap),
    /// Pause a tap: returns once every request handed out is answered and the image is closed.
    Pause(TapdiskTap),
    /// Resume a paused tap: open its image again, or another one of the same size.
    Unpause {
        #[command(flatten)]
        tap: TapdiskTap,
        /// Another image, type:path, of the same size.
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        args: Option<String>,
    },
    /// Print a tap's I/O counters as JSON.
    Stats(TapdiskTap),
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

/// Options of a tapdisk that tap-ctl starts.
#[derive(clap::Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TapdiskOptions {
    /// The tapdisk's deadline per request, in seconds (retries included; default 120).
    #[arg(short = 't', long = "timeout", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    timeout: Option<u64>,
    /// The tapdisk never asks the kernel for flush, FUA or discard (like an old tapdisk).
    #[arg(long)]
    no_extensions: bool,
}

impl TapdiskOptions {
    fn spawn_options(self, log: Option<&Path>) -> tapdisk::SpawnOptions<'_> {
        tapdisk::SpawnOptions {
            log,
            deadline: self.timeout,
            no_extensions: self.no_extensions,
        }
    }
}

/// A tap in a given tapdisk: `-p PID -m MINOR`.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
struct TapdiskTap {
    /// The tapdisk's pid.
    #[arg(short = 'p')]
    pid: i32,
    /// The tap's minor.
    #[arg(short = 'm')]
    minor: u32,
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

fn spawn(ctl_dir: &Path, opts: &tapdisk::SpawnOptions<'_>) -> Result<(), Error> {
    let pid = tapdisk::spawn(ctl_dir, opts)?.pid();
    if std::io::stdout().is_terminal() {
        println!("tapdisk spawned with pid {pid}");
    } else {
        println!("{pid}");
    }
    Ok(())
}

fn call(ctl_dir: &Path, t: TapdiskTap, req: CtlRequest) -> Result<(), Error> {
    tapdisk::call(ctl_dir, t.pid, &req).map(drop)
}

fn run(cli: Cli) -> Result<(), Error> {
    let ctl_dir = cli.ctl_dir.as_path();
    match cli.command {
        Command::List {
            minor,
            pid,
            image_type,
            file,
        } => list::list(
            ctl_dir,
            &Filter {
                minor,
                pid,
                image_type: image_type.as_deref(),
                file: file.as_deref(),
            },
        ),
        Command::Allocate { name } => allocate(name.as_deref()),
        Command::Free { minor } => Control::open()?.free(minor),
        Command::Create {
            args,
            readonly,
            name,
            minor,
            log,
            recovery,
            tapdisk,
        } => {
            let node = lifecycle::create(
                ctl_dir,
                &CreateArgs {
                    image: &args,
                    readonly,
                    name: name.as_deref(),
                    minor,
                    log: log.as_deref(),
                    recovery,
                    deadline: tapdisk.timeout,
                    no_extensions: tapdisk.no_extensions,
                },
            )?;
            println!("{node}");
            Ok(())
        }
        Command::Recover {
            minor,
            args,
            readonly,
            log,
            tapdisk,
        } => {
            let node = lifecycle::recover(
                ctl_dir,
                &CreateArgs {
                    image: &args,
                    readonly,
                    name: None,
                    minor: Some(minor),
                    log: log.as_deref(),
                    recovery: false,
                    deadline: tapdisk.timeout,
                    no_extensions: tapdisk.no_extensions,
                },
                minor,
            )?;
            println!("{node}");
            Ok(())
        }
        Command::Destroy { pid, minor } => lifecycle::destroy(ctl_dir, pid, minor),
        Command::Spawn { log, tapdisk } => spawn(ctl_dir, &tapdisk.spawn_options(log.as_deref())),
        Command::Attach(t) => call(ctl_dir, t, CtlRequest::Attach { minor: t.minor }),
        Command::Detach(t) => call(ctl_dir, t, CtlRequest::Detach { minor: t.minor }),
        Command::Open {
            tap,
            args,
            readonly,
        } => {
            let spec: ImageSpec = args.parse()?;
            let req = CtlRequest::Open {
                minor: tap.minor,
                params: spec.to_string(),
                readonly,
                recovery: false,
                recover: false,
            };
            call(ctl_dir, tap, req)
        }
        Command::Close(t) => call(ctl_dir, t, CtlRequest::Close { minor: t.minor }),
        Command::Pause(t) => call(ctl_dir, t, CtlRequest::Pause { minor: t.minor }),
        Command::Unpause { tap, args } => {
            let params = match args {
                Some(a) => Some(a.parse::<ImageSpec>()?.to_string()),
                None => None,
            };
            let req = CtlRequest::Unpause {
                minor: tap.minor,
                params,
            };
            call(ctl_dir, tap, req)
        }
        Command::Stats(t) => {
            let r = tapdisk::call(ctl_dir, t.pid, &CtlRequest::Stats { minor: t.minor })?;
            let stats = r.stats.unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string(&stats).expect("stats always serialize")
            );
            Ok(())
        }
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

/// Whether a `blktap` module is installed for the running kernel, as a dry run of modprobe says
/// (it honours `MODPROBE_OPTIONS`, e.g. `-d ROOT`); `None` without modprobe.
fn module_installed() -> Option<bool> {
    for modprobe in ["modprobe", "/sbin/modprobe"] {
        let status = std::process::Command::new(modprobe)
            .args(["--dry-run", "--quiet", "blktap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(status) => return Some(status.success()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return None,
        }
    }
    None
}

/// What to do when the module is not loaded, by whether it is installed.
fn not_loaded_hint(installed: Option<bool>) -> Option<&'static str> {
    match installed? {
        true => Some("blktap is installed for this kernel: load it with `modprobe blktap`"),
        false => Some(
            "no blktap module is installed for this kernel: install it (blktap2-rs: `make \
             install` or `make dkms`, see its README, \"Install on a host\"), or insmod blktap.ko",
        ),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tap-ctl: {e}");
            if matches!(e, Error::NotLoaded) {
                if let Some(hint) = not_loaded_hint(module_installed()) {
                    eprintln!("tap-ctl: {hint}");
                }
            }
            ExitCode::from(u8::try_from(e.errno()).unwrap_or(1).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_gets_the_right_hint() {
        assert!(not_loaded_hint(Some(true))
            .unwrap()
            .contains("modprobe blktap"));
        let absent = not_loaded_hint(Some(false)).unwrap();
        assert!(absent.contains("no blktap module is installed"), "{absent}");
        assert!(!absent.contains("modprobe"), "{absent}");
        assert_eq!(not_loaded_hint(None), None);
    }

    #[test]
    fn the_version_names_the_installed_tapdisk() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.ends_with(&format!("(tapdisk: {}/tapdisk)", tapdisk::TAPDISK_EXECDIR)));
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

    #[test]
    fn tapdisk_commands_take_pid_and_minor() {
        let tap = TapdiskTap { pid: 42, minor: 3 };
        for (name, check) in [
            (
                "attach",
                (|c| matches!(c, Command::Attach(_))) as fn(&Command) -> bool,
            ),
            ("detach", |c| matches!(c, Command::Detach(_))),
            ("close", |c| matches!(c, Command::Close(_))),
            ("pause", |c| matches!(c, Command::Pause(_))),
            ("stats", |c| matches!(c, Command::Stats(_))),
        ] {
            let cli = Cli::try_parse_from(["tap-ctl", name, "-p", "42", "-m", "3"]).unwrap();
            assert!(check(&cli.command), "{name}");
            let (Command::Attach(t)
            | Command::Detach(t)
            | Command::Close(t)
            | Command::Pause(t)
            | Command::Stats(t)) = cli.command
            else {
                unreachable!()
            };
            assert_eq!(t, tap);
            assert!(Cli::try_parse_from(["tap-ctl", name, "-m", "3"]).is_err());
            assert!(Cli::try_parse_from(["tap-ctl", name, "-p", "42"]).is_err());
        }
        let cli = Cli::try_parse_from([
            "tap-ctl", "open", "-p", "42", "-m", "3", "-a", "aio:/x", "-R",
        ])
        .unwrap();
        match cli.command {
            Command::Open {
                tap: t,
                args,
                readonly,
            } => {
                assert_eq!(t, tap);
                assert_eq!(args, "aio:/x");
                assert!(readonly);
            }
            _ => panic!("not open"),
        }
        assert!(Cli::try_parse_from(["tap-ctl", "open", "-p", "42", "-m", "3"]).is_err());

        let cli = Cli::try_parse_from(["tap-ctl", "unpause", "-p", "42", "-m", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Unpause { tap: t, args: None } if t == tap
        ));
        let cli = Cli::try_parse_from([
            "tap-ctl", "unpause", "-p", "42", "-m", "3", "-a", "aio:/new",
        ])
        .unwrap();
        match cli.command {
            Command::Unpause { tap: t, args } => {
                assert_eq!(t, tap);
                assert_eq!(args.as_deref(), Some("aio:/new"));
            }
            _ => panic!("not unpause"),
        }
        assert!(Cli::try_parse_from(["tap-ctl", "unpause", "-m", "3"]).is_err());
    }

    #[test]
    fn recovery_and_tapdisk_options() {
        let cli = Cli::try_parse_from([
            "tap-ctl",
            "create",
            "-a",
            "ram:64M",
            "--recovery",
            "-t",
            "30",
            "--no-extensions",
        ])
        .unwrap();
        match cli.command {
            Command::Create {
                recovery,
                readonly,
                tapdisk,
                ..
            } => {
                assert!(recovery && !readonly);
                assert_eq!(
                    tapdisk,
                    TapdiskOptions {
                        timeout: Some(30),
                        no_extensions: true
                    }
                );
            }
            _ => panic!("not create"),
        }
        // -R stays read-only, as in the original tap-ctl.
        let cli = Cli::try_parse_from(["tap-ctl", "create", "-a", "ram:1M", "-R"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Create {
                readonly: true,
                recovery: false,
                ..
            }
        ));
        let cli = Cli::try_parse_from([
            "tap-ctl",
            "recover",
            "-m",
            "5",
            "-a",
            "aio:/d",
            "--timeout",
            "9",
        ])
        .unwrap();
        match cli.command {
            Command::Recover {
                minor,
                args,
                tapdisk,
                ..
            } => {
                assert_eq!((minor, args.as_str()), (5, "aio:/d"));
                assert_eq!(tapdisk.timeout, Some(9));
            }
            _ => panic!("not recover"),
        }
        assert!(Cli::try_parse_from(["tap-ctl", "recover", "-m", "5"]).is_err());
        assert!(Cli::try_parse_from(["tap-ctl", "recover", "-a", "ram:1M"]).is_err());
        assert!(Cli::try_parse_from(["tap-ctl", "create", "-a", "ram:1M", "-t", "0"]).is_err());
        let cli = Cli::try_parse_from(["tap-ctl", "spawn", "-t", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Spawn {
                tapdisk: TapdiskOptions {
                    timeout: Some(4),
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn create_destroy_and_spawn() {
        let cli = Cli::try_parse_from(["tap-ctl", "create", "-a", "ram:64M"]).unwrap();
        match cli.command {
            Command::Create {
                args,
                readonly,
                name,
                minor,
                log,
                ..
            } => {
                assert_eq!(args, "ram:64M");
                assert!(!readonly && name.is_none() && minor.is_none() && log.is_none());
            }
            _ => panic!("not create"),
        }
        let cli = Cli::try_parse_from([
            "tap-ctl", "create", "-a", "aio:/d", "-R", "-d", "vbd-1", "-m", "4", "--log", "/l",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Create {
                readonly: true,
                minor: Some(4),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["tap-ctl", "create"]).is_err());

        let cli = Cli::try_parse_from(["tap-ctl", "destroy", "-m", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Destroy {
                pid: None,
                minor: 4
            }
        ));
        let cli = Cli::try_parse_from(["tap-ctl", "destroy", "-p", "9", "-m", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Destroy {
                pid: Some(9),
                minor: 4
            }
        ));
        assert!(Cli::try_parse_from(["tap-ctl", "destroy"]).is_err());

        let cli = Cli::try_parse_from(["tap-ctl", "spawn", "--ctl-dir", "/tmp/c"]).unwrap();
        assert!(matches!(cli.command, Command::Spawn { log: None, .. }));
        assert_eq!(cli.ctl_dir, PathBuf::from("/tmp/c"));
        let cli = Cli::try_parse_from(["tap-ctl", "--ctl-dir", "/tmp/d", "list"]).unwrap();
        assert_eq!(cli.ctl_dir, PathBuf::from("/tmp/d"));
    }
}
