// SPDX-License-Identifier: GPL-2.0

//! A counted reference to a module, which keeps it from being unloaded.
//!
//! A driver that hands out objects living longer than any open file (such as a tap that stays
//! allocated after its creator exits) takes a [`ModuleRef`] for each, so that `rmmod` answers
//! `EBUSY` until they are gone.
//!
//! C header: [`include/linux/module.h`](srctree/include/linux/module.h)

use kernel::{
    bindings,
    prelude::*,
    ThisModule, //
};

/// One reference on a module.
///
/// # Invariants
///
/// `module` is a module on which this object holds one reference, taken with `try_module_get()`
/// and released exactly once, in [`Drop`].
pub struct ModuleRef {
    module: *mut bindings::module,
}

// SAFETY: Module references may be released from any thread.
unsafe impl Send for ModuleRef {}
// SAFETY: There are no `&self` methods.
unsafe impl Sync for ModuleRef {}

impl ModuleRef {
    /// Takes a reference on `module`.
    ///
    /// # Errors
    ///
    /// `ENODEV` if the module is being unloaded.
    pub fn get(module: &'static ThisModule) -> Result<Self> {
        let ptr = module.as_ptr();
        // SAFETY: `ptr` is the `THIS_MODULE` of a module whose code is running, so it is valid
        // (or null for built-in code, which `try_module_get()` accepts).
        if unsafe { bindings::try_module_get(ptr) } {
            // INVARIANT: The reference was just taken.
            Ok(Self { module: ptr })
        } else {
            Err(ENODEV)
        }
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        // SAFETY: By the type invariants, we hold one reference on `module`.
        unsafe { bindings::module_put(self.module) };
    }
}
