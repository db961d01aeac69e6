//! acme's device agent: every 2 s, one JSON report over plain NATS (std only, no client
//! library: the wire protocol is three lines).

use acme_device_tests::{AcmeConfig, AcmeReport};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn publish(config: &AcmeConfig, report: &AcmeReport) -> std::io::Result<()> {
    let addr = config.nats_url.trim_start_matches("nats://");
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let connect =
        serde_json::json!({"user": config.user, "pass": config.password, "verbose": false});
    let payload = serde_json::to_string(report)?;
    let subject = format!("acme.reports.{}", config.id);
    write!(
        stream,
        "CONNECT {connect}\r\nPUB {subject} {}\r\n{payload}\r\nPING\r\n",
        payload.len()
    )?;
    // PONG comes after the server has processed the PUB (INFO and +OK may come first).
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.starts_with("PONG") {
            return Ok(());
        }
        if line.starts_with("-ERR") {
            return Err(std::io::Error::other(line));
        }
    }
    Err(std::io::Error::other("the server closed the connection"))
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/etc/acme/agent.json".into());
    let config: AcmeConfig = match std::fs::read(&path).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return eprintln!("acme-agent: {path}: {e}"),
        Err(e) => return eprintln!("acme-agent: {path}: {e}"),
    };
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_owned())
        .unwrap_or_default();
    loop {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let report = AcmeReport {
            id: config.id.clone(),
            boot: boot.clone(),
            t,
        };
        if let Err(e) = publish(&config, &report) {
            eprintln!("acme-agent: {e}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
