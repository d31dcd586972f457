//! A tap's whole life in one call each, as `tap-ctl create`, `recover`, `destroy` and
//! `allocate` do it.
//!
//! create = allocate (or take a given tap) + spawn + attach + open; on failure every step done
//! so far is undone. recover = spawn + attach + open with recovery onto a tap that lost its
//! tapdisk; on failure the new tapdisk is stopped. destroy = close + detach + free; the tapdisk
//! exits by itself once idle.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blktap_abi as abi;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::control::Control;
use crate::ctl::binary::{kind, state};
use crate::ctl::tapdisk::{self, find_server, OpenRequest, SpawnOptions};
use crate::ctl::CtlRequest;
use crate::sysfs::{self, DeviceKind};
use crate::{Error, Result};

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct CreateArgs<'a> {
    /// The tapdisk to run (see [`tapdisk::tapdisk_binary`]).
    pub tapdisk: &'a Path,
    /// What to open (the image, its flags, per-request timeout...).
    pub open: OpenRequest,
    /// The block node to make for the disk (`-d`), instead of the kernel's own.
    pub devname: Option<&'a Path>,
    /// The tap's sysfs name (`--name`).
    pub name: Option<&'a str>,
    /// Use this already allocated tap instead of allocating one.
    pub minor: Option<u32>,
    /// The tapdisk's log file.
    pub log: Option<&'a Path>,
    /// Create the disk with `RECOVERY` (it and its requests outlive the tapdisk).
    pub recovery: bool,
    /// The tapdisk's request deadline in seconds.
    pub deadline: Option<u64>,
    /// Never ask the kernel for flush, FUA or discard.
    pub no_extensions: bool,
}

impl CreateArgs<'_> {
    fn spawn_options(&self) -> SpawnOptions<'_> {
        SpawnOptions {
            tapdisk: self.tapdisk,
            log: self.log,
            deadline: self.deadline,
            no_extensions: self.no_extensions,
        }
    }
}

/// Checks that `params` has the `type:path` form (the tapdisk checks the rest: an original one
/// knows other types than this one).
pub fn check_params(params: &str) -> Result<()> {
    match params.split_once(':') {
        Some((t, p)) if !t.is_empty() && !p.is_empty() => Ok(()),
        _ => Err(Error::invalid(format!(
            "{params:?}: the image must be given as type:path"
        ))),
    }
}

/// Makes the block node `path` for tap `minor`'s disk (replacing what is there), as the
/// original `allocate -d` did.
pub fn make_block_node(path: &Path, minor: u32) -> Result<()> {
    let major = sysfs::major(DeviceKind::Block, abi::BLOCK_MAJOR_NAME)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot remove", path, e)),
    }
    mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(u64::from(major), u64::from(minor)),
    )
    .map_err(|e| Error::io("cannot make node", path, e.into()))
}

/// Undo steps, run last-first when dropped, unless the sequence they guard [`Rollback::commit`]s.
///
/// Each step of a sequence that leaves something behind (a tap, a node, a tapdisk) pushes the
/// step that takes it away; a failure (an early return, or a panic) then undoes everything done
/// so far in reverse order, and success keeps it.
#[derive(Default)]
struct Rollback<'a> {
    undo: Vec<Box<dyn FnOnce() + 'a>>,
}

impl<'a> Rollback<'a> {
    /// Adds the step undoing what is about to be (or was just) done.
    fn push(&mut self, undo: impl FnOnce() + 'a) {
        self.undo.push(Box::new(undo));
    }

    /// The sequence succeeded: keep what it did.
    fn commit(mut self) {
        self.undo.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        while let Some(undo) = self.undo.pop() {
            undo();
        }
    }
}

/// `tap-ctl allocate`: a new tap; its node is made at `devname` if given. Returns the node's
/// path.
pub fn allocate(devname: Option<&Path>, name: Option<&str>) -> Result<PathBuf> {
    let control = Control::open()?;
    let info = control.allocate()?;
    let mut rollback = Rollback::default();
    // Do not leave a tap behind that the caller was never told about.
    rollback.push(|| {
        let _ = control.free(info.minor);
    });
    if let Some(path) = devname {
        make_block_node(path, info.minor)?;
    }
    if let Some(name) = name {
        sysfs::find_tap(info.minor)?.set_attr("name", name)?;
    }
    rollback.commit();
    Ok(devname.map_or_else(
        || PathBuf::from(abi::device_path(info.minor)),
        Path::to_path_buf,
    ))
}

/// `tap-ctl create`: returns the new disk's node. On failure, what was done is undone in
/// reverse: the tapdisk is stopped (which closes the ring), the node removed, and the tap freed
/// if this call allocated it.
pub fn create(ctl_dir: &Path, args: &CreateArgs<'_>) -> Result<PathBuf> {
    check_params(&args.open.params)?;
    let mut rollback = Rollback::default();
    let minor = match args.minor {
        Some(minor) => {
            sysfs::find_tap(minor)?;
            minor
        }
        None => {
            let control = Control::open()?;
            let minor = control.allocate()?.minor;
            rollback.push(move || {
                if let Err(e) = control.free(minor) {
                    log::warn!("undoing create: {e}");
                }
            });
            minor
        }
    };
    if let Some(path) = args.devname {
        // Pushed first: a node half made (the old one removed) is removed too.
        rollback.push(move || {
            let _ = fs::remove_file(path);
        });
        make_block_node(path, minor)?;
    }
    if let Some(name) = args.name {
        sysfs::find_tap(minor)?.set_attr("name", name)?;
    }
    let spawned = tapdisk::spawn(ctl_dir, &args.spawn_options())?;
    let pid = spawned.pid();
    rollback.push(move || spawned.stop());
    tapdisk::simple(ctl_dir, pid, kind::ATTACH, minor, tapdisk::DEFAULT_TIMEOUT)?;
    if args.recovery {
        // This project's extra: only its JSON protocol carries it.
        tapdisk::json_call(ctl_dir, pid, &json_open(&args.open, minor, true, false))?;
    } else {
        tapdisk::open(ctl_dir, pid, minor, &args.open)?;
    }
    rollback.commit();
    Ok(args
        .devname
        .map_or_else(|| PathBuf::from(abi::device_path(minor)), Path::to_path_buf))
}

