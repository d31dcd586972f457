//! `tap-ctl list`: the taps the kernel has, with what their tapdisks say about them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use blktap::ctl::binary::ListEntry;
use blktap::ctl::{find_tapdisks, tapdisk};
use blktap::{sysfs, Error};

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
pub fn merge(taps: &[(u32, Option<i32>)], tapdisks: &[(i32, Vec<ListEntry>)]) -> Vec<Row> {
    let mut served: BTreeMap<i64, (i32, &ListEntry)> = BTreeMap::new();
    let mut unattached = Vec::new();
    for (pid, entries) in tapdisks {
        for e in entries {
            if e.minor < 0 {
                unattached.push((*pid, e));
            } else {
                served.insert(i64::from(e.minor), (*pid, e));
            }
        }
    }
    let row = |pid: i32, e: &ListEntry| Row {
        pid: Some(pid),
        minor: u32::try_from(e.minor).ok(),
        state: Some(e.state as u32),
        image: (!e.path.is_empty()).then(|| split_image(&e.path)),
    };
    let mut rows = Vec::new();
    for &(minor, task) in taps {
        match served.remove(&i64::from(minor)) {
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
    rows.extend(unattached.iter().map(|&(pid, e)| row(pid, e)));
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

/// Asks every tapdisk with a socket in `ctl_dir` (or only `pid`) for its taps, in the binary
/// protocol either kind of tapdisk speaks; the ones that do not answer within the timeout
/// (dead, stale sockets, not a tapdisk) are left out.
pub fn query_tapdisks(ctl_dir: &Path, pid: Option<i32>) -> Vec<(i32, Vec<ListEntry>)> {
    let pids = match pid {
        Some(p) => vec![p],
        None => find_tapdisks(ctl_dir),
    };
    pids.into_iter()
        .filter_map(|pid| Some((pid, tapdisk::list(ctl_dir, pid).ok()?)))
        .collect()
}

/// `tap-ctl list`.
pub fn list(ctl_dir: &Path, filter: &Filter<'_>) -> Result<(), Error> {
    let mut taps = Vec::new();
    // The module was checked already: a missing class is no taps.
    let in_sysfs = match sysfs::list_taps() {
        Ok(t) => t,
        Err(Error::NotLoaded) => Vec::new(),
        Err(e) => return Err(e),
    };
    for tap in in_sysfs {
        taps.push((tap.minor, tap.task()?));
    }
    let tapdisks = query_tapdisks(ctl_dir, filter.pid);
    let tty = std::io::stdout().is_terminal();
    for row in merge(&taps, &tapdisks).iter().filter(|r| filter.keeps(r)) {
        println!("{}", if tty { row.table() } else { row.dict() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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

    fn entry(minor: i32, state: i32, params: Option<&str>) -> ListEntry {
        ListEntry {
            count: 1,
            minor,
            state,
            path: params.unwrap_or_default().into(),
        }
    }

    #[test]
    fn merges_sysfs_with_tapdisks() {
        let taps = [(0, Some(100)), (1, None), (2, Some(555))];
        let tapdisks = [
            (
                100,
                vec![
                    entry(0, 0, Some("aio:/img/a")),
                    entry(7, 0x2, None),
                    entry(-1, 0x2a, Some("aio:/img/b")),
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
                "pid=100 state=0x2a args=aio:/img/b",
                "pid=200",
            ]
        );
    }

    #[test]
    fn filters() {
        let rows = merge(
            &[(0, Some(100)), (1, None)],
            &[(100, vec![entry(0, 0, Some("ram:64M"))])],
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
