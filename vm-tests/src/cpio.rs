//! A minimal writer for the "newc" cpio format (the one the kernel unpacks as an initramfs).
//!
//! Written here instead of calling `cpio` so that the archive can hold device nodes
//! (`/dev/console`) and root-owned entries without running as root, and so that the layout is
//! exact and reproducible (mtime 0, inode numbers in order).

use std::collections::BTreeSet;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An in-memory newc archive. Parent directories are added automatically (mode 0755).
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: usize, rdev: (u32, u32)) {
        assert!(!name.starts_with('/'), "cpio names are relative: {name}");
        assert!(
            self.names.insert(name.to_string()),
            "duplicate cpio entry {name}"
        );
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(size).expect("cpio entry over 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            (name.len() + 1) as u32,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn parents(&mut self, name: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !self.dirs.contains(&acc) {
                let d = acc.clone();
                self.dir(&d, 0o755);
            }
        }
    }

    /// A directory (idempotent).
    pub fn dir(&mut self, name: &str, perm: u32) {
        let name = name.trim_start_matches('/').trim_end_matches('/');
        if name.is_empty() || self.dirs.contains(name) {
            return;
        }
        self.parents(name);
        self.dirs.insert(name.to_string());
        self.header(name, S_IFDIR | perm, 2, 0, (0, 0));
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.parents(name);
        self.header(name, S_IFREG | perm, 1, data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A symbolic link `name -> target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        let name = name.trim_start_matches('/');
        self.parents(name);
        self.header(name, S_IFLNK | 0o777, 1, target.len(), (0, 0));
        self.buf.extend_from_slice(target.as_bytes());
        self.pad();
    }

    /// A character device node.
    pub fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        let name = name.trim_start_matches('/');
        self.parents(name);
        self.header(name, S_IFCHR | perm, 1, 0, (major, minor));
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.names.remove("TRAILER!!!");
        self.header("TRAILER!!!", 0, 1, 0, (0, 0));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc() {
        let mut c = Cpio::new();
        c.file("bin/x", 0o755, b"hello");
        c.chardev("dev/console", 0o600, 5, 1);
        let b = c.finish();
        // bin (dir), bin/x, dev (dir), dev/console, trailer
        assert_eq!(b.windows(6).filter(|w| w == b"070701").count(), 5);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(&b[..6], b"070701");
        // The first entry is the parent directory "bin".
        assert_eq!(&b[110..114], b"bin\0");
        let mode = u32::from_str_radix(std::str::from_utf8(&b[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, S_IFDIR | 0o755);
    }
}
