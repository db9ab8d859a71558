//! The backend against a hand-written frontend (tests/common): protocol,
//! config space, counting/verification, malformed descriptors and rings,
//! ACCESS_PLATFORM refusal, interrupts, reconnects, stop while connected.

mod common;

use std::time::{Duration, Instant};

use backend::{BackendConfig, GenConfig, Mode, SinkConfig, Stats};
use common::*;
use traffic::{FrameGen, FrameVerifier};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(5);
const BASE: u64 = F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES | F_IN_ORDER | F_MAC;

fn start(tag: &str, mode: Mode) -> (backend::Backend, Sock) {
    let sock = Sock::new(tag);
    let mut cfg = BackendConfig::new(&sock.path, mode);
    cfg.mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    (backend::start(cfg).unwrap(), sock)
}

fn wait_stats(b: &backend::Backend, what: &str, f: impl FnMut(&Stats) -> bool) -> Stats {
    match b.wait_until(T, f) {
        Ok(s) => s,
        Err(s) => panic!("timed out waiting for {what}; stats: {s:#?}"),
    }
}

#[test]
fn config_space_holds_the_mac_and_features_are_negotiated() {
    let (b, sock) = start("config", Mode::Reflect);
    let mut fe = TestFrontend::connect(&sock, BASE | F_EVENT_IDX);
    assert_eq!(
        fe.get_config(0, 6),
        vec![0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]
    );
    // A larger read (QEMU reads the whole struct) is zero-padded, not refused.
    let c = fe.get_config(0, 32);
    assert_eq!(&c[..6], &[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    assert_eq!(c.len(), 32);
    let offered = fe.fe.get_features().unwrap();
    assert_eq!(offered, backend::OFFERED_FEATURES);
    for f in [
        F_VERSION_1,
        F_MAC,
        F_MRG_RXBUF,
        F_EVENT_IDX,
        F_IN_ORDER,
        F_PROTOCOL_FEATURES,
    ] {
        assert_ne!(offered & f, 0, "feature {f:#x} must be offered");
    }
    let pf = fe.fe.get_protocol_features().unwrap();
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    assert_eq!(
        pf,
        P::CONFIG | P::REPLY_ACK | P::BACKEND_REQ,
        "no MQ, no IOTLB"
    );
    assert!(
        fe.backend_chan.is_some(),
        "backend request channel set up like QEMU does"
    );
    let s = wait_stats(&b, "connection", |s| s.connected);
    assert_eq!(s.features, BASE | F_EVENT_IDX);
    assert_eq!(s.connections, 1);
    drop(fe);
    wait_stats(&b, "disconnect", |s| !s.connected);
    let s = b.stop();
    assert_eq!(s.last_error, None);
}

fn gen60_1514(seed: u64) -> FrameGen {
    FrameGen::new(seed, [2; 6], [4; 6], 60, 1514).unwrap()
}

#[test]
fn sink_verifies_and_skips_malformed_tx_descriptors() {
    let (b, sock) = start(
        "sink",
        Mode::Sink(SinkConfig {
            verify: true,
            seed: 7,
            min_frame_len: 60,
            max_frame_len: 1514,
        }),
    );
    let mut fe = TestFrontend::connect(&sock, BASE);
    let mut g = gen60_1514(7);
    let mut frame = vec![0u8; 1514];
    fn good(fe: &mut TestFrontend, g: &mut FrameGen, frame: &mut [u8], desc: u16) {
        let n = g.next_into(frame).unwrap();
        fe.post_tx(desc, desc as usize, &frame[..n]);
    }
    let out = GPA + MEM_SIZE as u64;
    let valid = TestFrontend::buf_gpa(100);
    good(&mut fe, &mut g, &mut frame, 0);
    fe.set_desc(TX, 1, 0x10, 100, 0, 0); // outside the memory table
    fe.push_avail(TX, 1);
    good(&mut fe, &mut g, &mut frame, 2);
    fe.set_desc(TX, 3, out - 50, 100, 0, 0); // runs off the end of the region
    fe.push_avail(TX, 3);
    fe.set_desc(TX, 4, u64::MAX - 10, 100, 0, 0); // address + length wraps
    fe.push_avail(TX, 4);
    fe.push_avail(TX, 300); // head index >= queue size
    fe.set_desc(TX, 5, valid, 100, DESC_F_NEXT, 6); // 5 -> 6 -> 5 -> ... loop
    fe.set_desc(TX, 6, valid, 100, DESC_F_NEXT, 5);
    fe.push_avail(TX, 5);
    fe.set_desc(TX, 7, valid, 100, DESC_F_NEXT, 1000); // next out of range
    fe.push_avail(TX, 7);
    fe.set_desc(TX, 8, valid, 16, DESC_F_INDIRECT, 0); // indirect not offered
    fe.push_avail(TX, 8);
    fe.set_desc(TX, 9, valid, 100, DESC_F_WRITE, 0); // device-writable in tx
    fe.push_avail(TX, 9);
    fe.set_desc(TX, 10, valid, 4, 0, 0); // shorter than the virtio-net header
    fe.push_avail(TX, 10);
    // A good frame split over two descriptors: header, then frame.
    {
        let n = g.next_into(&mut frame).unwrap();
        let off = TestFrontend::buf_off(11);
        fe.mem.slice(off, HDR).fill(0);
        fe.mem.slice(off + 64, n).copy_from_slice(&frame[..n]);
        fe.set_desc(TX, 11, GPA + off as u64, HDR as u32, DESC_F_NEXT, 12);
        fe.set_desc(TX, 12, GPA + off as u64 + 64, n as u32, 0, 0);
        fe.push_avail(TX, 11);
    }
    good(&mut fe, &mut g, &mut frame, 13);
    fe.set_desc(TX, 14, valid, u32::MAX, 0, 0); // huge length at a valid address
    fe.push_avail(TX, 14);
    fe.publish(TX);

    let used = fe.wait_used(TX, 13, T);
    let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    // Every chain with a valid head comes back, in order, with length 0;
    // the out-of-range head (300) cannot be returned.
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14]);
    assert!(used.iter().all(|u| u.1 == 0));
    let s = wait_stats(&b, "tx counts", |s| {
        s.verified == 4 && s.bad_descriptors == 10
    });
    assert_eq!(
        (s.tx_frames, s.corrupted, s.lost, s.bad_rings),
        (4, 0, 0, 0)
    );
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("malformed descriptor"),
        "{s:?}"
    );

    // Still serving: four more good frames.
    for d in 20..24 {
        good(&mut fe, &mut g, &mut frame, d);
    }
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 4, T).len(), 4);
    let s = wait_stats(&b, "more frames", |s| s.verified == 8);
    assert_eq!(
        (s.tx_frames, s.corrupted, s.lost, s.bad_descriptors),
        (8, 0, 0, 10)
    );
    let mut v = FrameVerifier::new(7, 60, 1514).unwrap();
    let mut g2 = gen60_1514(7);
    let mut bytes = 0;
    for _ in 0..8 {
        let n = g2.next_into(&mut frame).unwrap();
        v.check(&frame[..n]).unwrap();
        bytes += n as u64;
    }
    assert_eq!(s.tx_bytes, bytes);
    drop(fe);
    b.stop();
}

