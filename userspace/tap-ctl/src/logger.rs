//! tap-ctl's diagnostics: the library's `log` records on stderr as `tap-ctl: message`, as the
//! original printed them. Warnings always; with `--debug`, the debug lines too (the messages
//! exchanged with tapdisks).

struct Stderr;

static LOGGER: Stderr = Stderr;

impl log::Log for Stderr {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("tap-ctl: {}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Routes the `log` facade to stderr: warnings and errors, and debug lines with `debug`.
pub fn init(debug: bool) {
    // Only fails if a logger is already set, which this binary does once.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
}
