//! `vhd-util`: the VHD tool of Xen's storage manager, with the original's commands and flags
//! for the ones in use: `create`, `snapshot`, `query`, `check`, `coalesce`, `repair`, `set`,
//! `resize` (growing the BAT past its room under a journal), `revert` (undoing a resize cut
//! short, from its journal), `modify -p` (re-parenting a differencing image) and `scan` (listing
//! the VHDs among files, [`scan`]).
//!
//! Errors go to stderr and the exit status is the errno (as the original tools). `--debug`,
//! which Xen's storage manager passes to every command (the original turns on logging to syslog
//! with it), is accepted anywhere and ignored.

mod scan;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blktap::vhd::chain::{find_parent, Chain};
use blktap::vhd::check::check;
use blktap::vhd::create::{
    coalesce, create_dynamic, create_fixed, resize_with_journal, revert, snapshot,
};
use blktap::vhd::journal::default_path;
use blktap::vhd::modify::set_parent;
use blktap::vhd::repair::repair;
use blktap::vhd::{VhdError, VhdImage};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "vhd-util", about = "Create and inspect VHD images", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an empty VHD (dynamic; fixed with -r).
    Create {
        /// The new image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// Virtual size in MiB.
        #[arg(short = 's')]
        size_mb: u64,
        /// Make a fixed (fully allocated) VHD.
        #[arg(short = 'r')]
        fixed: bool,
        /// Room in the BAT for growing to this many MiB (dynamic disks).
        #[arg(short = 'S')]
        max_mb: Option<u64>,
    },
    /// Create an empty differencing VHD over a parent.
    Snapshot {
        /// The new child.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The parent (a VHD; a raw file or device with -m).
        #[arg(short = 'p')]
        parent: PathBuf,
        /// The parent is raw.
        #[arg(short = 'm')]
        raw_parent: bool,
    },
    /// Print facts about an image.
    Query {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// Virtual size in MiB.
        #[arg(short = 'v')]
        virtual_size: bool,
        /// Physical size in bytes.
        #[arg(short = 's')]
        physical_size: bool,
        /// The parent's path.
        #[arg(short = 'p')]
        parent: bool,
        /// The hidden field.
        #[arg(short = 'f')]
        fields: bool,
        /// The depth of the chain (1 for an image without parent).
        #[arg(short = 'd')]
        depth: bool,
    },
    /// Check an image and its chain, saying what is wrong.
    Check {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
    },
    /// Write a differencing image's data into its parent.
    Coalesce {
        /// The child.
        #[arg(short = 'n')]
        name: PathBuf,
    },
    /// Rebuild a lost or damaged footer from its copy (or the copy from the footer).
    Repair {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
    },
    /// Grow a dynamic or differencing VHD (past the room of its BAT under a journal).
    Resize {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The new virtual size in MiB (not smaller than the current one).
        #[arg(short = 's')]
        size_mb: u64,
        /// The journal (default NAME.journal): written, and removed when done, if the BAT must
        /// grow past its room; it must not exist (revert undoes a resize cut short).
        #[arg(short = 'j')]
        journal: Option<PathBuf>,
    },
    /// Undo a resize cut short, from its journal, and remove the journal.
    Revert {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The journal (default NAME.journal).
        #[arg(short = 'j')]
        journal: Option<PathBuf>,
    },
    /// Set the parent of a differencing VHD (re-parent it), in place.
    Modify {
        /// The differencing image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The new parent (a VHD; a raw file or device with -m).
        #[arg(short = 'p')]
        parent: Option<PathBuf>,
        /// The new parent is raw.
        #[arg(short = 'm')]
        raw_parent: bool,
        /// Set the physical size (not supported).
        #[arg(short = 's')]
        physical_size: Option<String>,
        /// Zero the BAT, forgetting the data (not supported).
        #[arg(short = 'z')]
        zero: bool,
    },
    /// Print one line per VHD among files (a glob pattern's matches and those named).
    Scan {
        /// A glob pattern (`*`, `?`, `[...]`) of the files to scan.
        #[arg(short = 'm')]
        pattern: Option<String>,
        /// Fast: the parent's name from the header (not found through the locators).
        #[arg(short = 'f')]
        fast: bool,
        /// Go on after an image that cannot be read (and exit 0).
        #[arg(short = 'c')]
        keep_going: bool,
        /// Scan the logical volumes of this LVM volume group (not supported).
        #[arg(short = 'l')]
        volume_group: Option<String>,
        /// Print trees of parents and children.
        #[arg(short = 'p')]
        pretty: bool,
        /// Scan the images' parents too.
        #[arg(short = 'a')]
        parents: bool,
        /// Whole paths, not file names.
        #[arg(short = 'v')]
        verbose: bool,
        /// Show markers (not supported).
        #[arg(short = 'M')]
        markers: bool,
        /// Files to scan.
        files: Vec<PathBuf>,
    },
    /// Set a field of the footer.
    Set {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The field (`hidden`).
        #[arg(short = 'f')]
        field: String,
        /// The value.
        #[arg(short = 'v')]
        value: u8,
    },
}

