//! Property tests of buffer ownership through the refill queue (RQ) of a NODEV ifq.
//!
//! Random sequences mix receiving (copy fallback from a non-blocking Unix stream socket),
//! `user.recv`, valid refills, raw garbage entries pushed through `user.rq_raw()` (bad area
//! token, offset out of range, offset not buffer aligned, non-zero padding, a buffer not held,
//! a buffer returned twice), the three ways of draining the RQ, and garbage written into the
//! RQ's shared head and tail words. A model predicts every outcome; after every step the test
//! checks buffer conservation (`free + posted + user == num_niovs`), each buffer's state, the
//! exact number of invalid entries consumed, every other counter and the raised events.
//!
//! The model of the RQ follows the ring protocol of the design (user writes the slot at
//! `tail & mask` and publishes `tail`; the consumer reads `min(tail - head, entries)`) including
//! the cached indices of `zcrx::ring` (each side re-reads the other's index only when its cached
//! view is exhausted), which is what decides how garbage head/tail words are seen.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use zcrx::ifq::NiovState;
use zcrx::uapi::{area_token, AREA_MASK, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY, ZCRX_EVENT_INVALID_RQE};
use zcrx::{AreaReg, BufError, CopyLimits, CopyOutcome, Cqe, Ifq, IfqReg, IfqStats, IfqUser, MemoryKind, Rqe};

/// Cases per property; the model test is cheap (about 2 ms a case in debug).
const CASES: u32 = 1000;
const N: u32 = 64;
const BUF: usize = 4096;
const SHIFT: u32 = 12;
const RQ: u32 = 32;
const CQ: u32 = 16;

/// The stream: byte `p` is `TABLE[p % PERIOD]`, a period that is prime (not a multiple of the
/// buffer size, so misplaced data shows). `pattern(p, len)` borrows the bytes from `p`.
const PERIOD: usize = 65521;
const MAX_SPAN: usize = 64 * 1024;

fn table() -> &'static [u8] {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        (0..PERIOD + MAX_SPAN)
            .map(|k| {
                let p = (k % PERIOD) as u64;
                (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (p >> 12) as u8
            })
            .collect()
    })
}

fn pattern(from: u64, len: usize) -> &'static [u8] {
    assert!(len <= MAX_SPAN);
    let s = (from % PERIOD as u64) as usize;
    &table()[s..s + len]
}

// ---------------------------------------------------------------------------------------------
// The model.

/// The refill ring as both sides see it: private indices, cached views, the shared words.
struct RingModel {
    e: u32,
    slots: Vec<Rqe>,
    /// Producer (user): private tail, cached head.
    t: u32,
    ch: u32,
    /// Consumer (ifq): private head, cached tail.
    h: u32,
    ct: u32,
    /// The shared words.
    sh: u32,
    st: u32,
}

