//! A hugetlb memfd area where huge pages exist: the test makes 4 free 2 MiB pages (root may
//! raise vm.nr_hugepages), builds an area on them, receives into it, and puts the setting back.

use std::io::Write;
use std::os::fd::AsFd;

use zcrx::{AreaReg, Cqe, Ifq, IfqReg, MemoryKind};

const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read(p: &str) -> u64 {
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

/// Puts nr_hugepages back however the test ends.
struct Restore(u64);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, self.0.to_string());
    }
}

#[test]
fn hugetlb_area_receives_and_is_released() {
    let before = read(NR);
    let _restore = Restore(before);
    std::fs::write(NR, (before + 4).to_string()).expect("raising vm.nr_hugepages needs root");
    assert!(read(FREE) >= 4, "the kernel gave no huge pages");
    let free_before = read(FREE);

    let reg = IfqReg { rx_buf_len: 2 << 20, rq_entries: 16, ..IfqReg::default() };
    let area = AreaReg::new(MemoryKind::HugetlbMemfd { page_size: 2 << 20 }, 8 << 20);
    let (mut ifq, mut user) = Ifq::register(reg, area, None).unwrap();
    assert_eq!(read(FREE), free_before - 4, "the area holds its huge pages");
    assert_eq!(ifq.area().num_niovs(), 4);

    let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    a.write_all(&data).unwrap();
    drop(a);
    let mut got = Vec::new();
    let mut cqes = [Cqe::default(); 8];
    loop {
        let o = ifq.copy_stream(b.as_fd(), &Default::default()).unwrap();
        let n = user.recv(&mut cqes);
        for c in &cqes[..n] {
            got.extend_from_slice(user.data(c).unwrap());
            user.refill(c).unwrap();
        }
        user.flush_rq();
        if o == zcrx::CopyOutcome::Eof {
            break;
        }
    }
    assert_eq!(got, data);
    drop(ifq);
    drop(user);
    assert_eq!(read(FREE), free_before, "the huge pages are back");
}
