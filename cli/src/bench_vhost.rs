//! `zcrx bench vhost-user`: who is the faster zero-copy receiver over vhost-user?
//!
//! - `ours<-ours`:    our driver receiving from our backend generating every frame;
//! - `ours<-ours-tpl`: the same with the backend cycling 256 pre-built frames, the kind of work
//!   testpmd txonly does (it sends one template);
//! - `ours<-testpmd`: our driver receiving from testpmd `net_vhost` txonly;
//! - `anchor`:        testpmd `net_virtio_user` rxonly receiving from testpmd `net_vhost` txonly;
//! - `anchor-nomrg`:  the same with `mrg_rxbuf=0`.
//!
//! Our receiver is told the peers' MTU (1500), so it negotiates no MRG_RXBUF, as `zcrx rx --mtu
//! 1500` does; `anchor-nomrg` shows DPDK's receiver gains nothing from the same setting.
//! Cores as the anchor's: the sender forwards on core 1, the receiver runs on core 0.
//! Variants are interleaved (A B C A B C ...); medians of Mpps, and the median over rounds of
//! each round's ratio to the anchor.

use std::time::{Duration, Instant};

use serde_json::json;
use traffic::testpmd::Testpmd;

use crate::bench::VhostBenchArgs;

const VARIANTS: [&str; 5] = ["ours<-ours", "ours<-ours-tpl", "ours<-testpmd", "anchor", "anchor-nomrg"];
/// Index of the anchor in [`VARIANTS`].
const ANCHOR: usize = 3;

#[derive(Clone, Copy, Debug)]
struct Run {
    mpps: f64,
    gbps: f64,
    /// Fraction of our receiver's polls that found nothing (None for the anchor).
    idle: Option<f64>,
}

pub fn run(a: &VhostBenchArgs) -> Result<(), String> {
    if !traffic::testpmd::available() {
        return Err("dpdk-testpmd is not installed (run ci/install-dpdk.sh)".into());
    }
    if !(a.seconds > 0.0 && a.seconds.is_finite()) || a.runs == 0 {
        return Err("--seconds and --runs must be positive".into());
    }
    if let Some(&bad) = a.sizes.iter().find(|&&s| !(60..=1514).contains(&s)) {
        return Err(format!("frame size {bad} is outside 60..=1514"));
    }
    let mut runs = vec![vec![Vec::new(); VARIANTS.len()]; a.sizes.len()];
    let bar = crate::progress::bytes_bar((a.runs as usize * a.sizes.len() * VARIANTS.len()) as u64, a.json);
    for _ in 0..a.runs {
        for (k, &size) in a.sizes.iter().enumerate() {
            for (v, name) in VARIANTS.iter().enumerate() {
                let r = match *name {
                    "ours<-ours" => ours_from_ours(size, a.seconds, None)?,
                    "ours<-ours-tpl" => ours_from_ours(size, a.seconds, Some(256))?,
                    "ours<-testpmd" => ours_from_testpmd(size, a.seconds)?,
                    "anchor" => anchor(size, a.seconds, true)?,
                    _ => anchor(size, a.seconds, false)?,
                };
                runs[k][v].push(r);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let med = |rs: &[Run], f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        let mut v: Vec<f64> = rs.iter().filter_map(f).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|x, y| x.total_cmp(y));
        Some(v[v.len() / 2])
    };
    let mut out = Vec::new();
    for (k, &size) in a.sizes.iter().enumerate() {
        for (v, name) in VARIANTS.iter().enumerate() {
            let rs = &runs[k][v];
            let mpps = med(rs, &|r| Some(r.mpps)).unwrap_or(f64::NAN);
            // The machine's speed swings 2-3x over minutes: ratios within a round (runs a few
            // seconds apart), then their median, are steadier than a ratio of medians.
            let ratios: Vec<Run> = rs
                .iter()
                .zip(&runs[k][ANCHOR])
                .map(|(r, a)| Run { mpps: r.mpps / a.mpps, gbps: 0.0, idle: None })
                .collect();
            let vs_anchor = med(&ratios, &|r| Some(r.mpps)).unwrap_or(f64::NAN);
            out.push(json!({
                "size": size, "variant": name, "median_mpps": mpps,
                "median_gbit_per_s": med(rs, &|r| Some(r.gbps)),
                "median_idle_poll_fraction": med(rs, &|r| r.idle),
                "vs_anchor": vs_anchor,
                "vs_anchor_runs": ratios.iter().map(|r| r.mpps).collect::<Vec<_>>(),
                "mpps_runs": rs.iter().map(|r| r.mpps).collect::<Vec<_>>(),
            }));
        }
    }
    if a.json {
        println!("{}", json!({"bench": "vhost-user", "seconds": a.seconds, "runs": a.runs, "results": out}));
    } else {
        println!("zcrx bench vhost-user: {} s per run, {} interleaved runs, medians; receiver on core 0, sender on core 1", a.seconds, a.runs);
        println!("  {:>5}  {:<14} {:>8} {:>9} {:>10} {:>10}   runs (Mpps)", "size", "variant", "Mpps", "Gbit/s", "vs anchor", "rx idle");
        for r in &out {
            let runs: Vec<String> = r["mpps_runs"].as_array().unwrap().iter().map(|x| format!("{:.2}", x.as_f64().unwrap())).collect();
            println!(
                "  {:>5}  {:<14} {:>8.2} {:>9.2} {:>10.2} {:>10}   {}",
                r["size"], r["variant"].as_str().unwrap(), r["median_mpps"].as_f64().unwrap(),
                r["median_gbit_per_s"].as_f64().unwrap_or(f64::NAN), r["vs_anchor"].as_f64().unwrap_or(f64::NAN),
                r["median_idle_poll_fraction"].as_f64().map_or("-".to_string(), |f| format!("{:.1}%", f * 100.0)),
                runs.join(" ")
            );
        }
    }
    Ok(())
}

fn sock(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("zcrx-bench-{tag}-{}.sock", std::process::id()))
}

