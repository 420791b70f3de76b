//! Assembles the firmware/ guest programs with GNU as + ld into ELF files in OUT_DIR, and
//! builds the static guest init of `ferrovm run -- CMD` (src/oneshot/init.c).

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("firmware: cannot run {what} ({e}); install binutils (apt-get install binutils)")
    });
    assert!(status.success(), "firmware: {what} failed: {cmd:?}");
}

/// Builds the guest init of `ferrovm run -- CMD` (static C). A host without a static C
/// library still builds ferrovm: the init is then empty and command mode says what is missing.
fn guest_init(out: &Path) {
    let src = Path::new("src/oneshot/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let bin = out.join("ferrovm-init");
    let built = Command::new("cc")
        .args(["-static", "-Os", "-s", "-Wall", "-o"])
        .arg(&bin)
        .arg(src)
        .status();
    if !matches!(built, Ok(s) if s.success()) {
        println!(
            "cargo:warning=cannot build the guest init ({}) statically: `ferrovm run -- CMD` \
             will not work; install gcc and libc6-dev",
            src.display()
        );
        std::fs::write(&bin, b"").expect("write an empty guest init");
    }
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    guest_init(&out);
    syscall_names(&out);
    let dir = Path::new("firmware");
    println!("cargo:rerun-if-changed=firmware");
    let mut names = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("firmware/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "S"))
        .collect();
    entries.sort();
    for src in entries {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        // NAME.ld links NAME.S where it must sit elsewhere than link.ld's 1 MiB.
        let own = dir.join(format!("{name}.ld"));
        let script = if own.exists() {
            own
        } else {
            dir.join("link.ld")
        };
        // gcc runs the C preprocessor on .S (for #define), then GNU as.
        run(
            Command::new("cc")
                .args(["-c", "-nostdlib", "-ffreestanding", "-I"])
                .arg(dir)
                .arg("-o")
                .arg(&obj)
                .arg(&src),
            "cc -c (GNU as)",
        );
        run(
            Command::new("ld")
                .args([
                    "-m",
                    "elf_x86_64",
                    "-static",
                    "-nostdlib",
                    "--build-id=none",
                    "-T",
                ])
                .arg(&script)
                .arg("-o")
                .arg(&elf)
                .arg(&obj),
            "ld",
        );
        names.push(name);
    }
    let mut code = String::from("/// Firmware programs built from firmware/*.S: (name, ELF bytes).\npub const ALL: &[(&str, &[u8])] = &[\n");
    for n in &names {
        code +=
            &format!("    (\"{n}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.elf\"))),\n");
    }
    code += "];\n";
    std::fs::write(out.join("firmware.rs"), code).expect("write firmware.rs");
}

/// x86_64 system call names from the kernel's UAPI header (the seccomp report names the
/// forbidden call); an empty table when the header is missing (numbers only, then).
fn syscall_names(out: &Path) {
    let header = Path::new("/usr/include/x86_64-linux-gnu/asm/unistd_64.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let text = std::fs::read_to_string(header).unwrap_or_default();
    let mut rows = String::from("pub static SYSCALL_NAMES: &[(i64, &str)] = &[\n");
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some("#define"), Some(name), Some(nr)) = (it.next(), it.next(), it.next()) {
            if let (Some(name), Ok(nr)) = (name.strip_prefix("__NR_"), nr.parse::<i64>()) {
                rows += &format!("    ({nr}, {name:?}),\n");
            }
        }
    }
    rows += "];\n";
    std::fs::write(out.join("syscall_names.rs"), rows).expect("write syscall_names.rs");
}
