//! The server against a simulated kernel.

use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blktap_abi::{blktap_request, blktap_response};

use super::*;
use crate::backend::aio::AioBackend;
use crate::backend::immediate::Synchronous;
use crate::backend::ram::RamBackend;
use crate::backend::ImageKind;
use crate::ring::SharedRing;
use crate::testkit::{SimDevice, SimKernel};

const R: u8 = abi::OP_READ;
const W: u8 = abi::OP_WRITE;

fn ram_server(k: &SimKernel, size: u64, readonly: bool) -> Server<Rc<SimDevice>> {
    let backend = Box::new(Synchronous::new(RamBackend::new(size).unwrap()));
    Server::new(Rc::clone(&k.mem), backend, format!("ram:{size}"), readonly)
}

/// A byte that differs by page, segment and position.
fn pattern(tag: usize, seg: usize, i: usize) -> u8 {
    (tag * 31 + seg * 7 + i / 512 * 3 + i) as u8
}

fn statuses(rsps: &[blktap_response]) -> Vec<(u64, u8, i16)> {
    rsps.iter().map(|r| (r.id, r.operation, r.status)).collect()
}

#[test]
fn writes_and_reads_of_1_to_11_segments_land_in_the_right_pages() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, false);
    for n in 1..=11usize {
        let slot = n - 1;
        for j in 0..n {
            k.fill(slot, j, |i| pattern(n, j, i));
        }
        k.push(W, slot as u64, n as u64 * 100, &vec![(0, 7); n]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = k.responses();
    assert_eq!(rsps.len(), 11);
    assert!(rsps.iter().all(|r| r.status == 0 && r.operation == W));

    // Read everything back into other slots.
    for n in 1..=11usize {
        k.push(R, (n + 15) as u64, n as u64 * 100, &vec![(0, 7); n]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = k.responses();
    assert_eq!(
        statuses(&rsps),
        (1..=11).map(|n| (n + 15, R, 0)).collect::<Vec<_>>()
    );
    for n in 1..=11usize {
        for j in 0..n {
            let page = k.page(n + 15, j);
            assert!(
                page.iter().enumerate().all(|(i, &b)| b == pattern(n, j, i)),
                "request of {n} segments, segment {j}"
            );
        }
    }
    let s = server.stats();
    assert_eq!((s.reads, s.writes, s.errors), (11, 11, 0));
    assert_eq!(s.bytes_written, 66 * 4096);
    assert_eq!(s.bytes_read, 66 * 4096);
    assert_eq!(server.in_flight(), 0);
}

#[test]
fn partial_segments_use_only_their_sectors() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, false);
    k.fill(3, 0, |i| pattern(1, 0, i));
    k.fill(3, 1, |i| pattern(1, 1, i));
    // Sectors 2..=5 of page 0, then sector 0 of page 1: 5 sectors at sector 40.
    k.push(W, 3, 40, &[(2, 5), (0, 0)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(3, W, 0)]);

    // Read the 5 sectors into the middle of one page: 0xee around them stays.
    k.fill(9, 0, |_| 0xee);
    k.push(R, 9, 40, &[(1, 5)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(9, R, 0)]);
    let page = k.page(9, 0);
    let (w0, w1) = (k.page(3, 0), k.page(3, 1));
    assert!(page[..512].iter().all(|&b| b == 0xee));
    assert_eq!(page[512..2560], w0[1024..3072]);
    assert_eq!(page[2560..3072], w1[..512]);
    assert!(page[3072..].iter().all(|&b| b == 0xee));
}

#[test]
fn a_batch_is_published_once_and_indices_wrap_the_ring() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, false);
    for round in 0..3u32 {
        for slot in 0..32u64 {
            k.push(R, slot, slot * 8, &[(0, 7)]);
        }
        // Not published yet: nothing to do.
        server.serve_ring().unwrap();
        assert_eq!(k.mem.kicks(), u64::from(round));
        k.publish();
        server.serve_ring().unwrap();
        let rsps = k.responses();
        assert_eq!(rsps.len(), 32);
        assert!(rsps.iter().all(|r| r.status == 0));
        assert_eq!(k.mem.kicks(), u64::from(round) + 1);
        assert_eq!(k.ring().rsp_prod(), 32 * (round + 1));
    }
}

#[test]
fn hostile_requests_are_answered_not_executed() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 64 * 512, false);
    k.fill(0, 0, |_| 0x55);
    k.push(W, 40, 0, &[(0, 7)]); // bad id
    k.push(W, 0, 0, &[]); // no segments
    let mut twelve = blktap_request {
        operation: W,
        nr_segments: 12,
        id: 1,
        ..Default::default()
    };
    for s in twelve.seg.iter_mut() {
        s.last_sect = 7;
    }
    k.push_raw(&twelve); // 12 segments
    k.push(W, 2, 0, &[(0, 7), (6, 5)]); // last < first
    k.push(W, 3, 0, &[(0, 8)]); // last beyond the page
    k.push(7, 4, 0, &[(0, 7)]); // unknown op
    k.push(W, 5, 60, &[(0, 7)]); // beyond the image
    k.push(R, 6, u64::MAX - 2, &[(0, 7)]); // overflowing the sector arithmetic
    k.push(R, 7, 56, &[(0, 7)]); // the last 8 sectors: fine
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(
        statuses(&k.responses()),
        [
            (40, W, -1),
            (0, W, -1),
            (1, W, -1),
            (2, W, -1),
            (3, W, -1),
            (4, 7, -2),
            (5, W, -1),
            (6, R, -1),
            (7, R, 0),
        ]
    );
    // Nothing was written.
    k.push(R, 8, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(8, R, 0)]);
    assert!(k.page(8, 0).iter().all(|&b| b == 0));
    let s = server.stats();
    assert_eq!((s.errors, s.invalid, s.writes, s.reads), (8, 8, 0, 2));
    assert!(server.fault().is_none());
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, true);
    assert!(server.readonly());
    k.push(W, 0, 0, &[(0, 7)]);
    k.push(R, 1, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(0, W, -1), (1, R, 0)]);
}

#[test]
fn a_req_prod_racing_far_ahead_stops_serving() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, false);
    k.push(R, 0, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(k.responses().len(), 1);
    k.ring().set_req_prod(1000);
    let e = server.serve_ring().unwrap_err();
    assert!(matches!(e, ServeError::Fault(RingFault::Corrupt(_))), "{e}");
    assert!(e.to_string().contains("ring corrupt"), "{e}");
    assert!(server.fault().is_some());
    // Stays stopped, even if the index comes back.
    k.ring().set_req_prod(2);
    assert!(server.serve_ring().is_err());
    assert!(k.responses().is_empty());
    assert_eq!(k.ring().rsp_prod(), 1);
}

