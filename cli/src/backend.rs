//! `zcrx backend`: our vhost-user-net backend, a software NIC for the driver, for DPDK's
//! virtio_user and for QEMU guests (without iommu_platform: vhost-user-backend has no IOTLB).

use std::time::{Duration, Instant};

use backend::{BackendConfig, GenConfig, Mode, SinkConfig};
use clap::{Args, ValueEnum};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Generate sequence-numbered, checksummed frames for the frontend.
    Gen,
    /// Count (and with --verify check) the frontend's frames.
    Sink,
    /// Send every frame back.
    Reflect,
    /// Bridge to a tap device (--tap NAME).
    Tap,
}

#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Unix socket to listen on.
    #[arg(long)]
    pub socket: std::path::PathBuf,
    #[arg(long, value_enum)]
    pub mode: ModeArg,
    /// Tap device name (tap mode).
    #[arg(long)]
    pub tap: Option<String>,
    /// Frame length (Ethernet header included, no FCS); sets both --min-frame and --max-frame.
    #[arg(long)]
    pub frame_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub min_frame: usize,
    #[arg(long, default_value_t = 64)]
    pub max_frame: usize,
    /// Frames per second (gen); unlimited by default.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Frames per connection (gen); endless by default.
    #[arg(long)]
    pub count: Option<u64>,
    /// Seed of the generated / verified frames.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Verify received frames (sink).
    #[arg(long)]
    pub verify: bool,
    /// Gen: build this many frames once and send them in a cycle (like testpmd txonly's
    /// template) instead of generating each; receivers then cannot verify sequences.
    #[arg(long)]
    pub template: Option<usize>,
    /// Largest queue size a frontend may choose.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Print one JSON object at the end instead of text.
    #[arg(long)]
    pub json: bool,
}

impl BackendArgs {
    pub fn config(&self) -> Result<BackendConfig, String> {
        let (min, max) = self.frame_len.map_or((self.min_frame, self.max_frame), |l| (l, l));
        let mode = match self.mode {
            ModeArg::Gen => Mode::Gen(GenConfig {
                min_frame_len: min,
                max_frame_len: max,
                rate: self.rate,
                count: self.count,
                seed: self.seed,
                template: self.template,
                ..GenConfig::default()
            }),
            ModeArg::Sink => Mode::Sink(SinkConfig { verify: self.verify, seed: self.seed, min_frame_len: min, max_frame_len: max }),
            ModeArg::Reflect => Mode::Reflect,
            ModeArg::Tap => Mode::Tap(self.tap.clone().ok_or("--mode tap needs --tap NAME")?),
        };
        if self.template.is_some() && self.mode != ModeArg::Gen {
            return Err("--template is for --mode gen".into());
        }
        if self.template == Some(0) {
            return Err("--template needs at least 1 frame".into());
        }
        if self.tap.is_some() && self.mode != ModeArg::Tap {
            return Err("--tap is for --mode tap".into());
        }
        let mut cfg = BackendConfig::new(&self.socket, mode);
        cfg.queue_size = self.queue_size;
        Ok(cfg)
    }
}

pub fn run(a: &BackendArgs) -> Result<(), String> {
    if let Some(d) = a.duration {
        if !(d > 0.0 && d.is_finite()) {
            return Err(format!("--duration must be a positive number of seconds, got {d}"));
        }
    }
    let cfg = a.config()?;
    let b = backend::start(cfg).map_err(|e| e.to_string())?;
    crate::rx::install_stop_handler();
    eprintln!("vhost-user-net backend on {} ({:?})", a.socket.display(), a.mode);
    let end = a.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    while !crate::rx::stopped() && end.is_none_or(|e| Instant::now() < e) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = b.stop();
    if a.json {
        println!(
            "{}",
            json!({
                "rx_frames": s.rx_frames, "rx_bytes": s.rx_bytes, "tx_frames": s.tx_frames, "tx_bytes": s.tx_bytes,
                "verified": s.verified, "corrupted": s.corrupted, "lost": s.lost, "reordered": s.reordered,
                "rx_dropped": s.rx_dropped, "bad_descriptors": s.bad_descriptors, "connections": s.connections,
                "last_error": s.last_error,
            })
        );
    } else {
        println!("{s:?}");
    }
    Ok(())
}
