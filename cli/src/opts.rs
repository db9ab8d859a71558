//! Options shared by the subcommands: how to build the ifq and its area.

use clap::{Args, ValueEnum};
use zcrx::{AreaReg, IfqReg, MemlockPolicy, MemoryKind};

/// Parse "4096", "4K", "64M", "1G" (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim_start().to_ascii_lowercase();
            let m = match unit.as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                _ => return Err(format!("unknown size unit {:?} (use K, M, G)", &s[i..])),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Memory {
    /// Private anonymous memory.
    Anon,
    /// memfd (shareable with a device process).
    Memfd,
    /// hugetlb memfd with 2 MiB pages (needs free huge pages).
    Hugetlb,
}

/// How the copy fallback reads the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// readv()/recvmmsg() straight into free buffers.
    Readv,
    /// io_uring recv bundles (streams; one request armed per poll) or multishot recv
    /// (datagrams) into a provided-buffer ring over the area.
    Uring,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Readv => "readv",
            Method::Uring => "uring",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct IfqArgs {
    /// Area size (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub area_size: u64,
    /// Buffer size: a power of two >= the page size.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub rx_buf_len: u64,
    /// Refill queue entries (power of two, at most 32768).
    #[arg(long, default_value_t = 4096)]
    pub rq_entries: u32,
    /// Area memory [default: anon, memfd with --vhost-user].
    #[arg(long, value_enum)]
    pub memory: Option<Memory>,
    /// Charge the area against this many bytes instead of RLIMIT_MEMLOCK.
    #[arg(long, value_parser = parse_size)]
    pub memlock_limit: Option<u64>,
}

impl IfqArgs {
    pub fn reg(&self) -> Result<(IfqReg, AreaReg), String> {
        let rx_buf_len = u32::try_from(self.rx_buf_len)
            .map_err(|_| format!("--rx-buf-len {} is too large", self.rx_buf_len))?;
        let len = usize::try_from(self.area_size).map_err(|_| "area too large".to_string())?;
        let kind = match self.memory.unwrap_or(Memory::Anon) {
            Memory::Anon => MemoryKind::Anonymous,
            Memory::Memfd => MemoryKind::Memfd,
            Memory::Hugetlb => MemoryKind::HugetlbMemfd { page_size: 2 << 20 },
        };
        let mut area = AreaReg::new(kind, len);
        if let Some(l) = self.memlock_limit {
            area.memlock = MemlockPolicy::Limit(l);
        }
        let reg = IfqReg { rq_entries: self.rq_entries, rx_buf_len, ..IfqReg::default() };
        Ok((reg, area))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
