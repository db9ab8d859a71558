//! The backend dies while frames flow: the driver says so, loses no buffer (the device's come
//! back to the free list, the user's stay the user's), and resumes into the same area when a
//! backend listens again on the same socket.

use std::time::{Duration, Instant};

use backend::{BackendConfig, GenConfig, Mode};
use driver::transport::vhost_user::VhostUser;
use driver::{NetConfig, NetError, NetRx};
use zcrx::{AreaReg, Cqe, IfqReg, IfqUser, MemoryKind};

fn gen_backend(path: &std::path::Path) -> backend::Backend {
    let mode = Mode::Gen(GenConfig { min_frame_len: 60, max_frame_len: 1514, ..Default::default() });
    backend::start(BackendConfig::new(path, mode)).unwrap()
}

/// Receive until `n` frames arrived, keeping `hold` completions unreturned.
fn receive(rx: &mut NetRx, user: &mut IfqUser, n: u64, hold: &mut Vec<Cqe>, keep: usize) -> Result<u64, NetError> {
    let mut cqes = [Cqe::default(); 64];
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while got < n {
        assert!(Instant::now() < end, "no progress");
        rx.poll()?;
        let k = user.recv(&mut cqes);
        for c in &cqes[..k] {
            assert!(user.data(c).unwrap().len() >= 60 - 12);
            got += 1;
            if hold.len() < keep {
                hold.push(*c);
            } else {
                user.refill(c).unwrap();
            }
        }
        user.flush_rq();
    }
    Ok(got)
}

#[test]
fn backend_death_loses_no_buffer_and_reconnect_resumes() {
    let path = std::env::temp_dir().join(format!("zcrx-reconnect-{}.sock", std::process::id()));
    let b = gen_backend(&path);
    let reg = IfqReg { flags: 0, rq_entries: 256, rx_buf_len: 4096, ..IfqReg::default() };
    let (mut rx, mut user) = driver::register_ifq(
        Box::new(VhostUser::connect(&path).unwrap()),
        reg,
        AreaReg::new(MemoryKind::Memfd, 2 << 20),
        NetConfig::default(),
    )
    .unwrap();
    let n = rx.ifq().area().num_niovs();
    let mut hold = Vec::new();
    receive(&mut rx, &mut user, 10_000, &mut hold, 8).unwrap();
    assert_eq!(hold.len(), 8);
    assert!(rx.ifq().posted_count() > 0, "buffers are with the device");

    drop(b); // the backend dies
    let end = Instant::now() + Duration::from_secs(20);
    let err = loop {
        assert!(Instant::now() < end, "the driver never noticed the backend died");
        match rx.poll() {
            Ok(_) => {
                let mut cqes = [Cqe::default(); 64];
                let k = user.recv(&mut cqes);
                for c in &cqes[..k] {
                    user.refill(c).unwrap();
                }
                user.flush_rq();
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, NetError::Gone(_)), "{err}");
    assert!(err.to_string().contains("gone"), "{err}");
    // Nothing lost: the device's buffers are free again, the user's 8 are still held.
    assert_eq!(rx.ifq().posted_count(), 0);
    let ifq = rx.ifq();
    assert_eq!(ifq.free_count() + ifq.user_count(), n);
    assert!(ifq.user_count() >= 8);
    for c in &hold {
        assert!(user.data(c).is_ok(), "held buffers stay readable");
    }
    // Not back yet: reconnecting fails cleanly.
    assert!(rx.reconnect().is_err());
    assert_eq!(rx.ifq().posted_count(), 0);

    let b = gen_backend(&path);
    rx.reconnect().unwrap();
    assert!(rx.ifq().posted_count() > 0);
    let got = receive(&mut rx, &mut user, 10_000, &mut hold, 8).unwrap();
    assert!(got >= 10_000);
    for c in hold.drain(..) {
        user.refill(&c).unwrap();
    }
    user.flush_rq();
    let s = rx.close();
    assert!(s.zc_count >= 20_000);
    assert_eq!(s.invalid_rqes, 0);
    drop(b);
}
