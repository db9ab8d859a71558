//! Zero-copy receive over VFIO, inside a guest: open the virtio-net function bound to vfio-pci
//! with our [`VfioPci`] transport, register an ifq on it (anonymous area memory, DMA mapped
//! through the IOMMU at area creation), announce readiness with a frame sent through the NIC's
//! tx queue, then receive and verify the frames the host sends. Used by
//! `vm-tests/tests/driver_vfio.rs`; prints `ZCRX-VM: vfio-rx ...` markers on stdout.
//!
//! ```text
//! vfio_rx [--bdf BDF] [--frames N] [--phases P] [--msix] [--no-mmap] [--fault] [--timeout SECS]
//! ```
//!
//! Each phase opens the device afresh (the previous one was closed and dropped: device reset,
//! DMA unmapped, group released), sends `ready <phase>` as an Ethernet frame (ethertype 0x88b5,
//! broadcast, source = the NIC's MAC) and receives `N` test frames. A test frame's payload is
//! `"ZCRXVFIO" seq:u32le phase:u32le len:u32le` followed by pattern bytes
//! `(seq * 31 + phase * 101 + i * 7) as u8` up to the frame length `len` (Ethernet header
//! included, padding excluded). Every frame is checked byte for byte, reassembled from its
//! buffers when it spans several (`ZCRX_CQE_F_CONTD`); duplicates and gaps fail the run. Frames
//! of ethertype 0x88b5 without the magic are ignored.
//!
//! - `--msix`: MSI-X (one eventfd per queue) on the transport before registration;
//! - `--no-mmap`: BAR registers through pread/pwrite on the device fd, no mmap;
//! - `--fault`: first show the IOMMU confines the device: set the queues up by hand, post one
//!   rx buffer whose IOVA was mapped and then unmapped, send `fault-armed`, and wait until the
//!   host's next frame makes the device either fail (DEVICE_NEEDS_RESET, `is_alive() == false`)
//!   or complete the buffer with the write dropped by the IOMMU (what QEMU 7.2 does; the guest
//!   kernel logs a DMAR fault); the page must keep its contents. Then `stop` + `reconnect` the
//!   same transport and run the phases on it (phase numbers start at 1).
//!
//! Exit 0 only if every phase received every frame intact.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use driver::transport::vfio_pci::{find_pci_devices, VfioOptions, VfioPci, VIRTIO_NET_MODERN_ID, VIRTIO_PCI_VENDOR};
use driver::transport::{QueueAddrs, Transport};
use driver::virtqueue::{self, Buf, QueueMemory, SplitQueue};
use driver::{register_ifq, NetConfig};
use zcrx::{AreaReg, Cqe, DmaSegment, IfqReg, MemoryKind};

const ETHERTYPE: u16 = 0x88b5;
const MAGIC: &[u8; 8] = b"ZCRXVFIO";
/// Ethernet header + magic + seq + phase + len.
const HDR: usize = 14 + 8 + 12;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const NET_HDR_LEN: usize = 12;

fn say(s: impl AsRef<str>) {
    println!("ZCRX-VM: vfio-rx {}", s.as_ref());
}

struct Args {
    bdf: Option<String>,
    frames: u32,
    phases: u32,
    msix: bool,
    mmap: bool,
    fault: bool,
    unwind: bool,
    timeout: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        bdf: std::env::var("ZCRX_NIC").ok(),
        frames: 1000,
        phases: 1,
        msix: false,
        mmap: true,
        fault: false,
        unwind: false,
        timeout: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--bdf" => a.bdf = Some(val()?),
            "--frames" => a.frames = val()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--phases" => a.phases = val()?.parse().map_err(|e| format!("--phases: {e}"))?,
            "--timeout" => a.timeout = Duration::from_secs(val()?.parse().map_err(|e| format!("--timeout: {e}"))?),
            "--msix" => a.msix = true,
            "--no-mmap" => a.mmap = false,
            "--fault" => a.fault = true,
            "--unwind" => a.unwind = true,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

/// The pattern byte `i` (counted from the frame start) of frame `seq` in `phase`.
pub fn pattern(seq: u32, phase: u32, i: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(phase.wrapping_mul(101)) as usize).wrapping_add(i * 7) as u8
}