use crate::sender::pin_to;

/// Our driver receiving (no verification, like testpmd rxonly) on core 0 for `secs`.
fn our_receiver(path: &std::path::Path, secs: f64) -> Result<Run, String> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        pin_to(0);
        let reg = zcrx::IfqReg { flags: 0, rq_entries: 4096, rx_buf_len: 4096, ..Default::default() };
        let area = zcrx::AreaReg::new(zcrx::MemoryKind::Memfd, 32 << 20);
        let frames = std::cell::Cell::new(0);
        let mut sink = crate::frames::FrameSink::new(None, None, &frames);
        let deadline = Some(Instant::now() + Duration::from_secs_f64(secs));
        let (run, t) = crate::frames::receive_device(crate::frames::vhost_user(&path)?, reg, area, crate::rx::net_config(Some(1500)), &mut sink, None, deadline, &mut |_| {})?;
        let dev = run.device.unwrap_or_default();
        Ok(Run {
            mpps: frames.get() as f64 / t / 1e6,
            // On the wire: frame + 4 FCS + 8 preamble + 12 gap, as testpmd reports it.
            gbps: (run.bytes + frames.get() * 24) as f64 * 8.0 / t / 1e9,
            idle: Some(dev.rx_empty_polls as f64 / dev.rx_polls.max(1) as f64),
        })
    })
    .join()
    .map_err(|_| "receiver panicked".to_string())?
}

fn ours_from_ours(size: usize, secs: f64, template: Option<usize>) -> Result<Run, String> {
    let path = sock("ours");
    let mode = backend::Mode::Gen(backend::GenConfig { min_frame_len: size, max_frame_len: size, template, ..Default::default() });
    let mut cfg = backend::BackendConfig::new(&path, mode);
    cfg.cpu = Some(1);
    let b = backend::start(cfg).map_err(|e| e.to_string())?;
    let r = our_receiver(&path, secs);
    b.stop();
    r
}

fn ours_from_testpmd(size: usize, secs: f64) -> Result<Run, String> {
    let path = sock("tp");
    let _ = std::fs::remove_file(&path);
    let txpkts = format!("--txpkts={size}");
    let mut tp = Testpmd::spawn_on(&format!("net_vhost0,iface={}", path.display()), "txonly", &[&txpkts], 0)
        .map_err(|e| e.to_string())?;
    tp.cmd("start").map_err(|e| e.to_string())?;
    our_receiver(&path, secs)
}

fn anchor(size: usize, secs: f64, mrg: bool) -> Result<Run, String> {
    let path = sock("anchor");
    let _ = std::fs::remove_file(&path);
    let txpkts = format!("--txpkts={size}");
    let mut tx = Testpmd::spawn_on(&format!("net_vhost0,iface={}", path.display()), "txonly", &[&txpkts], 0)
        .map_err(|e| e.to_string())?;
    let mut rx = Testpmd::spawn_on(&format!("net_virtio_user0,path={},queues=1,queue_size=1024,mrg_rxbuf={}", path.display(), mrg as u8), "rxonly", &[], 1)
        .map_err(|e| e.to_string())?;
    tx.cmd("start").map_err(|e| e.to_string())?;
    rx.cmd("start").map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let s0 = rx.port_stats().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1 = rx.port_stats().map_err(|e| e.to_string())?;
    let t = t0.elapsed().as_secs_f64();
    let frames = s1.rx_packets - s0.rx_packets;
    let bytes = s1.rx_bytes - s0.rx_bytes;
    Ok(Run { mpps: frames as f64 / t / 1e6, gbps: (bytes + frames * 24) as f64 * 8.0 / t / 1e9, idle: None })
}