/// Reassemble one frame from used rx entries starting at `i` (mergeable).
fn take_frame(
    fe: &TestFrontend,
    used: &[(u32, u32)],
    i: &mut usize,
    buf_of: impl Fn(u32) -> usize,
) -> Vec<u8> {
    let (id, len) = used[*i];
    let (nbuf, mut f) = fe.rx_frame(buf_of(id), len);
    *i += 1;
    for _ in 1..nbuf {
        let (id, len) = used[*i];
        f.extend_from_slice(
            fe.mem
                .slice(TestFrontend::buf_off(buf_of(id)), len as usize),
        );
        *i += 1;
    }
    f
}

#[test]
fn gen_fills_valid_rx_buffers_and_skips_malformed_ones() {
    let (b, sock) = start(
        "gen",
        Mode::Gen(GenConfig {
            min_frame_len: 60,
            max_frame_len: 1514,
            seed: 3,
            ..Default::default()
        }),
    );
    let mut fe = TestFrontend::connect(&sock, BASE);
    fe.post_rx(0, 0, BUF_SIZE as u32);
    fe.set_desc(RX, 1, 0x1000, 2048, DESC_F_WRITE, 0); // outside
    fe.push_avail(RX, 1);
    fe.set_desc(RX, 2, TestFrontend::buf_gpa(2), 2048, 0, 0); // device-readable
    fe.push_avail(RX, 2);
    fe.set_desc(RX, 3, TestFrontend::buf_gpa(3), 4, DESC_F_WRITE, 0); // < header
    fe.push_avail(RX, 3);
    fe.set_desc(RX, 4, GPA + MEM_SIZE as u64 - 100, 2048, DESC_F_WRITE, 0); // overflow
    fe.push_avail(RX, 4);
    for d in 5..8 {
        fe.post_rx(d, d as usize, BUF_SIZE as u32);
    }
    fe.publish(RX);
    let used = fe.wait_used(RX, 8, T);
    let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    let mut v = FrameVerifier::new(3, 60, 1514).unwrap().expect_macs(
        [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
        backend::DEFAULT_GEN_SRC_MAC,
    );
    for &(id, len) in &used {
        if (1..=4).contains(&id) {
            assert_eq!(len, 0, "malformed buffer {id} must come back empty");
            continue;
        }
        let (nbuf, f) = fe.rx_frame(id as usize, len);
        assert_eq!(nbuf, 1);
        v.check(&f).unwrap();
    }
    assert_eq!(v.stats().unique, 4);
    assert_eq!(v.stats().lost, 0);
    let s = wait_stats(&b, "rx counts", |s| s.rx_frames == 4);
    assert_eq!(s.bad_descriptors, 4);

    // Mergeable buffers: 1000..=1514-byte frames into 256-byte buffers.
    drop(fe);
    wait_stats(&b, "disconnect", |s| !s.connected);
    b.stop();
    let (b, sock) = start(
        "genmrg",
        Mode::Gen(GenConfig {
            min_frame_len: 1000,
            max_frame_len: 1514,
            seed: 5,
            count: Some(10),
            ..Default::default()
        }),
    );
    let mut fe = TestFrontend::connect(&sock, BASE | F_EVENT_IDX);
    for d in 0..100u16 {
        fe.post_rx(d, d as usize, 256);
    }
    fe.publish(RX);
    let s = wait_stats(&b, "10 frames", |s| s.rx_frames == 10);
    let used = fe.take_used(RX);
    let mut v = FrameVerifier::new(5, 1000, 1514).unwrap();
    let mut i = 0;
    for _ in 0..10 {
        let f = take_frame(&fe, &used, &mut i, |id| id as usize);
        v.check(&f).unwrap();
    }
    assert_eq!(i, used.len(), "no extra used entries");
    assert!(
        used.len() >= 40,
        "each frame needs >= 4 buffers of 256 bytes"
    );
    assert_eq!(
        (v.stats().unique, s.bad_descriptors, s.rx_dropped),
        (10, 0, 0)
    );
    drop(fe);
    b.stop();
}

#[test]
fn without_mrg_rxbuf_a_too_small_buffer_drops_the_frame() {
    let (b, sock) = start(
        "nomrg",
        Mode::Gen(GenConfig {
            min_frame_len: 1000,
            max_frame_len: 1000,
            // Counts generated frames, the dropped one included.
            count: Some(3),
            ..Default::default()
        }),
    );
    let mut fe = TestFrontend::connect(&sock, BASE & !F_MRG_RXBUF);
    fe.post_rx(0, 0, 256);
    fe.post_rx(1, 1, 2048);
    fe.post_rx(2, 2, 2048);
    fe.publish(RX);
    let used = fe.wait_used(RX, 3, T);
    assert_eq!(used[0], (0, 0));
    assert_eq!(used[1].1, 1012);
    assert_eq!(used[2].1, 1012);
    let s = wait_stats(&b, "counts", |s| s.rx_frames == 2);
    assert_eq!(s.rx_dropped, 1);
    assert!(s.last_error.unwrap().contains("MRG_RXBUF not negotiated"));
    // Frame seq 0 was dropped; seqs 1, 2 delivered.
    let mut v = FrameVerifier::new(1, 1000, 1000).unwrap();
    assert_eq!(v.check(&fe.rx_frame(1, 1012).1).unwrap().seq, 1);
    assert_eq!(v.check(&fe.rx_frame(2, 1012).1).unwrap().seq, 2);
    drop(fe);
    b.stop();
}

#[test]
fn ring_faults_stop_the_queue_and_the_backend_survives() {
    let (b, sock) = start("ringfault", Mode::Sink(SinkConfig::default()));
    // The avail index jumps by more than the queue size.
    let fe = TestFrontend::connect(&sock, BASE);
    fe.set_avail_idx_raw(TX, 1000);
    let s = wait_stats(&b, "bad ring", |s| s.bad_rings == 1);
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("avail index moved"),
        "{s:?}"
    );
    drop(fe);
    wait_stats(&b, "disconnect", |s| !s.connected);

    // The tx used ring starts inside the memory table but runs off its end.
    let fe = TestFrontend::connect_with(&sock, BASE, |q, c| {
        if q == TX {
            c.used_ring_addr = c.used_ring_addr - 0x2000 + (MEM_SIZE as u64 - 100) - 0x4000;
        }
    });
    let s = wait_stats(&b, "bad ring 2", |s| s.bad_rings == 2);
    assert!(
        s.last_error.as_deref().unwrap().contains("used ring"),
        "{s:?}"
    );
    drop(fe);
    wait_stats(&b, "disconnect", |s| !s.connected);

    // A well-behaved frontend is still served.
    let mut fe = TestFrontend::connect(&sock, BASE);
    let g = FrameGen::new(1, [1; 6], [2; 6], 64, 64).unwrap();
    let mut f = [0u8; 64];
    g.write(0, &mut f).unwrap();
    fe.post_tx(0, 0, &f);
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 1, T).len(), 1);
    let s = wait_stats(&b, "frame", |s| s.tx_frames == 1);
    assert_eq!(s.connections, 3);
    drop(fe);
    b.stop();
}