/// Check one reassembled frame; returns its seq, or `None` for frames that are not test frames.
fn check_frame(f: &[u8], phase: u32, frames: u32) -> Result<Option<u32>, String> {
    if f.len() < 14 || u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE {
        return Ok(None); // not ours (the link may carry other traffic)
    }
    if f.len() < HDR || &f[14..22] != MAGIC {
        return Ok(None);
    }
    let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
    let (seq, ph, len) = (u32_at(22), u32_at(26), u32_at(30) as usize);
    if ph != phase {
        return Err(format!("frame seq {seq} of phase {ph} arrived in phase {phase}"));
    }
    if seq >= frames {
        return Err(format!("frame seq {seq} out of range ({frames} frames)"));
    }
    if len < HDR || len > f.len() {
        return Err(format!("frame seq {seq}: declared length {len}, received {}", f.len()));
    }
    // Bytes past `len` can only be Ethernet padding of short frames.
    if f.len() > len.max(60) {
        return Err(format!("frame seq {seq}: {} bytes received, {len} sent", f.len()));
    }
    if let Some(i) = (HDR..len).find(|&i| f[i] != pattern(seq, phase, i)) {
        return Err(format!(
            "frame seq {seq} (len {len}): byte {i} is {:#x}, want {:#x}",
            f[i],
            pattern(seq, phase, i)
        ));
    }
    Ok(Some(seq))
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A broadcast frame from `mac` carrying `text`, padded to 60 bytes.
fn hello(mac: [u8; 6], text: &str) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(text.as_bytes());
    f.resize(f.len().max(60), 0);
    f
}

fn open(a: &Args, bdf: &str) -> Result<VfioPci, String> {
    let opts = VfioOptions { mmap_bars: a.mmap, ..VfioOptions::default() };
    VfioPci::open_with(bdf, &opts).map_err(|e| format!("open: {e}"))
}

fn describe(t: &VfioPci, bdf: &str, phase: u32) {
    let (c, n, i, d) = t.mmapped();
    say(format!(
        "open {bdf} phase {phase} queues {} common-bar {} notify-bar {} notify-mult {} mmap-common {c} mmap-notify {n} mmap-isr {i} mmap-device {}",
        t.num_queues(),
        t.caps().common.bar,
        t.caps().notify.bar,
        t.caps().notify_off_multiplier,
        d.map_or("none".to_string(), |d| d.to_string()),
    ));
}

