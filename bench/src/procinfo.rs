//! Child processes and what they cost: `wait4` for the peak RSS and CPU of a finished
//! child, `/proc/<pid>` for one that is still running.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A finished child.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code, or minus the signal number.
    pub code: i32,
    pub wall: Duration,
    /// `ru_maxrss` in KiB. Not the child's own peak: Linux folds the high-water mark of the
    /// address space the child had before `exec` into it, and std spawns with
    /// `CLONE_VM | CLONE_VFORK`, so that is the parent's (this process's) RSS. Children
    /// therefore report their own VmHWM; this is kept for diagnostics only.
    pub wait4_max_rss_kib: u64,
    pub user_s: f64,
    pub sys_s: f64,
}

impl Finished {
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

fn seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Waits for `pid` (a child of this process) and returns its own rusage.
pub fn wait(pid: u32, started: Instant) -> anyhow::Result<Finished> {
    let pid = pid as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context("wait4");
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ok(Finished {
        code,
        wall: started.elapsed(),
        wait4_max_rss_kib: usage.ru_maxrss as u64,
        user_s: seconds(usage.ru_utime),
        sys_s: seconds(usage.ru_stime),
    })
}

/// Runs `command` to its end with stdout into `stdout_file`; the child's cost.
pub async fn run(mut command: Command, stdout_file: &Path) -> anyhow::Result<Finished> {
    command.stdout(std::fs::File::create(stdout_file)?);
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("start {command:?}"))?;
    let pid = child.id();
    // The std Child is never waited on by std (we reap it with wait4); dropping it is fine.
    drop(child);
    tokio::task::spawn_blocking(move || wait(pid, started)).await?
}

/// SIGTERM to our own child.
pub fn terminate(pid: u32) {
    // SAFETY: plain syscall on our own child's pid.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let number = rest.trim().trim_end_matches("kB").trim();
            return Ok(number.parse()?);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// User + system CPU seconds of a running process (`/proc/<pid>/stat`, fields 14 and 15).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 2..])
        .context("/proc/pid/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field n is at index n - 3.
    let ticks: u64 = fields[14 - 3].parse::<u64>()? + fields[15 - 3].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// User + system CPU seconds of this process so far, all its threads (`getrusage`).
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU seconds of a running process, all its threads, to the nanosecond: the sum of the
/// first field (time on a CPU) of `/proc/<pid>/task/*/schedstat`. A thread that ended is
/// no longer counted, so take the difference of two readings only for a process whose
/// threads live as long as it does (Node's). Falls back to [`cpu_seconds`] (clock ticks)
/// where the kernel has no schedstat.
pub fn cpu_seconds_fine(pid: u32) -> anyhow::Result<f64> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        Err(_) => return cpu_seconds(pid),
    };
    let mut ns = 0u64;
    for task in tasks {
        let path = task?.path().join("schedstat");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                ns += text
                    .split_whitespace()
                    .next()
                    .context("empty schedstat")?
                    .parse::<u64>()
                    .with_context(|| format!("{}", path.display()))?
            }
            // A thread that ended between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return cpu_seconds(pid),
        }
    }
    Ok(ns as f64 / 1e9)
}

/// How many times `needle` occurs in a (log) file; 0 when it is not there yet.
pub fn count_in_file(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches(needle).count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fine_reading_follows_the_cpu_this_process_spends() {
        let pid = std::process::id();
        let (fine, own) = (cpu_seconds_fine(pid).unwrap(), own_cpu_seconds());
        let mut x = 0u64;
        while own_cpu_seconds() < own + 0.05 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let fine = cpu_seconds_fine(pid).unwrap() - fine;
        let own = own_cpu_seconds() - own;
        assert!(own >= 0.05, "getrusage counted {own} s");
        // Clock ticks (the fallback) are 10 ms; schedstat agrees with getrusage closer.
        assert!(
            (fine - own).abs() < 0.02,
            "schedstat counted {fine} s, getrusage {own} s"
        );
    }
}
