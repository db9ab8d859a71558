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
    #[command(flatten)]
    pub ifq: IfqArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

const VARIANTS: [&str; 4] = ["read-64k", "read-cycle", "nodev-readv", "nodev-uring"];
/// Baseline read size: the usual 64 KiB.
const READ_LEN: usize = 64 << 10;

pub fn run(cmd: &BenchCmd) -> Result<(), String> {
    match cmd {
        BenchCmd::Copy(a) => copy(a),
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
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let bar = crate::progress::bytes_bar(a.bytes * a.runs as u64 * VARIANTS.len() as u64, a.json);
    for _ in 0..a.runs {
        for (v, name) in VARIANTS.iter().enumerate() {
            let s = one_run(a, name)?;
            secs[v].push(s);
            bar.inc(a.bytes);
        }
    }
    bar.finish_and_clear();
    let med: Vec<f64> = secs.iter().map(|s| median(s)).collect();
    let gbps: Vec<f64> = med.iter().map(|s| a.bytes as f64 * 8.0 / s / 1e9).collect();
    let best_base = gbps[0].max(gbps[1]);
    let ratios = json!({
        "nodev_readv_vs_read_cycle": gbps[2] / gbps[1],
        "nodev_uring_vs_best_baseline": gbps[3] / best_base,
        "nodev_uring_vs_nodev_readv": gbps[3] / gbps[2],
    });
    if a.json {
        let variants: Vec<_> = VARIANTS
            .iter()
            .enumerate()
            .map(|(v, n)| json!({"name": n, "median_gbit_per_s": gbps[v], "seconds": secs[v]}))
            .collect();
        println!(
            "{}",
            json!({"bench": "copy", "bytes": a.bytes, "write_size": a.write_size, "runs": a.runs,
                   "rx_buf_len": a.ifq.rx_buf_len, "area_size": a.ifq.area_size,
                   "variants": variants, "ratios": ratios})
        );
    } else {
        println!("zcrx bench copy: {} bytes per run, {}-byte writes, {} interleaved runs each, medians", a.bytes, a.write_size, a.runs);
        for (v, n) in VARIANTS.iter().enumerate() {
            let (lo, hi) = min_max(&secs[v]);
            println!("  {n:<12} {:>7.2} Gbit/s   (runs {:.2}..{:.2})", gbps[v], a.bytes as f64 * 8.0 / hi / 1e9, a.bytes as f64 * 8.0 / lo / 1e9);
        }
        println!("  ratio nodev-readv / read-cycle         {:.3}", gbps[2] / gbps[1]);
        println!("  ratio nodev-uring / best baseline      {:.3}", gbps[3] / best_base);
        println!("  ratio nodev-uring / nodev-readv        {:.3}", gbps[3] / gbps[2]);
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// One run of one variant: seconds from the accepted connection to end of stream.
fn one_run(a: &CopyBenchArgs, variant: &str) -> Result<f64, String> {
    // Everything the receiver needs is set up before the sender starts.
    let mut cycle = None;
    let mut ifq = None;
    match variant {
        "read-cycle" => {
            let len = (a.ifq.area_size as usize).max(READ_LEN) / READ_LEN * READ_LEN;
            cycle = Some(zcrx::mem::Mapping::anonymous(len, true).map_err(|e| format!("baseline buffers: {e}"))?);
        }
        "nodev-readv" | "nodev-uring" => {
            let (reg, area) = a.ifq.reg()?;
            ifq = Some(Ifq::register(reg, area, None).map_err(|e| e.to_string())?);
        }
        _ => {}
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let tx = sender::spawn_tcp(addr, a.bytes, a.write_size as usize, Payload::Repeat);
    let (mut sock, _): (TcpStream, _) = l.accept().map_err(|e| e.to_string())?;
    let start = Instant::now();
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
            receive::run_inline(ifq, user, &mut |q| q.copy_stream(sock.as_fd(), &limits), &mut Discard, &mut |_| {}, &stop)?.bytes
        }
        "nodev-uring" => {
            let (ifq, user) = ifq.take().expect("set up above");
            let mut uc = UringCopy::new(&ifq, sock.as_fd(), SocketKind::Stream, 4096).map_err(|e| e.to_string())?;
            let stop = AtomicBool::new(false);
            receive::run_inline(ifq, user, &mut |q| uc.fill(q, true), &mut Discard, &mut |_| {}, &stop)?.bytes
        }
        _ => unreachable!("unknown variant"),
    };
    let secs = start.elapsed().as_secs_f64();
    let sent = tx.join().map_err(|_| "sender panicked".to_string())?.map_err(|e| format!("sender: {e}"))?;
    if got != sent {
        return Err(format!("{variant}: sent {sent} bytes but received {got}"));
    }
    Ok(secs)
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