#[test]
fn access_platform_is_refused_with_a_clear_error() {
    let (b, sock) = start("iommu", Mode::Reflect);
    let fe = TestFrontend::connect_raw(&sock);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & F_ACCESS_PLATFORM, 0);
    let _ = fe.set_features(F_VERSION_1 | F_ACCESS_PLATFORM | F_PROTOCOL_FEATURES);
    let s = wait_stats(&b, "refusal", |s| s.last_error.is_some() && !s.connected);
    let e = s.last_error.unwrap();
    for w in ["VIRTIO_F_ACCESS_PLATFORM", "IOTLB", "iommu_platform=off"] {
        assert!(e.contains(w), "error should mention {w}: {e}");
    }
    // The connection is closed: further requests fail.
    assert!(fe.get_features().is_err());
    drop(fe);
    // And the next frontend is served normally.
    let mut fe = TestFrontend::connect(&sock, BASE);
    assert_eq!(
        fe.get_config(0, 6),
        vec![0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]
    );
    wait_stats(&b, "second connection", |s| {
        s.connections == 2 && s.connected
    });
    drop(fe);
    b.stop();
}

fn call_count(fe: &TestFrontend, q: usize) -> u64 {
    fe.call[q].read().unwrap_or(0)
}

#[test]
fn interrupts_only_when_the_frontend_asks() {
    let (b, sock) = start("irq", Mode::Sink(SinkConfig::default()));
    let g = FrameGen::new(1, [1; 6], [2; 6], 64, 64).unwrap();
    let mut f = [0u8; 64];
    let mut fe = TestFrontend::connect(&sock, BASE);
    // VRING_AVAIL_F_NO_INTERRUPT: no interrupts.
    fe.set_avail_flags(TX, AVAIL_F_NO_INTERRUPT);
    for d in 0..8u16 {
        g.write(d as u64, &mut f).unwrap();
        fe.post_tx(d, d as usize, &f);
    }
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 8, T).len(), 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(call_count(&fe, TX), 0);
    assert_eq!(b.stats().notifications, 0);
    // Interrupts wanted: at least one per published burst.
    fe.set_avail_flags(TX, 0);
    for d in 8..16u16 {
        g.write(d as u64, &mut f).unwrap();
        fe.post_tx(d, d as usize, &f);
    }
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 8, T).len(), 8);
    assert!(wait_for(T, || call_count(&fe, TX) > 0));
    drop(fe);
    wait_stats(&b, "disconnect", |s| !s.connected);

    // EVENT_IDX: interrupt only when the used index passes used_event.
    let mut fe = TestFrontend::connect(&sock, BASE | F_EVENT_IDX);
    let used_event = fe.rings[TX].avail + 4 + 2 * QSIZE as usize;
    unsafe { std::ptr::write_volatile(fe.mem.at::<u16>(used_event), 100) };
    for d in 0..8u16 {
        g.write(d as u64, &mut f).unwrap();
        fe.post_tx(d, d as usize, &f);
    }
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 8, T).len(), 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(call_count(&fe, TX), 0, "used_event 100 not reached");
    unsafe { std::ptr::write_volatile(fe.mem.at::<u16>(used_event), 8) };
    for d in 8..16u16 {
        g.write(d as u64, &mut f).unwrap();
        fe.post_tx(d, d as usize, &f);
    }
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 8, T).len(), 8);
    assert!(
        wait_for(T, || call_count(&fe, TX) > 0),
        "used_event 8 crossed"
    );
    drop(fe);
    b.stop();
}

