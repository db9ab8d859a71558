//! NODEV copy mode end to end over real loopback sockets: TCP streams reassemble exactly, back
//! pressure (no buffer, no completion slot) loses nothing, UDP datagrams longer than a buffer
//! arrive as continued fragments, end of stream is reported, and every bad registration is
//! refused with its own error.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zcrx::uapi::{area_token, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY, ZCRX_REG_CLAMP, ZCRX_REG_NODEV};
use zcrx::{
    AreaError, AreaReg, CopyLimits, CopyOutcome, Cqe, DmaError, DmaMap, DmaSegment, Error, Ifq, IfqReg, IfqUser,
    MemoryKind, RegError,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// A stream pattern that is not periodic in any buffer size.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (rx, _) = l.accept().unwrap();
    (tx, rx)
}

/// A thread that writes `data` in `chunk`-byte writes, then closes the stream.
fn send_in_chunks(mut tx: TcpStream, data: Arc<Vec<u8>>, chunk: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for c in data.chunks(chunk) {
            tx.write_all(c).unwrap();
        }
    })
}

/// `free + posted + user == num_niovs`, each count checked against the buffers' states.
#[track_caller]
fn assert_conserved(ifq: &Ifq) {
    let n = ifq.area().num_niovs();
    let count = |s| (0..n).filter(|&i| ifq.niov_state(i) == s).count() as u32;
    use zcrx::NiovState::*;
    assert_eq!([ifq.free_count(), ifq.posted_count(), ifq.user_count()], [count(Free), count(Posted), count(User)]);
    assert_eq!(ifq.free_count() + ifq.posted_count() + ifq.user_count(), n);
}

fn register(buffers: usize, rq: u32, cq: u32) -> (Ifq, IfqUser) {
    let reg = IfqReg { rq_entries: rq, cq_entries: cq, ..IfqReg::default() };
    Ifq::register(reg, AreaReg::new(MemoryKind::Anonymous, buffers * 4096), None).unwrap()
}

/// Receive completions, check their bytes against `data` at `*pos`, return them.
fn consume(user: &mut IfqUser, data: &[u8], pos: &mut usize, cqes: &mut [Cqe]) -> usize {
    let n = user.recv(cqes);
    for c in &cqes[..n] {
        assert_eq!(c.off & !zcrx::uapi::AREA_MASK, area_token(0));
        assert_eq!(c.flags, 0, "stream completions are not continued");
        let d = user.data(c).unwrap();
        assert!(*pos + d.len() <= data.len(), "more bytes than were sent");
        assert!(d == &data[*pos..*pos + d.len()], "bytes at stream offset {} differ", *pos);
        *pos += d.len();
        user.refill(c).unwrap();
    }
    n
}

#[test]
fn tcp_stream_reassembles_exactly() {
    let data = Arc::new(pattern(16 * MIB, 1));
    let (tx, rx) = tcp_pair();
    let sender = send_in_chunks(tx, data.clone(), 1500);
    let (mut ifq, mut user) = register(256, 1024, 0);
    assert!(ifq.is_nodev());
    let mut cqes = vec![Cqe::default(); ifq.reg().cq_entries as usize];
    let (mut pos, mut completions, mut calls) = (0usize, 0u64, 0u64);
    loop {
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Eof => break,
            CopyOutcome::Data { completions: c, bytes } => {
                assert!(bytes > 0 && c as usize == bytes.div_ceil(4096), "{c} completions for {bytes} bytes");
                completions += c as u64;
            }
            o => panic!("unexpected {o:?} with every buffer returned"),
        }
        calls += 1;
        consume(&mut user, &data, &mut pos, &mut cqes);
        user.flush_rq();
    }
    sender.join().unwrap();
    assert_eq!(pos, data.len(), "the whole stream arrived");
    assert_eq!(ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap(), CopyOutcome::Eof, "EOF again");
    let s = ifq.stats();
    assert_eq!(s.copy_bytes, data.len() as u64);
    assert_eq!(s.copy_count, completions);
    assert_eq!((s.zc_count, s.zc_bytes, s.invalid_rqes, s.no_buffer, s.cq_full), (0, 0, 0, 0, 0));
    assert!(s.refilled >= completions - 256, "buffers came back through the RQ: {s:?}");
    assert!(calls < completions, "copies use several buffers per call ({calls} calls, {completions} completions)");
    assert_eq!(user.take_events(), ZCRX_EVENT_COPY);
    // Published to the user's end as well.
    assert_eq!(user.stats(), s);
}

