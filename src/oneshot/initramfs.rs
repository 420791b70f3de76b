//! The initramfs of a command run: a newc cpio archive holding the guest init, the kernel
//! modules it needs (found from the kernel's own module tree) and the command's description.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

/// A newc ("070701") cpio archive being written.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, data, (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor));
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// A kernel's module tree: `modules.dep` and `modules.builtin` of one release.
pub struct ModuleTree {
    pub dir: PathBuf,
    /// Module name -> (path relative to `dir`, dependency paths).
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

/// `kernel/fs/fuse/virtiofs.ko.xz` -> `virtiofs` (dashes as underscores, as modprobe does).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.find(".ko").map_or(base, |i| &base[..i]);
    stem.replace('-', "_")
}

impl ModuleTree {
    pub fn open(dir: &Path) -> io::Result<ModuleTree> {
        let dep = std::fs::read_to_string(dir.join("modules.dep"))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let deps = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| {
                let list = d.split_whitespace().map(str::to_string).collect();
                (module_name(m), (m.trim().to_string(), list))
            })
            .collect();
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            deps,
            builtin: builtin.lines().map(module_name).collect(),
        })
    }

    /// Paths (relative to the tree) of the `wanted` modules and their dependencies, in load
    /// order; built-in modules are left out. Err names a required module the kernel lacks.
    pub fn resolve(&self, wanted: &[(&str, bool)]) -> Result<Vec<String>, String> {
        let mut order = Vec::new();
        for &(name, required) in wanted {
            let name = name.replace('-', "_");
            if self.builtin.contains(&name) {
                continue;
            }
            match self.deps.get(&name) {
                Some((path, _)) => self.visit(path, &mut order, 0),
                None if required => return Err(name),
                None => {}
            }
        }
        Ok(order)
    }

    fn visit(&self, path: &str, order: &mut Vec<String>, depth: usize) {
        if order.iter().any(|p| p == path) || depth > 32 {
            return;
        }
        if let Some((_, deps)) = self.deps.get(&module_name(path)) {
            for d in deps {
                self.visit(d, order, depth + 1);
            }
        }
        order.push(path.to_string());
    }
}

/// The release string of a bzImage (`6.1.0-57-cloud-amd64`), from its setup header.
pub fn kernel_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize;
    if off == 0 {
        return None;
    }
    let s = image.get(off + 0x200..)?;
    let end = s.iter().take(256).position(|&b| b == 0 || b == b' ')?;
    std::str::from_utf8(&s[..end]).ok().map(str::to_string)
}

/// Where the modules of `kernel` are: a `modules/` folder beside it (guest-images' layout),
/// else `/lib/modules/<its release>`.
pub fn find_modules(kernel: &Path) -> Option<PathBuf> {
    let beside = kernel.parent()?.join("modules");
    if beside.join("modules.dep").exists() {
        return Some(beside);
    }
    let mut head = vec![0u8; 0x4000];
    let n = std::io::Read::read(&mut std::fs::File::open(kernel).ok()?, &mut head).ok()?;
    let release = kernel_release(&head[..n])?;
    let dir = Path::new("/lib/modules").join(release);
    dir.join("modules.dep").exists().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("d");
        c.file("d/f", 0o644, b"hello");
        c.char_dev("dev/console", 5, 1);
        let a = c.finish();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("d/f\0"));
        assert!(s.contains("hello"));
        assert!(s.ends_with("TRAILER!!!\0\0\0\0") || s.contains("TRAILER!!!"));
        // The third header: mode 020600, rdev 5:1.
        let third = s.match_indices("070701").nth(2).unwrap().0;
        let field = |i: usize| &s[third + 6 + 8 * i..third + 14 + 8 * i];
        assert_eq!(field(1), "00002180");
        assert_eq!((field(9), field(10)), ("00000005", "00000001"));
    }

    #[test]
    fn modules_resolve_with_dependencies_first() {
        let dir = std::env::temp_dir().join(format!("ferrovm-mods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko.xz\n\
             kernel/fs/fuse/fuse.ko.xz:\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vsock.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_pci.ko\n",
        )
        .unwrap();
        let t = ModuleTree::open(&dir).unwrap();
        let got = t
            .resolve(&[
                ("virtio_pci", true),
                ("vmw_vsock_virtio_transport", true),
                ("virtiofs", true),
                ("ext4", false),
            ])
            .unwrap();
        assert_eq!(
            got,
            [
                "kernel/net/vmw_vsock/vsock.ko",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                "kernel/fs/fuse/fuse.ko.xz",
                "kernel/fs/fuse/virtiofs.ko.xz",
            ]
        );
        assert_eq!(t.resolve(&[("overlay", true)]).unwrap_err(), "overlay");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bzimage_release_is_read_from_the_setup_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        img[0x500..0x520].copy_from_slice(b"6.1.0-57-cloud-amd64 (debian) #1");
        assert_eq!(
            kernel_release(&img).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(kernel_release(&img[..0x100]), None);
        img[0x20e] = 0xff;
        img[0x20f] = 0xff;
        assert_eq!(kernel_release(&img), None, "an offset past the end");
    }
}
