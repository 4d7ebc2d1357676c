//! Whether the process a file names (a lock, a temporary `NAME.<pid>.tmp`, a writer's folder
//! `.NAME.tmp-<pid>`) may still be writing it: every crate that leaves such files asks here, so
//! they all judge a killed writer the same way.
//!
//! A process id alone is not enough: ids come round again, soon in a container whose ids
//! restart at 1 with each start, and a lock left by a killed `gz train` then names some other
//! live process, which blocked the run folder until the lock was deleted by hand. So the
//! writer is also asked to have started before the file was last written ([`started_after`]).
//! On Linux both come from `/proc`; elsewhere a process is assumed to run (nothing is taken
//! from it) and its start time is unknown.

use std::time::{Duration, SystemTime};

/// Whether process `pid` runs: on Linux from `/proc/<pid>/stat` (a killed process its parent
/// has not reaped yet, a zombie, counts as gone); elsewhere it cannot tell and says yes.
pub fn process_alive(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S …": the state follows the last ')' (comm may hold anything)
        Ok(stat) => !stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X')),
        Err(_) => std::path::Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// When process `pid` started, where the system says (Linux: its `starttime` in
/// `/proc/<pid>/stat`, clock ticks after the boot time in `/proc/stat`; the ticks are the
/// kernel's fixed `USER_HZ`, 100 on every Linux architecture gz builds for).
pub fn start_time(pid: u32) -> Option<SystemTime> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after "(comm) ": state is field 3, starttime field 22
    let ticks: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let millis = ticks.checked_mul(1000)? / USER_HZ;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(boot) + Duration::from_millis(millis))
}

/// Whether process `pid` started after `written` (with a second's slack for clocks and
/// rounding): then it did not write what was last written at `written`. `false` where the
/// start time is unknown.
pub fn started_after(pid: u32, written: SystemTime) -> bool {
    start_time(pid).is_some_and(|start| start > written + Duration::from_secs(1))
}

/// Whether process `pid`, named by a file last written at `written`, may still be its writer:
/// it runs ([`process_alive`]) and did not start after the write ([`started_after`]).
pub fn may_be_writing(pid: u32, written: SystemTime) -> bool {
    process_alive(pid) && !started_after(pid, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live process started before a file it could have written; one started after a file
    /// (its id come round again) is not taken for its writer.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_started_after_a_file_did_not_write_it() {
        let before = SystemTime::now() - Duration::from_secs(30);
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).expect("a start time");
        let now = SystemTime::now();
        // (to the tick: within a few seconds of now)
        assert!(
            start <= now + Duration::from_secs(2) && start + Duration::from_secs(10) >= now,
            "{start:?} vs {now:?}"
        );
        assert!(process_alive(pid) && may_be_writing(pid, now));
        assert!(started_after(pid, before) && !may_be_writing(pid, before));
        assert!(!started_after(pid, now + Duration::from_secs(5)));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!process_alive(pid) && !may_be_writing(pid, now));
        // this process started long before now
        assert!(!started_after(std::process::id(), now));
    }
}
