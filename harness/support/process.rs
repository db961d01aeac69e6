//! Whether a process that recorded itself still runs: its pid and its start time, so a
//! reused pid is not mistaken for it.

/// This process's start time from /proc/self/stat.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) may contain spaces, so count after its ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether the process that recorded (`pid`, `start_time`) still runs. A start time of 0 means
/// it could not be read when recorded: then any process with that pid counts as the owner, so
/// a live run is never taken for dead (at worst a dead one is reaped a little later).
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    match process_start_time(pid) {
        Some(now) => start_time == 0 || now == start_time,
        None => false,
    }
}
