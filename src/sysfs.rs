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
    driver::Taps,
    tap::{
        Tap,
        DEADLINE_MAX, //
    },
    uapi, //
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
            b"devices" => self.show_devices(out)?,
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
        match name.to_bytes() {
            b"name" => self.show_name(out)?,
            b"task" => {
                if let Some(pid) = self.task() {
                    writeln!(out, "{pid}")?;
                }
            }
            b"debug" => self.show_debug(out)?,
            b"pause" => writeln!(out, "{}", u8::from(self.is_paused()))?,
            b"deadline" => writeln!(out, "{}", self.deadline())?,
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
                if !(1..=DEADLINE_MAX).contains(&secs) {
                    return Err(EINVAL);
                }
                self.set_deadline(secs);
                Ok(())
            }
            b"name" => self.set_name(parse_name(input)?),
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
