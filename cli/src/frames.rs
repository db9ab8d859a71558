//! Receiving Ethernet frames zero-copy from a virtio-net device: the device side as a
//! [`RxSide`], and a sink that joins fragments, verifies generated frames and writes pcap.

use std::io::BufWriter;

use driver::NetRx;
use traffic::FrameVerifier;
use zcrx::{Cqe, IfqStats};

use crate::receive::{RxSide, Sink, Step};

/// The device's rx queue as a receive side. When the device goes away it says so once and
/// then tries to reach it again every 100 ms (no buffer is lost meanwhile: the ones the device
/// had are back in the free list, the user's stay the user's).
pub struct DeviceSide {
    pub rx: NetRx,
    pub gone: bool,
    pub reconnects: u64,
    /// Completions of the last poll that found any: how long to pause after an empty one.
    last_batch: u32,
}

impl DeviceSide {
    pub fn new(rx: NetRx) -> Self {
        Self { rx, gone: false, reconnects: 0, last_batch: 0 }
    }
}

/// Most spin-loop hints after an empty poll: about 3 us here (a `pause` takes ~25 ns on this
/// machine). 128 and 256 measured alike; 1024 starved the device (its ring ran dry).
const MAX_IDLE_PAUSES: u32 = 128;

impl RxSide for DeviceSide {
    fn step(&mut self) -> Result<Step, String> {
        if self.gone {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if self.rx.reconnect().is_err() {
                return Ok(Step::Idle);
            }
            eprintln!("zcrx: device is back, receiving again");
            self.gone = false;
            self.reconnects += 1;
        }
        match self.rx.poll() {
            Ok(p) if p.completions != 0 => {
                self.last_batch = p.completions;
                Ok(Step::Data)
            }
            Ok(_) => {
                // Each poll reads the used index, pulling its line from the device's core while
                // the device is writing it. Under load (big batches) the device needs a while
                // to fill the ring again, so wait in proportion to the last batch before the
                // next look; at low rates (small batches) there is next to no wait.
                for _ in 0..self.last_batch.min(MAX_IDLE_PAUSES) {
                    std::hint::spin_loop();
                }
                Ok(Step::Idle)
            }
            Err(e @ driver::NetError::Gone(_)) => {
                eprintln!("zcrx: {e}; waiting for it to come back");
                self.gone = true;
                Ok(Step::Idle)
            }
            Err(e) => Err(e.to_string()),
        }
    }
    fn serve_flush(&mut self) {
        self.rx.refill();
    }
    fn drains_rq(&self) -> bool {
        true
    }
    fn finish(mut self: Box<Self>) -> (IfqStats, Option<driver::NetStats>) {
        let dev = self.rx.device().stats();
        (self.rx.close(), Some(dev))
    }
}

/// Say on stderr when the device is ready (buffers posted): peers that must not send earlier
/// wait for it (`zcrx rx` sets it; the demo and benchmarks stay quiet).
pub static ANNOUNCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Joins a frame's fragments; verifies generated frames; writes pcap; counts (in a cell the
/// receive loop's stop condition can read while the sink is borrowed).
pub struct FrameSink<'a> {
    pub verify: Option<FrameVerifier>,
    pub pcap: Option<traffic::pcap::PcapWriter<BufWriter<std::fs::File>>>,
    pub frames: &'a std::cell::Cell<u64>,
    pub corrupted: u64,
    pub first_error: Option<String>,
    frame: Vec<u8>,
}

impl<'a> FrameSink<'a> {
    pub fn new(
        verify: Option<FrameVerifier>,
        pcap: Option<traffic::pcap::PcapWriter<BufWriter<std::fs::File>>>,
        frames: &'a std::cell::Cell<u64>,
    ) -> Self {
        Self { verify, pcap, frames, corrupted: 0, first_error: None, frame: Vec::with_capacity(65536) }
    }

    #[inline]
    fn whole(&mut self, frame: &[u8]) -> Result<(), String> {
        let n = self.frames.get() + 1;
        self.frames.set(n);
        if let Some(v) = self.verify.as_mut() {
            if let Err(e) = v.check(frame) {
                self.corrupted += 1;
                self.first_error.get_or_insert_with(|| format!("frame {n}: {e}"));
            }
        }
        if let Some(w) = self.pcap.as_mut() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            w.write_frame(frame, now).map_err(|e| format!("pcap: {e}"))?;
        }
        Ok(())
    }
}

impl Sink for FrameSink<'_> {
    fn data(&mut self, bytes: &[u8], c: &Cqe) -> Result<(), String> {
        if self.frame.is_empty() && !c.is_continued() {
            // The common case: a whole frame in one buffer, checked in place.
            return self.whole(bytes);
        }
        self.frame.extend_from_slice(bytes);
        if c.is_continued() {
            return Ok(());
        }
        let f = std::mem::take(&mut self.frame);
        let r = self.whole(&f);
        self.frame = f;
        self.frame.clear();
        r
    }
}

/// Receive frames zero-copy from the device behind `transport` until `count` frames, the
/// deadline, or Ctrl-C. Returns the run and its duration in seconds.
#[allow(clippy::too_many_arguments)] // the registration (3), the sink, the stop conditions (2), progress
pub fn receive_device(
    transport: Box<dyn driver::transport::Transport>,
    reg: zcrx::IfqReg,
    area: zcrx::AreaReg,
    cfg: driver::NetConfig,
    sink: &mut FrameSink<'_>,
    count: Option<u64>,
    deadline: Option<std::time::Instant>,
    progress: &mut dyn FnMut(u64),
) -> Result<(crate::receive::RunStats, f64), String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let device = transport.describe();
    let (rx, user) = driver::register_ifq(transport, reg, area, cfg).map_err(|e| e.to_string())?;
    tracing::info!("receiving zero-copy from {device}");
    if crate::frames::ANNOUNCE.load(Ordering::Relaxed) {
        eprintln!("zcrx: receiving zero-copy from {device}");
    }
    let stop = AtomicBool::new(false);
    let frames = sink.frames;
    let start = std::time::Instant::now();
    let mut check = |b: u64| {
        progress(b);
        let now_done = count.is_some_and(|c| frames.get() >= c)
            || crate::rx::stopped()
            || deadline.is_some_and(|d| std::time::Instant::now() >= d);
        if now_done {
            stop.store(true, Ordering::Relaxed);
        }
    };
    let run = crate::receive::run_inline(Box::new(DeviceSide::new(rx)), user, sink, &mut check, &stop)?;
    Ok((run, start.elapsed().as_secs_f64()))
}

/// The transport to the vhost-user backend listening at `path`.
pub fn vhost_user(path: &std::path::Path) -> Result<Box<dyn driver::transport::Transport>, String> {
    Ok(Box::new(driver::transport::vhost_user::VhostUser::connect(path).map_err(|e| e.to_string())?))
}