impl RingModel {
    fn new(e: u32) -> Self {
        Self { e, slots: vec![Rqe::default(); e as usize], t: 0, ch: 0, h: 0, ct: 0, sh: 0, st: 0 }
    }
    fn free_cached(&self) -> u32 {
        self.e.saturating_sub(self.t.wrapping_sub(self.ch))
    }
    fn free(&mut self) -> u32 {
        let f = self.free_cached();
        if f != 0 {
            return f;
        }
        self.ch = self.sh;
        self.free_cached()
    }
    fn push(&mut self, v: Rqe) -> bool {
        if self.free() == 0 {
            return false;
        }
        self.slots[(self.t & (self.e - 1)) as usize] = v;
        self.t = self.t.wrapping_add(1);
        true
    }
    fn commit(&mut self) {
        self.st = self.t;
    }
    fn available(&mut self) -> u32 {
        let a = self.ct.wrapping_sub(self.h).min(self.e);
        if a != 0 {
            return a;
        }
        self.ct = self.st;
        self.ct.wrapping_sub(self.h).min(self.e)
    }
    fn pop(&mut self) -> Option<Rqe> {
        if self.available() == 0 {
            return None;
        }
        let v = self.slots[(self.h & (self.e - 1)) as usize];
        self.h = self.h.wrapping_add(1);
        Some(v)
    }
    fn release(&mut self) {
        self.sh = self.h;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    User,
}

/// Completions of one copy call not yet received: which buffers (order unknown), how many bytes.
struct Batch {
    niovs: Vec<u32>,
    /// Epoch of each buffer when it was completed (to know whether its data is still ours).
    epochs: Vec<u64>,
    bytes: usize,
    count: usize,
    taken: usize,
    start: u64,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    cqe: Cqe,
    epoch: u64,
    pos: u64,
}

struct Model {
    state: Vec<St>,
    /// Bumped every time a buffer is freed: data of a completion is only checked while the
    /// buffer has not been freed since (the user may return a buffer it still reads — its bug).
    epoch: Vec<u64>,
    /// The user's own record of the buffers it holds (IfqUser's bitmap).
    user_bits: Vec<bool>,
    ring: RingModel,
    cq: VecDeque<Batch>,
    cq_len: usize,
    held: Vec<Held>,
    /// Offsets already returned (for "returned twice" entries).
    returned: VecDeque<u64>,
    flush_req: bool,
    stats: IfqStats,
    events: u32,
    sent: u64,
    consumed: u64,
    recv_pos: u64,
}

impl Model {
    fn new() -> Self {
        Self {
            state: vec![St::Free; N as usize],
            epoch: vec![0; N as usize],
            user_bits: vec![false; N as usize],
            ring: RingModel::new(RQ),
            cq: VecDeque::new(),
            cq_len: 0,
            held: Vec::new(),
            returned: VecDeque::new(),
            flush_req: false,
            stats: IfqStats::default(),
            events: 0,
            sent: 0,
            consumed: 0,
            recv_pos: 0,
        }
    }
    fn free_count(&self) -> u32 {
        self.state.iter().filter(|&&s| s == St::Free).count() as u32
    }
    fn user_count(&self) -> u32 {
        N - self.free_count()
    }
    /// The design's validity rule for a refill entry.
    fn valid(&self, r: &Rqe) -> Option<u32> {
        let off = r.off & AREA_MASK;
        if r.off & !AREA_MASK != area_token(0) || r.pad != 0 || off % BUF as u64 != 0 || off >= N as u64 * BUF as u64 {
            return None;
        }
        let i = (off >> SHIFT) as u32;
        (self.state[i as usize] == St::User).then_some(i)
    }
    /// Drain the RQ (ZCRX_CTRL_FLUSH_RQ); returns the buffers returned.
    fn flush(&mut self) -> u32 {
        let mut budget = self.ring.e;
        let (mut returned, mut invalid) = (0, 0);
        while budget > 0 && self.ring.available() > 0 {
            let r = self.ring.pop().unwrap();
            budget -= 1;
            match self.valid(&r) {
                Some(i) => {
                    self.state[i as usize] = St::Free;
                    self.epoch[i as usize] += 1;
                    returned += 1;
                }
                None => invalid += 1,
            }
        }
        self.ring.release();
        self.stats.refilled += returned as u64;
        self.stats.flushes += 1;
        if invalid != 0 {
            self.stats.invalid_rqes += invalid;
            self.events |= ZCRX_EVENT_INVALID_RQE;
        }
        returned
    }
    fn remember_returned(&mut self, off: u64) {
        if self.returned.len() == 64 {
            self.returned.pop_front();
        }
        self.returned.push_back(off);
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Debug)]
enum Garbage {
    BadToken { id: u16, i: u32 },
    OutOfRange { past: u64 },
    Misaligned { i: u32, by: u32 },
    Pad { sel: usize, pad: u32 },
    NotHeld { i: u32 },
    Twice { sel: usize },
}

#[derive(Clone, Debug)]
enum Word {
    Random(u32),
    NearTail(i32),
    NearHead(i32),
}

#[derive(Clone, Debug)]
enum Op {
    Send(usize),
    CopyStream(usize),
    CopyReader,
    Recv(usize),
    Refill(usize),
    /// Return a held buffer with a valid entry written through the raw ring.
    RawReturn(usize),
    Raw(Garbage),
    RawCommit,
    CommitRq,
    FlushDirect,
    FlushUser,
    PollFlush,
    GarbageTail(Word),
    GarbageHead(Word),
}

fn word() -> impl Strategy<Value = Word> {
    prop_oneof![
        any::<u32>().prop_map(Word::Random),
        (-20i32..40).prop_map(Word::NearTail),
        (-20i32..40).prop_map(Word::NearHead)
    ]
}

fn garbage() -> impl Strategy<Value = Garbage> {
    prop_oneof![
        (1u16.., 0..N).prop_map(|(id, i)| Garbage::BadToken { id, i }),
        prop_oneof![0u64..64, 0u64..(AREA_MASK >> SHIFT) - N as u64].prop_map(|past| Garbage::OutOfRange { past }),
        (0..N, 1u32..BUF as u32).prop_map(|(i, by)| Garbage::Misaligned { i, by }),
        (any::<usize>(), 1u32..).prop_map(|(sel, pad)| Garbage::Pad { sel, pad }),
        (0..N).prop_map(|i| Garbage::NotHeld { i }),
        any::<usize>().prop_map(|sel| Garbage::Twice { sel }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..20_000).prop_map(Op::Send),
        6 => (1usize..20).prop_map(Op::CopyStream),
        3 => Just(Op::CopyReader),
        6 => (1usize..40).prop_map(Op::Recv),
        5 => any::<usize>().prop_map(Op::Refill),
        2 => any::<usize>().prop_map(Op::RawReturn),
        4 => garbage().prop_map(Op::Raw),
        2 => Just(Op::RawCommit),
        2 => Just(Op::CommitRq),
        2 => Just(Op::FlushDirect),
        3 => Just(Op::FlushUser),
        2 => Just(Op::PollFlush),
    ]
}

/// Sequences; one in four also scribbles over the RQ's shared head and tail words (which can
/// desynchronise the ring for good, so most sequences do not).
fn ops() -> impl Strategy<Value = Vec<Op>> {
    let words = prop_oneof![word().prop_map(Op::GarbageTail), word().prop_map(Op::GarbageHead),];
    prop_oneof![
        3 => proptest::collection::vec(op(), 1..300),
        1 => proptest::collection::vec(prop_oneof![30 => op(), 1 => words], 1..300),
    ]
}

struct Rig {
    ifq: Ifq,
    user: IfqUser,
    tx: UnixStream,
    rx: UnixStream,
    m: Model,
}

fn setup() -> Rig {
    let reg = IfqReg { rq_entries: RQ, cq_entries: CQ, rx_buf_len: BUF as u32, ..IfqReg::default() };
    let (ifq, user) = Ifq::register(reg, AreaReg::new(MemoryKind::Anonymous, N as usize * BUF), None).unwrap();
    assert_eq!(ifq.area().num_niovs(), N);
    assert_eq!((ifq.reg().rq_entries, ifq.reg().cq_entries), (RQ, CQ));
    let (tx, rx) = UnixStream::pair().unwrap();
    tx.set_nonblocking(true).unwrap();
    rx.set_nonblocking(true).unwrap();
    Rig { ifq, user, tx, rx, m: Model::new() }
}

fn raw_rqe(i: u32) -> Rqe {
    Rqe { off: area_token(0) | (i as u64) << SHIFT, len: BUF as u32, pad: 0 }
}

impl Rig {
    fn push_raw(&mut self, r: Rqe) -> bool {
        let want = self.m.ring.push(r);
        let got = self.user.rq_raw().push(r).is_ok();
        assert_eq!(got, want, "raw push of {r:?}: ring full or not");
        got
    }