#[test]
fn no_buffer_back_pressure_loses_nothing() {
    let data = Arc::new(pattern(256 * KIB, 2));
    let (tx, rx) = tcp_pair();
    let sender = send_in_chunks(tx, data.clone(), 1500);
    let (mut ifq, mut user) = register(16, 16, 64);
    let mut cqes = [Cqe::default(); 64];
    let mut held = Vec::new();
    // Receive without returning anything until the buffers run out.
    let out = loop {
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Data { .. } => {
                let n = user.recv(&mut cqes);
                held.extend_from_slice(&cqes[..n]);
            }
            o => break o,
        }
    };
    assert_eq!(out, CopyOutcome::NoBuffer);
    assert_eq!((ifq.free_count(), ifq.posted_count(), ifq.user_count()), (0, 0, 16));
    assert_conserved(&ifq);
    assert_eq!(user.held_count(), 16);
    assert_eq!(held.len(), 16);
    assert_eq!(ifq.stats().no_buffer, 1);
    assert_eq!(ifq.stats().cq_full, 0);
    assert_ne!(user.take_events() & ZCRX_EVENT_ALLOC_FAIL, 0, "ALLOC_FAIL raised");
    // Still no buffer: counted again, nothing read from the socket.
    assert_eq!(ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap(), CopyOutcome::NoBuffer);
    assert_eq!(ifq.copy_from_reader(&mut &rx).unwrap(), CopyOutcome::NoBuffer);
    assert_eq!(ifq.stats().no_buffer, 3);
    assert_eq!(user.take_events(), ZCRX_EVENT_ALLOC_FAIL);
    // The held buffers carry the start of the stream.
    let mut pos = 0;
    for c in &held {
        let d = user.data(c).unwrap();
        assert!(d == &data[pos..pos + d.len()]);
        pos += d.len();
    }
    // Return them; the rest of the stream follows intact.
    for c in &held {
        user.refill(c).unwrap();
    }
    user.flush_rq();
    loop {
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Eof => break,
            CopyOutcome::Data { .. } => {}
            o => panic!("unexpected {o:?}"),
        }
        consume(&mut user, &data, &mut pos, &mut cqes);
        user.flush_rq();
    }
    sender.join().unwrap();
    assert_eq!(pos, data.len(), "nothing lost");
    assert_eq!(ifq.stats().copy_bytes, data.len() as u64);
    assert_eq!(ifq.stats().no_buffer, 3);
}

