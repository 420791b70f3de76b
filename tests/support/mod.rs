//! Shared by the fast-tier tests (tests/exits.rs, console.rs, firmware.rs) and the nested
//! harness (tests/harness): child processes owned by a guard that kills and reaps them when it
//! is dropped, so a failing assertion (a panic unwinding through the test) never leaves a
//! ferrovm or a qemu running.

#![allow(dead_code)]

use std::io::{self, BufRead, Read};
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `output` lets a child run: a guard against a hung guest, not a speed assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(300);

/// A child process that is killed (SIGKILL) and waited for when the guard is dropped, unless
/// it was waited for through the guard first.
pub struct KillOnDrop {
    child: Child,
    /// Kill the child's whole process group (the child leads it: `Command::process_group(0)`).
    group: bool,
    reaped: bool,
}

impl KillOnDrop {
    /// Spawns `cmd`; the child is killed when the guard is dropped.
    pub fn spawn(cmd: &mut Command) -> io::Result<KillOnDrop> {
        cmd.spawn().map(KillOnDrop::new)
    }

    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop {
            child,
            group: false,
            reaped: false,
        }
    }

    /// Like `spawn`, and the kernel also kills the child (SIGKILL) if the spawning thread
    /// ends without dropping the guard: the test runner was killed by a signal, which runs no
    /// destructors. For a child that lives as long as the thread that starts it (L1's QEMU).
    pub fn spawn_tied(cmd: &mut Command) -> io::Result<KillOnDrop> {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        KillOnDrop::spawn(cmd)
    }

    /// Like `new`, for a child that leads its own process group: dropping the guard kills the
    /// whole group (the child's own children too).
    pub fn group_leader(child: Child) -> KillOnDrop {
        KillOnDrop {
            child,
            group: true,
            reaped: false,
        }
    }

    /// Sends `signal` to the child (or to its process group).
    pub fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        if self.reaped && !self.group {
            return; // the pid may belong to another process by now
        }
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill(2) takes plain integers; the pid is our child's (or the group it leads,
        // which stays reserved while any member lives).
        unsafe { libc::kill(target, signal) };
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let st = self.child.wait()?;
        self.reaped = true;
        Ok(st)
    }

    /// Polls for the child's exit; `None` if it is still running.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let st = self.child.try_wait()?;
        self.reaped |= st.is_some();
        Ok(st)
    }

    /// Waits at most `limit` for the child to exit; `None` if it is still running then.
    pub fn wait_timeout(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the child (its group for a group leader) and waits for it.
    pub fn kill(&mut self) {
        if self.group {
            self.signal(libc::SIGKILL);
        } else {
            // std does not signal a child it has already reaped (its pid may be reused).
            let _ = self.child.kill();
        }
        let _ = self.wait();
    }
}

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // A reaped group leader may have left members behind: they are killed too.
        if !self.reaped || self.group {
            self.kill();
        }
    }
}

/// Runs `cmd` to its end like `Command::output` (stdin is /dev/null, stdout and stderr are
/// captured), but under a guard: the child is killed if it runs longer than `HANG_GUARD`
/// (then this panics, showing what it printed) or if the caller unwinds.
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    output_within(cmd, HANG_GUARD)
}

/// `output` with an explicit time limit.
pub fn output_within(cmd: &mut Command, limit: Duration) -> io::Result<Output> {
    let mut child = KillOnDrop::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let status = child.wait_timeout(limit)?;
    let Some(status) = status else {
        child.kill();
        let (out, err) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        panic!(
            "{cmd:?} still running after {}s: killed\nstdout: {}\nstderr: {}",
            limit.as_secs(),
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Reads `r` to its end on a thread of its own.
fn read_all(r: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Sends lines of `r` to `tx` until EOF.
pub fn forward_lines(r: impl Read + Send + 'static, tx: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in io::BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

/// Waits for a line containing `needle`; returns the lines seen up to it.
pub fn wait_for(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(HANG_GUARD) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("waiting for {needle:?}: {e}; seen: {seen:#?}"),
        }
    }
}
