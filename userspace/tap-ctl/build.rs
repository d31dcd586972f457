//! Fixes where tap-ctl finds an installed tapdisk (the original's `TAPDISK_EXECDIR`): the
//! directory in `BLKTAP_LIBEXECDIR` when tap-ctl is built (the top-level Makefile passes its
//! `$(LIBEXECDIR)`, `$(PREFIX)/libexec`), else `/usr/local/libexec` (the Makefile's default).

use std::env;

const DEFAULT: &str = "/usr/local/libexec";

fn main() {
    println!("cargo:rerun-if-env-changed=BLKTAP_LIBEXECDIR");
    let dir = env::var("BLKTAP_LIBEXECDIR")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| DEFAULT.into());
    assert!(
        dir.starts_with('/') && !dir.chars().any(char::is_control),
        "BLKTAP_LIBEXECDIR must be an absolute path, not {dir:?}"
    );
    let dir = match dir.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    println!("cargo:rustc-env=TAPDISK_EXECDIR={dir}");
}