#[test]
fn full_completion_ring_loses_nothing() {
    let data = Arc::new(pattern(256 * KIB, 3));
    let (tx, rx) = tcp_pair();
    let sender = send_in_chunks(tx, data.clone(), 1500);
    let (mut ifq, mut user) = register(16, 4, 4);
    assert_eq!(ifq.reg().cq_entries, 4);
    let mut cqes = [Cqe::default(); 4];
    // The user does not consume completions: after 4 the ring is full.
    let mut calls = 0;
    let out = loop {
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Data { .. } => calls += 1,
            o => break o,
        }
        assert!(calls <= 4, "more completions than ring slots");
    };
    assert_eq!(out, CopyOutcome::NoCqSpace);
    assert_eq!(ifq.user_count(), 4, "four buffers completed");
    assert_eq!(ifq.free_count(), 12, "buffers were there; the ring was the limit");
    assert_conserved(&ifq);
    assert_eq!((ifq.stats().cq_full, ifq.stats().no_buffer), (1, 0));
    assert_ne!(user.take_events() & ZCRX_EVENT_ALLOC_FAIL, 0, "back pressure raised");
    assert_eq!(ifq.copy_from_reader(&mut &rx).unwrap(), CopyOutcome::NoCqSpace);
    assert_eq!(ifq.stats().cq_full, 2);
    let mut pos = 0;
    loop {
        consume(&mut user, &data, &mut pos, &mut cqes);
        user.flush_rq();
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Eof => break,
            CopyOutcome::Data { .. } => {}
            o => panic!("unexpected {o:?} with the ring drained"),
        }
    }
    consume(&mut user, &data, &mut pos, &mut cqes);
    sender.join().unwrap();
    assert_eq!(pos, data.len(), "nothing lost");
    assert_eq!(ifq.stats().copy_bytes, data.len() as u64);
}

/// Datagram sizes: the edges around the buffer size, zero, and a spread up to 3 buffers.
fn datagram_sizes(n: usize) -> Vec<usize> {
    let edges = [0, 1, 100, 1472, 4095, 4096, 4097, 8191, 8192, 8193, 9000, 12288];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|k| {
            if k % 3 == 0 {
                edges[(k / 3) % edges.len()]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 12289) as usize
            }
        })
        .collect()
}

fn wait_readable(s: &UdpSocket) {
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(s), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(r, 1, "datagram did not arrive within 5 s");
}

#[test]
fn udp_datagrams_fragment_and_reassemble() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    let from = tx.local_addr().unwrap();
    let sizes = datagram_sizes(1000);
    assert!(sizes.iter().filter(|&&s| s > 4096).count() > 100, "many datagrams span several buffers");
    let payloads: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &s)| pattern(s, 100 + k as u64)).collect();

    let (mut ifq, mut user) = register(64, 256, 256);
    let limits = CopyLimits { max_datagrams: 8, max_datagram_len: 12288, ..Default::default() };
    let mut cqes = [Cqe::default(); 256];
    let mut seen: Vec<(Option<SocketAddr>, usize)> = Vec::new();
    let (mut next, mut cur, mut frags, mut total_cqes) = (0usize, Vec::new(), 0usize, 0u64);
    const BATCH: usize = 4; // in flight at once: well below the socket buffer, so none is dropped
    for batch in payloads.chunks(BATCH) {
        for p in batch {
            assert_eq!(tx.send(p).unwrap(), p.len());
        }
        let want = next + batch.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while next < want {
            assert!(Instant::now() < deadline, "datagrams missing");
            match ifq.copy_datagrams(rx.as_fd(), &limits, |a, l| seen.push((a, l))).unwrap() {
                CopyOutcome::WouldBlock => {
                    wait_readable(&rx);
                    continue;
                }
                CopyOutcome::Data { .. } => {}
                o => panic!("unexpected {o:?}"),
            }
            let n = user.recv(&mut cqes);
            for c in &cqes[..n] {
                total_cqes += 1;
                let d = user.data(c).unwrap();
                cur.extend_from_slice(d);
                frags += 1;
                let expect = &payloads[next];
                assert_eq!(c.is_continued(), c.flags & zcrx::uapi::ZCRX_CQE_F_CONTD != 0);
                if c.is_continued() {
                    assert_eq!(d.len(), 4096, "datagram {next}: a continued fragment fills its buffer");
                } else {
                    assert_eq!(cur.len(), expect.len(), "datagram {next}: length");
                    assert!(cur == *expect, "datagram {next}: bytes differ");
                    assert_eq!(frags, expect.len().div_ceil(4096).max(1), "datagram {next}: fragments");
                    cur.clear();
                    frags = 0;
                    next += 1;
                }
                user.refill(c).unwrap();
            }
            user.flush_rq();
        }
    }
    assert_eq!(next, payloads.len());
    assert!(cur.is_empty(), "a trailing continued fragment");
    assert_eq!(seen.len(), 1000, "on_datagram once per datagram");
    for (k, (a, l)) in seen.iter().enumerate() {
        assert_eq!(*a, Some(from), "datagram {k}: sender address");
        assert_eq!(*l, sizes[k], "datagram {k}: length reported");
    }
    let s = ifq.stats();
    assert_eq!(s.copy_bytes, sizes.iter().sum::<usize>() as u64);
    assert_eq!(s.copy_count, total_cqes);
    assert_eq!(total_cqes, sizes.iter().map(|s| s.div_ceil(4096).max(1) as u64).sum::<u64>());
    ifq.poll_flush_request();
    assert_conserved(&ifq);
    assert_eq!(ifq.user_count(), 0, "every fragment buffer came back");
    assert_eq!((s.no_buffer, s.cq_full, s.invalid_rqes), (0, 0, 0));
}

