"""The benchmark's report step (scripts/bench): statistics, pairs, the contention gauge and the
targets' verdicts, against edge values (zeros, NaN, missing runs, one pair, all equal) and
synthetic data. No VM: the records are made up here as the guest (tests/vm/bench.py) prints
them. A report that divides by zero, or writes NaN into results.json, fails here.
"""

import importlib.machinery
import itertools
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import unittest
import unittest.mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    """scripts/bench as a module (the file has no .py suffix), leaving no __pycache__ behind."""
    sys.dont_write_bytecode = True
    loader = importlib.machinery.SourceFileLoader("bench_report", str(REPO / "scripts/bench"))
    spec = importlib.util.spec_from_loader("bench_report", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


B = load_bench()
GUEST = B.guest
JOBS = ["randread-4k-qd1", "randread-4k-qd32", "seqread-1m-qd8"]


def run_rec(dev, job, rnd, iops=1000.0, lat=100.0, p99=200.0, gauge=None, **extra):
    r = {"kind": "run", "device": dev, "job": job, "run": rnd, "round": rnd, "iops": iops,
         "bw_kib": iops * 4, "ios": int(iops * 5) if B.finite(iops) else 0, "lat_mean_us": lat,
         "lat_p99_us": p99, "usr_cpu": 1.0, "sys_cpu": 2.0, "ctx": 10,
         "gauge": gauge or {"before_ms": [50.0, 50.0], "after_ms": [50.0, 50.0], "steal_ticks": 0,
                            "ticks": 1000}}
    r.update(extra)
    return r


def records(values, jobs=JOBS, rounds=8, extra=()):
    """A boot's records: values(dev, job, rnd) -> dict of run fields (or None: no run), for the
    devices in the guest's ABBA order, with start records before each run."""
    devs = ["null_blk", "ublk-null", "tapdev-null"]
    recs = [{"kind": "meta", "kernel": "7.3.4", "nproc": 2, "mem_kib": 2 << 20, "fio": "fio-3.33",
             "jobs": jobs, "runs": rounds, "rounds": rounds, "order": "abba", "devices": devs,
             "runtime": 5, "ramp": 1, "span": "256M", "smoke": False,
             "job_specs": {j: GUEST.JOBS[j] for j in jobs}, "pinning": {"fio": 0, "servers": 1},
             "gauge": {"loops": 1000, "clocksource": "hpet"}}]
    recs += [{"kind": "device", "device": d, "path": f"/dev/{d}"} for d in devs]
    for rnd, job, dev in GUEST.plan(devs, jobs, rounds):
        fields = values(dev, job, rnd)
        if fields is None:
            continue
        recs.append({"kind": "start", "device": dev, "job": job, "round": rnd})
        recs.append(run_rec(dev, job, rnd, **fields))
    recs += list(extra)
    recs.append({"kind": "done", "failed": 0})
    return recs


def report(recs, host=None):
    """aggregate() as the real step uses it (strict JSON round trip), with the Markdown."""
    out = B.clean(B.aggregate(recs, {"accel": "tcg", "seconds": 1.0, "clocksource": "hpet"}, 0, host))
    out = json.loads(json.dumps(out, allow_nan=False))
    return out, B.markdown(out)


def status(out, prefix):
    return [t["status"] for t in out["targets"] if t["target"].startswith(prefix)]


class Statistics(unittest.TestCase):
    def test_ratio_edge_values(self):
        self.assertEqual(B.ratio(3, 2), 1.5)
        for a, b in [(1, 0), (0, 0), (1, 0.0), (None, 1), (1, None), (math.nan, 1), (1, math.nan),
                     (math.inf, 1), (True, 1), ("1", 1)]:
            self.assertIsNone(B.ratio(a, b), (a, b))
        self.assertEqual(B.ratio(0, 5), 0.0)

    def test_summarize_edge_values(self):
        self.assertEqual(B.summarize([])["median"], None)
        self.assertEqual(B.summarize([math.nan, None])["n"], 0)
        s = B.summarize([0, 0, 0])
        self.assertEqual((s["median"], s["spread_pct"]), (0, None))
        s = B.summarize([2.0, math.nan, 4.0])
        self.assertEqual((s["median"], s["min"], s["max"], s["n"], s["spread_pct"]), (3.0, 2.0, 4.0, 2, 100 / 3))
        self.assertEqual(B.summarize([7])["median"], 7)

    def test_bootstrap_edge_values(self):
        self.assertEqual(B.bootstrap_median([]), (None, None, None))
        self.assertEqual(B.bootstrap_median([math.nan, None]), (None, None, None))
        self.assertEqual(B.bootstrap_median([1.3]), (1.3, None, None))
        self.assertEqual(B.bootstrap_median([1.2] * 8), (1.2, 1.2, 1.2))

    def test_bootstrap_two_values(self):
        # Resampled medians of [a, b] are a, (a+b)/2 or b: the 95% interval is [a, b].
        med, lo, hi = B.bootstrap_median([1.0, 2.0])
        self.assertEqual((med, lo, hi), (1.5, 1.0, 2.0))

    def test_bootstrap_is_seeded_and_brackets_the_median(self):
        rng = random.Random(1)
        vals = [1.2 * math.exp(rng.gauss(0, 0.05)) for _ in range(8)]
        a, b = B.bootstrap_median(vals), B.bootstrap_median(list(vals))
        self.assertEqual(a, b)
        med, lo, hi = a
        self.assertLessEqual(min(vals), lo)
        self.assertLessEqual(lo, med)
        self.assertLessEqual(med, hi)
        self.assertLessEqual(hi, max(vals))
        self.assertLess(lo, 1.2 * 1.06)
        self.assertGreater(hi, 1.2 / 1.06)
        self.assertNotEqual(B.bootstrap_median(vals, seed=B.SEED + 1, resamples=50), a)

    def test_bootstrap_interval_narrows_with_pairs(self):
        rng = random.Random(2)
        few = [1.0 + rng.gauss(0, 0.1) for _ in range(6)]
        many = [1.0 + rng.gauss(0, 0.1) for _ in range(60)]
        w = lambda v: B.bootstrap_median(v)[2] - B.bootstrap_median(v)[1]  # noqa: E731
        self.assertLess(w(many), w(few))

    def test_percentile(self):
        self.assertEqual(B.percentile([1, 2, 3, 4, 5], 0.5), 3)
        self.assertEqual(B.percentile([1, 2], 0.25), 1.25)
        self.assertEqual(B.percentile([7], 0.975), 7)


class Classification(unittest.TestCase):
    def est(self, med, lo, hi, pairs=8):
        return {"median": med, "low": lo, "high": hi, "pairs": pairs}

    def test_higher_is_better(self):
        c = lambda *e, floor=1.0: B.classify(self.est(*e), 1.1, floor)[0]  # noqa: E731
        self.assertEqual(c(1.2, 1.05, 1.3), "met")
        self.assertEqual(c(1.1, 1.0, 1.3), "met")  # on the target and the floor exactly
        self.assertEqual(c(1.2, 0.99, 1.3), "undetermined")  # low end under the floor
        self.assertEqual(c(1.05, 1.01, 1.2), "undetermined")  # median under the target
        self.assertEqual(c(0.9, 0.8, 1.09), "not met")
        self.assertEqual(c(1.2, 1.05, 1.3, floor=None), "undetermined")  # floor = the target
        self.assertEqual(c(1.2, 1.12, 1.3, floor=None), "met")

    def test_lower_is_better(self):
        c = lambda *e: B.classify(self.est(*e), 0.9, None, higher_is_better=False)[0]  # noqa: E731
        self.assertEqual(c(0.8, 0.7, 0.88), "met")
        self.assertEqual(c(0.8, 0.7, 0.95), "undetermined")
        self.assertEqual(c(1.0, 0.95, 1.1), "not met")

    def test_too_few_pairs_or_no_interval(self):
        self.assertEqual(B.classify(self.est(2.0, 1.9, 2.1, pairs=5), 1.1, 1.0)[0], "undetermined")
        self.assertEqual(B.classify(self.est(0.5, 0.4, 0.6, pairs=5), 1.1, 1.0)[0], "undetermined")
        self.assertEqual(B.classify(self.est(2.0, None, None, pairs=1), 1.1, 1.0)[0], "undetermined")
        self.assertEqual(B.classify(self.est(math.nan, 1.0, 2.0), 1.1, 1.0)[0], "undetermined")
        self.assertEqual(B.classify(None, 1.1, 1.0), ("undetermined", "not measured"))
        self.assertEqual(B.classify({}, 1.1, 1.0)[0], "undetermined")


class Order(unittest.TestCase):
    def test_any_two_devices_alternate_abba(self):
        devs = GUEST.DEVICES
        order = GUEST.plan(devs, list(GUEST.JOBS), GUEST.ROUNDS)
        self.assertEqual(len(order), len(devs) * len(GUEST.JOBS) * GUEST.ROUNDS)
        self.assertGreaterEqual(GUEST.ROUNDS, 6)
        for job in GUEST.JOBS:
            for a, b in itertools.combinations(devs, 2):
                seq = "".join("a" if d == a else "b" for _, j, d in order if j == job and d in (a, b))
                self.assertEqual(seq, "abba" * (GUEST.ROUNDS // 2), (job, a, b))

    def test_focus_rounds_go_on_abba_for_the_focus_jobs_only(self):
        devs = GUEST.DEFAULT_DEVICES
        jobs = list(GUEST.JOBS)
        order = GUEST.plan(devs, jobs, GUEST.ROUNDS, GUEST.FOCUS_ROUNDS)
        extra = GUEST.FOCUS_ROUNDS - GUEST.ROUNDS
        self.assertGreater(extra, 0)
        self.assertEqual(len(order), len(devs) * len(jobs) * GUEST.ROUNDS
                         + extra * sum(len(GUEST.FOCUS[j]) for j in GUEST.FOCUS))
        self.assertEqual(order[:len(devs) * len(jobs) * GUEST.ROUNDS], GUEST.plan(devs, jobs, GUEST.ROUNDS))
        for job in jobs:
            for a, b in itertools.combinations(devs, 2):
                seq = "".join("a" if d == a else "b" for _, j, d in order if j == job and d in (a, b))
                both = job in GUEST.FOCUS and {a, b} <= set(GUEST.FOCUS[job])
                n = GUEST.FOCUS_ROUNDS if both else GUEST.ROUNDS
                if both or not ({a, b} & set(GUEST.FOCUS.get(job, ()))):
                    self.assertEqual(seq, "abba" * (n // 2), (job, a, b))
        late = {(j, d) for r, j, d in order if r >= GUEST.ROUNDS}
        self.assertEqual(late, {(j, d) for j, ds in GUEST.FOCUS.items() for d in ds})
        # The targets these jobs are the closest to compare tapdev-null with ublk-null.
        for ds in GUEST.FOCUS.values():
            self.assertLessEqual({"tapdev-null", "ublk-null"}, set(ds))
        # No more rounds than --rounds, or an empty focus: the plain plan.
        self.assertEqual(GUEST.plan(devs, jobs, 8, 6), GUEST.plan(devs, jobs, 8))
        self.assertEqual(GUEST.plan(devs, jobs, 8, 24, {}), GUEST.plan(devs, jobs, 8))
        # A focus device that is not there runs nothing; one device alone gives no pair.
        self.assertEqual(GUEST.focus_of(["ublk-null", "tapdev-null", "rnull"], jobs, 24, 8),
                         {"randread-4k-qd32": ["ublk-null", "tapdev-null"],
                          "randwrite-4k-qd32": ["ublk-null", "tapdev-null"],
                          "randrw70-4k-qd16x2": ["ublk-null", "tapdev-null"]})
        self.assertEqual(GUEST.focus_of(["null_blk", "tapdev-null"], jobs, 24, 8),
                         {"randread-4k-qd32": ["null_blk", "tapdev-null"]})
        self.assertEqual(GUEST.focus_of(devs, jobs, 8, 8), {})
        self.assertEqual(GUEST.focus_of(devs, ["seqread-1m-qd8"], 24, 8), {})

    def test_jobs_of_issue_14(self):
        j = GUEST.JOBS
        self.assertEqual((j["seqread-1m-qd8"]["rw"], j["seqread-1m-qd8"]["bs"], j["seqread-1m-qd8"]["qd"]),
                         ("read", "1m", 8))
        self.assertEqual((j["seqwrite-1m-qd8"]["rw"], j["seqwrite-1m-qd8"]["qd"]), ("write", 8))
        mixed = GUEST.fio_job_args("randrw70-4k-qd16x2")
        for opt in ("--rw=randrw", "--rwmixread=70", "--iodepth=16", "--numjobs=2", "--group_reporting",
                    "--bs=4k"):
            self.assertIn(opt, mixed)

    def test_parse_fio_sums_a_mixed_job(self):
        side = lambda iops, ios, mean, p99: {"iops": iops, "bw": iops * 4, "total_ios": ios,  # noqa: E731
                                             "lat_ns": {"mean": mean, "percentile": {"99.000000": p99}}}
        fio = {"jobs": [{"jobname": "randrw70-4k-qd16x2", "error": 0, "usr_cpu": 1, "sys_cpu": 2, "ctx": 3,
                         "read": side(700, 7000, 1000, 5000), "write": side(300, 3000, 2000, 9000)}]}
        r = GUEST.parse_fio("note\n" + json.dumps(fio))["randrw70-4k-qd16x2"]
        self.assertEqual((r["iops"], r["ios"], r["bw_kib"]), (1000, 10000, 4000))
        self.assertAlmostEqual(r["lat_mean_us"], 1.3)
        self.assertEqual(r["lat_p99_us"], 9.0)
        idle = {"jobs": [{"jobname": "randread-4k-qd1", "error": 0, "usr_cpu": 0, "sys_cpu": 0, "ctx": 0,
                          "read": side(0, 0, 0, 0), "write": side(0, 0, 0, 0)}]}
        self.assertEqual(GUEST.parse_fio(json.dumps(idle))["randread-4k-qd1"]["lat_mean_us"], 0)


def steady(tap=1.3, null=2.0, lat=0.7, noise=0.03, seed=3):
    """Synthetic values: ublk 1000 IOPS, tapdev `tap` times that, null_blk `null` times
    tapdev's, with a few % of noise per run; tapdev's latency `lat` times ublk's."""
    rng = random.Random(seed)

    def values(dev, job, rnd):
        n = math.exp(rng.gauss(0, noise))
        base = {"ublk-null": 1000.0, "tapdev-null": 1000.0 * tap, "null_blk": 1000.0 * tap * null}[dev]
        lat_us = {"ublk-null": 500.0, "tapdev-null": 500.0 * lat, "null_blk": 50.0}[dev]
        return {"iops": base * n, "lat": lat_us / n}
    return values


class Report(unittest.TestCase):
    def test_zero_latencies_do_not_divide(self):
        # The crash of issue 14: a p99 (and here a mean) of 0 from the 4 ms guest clock.
        out, md = report(records(lambda d, j, r: {"lat": 0.0, "p99": 0.0}))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd1"]["ublk-null"]
        self.assertIsNone(est["lat_p99"]["median"])
        self.assertEqual(est["lat_p99"]["undefined"], 8)
        self.assertEqual(est["iops"]["median"], 1.0)
        self.assertEqual(status(out, "tapdev-null randread-4k-qd1 mean latency"), ["undetermined"])
        self.assertIn("undetermined", md)

    def test_zero_iops(self):
        out, md = report(records(lambda d, j, r: {"iops": 0.0}))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertEqual((est["median"], est["pairs"], est["undefined"]), (None, 0, 8))
        iops = [t["status"] for t in out["targets"] if " IOPS " in t["target"]]
        self.assertEqual(set(iops), {"undetermined"})
        self.assertIn("| 0 ±-% |", md)

    def test_nan(self):
        def values(dev, job, rnd):
            return {"iops": math.nan if (dev, rnd) == ("tapdev-null", 3) else 1000.0, "lat": math.nan}
        out, md = report(records(values))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]
        self.assertEqual((est["iops"]["pairs"], est["iops"]["undefined"]), (7, 1))
        self.assertEqual(est["iops"]["median"], 1.0)
        self.assertIsNone(est["lat_mean"]["median"])
        self.assertIsNone(out["results"]["tapdev-null"]["randread-4k-qd1"]["lat_mean_us"]["median"])
        self.assertNotIn("nan", md.lower())

    def test_missing_runs_devices_and_failures(self):
        def values(dev, job, rnd):
            if dev == "tapdev-null" and rnd in (0, 5):
                return None  # no run in these rounds
            if dev == "null_blk" and job == "seqread-1m-qd8":
                return None  # never ran this job
            if dev == "ublk-null" and rnd == 2:
                return {"error": "fio exited 1"}
            return {}
        recs = records(values)
        for r in recs:  # a failed run carries no numbers
            if "error" in r:
                for k in ("iops", "bw_kib", "lat_mean_us", "lat_p99_us"):
                    r.pop(k)
        out, md = report(recs)
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertEqual((est["pairs"], est["missing"]), (5, 3))
        self.assertEqual(status(out, "tapdev-null randread-4k-qd32 IOPS >= 1.1x"), ["undetermined"])
        self.assertNotIn("seqread-1m-qd8", out["ratios"]["tapdev-null"].get("seqread-1m-qd8", {}).get("null_blk", {}))
        self.assertEqual(out["results"]["ublk-null"]["randread-4k-qd1"]["failed"], 1)
        self.assertEqual(out["gauge"]["failed"], len(JOBS))
        self.assertIn("seqread-1m-qd8", md)

    def test_reference_device_missing(self):
        out, md = report(records(lambda d, j, r: None if d == "ublk-null" else {}))
        self.assertNotIn("ublk-null", out["ratios"].get("tapdev-null", {}).get("randread-4k-qd1", {}))
        rows = [t for t in out["targets"] if "ublk-null" in t["target"]]
        self.assertTrue(rows)
        self.assertTrue(all(t["status"] == "undetermined" for t in rows))
        self.assertIn("not measured", md)

    def test_no_runs_at_all(self):
        recs = records(lambda d, j, r: None, extra=[{"kind": "memory", "error": "tap-ctl failed"}])
        out, md = report(recs)
        self.assertIn("not measured: tap-ctl failed", md)
        self.assertEqual(out["results"], {})
        self.assertEqual(out["gauge"]["runs"], 0)
        self.assertTrue(all(t["status"] == "undetermined" for t in out["targets"]))

    def test_incomplete_memory_and_profile_records(self):
        extra = [{"kind": "memory", "taps": 2, "per_tap_kib": {"memfree_drop": 1.0}},
                 {"kind": "profile", "device": "tapdev-null", "job": "randread-4k-qd1", "fio": {}}]
        out, md = report(records(lambda d, j, r: {}, rounds=2, extra=extra))
        self.assertIsNone(out["memory"]["cost_kib"])
        self.assertIn("**Memory per tap**: the record is incomplete", md)
        self.assertIn("**Profile**: the records are incomplete", md)
        self.assertEqual([t for t in out["targets"] if t["group"] == "memory"], [])

    def test_one_pair(self):
        out, md = report(records(lambda d, j, r: {"iops": 2000.0 if d == "tapdev-null" else 1000.0}, rounds=1))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertEqual((est["median"], est["low"], est["high"], est["pairs"]), (2.0, None, None, 1))
        self.assertEqual(set(status(out, "tapdev-null")), {"undetermined"})
        self.assertIn("2.00x (n=1)", md)

    def test_all_equal(self):
        out, _ = report(records(lambda d, j, r: {}))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertEqual((est["median"], est["low"], est["high"], est["pairs"]), (1.0, 1.0, 1.0, 8))
        # 1.0x against 1.1x with the whole interval below: settled, not met.
        self.assertEqual(status(out, "tapdev-null randread-4k-qd32 IOPS >= 1.1x"), ["not met"])
        self.assertEqual(status(out, "tapdev-null: every job"), ["not met"])
        self.assertEqual(out["results"]["tapdev-null"]["randread-4k-qd1"]["iops"]["spread_pct"], 0)

    def test_synthetic_met(self):
        out, md = report(records(steady()))
        self.assertEqual(set(status(out, f"tapdev-null {j} IOPS >= 1.1x") [0] for j in JOBS), {"met"})
        self.assertEqual(status(out, "tapdev-null: every job"), ["met"])
        self.assertEqual(status(out, "tapdev-null randread-4k-qd1 mean latency <= 0.9x"), ["met"])
        self.assertEqual(status(out, "tapdev-null randread-4k-qd32 IOPS >= 0.6x null_blk"), ["not met"])
        self.assertEqual(status(out, "tapdev-null seqread-1m-qd8 IOPS >= 1.0x"), ["met"])
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertLess(est["low"], 1.3)
        self.assertGreater(est["high"], 1.3)
        self.assertEqual(out, report(records(steady()))[0])  # deterministic

    def test_synthetic_not_met_and_undetermined(self):
        out, _ = report(records(steady(tap=0.8, null=1.2, lat=1.3)))
        self.assertEqual(status(out, "tapdev-null: every job"), ["not met"])
        self.assertEqual(status(out, "tapdev-null randread-4k-qd1 mean latency"), ["not met"])
        self.assertEqual(status(out, "tapdev-null randread-4k-qd32 IOPS >= 0.6x null_blk"), ["met"])
        # So noisy that no interval settles 1.05x either way.
        out, _ = report(records(steady(tap=1.05, noise=0.4, seed=5)))
        self.assertEqual(status(out, "tapdev-null seqread-1m-qd8 IOPS >= 1.0x"), ["undetermined"])

    def test_old_log_format(self):
        # Records from before the ABBA order (issue 5): [rw, bs, qd] job specs, `run` only.
        recs = records(lambda d, j, r: {}, jobs=["randread-4k-qd32"], rounds=3)
        for r in recs:
            r.pop("round", None)
            r.pop("gauge", None)
            if r["kind"] == "meta":
                for k in ("rounds", "order", "pinning", "gauge", "devices"):
                    r.pop(k, None)
                r["job_specs"] = {"randread-4k-qd32": ["randread", "4k", 32]}
        recs = [r for r in recs if r["kind"] != "start"]
        out, md = report(recs)
        self.assertEqual(out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]["pairs"], 3)
        self.assertIn("old log", md)
        # Every target of the issue is listed, those whose job did not run as not measured.
        one_mib = [t for t in out["targets"] if "1m-qd8" in t["target"]]
        self.assertEqual([(t["status"], t["why"]) for t in one_mib], [("undetermined", "not measured")] * 2)


class Gauge(unittest.TestCase):
    def slow(self, dev, rnd):
        def values(d, j, r):
            if (d, r) == (dev, rnd):
                return {"gauge": {"before_ms": [50.0, 50.0], "after_ms": [50.0, 80.0], "steal_ticks": 0,
                                  "ticks": 1000}}
            return {}
        return values

    def test_slow_calibration_excludes_the_pair(self):
        out, md = report(records(self.slow("ublk-null", 4)))
        g = out["gauge"]
        self.assertEqual((g["flagged"], g["by_gauge"]["calibration"]), (len(JOBS), len(JOBS)))
        est = out["ratios"]["tapdev-null"]["randread-4k-qd1"]["ublk-null"]["iops"]
        self.assertEqual((est["pairs"], est["excluded"]), (7, 1))
        self.assertNotIn(4, est["rounds"])
        self.assertEqual(out["results"]["ublk-null"]["randread-4k-qd1"]["excluded"], 1)
        self.assertIn(f"{len(JOBS)} of {g['runs']} runs flagged", md)

    def test_slow_calibration_with_a_clean_host_side_is_kept_and_counted(self):
        recs = records(self.slow("ublk-null", 1), jobs=["randread-4k-qd32"], rounds=2)
        marks = [10.0 * i for i in range(len(recs))]
        samples = [[5.0 * k, 5 * 100 * k, 0, 5 * 100 * k, 42] for k in range(2 * len(recs) + 1)]
        out, md = report(recs, {"hz": 100, "qemu_nice": 0, "samples": samples, "marks": marks})
        g = out["gauge"]
        self.assertTrue(g["host_side"])
        self.assertEqual((g["flagged"], g["slow_calibration_kept"]), (0, 1))
        kept = [r for r in out["runs"]["ublk-null"]["randread-4k-qd32"] if r.get("slow_calibration")]
        self.assertEqual([r["round"] for r in kept], [1])
        self.assertIn("1 runs had a slow calibration loop with a clean host side", md)

    def test_steal(self):
        def values(d, j, r):
            return {"gauge": {"before_ms": [50.0], "after_ms": [50.0], "steal_ticks": 100 if r == 1 else 0,
                              "ticks": 1000}}
        out, _ = report(records(values))
        self.assertEqual(out["gauge"]["by_gauge"]["steal"], 3 * len(JOBS))

    def test_gauge_without_readings_or_zero_clock(self):
        def values(d, j, r):
            return {"gauge": {"before_ms": [0.0, 0.0], "after_ms": [0.0, 4.0] if r == 2 else [0.0, 0.0],
                              "steal_ticks": 0, "ticks": 0}} if d != "null_blk" else {"gauge": {}}
        out, _ = report(records(values))
        self.assertEqual(out["gauge"]["flagged"], 0)

    def test_host_side(self):
        recs = records(lambda d, j, r: {}, jobs=["randread-4k-qd32"], rounds=2)
        # One mark per record, 10 s apart; a sample every 5 s; other processes busy (1.5
        # cores) only around tapdev-null's run of round 1.
        marks = [10.0 * i for i in range(len(recs))]
        busy_at = {i for i, r in enumerate(recs) if r.get("device") == "tapdev-null" and r.get("round") == 1}
        samples, busy, qemu = [], 0, 0
        for k in range(2 * len(recs) + 1):
            t = 5.0 * k
            samples.append([t, busy, 10 * k, qemu, 42])
            hot = any(marks[i] - 10 <= t < marks[i] for i in busy_at)
            busy += 5 * 100 * (1.5 + 1.0 if hot else 1.0)  # QEMU's 1 core, others' 1.5 if hot
            qemu += 5 * 100
        out, md = report(recs, {"hz": 100, "qemu_nice": 0, "samples": samples, "marks": marks})
        g = out["gauge"]
        self.assertTrue(g["host_side"])
        self.assertEqual((g["flagged"], g["by_gauge"]["host"]), (1, 1))
        flagged = [r for rs in out["runs"]["tapdev-null"].values() for r in rs if r["disturbed"]]
        self.assertEqual([r["round"] for r in flagged], [1])
        self.assertAlmostEqual(flagged[0]["host"]["others_cores"], 1.5)
        self.assertAlmostEqual(g["host_niced_cores_median"], 0.02)
        self.assertIn("niced host processes (not counted) used 0.02 cores", md)
        # Marks that do not match the records one for one: the host side says nothing.
        out, _ = report(recs, {"hz": 100, "samples": samples, "marks": marks[:-1]})
        self.assertEqual((out["gauge"]["host_side"], out["gauge"]["flagged"]), (False, 0))

    def test_others_in_edge_values(self):
        s = [[0.0, 0, 0, 0, 1], [1.0, 100, 50, 100, 1], [2.0, 200, 100, 200, 2]]
        self.assertIsNone(B.others_in(s, -1.0, 1.0, 100, False))  # no sample before
        self.assertIsNone(B.others_in(s, 0.0, 3.0, 100, False))  # none after
        self.assertIsNone(B.others_in(s, 0.5, 1.5, 100, False))  # QEMU restarted in between
        self.assertEqual(B.others_in(s, 0.0, 1.0, 100, False)["others_cores"], 0.0)
        self.assertEqual(B.others_in(s, 0.0, 1.0, 100, True)["others_cores"], 0.5)
        self.assertEqual(B.others_in(s, 0.0, 1.0, 100, False)["niced_cores"], 0.5)
        self.assertIsNone(B.others_in(s, 0.0, 1.0, 100, True)["niced_cores"])
        self.assertIsNone(B.others_in([[0.0, 0, 0, None, 1], [1.0, 0, 0, None, 1]], 0.0, 1.0, 100, False))


class GuestRun(unittest.TestCase):
    # tests/vm/bench.py's run() on the host: stand-in devices, fio and memory measurement, the
    # real order, gauge, records and smoke check; then the report on its records.

    def guest_run(self, fail=None, rounds=2, stacks="none", focus_rounds=None):
        lines = []
        calls = []

        class Dev:
            def __init__(self, name):
                self.name = name

            def setup(self):
                if self.name == "rnull":
                    raise GUEST.Skip("not built (stand-in)")
                return f"/dev/{self.name}", {"params": "stand-in"}

            def teardown(self):
                calls.append(("teardown", self.name))

            def server_pids(self):
                return []

        def fio(path, jobs, runtime, ramp, out=None, size=None):
            calls.append(("fio", path, jobs[0]))
            if fail and fail(path, len(calls)):
                raise RuntimeError("fio exited 1 (stand-in)")
            return {jobs[0]: {"iops": 1000.0, "bw_kib": 4000, "ios": 5000, "lat_mean_us": 0.0,
                              "lat_p99_us": 0.0, "usr_cpu": 1, "sys_cpu": 2, "ctx": 3}}

        def emit(kind, **fields):
            lines.append(GUEST.MARK + json.dumps({"kind": kind, **fields}))

        def count_device(name, path, server, job, runtime):
            calls.append(("count", name, job))
            emit("counters", device=name, job=job, iops=1000.0, ios=5000, lat_mean_us=0.0,
                 syscalls_counted=True, why_not=None,
                 fio={"syscalls_per_io": 1.5, "cpu_us_per_io": 20.0, "ctxt_per_io": 0.5},
                 fio_cpu_irqs_per_io={"LOC": 0.01, "all": 0.01},
                 **({} if name == "null_blk" else
                    {"server": {"syscalls_per_io": 2.0, "cpu_us_per_io": 30.0, "ctxt_per_io": 1.0,
                                "wakeups_per_io": 1.0, "threads": 1}}))

        class Server:
            def setup(self):
                calls.append(("server", "up"))
                return "nbdkit 1.32 (stand-in)"

            def teardown(self):
                calls.append(("server", "down"))

        stubs = {"make_device": Dev, "no_scheduler": lambda p: {"default": "none", "used": "none"},
                 "make_stack_device": Dev, "Nbdkit": Server, "pin_servers": lambda pids, cpu: {},
                 "fio": fio, "emit": emit, "note": lambda msg: None, "calibration_loops": lambda: 1000,
                 "calibrate": lambda loops: [50.0] * os.cpu_count(),
                 "measure_memory": lambda n: {"taps": n, "per_tap_kib": {"memfree_drop": 1.0}},
                 "sh": lambda cmd, check=True, **kw: "fio-3.33", "FIO_CPU": 0, "SERVER_CPU": 1,
                 "count_device": count_device, "have_perf": lambda: True}
        with unittest.mock.patch.multiple(GUEST, **stubs):
            args = GUEST.argparse.Namespace(smoke=True, rounds=rounds, runtime=1, ramp=0, taps=2,
                                            profile=False, no_devices=False, devices=None,
                                            stacks=stacks, stack_rounds=rounds, stack_runtime=1,
                                            focus_rounds=focus_rounds)
            rc = GUEST.run(args)
        return rc, lines, calls

    def test_order_records_and_smoke_check(self):
        rc, lines, calls = self.guest_run()
        self.assertEqual(rc, 0)
        fio = [(c[1].rsplit("/", 1)[1], c[2]) for c in calls if c[0] == "fio"]
        devs = ["null_blk", "ublk-null", "tapdev-null", "tapdev-ram"]  # rnull skipped
        expect = [(d, j) for j in GUEST.SMOKE_JOBS for d in devs] + \
            [(d, j) for j in GUEST.SMOKE_JOBS for d in reversed(devs)]
        self.assertEqual(fio, expect)
        # The counters: after the measured runs, before the teardown, on the devices they are
        # about (rnull and tapdev-ram are not counted), for the jobs of the run.
        counted = [(c[1], c[2]) for c in calls if c[0] == "count"]
        self.assertEqual(counted, [(d, j) for d in ["tapdev-null", "ublk-null", "null_blk"]
                                   for j in GUEST.COUNTER_JOBS if j in GUEST.SMOKE_JOBS])
        kinds = [c[0] for c in calls]
        self.assertLess(max(i for i, k in enumerate(kinds) if k == "fio"), kinds.index("count"))
        self.assertLess(max(i for i, k in enumerate(kinds) if k == "count"), calls.index(("teardown", "tapdev-ram")))
        self.assertEqual([c[1] for c in calls if c[0] == "teardown"][-4:], list(reversed(devs)))
        recs = GUEST.read_results("\n".join(lines))
        kinds = [r["kind"] for r in recs if r["kind"] in ("start", "run")]
        self.assertEqual(kinds, ["start", "run"] * len(expect))
        runs = [r for r in recs if r["kind"] == "run"]
        self.assertTrue(all(len(r["gauge"]["before_ms"]) == os.cpu_count() for r in runs))
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print"):
                self.assertEqual(GUEST.check(f.name), 0)  # zero latencies are accepted
        out, md = report(recs)
        self.assertEqual(len(out["counters"]), 6)
        self.assertIn("| tapdev-null | randread-4k-qd32 | 1000 | 1.50 | 20.0 | 0.50 | 2.00 | 30.0 | 1.00 |", md)
        self.assertEqual(out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]["pairs"], 2)
        self.assertIsNone(out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["lat_p99"]["median"])

    def test_focus_rounds_in_the_guest_and_the_report(self):
        # The smoke's default: one round of both jobs, a second of randread-4k-qd32 (a focus
        # job) on the focus devices there, reversed.
        rc, lines, calls = self.guest_run(rounds=1)
        self.assertEqual(rc, 0)
        fio = [(c[1].rsplit("/", 1)[1], c[2]) for c in calls if c[0] == "fio"]
        devs = ["null_blk", "ublk-null", "tapdev-null", "tapdev-ram"]  # rnull skipped
        self.assertEqual(fio, [(d, j) for j in GUEST.SMOKE_JOBS for d in devs]
                         + [(d, "randread-4k-qd32") for d in ["tapdev-null", "ublk-null", "null_blk"]])
        recs = GUEST.read_results("\n".join(lines))
        meta = next(r for r in recs if r["kind"] == "meta")
        self.assertEqual((meta["rounds"], meta["focus_rounds"]), (1, 2))
        self.assertEqual(meta["focus"], {"randread-4k-qd32": ["null_blk", "ublk-null", "tapdev-null"]})
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print"):
                self.assertEqual(GUEST.check(f.name), 0)
        # The check counts the runs against the plan: one focus run missing is a problem.
        drop = max(i for i, l in enumerate(lines) if '"kind": "run"' in l and '"tapdev-null"' in l)
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print") as pr:
                self.assertEqual(GUEST.check(f.name), 1)
            self.assertIn("tapdev-null randread-4k-qd32: 1 runs, 2 planned",
                          " ".join(str(c.args[0]) for c in pr.call_args_list))
        out, md = report(recs)
        self.assertEqual(out["method"]["focus_rounds"], 2)
        self.assertIn("the jobs closest to their targets go on to 2 rounds on the devices those "
                      "targets compare (randread-4k-qd32 on null_blk, ublk-null, tapdev-null)", md)
        self.assertEqual(out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]["pairs"], 2)
        self.assertEqual(out["ratios"]["tapdev-null"]["seqwrite-44k-qd32"]["ublk-null"]["iops"]["pairs"], 1)
        # No focus rounds asked for: none run, none said.
        rc, lines, calls = self.guest_run(rounds=1, focus_rounds=0)
        self.assertEqual(len([c for c in calls if c[0] == "fio"]), 8)
        recs = GUEST.read_results("\n".join(lines))
        self.assertEqual(next(r for r in recs if r["kind"] == "meta")["focus"], {})
        self.assertNotIn("closest to their targets", report(recs)[1])

    def test_timeout_counts_the_focus_runs(self):
        plain = B.guest_timeout(len(GUEST.plan(GUEST.DEFAULT_DEVICES, list(GUEST.JOBS), 8)), 5, 1, False)
        more = B.guest_timeout(len(GUEST.plan(GUEST.DEFAULT_DEVICES, list(GUEST.JOBS), 8, 24)), 5, 1, False)
        self.assertEqual(more - plain, 2 * 16 * 7 * 10)

    def test_image_stacks_one_comparison_at_a_time(self):
        rc, lines, calls = self.guest_run(stacks="vhd-first-write,nbd-client,vhd", rounds=2)
        self.assertEqual(rc, 0)
        after = calls[calls.index(("teardown", "null_blk")) + 1:]
        # First write: a new image for every run (set up, one run, torn down), ABBA.
        self.assertEqual(after[:6], [("fio", "/dev/tapdev-vhd-new", "seqwrite-1m-qd8"),
                                     ("teardown", "tapdev-vhd-new"),
                                     ("fio", "/dev/tapdev-aio-new", "seqwrite-1m-qd8"),
                                     ("teardown", "tapdev-aio-new"),
                                     ("fio", "/dev/tapdev-aio-new", "seqwrite-1m-qd8"),
                                     ("teardown", "tapdev-aio-new")])
        # nbd-client: one server under both devices, up before them and down after them.
        i = after.index(("server", "up"))
        self.assertEqual(after[i:i + 4], [("server", "up"), ("fio", "/dev/tapdev-nbd", "randread-4k-qd32"),
                                          ("fio", "/dev/fio-nbd", "randread-4k-qd32"),
                                          ("fio", "/dev/fio-nbd", "randread-4k-qd32")])
        self.assertEqual(after[i + 5:i + 8], [("teardown", "tapdev-nbd"), ("teardown", "fio-nbd"),
                                              ("server", "down")])
        recs = GUEST.read_results("\n".join(lines))
        with tempfile.NamedTemporaryFile("w", suffix=".log") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print"):
                self.assertEqual(GUEST.check(f.name), 0)
            # A comparison without a side's numbers fails the smoke check.
            f.seek(0)
            f.truncate()
            f.write("\n".join(l for l in lines if '"device": "fio-nbd", "job"' not in l
                              or '"stack-run"' not in l) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print") as pr:
                self.assertEqual(GUEST.check(f.name), 1)
            self.assertIn("stack nbd-client: fio-nbd randread-4k-qd32: no result",
                          [c.args[0] for c in pr.call_args_list])
            # So does a counted run without fio's vCPU's interrupts.
            f.seek(0)
            f.truncate()
            f.write("\n".join(l.replace('"fio_cpu_irqs_per_io": {"LOC": 0.01, "all": 0.01}',
                                         '"fio_cpu_irqs_per_io": null') for l in lines) + "\n")
            f.flush()
            with unittest.mock.patch("builtins.print") as pr:
                self.assertEqual(GUEST.check(f.name), 1)
            self.assertTrue(any("no interrupt counted on fio's vCPU" in c.args[0]
                                for c in pr.call_args_list))
        out, md = report(recs)
        st = out["stacks"]["vhd"]
        self.assertEqual(st["ratios"]["randread-4k-qd32"]["iops"]["pairs"], 2)
        self.assertEqual(st["ratios"]["randread-4k-qd32"]["iops"]["median"], 1.0)
        self.assertIn("| randread-4k-qd32 | 1000 | 1000 | 3.9 | 3.9 | 1.00x", md)
        self.assertEqual(status(out, "tapdev-vhd randread-4k-qd32 IOPS >= 0.9x tapdev-aio"),
                         ["undetermined"])  # 2 pairs
        self.assertNotIn("tapdev-null", {r["device"] for r in recs if r["kind"] == "stack-run"})

    def test_image_stack_setup_failure_is_reported(self):
        orig = GUEST.StackTap

        def boom(name):
            raise RuntimeError(f"{name}: no vhd-util (stand-in)")
        with unittest.mock.patch.object(GUEST, "stack_device", boom):
            rc, lines, calls = self.guest_run(stacks="vhd")
        self.assertIs(GUEST.StackTap, orig)
        self.assertEqual(rc, 1)
        recs = GUEST.read_results("\n".join(lines))
        out, md = report(recs)
        self.assertEqual(out["stacks"]["vhd"]["errors"], ["tapdev-vhd: no vhd-util (stand-in)"])
        self.assertIn("- failed: tapdev-vhd: no vhd-util (stand-in)", md)
        self.assertEqual(status(out, "tapdev-vhd randread-4k-qd32"), ["undetermined"])

    def test_calibrate_times_every_vcpu_and_restores_the_affinity(self):
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mask)})
        try:
            times = GUEST.calibrate(1000)
            self.assertEqual(os.sched_getaffinity(0), {min(mask)})
        finally:
            os.sched_setaffinity(0, mask)
        self.assertEqual(len(times), os.cpu_count())
        self.assertTrue(all(t is None or t >= 0 for t in times))

    def test_a_failed_run_is_recorded_and_the_rest_goes_on(self):
        rc, lines, calls = self.guest_run(fail=lambda path, n: path == "/dev/ublk-null" and n < 4)
        self.assertEqual(rc, 1)
        recs = GUEST.read_results("\n".join(lines))
        errors = [r for r in recs if r["kind"] == "run" and "error" in r]
        self.assertEqual(len(errors), 1)
        self.assertEqual(recs[-1], {"kind": "done", "failed": 1})
        self.assertEqual(len([r for r in recs if r["kind"] == "run"]), 16)
        out, md = report(recs)
        est = out["ratios"]["tapdev-null"]["randread-4k-qd32"]["ublk-null"]["iops"]
        self.assertEqual((est["pairs"], est["missing"]), (1, 1))


