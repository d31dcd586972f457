//! tap-ctl: control blktap2 taps and tapdisks, a drop-in for the original tool.
//!
//! Every command and flag of the original (blktap 3.x) is accepted with its meaning; a flag
//! whose feature does not exist here fails with one line naming the feature and exit status
//! `EOPNOTSUPP` (95), never as a usage error. Tapdisks are driven over the original binary
//! protocol, so an original tapdisk and this project's one work alike.
//!
//! As the original: every command first checks `/proc/misc` for `blktap/control`, and without
//! it prints `blktap kernel module not installed` on stdout and exits 218 (-ENOSYS); `--debug`
//! anywhere turns on debug output; the exit status is the errno of what failed, with a message
//! on stderr naming it; a usage error is `EINVAL` (22).

mod list;
mod logger;

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use blktap::control::{parse_proc_misc, Control};
use blktap::ctl::binary::{flag, kind};
use blktap::ctl::lifecycle::{self, CreateArgs};
use blktap::ctl::tapdisk::{self, OpenRequest};
use blktap::ctl::CTL_DIR;
use blktap::sysfs::{self, DeviceKind};
use blktap::Error;
use blktap_abi as abi;
use clap::{Parser, Subcommand};
use nix::errno::Errno;

use crate::list::Filter;

/// What the original printed, on stdout, when the module is missing; the storage manager
/// matches this line.
const NOT_INSTALLED: &str = "blktap kernel module not installed";
/// The original's exit status then: -ENOSYS as a byte.
const NOT_INSTALLED_STATUS: u8 = 218;

/// Where `make install` puts tapdisk, and where an installed tap-ctl runs it from (the original
/// tap-ctl's `TAPDISK_EXECDIR`): `$(LIBEXECDIR)` of the top-level Makefile, `$(PREFIX)/libexec`,
/// fixed when tap-ctl is built (`build.rs`).
const TAPDISK_EXECDIR: &str = env!("TAPDISK_EXECDIR");

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

/// Where the image is and how to open it: the flags `open` and `create` share.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
struct OpenFlags {
    /// The image, type:path (aio:/path, ram:SIZE, null:SIZE; an original tapdisk: vhd:, ...).
    #[arg(short = 'a', value_name = "TYPE:PATH")]
    args: String,
    /// Read-only disk.
    #[arg(short = 'R')]
    readonly: bool,
    /// Do not use O_DIRECT for the image.
    #[arg(short = 'D')]
    no_o_direct: bool,
    /// Stack on the parent chain tap MINOR already serves (not supported by this tapdisk).
    #[arg(short = 'e', value_name = "MINOR")]
    reuse_parent: Option<u32>,
    /// Local read cache on the leaf (not supported by this tapdisk).
    #[arg(short = 'r')]
    read_cache: bool,
    /// Mirror writes to a secondary image (not supported by this tapdisk).
    #[arg(short = '2', value_name = "TYPE:PATH")]
    secondary: Option<String>,
    /// With -2: fail over to the secondary on ENOSPC (not supported by this tapdisk).
    #[arg(short = 's')]
    standby: bool,
    /// Per-request timeout in seconds (0: the tapdisk's own, 120 s by default).
    #[arg(short = 't', long = "timeout", value_name = "SECS")]
    timeout: Option<u16>,
    /// Insert a changed-block log at PATH (not supported by this tapdisk).
    #[arg(short = 'C', value_name = "PATH")]
    cbt_log: Option<String>,
}

