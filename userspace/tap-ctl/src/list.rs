//! `tap-ctl list`: the taps the kernel has, with what their tapdisks say about them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use blktap::ctl::{find_tapdisks, Client, CtlRequest, TapEntry};
use blktap::sysfs;
use blktap::Error;

/// How long `list` waits for each tapdisk.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One row of `tap-ctl list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub pid: Option<i32>,
    pub minor: Option<u32>,
    pub state: Option<u32>,
    pub image: Option<(String, String)>,
}

impl Row {
    /// The format the original printed to a terminal.
    pub fn table(&self) -> String {
        let dash = || "-".to_string();
        format!(
            "{:>8} {:>4} {:>4} {:>10} {}",
            self.pid.map_or_else(dash, |p| p.to_string()),
            self.minor.map_or_else(dash, |m| m.to_string()),
            self.state.map_or_else(dash, |s| format!("{s:#x}")),
            self.image.as_ref().map_or("-", |i| i.0.as_str()),
            self.image.as_ref().map_or("-", |i| i.1.as_str()),
        )
    }

    /// The `key=value` format the original printed to a pipe, for scripts.
    pub fn dict(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.pid {
            parts.push(format!("pid={p}"));
        }
        if let Some(m) = self.minor {
            parts.push(format!("minor={m}"));
        }
        if let Some(s) = self.state {
            parts.push(format!("state={s:#x}"));
        }
        if let Some((t, f)) = &self.image {
            parts.push(format!("args={t}:{f}"));
        }
        parts.join(" ")
    }
}

/// Which rows to show.
#[derive(Debug, Default, Clone)]
pub struct Filter<'a> {
    pub minor: Option<u32>,
    pub pid: Option<i32>,
    pub image_type: Option<&'a str>,
    pub file: Option<&'a str>,
}

impl Filter<'_> {
    fn keeps(&self, row: &Row) -> bool {
        let image = row.image.as_ref();
        !(self.minor.is_some_and(|m| Some(m) != row.minor)
            || self.pid.is_some_and(|p| Some(p) != row.pid)
            || self
                .image_type
                .is_some_and(|t| image.is_none_or(|i| i.0 != t))
            || self.file.is_some_and(|f| image.is_none_or(|i| i.1 != f)))
    }
}

/// `type:path` split for the table; a bare string is all path.
fn split_image(params: &str) -> (String, String) {
    match params.split_once(':') {
        Some((t, p)) => (t.into(), p.into()),
        None => ("-".into(), params.into()),
    }
}

/// Merges the kernel's taps (minor, pid of the ring's holder) with what each tapdisk reports:
/// one row per tap by minor, then the taps only tapdisks know, then idle tapdisks.
pub fn merge(taps: &[(u32, Option<i32>)], tapdisks: &[(i32, Vec<TapEntry>)]) -> Vec<Row> {
    let mut served: BTreeMap<u32, (i32, &TapEntry)> = BTreeMap::new();
    for (pid, entries) in tapdisks {
        for e in entries {
            served.insert(e.minor, (*pid, e));
        }
    }
    let row = |pid: i32, e: &TapEntry| Row {
        pid: Some(pid),
        minor: Some(e.minor),
        state: Some(e.state.code()),
        image: e.params.as_deref().map(split_image),
    };
    let mut rows = Vec::new();
    for &(minor, task) in taps {
        match served.remove(&minor) {
            Some((pid, e)) => rows.push(row(pid, e)),
            None => rows.push(Row {
                pid: task,
                minor: Some(minor),
                state: None,
                image: None,
            }),
        }
    }
    rows.extend(served.values().map(|&(pid, e)| row(pid, e)));
    for (pid, entries) in tapdisks {
        if entries.is_empty() {
            rows.push(Row {
                pid: Some(*pid),
                minor: None,
                state: None,
                image: None,
            });
        }
    }
    rows
}

/// Asks every tapdisk with a socket in `ctl_dir` for its taps; the ones that do not answer
/// (dead, stale sockets) are left out.
pub fn query_tapdisks(ctl_dir: &Path) -> Vec<(i32, Vec<TapEntry>)> {
    find_tapdisks(ctl_dir)
        .into_iter()
        .filter_map(|pid| {
            let mut client = Client::connect_with_timeout(ctl_dir, pid, QUERY_TIMEOUT).ok()?;
            let taps = client.call(&CtlRequest::List).ok()?.taps?;
            Some((pid, taps))
        })
        .collect()
}

/// `tap-ctl list`.
pub fn list(ctl_dir: &Path, filter: &Filter<'_>) -> Result<(), Error> {
    let mut taps = Vec::new();
    for tap in sysfs::list_taps()? {
        taps.push((tap.minor, tap.task()?));
    }
    let tapdisks = query_tapdisks(ctl_dir);
    let tty = std::io::stdout().is_terminal();
    for row in merge(&taps, &tapdisks).iter().filter(|r| filter.keeps(r)) {
        println!("{}", if tty { row.table() } else { row.dict() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use blktap::ctl::TapState;

    use super::*;

    #[test]
    fn rows_print_like_the_original() {
        let row = Row {
            pid: None,
            minor: Some(3),
            state: None,
            image: None,
        };
        assert_eq!(row.table(), "       -    3    -          - -");
        assert_eq!(row.dict(), "minor=3");
        let row = Row {
            pid: Some(1234),
            minor: Some(0),
            state: Some(0),
            image: Some(("aio".into(), "/var/tmp/disk.raw".into())),
        };
        assert_eq!(
            row.table(),
            "    1234    0  0x0        aio /var/tmp/disk.raw"
        );
        assert_eq!(
            row.dict(),
            "pid=1234 minor=0 state=0x0 args=aio:/var/tmp/disk.raw"
        );
    }

    fn entry(minor: u32, state: TapState, params: Option<&str>) -> TapEntry {
        TapEntry {
            minor,
            state,
            params: params.map(Into::into),
            readonly: false,
        }
    }

    #[test]
    fn merges_sysfs_with_tapdisks() {
        let taps = [(0, Some(100)), (1, None), (2, Some(555))];
        let tapdisks = [
            (
                100,
                vec![
                    entry(0, TapState::Open, Some("aio:/img/a")),
                    entry(7, TapState::Attached, None),
                ],
            ),
            (200, vec![]),
        ];
        let rows = merge(&taps, &tapdisks);
        let dicts: Vec<String> = rows.iter().map(Row::dict).collect();
        assert_eq!(
            dicts,
            [
                "pid=100 minor=0 state=0x0 args=aio:/img/a",
                "minor=1",
                "pid=555 minor=2",
                "pid=100 minor=7 state=0x2",
                "pid=200",
            ]
        );
    }

    #[test]
    fn filters() {
        let rows = merge(
            &[(0, Some(100)), (1, None)],
            &[(100, vec![entry(0, TapState::Open, Some("ram:64M"))])],
        );
        let shown = |f: Filter<'_>| rows.iter().filter(|r| f.keeps(r)).count();
        assert_eq!(shown(Filter::default()), 2);
        assert_eq!(
            shown(Filter {
                minor: Some(1),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            shown(Filter {
                pid: Some(100),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            shown(Filter {
                image_type: Some("ram"),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            shown(Filter {
                file: Some("64M"),
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            shown(Filter {
                image_type: Some("aio"),
                ..Default::default()
            }),
            0
        );
        assert_eq!(split_image("bare"), ("-".into(), "bare".into()));
    }
}
