//! `zcrx demo`: the whole NODEV receive path on loopback, verified byte for byte. Needs no NIC,
//! no VM and no setup.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde_json::json;
use traffic::StreamVerifier;
use zcrx::copy::UringCopy;
use zcrx::uring::SocketKind;
use zcrx::{CopyLimits, Cqe, Ifq};

use crate::opts::{parse_size, IfqArgs, Method};
use crate::receive::{self, RunStats, Sink};
use crate::sender::{self, Payload};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Bytes to stream.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,
    /// Size of each write by the sender.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub write_size: u64,
    /// How the receive side reads the socket.
    #[arg(long, value_enum, default_value_t = Method::Uring)]
    pub method: Method,
    /// Run the receive side on its own thread (default: the application thread polls both).
    #[arg(long)]
    pub threaded: bool,
    /// Frames for the zero-copy part (our backend generates them, our driver receives).
    #[arg(long, default_value_t = 1_000_000)]
    pub frames: u64,
    /// Only the NODEV copy part.
    #[arg(long)]
    pub skip_zero_copy: bool,
    #[command(flatten)]
    pub ifq: IfqArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct Verify(StreamVerifier);

impl Sink for Verify {
    fn data(&mut self, bytes: &[u8], _: &Cqe) -> Result<(), String> {
        self.0.feed(bytes).map_err(|m| format!("verification failed: {m}"))
    }
}

pub fn run(a: &DemoArgs) -> Result<(), String> {
    const SEED: u64 = 0x7a63_7278;
    const RECORD: usize = 1024;
    if a.write_size == 0 || a.write_size > 64 << 20 {
        return Err(format!("--write-size must be between 1 and 64M, got {}", a.write_size));
    }
    let (reg, area) = a.ifq.reg()?;
    let (ifq, user) = Ifq::register(reg, area, None).map_err(|e| e.to_string())?;

    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tx = sender::spawn_tcp(addr, a.bytes, a.write_size as usize, Payload::Stream { seed: SEED, record_len: RECORD });
    let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;

    let bar = crate::progress::bytes_bar(a.bytes, a.json);
    let mut sink = Verify(StreamVerifier::new(SEED, RECORD).map_err(|e| e.to_string())?);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut progress = |b: u64| bar.set_position(b);
    let run: RunStats = match (a.method, a.threaded) {
        (Method::Readv, false) => {
            let limits = CopyLimits::default();
            receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| q.copy_stream(sock.as_fd(), &limits) }), user, &mut sink, &mut progress, &stop)?
        }
        (Method::Readv, true) => {
            let limits = CopyLimits::default();
            let s = sock.try_clone().map_err(|e| e.to_string())?;
            receive::run_threaded(Box::new(receive::CopySide { ifq, fill: move |q: &mut Ifq| q.copy_stream(s.as_fd(), &limits) }), user, &mut sink, &mut progress, stop)?
        }
        (Method::Uring, false) => {
            let mut uc = UringCopy::new(&ifq, sock.as_fd(), SocketKind::Stream, 4096).map_err(|e| e.to_string())?;
            receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| uc.fill(q, true) }), user, &mut sink, &mut progress, &stop)?
        }
        (Method::Uring, true) => {
            let mut uc = UringCopy::new(&ifq, sock.as_fd(), SocketKind::Stream, 4096).map_err(|e| e.to_string())?;
            receive::run_threaded(Box::new(receive::CopySide { ifq, fill: move |q: &mut Ifq| uc.fill(q, true) }), user, &mut sink, &mut progress, stop)?
        }
    };
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let sent = tx.join().map_err(|_| "sender panicked".to_string())?.map_err(|e| format!("sender: {e}"))?;
    let summary = sink.0.finish().map_err(|m| format!("verification failed: {m}"))?;
    if summary.bytes != sent {
        return Err(format!("verification failed: sent {sent} bytes, received {}", summary.bytes));
    }
    let gbps = run.bytes as f64 * 8.0 / secs / 1e9;
    let s = run.stats;
    let zc = if a.skip_zero_copy { None } else { Some(zero_copy(a)?) };
    if a.json {
        println!(
            "{}",
            json!({
                "zero_copy": zc,
                "mode": "nodev-copy", "method": a.method.name(), "threaded": a.threaded,
                "bytes": run.bytes, "seconds": secs, "gbit_per_s": gbps,
                "completions": run.completions, "records": summary.records, "verified": true,
                "copy_count": s.copy_count, "copy_bytes": s.copy_bytes, "invalid_rqes": s.invalid_rqes,
                "no_buffer": s.no_buffer, "cq_full": s.cq_full, "refilled": s.refilled,
                "rx_buf_len": a.ifq.rx_buf_len, "area_size": a.ifq.area_size,
            })
        );
    } else {
        println!("zcrx demo: NODEV copy mode over loopback TCP ({} receive{})", a.method.name(), if a.threaded { ", receive thread" } else { "" });
        println!("  received  {} bytes in {:.2} s: {:.2} Gbit/s", run.bytes, secs, gbps);
        println!("  verified  {} records, every byte checked: OK", summary.records);
        println!(
            "  copy      copy_count {} copy_bytes {} | refilled {} invalid_rqes {} no_buffer {} cq_full {}",
            s.copy_count, s.copy_bytes, s.refilled, s.invalid_rqes, s.no_buffer, s.cq_full
        );
        if let Some(z) = zc {
            println!("zcrx demo: zero copy through our virtio-net driver, vhost-user, from our backend");
            println!(
                "  received  {} frames, {} bytes in {:.2} s: {:.2} Mpps, {:.2} Gbit/s",
                z["frames"], z["bytes"], z["seconds"].as_f64().unwrap_or(0.0),
                z["mpps"].as_f64().unwrap_or(0.0), z["gbit_per_s"].as_f64().unwrap_or(0.0)
            );
            println!("  verified  {} frames, sequence and checksum: OK", z["verified"]);
            println!("  buffers   zc_count {} zc_bytes {} copy_count {}", z["zc_count"], z["zc_bytes"], z["copy_count"]);
        }
    }
    Ok(())
}

