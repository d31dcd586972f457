//! The control requests: what each one does to the daemon's taps.

use blktap::ctl::{CtlRequest, CtlResponse};
use blktap::{Error, Result};
use nix::errno::Errno;

use crate::daemon::Daemon;
use crate::log::log;
use crate::tap::Tap;

impl Daemon {
    /// Answers one request line.
    pub fn handle_line(&mut self, line: &str) -> CtlResponse {
        let result = CtlRequest::from_line(line).and_then(|req| self.handle(req));
        match result {
            Ok(response) => response,
            Err(e) => {
                log!("{e}");
                CtlResponse::failed(&e)
            }
        }
    }

    /// Carries out one request.
    pub fn handle(&mut self, req: CtlRequest) -> Result<CtlResponse> {
        match req {
            CtlRequest::Attach { minor } => self.attach(minor),
            CtlRequest::Detach { minor } => self.detach(minor),
            CtlRequest::Open {
                minor,
                params,
                readonly,
            } => self.open(minor, &params, readonly),
            CtlRequest::Close { minor } => self.close(minor),
            CtlRequest::Pause { minor } | CtlRequest::Unpause { minor } => {
                self.tap(minor)?;
                Err(Error::os(
                    "pause and unpause are not supported yet",
                    Errno::EOPNOTSUPP,
                ))
            }
            CtlRequest::Stats { minor } => Ok(CtlResponse {
                stats: Some(self.tap(minor)?.stats()),
                ..CtlResponse::ok()
            }),
            CtlRequest::List => Ok(CtlResponse {
                taps: Some(self.taps.values().map(Tap::entry).collect()),
                ..CtlResponse::ok()
            }),
        }
    }

    fn tap(&self, minor: u32) -> Result<&Tap> {
        self.taps.get(&minor).ok_or_else(|| not_attached(minor))
    }

    fn attach(&mut self, minor: u32) -> Result<CtlResponse> {
        if self.taps.contains_key(&minor) {
            return Err(Error::os(
                format!("tap {minor} is already attached to this tapdisk"),
                Errno::EEXIST,
            ));
        }
        let tap = Tap::attach(minor)?;
        self.taps.insert(minor, tap);
        if let Err(e) = self.watch_tap(minor) {
            self.taps.remove(&minor);
            return Err(Error::os(format!("poll the ring of tap {minor}"), e));
        }
        self.note_attached();
        log!("tap {minor}: attached");
        Ok(CtlResponse::ok())
    }

    fn detach(&mut self, minor: u32) -> Result<CtlResponse> {
        let tap = self.tap(minor)?;
        if tap.is_open() {
            return Err(Error::os(
                format!("tap {minor} still has an image open: close it first"),
                Errno::EBUSY,
            ));
        }
        self.remove_tap(minor);
        log!("tap {minor}: detached");
        Ok(CtlResponse::ok())
    }

    fn open(&mut self, minor: u32, params: &str, readonly: bool) -> Result<CtlResponse> {
        let tap = self
            .taps
            .get_mut(&minor)
            .ok_or_else(|| not_attached(minor))?;
        tap.open(params, readonly)?;
        if let Err(e) = self.watch_backend(minor) {
            // Without completions the disk cannot be served: undo.
            let close = self.taps.get_mut(&minor).map(Tap::close);
            log!("tap {minor}: cannot poll the image ({e}); closed again: {close:?}");
            return Err(Error::os(format!("poll the image of tap {minor}"), e));
        }
        let ro = if readonly { " read-only" } else { "" };
        log!("tap {minor}: opened {params}{ro}");
        Ok(CtlResponse::ok())
    }

    fn close(&mut self, minor: u32) -> Result<CtlResponse> {
        if !self.tap(minor)?.is_open() {
            return Err(Error::os(
                format!("tap {minor} has no image open"),
                Errno::EINVAL,
            ));
        }
        self.unwatch_backend(minor);
        let tap = self.taps.get_mut(&minor).expect("checked above");
        if let Err(e) = tap.close() {
            // Still open and served.
            if let Err(w) = self.watch_backend(minor) {
                log!("tap {minor}: cannot poll the image again: {w}");
            }
            return Err(e);
        }
        log!("tap {minor}: closed");
        Ok(CtlResponse::ok())
    }
}

fn not_attached(minor: u32) -> Error {
    Error::os(
        format!(
            "tap {minor} is not attached to tapdisk {}",
            std::process::id()
        ),
        Errno::ENODEV,
    )
}
