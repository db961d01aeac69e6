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

/// Makes the kernel kill `command`'s process (SIGKILL) when the process that started it dies,
/// so a killed harness leaves none behind.
pub fn dies_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // A kernel without it still runs the process.
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            Ok(())
        });
    }
}

/// Runs `command` to its end and returns its output, unless it runs longer than `budget`: then
/// it is killed and `Ok(None)` says so. Blocking.
pub fn output_within(
    command: &mut std::process::Command,
    budget: std::time::Duration,
) -> std::io::Result<Option<std::process::Output>> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read on threads of their own, so a full pipe never stalls the child.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + budget;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    Ok(status.map(|status| std::process::Output {
        status,
        stdout,
        stderr,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_command_past_its_budget_is_killed_and_one_within_it_answers() {
        let started = Instant::now();
        let hung =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).unwrap();
        assert!(hung.is_none(), "a hung command is given up on");
        assert!(started.elapsed() < Duration::from_secs(5));
        let out = output_within(Command::new("echo").arg("hi"), Duration::from_secs(10))
            .unwrap()
            .expect("echo answers at once");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hi\n");
    }
}
