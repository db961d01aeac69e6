//! Reading what devices reported: one device's messages from the run's JetStream stream, in
//! the order NATS stored them, decoded by the agent's description and judged one by one.

use super::{NatsError, STREAM_NAME, js_err};
use crate::agent::description::{Decoder, Message, Report, ReportsOn};
use async_nats::jetstream::{self, consumer};
use devicelab_agent::{DEFAULT_SUBJECT_PREFIX, Status, status_subject};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a check decides about one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This is the report we were waiting for.
    Accept,
    /// Not this one; keep waiting.
    Skip,
    /// This report must not exist: fail now.
    Reject(String),
}

/// A report that names its device: a log read for one device skips other devices' reports (a
/// wildcard subject can carry several devices').
pub trait FromDevice {
    /// The id of the device the report is from.
    fn device_id(&self) -> &str;
}

impl FromDevice for Status {
    fn device_id(&self) -> &str {
        &self.device_id
    }
}

impl FromDevice for Report {
    fn device_id(&self) -> &str {
        &self.device_id
    }
}

/// A report as the stream stored it: its stream sequence, when the server stored it (the
/// server's clock, in ms since the epoch), and the report.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    /// The message's sequence number in the stream.
    pub seq: u64,
    /// When the server stored it: the server's clock, in milliseconds since the epoch.
    pub stored_ms: u64,
    /// The report, decoded.
    pub report: T,
}

/// Decodes one message's payload to a `T`, or says why not.
pub type DecodeAs<T> = Arc<dyn Fn(&Message<'_>) -> Result<T, String> + Send + Sync>;

/// Decodes one NATS message by `decode`, given it as a decoder sees it: its subject, its
/// headers (name and value, one pair per value) and its payload.
pub(crate) fn decode_message<T>(
    decode: &(impl Fn(&Message<'_>) -> Result<T, String> + ?Sized),
    msg: &async_nats::Message,
) -> Result<T, String> {
    let headers: Vec<(String, String)> = msg
        .headers
        .iter()
        .flat_map(|h| {
            h.iter().flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_owned()))
            })
        })
        .collect();
    decode(&Message {
        subject: msg.subject.as_str(),
        headers: &headers,
        payload: &msg.payload,
    })
}

/// How long the stream must stay unchanged after a power cut before the gate is read: a
/// report on its way when the plug was pulled (sent, not yet stored) lands well within it on
/// a network the harness owns.
pub const CUT_QUIET: Duration = Duration::from_secs(2);
/// How long the gate waits for the stream to be quiet at most.
pub const CUT_QUIET_BUDGET: Duration = Duration::from_secs(30);

/// The messages on one subject, in the order NATS stored them, each decoded to a `T`.
pub struct MessageLog<T> {
    js: jetstream::Context,
    /// The stream that stores them: the run's, or a KV bucket's.
    stream: String,
    subject: String,
    decode: DecodeAs<T>,
    /// Only this device's reports count (`None`: every report on the subject).
    device: Option<String>,
}

/// One device's reports of the reference protocol.
pub type StatusLog = MessageLog<Status>;
/// One device's reports of any agent, as its description decodes them.
pub type ReportLog = MessageLog<Report>;

impl StatusLog {
    pub(crate) fn new(client: async_nats::Client, device_id: &str) -> Self {
        MessageLog {
            js: jetstream::new(client),
            stream: STREAM_NAME.to_owned(),
            subject: status_subject(DEFAULT_SUBJECT_PREFIX, device_id),
            decode: Arc::new(|m| serde_json::from_slice(m.payload).map_err(|e| e.to_string())),
            device: Some(device_id.to_owned()),
        }
    }
}

impl ReportLog {
    pub(crate) fn new(client: async_nats::Client, on: &ReportsOn, decode: Decoder) -> Self {
        MessageLog {
            js: jetstream::new(client),
            stream: on.stream(STREAM_NAME),
            subject: on.subject(),
            decode,
            device: None,
        }
    }
}

