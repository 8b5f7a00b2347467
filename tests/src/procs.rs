//! Child processes that cannot outlive the test run.
//!
//! Every process the harness starts gets `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills it
//! when the thread that spawned it exits. The harness spawns from one thread that never
//! returns (see `cluster.rs`), so the children die exactly when the test process dies: after
//! the last test, on a panic that aborts, on Ctrl-C, and even on `kill -9`, which no `Drop`
//! impl or signal handler could catch.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Starts `cmd` with its stdout and stderr appended to `log`, tied to the calling thread's
/// life (see the module doc).
pub fn spawn_tied(mut cmd: Command, log: &Path) -> std::io::Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    tie_to_parent(&mut cmd);
    cmd.spawn()
}

#[allow(unsafe_code)] // reason: pre_exec is unsafe; the closure only calls async-signal-safe prctl/getppid.
fn tie_to_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs between fork and exec in the child; prctl and getppid are
    // async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The last `n` lines of a log file, for error messages that say why a process failed.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A new directory `<temp>/<prefix>-<pid>` for this run. Directories of earlier runs whose
/// process is gone are removed first (their processes died with them, see above).
pub fn fresh_run_dir(prefix: &str) -> Result<PathBuf, String> {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-'))
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// What a process used so far, from `/proc/<pid>`: CPU seconds (user and system; `/proc`
/// counts them in USER_HZ, which Linux fixes at 100 per second), peak RSS (`VmHWM`) and
/// RSS now (`VmRSS`), in KiB. For the benches' figures.
///
/// # Panics
/// When the process is gone or `/proc` does not read as Linux writes it.
pub fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("field of /proc/pid/status")
    };
    (ticks as f64 / 100.0, kib("VmHWM:"), kib("VmRSS:"))
}

/// POSTs a generic push webhook for `project` to an agent's receiver at `addr` (as
/// `sluice run --webhook-secret-file` serves it) and returns the whole HTTP response.
///
/// # Panics
/// When the receiver cannot be reached.
pub async fn push_generic(
    addr: impl tokio::net::ToSocketAddrs,
    secret: &str,
    project: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!(r#"{{"project": "{project}"}}"#);
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "POST /hooks/generic HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("post");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