#[test]
fn reflect_echoes_and_get_vring_base_reports_progress() {
    let (b, sock) = start("reflect", Mode::Reflect);
    let mut fe = TestFrontend::connect(&sock, BASE);
    for d in 0..32u16 {
        fe.post_rx(d, 200 + d as usize, BUF_SIZE as u32);
    }
    fe.publish(RX);
    let mut g = gen60_1514(11);
    let mut f = vec![0u8; 1514];
    let mut sent = Vec::new();
    for d in 0..16u16 {
        let n = g.next_into(&mut f).unwrap();
        sent.push(f[..n].to_vec());
        fe.post_tx(d, d as usize, &f[..n]);
    }
    fe.publish(TX);
    let used = fe.wait_used(RX, 16, T);
    assert_eq!(used.len(), 16);
    for (i, &(id, len)) in used.iter().enumerate() {
        let (nbuf, got) = fe.rx_frame(200 + id as usize, len);
        assert_eq!(nbuf, 1);
        assert_eq!(got, sent[i], "frame {i} reflected unchanged");
    }
    assert_eq!(fe.wait_used(TX, 16, T).len(), 16);
    let s = wait_stats(&b, "counts", |s| s.tx_frames == 16 && s.rx_frames == 16);
    assert_eq!((s.rx_dropped, s.bad_descriptors), (0, 0));
    // Stopping the tx ring returns how far the backend got; rx keeps going
    // on its own (but reflect has nothing to send now).
    assert_eq!(fe.fe.get_vring_base(TX).unwrap(), 16);
    assert_eq!(fe.fe.get_vring_base(RX).unwrap(), 16);
    drop(fe);
    b.stop();
}

