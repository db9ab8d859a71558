//! Ring and refill/completion-cycle throughput.
//!
//! ```text
//! cargo bench -p zcrx --bench rings            # full run (well under 2 minutes)
//! cargo bench -p zcrx --bench rings -- --test  # smoke test: every benchmark once
//! ```
//!
//! - `ring/same_thread/single`: push one, commit, pop one, release; per element.
//! - `ring/same_thread/batched/B`: push B, one commit, pop B, one release.
//! - `ring/cross_thread/batched/B`: a producer thread pushes in batches of B (one commit per
//!   batch), this thread pops and releases once per batch of up to B; end-to-end elements/s.
//! - `ifq/pairs/batched/B`: the whole zcrx cycle on one core with a NODEV ifq: take B free
//!   buffers and complete them, commit; `recv`, `refill` each, `flush_rq`; then the receive side
//!   serves the flush. One element = one completion + refill pair. Target: >= 50 M pairs/s.
//!
//! Ring elements are [`Cqe`]s (16 bytes, the size of both real ring entry types).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use zcrx::ring::{self, Consumer, Producer};
use zcrx::{AreaReg, Cqe, Ifq, IfqReg, MemoryKind};

/// Ring size for the ring benchmarks: the default refill queue size.
const RING_ENTRIES: u32 = 4096;

fn cqe(v: u64) -> Cqe {
    Cqe { off: v, len: 1500, flags: 0 }
}

fn same_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    let (mut p, mut q) = ring::ring::<Cqe>(RING_ENTRIES).expect("ring");

    g.throughput(Throughput::Elements(1));
    g.bench_function("same_thread/single", |b| {
        let mut v = 0u64;
        b.iter(|| {
            p.push(cqe(black_box(v))).expect("ring full");
            p.commit();
            let got = q.pop().expect("ring empty");
            q.release();
            v = v.wrapping_add(1);
            black_box(got)
        })
    });

    for batch in [8u32, 32, 256] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("same_thread/batched", batch), &batch, |b, &batch| {
            let mut v = 0u64;
            b.iter(|| {
                for _ in 0..batch {
                    p.push(cqe(black_box(v))).expect("ring full");
                    v = v.wrapping_add(1);
                }
                p.commit();
                let mut acc = 0u64;
                for _ in 0..batch {
                    acc = acc.wrapping_add(q.pop().expect("ring empty").off);
                }
                q.release();
                black_box(acc)
            })
        });
    }
    g.finish();
}

/// A producer thread kept alive across iterations. Each job on `work` is "push this many
/// values, in batches of `batch`"; values continue the sequence 0, 1, 2... across jobs so the
/// consumer can check order. Dropping the handle closes the channel and joins the thread.
struct ProducerThread {
    work: Option<mpsc::Sender<u64>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProducerThread {
    fn spawn(mut p: Producer<Cqe>, batch: u32) -> Self {
        let (tx, rx) = mpsc::channel::<u64>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-producer".into())
            .spawn(move || {
                let mut next = 0u64;
                while let Ok(n) = rx.recv() {
                    let end = next + n;
                    let mut spins = 0u32;
                    while next < end {
                        let mut staged = 0;
                        while staged < batch && next < end && p.push(cqe(next)).is_ok() {
                            next += 1;
                            staged += 1;
                        }
                        if staged != 0 {
                            p.commit();
                            spins = 0;
                        } else {
                            // Full: wait for the consumer without starving it on a busy box.
                            if stop2.load(Ordering::Relaxed) {
                                return;
                            }
                            backoff(&mut spins);
                        }
                    }
                }
            })
            .expect("spawn producer");
        Self { work: Some(tx), stop, thread: Some(thread) }
    }

    fn send(&self, n: u64) {
        self.work.as_ref().unwrap().send(n).expect("producer thread gone");
    }
}

impl Drop for ProducerThread {
    fn drop(&mut self) {
        // A consumer that panicked mid-job leaves the producer spinning on a full ring: `stop`
        // gets it out; closing the channel ends the idle loop.
        self.stop.store(true, Ordering::Relaxed);
        drop(self.work.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 128 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Elements per criterion iteration in the cross-thread benchmark.
const CROSS_CHUNK: u64 = 1 << 16;

fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(CROSS_CHUNK));
    for batch in [1u32, 32] {
        let (p, mut q): (_, Consumer<Cqe>) = ring::ring::<Cqe>(RING_ENTRIES).expect("ring");
        let producer = ProducerThread::spawn(p, batch);
        let mut expect = 0u64;
        g.bench_with_input(BenchmarkId::new("cross_thread/batched", batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                let n = iters * CROSS_CHUNK;
                let end = expect + n;
                let start = Instant::now();
                producer.send(n);
                let mut spins = 0u32;
                while expect < end {
                    let mut got = 0;
                    while got < batch {
                        let Some(v) = q.pop() else { break };
                        assert_eq!(v.off, expect, "out of order");
                        expect += 1;
                        got += 1;
                    }
                    if got != 0 {
                        q.release();
                        spins = 0;
                    } else {
                        backoff(&mut spins);
                    }
                }
                start.elapsed()
            })
        });
        drop(producer);
    }
    g.finish();
}

fn ifq_pairs(c: &mut Criterion) {
    let mut g = c.benchmark_group("ifq");
    for batch in [1usize, 32, 256] {
        let (mut ifq, mut user) =
            Ifq::register(IfqReg::default(), AreaReg::new(MemoryKind::Anonymous, 16 << 20), None)
                .expect("register NODEV ifq");
        let mut cqes = [Cqe::default(); 256];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("pairs/batched", batch), &batch, |b, &batch| {
            b.iter(|| {
                // Receive side: B buffers filled and completed, one publish.
                for _ in 0..batch {
                    let i = ifq.take_free().expect("no free buffer");
                    ifq.complete(i, 0, 1500, 0, true).expect("completion ring full");
                }
                ifq.commit();
                // Application side: read the completions, hand every buffer back.
                let n = user.recv(&mut cqes[..batch]);
                assert_eq!(n, batch);
                for c in &cqes[..n] {
                    user.refill(c).expect("refill");
                }
                user.flush_rq();
                // Receive side: serve the flush.
                let returned = ifq.poll_flush_request();
                assert_eq!(returned as usize, batch);
                black_box(returned)
            })
        });
        // Every buffer made the round trip.
        assert_eq!(ifq.free_count(), ifq.area().num_niovs());
        assert_eq!(user.held_count(), 0);
        let s = ifq.stats();
        assert_eq!(s.invalid_rqes + s.no_buffer + s.cq_full, 0, "{s:?}");
        assert_eq!(s.refilled, s.copy_count);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = same_thread, cross_thread, ifq_pairs
}
criterion_main!(benches);
