//! The control requests: what each one does to the daemon's taps.
//!
//! The requests sit below the event loop: they reach the taps, and the polling of them, through
//! [`TapHost`], which the daemon implements; `daemon` uses this module, never the other way
//! round.

use std::collections::BTreeMap;

use blktap::ctl::{CtlRequest, CtlResponse};
use blktap::tap::{OpenArgs, TapOptions};
use blktap::{Error, Result};
use nix::errno::Errno;

use crate::logging::log;
use crate::tap::{self, Tap};

/// What the requests need from the owner of the taps (the daemon's event loop): the taps, how
/// new ones are served, and keeping their fds polled as they change.
pub trait TapHost {
    /// The taps, by minor.
    fn taps(&self) -> &BTreeMap<u32, Tap>;

    /// The taps, by minor, to add or remove one.
    fn taps_mut(&mut self) -> &mut BTreeMap<u32, Tap>;

    /// How taps are served.
    fn tap_options(&self) -> TapOptions;

    /// Polls the tap's ring fd, and its backend's fd if it has one.
    fn watch_tap(&mut self, minor: u32) -> nix::Result<()>;

    /// Polls the backend's fd of the tap's current image, if it has one and it is new.
    fn sync_backend_watch(&mut self, minor: u32) -> nix::Result<()>;

    /// After anything happened to a tap: polls its new backend, moves a pause on, and answers
    /// the connections waiting for that pause.
    fn after_tap_event(&mut self, minor: u32);

    /// Serves the newly opened tap over NBD (`nbd<pid>.<minor>`); it goes with the tap's disk.
    fn start_export(&mut self, minor: u32);

    /// Records that a tap was attached (for exiting once idle).
    fn note_attached(&mut self);

    /// Forgets tap `minor` after shutting it down.
    fn remove_tap(&mut self, minor: u32);
}

/// The outcome of a request.
#[derive(Debug)]
pub enum Handled {
    /// The answer.
    Now(Box<CtlResponse>),
    /// A pause of this tap is draining: the answer comes once it is paused (or failed).
    Later(u32),
}

/// The JSON requests, carried out on any [`TapHost`].
pub trait Requests: TapHost {
    /// Answers one request line (or defers the answer).
    fn handle_line(&mut self, line: &str) -> Handled {
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
    fn handle(&mut self, req: CtlRequest) -> Result<Handled> {
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
                taps: Some(self.taps().values().map(Tap::entry).collect()),
                ..CtlResponse::ok()
            })),
        }
    }

    fn tap(&self, minor: u32) -> Result<&Tap> {
        self.taps().get(&minor).ok_or_else(|| not_attached(minor))
    }

    fn tap_mut(&mut self, minor: u32) -> Result<&mut Tap> {
        self.taps_mut()
            .get_mut(&minor)
            .ok_or_else(|| not_attached(minor))
    }

    fn attach_tap(&mut self, minor: u32) -> Result<CtlResponse> {
        if self.taps().contains_key(&minor) {
            return Err(Error::os(
                format!("tap {minor} is already attached to this tapdisk"),
                Errno::EEXIST,
            ));
        }
        let tap = tap::attach(minor, self.tap_options())?;
        self.taps_mut().insert(minor, tap);
        if let Err(e) = self.watch_tap(minor) {
            self.taps_mut().remove(&minor);
            return Err(Error::os(format!("poll the ring of tap {minor}"), e));
        }
        self.note_attached();
        log!("tap {minor}: attached");
        Ok(CtlResponse::ok())
    }

    fn detach_tap(&mut self, minor: u32) -> Result<CtlResponse> {
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

    fn open_tap(&mut self, minor: u32, args: &OpenArgs<'_>) -> Result<CtlResponse> {
        self.tap_mut(minor)?.open(args)?;
        if let Err(e) = self.sync_backend_watch(minor) {
            // Without completions the disk cannot be served: undo.
            let close = self.taps_mut().get_mut(&minor).map(Tap::close);
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
    fn close_tap(&mut self, minor: u32, force: bool) -> Result<CtlResponse> {
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

    fn pause_tap(&mut self, minor: u32) -> Result<Handled> {
        let paused = self.tap_mut(minor)?.pause()?;
        if paused {
            self.after_tap_event(minor);
            log!("tap {minor}: paused");
            return Ok(Handled::Now(Box::new(CtlResponse::ok())));
        }
        log!("tap {minor}: pausing: waiting for the requests handed out");
        Ok(Handled::Later(minor))
    }

    fn unpause_tap(&mut self, minor: u32, params: Option<&str>) -> Result<CtlResponse> {
        let result = self.tap_mut(minor)?.unpause(params);
        self.after_tap_event(minor);
        result?;
        log!("tap {minor}: resumed");
        Ok(CtlResponse::ok())
    }
}

impl<H: TapHost + ?Sized> Requests for H {}

/// `ENODEV`: tap `minor` is not attached to this tapdisk.
pub fn not_attached(minor: u32) -> Error {
    Error::os(
        format!(
            "tap {minor} is not attached to tapdisk {}",
            std::process::id()
        ),
        Errno::ENODEV,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host without an event loop: the requests need nothing more to be tried.
    #[derive(Default)]
    struct NoLoop {
        taps: BTreeMap<u32, Tap>,
        events: Vec<u32>,
    }

    impl TapHost for NoLoop {
        fn taps(&self) -> &BTreeMap<u32, Tap> {
            &self.taps
        }
        fn taps_mut(&mut self) -> &mut BTreeMap<u32, Tap> {
            &mut self.taps
        }
        fn tap_options(&self) -> TapOptions {
            TapOptions::default()
        }
        fn watch_tap(&mut self, _: u32) -> nix::Result<()> {
            Ok(())
        }
        fn sync_backend_watch(&mut self, _: u32) -> nix::Result<()> {
            Ok(())
        }
        fn after_tap_event(&mut self, minor: u32) {
            self.events.push(minor);
        }
        fn start_export(&mut self, _: u32) {}
        fn note_attached(&mut self) {}
        fn remove_tap(&mut self, minor: u32) {
            self.taps.remove(&minor);
        }
    }

    fn answer(host: &mut NoLoop, req: CtlRequest) -> CtlResponse {
        match host.handle_line(&req.to_line()) {
            Handled::Now(r) => *r,
            Handled::Later(m) => panic!("{req:?} deferred for tap {m}"),
        }
    }

    #[test]
    fn requests_for_taps_not_attached_are_enodev() {
        let mut host = NoLoop::default();
        for req in [
            CtlRequest::Detach { minor: 3 },
            CtlRequest::Close { minor: 3 },
            CtlRequest::Pause { minor: 3 },
            CtlRequest::Unpause {
                minor: 3,
                params: None,
            },
            CtlRequest::Stats { minor: 3 },
        ] {
            let r = answer(&mut host, req.clone());
            assert_eq!((r.ok, r.errno), (false, Some(libc::ENODEV)), "{req:?}");
        }
        let list = answer(&mut host, CtlRequest::List);
        assert!(list.ok);
        assert_eq!(list.taps.map(|t| t.len()), Some(0));
        assert!(host.events.is_empty(), "nothing happened to any tap");
        let bad = host.handle_line("{\"op\":");
        assert!(matches!(bad, Handled::Now(r) if r.errno == Some(libc::EINVAL)));
    }
}