impl<T: std::fmt::Debug + Clone + FromDevice> MessageLog<T> {
    /// The subject this log reads (a filter; it may have wildcards).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Only `device_id`'s reports are waited for; others on the same subject are skipped.
    pub fn for_device(mut self, device_id: &str) -> Self {
        self.device = Some(device_id.to_owned());
        self
    }

    /// Writes every message, in order, as JSON lines `{"seq": …, "payload": …}`: the raw
    /// payload, so what the decoder could not read is kept too.
    pub async fn dump_history(&self, path: &std::path::Path) -> Result<usize, NatsError> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            seq: u64,
            payload: &'a str,
        }
        let mut lines = Vec::new();
        if self.last_sequence().await? > 0 {
            let _ = self
                .scan(0, Duration::from_secs(5), |seq, _, raw, _| {
                    let line = Line {
                        seq,
                        payload: &String::from_utf8_lossy(raw),
                    };
                    lines.push(serde_json::to_string(&line).unwrap_or_default());
                    if lines.len() >= 100_000 {
                        Verdict::Accept
                    } else {
                        Verdict::Skip
                    }
                })
                .await;
        }
        let count = lines.len();
        tokio::fs::write(path, lines.join("\n") + "\n")
            .await
            .map_err(|source| NatsError::History {
                path: path.to_owned(),
                source,
            })?;
        Ok(count)
    }

    /// Whether `report` counts for this log: it is its device's (or the log reads every
    /// device's).
    fn is_ours(&self, report: &T) -> bool {
        self.device
            .as_deref()
            .is_none_or(|d| report.device_id() == d)
    }

    /// The stream's last sequence number (of every subject it stores): a gate, since later reports get higher numbers.
    pub async fn last_sequence(&self) -> Result<u64, NatsError> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| js_err("reading the stream state")(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// The gate after a power cut, as the trials take it: [`Self::gate_after_cut`] with
    /// [`CUT_QUIET`] and [`CUT_QUIET_BUDGET`].
    pub async fn gate(&self) -> Result<u64, NatsError> {
        self.gate_after_cut(CUT_QUIET, CUT_QUIET_BUDGET).await
    }

    /// The gate after a power cut: a stream sequence after everything this log's device sent
    /// before the plug was pulled. A report the device sent just before the cut may still be
    /// on its way; the device is off, so nothing newer can come: the gate moves past each of
    /// its reports that lands, until none has for `quiet`. Taken before the device is powered
    /// on again. Reports that keep landing for `budget` are an error: something still reports
    /// as this device. (Other devices' reports do not matter.)
    pub async fn gate_after_cut(
        &self,
        quiet: Duration,
        budget: Duration,
    ) -> Result<u64, NatsError> {
        let started = tokio::time::Instant::now();
        let mut gate = self.last_sequence().await?;
        loop {
            let mut landed = None;
            let found = self
                .scan(gate, quiet, |seq, _, _, decoded| match decoded {
                    Some(report) if self.is_ours(report) => {
                        landed = Some(seq);
                        Verdict::Accept
                    }
                    _ => Verdict::Skip,
                })
                .await;
            match found {
                Err(NatsError::StatusTimeout { .. }) => return Ok(gate),
                Err(e) => return Err(e),
                Ok(()) => gate = gate.max(landed.unwrap_or(gate)),
            }
            if started.elapsed() >= budget {
                return Err(js_err(
                    "waiting for the device's last reports after a power cut",
                )(format!(
                    "its reports on {} kept arriving for {budget:?} after the plug was \
                         pulled (the last at sequence {gate}): is something else reporting as \
                         this device?",
                    self.subject
                )));
            }
        }
    }

    /// Reads the reports after stream sequence `after`, in order, until `check` accepts one
    /// (returned with its sequence) or rejects one, or `budget` runs out. A message the decoder
    /// cannot read, or another device's, is skipped, and quoted if the wait times out.
    pub async fn wait_for(
        &self,
        after: u64,
        budget: Duration,
        check: impl FnMut(&T) -> Verdict,
    ) -> Result<(u64, T), NatsError> {
        let found = self.wait_for_stored(after, budget, check).await?;
        Ok((found.seq, found.report))
    }

    /// [`Self::wait_for`], with when the server stored the accepted report.
    pub async fn wait_for_stored(
        &self,
        after: u64,
        budget: Duration,
        mut check: impl FnMut(&T) -> Verdict,
    ) -> Result<Stored<T>, NatsError> {
        let mut found = None;
        self.scan(after, budget, |seq, stored_ms, _, decoded| match decoded {
            Some(report) if self.is_ours(report) => {
                let verdict = check(report);
                if verdict == Verdict::Accept {
                    found = Some(Stored {
                        seq,
                        stored_ms,
                        report: report.clone(),
                    });
                }
                verdict
            }
            _ => Verdict::Skip,
        })
        .await?;
        found.ok_or_else(|| js_err("reading statuses")("the accepted report went missing".into()))
    }

    /// This device's reports after `after`, in stream order, up to and including the first
    /// that `until` accepts (or an error when none does within `budget`).
    pub async fn collect(
        &self,
        after: u64,
        budget: Duration,
        mut until: impl FnMut(&T) -> bool,
    ) -> Result<Vec<Stored<T>>, NatsError> {
        let mut out = Vec::new();
        self.scan(after, budget, |seq, stored_ms, _, decoded| match decoded {
            Some(report) if self.is_ours(report) => {
                out.push(Stored {
                    seq,
                    stored_ms,
                    report: report.clone(),
                });
                if until(report) {
                    Verdict::Accept
                } else {
                    Verdict::Skip
                }
            }
            _ => Verdict::Skip,
        })
        .await?;
        Ok(out)
    }

    /// Feeds every message after `after` to `visit` (sequence, when it was stored, raw
    /// payload, decoded if the decoder took it) until it accepts or rejects one, or `budget`
    /// runs out.
    async fn scan(
        &self,
        after: u64,
        budget: Duration,
        mut visit: impl FnMut(u64, u64, &[u8], Option<&T>) -> Verdict,
    ) -> Result<(), NatsError> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("creating a consumer")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| js_err("reading statuses")(e.to_string()))?;
        let deadline = Instant::now() + budget;
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline.into(), messages.next()).await;
            let msg = match next {
                Err(_) | Ok(None) => {
                    return Err(NatsError::StatusTimeout {
                        subject: self.subject.clone(),
                        budget,
                        seen: if seen.is_empty() {
                            "nothing".into()
                        } else {
                            seen.join("; ")
                        },
                    });
                }
                Ok(Some(Err(e))) => return Err(js_err("reading statuses")(e.to_string())),
                Ok(Some(Ok(msg))) => msg,
            };
            let (seq, stored_ms) = msg.info().map_or((0, 0), |i| {
                (
                    i.stream_sequence,
                    (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
                )
            });
            let decoded = decode_message(&*self.decode, &msg);
            let verdict = visit(seq, stored_ms, &msg.payload, decoded.as_ref().ok());
            match verdict {
                Verdict::Accept => return Ok(()),
                Verdict::Skip => {
                    if seen.len() >= 20 {
                        seen.remove(0); // the last ones say most about a wait that timed out
                    }
                    seen.push(match &decoded {
                        Ok(report) => format!("#{seq} {report:?}"),
                        Err(why) => format!(
                            "#{seq} undecodable ({why}): {:?}",
                            String::from_utf8_lossy(&msg.payload[..msg.payload.len().min(200)])
                        ),
                    });
                }
                Verdict::Reject(reason) => {
                    return Err(NatsError::StatusRejected {
                        reason,
                        seq,
                        report: format!("{:?}", decoded.map_err(|e| e.to_string())),
                    });
                }
            }
        }
    }
}