class HostSampler(unittest.TestCase):
    # No docstring in test cases: scripts/test reads `name (...) ... ok` on one line.
    def test_marks_samples_and_a_new_log(self):
        # HostGauge times each BENCH-RESULT line as it shows up, starts over when the runner
        # replaces the log (a second boot), and finds QEMU among the runner's children.
        import subprocess
        import time
        with tempfile.TemporaryDirectory() as tmp:
            fake = Path(tmp) / "qemu-system-fake"
            shutil.copy("/bin/sleep", fake)
            runner = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                                       f"subprocess.run([{str(fake)!r}, '30'])"])
            try:
                log = Path(tmp) / "console.log"
                g = B.HostGauge(log, runner.pid)
                g.sample()  # no log yet
                self.assertEqual(g.marks, [])
                log.write_text("boot\nBENCH-RESULT {}\nBENCH-RES")
                g.sample()
                self.assertEqual(len(g.marks), 1)
                with open(log, "a") as f:
                    f.write("ULT {}\nBENCH-RESULT {}\n")
                g.sample()
                self.assertEqual(len(g.marks), 3)
                log.unlink()
                log.write_text("BENCH-RESULT {}\n")
                g.sample()
                self.assertEqual(len(g.marks), 1)
                for _ in range(50):  # the runner's child may take a moment to exec
                    g.sample()
                    if g.samples[-1][4]:
                        break
                    time.sleep(0.1)
                t, busy, nice, qemu, pid = g.samples[-1]
                self.assertEqual(B.comm(pid), "qemu-system-fak")  # comm keeps 15 characters
                self.assertIsInstance(qemu, int)
                self.assertGreaterEqual(busy, 0)
                r = g.result()
                self.assertEqual(set(r), {"hz", "qemu_nice", "samples", "marks"})
            finally:
                for p in B.children(runner.pid):
                    subprocess.run(["kill", str(p)])
                runner.wait(timeout=30)