#[test]
fn gen_keeps_serving_rx_after_tx_is_stopped() {
    let (b, sock) = start("restart", Mode::Gen(GenConfig::default()));
    let mut fe = TestFrontend::connect(&sock, BASE);
    assert_eq!(fe.fe.get_vring_base(TX).unwrap(), 0);
    for d in 0..8u16 {
        fe.post_rx(d, d as usize, BUF_SIZE as u32);
    }
    fe.publish(RX);
    assert_eq!(fe.wait_used(RX, 8, T).len(), 8);
    wait_stats(&b, "8 frames", |s| s.rx_frames == 8);
    drop(fe);
    b.stop();
}

#[test]
fn reconnects_and_stops_promptly_while_connected() {
    let (b, sock) = start(
        "reconnect",
        Mode::Gen(GenConfig {
            count: Some(4),
            ..Default::default()
        }),
    );
    for round in 1..=2u64 {
        let mut fe = TestFrontend::connect(&sock, BASE);
        for d in 0..8u16 {
            fe.post_rx(d, d as usize, BUF_SIZE as u32);
        }
        fe.publish(RX);
        let used = fe.wait_used(RX, 4, T);
        assert_eq!(used.len(), 4);
        // Each connection gets a fresh generator: seqs 0..4 again.
        let mut v = FrameVerifier::new(1, 64, 64).unwrap();
        for &(id, len) in &used {
            v.check(&fe.rx_frame(id as usize, len).1).unwrap();
        }
        assert_eq!(v.stats().unique, 4);
        wait_stats(&b, "frames", |s| {
            s.rx_frames == 4 * round && s.connections == round
        });
        if round == 1 {
            drop(fe);
            wait_stats(&b, "disconnect", |s| !s.connected);
        } else {
            // Stop with the frontend connected and its rings running.
            let t = Instant::now();
            let s = b.stop();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "stop took {:?}",
                t.elapsed()
            );
            assert!(!s.connected);
            assert!(!sock.exists(), "socket file removed");
            assert!(fe.fe.get_features().is_err());
            return;
        }
    }
}