impl OpenFlags {
    fn request(&self, key: Option<Vec<u8>>) -> OpenRequest {
        let mut flags = 0;
        if self.readonly {
            flags |= flag::RDONLY;
        }
        if self.no_o_direct {
            flags |= flag::NO_O_DIRECT;
        }
        if self.read_cache {
            flags |= flag::ADD_LCACHE;
        }
        if self.standby {
            flags |= flag::STANDBY;
        }
        OpenRequest {
            params: self.args.clone(),
            flags,
            prt_minor: self.reuse_parent,
            secondary: self.secondary.clone(),
            req_timeout: self.timeout.unwrap_or(0),
            logpath: self.cbt_log.clone(),
            key,
        }
    }
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
        /// Make the disk's block node at this path (default: the kernel's
        /// /dev/xen/blktap-2/tapdevN).
        #[arg(short = 'd', value_name = "DEVNAME")]
        devname: Option<PathBuf>,
        /// Name to give the tap (its sysfs `name`).
        #[arg(long, value_name = "NAME")]
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
        #[command(flatten)]
        open: OpenFlags,
        /// Make the disk's block node at this path.
        #[arg(short = 'd', value_name = "DEVNAME")]
        devname: Option<PathBuf>,
        /// Put the tapdisk in this cgroup slice (not supported here).
        #[arg(short = 'c', value_name = "SLICE")]
        slice: Option<String>,
        /// Use this already allocated tap.
        #[arg(short = 'm')]
        minor: Option<u32>,
        /// Name to give the tap (its sysfs `name`).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Log file of the tapdisk.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Create the disk with RECOVERY: when the tapdisk dies the disk and its requests stay,
        /// for `tap-ctl recover`. Fails if the kernel does not support it.
        #[arg(long)]
        recovery: bool,
        /// The tapdisk's deadline per request, in seconds (retries included; default 120).
        #[arg(long, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=86400))]
        deadline: Option<u64>,
        /// The tapdisk never asks the kernel for flush, FUA or discard (like an old tapdisk).
        #[arg(long)]
        no_extensions: bool,
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
        /// The tapdisk's deadline per request, in seconds (retries included; default 120).
        #[arg(short = 't', long = "timeout", value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=86400))]
        deadline: Option<u64>,
        /// The tapdisk never asks the kernel for flush, FUA or discard.
        #[arg(long)]
        no_extensions: bool,
    },
    /// Close, detach and free a tap.
    Destroy {
        /// The tapdisk serving it (found through sysfs or the tapdisks if left out).
        #[arg(short = 'p')]
        pid: Option<i32>,
        /// The tap.
        #[arg(short = 'm')]
        minor: u32,
        /// Give up closing after this many seconds (the tap's disk may be busy).
        #[arg(short = 't', value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Start a tapdisk; prints its pid. It exits after its last tap is detached.
    Spawn {
        /// Put the tapdisk in this cgroup slice (not supported here).
        #[arg(short = 'c', value_name = "SLICE")]
        slice: Option<String>,
        /// Log file of the tapdisk (default: syslog).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// The tapdisk's deadline per request, in seconds (retries included; default 120).
        #[arg(short = 't', long = "timeout", value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=86400))]
        deadline: Option<u64>,
        /// The tapdisk never asks the kernel for flush, FUA or discard.
        #[arg(long)]
        no_extensions: bool,
    },
    /// Attach a tapdisk to a tap (it maps the tap's ring).
    Attach(TapdiskTap),
    /// Detach a tapdisk from a tap.
    Detach(TapdiskTap),
    /// Open an image on an attached tap and create its disk.
    Open {
        #[command(flatten)]
        tap: TapdiskTap,
        #[command(flatten)]
        open: OpenFlags,
        /// Read the image's encryption key from stdin (not supported by this tapdisk).
        #[arg(short = 'E')]
        encrypted: bool,
    },
    /// Remove a tap's disk and close its image.
    Close {
        #[command(flatten)]
        tap: TapdiskTap,
        /// Force: requests waiting to be tried again are failed at once.
        #[arg(short = 'f')]
        force: bool,
        /// Keep trying while the disk is busy for up to this many seconds (default 120).
        #[arg(short = 't', value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Pause a tap: returns once every request handed out is answered and the image is closed.
    Pause {
        #[command(flatten)]
        tap: TapdiskTap,
        /// Give up waiting after this many seconds (default 600).
        #[arg(short = 't', value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Resume a paused tap: open its image again, or another one of the same size.
    Unpause {
        #[command(flatten)]
        tap: TapdiskTap,
        /// Another image, type:path, of the same size.
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        args: Option<String>,
        /// Mirror writes to a secondary image (not supported by this tapdisk).
        #[arg(short = '2', value_name = "TYPE:PATH")]
        secondary: Option<String>,
        /// Insert a changed-block log at PATH (not supported by this tapdisk).
        #[arg(short = 'c', value_name = "PATH")]
        cbt_log: Option<String>,
    },
    /// Print a tap's stats as JSON (the original tapdisk's schema).
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

/// The command names, for finding the command before parsing (the module check comes first).
const COMMANDS: [&str; 16] = [
    "list", "allocate", "free", "create", "destroy", "spawn", "attach", "detach", "open", "close",
    "pause", "unpause", "stats", "major", "check", "recover",
];

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

/// `EOPNOTSUPP` for a feature tap-ctl itself does not have.
fn unsupported(feature: &str) -> Error {
    Error::os(
        format!("{feature} is not supported here"),
        Errno::EOPNOTSUPP,
    )
}

/// `-E`: the key on stdin, 32 or 64 bytes, as the original read it.
fn read_key() -> Result<Vec<u8>, Error> {
    let mut key = Vec::new();
    std::io::stdin()
        .take(1024)
        .read_to_end(&mut key)
        .map_err(|e| Error::io("cannot read the key from", "stdin", e))?;
    if key.len() != 32 && key.len() != 64 {
        return Err(Error::invalid(format!(
            "unsupported key size {} bytes: use a 256 or 512 bit key",
            key.len()
        )));
    }
    Ok(key)
}

fn check() -> Result<String, Error> {
    blktap::control::control_minor()?;
    sysfs::major(DeviceKind::Block, abi::BLOCK_MAJOR_NAME)?;
    sysfs::major(DeviceKind::Char, abi::RING_REGION_NAME)?;
    sysfs::list_taps()?;
    Ok("ok".into())
}

fn secs(s: Option<u64>) -> Option<Duration> {
    s.map(Duration::from_secs)
}

fn run(cli: Cli) -> Result<(), Error> {
    let ctl_dir = cli.ctl_dir.as_path();
    let tapdisk = tapdisk::tapdisk_binary(Path::new(TAPDISK_EXECDIR));
    let tapdisk = tapdisk.as_path();
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
        Command::Allocate { devname, name } => {
            let node = lifecycle::allocate(devname.as_deref(), name.as_deref())?;
            println!("{}", node.display());
            Ok(())
        }
        Command::Free { minor } => Control::open()?.free(minor),
        Command::Create {
            open,
            devname,
            slice,
            minor,
            name,
            log,
            recovery,
            deadline,
            no_extensions,
        } => {
            if slice.is_some() {
                return Err(unsupported("placing the tapdisk in a cgroup slice (-c)"));
            }
            let node = lifecycle::create(
                ctl_dir,
                &CreateArgs {
                    tapdisk,
                    open: open.request(None),
                    devname: devname.as_deref(),
                    name: name.as_deref(),
                    minor,
                    log: log.as_deref(),
                    recovery,
                    deadline,
                    no_extensions,
                },
            )?;
            println!("{}", node.display());
            Ok(())
        }
        Command::Recover {
            minor,
            args,
            readonly,
            log,
            deadline,
            no_extensions,
        } => {
            let open = OpenFlags {
                args,
                readonly,
                ..Default::default()
            };
            let node = lifecycle::recover(
                ctl_dir,
                &CreateArgs {
                    tapdisk,
                    open: open.request(None),
                    devname: None,
                    name: None,
                    minor: Some(minor),
                    log: log.as_deref(),
                    recovery: false,
                    deadline,
                    no_extensions,
                },
                minor,
            )?;
            println!("{node}");
            Ok(())
        }
        Command::Destroy {
            pid,
            minor,
            timeout,
        } => lifecycle::destroy(ctl_dir, pid, minor, secs(timeout)),
        Command::Spawn {
            slice,
            log,
            deadline,
            no_extensions,
        } => {
            if slice.is_some() {
                return Err(unsupported("placing the tapdisk in a cgroup slice (-c)"));
            }
            let opts = tapdisk::SpawnOptions {
                tapdisk,
                log: log.as_deref(),
                deadline,
                no_extensions,
            };
            let pid = tapdisk::spawn(ctl_dir, &opts)?.pid();
            if std::io::stdout().is_terminal() {
                println!("tapdisk spawned with pid {pid}");
            } else {
                println!("{pid}");
            }
            Ok(())
        }
        Command::Attach(t) => tapdisk::simple(
            ctl_dir,
            t.pid,
            kind::ATTACH,
            t.minor,
            tapdisk::DEFAULT_TIMEOUT,
        ),
        Command::Detach(t) => tapdisk::simple(
            ctl_dir,
            t.pid,
            kind::DETACH,
            t.minor,
            tapdisk::DEFAULT_TIMEOUT,
        ),
        Command::Open {
            tap,
            open,
            encrypted,
        } => {
            lifecycle::check_params(&open.args)?;
            let key = if encrypted { Some(read_key()?) } else { None };
            tapdisk::open(ctl_dir, tap.pid, tap.minor, &open.request(key))
        }
        Command::Close {
            tap,
            force,
            timeout,
        } => tapdisk::close(ctl_dir, tap.pid, tap.minor, force, secs(timeout)),
        Command::Pause { tap, timeout } => {
            tapdisk::pause(ctl_dir, tap.pid, tap.minor, secs(timeout))
        }
        Command::Unpause {
            tap,
            args,
            secondary,
            cbt_log,
        } => {
            if let Some(a) = &args {
                lifecycle::check_params(a)?;
            }
            let req = OpenRequest {
                params: args.unwrap_or_default(),
                secondary,
                logpath: cbt_log,
                ..Default::default()
            };
            tapdisk::unpause(ctl_dir, tap.pid, tap.minor, &req)
        }
        Command::Stats(t) => {
            println!("{}", tapdisk::stats(ctl_dir, t.pid, t.minor)?);
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

/// Whether the module is loaded: `blktap/control` in `/proc/misc` (`$BLKTAP_PROC_MISC` names
/// another file, for tests without the module).
fn module_loaded() -> bool {
    let path = std::env::var_os("BLKTAP_PROC_MISC").unwrap_or_else(|| "/proc/misc".into());
    std::fs::read_to_string(path)
        .ok()
        .and_then(|misc| parse_proc_misc(&misc, abi::MISC_NAME))
        .is_some()
}

/// Takes `--debug` out of the arguments (it may stand anywhere, as in the original).
fn strip_debug(args: Vec<OsString>) -> (Vec<OsString>, bool) {
    let n = args.len();
    let args: Vec<OsString> = args.into_iter().filter(|a| a != "--debug").collect();
    let debug = args.len() != n;
    (args, debug)
}

/// The command named in the arguments, if any.
fn command_of(args: &[OsString]) -> Option<&str> {
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| COMMANDS.contains(a))
}

fn main() -> ExitCode {
    let (args, debug) = strip_debug(std::env::args_os().collect());
    logger::init(debug);
    if command_of(&args).is_some() && !module_loaded() {
        println!("{NOT_INSTALLED}");
        eprintln!("tap-ctl: {}", Error::NotLoaded);
        if let Some(hint) = not_loaded_hint(module_installed()) {
            eprintln!("tap-ctl: {hint}");
        }
        return ExitCode::from(NOT_INSTALLED_STATUS);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            // A usage error is EINVAL, as the original's.
            return if usage {
                ExitCode::from(libc::EINVAL as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
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
        assert!(VERSION.ends_with(&format!("(tapdisk: {TAPDISK_EXECDIR}/tapdisk)")));
    }

    #[test]
    fn the_installed_tapdisk_is_under_an_absolute_execdir() {
        assert!(TAPDISK_EXECDIR.starts_with('/'), "{TAPDISK_EXECDIR}");
        assert!(!TAPDISK_EXECDIR.ends_with('/') || TAPDISK_EXECDIR == "/");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tap-ctl").chain(args.iter().copied()))
    }

    #[test]
    fn debug_may_stand_anywhere_and_the_command_is_found() {
        let args: Vec<OsString> = ["tap-ctl", "list", "--debug", "-m", "1"]
            .iter()
            .map(Into::into)
            .collect();
        let (args, debug) = strip_debug(args);
        assert!(debug);
        assert_eq!(args.len(), 4);
        assert_eq!(command_of(&args), Some("list"));
        let args: Vec<OsString> = ["tap-ctl", "--ctl-dir", "/x", "stats"]
            .iter()
            .map(Into::into)
            .collect();
        assert_eq!(command_of(&args), Some("stats"));
        assert_eq!(command_of(&["tap-ctl".into(), "--help".into()]), None);
    }

    #[test]
    fn every_original_flag_parses() {
        // The storage manager's calls, and every flag of every original command.
        for args in [
            &["list"][..],
            &["list", "-m", "1", "-p", "2", "-t", "aio", "-f", "/x"],
            &["allocate"],
            &["allocate", "-d", "/dev/xen/blktap-2/tapdev9"],
            &["free", "-m", "3"],
            &[
                "create", "-a", "aio:/x", "-R", "-D", "-d", "/tmp/n", "-e", "1", "-r", "-2",
                "aio:/m", "-s", "-t", "120", "-C", "/log", "-c", "slice",
            ],
            &["destroy", "-p", "1", "-m", "2", "-t", "120"],
            &["spawn"],
            &["spawn", "-c", "slice"],
            &["attach", "-p", "1", "-m", "2"],
            &["detach", "-p", "1", "-m", "2"],
            &[
                "open", "-p", "1", "-m", "2", "-a", "aio:/x", "-R", "-D", "-e", "1", "-r", "-2",
                "aio:/m", "-s", "-t", "120", "-C", "/log", "-E",
            ],
            &["close", "-p", "1", "-m", "2", "-f", "-t", "120"],
            &["pause", "-p", "1", "-m", "2", "-t", "30"],
            &[
                "unpause", "-p", "1", "-m", "2", "-a", "aio:/y", "-2", "aio:/m", "-c", "/log",
            ],
            &["stats", "-p", "1", "-m", "2"],
            &["major"],
            &["major", "-c"],
            &["check"],
        ] {
            assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args).err());
        }
        assert!(parse(&["free"]).is_err());
        assert!(parse(&["free", "-m", "x"]).is_err());
        assert!(parse(&["attach", "-m", "3"]).is_err());
        assert!(parse(&["open", "-p", "1", "-m", "2"]).is_err());
    }

    #[test]
    fn open_flags_become_the_messages_flags() {
        let Command::Open { open, .. } = parse(&[
            "open", "-p", "1", "-m", "2", "-a", "aio:/x", "-R", "-D", "-r", "-s", "-t", "120",
        ])
        .unwrap()
        .command
        else {
            panic!("not open")
        };
        let req = open.request(None);
        assert_eq!(
            req.flags,
            flag::RDONLY | flag::NO_O_DIRECT | flag::ADD_LCACHE | flag::STANDBY
        );
        assert_eq!(req.req_timeout, 120);
        let Command::Create { open, devname, .. } = parse(&[
            "create", "-a", "ram:1M", "-e", "4", "-C", "/l", "-d", "/tmp/n",
        ])
        .unwrap()
        .command
        else {
            panic!("not create")
        };
        let req = open.request(None);
        assert_eq!(
            (req.prt_minor, req.logpath.as_deref()),
            (Some(4), Some("/l"))
        );
        assert_eq!(devname, Some(PathBuf::from("/tmp/n")));
    }

    #[test]
    fn this_projects_own_options() {
        let Command::Create {
            recovery,
            deadline,
            no_extensions,
            minor,
            name,
            log,
            ..
        } = parse(&[
            "create",
            "-a",
            "ram:64M",
            "--recovery",
            "--deadline",
            "30",
            "--no-extensions",
            "-m",
            "4",
            "--name",
            "vbd-1",
            "--log",
            "/l",
        ])
        .unwrap()
        .command
        else {
            panic!("not create")
        };
        assert!(recovery && no_extensions);
        assert_eq!((deadline, minor), (Some(30), Some(4)));
        assert_eq!(name.as_deref(), Some("vbd-1"));
        assert_eq!(log, Some(PathBuf::from("/l")));
        assert!(parse(&["recover", "-m", "5", "-a", "aio:/d", "--timeout", "9"]).is_ok());
        assert!(parse(&["recover", "-m", "5"]).is_err());
        assert!(parse(&["spawn", "-t", "0"]).is_err());
        let cli = parse(&["--ctl-dir", "/tmp/d", "list"]).unwrap();
        assert_eq!(cli.ctl_dir, PathBuf::from("/tmp/d"));
        let cli = parse(&["destroy", "-m", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Destroy {
                pid: None,
                minor: 4,
                timeout: None
            }
        ));
    }
}
