// SPDX-License-Identifier: GPL-2.0

//! `/sys/class/blktap2`: the class attributes and the per-tap attributes.
//!
//! Class attributes:
//! - `verbosity` (rw): an integer; above 0 the driver logs each tap operation.
//! - `devices` (ro): one line `minor name` per tap that has a disk.
//!
//! Per-tap attributes, in `/sys/class/blktap2/blktap!blktapN/`:
//! - `name` (rw): up to 255 bytes; shows the minor while unset.
//! - `task` (ro): pid of the process holding the ring, or nothing.
//! - `debug` (ro): the tap's state.
//! - `pause` (rw): `1` while the disk is paused (no request goes to the ring). Writing `1` or
//!   `0` asks the tapdisk to pause or resume through the ring's `msg` byte; the tapdisk does
//!   it with the `PAUSE` or `RESUME` ioctl.
//! - `deadline` (rw): seconds a request may wait for tapdisk's answer, 1..=86400; then it
//!   fails with an I/O error. New taps start with the `request_timeout` module parameter.
//!
//! See `Documentation/ABI/testing/sysfs-class-blktap2`.

use core::{
    fmt::Write,
    sync::atomic::Ordering, //
};

use kernel::{
    prelude::*,
    sync::Arc, //
};

use crate::{
    class::{
        ClassAttribute,
        ClassAttributes,
        DeviceAttribute,
        DeviceAttributes,
        SysfsBuf, //
    },
    tap::{
        RingUser,
        Tap, //
    },
    uapi,
    Taps, //
};

static CLASS_ATTRIBUTES: [ClassAttribute; 2] = [
    ClassAttribute::new::<Arc<Taps>>(c"verbosity", 0o644),
    ClassAttribute::new::<Arc<Taps>>(c"devices", 0o444),
];

impl ClassAttributes for Arc<Taps> {
    const ATTRIBUTES: &'static [ClassAttribute] = &CLASS_ATTRIBUTES;
    const NODE_DIR: Option<&'static CStr> = Some(uapi::NODE_DIR);
    const NODE_MODE: u16 = uapi::NODE_MODE;

    fn show(&self, name: &CStr, out: &mut SysfsBuf<'_>) -> Result {
        match name.to_bytes() {
            b"verbosity" => writeln!(out, "{}", self.verbosity.load(Ordering::Relaxed))?,
            b"devices" => {
                let table = self.table.lock();
                for (minor, entry) in table.iter() {
                    let inner = entry.tap.inner.lock();
                    if inner.disk.is_none() {
                        continue;
                    }
                    write!(out, "{minor} ")?;
                    if inner.name.is_empty() {
                        writeln!(out, "{minor}")?;
                    } else {
                        out.write_bytes(&inner.name)?;
                        out.write_bytes(b"\n")?;
                    }
                }
            }
            _ => return Err(EIO),
        }
        Ok(())
    }

