//! Interop with DPDK's testpmd `net_vhost` (an independent vhost-user backend): our driver
//! receives zero-copy from it and transmits to it; counts and contents are checked exactly.
//! testpmd comes from Debian's dpdk-dev (`ci/install-dpdk.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use driver::transport::vhost_user::VhostUser;
use driver::{NetConfig, NetRx};
use traffic::frame::{FrameGen, DEFAULT_DST_MAC, DEFAULT_SRC_MAC};
use traffic::testpmd::Testpmd;
use traffic::FrameVerifier;
use zcrx::{AreaReg, Cqe, IfqReg, IfqUser, MemoryKind};

fn sock(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("zcrx-dpdk-{tag}-{}.sock", std::process::id()))
}

/// testpmd as the backend on `path`, and our driver connected to it.
fn setup(tag: &str, mode: &str, extra: &[&str]) -> (Testpmd, NetRx, IfqUser) {
    assert!(traffic::testpmd::available(), "dpdk-testpmd is missing: run ci/install-dpdk.sh");
    let path = sock(tag);
    let _ = std::fs::remove_file(&path);
    let tp = Testpmd::spawn(&format!("net_vhost0,iface={}", path.display()), mode, extra).unwrap();
    let t = VhostUser::connect(&path).unwrap_or_else(|e| panic!("{e}\n{}", tp.log()));
    let reg = IfqReg { flags: 0, rq_entries: 1024, rx_buf_len: 4096, ..IfqReg::default() };
    let (rx, user) = driver::register_ifq(Box::new(t), reg, AreaReg::new(MemoryKind::Memfd, 8 << 20), NetConfig::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.log()));
    assert!(tp.wait_for("virtio is now ready", Duration::from_secs(10)), "{}", tp.log());
    (tp, rx, user)
}

/// Poll the device and hand each whole frame to `f` until `f` says stop or `idle` passes
/// without data.
fn receive(rx: &mut NetRx, user: &mut IfqUser, idle: Duration, deadline: Instant, mut f: impl FnMut(&[u8]) -> bool) {
    let mut cqes = vec![Cqe::default(); 256];
    let mut frame = Vec::new();
    let mut last = Instant::now();
    loop {
        rx.poll().expect("device error");
        let n = user.recv(&mut cqes);
        let mut more = true;
        for c in &cqes[..n] {
            frame.extend_from_slice(user.data(c).unwrap());
            if !c.is_continued() {
                more &= f(&frame);
                frame.clear();
            }
            user.refill(c).unwrap();
        }
        user.flush_rq();
        if n != 0 {
            last = Instant::now();
        }
        if !more || last.elapsed() > idle || Instant::now() > deadline {
            return;
        }
    }
}

#[test]
fn receives_zero_copy_from_testpmd_txonly_exact_count() {
    let (mut tp, mut rx, mut user) = setup("txonly", "txonly", &["--txpkts=64"]);
    tp.cmd("start").unwrap();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    receive(&mut rx, &mut user, Duration::from_secs(10), deadline, |f| {
        assert_eq!(f.len(), 64, "testpmd txonly sends 64-byte frames");
        assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4");
        assert_eq!(f[23], 17, "UDP");
        got += 1;
        got < 200_000
    });
    tp.cmd("stop").unwrap();
    // Whatever testpmd counted as sent is in our ring: drain it.
    receive(&mut rx, &mut user, Duration::from_millis(500), deadline, |_| {
        got += 1;
        true
    });
    let s = tp.port_stats().unwrap();
    assert!(got >= 200_000, "received {got}\n{}", tp.log());
    assert_eq!(s.tx_packets, got, "testpmd sent {} frames, we received {got}", s.tx_packets);
    let st = rx.ifq().stats();
    assert_eq!(st.copy_count, 0, "zero copy");
    assert_eq!(st.zc_count, got);
}

#[test]
fn transmits_to_testpmd_rxonly_exact_count_and_bytes() {
    let (mut tp, mut rx, _user) = setup("rxonly", "rxonly", &["--no-flush-rx"]);
    tp.cmd("start").unwrap();
    assert!(tp.wait_for("rxonly packet forwarding", Duration::from_secs(10)), "{}", tp.log());
    let mut gen = FrameGen::new(3, DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 60, 1514).unwrap();
    let mut buf = vec![0u8; 1514];
    const N: u64 = 20_000;
    let mut bytes = 0u64;
    for _ in 0..N {
        let len = gen.next_into(&mut buf).unwrap();
        bytes += len as u64;
        while !rx.device().send(&buf[..len]).unwrap() {
            rx.device().flush_tx();
            rx.device().reap_tx().unwrap();
        }
    }
    rx.device().flush_tx();
    let end = Instant::now() + Duration::from_secs(20);
    let mut s = tp.port_stats().unwrap();
    while s.rx_packets < N && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        s = tp.port_stats().unwrap();
    }
    assert_eq!(s.rx_packets, N, "{}", tp.log());
    assert_eq!(s.rx_bytes, bytes);
    assert_eq!(rx.device().stats().tx_frames, N);
}

#[test]
fn echo_through_testpmd_io_verifies_every_frame() {
    // testpmd drains its rx queues when forwarding starts: send only after that.
    let (mut tp, mut rx, mut user) = setup("io", "io", &["--no-flush-rx"]);
    tp.cmd("start").unwrap();
    assert!(tp.wait_for("io packet forwarding", Duration::from_secs(10)), "{}", tp.log());
    // testpmd io mode drops what our rx ring cannot take at once, so send in windows well
    // below the ring size and wait for each window to come back: exact and deterministic.
    const N: u64 = 5_000;
    const WINDOW: u64 = 64;
    let mut gen = FrameGen::new(11, DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 60, 1514).unwrap();
    let mut verify = FrameVerifier::new(11, 60, 1514).unwrap();
    let mut buf = vec![0u8; 1514];
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while gen.next_seq() < N {
        for _ in 0..WINDOW.min(N - gen.next_seq()) {
            let len = gen.next_into(&mut buf).unwrap();
            while !rx.device().send(&buf[..len]).unwrap() {
                rx.device().flush_tx();
                rx.device().reap_tx().unwrap();
            }
        }
        rx.device().flush_tx();
        let want = gen.next_seq();
        receive(&mut rx, &mut user, Duration::from_secs(5), deadline, |f| {
            verify.check(f).unwrap();
            got += 1;
            got < want
        });
        assert_eq!(got, want, "window lost frames: {:?}\n{}", tp.port_stats(), tp.log());
    }
    let v = verify.stats();
    assert_eq!(got, N);
    assert_eq!((v.unique, v.lost, v.duplicates, v.corrupted), (N, 0, 0, 0));
    let s = tp.port_stats().unwrap();
    assert_eq!((s.rx_packets, s.tx_packets), (N, N), "testpmd forwarded every frame once");
}
