//! A tap's counters in the original tapdisk's `stats` schema, which the storage manager parses:
//!
//! ```text
//! {"name": "aio:/sr/disk.img", "secs": [RD, WR],
//!  "images": [{"name": "/sr/disk.img", "hits": [RD, WR], "fail": [RD, WR],
//!              "driver": {"type": 0, "name": "aio", "status": null}}],
//!  "tap": {"minor": 0, "reqs": [IN, OUT], "kicks": [IN, OUT]},
//!  "FIXME_enospc_redirect_count": 0, "nbd_mirror_failed": 0, "reqs_outstanding": 0,
//!  "read_caching": "false", ...}
//! ```
//!
//! `secs` and `hits` count sectors transferred, `fail` failed requests; `images` lists the leaf
//! first (a raw image is its own whole chain): for a stack (`trace:`, `cow:`), every layer, top
//! first, each with what was read from it and written to it (an overlay's entry is its memory or
//! file, then the image below it). This tapdisk's own counters ([`TapStats`]:
//! `reads`, `flushes`, `allocated_bytes`, ...) follow as added keys, so a reader of either schema
//! finds what it knows.

use serde_json::{json, Map, Value};

use super::TapStats;
use crate::ring::SECTOR_SIZE;

/// The original's driver type number for image type `name` (`DISK_TYPE_*`; -1 for the types it
/// does not have, as its "null disk").
pub fn driver_type(name: &str) -> i32 {
    match name {
        "aio" => 0,
        "vhd" => 4,
        "ram" => 5,
        _ => -1,
    }
}

/// `stats` of one tap, in the original schema plus this tapdisk's counters.
pub fn tap_stats(stats: &TapStats) -> Value {
    let io = &stats.io;
    let mut v = Map::new();
    v.insert(
        "name".into(),
        stats.image.as_deref().map_or(Value::Null, |i| i.into()),
    );
    let secs_rd = io.bytes_read / SECTOR_SIZE;
    let secs_wr = io.bytes_written / SECTOR_SIZE;
    v.insert("secs".into(), json!([secs_rd, secs_wr]));
    let mut images: Vec<Value> = stats
        .image
        .as_deref()
        .map(|image| {
            let (kind, path) = match image.parse::<crate::backend::ImageSpec>() {
                Ok(spec) => spec.layer_name(),
                Err(_) => {
                    let (k, p) = image.split_once(':').unwrap_or(("", image));
                    (k.to_string(), p.to_string())
                }
            };
            json!({
                "name": path,
                "hits": [secs_rd, secs_wr],
                "fail": [io.read_errors, io.write_errors],
                "driver": {"type": driver_type(&kind), "name": kind, "status": null},
            })
        })
        .into_iter()
        .collect();
    for l in &stats.layers {
        images.push(json!({
            "name": l.name,
            "hits": l.hits,
            "fail": l.fail,
            "driver": {"type": driver_type(&l.driver), "name": l.driver, "status": null},
        }));
    }
    v.insert("images".into(), Value::Array(images));
    v.insert(
        "tap".into(),
        json!({
            "minor": stats.minor,
            "reqs": [io.requests, io.responses],
            "kicks": [io.kicks_in, io.kicks_out],
        }),
    );
    v.insert("FIXME_enospc_redirect_count".into(), 0.into());
    v.insert("nbd_mirror_failed".into(), 0.into());
    v.insert("reqs_outstanding".into(), stats.in_flight.into());
    v.insert("read_caching".into(), "false".into());
    // This tapdisk's own counters, as added keys.
    if let Value::Object(own) = serde_json::to_value(stats).expect("stats always serialize") {
        for (k, val) in own {
            v.entry(k).or_insert(val);
        }
    }
    Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::TapState;
    use crate::server::IoStats;

    #[test]
    fn the_original_schema_with_the_own_counters_added() {
        let stats = TapStats {
            minor: 3,
            state: Some(TapState::Open),
            image: Some("aio:/sr/leaf.img".into()),
            size: 1 << 20,
            sectors: 2048,
            io: IoStats {
                reads: 2,
                bytes_read: 4096,
                bytes_written: 1024,
                read_errors: 1,
                requests: 5,
                responses: 4,
                kicks_in: 3,
                kicks_out: 2,
                flushes: 7,
                ..Default::default()
            },
            in_flight: 1,
            allocated_bytes: Some(8192),
            ..Default::default()
        };
        let v = tap_stats(&stats);
        assert_eq!(v["name"], "aio:/sr/leaf.img");
        assert_eq!(v["secs"], json!([8, 2]));
        assert_eq!(
            v["images"],
            json!([{"name": "/sr/leaf.img", "hits": [8, 2], "fail": [1, 0],
                    "driver": {"type": 0, "name": "aio", "status": null}}])
        );
        assert_eq!(
            v["tap"],
            json!({"minor": 3, "reqs": [5, 4], "kicks": [3, 2]})
        );
        assert_eq!(v["reqs_outstanding"], 1);
        assert_eq!(v["read_caching"], "false");
        assert_eq!(v["FIXME_enospc_redirect_count"], 0);
        assert_eq!(v["nbd_mirror_failed"], 0);
        // Added keys.
        assert_eq!(v["flushes"], 7);
        assert_eq!(v["allocated_bytes"], 8192);
        assert_eq!(v["state"], "open");

        // A tap without an image.
        let v = tap_stats(&TapStats::default());
        assert_eq!(v["name"], Value::Null);
        assert_eq!(v["images"], json!([]));
        assert_eq!(driver_type("ram"), 5);
        assert_eq!(driver_type("vhd"), 4);
        assert_eq!(driver_type("null"), -1);
    }
}