class Counters(unittest.TestCase):
    # The per-I/O counters (perf stat's CSV), the guest's clock and the kernel configuration.

    PERF = ("# started on Fri Dec  4 22:15:41 2026\n\n"
            "144,,raw_syscalls:sys_enter,1242234,100.00,115.920,K/sec\n"
            "1.24,msec,task-clock,1242234,100.00,0.613,CPUs utilized\n"
            "0,,context-switches,1242234,100.00,0.000,/sec\n")

    def test_perf_stat_csv(self):
        stat = GUEST.parse_perf_stat(self.PERF)
        self.assertEqual(stat, {"raw_syscalls:sys_enter": 144.0, "task-clock": 1.24, "context-switches": 0.0})
        self.assertEqual(GUEST.per_io(stat, 8, None),
                         {"syscalls_per_io": 18.0, "cpu_us_per_io": 155.0, "ctxt_per_io": 0.0})
        # Without the tracepoint the system calls are not counted; nothing divides by zero I/Os.
        self.assertIsNone(GUEST.per_io(stat, 8, "no tracepoints")["syscalls_per_io"])
        self.assertEqual(set(GUEST.per_io(stat, 0, None).values()), {None})
        # What perf could not count is None, not a number.
        nc = GUEST.parse_perf_stat("<not counted>,msec,task-clock,0,100.00,,\n"
                                   "<not supported>,,raw_syscalls:sys_enter,0,100.00,,\n")
        self.assertEqual(nc, {"task-clock": None, "raw_syscalls:sys_enter": None})
        self.assertEqual(GUEST.per_io(nc, 10, None)["cpu_us_per_io"], None)
        self.assertEqual(GUEST.perf_events("why"), ["task-clock", "context-switches"])

    def test_interrupts_of_one_vcpu_per_io(self):
        text = ("           CPU0       CPU1       \n"
                "  0:         40          0   IO-APIC   2-edge      timer\n"
                " 24:        100        300   PCI-MSIX-0000:00:04.0   0-edge      virtio0\n"
                "LOC:       5000       6000   Local timer interrupts\n"
                "RES:         70         80   Rescheduling interrupts\n"
                "ERR:          0\n")
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "interrupts"
            f.write_text(text)
            real = GUEST.Path
            GUEST.Path = lambda p: f if p == "/proc/interrupts" else real(p)
            try:
                self.assertEqual(GUEST.cpu_interrupts(0), {"0": 40, "24": 100, "LOC": 5000, "RES": 70})
                self.assertEqual(GUEST.cpu_interrupts(1)["24"], 300)
            finally:
                GUEST.Path = real
        self.assertEqual(GUEST.irqs_per_io({"LOC": 10, "RES": 5}, {"LOC": 30, "RES": 5, "CAL": 4}, 8),
                         {"CAL": 0.5, "LOC": 2.5, "all": 3.0})
        self.assertIsNone(GUEST.irqs_per_io({}, {"LOC": 1}, 0))

    def test_counters_table_with_errors_and_missing_values(self):
        recs = records(lambda d, j, r: {}, jobs=["randread-4k-qd1"], rounds=2, extra=[
            {"kind": "counters", "device": "tapdev-null", "job": "randread-4k-qd1", "iops": 900.0,
             "ios": 0, "syscalls_counted": False, "why_not": "no tracepoints",
             "fio": {"syscalls_per_io": None, "cpu_us_per_io": None, "ctxt_per_io": math.nan}},
            {"kind": "counters", "device": "ublk-null", "job": "randread-4k-qd1", "error": "perf died"},
            {"kind": "counters", "device": "null_blk", "job": "randread-4k-qd1", "iops": 1000.0,
             "ios": 4000, "fio": {"syscalls_per_io": 1.0, "cpu_us_per_io": 12.0, "ctxt_per_io": 0.0},
             "fio_cpu_irqs_per_io": {"LOC": 0.05, "RES": 0.5, "CAL": 0.25, "all": 0.8}},
            {"kind": "counters", "error": "perf is not installed"}])
        out, md = report(recs)
        self.assertIn("| tapdev-null | randread-4k-qd1 | 900 | - | - | - | - | - | - | - | - |", md)
        self.assertIn("| null_blk | randread-4k-qd1 | 1000 | 1.00 | 12.0 | 0.00 | - | - | - | 0.80 | 0.75 |",
                      md)
        self.assertIn("| ublk-null | randread-4k-qd1 | error: perf died |", md)
        self.assertIn("| - | - | error: perf is not installed |", md)
        self.assertIn("System calls not counted: no tracepoints", md)

    def test_host_tsc_rate_from_its_log(self):
        self.assertEqual(B.tsc_khz_from_log("[0.1] tsc: Detected 2596.142 MHz processor\n"), 2596142)
        self.assertEqual(B.tsc_khz_from_log("tsc: Detected 2000.000 MHz processor\n"
                                            "tsc: Refined TSC clocksource calibration: 1999.998 MHz\n"),
                         1999998)
        self.assertEqual(B.tsc_khz_from_log("tsc: Detected 3000.000 MHz TSC\n"), 3000000)
        self.assertIsNone(B.tsc_khz_from_log("clocksource: Switched to clocksource kvm-clock\n"))

    def test_the_guest_gets_the_rate_only_under_tcg(self):
        sys.path.insert(0, str(REPO / "tests/vm"))
        import run
        self.assertEqual(run.tsc_params("tcg", 2596142), ["tsc_early_khz=2596142", "tsc=reliable"])
        self.assertEqual(run.tsc_params("kvm", 2596142), [])
        self.assertEqual(run.tsc_params("tcg", None), [])
        cmd = run.qemu_cmd("/k", "tcg", "/s", "/l", 2596142)
        self.assertIn("tsc_early_khz=2596142", cmd[cmd.index("-append") + 1])

    def test_clock_check(self):
        recs = [{"kind": "meta", "t": 10.0}, {"kind": "run", "t": 70.0}, {"kind": "done", "t": 130.0}]
        self.assertAlmostEqual(B.clock_check(recs, {"marks": [100.0, 160.0, 220.0]}), 1.0)
        self.assertAlmostEqual(B.clock_check(recs, {"marks": [100.0, 200.0, 340.0]}), 0.5)
        # Marks that do not match the records, too short a span, no times: no verdict.
        self.assertIsNone(B.clock_check(recs, {"marks": [100.0, 160.0]}))
        self.assertIsNone(B.clock_check(recs, {"marks": [100.0, 110.0, 120.0]}))
        self.assertIsNone(B.clock_check([{"kind": "meta"}] * 3, {"marks": [0.0, 100.0, 200.0]}))
        self.assertIsNone(B.clock_check(recs, None))
        out, md = report(recs[:1] + records(lambda d, j, r: {}, jobs=["randread-4k-qd1"], rounds=1)[1:],
                         {"marks": []})
        self.assertIsNone(out["vm"]["clock_rate"])

    def test_kernel_config_is_stated(self):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ".config").write_text("CONFIG_HZ=250\n# CONFIG_RUST_DEBUG_ASSERTIONS is not set\n"
                                               "CONFIG_RUST_OVERFLOW_CHECKS=y\n")
            cfg = B.kernel_config(tmp)
        self.assertEqual((cfg["CONFIG_HZ"], cfg["CONFIG_RUST_DEBUG_ASSERTIONS"],
                          cfg["CONFIG_RUST_OVERFLOW_CHECKS"]), ("250", "n", "y"))
        self.assertIsNone(B.kernel_config("/nonexistent"))
        recs = records(lambda d, j, r: {}, jobs=["randread-4k-qd1"], rounds=1)
        out = B.clean(B.aggregate(recs, {"accel": "tcg", "kernel_config": cfg}, 0))
        self.assertIn("**with** Rust debug assertions", B.markdown(out))
        cfg["CONFIG_RUST_OVERFLOW_CHECKS"] = "n"
        out = B.clean(B.aggregate(recs, {"accel": "tcg", "kernel_config": cfg}, 0))
        self.assertIn("the bench kernel (`scripts/build-kernel bench`", B.markdown(out))


