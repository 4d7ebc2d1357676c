//! Whether the process a file names (a lock, a temporary `NAME.<pid>.tmp`, a writer's folder
//! `.NAME.tmp-<pid>`) may still be writing it: every crate that leaves such files asks here, so
//! they all judge a killed writer the same way.
//!
//! A process id alone is not enough for a lock that outlives a kill: ids come round again, soon
//! in a container whose ids restart at 1 with each start, and a lock left by a killed `gz train`
//! then names some other live process, which blocked the run folder until the lock was deleted
//! by hand. A lock therefore records its holder's start as well ([`holder_tag`]: the process
//! id and its start in clock ticks after boot, which no change of the wall clock moves), and a
//! process whose start differs is not its holder ([`holder_alive`]). On Linux both come from
//! `/proc`; elsewhere a process is assumed to run (nothing is taken from it).

/// `/proc/<pid>/stat`'s fields after the command name (state first), read as bytes: the name
/// may hold anything, `)` and spaces included, and need not be UTF-8.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = String::from_utf8_lossy(&stat[close + 1..]);
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether process `pid` runs: on Linux from `/proc/<pid>/stat` (a killed process its parent
/// has not reaped yet, a zombie, counts as gone); elsewhere it cannot tell and says yes.
pub fn process_alive(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    match stat_fields(pid) {
        Some(f) => !f.first().is_some_and(|state| matches!(state.as_str(), "Z" | "X")),
        None => std::path::Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field 22): fixed
/// for the life of the process whatever the wall clock does. `None` where unknown.
pub fn start_ticks(pid: u32) -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    // fields after "(comm) ": state is field 3, starttime field 22
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// What a lock records of this process: its id, and its start where known (`"<pid> <ticks>"`).
pub fn holder_tag() -> String {
    let pid = std::process::id();
    match start_ticks(pid) {
        Some(t) => format!("{pid} {t}"),
        None => pid.to_string(),
    }
}

/// The process id a lock's text ([`holder_tag`], or a bare id as older locks hold) names.
pub fn holder_pid(tag: &str) -> Option<u32> {
    tag.split_whitespace().next()?.parse().ok()
}

/// Whether the process a lock's text names still holds it: it runs ([`process_alive`]) and, where
/// the lock recorded its start and the system tells it now, started then (a process with the
/// same id that started at another time is another process). `None` when the text names no
/// process.
pub fn holder_alive(tag: &str) -> Option<bool> {
    let pid = holder_pid(tag)?;
    let recorded: Option<u64> = tag.split_whitespace().nth(1).and_then(|t| t.parse().ok());
    let same_start = match (recorded, start_ticks(pid)) {
        (Some(r), Some(now)) => r == now,
        _ => true,
    };
    Some(process_alive(pid) && same_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live process holds a lock that records its start; the same id with another start (a
    /// killed holder's id come round again) does not; a bare id (an older lock) is judged by the
    /// id alone; a dead process holds nothing.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_lock_is_held_by_the_process_that_started_when_it_says() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let ticks = start_ticks(pid).expect("a start");
        assert_eq!(holder_alive(&format!("{pid} {ticks}\n")), Some(true));
        assert_eq!(holder_alive(&format!("{pid} {}", ticks + 1)), Some(false));
        assert_eq!(holder_alive(&format!("{pid}")), Some(true));
        assert_eq!(holder_alive("not a pid"), None);
        let _ = child.kill();
        let _ = child.wait();
        assert!(!process_alive(pid));
        assert_eq!(holder_alive(&format!("{pid} {ticks}")), Some(false));
        // this process's own tag names it
        let own = holder_tag();
        assert_eq!(holder_pid(&own), Some(std::process::id()));
        assert_eq!(holder_alive(&own), Some(true));
        assert!(own.split_whitespace().nth(1).is_some(), "{own}");
    }
}
