//! `vhd-util scan`: one line per VHD among the files a glob pattern (`-m`) and the command line
//! name, as Xen's storage manager reads them (`vhd-util scan -f -c -m PATTERN [-a]`):
//!
//! ```text
//! vhd=NAME capacity=BYTES size=BYTES hidden=0|1 parent=PARENT|none
//! vhd=NAME scan-error=-ERRNO error-message='WHAT'
//! ```
//!
//! NAME and PARENT are file names (whole paths with `-v`); capacity is the virtual size, size the
//! file's length. An image that cannot be read gets the second line (WHAT: `opening file`,
//! `getting parent`, `failure scanning target`, `resolving name`); the scan stops there with its
//! errno as the exit status, or with `-c` goes on and exits 0. `-f` (fast) takes the parent's name
//! from the header instead of finding the parent through the locators (and reads the footer copy
//! at offset 0 first); `-a` adds each parent to the files scanned (unless one of the same file
//! name is there already; a raw parent prints with capacity and size its length, hidden 1);
//! `-p` prints the images as trees, children under their parent indented by three spaces
//! (unhidden before hidden; roots that are hidden first), `(not found in scan)` after a parent that
//! is not among them; it finds parents through the locators (never fast) and names images by
//! their canonical paths. LVM volume groups (`-l`) and markers (`-M`) are not supported.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blktap::vhd::probe::Probe;
use blktap::vhd::VhdError;

/// The flags of a scan.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `-f`: the parent's name from the header.
    pub fast: bool,
    /// `-c`: go on after an image that cannot be read, and exit 0.
    pub keep_going: bool,
    /// `-p`: print trees.
    pub pretty: bool,
    /// `-a`: scan parents too.
    pub parents: bool,
    /// `-v`: whole paths.
    pub verbose: bool,
}

/// A file to scan.
struct Target {
    path: PathBuf,
    /// The file's length, when it was found.
    len: u64,
    /// A raw parent (added by `-a`), not a VHD.
    raw: bool,
}

/// What a scan found of one file.
struct Image {
    /// Its name: as found, or canonical with `-p`.
    name: String,
    /// The parent's path, as the scan found it.
    parent: Option<String>,
    capacity: u64,
    size: u64,
    hidden: u8,
}