/// A failure: the message and the errno to exit with.
struct Failure(String, i32);

impl From<VhdError> for Failure {
    fn from(e: VhdError) -> Self {
        let errno = e.errno();
        Failure(e.to_string(), errno)
    }
}

fn mb(name: &Path, size_mb: u64) -> Result<u64, Failure> {
    size_mb
        .checked_mul(1 << 20)
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            Failure(
                format!("{}: invalid size {size_mb} MiB", name.display()),
                libc::EINVAL,
            )
        })
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Create {
            name,
            size_mb,
            fixed,
            max_mb,
        } => {
            let size = mb(&name, size_mb)?;
            if fixed {
                create_fixed(&name, size)?;
            } else {
                let max = max_mb.map(|m| mb(&name, m)).transpose()?;
                create_dynamic(&name, size, max)?;
            }
        }
        Command::Snapshot {
            name,
            parent,
            raw_parent,
        } => {
            snapshot(&name, &parent, raw_parent)?;
        }
        Command::Query {
            name,
            virtual_size,
            physical_size,
            parent,
            fields,
            depth,
        } => {
            let image = VhdImage::open(&name, false)?;
            if virtual_size {
                println!("{}", image.size() >> 20);
            }
            if physical_size {
                println!("{}", image.physical_size());
            }
            if parent {
                if image.has_parent() {
                    println!("{}", find_parent(&image)?.display());
                } else {
                    println!("{} has no parent", name.display());
                }
            }
            if fields {
                println!("hidden: {}", image.footer().hidden);
            }
            if depth {
                let chain = Chain::open(&name, false)?;
                println!("chain depth: {}", chain.layers().len());
            }
        }
        Command::Check { name } => {
            let problems = check(&name);
            if problems.is_empty() {
                println!("{} is valid", name.display());
            } else {
                println!("{} appears invalid:", name.display());
                for p in &problems {
                    println!("  {p}");
                }
                return Err(Failure(
                    format!("{}: {} problem(s) found", name.display(), problems.len()),
                    libc::EINVAL,
                ));
            }
        }
        Command::Coalesce { name } => {
            coalesce(&name)?;
        }
        Command::Resize {
            name,
            size_mb,
            journal,
        } => {
            let journal = journal.unwrap_or_else(|| default_path(&name));
            resize_with_journal(&name, mb(&name, size_mb)?, &journal)?;
        }
        Command::Revert { name, journal } => {
            let journal = journal.unwrap_or_else(|| default_path(&name));
            revert(&name, &journal)?;
        }
        Command::Repair { name } => {
            if let Some(done) = repair(&name)? {
                println!("{}: {done}", name.display());
            }
        }
        Command::Modify {
            name,
            parent,
            raw_parent,
            physical_size,
            zero,
        } => {
            if physical_size.is_some() || zero {
                return Err(Failure(
                    "modify: -s (physical size) and -z (zeroing) are not supported; only -p".into(),
                    libc::ENOSYS,
                ));
            }
            let Some(parent) = parent else {
                return Err(Failure(
                    "modify: -p PARENT is needed (the only change supported)".into(),
                    libc::EINVAL,
                ));
            };
            set_parent(&name, &parent, raw_parent)?;
        }
        Command::Scan {
            pattern,
            fast,
            keep_going,
            volume_group,
            pretty,
            parents,
            verbose,
            markers,
            files,
        } => {
            if volume_group.is_some() {
                return Err(Failure(
                    "scan: LVM volume groups (-l) are not supported; only files".into(),
                    libc::ENOSYS,
                ));
            }
            if markers {
                return Err(Failure(
                    "scan: markers (-M) are not supported".into(),
                    libc::ENOSYS,
                ));
            }
            let opts = scan::Options {
                fast,
                keep_going,
                pretty,
                parents,
                verbose,
            };
            scan::run(pattern.as_deref(), &files, opts).map_err(|(m, e)| Failure(m, e))?;
        }
        Command::Set { name, field, value } => {
            if field != "hidden" {
                return Err(Failure(
                    format!("set: unknown field {field:?} (hidden)"),
                    libc::EINVAL,
                ));
            }
            VhdImage::open(&name, true)?.set_hidden(value)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(std::env::args_os().filter(|a| a != "--debug"));
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, errno)) => {
            eprintln!("vhd-util: {msg}");
            ExitCode::from(u8::try_from(errno).unwrap_or(1).max(1))
        }
    }
}
