//! The application side of receiving, shared by every subcommand: take completions, hand the
//! bytes to a sink in place, return the buffers. Inline (one thread polls both sides) or with a
//! receive thread that owns the receive side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_utils::Backoff;
use zcrx::{CopyOutcome, Cqe, Ifq, IfqStats, IfqUser};

/// Completions taken per batch.
pub const BATCH: usize = 256;

/// Where received bytes go. `cqe` says which buffer and whether the frame continues. The
/// receive loops are generic over it, so a concrete sink is inlined into the per-buffer loop.
pub trait Sink {
    fn data(&mut self, bytes: &[u8], cqe: &Cqe) -> Result<(), String>;
}

/// Counts only.
pub struct Discard;
impl Sink for Discard {
    fn data(&mut self, _: &[u8], _: &Cqe) -> Result<(), String> {
        Ok(())
    }
}

/// What one step of a receive side did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Data,
    /// Nothing this time (no data, or back pressure).
    Idle,
    /// The source ended.
    Eof,
}

/// A receive side: NODEV copy from a socket, or a device's rx queue.
pub trait RxSide {
    /// Receive what is there (may block briefly, e.g. in a socket read).
    fn step(&mut self) -> Result<Step, String>;
    /// Serve the user's flush_rq request now (inline mode, refill queue full).
    fn serve_flush(&mut self);
    /// Whether it drains the refill queue by itself (a device does on every refill): then
    /// returned buffers need only be published, not flushed.
    fn drains_rq(&self) -> bool {
        false
    }
    /// Close; every buffer is accounted for. The device's counters when there is a device.
    fn finish(self: Box<Self>) -> (IfqStats, Option<driver::NetStats>);
}

/// NODEV: an ifq and a function that copies into it.
pub struct CopySide<F> {
    pub ifq: Ifq,
    pub fill: F,
}

impl<F: FnMut(&mut Ifq) -> std::io::Result<CopyOutcome>> RxSide for CopySide<F> {
    fn step(&mut self) -> Result<Step, String> {
        Ok(match (self.fill)(&mut self.ifq).map_err(|e| format!("receive failed: {e}"))? {
            CopyOutcome::Data { .. } => Step::Data,
            CopyOutcome::Eof => Step::Eof,
            _ => Step::Idle,
        })
    }
    fn serve_flush(&mut self) {
        self.ifq.poll_flush_request();
    }
    fn finish(self: Box<Self>) -> (IfqStats, Option<driver::NetStats>) {
        (self.ifq.close(), None)
    }
}

/// What a receive run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub bytes: u64,
    pub completions: u64,
    pub stats: IfqStats,
    pub device: Option<driver::NetStats>,
}

/// Take every ready completion, feed the sink in place and return the buffer at once
/// ([`IfqUser::consume`]). `on_rq_full` must make refill-queue room (flush) — completions wait
/// in their ring meanwhile, nothing is dropped.
fn drain<S: Sink + ?Sized>(
    user: &mut IfqUser,
    sink: &mut S,
    flush: bool,
    on_rq_full: &mut dyn FnMut(&mut IfqUser),
) -> Result<(u64, u64), String> {
    let mut bytes = 0;
    let n = loop {
        let n = user
            .consume(BATCH, |d, c| {
                bytes += d.len() as u64;
                sink.data(d, c)
            })
            .map_err(|e| e.to_string())?;
        if n == 0 && user.cq_ready() != 0 {
            on_rq_full(user);
            continue;
        }
        break n;
    };
    if n != 0 {
        if flush {
            user.flush_rq();
        } else {
            user.commit_rq();
        }
    }
    Ok((bytes, n as u64))
}

/// One thread drives both sides until the source ends or `stop` is set.
pub fn run_inline<S: Sink + ?Sized>(
    mut rx: Box<dyn RxSide + '_>,
    mut user: IfqUser,
    sink: &mut S,
    progress: &mut dyn FnMut(u64),
    stop: &AtomicBool,
) -> Result<RunStats, String> {
    let mut run = RunStats::default();
    let mut eof = false;
    let flush = !rx.drains_rq();
    while !eof && !stop.load(Ordering::Relaxed) {
        eof = rx.step()? == Step::Eof;
        loop {
            let (b, n) = drain(&mut user, sink, flush, &mut |u| {
                u.flush_rq();
                rx.serve_flush();
            })?;
            run.bytes += b;
            run.completions += n;
            if n == 0 {
                break;
            }
        }
        progress(run.bytes);
    }
    (run.stats, run.device) = rx.finish();
    Ok(run)
}

/// A receive thread owns the receive side; this thread consumes and refills.
pub fn run_threaded<S: Sink + ?Sized>(
    rx: Box<dyn RxSide + Send>,
    mut user: IfqUser,
    sink: &mut S,
    progress: &mut dyn FnMut(u64),
    stop: Arc<AtomicBool>,
) -> Result<RunStats, String> {
    let flush = !rx.drains_rq();
    let done = Arc::new(AtomicBool::new(false));
    let rx_done = done.clone();
    let rx_stop = stop.clone();
    let rx = std::thread::Builder::new()
        .name("zcrx-rx".into())
        .spawn(move || -> Result<(IfqStats, Option<driver::NetStats>), String> {
            let mut rx = rx;
            let backoff = Backoff::new();
            let r = loop {
                if rx_stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
                match rx.step() {
                    Ok(Step::Eof) => break Ok(()),
                    Ok(Step::Data) => backoff.reset(),
                    Ok(Step::Idle) => backoff.snooze(),
                    Err(e) => break Err(e),
                }
            };
            let stats = rx.finish();
            rx_done.store(true, Ordering::Release);
            r.map(|()| stats)
        })
        .map_err(|e| format!("cannot start the receive thread: {e}"))?;

    let mut run = RunStats::default();
    let backoff = Backoff::new();
    let mut result = Ok(());
    loop {
        let finished = done.load(Ordering::Acquire);
        match drain(&mut user, sink, flush, &mut |u| {
            u.flush_rq();
            Backoff::new().snooze();
        }) {
            Ok((b, n)) => {
                run.bytes += b;
                run.completions += n;
                if n == 0 {
                    if finished {
                        break;
                    }
                    backoff.snooze();
                } else {
                    backoff.reset();
                    progress(run.bytes);
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                result = Err(e);
                break;
            }
        }
    }
    let rx_result = rx.join().map_err(|_| "the receive thread panicked".to_string())?;
    result?;
    (run.stats, run.device) = rx_result?;
    Ok(run)
}