#[test]
fn random_descriptor_garbage_is_counted_never_fatal() {
    // A deterministic fuzz run: random descriptor tables and avail entries.
    // Every avail entry ends as a counted frame, a counted malformed chain,
    // or (head out of range) a counted malformed chain without a used entry.
    let (b, sock) = start("fuzz", Mode::Sink(SinkConfig::default()));
    let mut fe = TestFrontend::connect(&sock, BASE);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut posted = 0u64;
    let mut expect_used = 0usize;
    for _round in 0..40 {
        for d in 0..QSIZE {
            let r = rnd();
            let addr = match r % 5 {
                0 => rnd(),
                1 => GPA + rnd() % (2 * MEM_SIZE as u64),
                2 => GPA + MEM_SIZE as u64 - (rnd() % 4096),
                _ => TestFrontend::buf_gpa((rnd() % 256) as usize),
            };
            let len = match (r >> 8) % 4 {
                0 => rnd() as u32,
                1 => (rnd() % 8) as u32,
                _ => (rnd() % 2048) as u32,
            };
            let flags = if (r >> 16) % 3 == 0 {
                (rnd() % 8) as u16
            } else {
                0
            };
            let next = if (r >> 20) % 2 == 0 {
                (rnd() % 300) as u16
            } else {
                (rnd() % 256) as u16
            };
            fe.set_desc(TX, d, addr, len, flags, next);
        }
        for _ in 0..64 {
            let head = if rnd() % 10 == 0 {
                (rnd() % 65536) as u16
            } else {
                (rnd() % 256) as u16
            };
            if head < QSIZE {
                expect_used += 1;
            }
            fe.push_avail(TX, head);
            posted += 1;
        }
        fe.publish(TX);
        assert!(
            wait_for(T, || {
                let s = b.stats();
                s.tx_frames + s.bad_descriptors == posted
            }),
            "stats {:?} posted {posted}",
            b.stats()
        );
    }
    let s = b.stats();
    assert_eq!(s.tx_frames + s.bad_descriptors, posted);
    assert_eq!(fe.used_idx(TX) as usize, expect_used % 65536);
    assert!(s.bad_descriptors > 100 && s.tx_frames > 100, "{s:?}");
    assert_eq!(s.bad_rings, 0);
    assert!(s.connected);
    drop(fe);
    b.stop();
}