    fn copy(&mut self, reader: bool, max_bufs: usize) -> Result<(), TestCaseError> {
        let m = &mut self.m;
        // Every copy first serves a pending flush request.
        if m.flush_req {
            m.flush_req = false;
            m.flush();
        }
        let free_before = m.free_count() as usize;
        let space = CQ as usize - m.cq_len;
        let avail = m.sent - m.consumed;
        let out = if reader {
            self.ifq.copy_from_reader(&mut &self.rx).unwrap()
        } else {
            let limits = CopyLimits { max_bufs, ..Default::default() };
            self.ifq.copy_stream(self.rx.as_fd(), &limits).unwrap()
        };
        let want = if reader { 1 } else { max_bufs };
        if free_before == 0 {
            prop_assert_eq!(out, CopyOutcome::NoBuffer);
            m.stats.no_buffer += 1;
            m.events |= ZCRX_EVENT_ALLOC_FAIL;
        } else if space == 0 {
            prop_assert_eq!(out, CopyOutcome::NoCqSpace);
            m.stats.cq_full += 1;
            m.events |= ZCRX_EVENT_ALLOC_FAIL;
        } else if avail == 0 {
            prop_assert_eq!(out, CopyOutcome::WouldBlock);
        } else {
            let CopyOutcome::Data { completions, bytes } = out else {
                return Err(TestCaseError::fail(format!("expected data, got {out:?}")));
            };
            let completions = completions as usize;
            prop_assert!(bytes >= 1 && bytes as u64 <= avail, "{} bytes of {}", bytes, avail);
            prop_assert_eq!(completions, bytes.div_ceil(BUF), "one completion per buffer filled");
            prop_assert!(completions <= want.min(free_before).min(space));
            // Which buffers were filled is the receive side's choice: learn it, check it.
            let mut niovs = Vec::new();
            for i in 0..N {
                let s = self.ifq.niov_state(i);
                match (m.state[i as usize], s) {
                    (St::Free, NiovState::User) => niovs.push(i),
                    (St::Free, NiovState::Free) | (St::User, NiovState::User) => {}
                    (ms, s) => {
                        return Err(TestCaseError::fail(format!("niov {i}: model {ms:?}, ifq {s:?} after copy")))
                    }
                }
            }
            prop_assert_eq!(niovs.len(), completions);
            for &i in &niovs {
                m.state[i as usize] = St::User;
            }
            let epochs = niovs.iter().map(|&i| m.epoch[i as usize]).collect();
            m.cq.push_back(Batch { niovs, epochs, bytes, count: completions, taken: 0, start: m.consumed });
            m.cq_len += completions;
            m.consumed += bytes as u64;
            m.stats.copy_count += completions as u64;
            m.stats.copy_bytes += bytes as u64;
            m.events |= ZCRX_EVENT_COPY;
        }
        Ok(())
    }

