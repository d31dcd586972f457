//! `vhd-util`: the VHD tool of Xen's storage manager, with the original's commands and flags
//! for the ones in use: `create`, `snapshot`, `query`, `check`, `coalesce`, `repair`, `set`,
//! `resize` (growing the BAT past its room under a journal), `revert` (undoing a resize cut
//! short, from its journal), `modify` (re-parenting a differencing image, setting its physical
//! size, forgetting its blocks), `fill` (allocating every block, or with `-b` reserving them
//! without their data), `read` (printing an image's structures and data, [`read`]) and `scan`
//! (listing the VHDs among files, [`scan`]).
//!
//! Errors go to stderr, one line, and the exit status is the errno (as the original tools; a
//! command line that does not parse is `EINVAL`, as the original's usage). `--debug`,
//! which Xen's storage manager passes to every command (the original turns on logging to syslog
//! with it), is accepted anywhere and ignored.

mod read;
mod scan;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blktap::vhd::chain::{find_parent, Chain};
use blktap::vhd::check::check;
use blktap::vhd::create::{
    coalesce, create_dynamic, create_fixed, resize_with_journal, revert, snapshot,
};
use blktap::vhd::fill::{fill, reserve};
use blktap::vhd::journal::default_path;
use blktap::vhd::modify::{set_parent, set_physical_size, zero_blocks};
use blktap::vhd::repair::repair;
use blktap::vhd::{VhdError, VhdImage};
use clap::error::ErrorKind;
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
    /// Change an image in place: forget its blocks (-z), set its physical size (-s), set the
    /// parent of a differencing VHD (-p); in that order.
    Modify {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// The new parent (a VHD; a raw file or device with -m).
        #[arg(short = 'p')]
        parent: Option<PathBuf>,
        /// The new parent is raw.
        #[arg(short = 'm')]
        raw_parent: bool,
        /// The physical size in bytes: the trailing footer moves to end the file there.
        #[arg(short = 's')]
        physical_size: Option<u64>,
        /// Zero the BAT: forget every block (the data is lost).
        #[arg(short = 'z')]
        zero: bool,
    },
    /// Allocate every block of a dynamic or differencing VHD, with the data it reads.
    Fill {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        /// Initialise the BAT and bitmaps only, without writing the data blocks (much faster;
        /// the disk reads the same; blocks already allocated are kept).
        #[arg(short = 'b')]
        bat_only: bool,
        /// From this sector, with -b.
        #[arg(short = 'f')]
        from: Option<u64>,
        /// Up to this sector (inclusive), with -b.
        #[arg(short = 't')]
        to: Option<u64>,
        /// Accepted with -b for compatibility: a block past what the BAT's 32-bit sector
        /// offsets address (2 TiB) is refused all the same.
        #[arg(short = 'B')]
        past_2tb: bool,
    },
    /// Print an image's structures and data.
    Read {
        /// The image.
        #[arg(short = 'n')]
        name: PathBuf,
        #[command(flatten)]
        opts: read::Options,
        /// Open with a cache (accepted, ignored).
        #[arg(short = 'C')]
        cache: bool,
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
            if raw_parent && parent.is_none() {
                return Err(Failure(
                    "modify: -m (a raw parent) goes with -p PARENT".into(),
                    libc::EINVAL,
                ));
            }
            if parent.is_none() && physical_size.is_none() && !zero {
                return Err(Failure(
                    "modify: nothing to do: give -z, -s SIZE or -p PARENT".into(),
                    libc::EINVAL,
                ));
            }
            if zero {
                if VhdImage::open(&name, false)?.header().is_none() {
                    return Err(Failure(
                        format!(
                            "{}: is a fixed disk: it has no BAT to zero (-z)",
                            name.display()
                        ),
                        libc::ENOSYS,
                    ));
                }
                zero_blocks(&name)?;
            }
            if let Some(size) = physical_size {
                set_physical_size(&name, size)?;
            }
            if let Some(parent) = parent {
                set_parent(&name, &parent, raw_parent)?;
            }
        }
        Command::Fill {
            name,
            bat_only,
            from,
            to,
            past_2tb,
        } => {
            if !bat_only && (from.is_some() || to.is_some() || past_2tb) {
                return Err(Failure(
                    "fill: -f, -t and -B can only be used with -b".into(),
                    libc::EINVAL,
                ));
            }
            if bat_only {
                reserve(&name, from, to)?;
            } else {
                fill(&name)?;
            }
        }
        Command::Read {
            name,
            opts,
            cache: _,
        } => {
            read::run(&name, &opts).map_err(|(m, e)| Failure(m, e))?;
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
    let cli = match Cli::try_parse_from(std::env::args_os().filter(|a| a != "--debug")) {
        Ok(cli) => cli,
        Err(e) => usage(e),
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, errno)) => {
            eprintln!("vhd-util: {msg}");
            ExitCode::from(u8::try_from(errno).unwrap_or(1).max(1))
        }
    }
}

/// Help and version are printed as clap prints them; any other command line that does not parse
/// is one line on stderr and `EINVAL` (the original's usage status).
fn usage(e: clap::Error) -> ! {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.to_string();
    let first = text.split("\n\n").next().unwrap_or_default();
    let line: Vec<&str> = first.lines().map(str::trim).collect();
    let line = line.join(" ");
    eprintln!(
        "vhd-util: {}",
        line.strip_prefix("error: ").unwrap_or(&line)
    );
    std::process::exit(libc::EINVAL);
}