/// An image that could not be read: its line, and the errno.
struct Failed {
    name: String,
    errno: i32,
    message: &'static str,
    detail: String,
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn base(name: &str) -> &str {
    Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(name)
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Writes the error line of `name` (with `error` as the original prints it: a negative errno,
/// except the errno of a directory the pattern could not read, which it prints as it gets it).
fn error_line(out: &mut impl Write, name: &str, error: i32, message: &str) -> io::Result<()> {
    writeln!(
        out,
        "vhd={name} scan-error={error} error-message='{message}'"
    )
}

/// Scans `pattern`'s matches then `files`; returns the message and errno to fail with.
pub fn run(
    pattern: Option<&str>,
    files: &[PathBuf],
    mut opts: Options,
) -> Result<(), (String, i32)> {
    if pattern.is_none() && files.is_empty() {
        return Err((
            "scan: give a pattern (-m PATTERN) or files".into(),
            libc::EINVAL,
        ));
    }
    if opts.pretty {
        opts.fast = false;
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let io_err = |e: io::Error| (format!("scan: cannot write: {e}"), errno_of(&e));

    let mut paths = Vec::new();
    if let Some(p) = pattern {
        match glob(p) {
            Ok(found) => paths.extend(found),
            Err(GlobFail::Pattern(detail)) => {
                error_line(&mut out, p, -libc::EINVAL, "failure scanning target")
                    .map_err(io_err)?;
                return Err((format!("scan: pattern {p:?}: {detail}"), libc::EINVAL));
            }
            Err(GlobFail::Dir(dir, e)) => {
                error_line(
                    &mut out,
                    &text(&dir),
                    errno_of(&e),
                    "failure scanning target",
                )
                .map_err(io_err)?;
                error_line(&mut out, p, -libc::EIO, "failure scanning target").map_err(io_err)?;
                return Err((
                    format!("scan: cannot read {}: {e}", dir.display()),
                    libc::EIO,
                ));
            }
        }
    }
    paths.extend(files.iter().cloned());
    let mut targets = Vec::new();
    for path in paths {
        match std::fs::metadata(&path) {
            Ok(m) => targets.push(Target {
                path,
                len: m.len(),
                raw: false,
            }),
            Err(e) => {
                error_line(
                    &mut out,
                    &text(&path),
                    -errno_of(&e),
                    "failure scanning target",
                )
                .map_err(io_err)?;
                if !opts.keep_going {
                    return Err((
                        format!("scan failed: {}: {e}", path.display()),
                        errno_of(&e),
                    ));
                }
            }
        }
    }

    let mut found: Vec<Image> = Vec::new();
    let mut names = HashSet::new();
    let mut failure = None;
    let mut i = 0;
    while i < targets.len() {
        let (image, raw_parent) = scan_one(&targets[i], opts);
        let parent = image.as_ref().ok().and_then(|im| im.parent.clone());
        match image {
            Err(f) => {
                error_line(&mut out, &f.name, -f.errno, f.message).map_err(io_err)?;
                failure.get_or_insert((format!("scan: {}", f.detail), f.errno));
            }
            Ok(image) if opts.pretty => {
                if names.insert(image.name.clone()) {
                    found.push(image);
                }
            }
            Ok(image) => print(&mut out, &image, 0, opts.verbose, "").map_err(io_err)?,
        }
        if let Some(parent) = parent.filter(|_| opts.parents) {
            add_parent(&mut out, &mut targets, i, &parent, raw_parent).map_err(io_err)?;
        }
        if failure.is_some() && !opts.keep_going {
            break;
        }
        i += 1;
    }
    if opts.pretty {
        print_trees(&mut out, found, opts.verbose).map_err(io_err)?;
    }
    match failure {
        Some(f) if !opts.keep_going => Err(f),
        _ => Ok(()),
    }
}

/// Adds the parent `parent` of target `child` to the targets, unless one of the same file name
/// is there; a relative path is taken from the child's directory.
fn add_parent(
    out: &mut impl Write,
    targets: &mut Vec<Target>,
    child: usize,
    parent: &str,
    raw: bool,
) -> io::Result<()> {
    let name = base(parent);
    if targets.iter().any(|t| base(&text(&t.path)) == name) {
        return Ok(());
    }
    let p = Path::new(parent);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        let dir = targets[child].path.parent().unwrap_or(Path::new(""));
        dir.join(p.strip_prefix("./").unwrap_or(p))
    };
    match std::fs::metadata(&path) {
        Ok(m) => {
            targets.push(Target {
                path,
                len: m.len(),
                raw,
            });
            Ok(())
        }
        Err(e) => error_line(out, &text(&path), -errno_of(&e), "failure scanning target"),
    }
}

/// Reads one target; says too whether its parent is raw.
fn scan_one(t: &Target, opts: Options) -> (Result<Image, Failed>, bool) {
    let failed = |name: &str, e: &VhdError, message| Failed {
        name: name.to_string(),
        errno: e.errno(),
        message,
        detail: e.to_string(),
    };
    let name = if opts.pretty {
        match std::fs::canonicalize(&t.path) {
            Ok(p) => text(&p),
            Err(e) => {
                let e = VhdError::Io {
                    what: "cannot resolve",
                    path: t.path.clone(),
                    source: e,
                };
                return (Err(failed(&text(&t.path), &e, "resolving name")), false);
            }
        }
    } else {
        text(&t.path)
    };
    if t.raw {
        let image = Image {
            name,
            parent: None,
            capacity: t.len,
            size: t.len,
            hidden: 1,
        };
        return (Ok(image), false);
    }
    let probe = match Probe::open(&t.path, opts.fast) {
        Ok(p) => p,
        Err(e) => return (Err(failed(&name, &e, "opening file")), false),
    };
    let parent = if probe.has_parent() {
        match parent_of(&probe, opts.fast) {
            Some(p) => Some(p),
            None => {
                let e = VhdError::Invalid {
                    path: t.path.clone(),
                    detail: "no parent locator or name to read".into(),
                };
                return (Err(failed(&name, &e, "getting parent")), false);
            }
        }
    } else {
        None
    };
    let image = Image {
        name,
        parent,
        capacity: probe.footer.current_size,
        size: t.len,
        hidden: probe.footer.hidden,
    };
    (Ok(image), probe.raw_parent())
}

/// The parent of a differencing image: fast, the header's name; else the file the locators (or
/// the name) lead to, canonical, or failing that the path a locator holds.
fn parent_of(probe: &Probe, fast: bool) -> Option<String> {
    let name = probe.header.as_ref().map(|h| h.parent_name.clone());
    if fast {
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            return Some(n);
        }
    } else if let Some(p) = probe.parent_candidates().into_iter().find(|p| p.exists()) {
        return Some(text(&std::fs::canonicalize(&p).unwrap_or(p)));
    }
    probe.locator_text()
}

/// Prints an image's line, indented by `indent` spaces, with `note` at the end.
fn print(
    out: &mut impl Write,
    image: &Image,
    indent: usize,
    verbose: bool,
    note: &str,
) -> io::Result<()> {
    let (name, parent) = if verbose {
        (image.name.as_str(), image.parent.as_deref())
    } else {
        (base(&image.name), image.parent.as_deref().map(base))
    };
    writeln!(
        out,
        "{:indent$}vhd={name} capacity={} size={} hidden={} parent={}{note}",
        "",
        image.capacity,
        image.size,
        image.hidden,
        parent.unwrap_or("none"),
    )
}

/// Prints `images` as trees (`-p`): sorted by name, each child under its parent.
fn print_trees(out: &mut impl Write, mut images: Vec<Image>, verbose: bool) -> io::Result<()> {
    images.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let n = images.len();
    let mut parent_of = vec![None; n];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        let Some(p) = images[i].parent.as_deref() else {
            continue;
        };
        if let Ok(at) = images.binary_search_by(|im| im.name.as_bytes().cmp(p.as_bytes())) {
            parent_of[i] = Some(at);
            children[at].push(i);
        }
    }
    let mut printed = vec![false; n];
    let roots = |hidden_only: bool, printed: &[bool]| -> Vec<usize> {
        (0..n)
            .filter(|&i| parent_of[i].is_none() && !printed[i])
            .filter(|&i| !hidden_only || images[i].hidden != 0)
            .collect()
    };
    let tree = Tree {
        images: &images,
        parent_of: &parent_of,
        children: &children,
        verbose,
    };
    for i in roots(true, &printed) {
        tree.print(out, i, 0, &mut printed)?;
    }
    for i in roots(false, &printed) {
        tree.print(out, i, 0, &mut printed)?;
    }
    // Whatever is left is in a loop of parents.
    for i in 0..n {
        if !printed[i] {
            tree.print(out, i, 0, &mut printed)?;
        }
    }
    Ok(())
}

struct Tree<'a> {
    images: &'a [Image],
    parent_of: &'a [Option<usize>],
    children: &'a [Vec<usize>],
    verbose: bool,
}

