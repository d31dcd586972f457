//! The control requests: what each one does to the daemon's taps.

use blktap::ctl::{CtlRequest, CtlResponse};
use blktap::tap::OpenArgs;
use blktap::{Error, Result};
use nix::errno::Errno;

use crate::daemon::Daemon;
use crate::logging::log;
use crate::tap::{self, Tap};

/// The outcome of a request.
#[derive(Debug)]
pub enum Handled {
    /// The answer.
    Now(Box<CtlResponse>),
    /// A pause of this tap is draining: the answer comes once it is paused (or failed).
    Later(u32),
}

impl Daemon {
    /// Answers one request line (or defers the answer).
    pub fn handle_line(&mut self, line: &str) -> Handled {
        let result = CtlRequest::from_line(line).and_then(|req| self.handle(req));
        match result {
            Ok(handled) => handled,
            Err(e) => {
                log!("{e}");
                Handled::Now(Box::new(CtlResponse::failed(&e)))
            }
        }
    }

    /// Carries out one request.
    pub fn handle(&mut self, req: CtlRequest) -> Result<Handled> {
        let now = |r: Result<CtlResponse>| r.map(|r| Handled::Now(Box::new(r)));
        match req {
            CtlRequest::Attach { minor } => now(self.attach_tap(minor)),
            CtlRequest::Detach { minor } => now(self.detach_tap(minor)),
            CtlRequest::Open {
                minor,
                params,
                readonly,
                recovery,
                recover,
                no_direct,
                timeout,
            } => {
                let args = OpenArgs {
                    params: &params,
                    readonly,
                    recovery,
                    recover,
                    no_direct,
                    deadline: timeout
                        .filter(|&t| t > 0)
                        .map(std::time::Duration::from_secs),
                };
                now(self.open_tap(minor, &args))
            }
            CtlRequest::Close { minor } => now(self.close_tap(minor, false)),
            CtlRequest::Pause { minor } => self.pause_tap(minor),
            CtlRequest::Unpause { minor, params } => {
                now(self.unpause_tap(minor, params.as_deref()))
            }
            CtlRequest::Stats { minor } => now(Ok(CtlResponse {
                stats: Some(self.tap(minor)?.stats()),
                ..CtlResponse::ok()
            })),
            CtlRequest::List => now(Ok(CtlResponse {
                taps: Some(self.taps.values().map(Tap::entry).collect()),
                ..CtlResponse::ok()
            })),
        }
    }

    fn tap(&self, minor: u32) -> Result<&Tap> {
        self.taps.get(&minor).ok_or_else(|| not_attached(minor))
    }

    fn tap_mut(&mut self, minor: u32) -> Result<&mut Tap> {
        self.taps.get_mut(&minor).ok_or_else(|| not_attached(minor))
    }

    pub(crate) fn attach_tap(&mut self, minor: u32) -> Result<CtlResponse> {
        if self.taps.contains_key(&minor) {
            return Err(Error::os(
                format!("tap {minor} is already attached to this tapdisk"),
                Errno::EEXIST,
            ));
        }
        let tap = tap::attach(minor, self.tap_options())?;
        self.taps.insert(minor, tap);
        if let Err(e) = self.watch_tap(minor) {
            self.taps.remove(&minor);
            return Err(Error::os(format!("poll the ring of tap {minor}"), e));
        }
        self.note_attached();
        log!("tap {minor}: attached");
        Ok(CtlResponse::ok())
    }

    pub(crate) fn detach_tap(&mut self, minor: u32) -> Result<CtlResponse> {
        let tap = self.tap(minor)?;
        if tap.has_disk() {
            return Err(Error::os(
                format!("tap {minor} still has an image open: close it first"),
                Errno::EBUSY,
            ));
        }
        self.remove_tap(minor);
        log!("tap {minor}: detached");
        Ok(CtlResponse::ok())
    }

    pub(crate) fn open_tap(&mut self, minor: u32, args: &OpenArgs<'_>) -> Result<CtlResponse> {
        self.tap_mut(minor)?.open(args)?;
        if let Err(e) = self.sync_backend_watch(minor) {
            // Without completions the disk cannot be served: undo.
            let close = self.taps.get_mut(&minor).map(Tap::close);
            log!("tap {minor}: cannot poll the image ({e}); closed again: {close:?}");
            return Err(Error::os(format!("poll the image of tap {minor}"), e));
        }
        let ro = if args.readonly { " read-only" } else { "" };
        let ro = match (ro, args.no_direct, args.deadline) {
            (ro, false, None) => ro.to_string(),
            (ro, nd, d) => format!(
                "{ro}{}{}",
                if nd { " without O_DIRECT" } else { "" },
                d.map_or(String::new(), |d| format!(
                    ", request timeout {} s",
                    d.as_secs()
                ))
            ),
        };
        let how = if args.recover {
            " (recovered: serving the existing disk)"
        } else if args.recovery {
            " (with recovery)"
        } else {
            ""
        };
        log!("tap {minor}: opened {}{ro}{how}", args.params);
        self.start_export(minor);
        Ok(CtlResponse::ok())
    }

    /// Closes the tap's image; `force` fails the requests waiting to be tried again first.
    pub(crate) fn close_tap(&mut self, minor: u32, force: bool) -> Result<CtlResponse> {
        if !self.tap(minor)?.has_disk() {
            return Err(Error::os(
                format!("tap {minor} has no image open"),
                Errno::EINVAL,
            ));
        }
        let tap = self.tap_mut(minor)?;
        let result = if force {
            tap.force_close()
        } else {
            tap.close()
        };
        self.after_tap_event(minor);
        result?;
        log!(
            "tap {minor}: closed{}",
            if force { " (forced)" } else { "" }
        );
        Ok(CtlResponse::ok())
    }

    pub(crate) fn pause_tap(&mut self, minor: u32) -> Result<Handled> {
        let paused = self.tap_mut(minor)?.pause()?;
        if paused {
            self.after_tap_event(minor);
            log!("tap {minor}: paused");
            return Ok(Handled::Now(Box::new(CtlResponse::ok())));
        }
        log!("tap {minor}: pausing: waiting for the requests handed out");
        Ok(Handled::Later(minor))
    }

    pub(crate) fn unpause_tap(&mut self, minor: u32, params: Option<&str>) -> Result<CtlResponse> {
        let result = self.tap_mut(minor)?.unpause(params);
        self.after_tap_event(minor);
        result?;
        log!("tap {minor}: resumed");
        Ok(CtlResponse::ok())
    }
}

pub fn not_attached(minor: u32) -> Error {
    Error::os(
        format!(
            "tap {minor} is not attached to tapdisk {}",
            std::process::id()
        ),
        Errno::ENODEV,
    )
}