/// The completion ring is empty before every call (the user consumes everything), so a
/// datagram copy must never report a full ring. Found by the test above: the receive side
/// sizes its reservation from a *cached* view of the ring's free slots that is refreshed only
/// when it reaches zero; once the cached view drops below the fragments one datagram needs
/// (but above zero), `copy_datagrams` answers `NoCqSpace` forever although the ring is empty.
#[test]
fn datagram_copy_does_not_stall_on_a_stale_ring_view() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    let (mut ifq, mut user) = register(16, 4, 4);
    // Three buffers per datagram, one datagram per call with a 4-slot ring.
    let limits = CopyLimits { max_datagrams: 8, max_datagram_len: 3 * 4096, ..Default::default() };
    let mut cqes = [Cqe::default(); 4];
    for k in 0..6u8 {
        tx.send(&[k; 100]).unwrap();
        wait_readable(&rx);
        let out = ifq.copy_datagrams(rx.as_fd(), &limits, |_, _| {}).unwrap();
        assert_eq!(out, CopyOutcome::Data { completions: 1, bytes: 100 }, "datagram {k}, completion ring empty");
        assert_eq!(user.recv(&mut cqes), 1);
        assert_eq!(user.data(&cqes[0]).unwrap(), &[k; 100]);
        user.refill(&cqes[0]).unwrap();
        user.flush_rq();
    }
    assert_eq!(ifq.stats().cq_full, 0);
}

/// A datagram longer than `max_datagram_len` does not fit the buffers reserved for it. The
/// kernel truncates it into them; the copy must not pass that off as the whole datagram
/// (`on_datagram` is documented to see each datagram's length). Today the truncation is
/// silent: the datagram is reported as 4096 bytes long, with no flag and no counter, and the
/// rest is lost.
#[test]
fn oversized_datagram_is_not_silently_truncated() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    let (mut ifq, mut user) = register(16, 16, 32);
    let payload = pattern(10_000, 77);
    tx.send(&payload).unwrap();
    wait_readable(&rx);
    let limits = CopyLimits { max_datagrams: 1, max_datagram_len: 4096, ..Default::default() };
    let mut lens = Vec::new();
    let out = ifq.copy_datagrams(rx.as_fd(), &limits, |_, l| lens.push(l)).unwrap();
    assert!(matches!(out, CopyOutcome::Data { .. }), "{out:?}");
    let mut cqes = [Cqe::default(); 8];
    let n = user.recv(&mut cqes);
    assert!(n >= 1);
    let d = user.data(&cqes[0]).unwrap();
    assert!(d == &payload[..d.len()], "what arrived is the start of the datagram");
    assert_eq!(lens, vec![payload.len()], "the datagram's real length is reported, not the truncated one");
}

