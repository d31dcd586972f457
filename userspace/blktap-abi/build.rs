//! Generates the ABI layouts from the project's C UAPI header, so C tools and the Rust userspace
//! share one definition of every struct and constant.

use std::env;
use std::path::PathBuf;

fn main() {
    // Read at run time, not compiled in: a target directory that moved with its checkout still
    // finds the header where the checkout now is.
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
    let header = PathBuf::from(manifest).join("../../include/uapi/blktap.h");
    println!("cargo:rerun-if-changed={}", header.display());

    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_type("blktap.*")
        .allowlist_var("BLKTAP.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .use_core()
        .generate()
        .expect("bindgen failed on include/uapi/blktap.h");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("uapi.rs"))
        .expect("cannot write the generated bindings");
}
