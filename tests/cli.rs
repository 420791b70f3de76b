//! Fast tier: the bad-input matrix of `ferrovm run`. Every option's malformed value (sizes,
//! paths, key=value lists with unknown, duplicate or empty keys) gets one line on stderr that
//! names the option, and status 1 (a value ferrovm rejects) or 2 (command-line syntax, from
//! the argument parser); never a panic and never a started guest. The table is the contract
//! the README's exit-status section documents.

use std::path::PathBuf;
use std::process::Command;

const FERROVM: &str = env!("CARGO_BIN_EXE_ferrovm");

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrovm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// (extra arguments after `run --kernel K`, status, text the one line must contain)
fn matrix(kernel: &str, file: &str) -> Vec<(Vec<String>, i32, &'static str)> {
    let k = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--kernel".to_string(), kernel.to_string()];
        v.extend(args.iter().map(|s| s.replace("FILE", file)));
        v
    };
    vec![
        // --memory
        (k(&["--memory", "12X"]), 1, "invalid memory size"),
        (k(&["--memory", "8M"]), 1, "too small"),
        (k(&["--memory", "256M,thp=maybe"]), 1, "invalid --memory"),
        (k(&["--memory", "256M,thp=on,thp=off"]), 1, "given twice"),
        (k(&["--memory", "256M,huge=on"]), 1, "unknown key"),
        (k(&["--memory", "17M,hugepages=on"]), 1, "multiple of 2M"),
        (k(&["--memory", "256M,thp"]), 1, "not key=value"),
        // --cpus, --serial, --console, --exit-stats, --cpu
        (k(&["--cpus", "0"]), 1, "--cpus 0 is out of range"),
        (k(&["--cpus", "two"]), 2, "--cpus"),
        (k(&["--serial", "file="]), 1, "invalid --serial"),
        (k(&["--console", "vga"]), 1, "invalid --console"),
        (k(&["--exit-stats=csv:x"]), 1, "--exit-stats"),
        (k(&["--cpu", "pentium"]), 1, "pentium"),
        (k(&["--cpu", "max,+nosuchflag"]), 1, "nosuchflag"),
        // --disk
        (
            k(&["--disk", "path=/nonexistent/disk.img"]),
            1,
            "/nonexistent/disk.img",
        ),
        (k(&["--disk", "readonly=on"]), 1, "--disk"),
        (k(&["--disk", "path=FILE,color=blue"]), 1, "color"),
        (k(&["--disk", "path=FILE,readonly=maybe"]), 1, "readonly"),
        (k(&["--disk", "path=FILE,format=vmdk"]), 1, "vmdk"),
        (k(&["--disk", "path=FILE,bootindex=x"]), 1, "bootindex"),
        (k(&["--disk", "path=FILE,path=FILE"]), 1, "path"),
        // --cdrom
        (
            k(&["--cdrom", "/nonexistent/cd.iso"]),
            1,
            "/nonexistent/cd.iso",
        ),
        (k(&["--cdrom", "path=FILE,readonly=off"]), 1, "read-only"),
        (
            k(&["--cdrom", "path=FILE,serial=x"]),
            1,
            "CD-ROM takes only",
        ),
        (k(&["--cdrom", ""]), 1, "--cdrom"),
        // --net
        (k(&["--net", "tap=t0,mac=zz:zz"]), 1, "mac"),
        (k(&["--net", "bridge=br0"]), 1, "--net"),
        (k(&["--net", "user,hostfwd=tcp:99999-:22"]), 1, "hostfwd"),
        // --fs, --vsock
        (k(&["--fs", "path=/tmp"]), 1, "tag"),
        (
            k(&["--fs", "tag=a,path=/nonexistent/dir"]),
            1,
            "/nonexistent/dir",
        ),
        (k(&["--fs", "tag=a,path=/tmp,cache=none"]), 1, "cache"),
        (k(&["--vsock", "cid=2,socket=/tmp/x.sock"]), 1, "cid"),
        (k(&["--vsock", "socket=/tmp/x.sock"]), 1, "cid"),
        (
            k(&["--vsock", "cid=3,socket=/tmp/x.sock,port=1"]),
            1,
            "port",
        ),
        // boot sources
        (k(&["--firmware", "bios"]), 2, "--firmware"),
        (
            k(&["--initramfs", "/nonexistent/initrd"]),
            1,
            "/nonexistent/initrd",
        ),
        (
            k(&["--cloud-init", "user-data=/nonexistent/ud"]),
            1,
            "/nonexistent/ud",
        ),
        (k(&["--ssh-key", "FILE"]), 1, "key"),
        (k(&["--reboot", "sometimes"]), 2, "--reboot"),
        (k(&["--no-such-option"]), 2, "--no-such-option"),
    ]
}

#[test]
fn every_option_rejects_bad_values_in_one_line() {
    let dir = scratch();
    let kernel = dir.join("hello.elf");
    std::fs::write(&kernel, ferrovm::firmware::get("hello").unwrap()).unwrap();
    let file = dir.join("data.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut failures = Vec::new();
    for (args, want, text) in matrix(kernel.to_str().unwrap(), file.to_str().unwrap()) {
        let o = Command::new(FERROVM)
            .arg("run")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let out = String::from_utf8_lossy(&o.stdout);
        // A syntax error is clap's: its message is the first line, then clap's hints
        // (possible values, `--help`).
        let first = err.lines().next().unwrap_or_default();
        let lines = err.trim_end().lines().count();
        let one_line = lines == 1 || (want == 2 && err.contains("--help"));
        let ok = o.status.code() == Some(want)
            && first.contains(text)
            && one_line
            && !err.contains("panicked")
            && !out.contains("Hello");
        if !ok {
            failures.push(format!(
                "{args:?}: status {:?} (want {want}), want '{text}' in one line, got: {err}",
                o.status.code()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
