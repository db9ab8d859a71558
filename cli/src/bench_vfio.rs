//! `zcrx bench vfio`: zero copy against the copy fallback on the same device, over VFIO (run it
//! inside a guest whose virtio-net NIC is bound to vfio-pci; `zcrx vm --bench` does all of it).
//!
//! Phases are interleaved, A B A B ...: A = zero copy (the device writes into the area's
//! niovs), B = copy mode (`NetConfig::rx_copy`: the device writes into the driver's bounce
//! buffers, each fragment is copied into a niov). Each phase opens the function afresh and
//! registers a new ifq, announces itself on stderr (`zcrx: bench vfio phase K MODE receiving`),
//! and receives whatever arrives for `--seconds`, counting frames and bytes without looking at
//! them (like testpmd rxonly). The clock starts at the phase's first frame, so the open, the
//! device reset and the sender's reaction are not counted.
//!
//! Measured per phase: frames per second of wall time, frames per CPU-second of the receiving
//! thread (CLOCK_THREAD_CPUTIME_ID), and frames per busy CPU-second of that thread (the CPU
//! time of the polls that found data and the application's work on it, without idle polls). Under TCG the absolute numbers mean little; the ratio zero
//! copy / copy is the result. By default the receiver sleeps 50 µs after a poll that found
//! nothing, so its CPU time is the work it did rather than its wall time (`--idle-sleep-us 0`
//! spins). Output: one JSON object with every phase, the medians per mode and the ratios.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use zcrx::{AreaReg, IfqReg, MemoryKind};

use crate::frames::{DeviceSide, FrameSink};
use crate::opts::parse_size;
use crate::receive::{RxSide, Step};

/// The receiving thread's busy CPU time: from the start of each step that found data to the end
/// of the application's drain that follows it (the progress callback). Its work without idle
/// polls and naps.
#[derive(Default)]
struct Busy {
    since: Cell<Option<f64>>,
    total: Cell<f64>,
}

impl Busy {
    /// At the progress callback: close the open busy interval.
    fn end(&self) {
        if let Some(t0) = self.since.take() {
            self.total.set(self.total.get() + thread_cpu_secs() - t0);
        }
    }
}

/// The device side, sleeping after polls that found nothing (when `nap` is not zero), timing
/// the ones that did.
struct Napping<'a> {
    dev: DeviceSide,
    nap: Duration,
    busy: &'a Busy,
}

impl RxSide for Napping<'_> {
    fn step(&mut self) -> Result<Step, String> {
        let t0 = thread_cpu_secs();
        let s = self.dev.step()?;
        if s == Step::Data {
            if self.busy.since.get().is_none() {
                self.busy.since.set(Some(t0));
            }
        } else if !self.nap.is_zero() {
            std::thread::sleep(self.nap);
        }
        Ok(s)
    }
    fn serve_flush(&mut self) {
        self.dev.serve_flush();
    }
    fn finish(self: Box<Self>) -> (zcrx::IfqStats, Option<driver::NetStats>) {
        Box::new(self.dev).finish()
    }
}

#[derive(Args, Debug)]
pub struct VfioBenchArgs {
    /// The virtio-net PCI function bound to vfio-pci (e.g. 0000:00:02.0; `$ZCRX_NIC` in `zcrx vm`).
    #[arg(long, value_name = "BDF")]
    pub bdf: String,
    /// Seconds each phase receives (from its first frame).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Runs of each mode (interleaved: zero copy, copy, zero copy, copy, ...).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Area size per phase (K/M/G suffixes).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub area_size: u64,
    /// Give up on a phase when no frame arrived within this many seconds of its start.
    #[arg(long, default_value_t = 30.0)]
    pub first_frame_timeout: f64,
    /// Microseconds the receiver sleeps after a poll that found nothing; 0 spins like testpmd
    /// (then its CPU time is its wall time: frames per CPU-second only repeat the throughput,
    /// and under TCG the spinning vCPU takes host CPU from QEMU's device emulation).
    #[arg(long, default_value_t = 50)]
    pub idle_sleep_us: u64,
}

const MODES: [&str; 2] = ["zc", "copy"];

/// What one phase measured.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    frames: u64,
    bytes: u64,
    wall_s: f64,
    cpu_s: f64,
    busy_cpu_s: f64,
    stats: zcrx::IfqStats,
    dev: driver::NetStats,
}

impl Phase {
    fn fps_wall(&self) -> f64 {
        self.frames as f64 / self.wall_s
    }
    fn fps_cpu(&self) -> f64 {
        self.frames as f64 / self.cpu_s
    }
    fn fps_busy_cpu(&self) -> f64 {
        self.frames as f64 / self.busy_cpu_s
    }
}

