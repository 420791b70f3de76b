//! Direct mode: each case script runs on the host under `sh`, in its own process group.

use super::support::KillOnDrop;
use super::{Case, CaseOutput, Config, Mode, Outcome, Reporter};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) fn run(
    cfg: &Config,
    cases: &[Case],
    rep: &mut Reporter,
) -> Result<Option<PathBuf>, String> {
    let run_dir = super::nested::new_log_dir(cfg)?;
    let helpers = run_dir.join("helpers.sh");
    std::fs::write(&helpers, include_str!("../l1/helpers.sh"))
        .map_err(|e| format!("{}: {e}", helpers.display()))?;
    let busybox = cfg.images.join("busybox");
    for case in cases {
        let t0 = Instant::now();
        let result = run_case(cfg, case, &run_dir, &helpers, &busybox);
        if let Ok(o) = &result {
            let _ = std::fs::write(run_dir.join(format!("{}.log", case.name)), &o.output);
        }
        rep.report(
            case,
            Outcome {
                result,
                elapsed: t0.elapsed(),
            },
        );
    }
    Ok(Some(run_dir))
}

fn run_case(
    cfg: &Config,
    case: &Case,
    run_dir: &Path,
    helpers: &Path,
    busybox: &Path,
) -> Result<CaseOutput, String> {
    let dir = run_dir.join(&case.name);
    let (files, work) = (dir.join("files"), dir.join("work"));
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(&files).map_err(io)?;
    std::fs::create_dir_all(&work).map_err(io)?;
    for (src, name) in &case.files {
        let src = std::fs::canonicalize(src).map_err(|e| format!("{}: {e}", src.display()))?;
        std::os::unix::fs::symlink(&src, files.join(name)).map_err(io)?;
    }
    let script = dir.join("script.sh");
    std::fs::write(&script, &case.script).map_err(io)?;

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec 2>&1; . \"$FERROVM_HELPERS\"; . \"$0\"")
        .arg(&script)
        .current_dir(&work)
        .env("FERROVM", &cfg.ferrovm)
        .env("IMAGES", &cfg.images)
        .env("FILES", &files)
        .env("WORK", &work)
        .env("FERROVM_TEST_MODE", "direct")
        .env("FERROVM_HELPERS", helpers)
        .env("BUSYBOX", busybox)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    // Dropping the guard kills the case's whole process group (its ferrovm too).
    let mut child = KillOnDrop::group_leader(cmd.spawn().map_err(|e| format!("spawn sh: {e}"))?);
    let mut reader = child.stdout.take().unwrap();

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });

    let deadline = Instant::now() + case.timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => return Err(format!("wait: {e}")),
        }
        if Instant::now() >= deadline {
            timed_out = true;
            child.signal(libc::SIGTERM);
            let _ = child.wait_timeout(Duration::from_secs(2));
            child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Leftover background processes of the case keep the pipe open: kill them.
    child.signal(libc::SIGKILL);
    let output = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| b"(output pipe still open; output lost)".to_vec());
    let output = String::from_utf8_lossy(&output).into_owned();
    let status = if timed_out {
        None
    } else {
        use std::os::unix::process::ExitStatusExt;
        let st = status.unwrap();
        Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
    };
    Ok(CaseOutput {
        status,
        output,
        mode: Mode::Direct,
    })
}
