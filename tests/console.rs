//! Fast tier: the console on a real terminal (a pseudo-terminal), with a firmware guest.
//! Raw mode while the guest runs, `C-a h` and `C-a x`, SIGTERM, and the terminal restored after.

mod support;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::KillOnDrop;

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");

struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

fn openpty() -> Pty {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two fds into the provided integers; name/termp/winp may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: a zeroed termios is a valid out-parameter; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal; t is a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

fn spawn_on(pty: &Pty, dir: &std::path::Path) -> KillOnDrop {
    let fw = dir.join("cmdline.elf");
    std::fs::write(&fw, ferrovm::firmware::get("cmdline").unwrap()).unwrap();
    let io = |_| Stdio::from(pty.slave.try_clone().unwrap());
    KillOnDrop::spawn(
        Command::new(FERROVM)
            .args(["run", "--kernel"])
            .arg(&fw)
            .args(["--cmdline", "halt"])
            .stdin(io(0))
            .stdout(io(1))
            .stderr(io(2)),
    )
    .unwrap()
}

/// Reads from the master until `needle` shows up (or panics after 20 s).
fn read_until(master: &mut std::fs::File, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; got {seen:?}"
        );
        let mut p = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 200) } > 0 {
            let mut buf = [0u8; 1024];
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The child's exit status; panics (and the guard kills the child) if it runs on for 20 s.
fn wait(child: &mut KillOnDrop) -> i32 {
    match child.wait_timeout(Duration::from_secs(20)).unwrap() {
        Some(st) => st.code().unwrap_or(-1),
        None => panic!("ferrovm did not exit"),
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-console-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn escape_keys_and_terminal_restore() {
    let dir = scratch("escape");
    let mut pty = openpty();
    let before = termios(&pty.slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a new pty starts in cooked mode"
    );
    let mut child = spawn_on(&pty, &dir);
    let mut seen = String::new();
    read_until(&mut pty.master, &mut seen, "cmdline: halt");
    let during = termios(&pty.slave);
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw while running"
    );
    pty.master.write_all(b"\x01h").unwrap();
    read_until(&mut pty.master, &mut seen, "C-a x  exit ferrovm");
    pty.master.write_all(b"\x01x").unwrap();
    read_until(&mut pty.master, &mut seen, "quit from console");
    assert_eq!(wait(&mut child), 0);
    assert!(
        same_termios(&before, &termios(&pty.slave)),
        "terminal restored after C-a x"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_stops_cleanly_and_restores_terminal() {
    let dir = scratch("sigterm");
    let mut pty = openpty();
    let before = termios(&pty.slave);
    let mut child = spawn_on(&pty, &dir);
    let mut seen = String::new();
    read_until(&mut pty.master, &mut seen, "cmdline: halt");
    child.signal(libc::SIGTERM);
    assert_eq!(wait(&mut child), 0);
    read_until(&mut pty.master, &mut seen, "stopped");
    assert!(
        same_termios(&before, &termios(&pty.slave)),
        "terminal restored after SIGTERM"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