#[test]
fn eof_is_reported() {
    let (mut ifq, mut user) = register(16, 16, 32);
    let (mut tx, rx) = tcp_pair();
    tx.write_all(b"hello, zcrx").unwrap();
    drop(tx);
    let mut got = Vec::new();
    let mut cqes = [Cqe::default(); 32];
    loop {
        match ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap() {
            CopyOutcome::Eof => break,
            CopyOutcome::Data { .. } => {}
            o => panic!("unexpected {o:?}"),
        }
        let n = user.recv(&mut cqes);
        for c in &cqes[..n] {
            got.extend_from_slice(user.data(c).unwrap());
            user.refill(c).unwrap();
        }
        user.flush_rq();
    }
    assert_eq!(got, b"hello, zcrx");
    // EOF takes no buffer and stays EOF.
    assert_eq!(ifq.copy_stream(rx.as_fd(), &CopyLimits::default()).unwrap(), CopyOutcome::Eof);
    assert_eq!(ifq.copy_from_reader(&mut &rx).unwrap(), CopyOutcome::Eof);
    assert_eq!(ifq.copy_from_reader(&mut &b""[..]).unwrap(), CopyOutcome::Eof);
    assert_eq!(ifq.free_count(), 16, "EOF returns the buffers it reserved");
    assert_eq!(user.recv(&mut cqes), 0, "EOF completes nothing");
}

struct NoopDma;
impl DmaMap for NoopDma {
    fn map(&self, _: DmaSegment<'_>) -> Result<u64, DmaError> {
        panic!("a rejected registration must not map anything");
    }
    fn unmap(&self, _: u64, _: usize) -> Result<(), DmaError> {
        panic!("a rejected registration must not unmap anything");
    }
}

