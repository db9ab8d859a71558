//! Run the software NIC from the command line (manual tests, benchmarks).
//!
//! ```text
//! cargo run --release -p zcrx-backend --example nic -- SOCKET MODE [options]
//!   MODE: gen | sink | reflect | tap:IFNAME
//!   --len N | --len MIN-MAX   frame length(s) (default 64)
//!   --count N   --rate FPS   --seed S   --verify   --cpu C   --secs S (default: until Ctrl-C/EOF... 3600)
//!   --interval-ms MS          print a stats line this often (default 1000)
//! ```
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backend::{BackendConfig, GenConfig, Mode, SinkConfig};

static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    QUIT.store(true, Ordering::Relaxed);
}

fn main() {
    // Ctrl-C / SIGTERM: stop the backend cleanly (removes its sockets).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: nic SOCKET gen|sink|reflect|tap:IFNAME [--len N|MIN-MAX] [--count N] [--rate FPS] [--seed S] [--verify] [--cpu C] [--secs S] [--interval-ms MS]");
        std::process::exit(2);
    }
    let (
        mut min,
        mut max,
        mut count,
        mut rate,
        mut seed,
        mut verify,
        mut cpu,
        mut secs,
        mut interval,
    ) = (
        64usize, 64usize, None, None, 1u64, false, None, 3600u64, 1000u64,
    );
    let mut i = 2;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--len" => {
                if let Some((a, b)) = v.split_once('-') {
                    (min, max) = (a.parse().unwrap(), b.parse().unwrap());
                } else {
                    min = v.parse().unwrap();
                    max = min;
                }
                i += 1;
            }
            "--count" => {
                count = Some(v.parse().unwrap());
                i += 1;
            }
            "--rate" => {
                rate = Some(v.parse().unwrap());
                i += 1;
            }
            "--seed" => {
                seed = v.parse().unwrap();
                i += 1;
            }
            "--cpu" => {
                cpu = Some(v.parse().unwrap());
                i += 1;
            }
            "--secs" => {
                secs = v.parse().unwrap();
                i += 1;
            }
            "--interval-ms" => {
                interval = v.parse().unwrap();
                i += 1;
            }
            "--verify" => verify = true,
            o => panic!("unknown option {o}"),
        }
        i += 1;
    }
    let mode = match args[1].as_str() {
        "gen" => Mode::Gen(GenConfig {
            min_frame_len: min,
            max_frame_len: max,
            rate,
            count,
            seed,
            verify_tx: verify,
            ..Default::default()
        }),
        "sink" => Mode::Sink(SinkConfig {
            verify,
            seed,
            min_frame_len: min,
            max_frame_len: max,
        }),
        "reflect" => Mode::Reflect,
        t if t.starts_with("tap:") => Mode::Tap(t[4..].to_string()),
        m => panic!("unknown mode {m}"),
    };
    let mut cfg = BackendConfig::new(&args[0], mode);
    cfg.cpu = cpu;
    let b = backend::start(cfg).expect("start");
    println!("listening on {}", args[0]);
    let t0 = Instant::now();
    let mut last = b.stats();
    let mut lt = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) && !QUIT.load(Ordering::Relaxed) {
        let tick = Instant::now();
        while tick.elapsed() < Duration::from_millis(interval) && !QUIT.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = b.stats();
        let dt = lt.elapsed().as_secs_f64();
        let polls = (s.polls - last.polls).max(1);
        println!(
            "rx {:.3} Mpps ({} total) tx {:.3} Mpps ({} total) idle-polls {:.1}% verified {} corrupted {} lost {} \
             rx_dropped {} bad_desc {} notif {} sleeps {} conn {}{}",
            (s.rx_frames - last.rx_frames) as f64 / dt / 1e6,
            s.rx_frames,
            (s.tx_frames - last.tx_frames) as f64 / dt / 1e6,
            s.tx_frames,
            100.0 * (s.idle_polls - last.idle_polls) as f64 / polls as f64,
            s.verified,
            s.corrupted,
            s.lost,
            s.rx_dropped,
            s.bad_descriptors,
            s.notifications,
            s.sleeps,
            s.connected as u8,
            s.last_error
                .as_deref()
                .map(|e| format!(" last_error: {e}"))
                .unwrap_or_default()
        );
        last = s;
        lt = Instant::now();
    }
    let s = b.stop();
    println!("final: {s:?}");
}
