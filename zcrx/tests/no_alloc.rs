//! The receive + refill path allocates nothing in steady state: after a warm-up, thousands of
//! iterations of `copy_stream`, `user.recv` (into a preallocated array), `user.data` and
//! `user.refill` (or `user.consume` every third time), `user.flush_rq` and
//! `ifq.poll_flush_request` over a TCP loopback stream make
//! zero heap allocations on the receiving thread.
//!
//! A counting global allocator counts only on threads that armed it (a const thread-local, so
//! the check itself never allocates); the sender thread is never armed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use zcrx::{AreaReg, CopyLimits, CopyOutcome, Cqe, Ifq, IfqReg, MemoryKind};

struct Counting;

static EVENTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if ARMED.try_with(|a| a.get()).unwrap_or(false) {
        EVENTS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator; counting touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn arm(on: bool) {
    ARMED.with(|a| a.set(on));
}

fn events() -> u64 {
    EVENTS.load(Ordering::Relaxed)
}

/// The stream is `k % 251` at offset k; `TABLE[p % 251..]` holds the bytes from offset p.
const PERIOD: usize = 251;
const MAX_READ: usize = 16 * 4096;

const OPS: [&str; 7] = ["copy_stream", "recv", "data", "refill", "flush_rq", "poll_flush_request", "consume"];

#[test]
fn receive_and_refill_do_not_allocate() {
    let table: Arc<Vec<u8>> = Arc::new((0..PERIOD + MAX_READ).map(|k| (k % PERIOD) as u8).collect());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (rx, _) = l.accept().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (table, stop) = (table.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut pos = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let s = pos % PERIOD;
                tx.write_all(&table[s..s + MAX_READ]).unwrap();
                pos += MAX_READ;
            }
        })
    };

    let reg = IfqReg { rq_entries: 256, cq_entries: 256, ..IfqReg::default() };
    let (mut ifq, mut user) = Ifq::register(reg, AreaReg::new(MemoryKind::Anonymous, 1 << 20), None).unwrap();
    let mut cqes = [Cqe::default(); 256];
    let limits = CopyLimits::default();
    let mut pos = 0usize;
    let mut per_op = [0u64; 7];

    // The counter counts this thread's allocations while armed, and only then.
    arm(true);
    let before = events();
    drop(std::hint::black_box(vec![0u8; 100]));
    let counted = events() - before;
    arm(false);
    drop(std::hint::black_box(vec![0u8; 100]));
    assert_eq!(counted, 2, "the counting allocator sees an allocation and a free");
    assert_eq!(events() - before, 2, "nothing counted while disarmed");

    let mut iteration = |k: usize, per_op: &mut [u64; 7], pos: &mut usize| {
        let mut t = events();
        let mut mark = |op: usize, per_op: &mut [u64; 7]| {
            let now = events();
            per_op[op] += now - t;
            t = now;
        };
        let out = ifq.copy_stream(rx.as_fd(), &limits).unwrap();
        mark(0, per_op);
        assert!(matches!(out, CopyOutcome::Data { .. }), "unexpected {out:?}");
        if k % 3 == 2 {
            // The process-and-return path.
            let n = user
                .consume(64, |d, _| {
                    let s = *pos % PERIOD;
                    assert!(d == &table[s..s + d.len()], "bytes at stream offset {pos} differ");
                    *pos += d.len();
                    Ok::<(), ()>(())
                })
                .unwrap();
            assert!(n > 0 || user.cq_ready() == 0);
            mark(6, per_op);
        } else {
            let n = user.recv(&mut cqes);
            mark(1, per_op);
            for c in &cqes[..n] {
                let d = user.data(c).unwrap();
                mark(2, per_op);
                let s = *pos % PERIOD;
                assert!(d == &table[s..s + d.len()], "bytes at stream offset {pos} differ");
                *pos += d.len();
                user.refill(c).unwrap();
                mark(3, per_op);
            }
        }
        user.flush_rq();
        mark(4, per_op);
        // Half the time the flush is served explicitly, half the time by the next copy.
        if k % 2 == 0 {
            ifq.poll_flush_request();
            mark(5, per_op);
        }
    };

    for k in 0..3000 {
        iteration(k, &mut per_op, &mut pos);
    }
    let warm = pos;
    per_op = [0; 7];
    arm(true);
    let before = events();
    for k in 0..20_000 {
        iteration(k, &mut per_op, &mut pos);
    }
    let allocs = events() - before;
    arm(false);
    let report: Vec<String> = OPS.iter().zip(per_op).map(|(o, n)| format!("{o}: {n}")).collect();
    assert_eq!(allocs, 0, "allocations on the receive path: {}", report.join(", "));
    assert!(pos - warm > 20_000, "the measured iterations moved data ({} bytes)", pos - warm);

    // Drain to the end of the stream.
    stop.store(true, Ordering::Relaxed);
    loop {
        match ifq.copy_stream(rx.as_fd(), &limits).unwrap() {
            CopyOutcome::Eof => break,
            CopyOutcome::Data { .. } => {}
            o => panic!("unexpected {o:?}"),
        }
        let n = user.recv(&mut cqes);
        for c in &cqes[..n] {
            user.refill(c).unwrap();
        }
        user.flush_rq();
        if ifq.stats().copy_bytes > (1 << 34) {
            panic!("sender does not stop");
        }
    }
    sender.join().unwrap();
    assert_eq!(ifq.stats().invalid_rqes, 0);
}