class Compare(unittest.TestCase):
    # scripts/bench --compare: a run against an earlier one, on the paired ratios to ublk-null.

    @staticmethod
    def run_of(factor, rounds=8, jobs=("randread-4k-qd1", "randread-4k-qd32")):
        rnd = random.Random(7)
        recs = records(lambda d, j, r: {"iops": 1000.0 * (factor if d == "tapdev-null" else 1.0)
                                        * (1 + rnd.uniform(-0.01, 0.01))}, jobs=list(jobs), rounds=rounds)
        return report(recs)[0]

    def test_verdicts(self):
        old = self.run_of(1.0)
        same = B.compare(self.run_of(1.0), old)
        self.assertEqual([r["job"] for r in same], ["randread-4k-qd1", "randread-4k-qd32"])
        self.assertEqual({r["verdict"] for r in same}, {"same"})
        self.assertTrue(all(r["low"] <= 1.0 <= r["high"] or abs(r["change"] - 1) < 0.03 for r in same))
        self.assertEqual({r["verdict"] for r in B.compare(self.run_of(0.7), old)}, {"worse"})
        self.assertEqual({r["verdict"] for r in B.compare(self.run_of(1.3), old)}, {"better"})
        md = B.compare_markdown(B.compare(self.run_of(0.7), old))
        self.assertIn("| worse |", md)

    def test_edge_values(self):
        old = self.run_of(1.0)
        # Too few pairs, a job only one run has, empty or missing ratios: no exception.
        few = B.compare(self.run_of(1.0, rounds=2), old)
        self.assertEqual({r["verdict"] for r in few}, {"undetermined"})
        only = B.compare(self.run_of(1.0, jobs=("randread-4k-qd32", "seqread-1m-qd8")), old)
        self.assertEqual([r["job"] for r in only], ["randread-4k-qd32"])
        self.assertEqual(B.compare({}, old), [])
        zero = B.compare(self.run_of(0.0), old)
        self.assertTrue(all(r["verdict"] in ("worse", "undetermined") for r in zero))
        B.compare_markdown(zero + few)
        empty = {"ratios": {"tapdev-null": {"randread-4k-qd1": {"ublk-null": {"iops": {"values": []}}}}}}
        self.assertEqual(B.compare(empty, empty)[0]["verdict"], "undetermined")