/// Register an ifq on `t`, say ready through the tx queue, receive `a.frames` test frames of
/// `phase`, close, and check that every IOVA was unmapped.
fn receive_phase(a: &Args, mut t: VfioPci, phase: u32) -> Result<(), String> {
    let mut irq_fds = Vec::new();
    if a.msix {
        t.enable_msix(2).map_err(|e| format!("enable_msix: {e}"))?;
        for q in 0..2 {
            irq_fds.push(t.irq_fd(q).expect("enabled").try_clone().map_err(|e| format!("dup eventfd: {e}"))?);
        }
        say("msix enabled 2 vectors");
    }
    let dma = t.vfio_dma().clone();
    let reg = IfqReg { flags: 0, ..IfqReg::default() };
    let area = AreaReg::new(MemoryKind::Anonymous, 4 << 20);
    let (mut rx, mut user) =
        register_ifq(Box::new(t), reg, area, NetConfig::default()).map_err(|e| format!("register_ifq: {e}"))?;
    let mac = rx.device().mac().ok_or("no MAC in the device config")?;
    let features = rx.device().features();
    say(format!(
        "registered phase {phase} mac {} features {features:#x} niovs {} posted {} iova {}",
        mac_str(mac),
        rx.ifq().area().num_niovs(),
        rx.ifq().posted_count(),
        dma.iova_state().allocations().iter().map(|(s, l)| format!("{s:#x}+{l:#x}")).collect::<Vec<_>>().join(","),
    ));

    // Ready: tell the host through our own tx queue (the device reads it through the IOMMU).
    if !rx.device().send(&hello(mac, &format!("zcrx-vfio-rx ready {phase}"))).map_err(|e| format!("send: {e}"))? {
        return Err("tx queue full on the first frame".into());
    }
    rx.device().flush_tx();
    say(format!("ready {phase}"));

    let mut seen = vec![false; a.frames as usize];
    let (mut got, mut bytes, mut multi, mut completions, mut other) = (0u32, 0u64, 0u32, 0u64, 0u32);
    let mut frame: Vec<u8> = Vec::with_capacity(65536);
    let mut parts = 0;
    let mut cqes = [Cqe::default(); 256];
    let end = Instant::now() + a.timeout;
    while got < a.frames {
        if Instant::now() > end {
            let missing: Vec<usize> = seen.iter().enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).take(10).collect();
            return Err(format!(
                "timeout: {got} of {} frames (first missing {missing:?}), stats {:?}",
                a.frames,
                rx.device().stats()
            ));
        }
        rx.poll().map_err(|e| format!("poll: {e}"))?;
        let k = user.recv(&mut cqes);
        for c in &cqes[..k] {
            completions += 1;
            frame.extend_from_slice(user.data(c).map_err(|e| format!("data: {e}"))?);
            parts += 1;
            user.refill(c).map_err(|e| format!("refill: {e}"))?;
            if c.is_continued() {
                continue;
            }
            match check_frame(&frame, phase, a.frames)? {
                Some(seq) => {
                    if std::mem::replace(&mut seen[seq as usize], true) {
                        return Err(format!("frame seq {seq} received twice"));
                    }
                    got += 1;
                    bytes += frame.len() as u64;
                    if parts > 1 {
                        multi += 1;
                    }
                }
                None => other += 1,
            }
            frame.clear();
            parts = 0;
        }
        user.commit_rq();
        let _ = rx.device().reap_tx();
    }
    let irqs: Vec<u64> = irq_fds.iter().map(|f| f.read().unwrap_or(0)).collect();
    let stats = rx.device().stats();
    let ifq = rx.close();
    say(format!(
        "received phase {phase} frames {got} bytes {bytes} multi {multi} other {other} completions {completions} zc {} invalid {} device_errors {} irqs {irqs:?}",
        ifq.zc_count, ifq.invalid_rqes, stats.device_errors
    ));
    if ifq.zc_count != completions || ifq.copy_count != 0 || ifq.invalid_rqes != 0 || stats.device_errors != 0 {
        return Err(format!("unexpected stats {ifq:?} {stats:?}"));
    }
    drop(user);
    // The area and the queue memory are gone: nothing may stay mapped.
    let left = dma.iova_state().allocations();
    if !left.is_empty() {
        return Err(format!("IOVAs still mapped after close: {left:x?}"));
    }
    say(format!("closed phase {phase}"));
    Ok(())
}

fn queue_addrs(q: &SplitQueue) -> QueueAddrs {
    QueueAddrs {
        size: q.size(),
        desc: (q.desc_vaddr() as u64, q.desc_addr()),
        avail: (q.avail_vaddr() as u64, q.avail_addr()),
        used: (q.used_vaddr() as u64, q.used_addr()),
    }
}

