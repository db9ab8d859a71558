//! The two ends of one ifq on two threads, as an application uses them: a receive thread owns
//! the `Ifq` and loops `copy_stream` on a blocking TCP socket, backing off when buffers run
//! out; the application thread consumes completions, verifies the stream in place and returns
//! buffers with `flush_rq`. 32 MiB must arrive intact and in order, through forced episodes of
//! buffer exhaustion.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::Backoff;
use zcrx::uapi::ZCRX_EVENT_ALLOC_FAIL;
use zcrx::{AreaReg, CopyLimits, CopyOutcome, Cqe, Ifq, IfqReg, MemoryKind};

const TOTAL: usize = 32 << 20;
const BUFFERS: u32 = 32;
/// Times the application deliberately holds every buffer until the receive side reports that
/// it ran out.
const STARVE_EVERY: usize = 4 << 20;

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

#[test]
fn receive_thread_and_app_thread_move_32_mib_intact() {
    let data = Arc::new(pattern(TOTAL));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (sock, _) = l.accept().unwrap();
    let sender = {
        let data = data.clone();
        std::thread::spawn(move || {
            for c in data.chunks(16 << 10) {
                tx.write_all(c).unwrap();
            }
        })
    };

    let reg = IfqReg { rq_entries: 64, cq_entries: 64, ..IfqReg::default() };
    let (mut ifq, mut user) =
        Ifq::register(reg, AreaReg::new(MemoryKind::Memfd, BUFFERS as usize * 4096), None).unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let receiver = {
        let failed = failed.clone();
        std::thread::spawn(move || {
            let guard = PanicFlag(failed);
            let limits = CopyLimits::default();
            let backoff = Backoff::new();
            let (mut waits, mut copies) = (0u64, 0u64);
            loop {
                match ifq.copy_stream(sock.as_fd(), &limits).unwrap() {
                    CopyOutcome::Data { .. } => {
                        copies += 1;
                        backoff.reset();
                    }
                    CopyOutcome::NoBuffer | CopyOutcome::NoCqSpace => {
                        waits += 1;
                        if backoff.is_completed() {
                            std::thread::sleep(Duration::from_micros(50));
                        } else {
                            backoff.snooze();
                        }
                    }
                    CopyOutcome::Eof => break,
                    CopyOutcome::WouldBlock => panic!("blocking socket would block"),
                }
            }
            let count = |st| (0..BUFFERS).filter(|&i| ifq.niov_state(i) == st).count() as u32;
            use zcrx::NiovState::*;
            assert_eq!(
                [ifq.free_count(), ifq.posted_count(), ifq.user_count()],
                [count(Free), count(Posted), count(User)]
            );
            assert_eq!(ifq.free_count() + ifq.posted_count() + ifq.user_count(), BUFFERS);
            std::mem::forget(guard);
            (ifq.close(), waits, copies)
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cqes = [Cqe::default(); 64];
    let mut held: Vec<Cqe> = Vec::with_capacity(BUFFERS as usize);
    let (mut pos, mut completions, mut starved, mut next_starve) = (0usize, 0u64, 0u32, STARVE_EVERY);
    let backoff = Backoff::new();
    while pos < TOTAL {
        assert!(Instant::now() < deadline, "stalled at {pos} of {TOTAL} bytes");
        assert!(!failed.load(Ordering::Relaxed), "receive thread failed");
        let n = user.recv(&mut cqes);
        if n == 0 {
            backoff.snooze();
            continue;
        }
        backoff.reset();
        for c in &cqes[..n] {
            let d = user.data(c).unwrap();
            assert!(pos + d.len() <= TOTAL, "more bytes than sent");
            assert!(d == &data[pos..pos + d.len()], "bytes at stream offset {pos} differ");
            pos += d.len();
            completions += 1;
            held.push(*c);
        }
        if pos >= next_starve && pos < TOTAL {
            // Starve the receive side: keep every buffer until it says it ran out.
            if user.held_count() < BUFFERS {
                continue;
            }
            // From here on the receive side has no free buffer; forget older events and wait for
            // it to report this shortage.
            user.take_events();
            let t = Instant::now();
            while user.take_events() & ZCRX_EVENT_ALLOC_FAIL == 0 {
                assert!(t.elapsed() < Duration::from_secs(10), "receive side never reported running out");
                std::thread::yield_now();
            }
            starved += 1;
            next_starve += STARVE_EVERY;
        }
        for c in held.drain(..) {
            user.refill(&c).unwrap();
        }
        user.flush_rq();
    }
    assert_eq!(pos, TOTAL, "exactly the stream");
    sender.join().unwrap();
    let (stats, waits, copies) = receiver.join().unwrap();
    assert!(user.is_closed());
    assert_eq!(user.recv(&mut cqes), 0, "nothing after the end of the stream");
    assert_eq!(stats.copy_bytes, TOTAL as u64);
    assert_eq!(stats.copy_count, completions);
    assert_eq!(stats.invalid_rqes, 0);
    assert!(starved >= 7, "starvation episodes: {starved}");
    assert!(stats.no_buffer >= starved as u64, "no_buffer {} < {starved} episodes", stats.no_buffer);
    assert_eq!(stats.no_buffer + stats.cq_full, waits);
    assert!(copies > 0);
}

/// Marks the receive thread as failed if it unwinds, so the application thread stops waiting.
struct PanicFlag(Arc<AtomicBool>);
impl Drop for PanicFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