class Outputs(unittest.TestCase):
    def test_files_are_written(self):
        recs = records(lambda d, j, r: {"iops": 0.0 if d == "ublk-null" and r == 0 else 1000.0,
                                        "p99": 0.0, "lat": math.nan if r == 1 else 10.0})
        with tempfile.TemporaryDirectory() as tmp:
            out = B.write_report(recs, {"accel": "tcg"}, 0, None, Path(tmp), png=False)
            data = json.loads((Path(tmp) / "results.json").read_text(),
                              parse_constant=lambda c: self.fail(f"{c} in results.json"))
            self.assertEqual(data["targets"], out["targets"])
            self.assertEqual((Path(tmp) / "results.md").read_text(), out["markdown"])

    @unittest.skipUnless(shutil.which("/usr/bin/python3") or importlib.util.find_spec("matplotlib"),
                         "no matplotlib (scripts/setup installs python3-matplotlib)")
    def test_plot_with_edge_values(self):
        if not importlib.util.find_spec("matplotlib"):
            import subprocess
            if subprocess.run(["/usr/bin/python3", "-c", "import matplotlib"]).returncode != 0:
                self.skipTest("no matplotlib (scripts/setup installs python3-matplotlib)")
        recs = records(lambda d, j, r: None if d == "null_blk" else {"iops": 0.0 if r == 0 else 1000.0 + r},
                       rounds=2)
        with tempfile.TemporaryDirectory() as tmp:
            B.write_report(recs, {"accel": "tcg"}, 0, None, Path(tmp))
            self.assertGreater((Path(tmp) / "results.png").stat().st_size, 1000)


if __name__ == "__main__":
    unittest.main()