    fn store(&self, name: &CStr, input: &[u8]) -> Result {
        match name.to_bytes() {
            b"verbosity" => {
                self.verbosity.store(parse_int(input)?, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(EACCES),
        }
    }
}

static TAP_ATTRIBUTES: [DeviceAttribute; 5] = [
    DeviceAttribute::new::<Tap>(c"name", 0o644),
    DeviceAttribute::new::<Tap>(c"task", 0o444),
    DeviceAttribute::new::<Tap>(c"debug", 0o444),
    DeviceAttribute::new::<Tap>(c"pause", 0o644),
    DeviceAttribute::new::<Tap>(c"deadline", 0o644),
];

impl DeviceAttributes for Tap {
    const ATTRIBUTES: &'static [DeviceAttribute] = &TAP_ATTRIBUTES;

    fn show(&self, name: &CStr, out: &mut SysfsBuf<'_>) -> Result {
        let inner = self.inner.lock();
        match name.to_bytes() {
            b"name" if inner.name.is_empty() => writeln!(out, "{}", self.minor())?,
            b"name" => {
                out.write_bytes(&inner.name)?;
                out.write_bytes(b"\n")?;
            }
            b"task" => {
                if let RingUser::Open(pid) = inner.ring_user {
                    writeln!(out, "{pid}")?;
                }
            }
            b"debug" => {
                writeln!(out, "minor: {}", self.minor())?;
                out.write_bytes(b"name: ")?;
                out.write_bytes(&inner.name)?;
                out.write_bytes(b"\n")?;
                match inner.ring_user {
                    RingUser::Open(pid) => writeln!(out, "ring: open by {pid}")?,
                    RingUser::Closing => writeln!(out, "ring: closing")?,
                    RingUser::Closed => writeln!(out, "ring: closed")?,
                }
                if let Some(disk) = &inner.disk {
                    let ro = if inner.read_only { " (read-only)" } else { "" };
                    writeln!(out, "disk: tapdev{}{ro}", self.minor())?;
                    let paused = if disk.is_quiesced() { "yes" } else { "no" };
                    writeln!(out, "paused: {paused}")?;
                    let f = inner.features;
                    writeln!(
                        out,
                        "features: flush={} fua={} discard={}",
                        u8::from(f.flush),
                        u8::from(f.fua),
                        u8::from(f.discard)
                    )?;
                } else {
                    writeln!(out, "disk: none")?;
                }
                let ring = self.ring.lock();
                let mapped = if ring.is_mapped() { "yes" } else { "no" };
                writeln!(out, "mapped: {mapped}")?;
                let recovery = match (ring.recovery, ring.is_live()) {
                    (false, _) => "off",
                    (true, true) => "on",
                    (true, false) => "waiting for a tapdisk",
                };
                writeln!(out, "recovery: {recovery}")?;
                writeln!(out, "deadline: {}", ring.deadline)?;
                writeln!(out, "pending: {}", ring.pending())?;
                writeln!(out, "late: {}", ring.late_slots())?;
                writeln!(out, "parked: {}", ring.parked())?;
                writeln!(out, "completed: {}", ring.completed)?;
                writeln!(out, "refused: {}", ring.refused)?;
                writeln!(out, "timed_out: {}", ring.timed_out)?;
                writeln!(out, "late_answers: {}", ring.late)?;
                writeln!(out, "reissued: {}", ring.reissued)?;
            }
            b"pause" => {
                let paused = inner.disk.as_ref().is_some_and(|d| d.is_quiesced());
                writeln!(out, "{}", u8::from(paused))?;
            }
            b"deadline" => writeln!(out, "{}", self.ring.lock().deadline)?,
            _ => return Err(EIO),
        }
        Ok(())
    }

    fn store(&self, name: &CStr, input: &[u8]) -> Result {
        match name.to_bytes() {
            b"pause" => match parse_int(input)? {
                0 => self.request_pause(false),
                1 => self.request_pause(true),
                _ => Err(EINVAL),
            },
            b"deadline" => {
                let secs = u32::try_from(parse_int(input)?).map_err(|_| EINVAL)?;
                if !(1..=crate::DEADLINE_MAX).contains(&secs) {
                    return Err(EINVAL);
                }
                let inner = self.inner.lock();
                self.ring.lock().deadline = secs;
                if let Some(disk) = &inner.disk {
                    disk.set_timeout_ms(secs * 1000);
                }
                Ok(())
            }
            b"name" => {
                let name = parse_name(input)?;
                let mut copy = KVec::with_capacity(name.len(), GFP_KERNEL)?;
                copy.extend_from_slice(name, GFP_KERNEL)?;
                self.inner.lock().name = copy;
                Ok(())
            }
            _ => Err(EACCES),
        }
    }
}

/// Validates a tap name written to `name`: one trailing newline is dropped; the rest must be at
/// most [`uapi::NAME_MAX`] bytes with no NUL. An empty name unsets it.
///
/// # Errors
///
/// `ENAMETOOLONG` for a name that is too long, `EINVAL` for one with a NUL.
pub(crate) fn parse_name(input: &[u8]) -> Result<&[u8]> {
    let name = input.strip_suffix(b"\n").unwrap_or(input);
    if name.len() > uapi::NAME_MAX {
        return Err(ENAMETOOLONG);
    }
    if name.contains(&0) {
        return Err(EINVAL);
    }
    Ok(name)
}

/// Parses a decimal integer written to a sysfs attribute, surrounded by optional white space.
///
/// # Errors
///
/// `EINVAL` if the input is not a decimal `i32`.
pub(crate) fn parse_int(input: &[u8]) -> Result<i32> {
    core::str::from_utf8(input)
        .map_err(|_| EINVAL)?
        .trim()
        .parse::<i32>()
        .map_err(|_| EINVAL)
}

#[kunit_tests(blktap_sysfs)]
mod tests {
    use super::*;

    #[test]
    fn names_up_to_255_bytes_are_accepted() -> Result {
        assert_eq!(parse_name(b"vbd-3-768\n")?, b"vbd-3-768");
        assert_eq!(parse_name(b"")?, b"");
        let long = [b'x'; 256];
        assert_eq!(parse_name(&long[..255])?.len(), 255);
        assert_eq!(parse_name(&long), Err(ENAMETOOLONG));
        assert_eq!(parse_name(b"a\0b"), Err(EINVAL));
        Ok(())
    }

    #[test]
    fn verbosity_is_a_decimal_integer() -> Result {
        assert_eq!(parse_int(b"3\n")?, 3);
        assert_eq!(parse_int(b" -1 ")?, -1);
        assert_eq!(parse_int(b"x"), Err(EINVAL));
        assert_eq!(parse_int(b""), Err(EINVAL));
        assert_eq!(parse_int(b"99999999999"), Err(EINVAL));
        Ok(())
    }
}
