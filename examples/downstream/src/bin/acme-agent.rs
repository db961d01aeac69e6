//! acme's device agent: every 2 s, one JSON report over plain NATS (std only, no client
//! library: the wire protocol is a few lines). Before each report it reads its desired state
//! from its key of a JetStream KV bucket (a direct get) and applies a newer generation: an
//! `applying` report, then the state written beside the old one, synced, and renamed over it.

use acme_device_tests::{AcmeConfig, AcmeDesired, AcmeReport, DESIRED_BUCKET};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One connection to the server, for one round of the loop.
struct Nats {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// This connection's own reply subject: replies to it reach no other device.
    inbox: String,
}

impl Nats {
    fn connect(config: &AcmeConfig) -> std::io::Result<Self> {
        let addr = config.nats_url.trim_start_matches("nats://");
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut nats = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            inbox: format!("_INBOX.{}.acme.{}.{nanos}", config.id, std::process::id()),
        };
        let connect = serde_json::json!({"user": config.user, "pass": config.password,
            "verbose": false, "headers": true, "no_responders": true});
        write!(nats.writer, "CONNECT {connect}\r\nSUB {} 1\r\n", nats.inbox)?;
        Ok(nats)
    }

    /// Publishes `payload` on `subject`; returns once the server has processed it.
    fn publish(&mut self, subject: &str, payload: &[u8]) -> std::io::Result<()> {
        write!(self.writer, "PUB {subject} {}\r\n", payload.len())?;
        self.writer.write_all(payload)?;
        self.writer.write_all(b"\r\nPING\r\n")?;
        // PONG comes after the server has processed the PUB (INFO and +OK may come first).
        loop {
            match self.line()? {
                l if l.starts_with("PONG") => return Ok(()),
                l if l.starts_with("-ERR") => return Err(std::io::Error::other(l)),
                _ => {}
            }
        }
    }

    /// The last value of `key` in the KV bucket `bucket` (`None`: no value, or deleted).
    fn kv_get(&mut self, bucket: &str, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        write!(
            self.writer,
            "PUB $JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key} {} 0\r\n\r\n",
            self.inbox
        )?;
        loop {
            let line = self.line()?;
            let words: Vec<&str> = line.split_whitespace().collect();
            // HMSG <subject> <sid> [reply-to] <header bytes> <total bytes>; a MSG has no
            // header count. Every message's body is read, ours or not, so the next line read
            // is a protocol line.
            match words.as_slice() {
                ["MSG", .., total] => {
                    self.reader.read_exact(&mut vec![0; parse(total)? + 2])?;
                }
                ["HMSG", subject, .., headers, total] => {
                    let (headers, total): (usize, usize) = (parse(headers)?, parse(total)?);
                    let mut body = vec![0; total + 2]; // and the CRLF after it
                    self.reader.read_exact(&mut body)?;
                    if *subject != self.inbox {
                        continue;
                    }
                    if headers > total {
                        return Err(std::io::Error::other(format!("a bad frame: {line}")));
                    }
                    let head = String::from_utf8_lossy(&body[..headers]).into_owned();
                    let status = head.lines().next().unwrap_or_default();
                    let code = status.split_whitespace().nth(1);
                    let value = &body[headers..total];
                    return match code {
                        // A delete or a purge leaves a marker with no value.
                        None if value.is_empty() => Ok(None),
                        None => Ok(Some(value.to_vec())),
                        Some("404") => Ok(None),
                        Some(_) => Err(std::io::Error::other(format!(
                            "reading {key} of the KV bucket {bucket}: {} (the bucket must \
                             exist and allow direct gets)",
                            status.trim()
                        ))),
                    };
                }
                ["PING"] => self.writer.write_all(b"PONG\r\n")?,
                [w, ..] if w.starts_with("-ERR") => return Err(std::io::Error::other(line)),
                _ => {}
            }
        }
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("the server closed the connection"));
        }
        Ok(line)
    }
}

fn parse(n: &str) -> std::io::Result<usize> {
    n.parse().map_err(std::io::Error::other)
}

/// Writes `desired` beside `path`, syncs it, renames it over `path` and syncs the directory:
/// a power cut leaves the old state or the new, never half of one.
fn keep(path: &Path, desired: &AcmeDesired) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".acme-new");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(desired)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(())
}

fn applied(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<AcmeDesired>(&bytes)
        .ok()
        .map(|d| d.generation)
}

/// One round: apply a newer desired state if there is one, then report.
fn round(config: &AcmeConfig, boot: &str) -> std::io::Result<()> {
    let mut nats = Nats::connect(config)?;
    let subject = format!("acme.reports.{}", config.id);
    let state = Path::new(&config.state);
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    let report = |applied, applying| AcmeReport {
        boot: boot.to_owned(),
        t: now(),
        applied,
        applying,
    };
    let mut have = applied(state);
    // A desired state it cannot read is logged; the device still reports what it runs.
    let desired = nats.kv_get(DESIRED_BUCKET, &config.id).unwrap_or_else(|e| {
        eprintln!("acme-agent: {e}");
        None
    });
    if let Some(bytes) = desired {
        match serde_json::from_slice::<AcmeDesired>(&bytes) {
            Ok(desired) if have.is_none_or(|g| desired.generation > g) => {
                let applying = report(have, Some(desired.generation));
                nats.publish(&subject, &serde_json::to_vec(&applying)?)?;
                keep(state, &desired)?;
                have = Some(desired.generation);
            }
            Ok(_) => {}
            Err(e) => eprintln!("acme-agent: a desired state it cannot read: {e}"),
        }
    }
    nats.publish(&subject, &serde_json::to_vec(&report(have, None))?)
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
    // A simulated device (a host process standing for a device) is told its boot.
    let boot = std::env::var("DEVICELAB_SIMULATED_BOOT_ID").unwrap_or_else(|_| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_owned())
            .unwrap_or_default()
    });
    loop {
        if let Err(e) = round(&config, &boot) {
            eprintln!("acme-agent: {e}");
        }
        std::thread::sleep(Duration::from_millis(config.interval_ms));
    }
}
