//! Host helper processes a device backend runs on (passt, virtiofsd): found in `$PATH`, given
//! one inherited fd (a socket), their stderr kept in a private directory for the error message, and
//! killed and reaped with the device.

use std::fs::{self, File};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The first executable `name` in `$PATH`, then in `extra` directories.
pub fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A private directory for a helper's files (socket, PID file, log), removed when dropped.
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    pub fn create(kind: &str) -> io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferrovm-{kind}-{}-{n}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(PrivateDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A helper's meaningful stderr lines, joined into one (at most 4 KiB read; lines starting
/// with one of `noise` dropped).
pub fn log_message(log: &Path, noise: &[&str]) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[..text.len().min(4096)]).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !noise.iter().any(|n| l.starts_with(n)))
        .collect();
    if lines.is_empty() {
        "no message".into()
    } else {
        lines.join("; ")
    }
}

/// A running helper, killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// Starts `cmd` with stdin/stdout on /dev/null, stderr into `log`, and `fd` inherited
    /// under its own number (the caller names it in `cmd`'s arguments). No code runs between
    /// fork and exec, so std spawns with posix_spawn: a forked copy of every other fd of this
    /// process (disk images and their locks) lives only until the exec.
    /// The helper gets a process group of its own, so Ctrl-C in ferrovm's terminal stops the
    /// VM (ferrovm's handler) without killing the daemons under it first.
    pub fn spawn(mut cmd: Command, fd: RawFd, log: File) -> io::Result<Daemon> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        // SAFETY: F_SETFD on an fd the caller owns and keeps open; it only clears FD_CLOEXEC.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Daemon {
            child: cmd.spawn()?,
        })
    }

    /// The exit status if the helper has exited.
    pub fn exited(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
