// SPDX-License-Identifier: GPL-2.0

//! blktap: the Xen blktap2 userspace block-device driver (XenServer ABI), in Rust.
//!
//! A tapdisk process serves a block device from user space: `tap-ctl` allocates a tap on the
//! control device, tapdisk opens and maps the tap's ring, and the tap's disk is served through it.
//! See `Documentation/blktap2.rst`.
//!
//! # Layout
//!
//! Each file has one job, and the data path reads one way, down; the adapters never import each
//! other:
//!
//! - `main.rs`: the module; `driver.rs`: the driver's shared state ([`Blktap`]: class, majors,
//!   the table of taps);
//! - adapters: `control.rs` (the control misc device), `ring_file.rs` (the ring char devices),
//!   `disk.rs` (the tapdev disks on blk-mq, and their queue limits), `sysfs.rs` (attributes);
//! - `tap/`: the hub: a tap's life as named transitions (`mod.rs`, where the lock order and the
//!   teardown rule are written), its I/O path (`io.rs`), the minor table (`table.rs`);
//! - `ring/`: the shared pages (`pages.rs`), the life of a slot (`slot.rs`), the ring's I/O state
//!   under its spinlock (`state.rs`);
//! - `protocol.rs`: ring entries, response checks, device-info validation (pure functions);
//! - `uapi.rs`: the ABI.
//!
//! The abstractions the kernel lacks are in `rust/`, each usable on its own; no file of `src/`
//! uses `kernel::bindings` or declares a C function.
//!
//! # Teardown
//!
//! The module cannot be unloaded while a tap exists: each tap holds a module reference. At unload,
//! [`BlktapModule`]'s fields are dropped in declaration order: the control device first (no new
//! taps), then the ring cdev (no new opens), then the shared [`Blktap`] state: its class, block
//! major and char region. A tap's own teardown is in `tap/mod.rs`.

mod control;
mod disk;
mod driver;
mod protocol;
mod ring;
mod ring_file;
mod sysfs;
mod tap;
mod uapi;

// The project's own abstractions over `kernel::bindings` (see `rust/`), public so that each is
// usable on its own.
#[path = "../rust/blk_mq.rs"]
pub mod blk_mq;
#[path = "../rust/blkdev.rs"]
pub mod blkdev;
#[path = "../rust/chrdev.rs"]
pub mod chrdev;
#[path = "../rust/class.rs"]
pub mod class;
#[path = "../rust/misc.rs"]
pub mod misc;
#[path = "../rust/module_ref.rs"]
pub mod module_ref;
#[path = "../rust/page.rs"]
pub mod page;
#[path = "../rust/task.rs"]
pub mod task;
#[path = "../rust/vma.rs"]
pub mod vma;

use kernel::{
    prelude::*,
    sync::Arc, //
};

use chrdev::Cdev;
use driver::Blktap;
use misc::MiscNodeRegistration;

module! {
    type: BlktapModule,
    name: "blktap",
    authors: ["blktap2-rs developers"],
    description: "Xen blktap2 userspace block-device driver",
    license: "GPL",
    // The name of the driver's char region and sysfs class, as tools of the blktap2 era ask.
    alias: ["blktap2"],
    params: {
        request_timeout: u32 {
            default: 120,
            description: "Seconds a request may wait for tapdisk's answer before it fails (1..86400; per tap in sysfs: deadline)",
        },
    },
}

/// The module: its devices, in teardown order.
#[pin_data]
struct BlktapModule {
    #[pin]
    control: MiscNodeRegistration<control::Control>,
    #[pin]
    ring: Cdev<ring_file::Ring>,
    blktap: Arc<Blktap>,
}

impl kernel::InPlaceModule for BlktapModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            blktap: Blktap::new(module, module_parameters::request_timeout.value())?,
            ring <- Cdev::register(blktap.ring_region(), blktap.clone()),
            control <- MiscNodeRegistration::register(
                uapi::MISC_NAME,
                uapi::CONTROL_NODE,
                uapi::NODE_MODE,
                blktap.clone(),
            ),
        })
    }
}