#[test]
fn tap_bridges_frames_both_ways() {
    // Needs /dev/net/tun and CAP_NET_ADMIN: the tests run as root (CI does).
    let name = format!("zcrxt{}", std::process::id() % 100000);
    let dir = temp_dir("tap");
    let b = match backend::start(BackendConfig::new(
        dir.join("sock"),
        Mode::Tap(name.clone()),
    )) {
        Ok(b) => b,
        Err(e) => panic!("cannot create tap {name} (needs /dev/net/tun and CAP_NET_ADMIN): {e}"),
    };
    let mut fe = TestFrontend::connect(&dir.join("sock"), BASE);
    for d in 0..64u16 {
        fe.post_rx(d, 300 + d as usize, BUF_SIZE as u32);
    }
    fe.publish(RX);
    let ps = PacketSocket::bind(&name);

    // Frontend -> tap: the frame shows up on the interface.
    let g = FrameGen::new(
        21,
        [0x02, 0, 0, 0, 0, 0x77],
        [0x02, 0, 0, 0, 0, 0x78],
        200,
        200,
    )
    .unwrap();
    let mut f = [0u8; 200];
    g.write(0, &mut f).unwrap();
    fe.post_tx(0, 0, &f);
    fe.publish(TX);
    let got = ps
        .recv_matching(&f[..14], T)
        .expect("frame from the frontend on the tap");
    assert_eq!(&got[..], &f[..]);

    // Tap -> frontend: a frame sent on the interface reaches the rx ring.
    g.write(1, &mut f).unwrap();
    ps.send(&f);
    let mut found = false;
    let end = Instant::now() + T;
    while !found && Instant::now() < end {
        for (id, len) in fe.take_used(RX) {
            let (_, got) = fe.rx_frame(300 + id as usize, len);
            // The kernel may also send its own frames (IPv6 ND...); ours has
            // ethertype 0x88B5 and seq 1.
            if got == f {
                found = true;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        found,
        "frame from the tap in the rx ring; stats {:?}",
        b.stats()
    );
    let s = b.stats();
    assert!(s.tx_frames >= 1 && s.rx_frames >= 1);
    drop(fe);
    b.stop();
}

/// AF_PACKET socket on one interface, for the ethertype of zcrx frames.
struct PacketSocket {
    fd: i32,
    ifindex: i32,
}

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        let proto = (0x88B5u16).to_be() as i32;
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let cname = std::ffi::CString::new(ifname).unwrap();
            let ifindex = libc::if_nametoindex(cname.as_ptr()) as i32;
            assert!(ifindex > 0);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto as u16;
            sll.sll_ifindex = ifindex;
            let r = libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            PacketSocket { fd, ifindex }
        }
    }

    fn recv_matching(&self, prefix: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n > 0 && buf[..n as usize].starts_with(prefix) {
                return Some(buf[..n as usize].to_vec());
            }
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        None
    }

    fn send(&self, frame: &[u8]) {
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let r = libc::sendto(
                self.fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                r,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

#[test]
fn memory_table_update_is_in_use_when_acknowledged() {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::VhostUserHeaderFlag;
    use vhost::VhostUserMemoryRegionInfo;
    let (b, sock) = start("memtable", Mode::Sink(SinkConfig::default()));
    let mut fe = TestFrontend::connect(&sock, BASE);
    let g = FrameGen::new(1, [1; 6], [2; 6], 64, 64).unwrap();
    let mut f = [0u8; 64];
    // A second region, not yet in the table.
    let extra = Mem::new();
    const GPA2: u64 = 0x2_0000_0000;
    g.write(0, &mut f).unwrap();
    extra.slice(0, HDR).fill(0);
    extra.slice(HDR, 64).copy_from_slice(&f);
    fe.set_desc(TX, 0, GPA2, (HDR + 64) as u32, 0, 0);
    fe.push_avail(TX, 0);
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 1, T).len(), 1);
    let s = wait_stats(&b, "rejected", |s| s.bad_descriptors == 1);
    assert_eq!(s.tx_frames, 0);

    // Add it (same first region, rings keep running), waiting for the ack.
    let region = |gpa: u64, m: &Mem| VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: MEM_SIZE as u64,
        userspace_addr: m.ptr as u64,
        mmap_offset: 0,
        mmap_handle: m.file.as_raw_fd(),
    };
    fe.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.fe
        .set_mem_table(&[region(GPA, &fe.mem), region(GPA2, &extra)])
        .unwrap();
    // Right after the ack the same descriptor is valid.
    fe.set_desc(TX, 1, GPA2, (HDR + 64) as u32, 0, 0);
    fe.push_avail(TX, 1);
    fe.publish(TX);
    assert_eq!(fe.wait_used(TX, 1, T).len(), 1);
    let s = wait_stats(&b, "accepted", |s| s.tx_frames == 1);
    assert_eq!(s.bad_descriptors, 1);
    drop(fe);
    b.stop();
}