    fn recv(&mut self, k: usize) -> Result<(), TestCaseError> {
        let mut out = [Cqe::default(); 64];
        let n = self.user.recv(&mut out[..k]);
        let m = &mut self.m;
        prop_assert_eq!(n, k.min(m.cq_len), "completions received");
        for c in &out[..n] {
            let b = m.cq.front_mut().unwrap();
            prop_assert_eq!(c.off & !AREA_MASK, area_token(0));
            prop_assert_eq!(c.flags, 0);
            prop_assert_eq!(c.area_offset() % BUF as u64, 0, "copy fills buffers from their start");
            let i = (c.area_offset() >> SHIFT) as u32;
            let Some(pos) = b.niovs.iter().position(|&x| x == i) else {
                return Err(TestCaseError::fail(format!("completion for niov {i} not in the batch {:?}", b.niovs)));
            };
            let epoch = b.epochs.swap_remove(pos);
            b.niovs.swap_remove(pos);
            let at = b.start + (b.taken * BUF) as u64;
            let expect_len = if b.taken + 1 < b.count { BUF } else { b.bytes - (b.count - 1) * BUF };
            prop_assert_eq!(c.len as usize, expect_len);
            prop_assert_eq!(at, m.recv_pos);
            b.taken += 1;
            if b.niovs.is_empty() {
                m.cq.pop_front();
            }
            m.cq_len -= 1;
            m.recv_pos += c.len as u64;
            m.user_bits[i as usize] = true;
            if m.epoch[i as usize] == epoch {
                let d = self.user.data(c).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(d == pattern(at, c.len as usize), "data of niov {} at stream {}", i, at);
            }
            m.held.push(Held { cqe: *c, epoch, pos: at });
        }
        Ok(())
    }

