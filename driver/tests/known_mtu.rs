//! Telling the driver the peer's MTU (`NetConfig::max_frame`) turns MRG_RXBUF off when a frame
//! fits one buffer: every frame is then one buffer, completed at the cache-line-aligned offset
//! 64 of its niov, without the driver reading the frame's header. When the MTU is unknown or a
//! frame may not fit, MRG_RXBUF is negotiated as before.

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use common::{fill, Device, Fake, IdentityDma, State, HDR};
use driver::net::RX_HEADROOM;
use driver::{register_ifq, NetConfig};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use zcrx::uapi::ZCRX_CQE_F_CONTD;
use zcrx::{AreaReg, IfqReg, MemoryKind};

const BUF: usize = 4096;

fn register(max_frame: Option<u32>) -> (driver::NetRx, zcrx::IfqUser, Arc<Mutex<State>>) {
    let offer = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_MAC;
    let s = Arc::new(Mutex::new(State::default()));
    let t = Fake { offer, s: s.clone(), kicks: Arc::new(AtomicU64::new(0)), dma: Arc::new(IdentityDma(s.clone())) };
    let reg = IfqReg { rq_entries: 256, rx_buf_len: BUF as u32, flags: 0, ..IfqReg::default() };
    let cfg = NetConfig { max_frame, ..NetConfig::default() };
    let (rx, user) = register_ifq(Box::new(t), reg, AreaReg::new(MemoryKind::Memfd, 1 << 20), cfg).expect("registration");
    (rx, user, s)
}

#[test]
fn mrg_rxbuf_only_when_a_frame_may_not_fit_one_buffer() {
    let mrg = |max_frame| {
        let (mut rx, _user, _s) = register(max_frame);
        rx.device().features() & 1 << VIRTIO_NET_F_MRG_RXBUF != 0
    };
    assert!(mrg(None), "MTU unknown: frames may span buffers");
    assert!(!mrg(Some(1518)), "MTU 1500");
    let fits = (BUF - RX_HEADROOM as usize - HDR) as u32;
    assert!(!mrg(Some(fits)), "the largest frame that fits");
    assert!(mrg(Some(fits + 1)), "one byte more");
    assert!(mrg(Some(9018)), "jumbo frames");
}

#[test]
fn known_mtu_frames_are_single_aligned_buffers() {
    let (mut rx, mut user, s) = register(Some(1518));
    let q = s.lock().unwrap().queues[0].expect("rx queue");
    let mut dev = Device::new(q, false, BUF - RX_HEADROOM as usize);
    let lens: Vec<usize> = (0..200u32).map(|k| 60 + (k as usize * 97) % 1455).collect();
    let mut seen = 0;
    for round in 0..3u32 {
        for (k, &len) in lens.iter().enumerate() {
            let seq = round * 1000 + k as u32;
            // A device without MRG_RXBUF leaves num_buffers alone: a stale value must not
            // matter, so write a wrong one.
            assert!(dev.deliver_as(seq, len, 7), "buffers posted");
        }
        dev.publish();
        let p = rx.poll().expect("poll");
        assert_eq!(p.completions as usize, lens.len());
        let n = user
            .consume(1024, |d, c| {
                let k = seen % lens.len();
                let seq = round * 1000 + k as u32;
                assert_eq!(c.flags & ZCRX_CQE_F_CONTD, 0, "one buffer per frame");
                assert_eq!(c.area_offset() % BUF as u64, u64::from(RX_HEADROOM) + HDR as u64, "frame at byte 64 of its niov");
                assert_eq!(d.len(), lens[k]);
                assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), seq, "frame order");
                assert!(d[4..].iter().all(|&b| b == fill(seq, 0)), "frame {seq} bytes");
                seen += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(n, lens.len());
        user.commit_rq();
        rx.poll().expect("poll: refill");
    }
    let st = rx.device().stats();
    assert_eq!((st.rx_frames, st.device_errors), (600, 0));
}

/// The driver takes returned buffers straight from the refill queue on each refill: garbage
/// entries among them (other area, out of range, not niov-aligned, pad set, not held, returned
/// twice) are skipped and counted, and no buffer is lost or posted twice.
#[test]
fn garbage_refill_entries_are_counted_and_lose_nothing() {
    use zcrx::uapi::{area_token, ZCRX_EVENT_INVALID_RQE};
    use zcrx::Rqe;
    let (mut rx, mut user, s) = register(Some(1518));
    let q = s.lock().unwrap().queues[0].expect("rx queue");
    let mut dev = Device::new(q, false, BUF - RX_HEADROOM as usize);
    let n_niovs = rx.ifq().area().num_niovs();
    let conserved = |rx: &driver::NetRx| {
        let i = rx.ifq();
        assert_eq!(i.free_count() + i.posted_count() + i.user_count(), n_niovs);
    };
    for seq in 0..8 {
        assert!(dev.deliver_as(seq, 100, 1));
    }
    dev.publish();
    assert_eq!(rx.poll().expect("poll").completions, 8);
    let mut cqes = [zcrx::Cqe::default(); 8];
    assert_eq!(user.recv(&mut cqes), 8);
    conserved(&rx);
    let token = user.area_token();
    let niov = |c: &zcrx::Cqe| c.area_offset() / BUF as u64 * BUF as u64;
    let area_len = rx.ifq().area().len() as u64;
    let garbage = [
        Rqe { off: area_token(5) | niov(&cqes[0]), len: BUF as u32, pad: 0 },
        Rqe { off: token | area_len, len: BUF as u32, pad: 0 },
        Rqe { off: token | (niov(&cqes[0]) + 64), len: BUF as u32, pad: 0 },
        Rqe { off: token | niov(&cqes[1]), len: BUF as u32, pad: 1 },
    ];
    let rq = user.rq_raw();
    for (k, g) in garbage.iter().enumerate() {
        rq.push(*g).unwrap();
        // A valid return between every two garbage entries.
        rq.push(Rqe { off: token | niov(&cqes[2 + k]), len: BUF as u32, pad: 0 }).unwrap();
    }
    // Returned twice, and a buffer the device holds (never completed to the user).
    rq.push(Rqe { off: token | niov(&cqes[2]), len: BUF as u32, pad: 0 }).unwrap();
    let posted = (0..n_niovs).find(|&i| rx.ifq().niov_state(i) == zcrx::NiovState::Posted).unwrap();
    rq.push(Rqe { off: token | (u64::from(posted) * BUF as u64), len: BUF as u32, pad: 0 }).unwrap();
    user.commit_rq();
    let before = rx.ifq().stats();
    rx.poll().expect("poll: refill");
    let after = rx.ifq().stats();
    assert_eq!(after.invalid_rqes - before.invalid_rqes, 6, "{after:?}");
    assert_eq!(after.refilled - before.refilled, 4, "the 4 valid returns");
    assert_ne!(user.take_events() & ZCRX_EVENT_INVALID_RQE, 0);
    conserved(&rx);
    // The 4 still held by the user (cqes 0, 1, 6, 7) can still be returned the normal way.
    for c in [cqes[0], cqes[1], cqes[6], cqes[7]] {
        user.refill(&c).unwrap();
    }
    user.commit_rq();
    rx.poll().expect("poll");
    assert_eq!(rx.ifq().user_count(), 0);
    conserved(&rx);
    // And the ring keeps working: every buffer posted once, frames still arrive.
    for seq in 100..164 {
        assert!(dev.deliver_as(seq, 60, 1));
    }
    dev.publish();
    assert_eq!(rx.poll().expect("poll").completions, 64);
    assert_eq!(rx.device().stats().device_errors, 0);
}