/// Post an rx buffer at an IOVA that is no longer mapped; the device must fail, not write.
/// Returns the transport, reset and reconnected (at DRIVER, features next).
fn fault_then_recover(a: &Args, mut t: VfioPci) -> Result<VfioPci, String> {
    let e = |what: &'static str| move |err: driver::transport::TransportError| format!("{what}: {err}");
    let features = driver::net::negotiate(&mut t, true).map_err(|err| format!("negotiate: {err}"))?;
    let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
    let size = 64.min(t.max_queue_size(0).map_err(e("queue size"))?).min(t.max_queue_size(1).map_err(e("queue size"))?);
    let qlen = virtqueue::layout(size, event_idx).total_len;
    let page = zcrx::mem::page_size();
    let len = 2 * qlen + page;
    let mem = zcrx::mem::Mapping::anonymous(len, true).map_err(|err| format!("mmap: {err}"))?;
    let base = mem.ptr().as_ptr();
    let dma = t.dma();
    let iova = dma.map(DmaSegment { vaddr: base, len, fd: None }).map_err(|err| format!("map: {err}"))?;
    // The victim page: mapped, then unmapped; the device gets its (now dead) IOVA.
    let victim = zcrx::mem::Mapping::anonymous(page, true).map_err(|err| format!("mmap: {err}"))?;
    // SAFETY: the page is ours and nobody reads it before the check below.
    unsafe { std::ptr::write_bytes(victim.ptr().as_ptr(), 0x5a, page) };
    let dead = dma
        .map(DmaSegment { vaddr: victim.ptr().as_ptr(), len: page, fd: None })
        .map_err(|err| format!("map: {err}"))?;
    dma.unmap(dead, page).map_err(|err| format!("unmap: {err}"))?;

    // SAFETY: disjoint page-aligned parts of `mem`, which outlives the queues (dropped below).
    let mut rxq =
        unsafe { SplitQueue::new(size, QueueMemory { vaddr: base, device_addr: iova, len: qlen }, event_idx) }
            .map_err(|err| format!("rx queue: {err}"))?;
    // SAFETY: as above.
    let mut txq = unsafe {
        SplitQueue::new(
            size,
            QueueMemory { vaddr: base.add(qlen), device_addr: iova + qlen as u64, len: qlen },
            event_idx,
        )
    }
    .map_err(|err| format!("tx queue: {err}"))?;
    t.setup_queue(0, &queue_addrs(&rxq)).map_err(e("setup rx"))?;
    t.setup_queue(1, &queue_addrs(&txq)).map_err(e("setup tx"))?;
    let mut mac = [0u8; 6];
    t.read_config(0, &mut mac).map_err(e("read MAC"))?;
    t.start().map_err(e("start"))?;
    rxq.set_interrupts(false);
    txq.set_interrupts(false);

    rxq.add(&[Buf { addr: dead, len: page as u32, device_writable: true }], 7).map_err(|err| format!("add: {err}"))?;
    rxq.publish();
    if rxq.needs_kick() {
        t.notify(0);
    }
    let f = hello(mac, "zcrx-vfio-rx fault-armed");
    // SAFETY: the tx buffer (last page of `mem`) is ours until the device completes it.
    unsafe {
        let p = base.add(2 * qlen);
        std::ptr::write_bytes(p, 0, NET_HDR_LEN);
        std::ptr::copy_nonoverlapping(f.as_ptr(), p.add(NET_HDR_LEN), f.len());
    }
    let tx_buf = Buf { addr: iova + 2 * qlen as u64, len: (NET_HDR_LEN + f.len()) as u32, device_writable: false };
    txq.add(&[tx_buf], 0).map_err(|err| format!("add: {err}"))?;
    txq.publish();
    if txq.needs_kick() {
        t.notify(1);
    }
    say(format!("fault armed iova {dead:#x} status {:#x}", t.status()));

    // QEMU fails the device (DEVICE_NEEDS_RESET), or completes the buffer after the IOMMU
    // dropped the write (its bounce-buffer path), or - when the write was attempted before we
    // got here - leaves the buffer pending. Whichever: nothing may land, and the guest's IOMMU
    // driver logs the blocked write (the host test checks both).
    let end = Instant::now() + a.timeout.min(Duration::from_secs(10));
    let mut used = Vec::new();
    while t.is_alive() && used.is_empty() && Instant::now() < end {
        rxq.poll_used(usize::MAX, |u| used.push(u)).map_err(|err| format!("rx used ring: {err}"))?;
        let _ = txq.poll_used(usize::MAX, |_| {});
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = t.status();
    t.stop();
    let _ = rxq.poll_used(usize::MAX, |u| used.push(u));
    // SAFETY: the device is reset; the page is ours.
    let untouched = unsafe { std::slice::from_raw_parts(victim.ptr().as_ptr(), page) }.iter().all(|&b| b == 0x5a);
    say(format!(
        "fault detected status {status:#x} alive-after-reset {} used {} used-len {} victim-untouched {untouched}",
        t.is_alive(),
        used.len(),
        used.first().map_or(0, |u| u.len),
    ));
    drop((rxq, txq));
    dma.unmap(iova, len).map_err(|err| format!("unmap: {err}"))?;
    drop(mem);
    t.reconnect().map_err(e("reconnect"))?;
    say(format!("reconnected status {:#x}", t.status()));
    if !untouched {
        return Err("the device wrote into a page through an IOVA that was unmapped".into());
    }
    Ok(t)
}

/// A mapping failure part-way through registration, with the real container: the IOVA window
/// holds the 4 MiB area but nothing more, so mapping the queue memory fails after the area was
/// mapped, locked and charged. Everything taken so far must be given back.
fn unwind_check(a: &Args, bdf: &str) -> Result<(), String> {
    let locked0 = zcrx::mem::process_locked_bytes().map_err(|e| e.to_string())?;
    let charged0 = zcrx::memlock::charged_bytes();
    let base = 1u64 << 30;
    let opts = VfioOptions { iova_window: base..base + (4 << 20), mmap_bars: a.mmap };
    let t = VfioPci::open_with(bdf, &opts).map_err(|e| format!("open: {e}"))?;
    let dma = t.vfio_dma().clone();
    let reg = IfqReg { flags: 0, ..IfqReg::default() };
    let area = AreaReg::new(MemoryKind::Anonymous, 4 << 20);
    let err = match register_ifq(Box::new(t), reg, area, NetConfig::default()) {
        Ok(_) => return Err("registration succeeded in an IOVA window too small for the queue memory".into()),
        Err(e) => e.to_string(),
    };
    let mapped = dma.iova_state().allocations().len();
    let locked = zcrx::mem::process_locked_bytes().map_err(|e| e.to_string())? as i64 - locked0 as i64;
    let charged = zcrx::memlock::charged_bytes() as i64 - charged0 as i64;
    say(format!("unwind mapped-after {mapped} locked-delta {locked} charged-delta {charged} error {err}"));
    if mapped != 0 || locked != 0 || charged != 0 {
        return Err("a failed registration left something behind".into());
    }
    Ok(())
}

fn run(a: &Args, bdf: &str) -> Result<(), String> {
    if a.unwind {
        unwind_check(a, bdf)?;
    }
    let first = if a.fault {
        let t = open(a, bdf)?;
        describe(&t, bdf, 0);
        let t = fault_then_recover(a, t)?;
        receive_phase(a, t, 1)?;
        2
    } else {
        0
    };
    for p in first..first + a.phases.saturating_sub(u32::from(a.fault)) {
        let t = open(a, bdf)?;
        describe(&t, bdf, p);
        receive_phase(a, t, p)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vfio_rx: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(bdf) =
        a.bdf.clone().or_else(|| find_pci_devices(VIRTIO_PCI_VENDOR, VIRTIO_NET_MODERN_ID).into_iter().next())
    else {
        say("error no virtio-net PCI function");
        return ExitCode::FAILURE;
    };
    match run(&a, &bdf) {
        Ok(()) => {
            say("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format!("error {e}"));
            ExitCode::FAILURE
        }
    }
}
