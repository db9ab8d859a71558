//! QEMU's vhost-user-net frontend completes its handshake with the backend
//! (machine init and device reset, guest paused with -S: no guest kernel
//! needed). Fails with the install hint when qemu-system-x86_64 is missing (ci/install-vm.sh).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backend::{BackendConfig, Mode};

#[test]
fn qemu_vhost_user_net_handshake_is_accepted() {
    let Some(qemu) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    }) else {
        panic!("qemu-system-x86_64 is not installed: run ci/install-vm.sh");
    };
    let sock = common::Sock::new("qemu");
    let b = backend::start(BackendConfig::new(&sock.path, Mode::Reflect)).unwrap();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "q35,accel=tcg",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-display", "none", "-serial", "none", "-monitor", "none", "-S",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
        .args(["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    // Connected, and still connected (no refused request) a while later.
    let connected = b
        .wait_until(Duration::from_secs(20), |s| s.connected)
        .is_ok();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let s = b.stop();
    let log = format!(
        "qemu stdout: {}\nqemu stderr: {}\nbackend: {s:#?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(connected, "QEMU never connected\n{log}");
    assert!(alive, "QEMU exited during the handshake\n{log}");
    assert_eq!(s.last_error, None, "{log}");
    assert_eq!(s.connections, 1, "{log}");
}
