//! Peers for the local runs: a TCP sender thread streaming generated data.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;

use traffic::StreamGen;

/// What the sender writes.
#[derive(Clone, Copy, Debug)]
pub enum Payload {
    /// The sequence-numbered, checksummed stream (seed, record length), generated as it goes.
    Stream { seed: u64, record_len: usize },
    /// One pre-generated block written over and over: the sender costs only its syscalls.
    Repeat,
}

/// Keep the calling thread on `cpu` (benchmarks: sender and receiver on cores of their own, so
/// the scheduler's wake-up placement does not put them on one core now and then).
pub fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::warn!("cannot pin to CPU {cpu}: {e}");
    }
}

/// Connect to `addr` and write `total` bytes in `write_size` writes, then close.
pub fn spawn_tcp(addr: SocketAddr, total: u64, write_size: usize, payload: Payload) -> JoinHandle<io::Result<u64>> {
    spawn_tcp_on(addr, total, write_size, payload, None)
}

/// [`spawn_tcp`] with the sender kept on `cpu`.
pub fn spawn_tcp_on(addr: SocketAddr, total: u64, write_size: usize, payload: Payload, cpu: Option<usize>) -> JoinHandle<io::Result<u64>> {
    std::thread::Builder::new()
        .name("zcrx-sender".into())
        .spawn(move || {
            if let Some(c) = cpu {
                pin_to(c);
            }
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true).ok();
            let block = 256 * 1024 / write_size.max(1) * write_size.max(1);
            let mut buf = vec![0u8; block.max(write_size)];
            let mut gen = match payload {
                Payload::Stream { seed, record_len } => {
                    Some(StreamGen::new(seed, record_len).map_err(|e| io::Error::other(e.to_string()))?)
                }
                Payload::Repeat => {
                    buf.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 31) as u8);
                    None
                }
            };
            let mut sent = 0u64;
            while sent < total {
                let chunk = (buf.len() as u64).min(total - sent) as usize;
                if let Some(g) = gen.as_mut() {
                    g.fill(&mut buf[..chunk]);
                }
                for w in buf[..chunk].chunks(write_size) {
                    s.write_all(w)?;
                }
                sent += chunk as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })
        .expect("spawn sender thread")
}
