//! The `zcrx` command end to end: real processes, real sockets, exit codes and output.

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn zcrx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zcrx")).args(args).output().expect("run zcrx")
}

fn json(o: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}\nstderr: {}", String::from_utf8_lossy(&o.stderr)))
}

/// A failure is one clear line on stderr, a non-zero exit, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "more than one line: {err}");
}

#[test]
fn demo_verifies_every_byte_each_method() {
    for method in ["readv", "uring"] {
        for threaded in [false, true] {
            let mut args = vec!["demo", "--bytes", "24M", "--area-size", "4M", "--method", method, "--json", "--skip-zero-copy"];
            if threaded {
                args.push("--threaded");
            }
            let o = zcrx(&args);
            assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            let j = json(&o);
            assert_eq!(j["verified"], true);
            assert_eq!(j["bytes"], 24 << 20);
            assert_eq!(j["copy_bytes"], 24 << 20);
            assert_eq!(j["records"], (24 << 20) / 1024);
            assert_eq!(j["invalid_rqes"], 0);
            assert_eq!(j["threaded"], threaded);
        }
    }
}

#[test]
fn demo_zero_copy_part_verifies_every_frame() {
    let o = zcrx(&["demo", "--bytes", "4M", "--area-size", "4M", "--frames", "30000", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json(&o);
    let z = &j["zero_copy"];
    assert_eq!(z["frames"], 30000, "{j}");
    assert_eq!(z["verified"], 30000);
    assert_eq!(z["zc_count"], 30000, "one completion per frame: 1514-byte frames fit a 4 KiB buffer");
    assert_eq!(z["copy_count"], 0, "zero copy means no copy");
    assert_eq!(z["zc_bytes"], z["bytes"]);
}

#[test]
fn demo_text_output_has_the_figures() {
    let o = zcrx(&["demo", "--bytes", "8M", "--area-size", "1M", "--frames", "10000"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for needle in ["Gbit/s", "every byte checked: OK", "copy_count", "copy_bytes 8388608", "10000 frames", "Mpps", "zc_count 10000"] {
        assert!(s.contains(needle), "{needle:?} missing in {s}");
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    assert_clean_error(&zcrx(&["demo", "--rx-buf-len", "3000"]), "rx_buf_len 3000");
    assert_clean_error(&zcrx(&["demo", "--rx-buf-len", "1K"]), "rx_buf_len 1024");
    assert_clean_error(&zcrx(&["demo", "--area-size", "6K"]), "not a multiple of rx_buf_len");
    assert_clean_error(&zcrx(&["demo", "--rq-entries", "0"]), "rq_entries must not be 0");
    assert_clean_error(&zcrx(&["demo", "--rq-entries", "40000"]), "exceeds 32768");
    assert_clean_error(&zcrx(&["demo", "--write-size", "0"]), "--write-size");
    assert_clean_error(&zcrx(&["demo", "--memlock-limit", "1M", "--area-size", "8M"]), "locked memory limit too small");
    assert_clean_error(&zcrx(&["rx", "--listen", "127.0.0.1:0"]), "--nodev");
    assert_clean_error(&zcrx(&["rx", "--nodev"]), "--listen");
    assert_clean_error(&zcrx(&["rx", "--nodev", "--listen", "127.0.0.1:0", "--pcap", "/tmp/x.pcap"]), "--pcap needs --udp");
    assert_clean_error(&zcrx(&["rx", "--nodev", "--udp", "--listen", "127.0.0.1:0", "--duration=-1"]), "--duration");
    assert_clean_error(&zcrx(&["rx", "--nodev", "--udp", "--listen", "127.0.0.1:0", "--pcap", "/tmp/x", "--method", "uring", "--rx-buf-len", "64K"]), "--method readv");
    assert_clean_error(&zcrx(&["rx", "--nodev", "--udp", "--listen", "127.0.0.1:0", "--method", "uring"]), "--rx-buf-len 64K");
    assert_clean_error(&zcrx(&["rx", "--vhost-user", "/nonexistent/zcrx.sock"]), "connect");
    assert_clean_error(&zcrx(&["rx", "--vhost-user", "/tmp/x.sock", "--udp"]), "--udp are for --nodev");
    assert_clean_error(&zcrx(&["rx", "--nodev", "--listen", "127.0.0.1:0", "--mtu", "1500"]), "--mtu is for a device");
    assert_clean_error(&zcrx(&["backend", "--socket", "/tmp/zcrx-never.sock", "--mode", "tap"]), "--tap NAME");
    assert_clean_error(&zcrx(&["backend", "--socket", "/tmp/zcrx-never.sock", "--mode", "gen", "--queue-size", "1000"]), "power of two");
    assert_clean_error(&zcrx(&["backend", "--socket", "/tmp/zcrx-never.sock", "--mode", "gen", "--frame-len", "10"]), "frame");
    // clap's own errors: non-zero exit, no panic.
    let o = zcrx(&["demo", "--bytes", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid value 'lots'"));
    let o = zcrx(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = zcrx(&["rx", "--vhost-user", "/tmp/x.sock", "--mtu", "10"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid value '10' for '--mtu"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn memlock_error_names_the_limit_and_size() {
    let o = zcrx(&["demo", "--memlock-limit", "2M", "--area-size", "8M"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("8388608") && err.contains("2097152"), "{err}");
}

#[test]
fn address_in_use_is_a_clear_error() {
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    assert_clean_error(&zcrx(&["rx", "--nodev", "--udp", "--listen", &addr]), "cannot bind udp");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    assert_clean_error(&zcrx(&["rx", "--nodev", "--listen", &addr]), "cannot listen");
}

/// Start `zcrx rx` on a free port and return the child and the port it printed.
fn spawn_rx(args: &[&str]) -> (std::process::Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zcrx"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {line:?}"));
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (child, port)
}

#[test]
fn rx_udp_counts_datagrams_and_writes_a_readable_pcap() {
    let dir = std::env::temp_dir().join(format!("zcrx-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("rx.pcap");
    for method in ["readv", "uring"] {
        let mut args = vec![
            "rx", "--nodev", "--udp", "--listen", "127.0.0.1:0", "--count", "200", "--duration", "20",
            "--json", "--method", method, "--rx-buf-len", "64K", "--area-size", "16M",
        ];
        let with_pcap = method == "readv";
        if with_pcap {
            args.extend(["--pcap", pcap.to_str().unwrap()]);
        }
        let (child, port) = spawn_rx(&args);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sent = 0u64;
        for i in 0..200u32 {
            let len = 20 + (i as usize * 37) % 1400;
            let mut d = vec![(i % 251) as u8; len];
            d[..4].copy_from_slice(&i.to_le_bytes());
            tx.send_to(&d, ("127.0.0.1", port)).unwrap();
            sent += len as u64;
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success());
        let j = json(&o);
        assert_eq!(j["datagrams"], 200, "{method}: {j}");
        assert_eq!(j["bytes"], sent);
        if !with_pcap {
            continue;
        }
        // Every datagram is in the pcap, in order, from the sender's port, with its payload.
        let f = std::fs::File::open(&pcap).unwrap();
        let mut r = traffic::pcap::PcapReader::new(std::io::BufReader::new(f)).unwrap();
        let mut n = 0u32;
        while let Some(rec) = r.next_record().unwrap() {
            let udp = traffic::pcap::parse_udp_frame(&rec.data).expect("well-formed Ethernet/IPv4/UDP with valid checksums");
            assert_eq!((udp.src.port(), udp.dst.port()), (tx.local_addr().unwrap().port(), port));
            let payload = udp.payload;
            assert_eq!(payload.len(), 20 + (n as usize * 37) % 1400);
            assert_eq!(u32::from_le_bytes(payload[..4].try_into().unwrap()), n);
            n += 1;
        }
        assert_eq!(n, 200);
    }
    if Command::new("tcpdump").arg("--version").output().is_ok() {
        let o = Command::new("tcpdump").args(["-nn", "-r", pcap.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("UDP")).count(), 200);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rx_tcp_receives_a_stream_until_eof() {
    for method in ["readv", "uring"] {
        let (child, port) = spawn_rx(&["rx", "--nodev", "--listen", "127.0.0.1:0", "--json", "--method", method, "--area-size", "2M"]);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let block = vec![7u8; 100_000];
        for _ in 0..50 {
            s.write_all(&block).unwrap();
        }
        drop(s);
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j = json(&o);
        assert_eq!(j["bytes"], 5_000_000, "{method}");
        assert_eq!(j["copy_bytes"], 5_000_000);
    }
}

#[test]
fn backend_template_cycles_prebuilt_frames() {
    let sock = std::env::temp_dir().join(format!("zcrx-cli-tpl-{}.sock", std::process::id()));
    let s = sock.to_str().unwrap().to_string();
    let mut b = Command::new(env!("CARGO_BIN_EXE_zcrx"))
        .args(["backend", "--socket", &s, "--mode", "gen", "--template", "8", "--count", "64", "--duration", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = zcrx(&["rx", "--vhost-user", &s, "--count", "64", "--verify-seed", "1", "--json", "--area-size", "2M"]);
    let _ = b.kill();
    let _ = b.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json(&o);
    assert_eq!(j["frames"], 64, "{j}");
    assert_eq!(j["verified"], 8, "8 distinct frames, each sent 8 times: {j}");
    assert_eq!(j["corrupted"], 0, "{j}");
    assert_eq!(j["copy_count"], 0);
}
