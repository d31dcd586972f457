//! `tap-ctl create` and `destroy`: a tap's whole life in one command each.
//!
//! create = allocate (or take a given tap) + spawn + attach + open; on failure every step done
//! so far is undone. destroy = close + detach + free; the tapdisk exits by itself once idle.

use std::path::Path;

use blktap::backend::ImageSpec;
use blktap::control::Control;
use blktap::ctl::{CtlRequest, TapState};
use blktap::{sysfs, Result};
use blktap_abi as abi;

use crate::tapdisk::{self, find_server, SpawnOptions, Spawned};

/// What `create` is asked for.
#[derive(Debug, Clone)]
pub struct CreateArgs<'a> {
    /// The image, `type:path`.
    pub image: &'a str,
    /// Create a read-only disk.
    pub readonly: bool,
    /// The tap's name.
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
            log: self.log,
            deadline: self.deadline,
            no_extensions: self.no_extensions,
        }
    }
}

/// `tap-ctl create`: returns the new disk's node.
pub fn create(ctl_dir: &Path, args: &CreateArgs<'_>) -> Result<String> {
    let spec: ImageSpec = args.image.parse()?;
    let (minor, control) = match args.minor {
        Some(minor) => {
            sysfs::find_tap(minor)?;
            (minor, None)
        }
        None => {
            let control = Control::open()?;
            let minor = control.allocate()?.minor;
            (minor, Some(control))
        }
    };
    let mut spawned = None;
    let result = set_up(ctl_dir, args, &spec, minor, &mut spawned);
    if result.is_err() {
        // Undo in reverse: stopping the tapdisk closes the ring; then the tap can be freed.
        if let Some(s) = spawned {
            s.stop();
        }
        if let Some(control) = control {
            if let Err(e) = control.free(minor) {
                eprintln!("tap-ctl: undoing create: {e}");
            }
        }
    }
    result.map(|()| abi::device_path(minor))
}

fn set_up(
    ctl_dir: &Path,
    args: &CreateArgs<'_>,
    spec: &ImageSpec,
    minor: u32,
    spawned: &mut Option<Spawned>,
) -> Result<()> {
    if let Some(name) = args.name {
        sysfs::find_tap(minor)?.set_attr("name", name)?;
    }
    let pid = spawned
        .insert(tapdisk::spawn(ctl_dir, &args.spawn_options())?)
        .pid();
    tapdisk::call(ctl_dir, pid, &CtlRequest::Attach { minor })?;
    tapdisk::call(
        ctl_dir,
        pid,
        &CtlRequest::Open {
            minor,
            params: spec.to_string(),
            readonly: args.readonly,
            recovery: args.recovery,
            recover: false,
        },
    )?;
    Ok(())
}

/// `tap-ctl recover`: a new tapdisk takes over tap `minor`, whose disk was created with
/// recovery and whose tapdisk died. It maps the ring (the kernel publishes the requests it kept
/// then) and serves the existing disk from `args.image` (of the disk's size), without creating
/// it. Returns the disk's node.
pub fn recover(ctl_dir: &Path, args: &CreateArgs<'_>, minor: u32) -> Result<String> {
    let spec: ImageSpec = args.image.parse()?;
    sysfs::find_tap(minor)?;
    let spawned = tapdisk::spawn(ctl_dir, &args.spawn_options())?;
    let pid = spawned.pid();
    let result = tapdisk::call(ctl_dir, pid, &CtlRequest::Attach { minor }).and_then(|_| {
        tapdisk::call(
            ctl_dir,
            pid,
            &CtlRequest::Open {
                minor,
                params: spec.to_string(),
                readonly: args.readonly,
                recovery: false,
                recover: true,
            },
        )
    });
    if let Err(e) = result {
        spawned.stop();
        return Err(e);
    }
    Ok(abi::device_path(minor))
}

/// `tap-ctl destroy`: closes and detaches tap `minor` in its tapdisk (`pid`, or the one serving
/// it), then frees it.
pub fn destroy(ctl_dir: &Path, pid: Option<i32>, minor: u32) -> Result<()> {
    let pid = match pid {
        Some(pid) => Some(pid),
        None => find_server(ctl_dir, minor)?,
    };
    if let Some(pid) = pid {
        let list = tapdisk::call(ctl_dir, pid, &CtlRequest::List)?;
        let state = list
            .taps
            .unwrap_or_default()
            .into_iter()
            .find(|t| t.minor == minor)
            .map(|t| t.state);
        if matches!(
            state,
            Some(TapState::Open | TapState::Dead | TapState::Pausing | TapState::Paused)
        ) {
            tapdisk::call(ctl_dir, pid, &CtlRequest::Close { minor })?;
        }
        // A tapdisk that does not have the tap says so (ENODEV).
        tapdisk::call(ctl_dir, pid, &CtlRequest::Detach { minor })?;
    }
    Control::open()?.free(minor)
}