impl Tree<'_> {
    fn print(
        &self,
        out: &mut impl Write,
        i: usize,
        depth: usize,
        printed: &mut [bool],
    ) -> io::Result<()> {
        printed[i] = true;
        let image = &self.images[i];
        let note = if image.parent.is_some() && self.parent_of[i].is_none() {
            " (not found in scan)"
        } else {
            ""
        };
        print(out, image, depth * 3, self.verbose, note)?;
        for hidden in [false, true] {
            for &c in &self.children[i] {
                if (self.images[c].hidden != 0) == hidden && !printed[c] {
                    self.print(out, c, depth + 1, printed)?;
                }
            }
        }
        Ok(())
    }
}

/// Why a pattern matched nothing usable.
enum GlobFail {
    /// The pattern is malformed.
    Pattern(String),
    /// A directory could not be read.
    Dir(PathBuf, io::Error),
}

/// The paths that `pattern` matches, sorted: `*`, `?` and `[...]` within each `/`-separated
/// component (none matches a `/`, nor a leading `.` unless the component starts with one), as
/// glob(3) does without brace expansion. A directory that does not exist matches nothing.
fn glob(pattern: &str) -> Result<Vec<PathBuf>, GlobFail> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let mut found = vec![if pattern.starts_with('/') {
        PathBuf::from("/")
    } else {
        PathBuf::new()
    }];
    for part in pattern.split('/').filter(|p| !p.is_empty()) {
        let mut next = Vec::new();
        if !part.contains(['*', '?', '[']) {
            for p in found {
                let q = p.join(part);
                if std::fs::symlink_metadata(&q).is_ok() {
                    next.push(q);
                }
            }
        } else {
            let matcher = glob::Pattern::new(part).map_err(|e| GlobFail::Pattern(e.to_string()))?;
            for dir in found {
                let listing = if dir.as_os_str().is_empty() {
                    std::fs::read_dir(".")
                } else {
                    std::fs::read_dir(&dir)
                };
                let entries = match listing {
                    Ok(e) => e,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(GlobFail::Dir(dir, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| GlobFail::Dir(dir.clone(), e))?;
                    let name = entry.file_name();
                    if matcher.matches_with(&name.to_string_lossy(), options) {
                        next.push(dir.join(name));
                    }
                }
            }
        }
        found = next;
    }
    found.retain(|p| !p.as_os_str().is_empty() && p != Path::new("/"));
    found.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(found)
}