#[test]
fn gen_rate_limit_is_respected() {
    const RATE: u64 = 2000;
    let (b, sock) = start(
        "rate",
        Mode::Gen(GenConfig {
            rate: Some(RATE),
            ..Default::default()
        }),
    );
    let mut fe = TestFrontend::connect(&sock, BASE);
    for d in 0..QSIZE {
        fe.post_rx(d, d as usize, BUF_SIZE as u32);
    }
    let t0 = Instant::now();
    fe.publish(RX);
    std::thread::sleep(Duration::from_millis(60));
    let n = b.stats().rx_frames;
    let secs = t0.elapsed().as_secs_f64();
    // Never more than the rate allows (plus one burst of credit and the first
    // frame); at least a fraction of it even on a loaded machine.
    let max = (RATE as f64 * secs) as u64 + 65;
    assert!(
        n <= max,
        "{n} frames in {secs:.3} s at {RATE}/s (max {max})"
    );
    assert!(
        n >= RATE * 60 / 1000 / 4,
        "{n} frames in {secs:.3} s at {RATE}/s"
    );
    drop(fe);
    b.stop();
}

#[test]
fn qemu_order_set_vring_enable_before_set_features_is_accepted() {
    // QEMU sends SET_VRING_ENABLE when virtio-net resets, before any
    // SET_FEATURES; vhost-user-backend alone would drop the connection.
    use std::io::Write;
    let (b, sock) = start("qemuorder", Mode::Reflect);
    let mut raw = std::os::unix::net::UnixStream::connect(&sock.path).unwrap();
    for q in 0u32..2 {
        let mut m = Vec::new();
        m.extend_from_slice(&18u32.to_le_bytes()); // SET_VRING_ENABLE
        m.extend_from_slice(&1u32.to_le_bytes()); // version 1, no NEED_REPLY
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&q.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes()); // disable
        raw.write_all(&m).unwrap();
    }
    let fe = vhost::vhost_user::Frontend::from_stream(raw, 2);
    let mut fe = TestFrontend::handshake(fe, BASE, |_, _| {});
    for d in 0..4u16 {
        fe.post_rx(d, 100 + d as usize, BUF_SIZE as u32);
    }
    fe.publish(RX);
    let g = FrameGen::new(1, [1; 6], [2; 6], 64, 64).unwrap();
    let mut f = [0u8; 64];
    g.write(0, &mut f).unwrap();
    fe.post_tx(0, 0, &f);
    fe.publish(TX);
    let used = fe.wait_used(RX, 1, T);
    assert_eq!(used.len(), 1);
    assert_eq!(fe.rx_frame(100 + used[0].0 as usize, used[0].1).1, f);
    let s = wait_stats(&b, "reflected", |s| s.rx_frames == 1);
    assert_eq!(s.last_error, None);
    assert_eq!(s.features, BASE);
    drop(fe);
    b.stop();
}