/// A ram disk whose completions are held back until the test opens the gate.
struct Gated {
    ram: Synchronous<RamBackend>,
    held: Vec<Completion>,
    open: Rc<Cell<bool>>,
}

impl Backend for Gated {
    fn kind(&self) -> ImageKind {
        ImageKind::Ram
    }
    fn size(&self) -> u64 {
        self.ram.size()
    }
    unsafe fn queue(&mut self, io: Io) {
        // SAFETY: forwarded under the same contract.
        unsafe { self.ram.queue(io) }
    }
    fn submit(&mut self) -> Result<()> {
        self.ram.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.ram.reap(&mut self.held);
        if self.open.get() {
            out.append(&mut self.held);
        }
    }
    fn in_flight(&self) -> usize {
        self.held.len()
    }
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.ram.reap(&mut self.held);
        out.append(&mut self.held);
        Ok(())
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

fn gated_server(k: &SimKernel) -> (Server<Rc<SimDevice>>, Rc<Cell<bool>>) {
    let open = Rc::new(Cell::new(false));
    let backend = Box::new(Gated {
        ram: Synchronous::new(RamBackend::new(1 << 20).unwrap()),
        held: Vec::new(),
        open: Rc::clone(&open),
    });
    let server = Server::new(Rc::clone(&k.mem), backend, "gated".into(), false);
    (server, open)
}

#[test]
fn rsp_prod_only_moves_when_responses_are_written() {
    let mut k = SimKernel::new();
    let (mut server, open) = gated_server(&k);
    k.push(R, 5, 0, &[(0, 7)]);
    k.push(R, 6, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(server.in_flight(), 2);
    assert_eq!(k.ring().rsp_prod(), 0);
    assert_eq!(k.mem.kicks(), 0);
    server.serve_backend().unwrap();
    assert_eq!(k.ring().rsp_prod(), 0);
    open.set(true);
    server.serve_backend().unwrap();
    assert_eq!(k.ring().rsp_prod(), 2);
    assert_eq!(k.mem.kicks(), 1);
    assert_eq!(statuses(&k.responses()), [(5, R, 0), (6, R, 0)]);
    assert_eq!(server.in_flight(), 0);
}

#[test]
fn reusing_a_slot_in_flight_stops_serving() {
    let mut k = SimKernel::new();
    let (mut server, open) = gated_server(&k);
    k.push(R, 5, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    k.push(W, 5, 8, &[(0, 7)]);
    k.publish();
    let e = server.serve_ring().unwrap_err();
    assert!(
        matches!(e, ServeError::Fault(RingFault::SlotBusy(5))),
        "{e}"
    );
    // The first request's I/O still completes, unanswered.
    open.set(true);
    assert!(server.serve_backend().is_ok());
    assert_eq!(server.in_flight(), 0);
    assert!(k.responses().is_empty());
    assert_eq!(server.stats().writes, 0);
}

#[test]
fn close_requests_and_handing_the_memory_back() {
    let mut k = SimKernel::new();
    let (mut server, _open) = gated_server(&k);
    assert!(!server.close_requested());
    k.push(R, 0, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    k.ring().set_msg(RING_MESSAGE_CLOSE);
    assert!(server.close_requested());
    // Handing the memory back answers what was in flight.
    let mem = server.into_memory();
    assert!(Rc::ptr_eq(&mem, &k.mem));
    assert_eq!(statuses(&k.responses()), [(0, R, 0)]);
}

#[test]
fn images_smaller_than_a_sector_make_no_disk() {
    let tiny = Synchronous::new(crate::backend::null::NullBackend::new(1023));
    assert_eq!(disk_sectors(&tiny).unwrap(), 1);
    let tiny = Synchronous::new(crate::backend::null::NullBackend::new(100));
    assert_eq!(disk_sectors(&tiny).unwrap_err().errno(), 22);
    // Served anyway, every request is out of range.
    let mut k = SimKernel::new();
    let mut server = Server::new(Rc::clone(&k.mem), Box::new(tiny), "null:100".into(), false);
    assert_eq!(server.capacity(), 0);
    k.push(R, 0, 0, &[(0, 0)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(0, R, -1)]);
}

/// Serves the backend's completions until `n` responses are on the ring, within `limit`.
fn wait_backend(
    server: &mut Server<Rc<SimDevice>>,
    k: &mut SimKernel,
    limit: Duration,
    n: usize,
) -> Vec<blktap_response> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while got.len() < n {
        assert!(Instant::now() < deadline, "no completion");
        let fd = server.backend_fd().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)).unwrap();
        server.serve_backend().unwrap();
        got.extend(k.responses());
    }
    got
}

#[test]
fn serves_an_aio_image_end_to_end() {
    let path = std::env::temp_dir().join(format!("server-aio-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let mut k = SimKernel::new();
    let backend = Box::new(AioBackend::open(&path, false).unwrap());
    let mut server = Server::new(Rc::clone(&k.mem), backend, "aio".into(), false);
    for slot in 0..32usize {
        for j in 0..11 {
            k.fill(slot, j, |i| pattern(slot, j, i));
        }
        k.push(W, slot as u64, slot as u64 * 88, &[(0, 7); 11]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(10), 32);
    assert!(rsps.iter().all(|r| r.status == 0), "{rsps:?}");
    assert!(k.mem.kicks() <= 32);

    for slot in 0..32usize {
        k.fill(slot, 0, |_| 0);
        k.push(R, slot as u64, (31 - slot) as u64 * 88 + 8, &[(0, 7)]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(10), 32);
    assert!(rsps.iter().all(|r| r.status == 0 && r.operation == R));
    for slot in 0..32usize {
        // Sector 8 of request 31 - slot is the start of its segment 1.
        let page = k.page(slot, 0);
        assert!(page
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(31 - slot, 1, i)));
    }
    drop(server);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn serves_a_vhd_chain_end_to_end() {
    // A base with data and an empty child: 32 concurrent 11-segment writes allocate blocks in
    // the child; reads come back through the worker thread's eventfd; the base is untouched.
    let dir = std::env::temp_dir().join(format!("server-vhd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.vhd");
    crate::vhd::create::create_dynamic(&base, 8 << 20, None).unwrap();
    let mut chain = crate::vhd::Chain::open(&base, true).unwrap();
    chain.write(0, &vec![0xEE; 8 << 20]).unwrap();
    chain.flush().unwrap();
    drop(chain);
    let base_bytes = std::fs::read(&base).unwrap();
    let leaf = dir.join("leaf.vhd");
    crate::vhd::create::snapshot(&leaf, &base, false).unwrap();
    let spec: crate::backend::ImageSpec = format!("vhd:{}", leaf.display()).parse().unwrap();
    let mut k = SimKernel::new();
    let backend = crate::backend::open(&spec, false).unwrap();
    assert_eq!(backend.kind(), ImageKind::Vhd);
    let mut server = Server::new(Rc::clone(&k.mem), backend, spec.to_string(), false);
    // Writes 263 sectors apart over the first three 2 MiB blocks of the child: the first in a
    // block allocates it, the others set bits in its bitmap.
    let sector = |slot: usize| slot as u64 * 263;
    for slot in 0..32usize {
        for j in 0..11 {
            k.fill(slot, j, |i| pattern(slot, j, i));
        }
        k.push(W, slot as u64, sector(slot), &[(0, 7); 11]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(20), 32);
    assert!(rsps.iter().all(|r| r.status == 0), "{rsps:?}");

    for slot in 0..32usize {
        for j in 0..2 {
            k.fill(slot, j, |_| 0);
        }
        // Segment 0: the sector just before the write (the base's); segment 1: its first.
        k.push(
            R,
            slot as u64,
            sector(slot).saturating_sub(1),
            &[(7, 7), (0, 0)],
        );
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(20), 32);
    assert!(
        rsps.iter().all(|r| r.status == 0 && r.operation == R),
        "{rsps:?}"
    );
    for slot in 1..32usize {
        let before = k.page(slot, 0);
        assert!(
            before[7 * 512..].iter().all(|&b| b == 0xEE),
            "slot {slot}: base"
        );
        let first = k.page(slot, 1);
        assert!(
            first[..512]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == pattern(slot, 0, i)),
            "slot {slot}: written"
        );
    }
    drop(server);
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the parent is untouched"
    );
    assert!(crate::vhd::check::check(&leaf).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The ring's memory seen from another thread (the simulated kernel's), by address.
struct RawRing(NonNull<u8>);

// SAFETY: the test keeps the `AnonRing` this points into alive until the thread is joined.
unsafe impl RingMemory for RawRing {
    fn base(&self) -> NonNull<u8> {
        self.0
    }
    fn kick(&self) -> Result<()> {
        Ok(())
    }
}

/// The kernel on its own thread: it keeps up to 32 requests outstanding, each in a free slot,
/// and checks every response the moment `rsp_prod` shows it. A response published before its
/// entry was written would show the request that was there before (whose first bytes read as
/// an id of 256 or more), or a stale response to a slot that is not pending.
#[test]
fn concurrent_kernel_sees_only_complete_responses() {
    const TOTAL: u32 = 20_000;
    let k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, false);
    let base = k.mem.base().as_ptr() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_kernel = Arc::clone(&stop);
    let kernel = std::thread::spawn(move || {
        let mem = RawRing(NonNull::new(base as *mut u8).unwrap());
        let ring = SharedRing::new(&mem);
        let (mut req_prod, mut rsp_cons) = (0u32, 0u32);
        let mut pending: [Option<u8>; 32] = [None; 32];
        let mut free: Vec<u64> = (0..32).collect();
        let mut answered = 0u32;
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered < TOTAL {
            assert!(Instant::now() < deadline, "stalled at {answered}");
            while req_prod < TOTAL && !free.is_empty() {
                let id = free.pop().unwrap();
                let op = (req_prod % 2) as u8;
                let mut req = blktap_request {
                    operation: op,
                    nr_segments: 1 + (req_prod % 11) as u8,
                    id,
                    sector_number: u64::from(req_prod % 1000),
                    ..Default::default()
                };
                for s in req.seg.iter_mut() {
                    s.last_sect = 7;
                }
                ring.write_request(req_prod, &req);
                pending[id as usize] = Some(op);
                req_prod += 1;
                ring.set_req_prod(req_prod);
            }
            let rsp_prod = ring.rsp_prod();
            while rsp_cons != rsp_prod {
                let rsp = ring.read_response(rsp_cons);
                assert!(rsp.id < 32, "stale entry at {rsp_cons}: {rsp:?}");
                let op = pending[rsp.id as usize].take();
                assert_eq!(op, Some(rsp.operation), "response to a free slot: {rsp:?}");
                assert_eq!(rsp.status, 0);
                free.push(rsp.id);
                rsp_cons += 1;
                answered += 1;
            }
            std::hint::spin_loop();
        }
        stop_kernel.store(true, Ordering::Release);
    });
    while !stop.load(Ordering::Acquire) && !kernel.is_finished() {
        server.serve_ring().unwrap();
        std::thread::yield_now();
    }
    kernel.join().unwrap();
    let s = server.stats();
    assert_eq!(s.reads + s.writes, u64::from(TOTAL));
    assert_eq!(s.errors, 0);
}

const FLUSH: u8 = abi::OP_FLUSH;
const FUA: u8 = abi::OP_WRITE_FUA;

/// Serves until `n` responses arrived (polling the backend's fd, running retry timers).
fn serve_until(
    server: &mut Server<Rc<SimDevice>>,
    k: &mut SimKernel,
    n: usize,
) -> Vec<blktap_response> {
    let mut got = k.responses();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} responses", got.len());
        let wait = server
            .next_wakeup()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(20))
            .min(Duration::from_millis(20));
        if let Some(fd) = server.backend_fd() {
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let ms = u16::try_from(wait.as_millis()).unwrap_or(20);
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap();
        } else {
            std::thread::sleep(wait);
        }
        server.run_timers().unwrap();
        server.serve_backend().unwrap();
        got.extend(k.responses());
    }
    got
}

#[test]
fn flush_fua_and_discard_reach_the_ram_disk_and_free_it() {
    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 4 << 20, false);
    for slot in 0..8usize {
        for j in 0..11 {
            k.fill(slot, j, |_| 0xab);
        }
        let op = if slot % 2 == 0 { W } else { FUA };
        k.push(op, slot as u64, slot as u64 * 88, &[(0, 7); 11]);
    }
    k.push(FLUSH, 8, 0, &[]);
    k.publish();
    server.serve_ring().unwrap();
    let rsps = k.responses();
    assert_eq!(rsps.len(), 9);
    assert!(rsps.iter().all(|r| r.status == 0), "{rsps:?}");
    assert_eq!(rsps[8].operation, FLUSH);
    let full = server.allocated_bytes().unwrap();
    assert!(full >= 8 * 44 * 1024, "{full}");

    // Discard the 352 KiB written: the memory goes back, the range reads zeros.
    k.push_raw(&SimKernel::discard(9, 0, 8 * 88));
    k.push(R, 10, 100, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(
        statuses(&k.responses()),
        [(9, abi::OP_DISCARD, 0), (10, R, 0)]
    );
    assert!(k.page(10, 0).iter().all(|&b| b == 0));
    let after = server.allocated_bytes().unwrap();
    assert!(after + 8 * 44 * 1024 - 8192 <= full, "{full} -> {after}");
    let s = server.stats();
    assert_eq!(
        (s.writes, s.fua_writes, s.flushes, s.discards, s.reads),
        (4, 4, 1, 1, 1)
    );
    assert_eq!(s.bytes_written, 8 * 44 * 1024);
    assert_eq!(s.discarded_bytes, 8 * 88 * 512);
    assert_eq!((s.errors, s.unsupported, s.retries), (0, 0, 0));

    // Hostile extension requests: a discard past the end, too long, with segments; a flush
    // with segments.
    let mut with_segs = SimKernel::discard(3, 0, 8);
    with_segs.nr_segments = 2;
    k.push_raw(&SimKernel::discard(0, (4 << 20) / 512 - 4, 8));
    k.push_raw(&SimKernel::discard(1, 0, abi::DISCARD_MAX_SECTORS + 1));
    k.push_raw(&with_segs);
    k.push(FLUSH, 2, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(
        statuses(&k.responses()),
        [
            (0, abi::OP_DISCARD, -1),
            (1, abi::OP_DISCARD, -1),
            (3, abi::OP_DISCARD, -1),
            (2, FLUSH, -1)
        ]
    );
    assert_eq!(server.stats().invalid, 4);
}

/// A ram disk that does not say it does flush, FUA or discard.
struct Plain(Synchronous<RamBackend>);

impl Backend for Plain {
    fn kind(&self) -> ImageKind {
        ImageKind::Ram
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    unsafe fn queue(&mut self, io: Io) {
        // SAFETY: forwarded under the same contract.
        unsafe { self.0.queue(io) }
    }
    fn submit(&mut self) -> Result<()> {
        self.0.submit()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.0.reap(out)
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.0.drain(out)
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[test]
fn extensions_the_backend_lacks_are_not_supported_and_read_only_refuses_discards() {
    let mut k = SimKernel::new();
    let backend = Box::new(Plain(Synchronous::new(RamBackend::new(1 << 20).unwrap())));
    let mut server = Server::new(Rc::clone(&k.mem), backend, "plain".into(), false);
    k.push(FLUSH, 0, 0, &[]);
    k.push(FUA, 1, 0, &[(0, 7)]);
    k.push_raw(&SimKernel::discard(2, 0, 8));
    k.push(W, 3, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(
        statuses(&k.responses()),
        [
            (0, FLUSH, -2),
            (1, FUA, -2),
            (2, abi::OP_DISCARD, -2),
            (3, W, 0)
        ]
    );
    let s = server.stats();
    assert_eq!((s.unsupported, s.errors, s.writes, s.flushes), (3, 0, 1, 0));

    let mut k = SimKernel::new();
    let mut server = ram_server(&k, 1 << 20, true);
    k.push_raw(&SimKernel::discard(0, 0, 8));
    k.push(FUA, 1, 0, &[(0, 7)]);
    k.push(FLUSH, 2, 0, &[]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(
        statuses(&k.responses()),
        [(0, abi::OP_DISCARD, -1), (1, FUA, -1), (2, FLUSH, 0)]
    );
}

/// A ram disk whose I/O fails with `errno` while `failures` lasts.
struct Flaky {
    ram: Synchronous<RamBackend>,
    held: Vec<Completion>,
    failures: Rc<Cell<u32>>,
    errno: Errno,
    tries: Rc<Cell<u32>>,
}

impl Backend for Flaky {
    fn kind(&self) -> ImageKind {
        ImageKind::Ram
    }
    fn size(&self) -> u64 {
        self.ram.size()
    }
    unsafe fn queue(&mut self, io: Io) {
        self.tries.set(self.tries.get() + 1);
        if self.failures.get() > 0 {
            self.failures.set(self.failures.get() - 1);
            self.held.push(Completion {
                tag: io.tag,
                result: Err(self.errno),
            });
            return;
        }
        // SAFETY: forwarded under the same contract.
        unsafe { self.ram.queue(io) }
    }
    fn submit(&mut self) -> Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.held);
        self.ram.reap(out)
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.ram.in_flight()
    }
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.reap(out);
        Ok(())
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

fn flaky_server(
    k: &SimKernel,
    failures: u32,
    errno: Errno,
    deadline: Duration,
) -> (Server<Rc<SimDevice>>, Rc<Cell<u32>>) {
    let tries = Rc::new(Cell::new(0));
    let backend = Box::new(Flaky {
        ram: Synchronous::new(RamBackend::new(1 << 20).unwrap()),
        held: Vec::new(),
        failures: Rc::new(Cell::new(failures)),
        errno,
        tries: Rc::clone(&tries),
    });
    let options = ServerOptions { deadline };
    let server = Server::with_options(Rc::clone(&k.mem), backend, "flaky".into(), false, options);
    (server, tries)
}

#[test]
fn transient_failures_are_retried_with_backoff() {
    let mut k = SimKernel::new();
    let (mut server, tries) = flaky_server(&k, 3, Errno::EIO, Duration::from_secs(10));
    k.fill(0, 0, |_| 0x42);
    k.push(W, 0, 8, &[(0, 7)]);
    k.publish();
    let start = Instant::now();
    server.serve_ring().unwrap();
    // Failed, waiting to be tried again: not answered, still in flight.
    assert!(k.responses().is_empty());
    assert_eq!(server.in_flight(), 1);
    assert!(!server.idle());
    let first = server.next_wakeup().expect("a retry is scheduled");
    assert!(first >= start + Duration::from_millis(10));
    let rsps = serve_until(&mut server, &mut k, 1);
    // Backoff 10 + 20 + 40 ms before the fourth try.
    assert!(
        start.elapsed() >= Duration::from_millis(70),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(statuses(&rsps), [(0, W, 0)]);
    assert_eq!(tries.get(), 4);
    let s = server.stats();
    assert_eq!((s.retries, s.errors, s.writes), (3, 0, 1));
    assert_eq!(s.bytes_written, 4096);
    assert!(server.idle());
    // The data landed.
    k.push(R, 1, 8, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(1, R, 0)]);
    assert!(k.page(1, 0).iter().all(|&b| b == 0x42));
    assert_eq!(backoff(1), Duration::from_millis(10));
    assert_eq!(backoff(4), Duration::from_millis(80));
    assert_eq!(backoff(40), Duration::from_secs(1));
}

#[test]
fn a_request_failing_past_its_deadline_is_answered_with_an_error() {
    let mut k = SimKernel::new();
    let deadline = Duration::from_millis(200);
    let (mut server, tries) = flaky_server(&k, u32::MAX, Errno::EBUSY, deadline);
    k.push(R, 5, 0, &[(0, 7)]);
    k.publish();
    let start = Instant::now();
    server.serve_ring().unwrap();
    let rsps = serve_until(&mut server, &mut k, 1);
    let took = start.elapsed();
    assert_eq!(statuses(&rsps), [(5, R, -1)]);
    assert!(took >= deadline, "answered after {took:?}");
    assert!(took < deadline * 5, "answered only after {took:?}");
    let s = server.stats();
    assert!(s.retries >= 4, "{s:?}");
    assert_eq!(u64::from(tries.get()), s.retries + 1);
    assert_eq!(s.errors, 1);
    assert!(server.next_wakeup().is_none());

    // An error that does not pass is not retried.
    let mut k = SimKernel::new();
    let (mut server, tries) = flaky_server(&k, 1, Errno::EROFS, Duration::from_secs(10));
    k.push(W, 0, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert_eq!(statuses(&k.responses()), [(0, W, -1)]);
    assert_eq!((tries.get(), server.stats().retries), (1, 0));
    assert!(!is_transient(Errno::EROFS) && is_transient(Errno::ENOMEM));
}

#[test]
fn drain_finishes_retries_before_giving_the_memory_back() {
    let mut k = SimKernel::new();
    let (mut server, _) = flaky_server(&k, 2, Errno::EAGAIN, Duration::from_secs(10));
    k.push(R, 0, 0, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    assert!(k.responses().is_empty());
    server.into_memory();
    assert_eq!(statuses(&k.responses()), [(0, R, 0)]);
}

#[test]
fn a_stall_backend_answers_late_without_blocking() {
    let mut k = SimKernel::new();
    let backend = crate::backend::open(&"stall:150:1M".parse().unwrap(), false).unwrap();
    let mut server = Server::new(Rc::clone(&k.mem), backend, "stall:150:1M".into(), false);
    k.fill(0, 0, |_| 0xff);
    k.push(R, 0, 0, &[(0, 7)]);
    k.push(FLUSH, 1, 0, &[]);
    k.publish();
    let start = Instant::now();
    server.serve_ring().unwrap();
    assert!(start.elapsed() < Duration::from_millis(100));
    assert!(k.responses().is_empty());
    assert_eq!(server.in_flight(), 2);
    let rsps = serve_until(&mut server, &mut k, 2);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert_eq!(statuses(&rsps), [(0, R, 0), (1, FLUSH, 0)]);
    assert!(k.page(0, 0).iter().all(|&b| b == 0));
}

#[test]
fn serves_an_nbd_image_from_our_own_nbd_server() {
    use crate::nbd::server::{FileExport, Server as NbdServer, ServerConfig};
    use std::os::unix::fs::FileExt;

    let dir = std::env::temp_dir().join(format!("server-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let export = Arc::new(FileExport::open(&path, false).unwrap());
    let nbd = NbdServer::serve(&dir.join("nbd.sock"), export, ServerConfig::default()).unwrap();
    let image = format!("nbd:nbd+unix:///?socket={}", nbd.path().display());
    let mut k = SimKernel::new();
    let backend = crate::backend::open(&image.parse().unwrap(), false).unwrap();
    assert_eq!(backend.features(), crate::backend::Features::ALL);
    let mut server = Server::new(Rc::clone(&k.mem), backend, image, false);

    // 16 writes of 11 segments (every other one FUA), a flush, then a discard of request 1's
    // range; all answered through the eventfd, none while serve_ring ran.
    for slot in 0..16usize {
        for j in 0..11 {
            k.fill(slot, j, |i| pattern(slot, j, i));
        }
        let op = if slot % 2 == 0 { W } else { FUA };
        k.push(op, slot as u64, slot as u64 * 88, &[(0, 7); 11]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = serve_until(&mut server, &mut k, 16);
    assert!(rsps.iter().all(|r| r.status == 0), "{rsps:?}");
    k.push(FLUSH, 16, 0, &[]);
    k.push_raw(&SimKernel::discard(17, 88, 88));
    k.publish();
    server.serve_ring().unwrap();
    let rsps = serve_until(&mut server, &mut k, 2);
    // The server answers them as they complete, in either order.
    let mut got = statuses(&rsps);
    got.sort_unstable();
    assert_eq!(got, [(16, FLUSH, 0), (17, abi::OP_DISCARD, 0)]);

    // The file has what the ring wrote (request 1's range now zeros).
    let f = std::fs::File::open(&path).unwrap();
    for slot in 0..16usize {
        let mut got = vec![0u8; 11 * 4096];
        f.read_exact_at(&mut got, slot as u64 * 88 * 512).unwrap();
        for (j, page) in got.chunks(4096).enumerate() {
            let want = |i: usize| if slot == 1 { 0 } else { pattern(slot, j, i) };
            assert!(
                page.iter().enumerate().all(|(i, &b)| b == want(i)),
                "{slot}/{j}"
            );
        }
    }
    // And reads come back through the ring.
    for slot in 0..16usize {
        k.fill(slot, 0, |_| 0xff);
        k.push(R, slot as u64, (15 - slot) as u64 * 88 + 8, &[(0, 7)]);
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = serve_until(&mut server, &mut k, 16);
    assert!(rsps.iter().all(|r| r.status == 0 && r.operation == R));
    for slot in 0..16usize {
        let src = 15 - slot;
        let page = k.page(slot, 0);
        let want = |i: usize| if src == 1 { 0 } else { pattern(src, 1, i) };
        assert!(
            page.iter().enumerate().all(|(i, &b)| b == want(i)),
            "{slot}"
        );
    }
    drop(server);
    drop(nbd);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Whether `tool` is installed (a test needing it says so and checks nothing otherwise).
fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: {tool} is not installed (scripts/setup installs it)");
    }
    found
}

/// Serves the ring's backend and the export's queue until `child` exits; its output.
fn pump_until_exit(
    server: &mut Server<Rc<SimDevice>>,
    queue: &crate::nbd::channel::ExportQueue,
    k: &mut SimKernel,
    mut child: std::process::Child,
    ring_rsps: &mut Vec<blktap_response>,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the NBD client never finished");
        {
            let mut fds = vec![nix::poll::PollFd::new(
                queue.fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            if let Some(fd) = server.backend_fd() {
                fds.push(nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN));
            }
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16)).unwrap();
        }
        for req in queue.take() {
            match req {
                crate::nbd::channel::ExportRequest::Io(io) => server.queue_external(io).unwrap(),
                crate::nbd::channel::ExportRequest::Status(q) => {
                    (q.reply)(server.block_status(q.offset, u64::from(q.length)))
                }
            }
        }
        server.serve_backend().unwrap();
        ring_rsps.extend(k.responses());
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
    }
}

#[test]
fn nbd_clients_and_the_ring_share_one_aio_image() {
    use crate::nbd::server::{Server as NbdServer, ServerConfig};
    use std::os::unix::fs::FileExt;
    use std::process::{Command, Stdio};

    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("server-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut k = SimKernel::new();
    let backend = Box::new(AioBackend::open(&path, false).unwrap());
    let size = backend.size();
    let features = backend.features();
    let mut server = Server::new(Rc::clone(&k.mem), backend, "aio".into(), false);
    let (export, queue) = crate::nbd::channel::channel(size, features).unwrap();
    let nbd = NbdServer::serve(
        &dir.join("nbd.sock"),
        Arc::new(export),
        ServerConfig::default(),
    )
    .unwrap();
    let uri = format!("nbd+unix:///?socket={}", nbd.path().display());
    let spawn = |args: &[&str]| {
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(args.iter().flat_map(|a| ["-c", a]))
            .arg(&uri)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // The ring writes 0xab at sector 0 (44 KiB), and meanwhile an NBD client writes 0xcd at
    // 1 MiB (64 KiB) and flushes: disjoint ranges, both in flight together.
    for j in 0..11 {
        k.fill(0, j, |_| 0xab);
    }
    k.push(W, 0, 0, &[(0, 7); 11]);
    k.publish();
    let child = spawn(&["write -P 0xcd 1M 64k", "flush"]);
    server.serve_ring().unwrap();
    let mut rsps = Vec::new();
    let (ok, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut rsps);
    assert!(ok && !out.contains("error"), "{out}");
    rsps.extend(serve_until(&mut server, &mut k, 1 - rsps.len().min(1)));
    assert_eq!(statuses(&rsps), [(0, W, 0)]);

    // The ring reads what the NBD client wrote...
    k.fill(1, 0, |_| 0);
    k.push(R, 1, 2048, &[(0, 7)]);
    k.publish();
    server.serve_ring().unwrap();
    let rsps = serve_until(&mut server, &mut k, 1);
    assert_eq!(statuses(&rsps), [(1, R, 0)]);
    assert!(k.page(1, 0).iter().all(|&b| b == 0xcd));
    // ...and the NBD client reads what the ring wrote (a wrong pattern is noticed).
    let child = spawn(&["read -P 0xab 0 44k", "read -P 0xcd 1M 64k"]);
    let (ok, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut Vec::new());
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    let child = spawn(&["read -P 0xcd 0 4k"]);
    let (_, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut Vec::new());
    assert!(out.contains("Pattern verification failed"), "{out}");
    // Unaligned requests are refused (the image may be O_DIRECT); qemu-io honours the 512-byte
    // minimum block size by reading whole sectors around it.
    let child = spawn(&["read -P 0xab 100 200"]);
    let (ok, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut Vec::new());
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");

    // The file has both.
    let f = std::fs::File::open(&path).unwrap();
    let mut b = vec![0u8; 65536];
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0xcd));
    f.read_exact_at(&mut b[..45056], 0).unwrap();
    assert!(b[..45056].iter().all(|&x| x == 0xab));

    // nbdinfo: the export's size and flags, and its map: the holes of the sparse file.
    let child = Command::new("nbdinfo")
        .arg(&uri)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut Vec::new());
    assert!(ok, "{out}");
    assert!(out.contains(&format!("export-size: {}", 4 << 20)), "{out}");
    assert!(out.contains("block_size_minimum: 512"), "{out}");
    assert!(out.contains("can_flush: true"), "{out}");
    let child = Command::new("nbdinfo")
        .args(["--map", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, out) = pump_until_exit(&mut server, &queue, &mut k, child, &mut Vec::new());
    assert!(ok, "{out}");
    let map: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let mib = 1u64 << 20;
    assert_eq!(
        map,
        [
            (0, 45056, 0),
            (45056, mib - 45056, 3),
            (mib, 65536, 0),
            (mib + 65536, 3 * mib - 65536, 3)
        ],
        "{out}"
    );
    assert_eq!(server.external_in_flight(), 0);
    drop(nbd);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

fn null_server(k: &SimKernel, size: u64) -> Server<Rc<SimDevice>> {
    let backend = Box::new(Synchronous::new(crate::backend::null::NullBackend::new(
        size,
    )));
    Server::new(Rc::clone(&k.mem), backend, format!("null:{size}"), false)
}

fn serve(k: &mut SimKernel, server: &mut Server<Rc<SimDevice>>) -> Vec<(u64, u8, i16)> {
    k.publish();
    server.serve_ring().unwrap();
    statuses(&k.responses())
}

#[test]
fn null_reads_zero_pages_that_may_hold_data_and_leave_known_zero_ones_alone() {
    let mut k = SimKernel::new();
    let mut server = null_server(&k, 1 << 20);
    // A new mapping may hold an earlier user's data: the first read zeros every page it covers.
    for j in 0..11 {
        k.fill(3, j, |_| 0xa5);
    }
    k.push(R, 3, 0, &[(0, 7); 11]);
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert!((0..11).all(|j| k.page(3, j).iter().all(|&b| b == 0)));
    // Those pages are known to hold zeros now: the next read of the slot leaves them as they
    // are (a byte planted behind the server's back, which the kernel never does, survives).
    k.fill(3, 4, |i| if i == 100 { 0x5a } else { 0 });
    k.push(R, 3, 8, &[(0, 7); 11]);
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert_eq!(
        k.page(3, 4)[100],
        0x5a,
        "a known-zero page was written again"
    );
    // A read of more pages than were ever zeroed zeros them all.
    k.fill(3, 4, |_| 0);
    k.fill(7, 0, |_| 0x11);
    k.push(R, 7, 0, &[(0, 7)]);
    assert_eq!(serve(&mut k, &mut server), vec![(7, R, 0)]);
    assert!(k.page(7, 0).iter().all(|&b| b == 0));
}

#[test]
fn null_zeros_again_after_any_request_that_may_have_brought_data_into_the_slot() {
    let mut k = SimKernel::new();
    let mut server = null_server(&k, 1 << 20);
    let zeroed = |k: &mut SimKernel, server: &mut Server<Rc<SimDevice>>, slot: usize, n: usize| {
        k.push(R, slot as u64, 0, &vec![(0, 7); n]);
        assert_eq!(serve(k, server), vec![(slot as u64, R, 0)]);
        (0..n).all(|j| k.page(slot, j).iter().all(|&b| b == 0))
    };
    assert!(zeroed(&mut k, &mut server, 0, 11));
    // A write: the kernel copied its data into the slot's pages first.
    for j in 0..11 {
        k.fill(0, j, |i| pattern(0, j, i));
    }
    k.push(W, 0, 64, &[(0, 7); 11]);
    assert_eq!(serve(&mut k, &mut server), vec![(0, W, 0)]);
    assert!(
        zeroed(&mut k, &mut server, 0, 11),
        "a read after a write returned its data"
    );
    // A write the server refuses (past the end of the disk) brought its data in all the same.
    k.fill(0, 2, |_| 0xee);
    k.push(W, 0, (1 << 20) / 512, &[(0, 7)]);
    assert_eq!(serve(&mut k, &mut server), vec![(0, W, abi::RSP_ERROR)]);
    assert!(
        zeroed(&mut k, &mut server, 0, 3),
        "a read after a refused write returned its data"
    );
    // A FUA write, and a request with an unknown operation, likewise.
    for (op, status) in [(abi::OP_WRITE_FUA, 0), (0x7f, abi::RSP_ERROR)] {
        k.fill(0, 0, |_| 0x77);
        k.push(op, 0, 0, &[(0, 7)]);
        let got = serve(&mut k, &mut server);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].2 == 0), (0, status == 0), "{got:?}");
        assert!(zeroed(&mut k, &mut server, 0, 1), "op {op:#x}");
    }
}

#[test]
fn null_a_read_of_part_of_a_page_does_not_make_the_page_known_zero() {
    let mut k = SimKernel::new();
    let mut server = null_server(&k, 1 << 20);
    k.fill(5, 0, |_| 0x33);
    // Sectors 2..=3 of the page only: the rest of the page keeps what it had.
    k.push(R, 5, 0, &[(2, 3)]);
    assert_eq!(serve(&mut k, &mut server), vec![(5, R, 0)]);
    let page = k.page(5, 0);
    assert!(page[1024..2048].iter().all(|&b| b == 0));
    assert!(page[..1024].iter().chain(&page[2048..]).all(|&b| b == 0x33));
    // So a later read of the whole page zeros all of it.
    k.push(R, 5, 0, &[(0, 7)]);
    assert_eq!(serve(&mut k, &mut server), vec![(5, R, 0)]);
    assert!(k.page(5, 0).iter().all(|&b| b == 0));
    // A read of a whole page and part of the next: only the first is known to hold zeros.
    k.fill(6, 0, |_| 0x44);
    k.fill(6, 1, |_| 0x44);
    k.push(R, 6, 0, &[(0, 7), (0, 3)]);
    assert_eq!(serve(&mut k, &mut server), vec![(6, R, 0)]);
    assert!(k.page(6, 1)[2048..].iter().all(|&b| b == 0x44));
    k.push(R, 6, 0, &[(0, 7), (0, 7)]);
    assert_eq!(serve(&mut k, &mut server), vec![(6, R, 0)]);
    assert!(
        k.page(6, 1).iter().all(|&b| b == 0),
        "a page read in part was taken for zeros"
    );
}

/// A server on a ring of `pages` pages per slot whose disk has large requests.
fn large_server(k: &SimKernel, backend: Box<dyn Backend>, image: &str) -> Server<Rc<SimDevice>> {
    let mut server = Server::new(Rc::clone(&k.mem), backend, image.into(), false);
    server.set_device_flags(abi::DEVICE_LARGE_REQUESTS);
    server
}

/// Sectors of the request in slot `slot` of `large_requests_...`: 12 to 128 pages, most with a
/// partial last page.
fn large_sectors(slot: usize) -> u16 {
    match slot {
        0 => 1024,
        1 => 89,
        _ => (89 + slot as u16 * 31).min(1024),
    }
}

#[test]
fn large_writes_and_reads_at_128_pages_per_slot_land_in_the_right_pages() {
    const SLOT_SECTORS: u64 = 1024;
    let mut k = SimKernel::with_pages_per_slot(128);
    let backend = Box::new(Synchronous::new(RamBackend::new(32 << 20).unwrap()));
    let mut server = large_server(&k, backend, "ram:32M");
    assert_eq!(server.max_request_pages(), 128);
    let pages = |n: u16| usize::from(n).div_ceil(8);
    // 32 writes at once, of 12 to 128 pages each.
    for slot in 0..32usize {
        let n = large_sectors(slot);
        for j in 0..pages(n) {
            k.fill(slot, j, |i| pattern(slot, j, i));
        }
        let req = SimKernel::transfer(W, slot as u64, slot as u64 * SLOT_SECTORS, n);
        assert!(req.nr_segments > 11 && req.nr_sectors == n);
        k.push_raw(&req);
    }
    let got = serve(&mut k, &mut server);
    assert_eq!(got, (0..32).map(|s| (s, W, 0)).collect::<Vec<_>>());
    let written: u64 = (0..32).map(|s| u64::from(large_sectors(s)) * 512).sum();
    assert_eq!(server.stats().bytes_written, written);

    // Read each back into another slot, over pages that hold something else: the request's
    // bytes land from the first byte of page 0 on, and not one byte further.
    for slot in 0..32usize {
        let from = 31 - slot;
        for j in 0..128 {
            k.fill(slot, j, |_| 0xee);
        }
        let n = large_sectors(from);
        k.push_raw(&SimKernel::transfer(
            R,
            slot as u64,
            from as u64 * SLOT_SECTORS,
            n,
        ));
    }
    let got = serve(&mut k, &mut server);
    assert_eq!(got, (0..32).map(|s| (s, R, 0)).collect::<Vec<_>>());
    for slot in 0..32usize {
        let from = 31 - slot;
        let bytes = usize::from(large_sectors(from)) * 512;
        for j in 0..128 {
            let page = k.page(slot, j);
            for (i, &b) in page.iter().enumerate() {
                let want = if j * PAGE_SIZE + i < bytes {
                    pattern(from, j, i)
                } else {
                    0xee
                };
                assert_eq!(b, want, "slot {slot} (data of {from}), page {j}, byte {i}");
            }
        }
    }

    // Writes and reads of disjoint ranges in flight together: even slots write over what odd
    // slots wrote, odd slots read what even slots wrote.
    for slot in 0..32usize {
        let n = large_sectors(slot);
        if slot % 2 == 0 {
            for j in 0..pages(n) {
                k.fill(slot, j, |i| pattern(slot + 100, j, i));
            }
            let req = SimKernel::transfer(W, slot as u64, (slot as u64 + 1) * SLOT_SECTORS, n);
            k.push_raw(&req);
        } else {
            let n = large_sectors(slot - 1);
            let req = SimKernel::transfer(R, slot as u64, (slot as u64 - 1) * SLOT_SECTORS, n);
            k.push_raw(&req);
        }
    }
    let mut got = serve(&mut k, &mut server);
    got.sort_unstable();
    assert_eq!(
        got,
        (0..32)
            .map(|s| (s, if s % 2 == 0 { W } else { R }, 0))
            .collect::<Vec<_>>()
    );
    for slot in (1..32usize).step_by(2) {
        let from = slot - 1;
        let bytes = usize::from(large_sectors(from)) * 512;
        for j in 0..pages(large_sectors(from)) {
            let page = k.page(slot, j);
            let end = (bytes - j * PAGE_SIZE).min(PAGE_SIZE);
            assert!(
                page[..end]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(from, j, i)),
                "slot {slot}, page {j}"
            );
        }
    }
    // And what the even slots wrote is on the image.
    for slot in (0..32usize).step_by(2) {
        let n = large_sectors(slot);
        k.push_raw(&SimKernel::transfer(
            R,
            1,
            (slot as u64 + 1) * SLOT_SECTORS,
            n,
        ));
        assert_eq!(serve(&mut k, &mut server), vec![(1, R, 0)]);
        let bytes = usize::from(n) * 512;
        for j in 0..pages(n) {
            let end = (bytes - j * PAGE_SIZE).min(PAGE_SIZE);
            let page = k.page(1, j);
            assert!(
                page[..end]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(slot + 100, j, i)),
                "image after slot {slot}'s write, page {j}"
            );
        }
    }
    let s = server.stats();
    assert_eq!((s.errors, s.invalid, server.in_flight()), (0, 0, 0));
}

#[test]
fn large_requests_are_refused_without_the_flag_beyond_the_slot_or_with_bad_sectors() {
    let mut k = SimKernel::with_pages_per_slot(64);
    let backend = Box::new(Synchronous::new(RamBackend::new(1 << 20).unwrap()));
    let mut server = Server::new(Rc::clone(&k.mem), backend, "ram:1M".into(), false);
    // A ring of 64 pages per slot, but a disk without large requests: 11 pages at most.
    assert_eq!(server.max_request_pages(), 11);
    k.fill(2, 0, |_| 0xee);
    k.push_raw(&SimKernel::transfer(R, 2, 0, 12 * 8));
    assert_eq!(serve(&mut k, &mut server), vec![(2, R, abi::RSP_ERROR)]);
    assert!(
        k.page(2, 0).iter().all(|&b| b == 0xee),
        "a refused read wrote"
    );
    k.push_raw(&SimKernel::transfer(R, 2, 0, 88));
    assert_eq!(serve(&mut k, &mut server), vec![(2, R, 0)]);

    server.set_device_flags(abi::DEVICE_LARGE_REQUESTS);
    assert_eq!(server.max_request_pages(), 64);
    k.fill(2, 0, |_| 0xee);
    // More pages than the slot has.
    k.push_raw(&SimKernel::transfer(R, 2, 0, 65 * 8));
    // nr_sectors that does not fit nr_segments, both sides.
    let mut short = SimKernel::transfer(R, 3, 0, 64 * 8);
    short.nr_sectors = 63 * 8;
    k.push_raw(&short);
    let mut long = SimKernel::transfer(W, 4, 0, 20 * 8);
    long.nr_sectors = 20 * 8 + 1;
    k.push_raw(&long);
    // Past the end of the disk.
    k.push_raw(&SimKernel::transfer(W, 5, 2048 - 511, 512));
    // The largest that fits, to the last sector.
    k.push_raw(&SimKernel::transfer(W, 6, 2048 - 512, 512));
    let mut got = serve(&mut k, &mut server);
    got.sort_unstable();
    let e = abi::RSP_ERROR;
    assert_eq!(got, [(2, R, e), (3, R, e), (4, W, e), (5, W, e), (6, W, 0)]);
    assert!(
        k.page(2, 0).iter().all(|&b| b == 0xee),
        "a refused read wrote"
    );
    let s = server.stats();
    assert_eq!((s.invalid, s.errors), (5, 5));
    assert_eq!(s.bytes_written, 512 * 512);
}

#[test]
fn null_large_reads_zero_every_page_once_and_only_whole_ones_are_known_zero() {
    let mut k = SimKernel::with_pages_per_slot(64);
    let backend = Box::new(Synchronous::new(crate::backend::null::NullBackend::new(
        1 << 20,
    )));
    let mut server = large_server(&k, backend, "null:1M");
    for j in 0..64 {
        k.fill(3, j, |_| 0xa5);
    }
    // 63 pages and one sector of the 64th.
    k.push_raw(&SimKernel::transfer(R, 3, 0, 63 * 8 + 1));
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert!((0..63).all(|j| k.page(3, j).iter().all(|&b| b == 0)));
    let last = k.page(3, 63);
    assert!(last[..512].iter().all(|&b| b == 0));
    assert!(last[512..].iter().all(|&b| b == 0xa5));
    // Pages 0..63 are known to hold zeros: a byte planted behind the server's back in page
    // 40 survives the next read of them.
    k.fill(3, 40, |i| if i == 100 { 0x5a } else { 0 });
    k.push_raw(&SimKernel::transfer(R, 3, 8, 63 * 8));
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert_eq!(
        k.page(3, 40)[100],
        0x5a,
        "a known-zero page was written again"
    );
    // Page 63 was read in part: a read of it zeros it all.
    k.fill(3, 40, |_| 0);
    k.push_raw(&SimKernel::transfer(R, 3, 8, 64 * 8));
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert!(
        k.page(3, 63).iter().all(|&b| b == 0),
        "a page read in part was taken for zeros"
    );
    // A large write brought data into every page: all are zeroed by the next read.
    for j in 0..64 {
        k.fill(3, j, |_| 0x77);
    }
    k.push_raw(&SimKernel::transfer(W, 3, 0, 64 * 8));
    assert_eq!(serve(&mut k, &mut server), vec![(3, W, 0)]);
    k.push_raw(&SimKernel::transfer(R, 3, 0, 64 * 8));
    assert_eq!(serve(&mut k, &mut server), vec![(3, R, 0)]);
    assert!((0..64).all(|j| k.page(3, j).iter().all(|&b| b == 0)));
}

#[test]
fn serves_large_requests_from_an_aio_image() {
    let path = std::env::temp_dir().join(format!("server-aio-large-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut k = SimKernel::with_pages_per_slot(128);
    let backend = Box::new(AioBackend::open(&path, false).unwrap());
    let mut server = large_server(&k, backend, "aio");
    for slot in 0..32usize {
        for j in 0..128 {
            k.fill(slot, j, |i| pattern(slot, j, i));
        }
        k.push_raw(&SimKernel::transfer(
            W,
            slot as u64,
            slot as u64 * 1024,
            1024,
        ));
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(10), 32);
    assert!(rsps.iter().all(|r| r.status == 0), "{rsps:?}");
    for slot in 0..32usize {
        for j in 0..128 {
            k.fill(slot, j, |_| 0);
        }
        // 100 pages and 3 sectors, from page 1 of the other slot's write.
        k.push_raw(&SimKernel::transfer(
            R,
            slot as u64,
            (31 - slot) as u64 * 1024 + 8,
            803,
        ));
    }
    k.publish();
    server.serve_ring().unwrap();
    let rsps = wait_backend(&mut server, &mut k, Duration::from_secs(10), 32);
    assert!(rsps.iter().all(|r| r.status == 0 && r.operation == R));
    for slot in 0..32usize {
        for j in [0, 57, 99] {
            let page = k.page(slot, j);
            assert!(
                page.iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(31 - slot, j + 1, i)),
                "slot {slot}, page {j}"
            );
        }
        let page = k.page(slot, 100);
        assert!(page[..1536]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(31 - slot, 101, i)));
        assert!(page[1536..].iter().all(|&b| b == 0));
    }
    drop(server);
    std::fs::remove_file(path).unwrap();
}
