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
}

impl DeviceSide {
    pub fn new(rx: NetRx) -> Self {
        Self { rx, gone: false, reconnects: 0 }
    }
}

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
            Ok(p) => Ok(if p.completions != 0 { Step::Data } else { Step::Idle }),
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
    fn finish(self: Box<Self>) -> IfqStats {
        self.rx.close()
    }
}

/// Joins a frame's fragments; verifies generated frames; writes pcap; counts.
pub struct FrameSink {
    pub verify: Option<FrameVerifier>,
    pub pcap: Option<traffic::pcap::PcapWriter<BufWriter<std::fs::File>>>,
    pub frames: u64,
    pub corrupted: u64,
    pub first_error: Option<String>,
    frame: Vec<u8>,
}

impl FrameSink {
    pub fn new(verify: Option<FrameVerifier>, pcap: Option<traffic::pcap::PcapWriter<BufWriter<std::fs::File>>>) -> Self {
        Self { verify, pcap, frames: 0, corrupted: 0, first_error: None, frame: Vec::with_capacity(65536) }
    }

    fn whole(&mut self, frame: &[u8]) -> Result<(), String> {
        self.frames += 1;
        if let Some(v) = self.verify.as_mut() {
            if let Err(e) = v.check(frame) {
                self.corrupted += 1;
                self.first_error.get_or_insert_with(|| format!("frame {}: {e}", self.frames));
            }
        }
        if let Some(w) = self.pcap.as_mut() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            w.write_frame(frame, now).map_err(|e| format!("pcap: {e}"))?;
        }
        Ok(())
    }
}

impl Sink for FrameSink {
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