/// The JSON `open` for `req` (what it can say: read-only, no O_DIRECT, timeout).
fn json_open(req: &OpenRequest, minor: u32, recovery: bool, recover: bool) -> CtlRequest {
    use crate::ctl::binary::flag;
    CtlRequest::Open {
        minor,
        params: req.params.clone(),
        readonly: req.flags & flag::RDONLY != 0,
        recovery,
        recover,
        no_direct: req.flags & flag::NO_O_DIRECT != 0,
        timeout: (req.req_timeout > 0).then_some(u64::from(req.req_timeout)),
    }
}

/// `tap-ctl recover`: a new tapdisk takes over tap `minor`, whose disk was created with
/// recovery and whose tapdisk died. It maps the ring (the kernel publishes the requests it kept
/// then) and serves the existing disk from the image (of the disk's size), without creating
/// it. Returns the disk's node.
pub fn recover(ctl_dir: &Path, args: &CreateArgs<'_>, minor: u32) -> Result<String> {
    check_params(&args.open.params)?;
    sysfs::find_tap(minor)?;
    let spawned = tapdisk::spawn(ctl_dir, &args.spawn_options())?;
    let pid = spawned.pid();
    let mut rollback = Rollback::default();
    rollback.push(move || spawned.stop());
    tapdisk::simple(ctl_dir, pid, kind::ATTACH, minor, tapdisk::DEFAULT_TIMEOUT)?;
    tapdisk::json_call(ctl_dir, pid, &json_open(&args.open, minor, false, true))?;
    rollback.commit();
    Ok(abi::device_path(minor))
}

/// `tap-ctl destroy`: closes (within `timeout`) and detaches tap `minor` in its tapdisk
/// (`pid`, or the one serving it), then frees it.
pub fn destroy(
    ctl_dir: &Path,
    pid: Option<i32>,
    minor: u32,
    timeout: Option<Duration>,
) -> Result<()> {
    let pid = match pid {
        Some(pid) => Some(pid),
        None => find_server(ctl_dir, minor)?,
    };
    if let Some(pid) = pid {
        let taps = tapdisk::list(ctl_dir, pid)?;
        let tap = taps.iter().find(|t| t.minor == minor as i32);
        // Close unless the tapdisk says the tap has no image (closed, and nothing else).
        if tap.is_some_and(|t| t.state as u32 != state::CLOSED) {
            tapdisk::close(ctl_dir, pid, minor, false, timeout)?;
        }
        // A tapdisk that does not have the tap says so (ENODEV).
        tapdisk::simple(ctl_dir, pid, kind::DETACH, minor, tapdisk::DEFAULT_TIMEOUT)?;
    }
    Control::open()?.free(minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_type_colon_path() {
        assert!(check_params("aio:/x").is_ok());
        assert!(check_params("vhd:/sr/a.vhd").is_ok());
        assert!(check_params("ram:64M").is_ok());
        for bad in ["", "aio", "aio:", ":/x"] {
            assert_eq!(
                check_params(bad).unwrap_err().errno(),
                libc::EINVAL,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_rollback_undoes_last_first_unless_committed() {
        use std::cell::RefCell;
        let done = RefCell::new(Vec::new());
        {
            let mut rollback = Rollback::default();
            rollback.push(|| done.borrow_mut().push("free"));
            rollback.push(|| done.borrow_mut().push("remove node"));
            rollback.push(|| done.borrow_mut().push("stop tapdisk"));
        }
        assert_eq!(*done.borrow(), ["stop tapdisk", "remove node", "free"]);
        done.borrow_mut().clear();
        let mut rollback = Rollback::default();
        rollback.push(|| done.borrow_mut().push("free"));
        rollback.commit();
        assert!(done.borrow().is_empty());
    }

    #[test]
    fn a_bad_image_fails_before_anything_is_done() {
        // No tap, tapdisk or kernel is needed to say EINVAL: nothing is there to undo.
        let args = CreateArgs {
            tapdisk: Path::new("/nonexistent/tapdisk"),
            open: OpenRequest {
                params: "aio".into(),
                ..Default::default()
            },
            devname: None,
            name: None,
            minor: None,
            log: None,
            recovery: false,
            deadline: None,
            no_extensions: false,
        };
        let dir = Path::new("/nonexistent");
        assert_eq!(create(dir, &args).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(recover(dir, &args, 0).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn json_opens_carry_what_json_can_say() {
        use crate::ctl::binary::flag;
        let req = OpenRequest {
            params: "aio:/x".into(),
            flags: flag::RDONLY | flag::NO_O_DIRECT,
            req_timeout: 30,
            ..Default::default()
        };
        assert_eq!(
            json_open(&req, 2, true, false),
            CtlRequest::Open {
                minor: 2,
                params: "aio:/x".into(),
                readonly: true,
                recovery: true,
                recover: false,
                no_direct: true,
                timeout: Some(30),
            }
        );
    }
}
