//! `zcrx bench copy`: every NODEV receive method against plain read() baselines, same sender,
//! interleaved runs, medians and ratios from the same invocation (these machines are noisy).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;
use zcrx::copy::UringCopy;
use zcrx::uring::SocketKind;
use zcrx::{CopyLimits, Ifq};

use crate::opts::{parse_size, IfqArgs};
use crate::receive::{self, Discard};
use crate::sender::{self, Payload};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// NODEV copy mode (read loop, io_uring bundles) against read() baselines over loopback TCP.
    Copy(CopyBenchArgs),
    /// Zero-copy receive over vhost-user: our driver from our backend and from DPDK's testpmd,
    /// against testpmd's own virtio_user receiver (the anchor). Needs dpdk-testpmd.
    VhostUser(VhostBenchArgs),
    /// Inside a guest (`zcrx vm --bench` runs it): zero copy against copy mode on the same
    /// virtio-net function over VFIO, interleaved phases, frames per wall- and CPU-second.
    Vfio(crate::bench_vfio::VfioBenchArgs),
}

#[derive(Args, Debug)]
pub struct VhostBenchArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Runs of each variant and size (interleaved).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Frame sizes (without FCS).
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    pub sizes: Vec<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CopyBenchArgs {
    /// Bytes per run.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,
    /// Size of each write by the sender.
    #[arg(long, default_value = "1500", value_parser = parse_size)]
    pub write_size: u64,
    /// Runs of each variant (interleaved: A B C D A B C D ...).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Run only these variants (comma separated; for profiling one path). Ratios need all.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(VARIANTS))]
    pub only: Vec<String>,
    #[command(flatten)]
    pub ifq: IfqArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `nodev-uring` arms a one-shot recv bundle per poll, `nodev-uring-ms` one multishot recv
/// bundle for the whole stream (see `zcrx::uring` for why the first is faster).
const VARIANTS: [&str; 5] = ["read-64k", "read-cycle", "nodev-readv", "nodev-uring", "nodev-uring-ms"];
/// Baseline read size: the usual 64 KiB.
const READ_LEN: usize = 64 << 10;

pub fn run(cmd: &BenchCmd) -> Result<(), String> {
    match cmd {
        BenchCmd::Copy(a) => copy(a),
        BenchCmd::VhostUser(a) => crate::bench_vhost::run(a),
        BenchCmd::Vfio(a) => crate::bench_vfio::run(a),
    }
}

fn copy(a: &CopyBenchArgs) -> Result<(), String> {
    if a.runs == 0 || a.bytes == 0 {
        return Err("--runs and --bytes must be positive".into());
    }
    if a.write_size == 0 || a.write_size > 64 << 20 {
        return Err(format!("--write-size must be between 1 and 64M, got {}", a.write_size));
    }
    a.ifq.reg()?;
    let chosen: Vec<usize> =
        (0..VARIANTS.len()).filter(|&v| a.only.is_empty() || a.only.iter().any(|o| o == VARIANTS[v])).collect();
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    let bar = crate::progress::bytes_bar(a.bytes * a.runs as u64 * chosen.len() as u64, a.json);
    for _ in 0..a.runs {
        for &v in &chosen {
            runs[v].push(one_run(a, VARIANTS[v])?);
            bar.inc(a.bytes);
        }
    }
    bar.finish_and_clear();
    let gib = a.bytes as f64 / (1u64 << 30) as f64;
    // Per variant: median Gbit/s, and the receiving thread's CPU seconds per GiB (its own cost).
    let gbps: Vec<f64> = runs.iter().map(|r| median(r.iter().map(|r| a.bytes as f64 * 8.0 / r.secs / 1e9))).collect();
    let cpu: Vec<f64> = runs.iter().map(|r| median(r.iter().map(|r| r.cpu_secs / gib))).collect();
    let ratio = |x: f64, y: f64| if x.is_finite() && y.is_finite() { x / y } else { f64::NAN };
    let best = gbps[0].max(gbps[1]);
    let ratios = [
        ("nodev_readv_vs_read_cycle", ratio(gbps[2], gbps[1]), ratio(cpu[1], cpu[2])),
        ("nodev_uring_vs_best_baseline", ratio(gbps[3], best), ratio(cpu[0].min(cpu[1]), cpu[3])),
        ("nodev_uring_vs_nodev_readv", ratio(gbps[3], gbps[2]), ratio(cpu[2], cpu[3])),
        ("nodev_uring_ms_vs_best_baseline", ratio(gbps[4], best), ratio(cpu[0].min(cpu[1]), cpu[4])),
    ];
    if a.json {
        let variants: Vec<_> = chosen
            .iter()
            .map(|&v| {
                json!({"name": VARIANTS[v], "median_gbit_per_s": gbps[v], "median_cpu_s_per_gib": cpu[v],
                       "seconds": runs[v].iter().map(|r| r.secs).collect::<Vec<_>>(),
                       "cpu_seconds": runs[v].iter().map(|r| r.cpu_secs).collect::<Vec<_>>()})
            })
            .collect();
        let ratios: serde_json::Map<_, _> = ratios
            .iter()
            .map(|(n, t, c)| (n.to_string(), json!({"throughput": t, "cpu_efficiency": c})))
            .collect();
        println!(
            "{}",
            json!({"bench": "copy", "bytes": a.bytes, "write_size": a.write_size, "runs": a.runs,
                   "rx_buf_len": a.ifq.rx_buf_len, "area_size": a.ifq.area_size,
                   "variants": variants, "ratios": ratios})
        );
    } else {
        println!(
            "zcrx bench copy: {} bytes per run, {}-byte writes, {} interleaved runs each, medians",
            a.bytes, a.write_size, a.runs
        );
        println!("  {:<14} {:>10} {:>18}   Gbit/s of each run", "variant", "Gbit/s", "rx CPU s/GiB");
        for &v in &chosen {
            let each: Vec<String> =
                runs[v].iter().map(|r| format!("{:.2}", a.bytes as f64 * 8.0 / r.secs / 1e9)).collect();
            println!("  {:<14} {:>10.2} {:>18.3}   {}", VARIANTS[v], gbps[v], cpu[v], each.join(" "));
        }
        println!("  ratios (throughput, receiver CPU efficiency; > 1: the first is better):");
        for (n, t, c) in ratios {
            if t.is_finite() {
                println!("    {n:<30} {t:.3}  {c:.3}");
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
struct Run {
    secs: f64,
    /// CPU time of the receiving thread (user + system, including the kernel's copy).
    cpu_secs: f64,
}

fn median(it: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = it.collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn thread_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// One run of one variant: seconds from the accepted connection to end of stream.
fn one_run(a: &CopyBenchArgs, variant: &str) -> Result<Run, String> {
    // Everything the receiver needs is set up before the sender starts.
    let mut cycle = None;
    let mut ifq = None;
    match variant {
        "read-cycle" => {
            let len = (a.ifq.area_size as usize).max(READ_LEN) / READ_LEN * READ_LEN;
            cycle = Some(zcrx::mem::Mapping::anonymous(len, true).map_err(|e| format!("baseline buffers: {e}"))?);
        }
        "nodev-readv" | "nodev-uring" | "nodev-uring-ms" => {
            let (reg, area) = a.ifq.reg()?;
            ifq = Some(Ifq::register(reg, area, None).map_err(|e| e.to_string())?);
        }
        _ => {}
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    // Receiver on core 0, sender on core 1, as in `bench vhost-user`.
    sender::pin_to(0);
    let tx = sender::spawn_tcp_on(addr, a.bytes, a.write_size as usize, Payload::Repeat, Some(1));
    let (mut sock, _): (TcpStream, _) = l.accept().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let cpu0 = thread_cpu_secs();
    let got = match variant {
        "read-64k" => {
            let mut buf = vec![0u8; READ_LEN];
            read_all(&mut sock, |s| s.read(&mut buf))?
        }
        "read-cycle" => {
            let m = cycle.as_ref().expect("set up above");
            let pieces = m.len() / READ_LEN;
            let mut k = 0;
            read_all(&mut sock, |s| {
                // SAFETY: piece k lies inside the mapping, which outlives this closure; only
                // this thread touches it.
                let b = unsafe { std::slice::from_raw_parts_mut(m.ptr().as_ptr().add(k * READ_LEN), READ_LEN) };
                k = (k + 1) % pieces;
                s.read(b)
            })?
        }
        "nodev-readv" => {
            let (ifq, user) = ifq.take().expect("set up above");
            let limits = CopyLimits { max_bufs: (READ_LEN / a.ifq.rx_buf_len as usize).max(1), ..Default::default() };
            let stop = AtomicBool::new(false);
            receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| q.copy_stream(sock.as_fd(), &limits) }), user, &mut Discard, &mut |_| {}, &stop)?.bytes
        }
        "nodev-uring" | "nodev-uring-ms" => {
            let (ifq, user) = ifq.take().expect("set up above");
            let mut uc = UringCopy::new(&ifq, sock.as_fd(), SocketKind::Stream, 4096).map_err(|e| e.to_string())?;
            uc.set_stream_multishot(variant == "nodev-uring-ms");
            let stop = AtomicBool::new(false);
            receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| uc.fill(q, true) }), user, &mut Discard, &mut |_| {}, &stop)?.bytes
        }
        _ => unreachable!("unknown variant"),
    };
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = thread_cpu_secs() - cpu0;
    let sent = tx.join().map_err(|_| "sender panicked".to_string())?.map_err(|e| format!("sender: {e}"))?;
    if got != sent {
        return Err(format!("{variant}: sent {sent} bytes but received {got}"));
    }
    Ok(Run { secs, cpu_secs })
}

fn read_all(sock: &mut TcpStream, mut read: impl FnMut(&mut TcpStream) -> std::io::Result<usize>) -> Result<u64, String> {
    let mut got = 0u64;
    loop {
        match read(sock) {
            Ok(0) => return Ok(got),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