    fn refill(&mut self, sel: usize) -> Result<(), TestCaseError> {
        if self.m.held.is_empty() {
            return Ok(());
        }
        let idx = sel % self.m.held.len();
        let h = self.m.held[idx];
        let i = (h.cqe.area_offset() >> SHIFT) as u32;
        let m = &mut self.m;
        // Reading it first: allowed exactly while the user's own record says it holds it.
        match self.user.data(&h.cqe) {
            Ok(d) => {
                prop_assert!(m.user_bits[i as usize]);
                if m.epoch[i as usize] == h.epoch {
                    prop_assert!(d == pattern(h.pos, h.cqe.len as usize));
                }
            }
            Err(e) => prop_assert_eq!((e, m.user_bits[i as usize]), (BufError::NotHeld(i), false)),
        }
        let r = self.user.refill(&h.cqe);
        if !m.user_bits[i as usize] {
            prop_assert_eq!(r, Err(BufError::NotHeld(i)));
            m.held.swap_remove(idx);
        } else if !m.ring.push(raw_rqe(i)) {
            prop_assert_eq!(r, Err(BufError::RqFull));
        } else {
            prop_assert_eq!(r, Ok(()));
            m.user_bits[i as usize] = false;
            m.held.swap_remove(idx);
            m.remember_returned(raw_rqe(i).off);
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Send(n) => {
                let data = pattern(self.m.sent, n);
                match (&self.tx).write(data) {
                    Ok(w) => self.m.sent += w as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("send: {e}"),
                }
            }
            Op::CopyStream(b) => self.copy(false, b)?,
            Op::CopyReader => self.copy(true, 1)?,
            Op::Recv(k) => self.recv(k)?,
            Op::Refill(sel) => self.refill(sel)?,
            Op::RawReturn(sel) => {
                if !self.m.held.is_empty() {
                    let idx = sel % self.m.held.len();
                    let i = (self.m.held[idx].cqe.area_offset() >> SHIFT) as u32;
                    if self.push_raw(raw_rqe(i)) {
                        self.m.held.swap_remove(idx);
                        self.m.remember_returned(raw_rqe(i).off);
                    }
                }
            }
            Op::Raw(ref g) => {
                let r = match *g {
                    Garbage::BadToken { id, i } => Rqe { off: area_token(id) | (i as u64) << SHIFT, ..raw_rqe(0) },
                    Garbage::OutOfRange { past } => {
                        Rqe { off: area_token(0) | (N as u64 + past) << SHIFT, ..raw_rqe(0) }
                    }
                    Garbage::Misaligned { i, by } => Rqe { off: raw_rqe(i).off + by as u64, ..raw_rqe(0) },
                    Garbage::Pad { sel, pad } => {
                        let i = match self.m.held.len() {
                            0 => sel as u32 % N,
                            n => (self.m.held[sel % n].cqe.area_offset() >> SHIFT) as u32,
                        };
                        Rqe { pad, ..raw_rqe(i) }
                    }
                    Garbage::NotHeld { i } => raw_rqe(i),
                    Garbage::Twice { sel } => match self.m.returned.len() {
                        0 => raw_rqe(sel as u32 % N),
                        n => Rqe { off: self.m.returned[sel % n], ..raw_rqe(0) },
                    },
                };
                self.push_raw(r);
            }
            Op::RawCommit => {
                self.user.rq_raw().commit();
                self.m.ring.commit();
            }
            Op::CommitRq => {
                self.user.commit_rq();
                self.m.ring.commit();
            }
            Op::FlushDirect => {
                let got = self.ifq.flush_rq();
                let want = self.m.flush();
                prop_assert_eq!(got, want, "buffers returned by flush_rq");
            }
            Op::FlushUser => {
                self.user.flush_rq();
                self.m.ring.commit();
                self.m.flush_req = true;
            }
            Op::PollFlush => {
                let got = self.ifq.poll_flush_request();
                let want = if std::mem::take(&mut self.m.flush_req) { self.m.flush() } else { 0 };
                prop_assert_eq!(got, want, "buffers returned by poll_flush_request");
            }
            Op::GarbageTail(ref w) | Op::GarbageHead(ref w) => {
                let ring = &self.m.ring;
                let v = match *w {
                    Word::Random(v) => v,
                    Word::NearTail(d) => ring.t.wrapping_add(d as u32),
                    Word::NearHead(d) => ring.h.wrapping_add(d as u32),
                };
                if matches!(op, Op::GarbageTail(_)) {
                    self.user.rq_raw().raw_tail().store(v, Ordering::Release);
                    self.m.ring.st = v;
                } else {
                    self.user.rq_raw().raw_head().store(v, Ordering::Release);
                    self.m.ring.sh = v;
                }
            }
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        let (ifq, m) = (&self.ifq, &self.m);
        conserved(ifq)?;
        prop_assert_eq!(ifq.posted_count(), 0, "nothing posted between calls");
        prop_assert_eq!(ifq.free_count(), m.free_count());
        prop_assert_eq!(ifq.user_count(), m.user_count());
        for i in 0..N {
            let want = match m.state[i as usize] {
                St::Free => NiovState::Free,
                St::User => NiovState::User,
            };
            prop_assert_eq!(ifq.niov_state(i), want, "state of niov {}", i);
        }
        let s = ifq.stats();
        prop_assert_eq!(s.invalid_rqes, m.stats.invalid_rqes, "invalid refill entries counted");
        prop_assert_eq!(s, m.stats);
        prop_assert_eq!(self.user.held_count() as usize, m.user_bits.iter().filter(|&&b| b).count());
        prop_assert_eq!(self.user.take_events(), m.events, "events");
        self.m.events = 0;
        Ok(())
    }
}

proptest! {
    // XorShift: the default ChaCha generator dominates the run time in debug builds.
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    #[test]
    fn ownership_survives_any_refill_traffic(ops in ops()) {
        let mut rig = setup();
        rig.check()?;
        for op in &ops {
            rig.step(op)?;
        }
        // Every byte taken from the source was completed (received or still in the ring), and
        // what is left in the source is exactly the rest of the stream: back pressure lost nothing.
        prop_assert_eq!(rig.m.recv_pos + pending_bytes(&rig.m) as u64, rig.m.consumed);
        let mut rest = Vec::new();
        match (&rig.rx).read_to_end(&mut rest) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => panic!("draining the source: {r:?}"),
        }
        prop_assert_eq!(rest.len() as u64, rig.m.sent - rig.m.consumed);
        for (k, chunk) in rest.chunks(MAX_SPAN).enumerate() {
            let at = rig.m.consumed + (k * MAX_SPAN) as u64;
            prop_assert!(chunk == pattern(at, chunk.len()), "bytes left in the source at {}", at);
        }
    }