pub fn run(a: &VfioBenchArgs) -> Result<(), String> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) || a.runs == 0 {
        return Err("--seconds and --runs must be positive".into());
    }
    if !(a.first_frame_timeout > 0.0 && a.first_frame_timeout.is_finite()) {
        return Err("--first-frame-timeout must be positive".into());
    }
    let mut phases: [Vec<Phase>; 2] = Default::default();
    let mut k = 0;
    for _ in 0..a.runs {
        for (m, name) in MODES.iter().enumerate() {
            let p = phase(a, k, m == 1).map_err(|e| format!("phase {k} ({name}): {e}"))?;
            eprintln!(
                "zcrx: bench vfio phase {k} {name} done: {} frames in {:.2} s, {:.0} frames/s, {:.0} per CPU-second, {:.0} per busy CPU-second",
                p.frames, p.wall_s, p.fps_wall(), p.fps_cpu(), p.fps_busy_cpu()
            );
            phases[m].push(p);
            k += 1;
        }
    }
    let med = |m: usize, f: fn(&Phase) -> f64| median(phases[m].iter().map(f));
    let (zc_wall, zc_cpu) = (med(0, Phase::fps_wall), med(0, Phase::fps_cpu));
    let (cp_wall, cp_cpu) = (med(1, Phase::fps_wall), med(1, Phase::fps_cpu));
    let (zc_busy, cp_busy) = (med(0, Phase::fps_busy_cpu), med(1, Phase::fps_busy_cpu));
    let each: Vec<_> = (0..a.runs as usize)
        .flat_map(|r| (0..2).map(move |m| (r, m)))
        .map(|(r, m)| {
            let p = &phases[m][r];
            json!({
                "phase": 2 * r + m, "mode": MODES[m], "run": r,
                "frames": p.frames, "bytes": p.bytes, "wall_s": p.wall_s, "cpu_s": p.cpu_s,
                "busy_cpu_s": p.busy_cpu_s,
                "fps_wall": p.fps_wall(), "fps_cpu": p.fps_cpu(), "fps_busy_cpu": p.fps_busy_cpu(),
                "zc_count": p.stats.zc_count, "zc_bytes": p.stats.zc_bytes,
                "copy_count": p.stats.copy_count, "copy_bytes": p.stats.copy_bytes,
                "device_errors": p.dev.device_errors,
                "idle_poll_fraction": p.dev.rx_empty_polls as f64 / p.dev.rx_polls.max(1) as f64,
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "bench": "vfio", "bdf": a.bdf, "seconds": a.seconds, "runs": a.runs, "idle_sleep_us": a.idle_sleep_us,
            "phases": each,
            "median": {
                "zc": {"fps_wall": zc_wall, "fps_cpu": zc_cpu, "fps_busy_cpu": zc_busy},
                "copy": {"fps_wall": cp_wall, "fps_cpu": cp_cpu, "fps_busy_cpu": cp_busy},
            },
            "ratio_zc_vs_copy": {"fps_wall": zc_wall / cp_wall, "fps_cpu": zc_cpu / cp_cpu, "fps_busy_cpu": zc_busy / cp_busy},
        })
    );
    Ok(())
}

/// One phase: open the function, register an ifq (zero copy or copy mode), receive.
fn phase(a: &VfioBenchArgs, k: usize, copy: bool) -> Result<Phase, String> {
    let transport = driver::transport::vfio_pci::VfioPci::open(&a.bdf).map_err(|e| e.to_string())?;
    let area_len = usize::try_from(a.area_size).map_err(|_| "--area-size too large".to_string())?;
    let reg = IfqReg { flags: 0, rq_entries: 4096, rx_buf_len: 4096, ..IfqReg::default() };
    let area = AreaReg::new(MemoryKind::Anonymous, area_len);
    let cfg = driver::NetConfig { rx_copy: copy, ..driver::NetConfig::default() };
    let (rx, user) = driver::register_ifq(Box::new(transport), reg, area, cfg).map_err(|e| e.to_string())?;
    // Buffers are posted: frames sent from now on are received (the host waits for this line).
    eprintln!("zcrx: bench vfio phase {k} {} receiving", MODES[copy as usize]);

    let frames = Cell::new(0u64);
    let mut sink = FrameSink::new(None, None, &frames);
    let stop = AtomicBool::new(false);
    let opened = Instant::now();
    let give_up = opened + Duration::from_secs_f64(a.first_frame_timeout);
    let secs = Duration::from_secs_f64(a.seconds);
    // (wall, thread CPU seconds, frames, bytes) at the first frame and at the end.
    let first: Cell<Option<(Instant, f64, u64, u64)>> = Cell::new(None);
    let last: Cell<Option<(Instant, f64, u64, u64)>> = Cell::new(None);
    let busy = Busy::default();
    let mut check = |bytes: u64| {
        busy.end();
        let now = Instant::now();
        match first.get() {
            None if frames.get() > 0 => {
                first.set(Some((now, thread_cpu_secs(), frames.get(), bytes)));
                busy.total.set(0.0);
            }
            None if now >= give_up => stop.store(true, Ordering::Relaxed),
            Some((t0, ..)) if now - t0 >= secs => {
                last.set(Some((now, thread_cpu_secs(), frames.get(), bytes)));
                stop.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    };
    let side = Napping { dev: DeviceSide::new(rx), nap: Duration::from_micros(a.idle_sleep_us), busy: &busy };
    let run = crate::receive::run_inline(Box::new(side), user, &mut sink, &mut check, &stop)?;
    let (Some(f), Some(l)) = (first.get(), last.get()) else {
        return Err(format!("no frame arrived within {} s", a.first_frame_timeout));
    };
    Ok(Phase {
        frames: l.2 - f.2,
        bytes: l.3 - f.3,
        wall_s: (l.0 - f.0).as_secs_f64(),
        cpu_s: l.1 - f.1,
        busy_cpu_s: busy.total.get(),
        stats: run.stats,
        dev: run.device.unwrap_or_default(),
    })
}

/// CPU time of the calling thread (user + system).
fn thread_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn median(it: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = it.filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}