#[test]
fn every_bad_registration_is_refused() {
    let ok = IfqReg::default();
    let area = || AreaReg::new(MemoryKind::Anonymous, 64 * KIB);
    let dma = || -> Option<Arc<dyn DmaMap>> { Some(Arc::new(NoopDma)) };
    type Case = (&'static str, IfqReg, Option<Arc<dyn DmaMap>>, RegError);
    let cases: Vec<Case> = vec![
        ("unknown flag", IfqReg { flags: ZCRX_REG_NODEV | 1 << 3, ..ok }, None, RegError::UnknownFlags(1 << 3)),
        ("unknown high flag", IfqReg { flags: ZCRX_REG_NODEV | 1 << 31, ..ok }, None, RegError::UnknownFlags(1 << 31)),
        ("reserved 0", IfqReg { resv: [1, 0], ..ok }, None, RegError::Reserved),
        ("reserved 1", IfqReg { resv: [0, u64::MAX], ..ok }, None, RegError::Reserved),
        ("NODEV with if_idx", IfqReg { if_idx: 2, ..ok }, None, RegError::NodevWithDevice { if_idx: 2, if_rxq: 0 }),
        ("NODEV with if_rxq", IfqReg { if_rxq: 5, ..ok }, None, RegError::NodevWithDevice { if_idx: 0, if_rxq: 5 }),
        ("NODEV with DMA", ok, dma(), RegError::NodevWithDma),
        ("device without DMA", IfqReg { flags: 0, ..ok }, None, RegError::NoDevice),
        ("rq_entries 0", IfqReg { rq_entries: 0, ..ok }, None, RegError::ZeroRqEntries),
        (
            "rq_entries 32769",
            IfqReg { rq_entries: 32769, ..ok },
            None,
            RegError::TooManyRqEntries { got: 32769, max: 32768 },
        ),
        (
            "rq_entries u32::MAX",
            IfqReg { rq_entries: u32::MAX, ..ok },
            None,
            RegError::TooManyRqEntries { got: u32::MAX, max: 32768 },
        ),
        (
            "cq_entries too many",
            IfqReg { cq_entries: (1 << 20) + 1, ..ok },
            None,
            RegError::TooManyCqEntries { got: (1 << 20) + 1, max: 1 << 20 },
        ),
        ("rx_buf_len 0", IfqReg { rx_buf_len: 0, ..ok }, None, RegError::BadBufLen(0)),
        ("rx_buf_len not a power of two", IfqReg { rx_buf_len: 6144, ..ok }, None, RegError::BadBufLen(6144)),
        ("rx_buf_len 3000", IfqReg { rx_buf_len: 3000, ..ok }, None, RegError::BadBufLen(3000)),
        ("rx_buf_len below the page size", IfqReg { rx_buf_len: 2048, ..ok }, None, RegError::BadBufLen(2048)),
        ("rx_buf_len above 1 GiB", IfqReg { rx_buf_len: 1 << 31, ..ok }, None, RegError::BadBufLen(1 << 31)),
    ];
    for (what, reg, dma, want) in cases {
        match Ifq::register(reg, area(), dma) {
            Err(Error::Reg(e)) => {
                assert_eq!(e, want, "{what}");
                assert!(!e.to_string().is_empty());
            }
            Err(e) => panic!("{what}: wrong error {e:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }

    // Clamping: 32769 is rounded down to the maximum instead of failing.
    let (ifq, _user) =
        Ifq::register(IfqReg { rq_entries: 32769, flags: ZCRX_REG_NODEV | ZCRX_REG_CLAMP, ..ok }, area(), None)
            .unwrap();
    assert_eq!(ifq.reg().rq_entries, 32768);
    assert_eq!(ifq.reg().cq_entries, 65536);
    // Rounding up to a power of two.
    let (ifq, _user) = Ifq::register(IfqReg { rq_entries: 3000, cq_entries: 5000, ..ok }, area(), None).unwrap();
    assert_eq!((ifq.reg().rq_entries, ifq.reg().cq_entries), (4096, 8192));
    // Bigger buffers are fine when the area is a multiple of them.
    let (ifq, _user) = Ifq::register(IfqReg { rx_buf_len: 16384, ..ok }, area(), None).unwrap();
    assert_eq!(ifq.area().num_niovs(), 4);

    // Area lengths that are not a multiple of rx_buf_len (or of the page).
    for (len, rx) in [(12 * KIB, 8192u32), (64 * KIB + 4096, 16384), (5000, 4096), (0, 4096)] {
        match Ifq::register(IfqReg { rx_buf_len: rx, ..ok }, AreaReg::new(MemoryKind::Memfd, len), None) {
            Err(Error::Area(AreaError::NotBufMultiple { len: l, rx_buf_len: r })) => assert_eq!((l, r), (len, rx)),
            Err(e) => panic!("area {len} / {rx}: wrong error {e:?}"),
            Ok(_) => panic!("area {len} / {rx}: accepted"),
        }
    }

    // Hugetlb memory must be a whole number of huge pages.
    match Ifq::register(ok, AreaReg::new(MemoryKind::HugetlbMemfd { page_size: 2 * MIB }, MIB), None) {
        Err(Error::Area(AreaError::BadLength { len, page })) => assert_eq!((len, page), (MIB, 2 * MIB)),
        Err(e) => panic!("hugetlb 1 MiB: wrong error {e:?}"),
        Ok(_) => panic!("hugetlb 1 MiB: accepted"),
    }

    // Hugetlb memory without free huge pages: a clear error, not a SIGBUS later.
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let huge = AreaReg::new(MemoryKind::HugetlbMemfd { page_size: 2 * MIB }, (free + 1) * 2 * MIB);
    match Ifq::register(ok, huge, None) {
        Err(e @ Error::Area(AreaError::NoHugepages { .. })) => {
            let Error::Area(AreaError::NoHugepages { page_size, needed, free: f, .. }) = &e else { unreachable!() };
            assert_eq!((*page_size, *needed, *f), (2 * MIB, free + 1, free));
            let msg = e.to_string();
            assert!(msg.contains("nr_hugepages") && msg.contains(&format!("need {}", free + 1)), "{msg}");
        }
        Err(e) => panic!("hugetlb: wrong error {e:?}"),
        Ok(_) => panic!("hugetlb: {} pages registered with {free} free", free + 1),
    }
}