    /// Bytes read in place through `user.data()` are exactly the bytes of the source, in order,
    /// whatever the read sizes, buffer counts per call and flush styles.
    #[test]
    fn data_matches_the_source(
        len in 0usize..100_000,
        seed in any::<u64>(),
        chunks in proptest::collection::vec(1usize..9000, 1..20),
        max_bufs in proptest::collection::vec(1usize..20, 1..10),
        flush_style in proptest::collection::vec(0u8..3, 1..10),
        use_stream in any::<bool>(),
    ) {
        // An RQ as large as the area: a flush request is only served at the next copy, and
        // until then every buffer may sit in the RQ.
        let reg = IfqReg { rq_entries: N, cq_entries: CQ, rx_buf_len: BUF as u32, ..IfqReg::default() };
        let (mut ifq, mut user) = Ifq::register(reg, AreaReg::new(MemoryKind::Memfd, N as usize * BUF), None).unwrap();
        let mut x = seed | 1;
        let data: Vec<u8> = (0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
        let mut got = Vec::new();
        let mut cqes = [Cqe::default(); CQ as usize];
        let (tx, rx) = UnixStream::pair().unwrap();
        // The stream variant reads from a socket a thread writes into; the other one from the
        // data directly, through a reader that returns at most one chunk per read.
        let sender = use_stream.then(|| {
            let data = data.clone();
            let chunks = chunks.clone();
            std::thread::spawn(move || {
                let mut tx = tx;
                let mut off = 0;
                for &c in chunks.iter().cycle() {
                    if off == data.len() { break; }
                    let end = (off + c).min(data.len());
                    tx.write_all(&data[off..end]).unwrap();
                    off = end;
                }
            })
        });
        let mut reader = Chunked { data: &data, off: 0, chunks: &chunks, k: 0 };
        let mut step = 0usize;
        loop {
            let out = if use_stream {
                let limits = CopyLimits { max_bufs: max_bufs[step % max_bufs.len()], ..Default::default() };
                ifq.copy_stream(rx.as_fd(), &limits).unwrap()
            } else {
                ifq.copy_from_reader(&mut reader).unwrap()
            };
            match out {
                CopyOutcome::Eof => break,
                CopyOutcome::Data { .. } => {}
                o => return Err(TestCaseError::fail(format!("unexpected {o:?} with every buffer returned"))),
            }
            let n = user.recv(&mut cqes);
            for c in &cqes[..n] {
                got.extend_from_slice(user.data(c).unwrap());
                user.refill(c).unwrap();
            }
            match flush_style[step % flush_style.len()] {
                0 => user.flush_rq(),
                1 => { user.flush_rq(); ifq.poll_flush_request(); }
                _ => { user.commit_rq(); ifq.flush_rq(); }
            }
            conserved(&ifq)?;
            step += 1;
        }
        if let Some(s) = sender { s.join().unwrap(); }
        prop_assert_eq!(got.len(), data.len());
        prop_assert!(got == data, "reassembled bytes differ from the source");
        let s = ifq.stats();
        prop_assert_eq!((s.copy_bytes, s.invalid_rqes, s.no_buffer, s.cq_full), (data.len() as u64, 0, 0, 0));
    }
}

/// `free + posted + user == num_niovs`, with each count checked against the buffers' states
/// (so a buffer on the free list twice, or a counter that drifts, shows).
fn conserved(ifq: &Ifq) -> Result<(), TestCaseError> {
    let mut by_state = [0u32; 3];
    for i in 0..ifq.area().num_niovs() {
        by_state[match ifq.niov_state(i) {
            NiovState::Free => 0,
            NiovState::Posted => 1,
            NiovState::User => 2,
        }] += 1;
    }
    prop_assert_eq!(
        [ifq.free_count(), ifq.posted_count(), ifq.user_count()],
        by_state,
        "free/posted/user counts vs states"
    );
    prop_assert_eq!(ifq.free_count() + ifq.posted_count() + ifq.user_count(), N, "buffers conserved");
    Ok(())
}

fn pending_bytes(m: &Model) -> usize {
    m.cq.iter().map(|b| b.bytes - b.taken * BUF).sum()
}

/// A byte source that returns at most the next chunk size per read.
struct Chunked<'a> {
    data: &'a [u8],
    off: usize,
    chunks: &'a [usize],
    k: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let c = self.chunks[self.k % self.chunks.len()];
        self.k += 1;
        let n = c.min(buf.len()).min(self.data.len() - self.off);
        buf[..n].copy_from_slice(&self.data[self.off..self.off + n]);
        self.off += n;
        Ok(n)
    }
}
