//! Locked-memory accounting, the userspace twin of the kernel charging `locked_vm` against
//! RLIMIT_MEMLOCK: every area charges its size before it locks, and gives it back on drop, so an
//! area that would not fit fails with an error naming the limit instead of a bare ENOMEM later.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes currently charged by every area of this process.
static CHARGED: AtomicU64 = AtomicU64::new(0);

/// Bytes currently charged by live areas.
pub fn charged_bytes() -> u64 {
    CHARGED.load(Ordering::Relaxed)
}

/// How an area's locked memory is accounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemlockPolicy {
    /// Like the kernel: charge against the soft RLIMIT_MEMLOCK unless the process has
    /// CAP_IPC_LOCK.
    #[default]
    Rlimit,
    /// Charge against this many bytes whatever the rlimit and capabilities say.
    Limit(u64),
}

/// The limit a policy enforces here and now; `None`: unlimited.
pub fn effective_limit(policy: MemlockPolicy) -> Option<u64> {
    match policy {
        MemlockPolicy::Limit(l) => Some(l),
        MemlockPolicy::Rlimit => {
            if has_cap_ipc_lock() {
                return None;
            }
            rustix::process::getrlimit(rustix::process::Resource::Memlock).current
        }
    }
}

fn has_cap_ipc_lock() -> bool {
    rustix::thread::capabilities(None)
        .map(|c| c.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK))
        .unwrap_or(false)
}

/// The area needs more locked memory than the policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "locked memory limit too small: the area needs {needed} bytes locked, {charged} are already \
     locked by other areas, the limit (RLIMIT_MEMLOCK, `ulimit -l`) is {limit} bytes; raise it \
     (e.g. `ulimit -l {suggest_kib}`) or run with CAP_IPC_LOCK"
)]
pub struct MemlockError {
    pub needed: u64,
    pub charged: u64,
    pub limit: u64,
    pub suggest_kib: u64,
}

/// A charge, returned on drop.
#[derive(Debug)]
pub struct Charge(u64);

impl Charge {
    /// Charge `bytes`, or fail without charging anything.
    pub fn take(bytes: u64, policy: MemlockPolicy) -> Result<Self, MemlockError> {
        let limit = effective_limit(policy);
        let mut cur = CHARGED.load(Ordering::Relaxed);
        loop {
            let new = cur.saturating_add(bytes);
            if let Some(limit) = limit {
                if new > limit {
                    return Err(MemlockError {
                        needed: bytes,
                        charged: cur,
                        limit,
                        suggest_kib: new.div_ceil(1024),
                    });
                }
            }
            match CHARGED.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(Self(bytes)),
                Err(c) => cur = c,
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.0
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        CHARGED.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// The charge counter is process-wide: unit tests that create areas hold this so the test
/// below sees only its own charges.
#[cfg(test)]
pub(crate) static TEST_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_enforced_and_names_the_numbers() {
        let _serial = TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let base = charged_bytes();
        let limit = base + 10_000;
        let a = Charge::take(6000, MemlockPolicy::Limit(limit)).unwrap();
        let e = Charge::take(6000, MemlockPolicy::Limit(limit)).unwrap_err();
        assert_eq!((e.needed, e.limit), (6000, limit));
        assert!(e.charged >= 6000);
        assert!(e.to_string().contains(&limit.to_string()), "{e}");
        drop(a);
        let b = Charge::take(6000, MemlockPolicy::Limit(limit + 6000)).unwrap();
        assert_eq!(b.bytes(), 6000);
    }
}
