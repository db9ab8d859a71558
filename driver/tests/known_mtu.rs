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