/// Our backend sends frames of at most MAX bytes: each fits one buffer.
fn net_config() -> driver::NetConfig {
    driver::NetConfig { max_frame: Some(MAX as u32), ..Default::default() }
}

const MAX: usize = 1514;

/// The same receive model with a device: our backend generates frames into the area.
fn zero_copy(a: &DemoArgs) -> Result<serde_json::Value, String> {
    const SEED: u64 = 7;
    const MIN: usize = 64;
    let sock = std::env::temp_dir().join(format!("zcrx-demo-{}.sock", std::process::id()));
    let mode = backend::Mode::Gen(backend::GenConfig {
        min_frame_len: MIN,
        max_frame_len: MAX,
        count: Some(a.frames),
        seed: SEED,
        ..Default::default()
    });
    let b = backend::start(backend::BackendConfig::new(&sock, mode)).map_err(|e| e.to_string())?;
    let (mut reg, mut area) = a.ifq.reg()?;
    reg.flags &= !zcrx::uapi::ZCRX_REG_NODEV;
    if a.ifq.memory.is_none() {
        if let zcrx::AreaSource::Allocate { kind, .. } = &mut area.memory {
            *kind = zcrx::MemoryKind::Memfd;
        }
    }
    let frames = std::cell::Cell::new(0);
    let verify = traffic::FrameVerifier::new(SEED, MIN, MAX).map_err(|e| e.to_string())?;
    let mut sink = crate::frames::FrameSink::new(Some(verify), None, &frames);
    let bar = crate::progress::bytes_bar(a.frames * (MIN + MAX) as u64 / 2, a.json);
    let deadline = Some(Instant::now() + std::time::Duration::from_secs(120));
    let (run, secs) = crate::frames::receive_device(crate::frames::vhost_user(&sock)?, reg, area, net_config(), &mut sink, Some(a.frames), deadline, &mut |b| bar.set_position(b))?;
    bar.finish_and_clear();
    let bs = b.stop();
    if let Some(e) = sink.first_error {
        return Err(format!("zero-copy verification failed: {e}"));
    }
    let v = sink.verify.as_ref().map(|v| v.stats()).unwrap_or_default();
    if frames.get() != a.frames || v.unique != a.frames || v.lost != 0 {
        return Err(format!("zero copy: the backend sent {} frames, {} arrived, {} verified, {} lost", bs.rx_frames, frames.get(), v.unique, v.lost));
    }
    let s = run.stats;
    Ok(json!({
        "mode": "vhost-user-zc", "frames": frames.get(), "bytes": run.bytes, "seconds": secs,
        "mpps": frames.get() as f64 / secs / 1e6, "gbit_per_s": run.bytes as f64 * 8.0 / secs / 1e9,
        "verified": v.unique, "zc_count": s.zc_count, "zc_bytes": s.zc_bytes, "copy_count": s.copy_count,
        "invalid_rqes": s.invalid_rqes,
    }))
}
