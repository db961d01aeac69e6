//! Reading what devices reported: one device's statuses from the run's JetStream stream, in
//! the order NATS stored them, judged one by one.

use super::{NatsError, STREAM_NAME, js_err};
use async_nats::jetstream::{self, consumer};
use devicelab_agent::{DEFAULT_SUBJECT_PREFIX, Status, status_subject};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// What a status check decides about one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This is the report we were waiting for.
    Accept,
    /// Not this one; keep waiting.
    Skip,
    /// This report must not exist: fail now.
    Reject(String),
}

/// One device's reports, in the order NATS received them.
pub struct StatusLog {
    js: jetstream::Context,
    device_id: String,
}

impl StatusLog {
    pub(crate) fn new(client: async_nats::Client, device_id: &str) -> Self {
        Self {
            js: jetstream::new(client),
            device_id: device_id.to_owned(),
        }
    }

    pub fn subject(&self) -> String {
        status_subject(DEFAULT_SUBJECT_PREFIX, &self.device_id)
    }

    /// Writes every report of this device, in order, as JSON lines `{"seq": …, "status": …}`.
    pub async fn dump_history(&self, path: &std::path::Path) -> Result<usize, NatsError> {
        let last = self.last_sequence().await?;
        let mut lines = Vec::new();
        if last > 0 {
            let _ = self
                .wait_for(0, Duration::from_secs(5), |s| {
                    lines.push(serde_json::to_string(s).unwrap_or_default());
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

    /// The stream's last sequence number: a gate, since later reports get higher numbers.
    pub async fn last_sequence(&self) -> Result<u64, NatsError> {
        let mut stream = self
            .js
            .get_stream(STREAM_NAME)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| js_err("reading the stream state")(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Reads this device's reports after stream sequence `after`, in order, until `check`
    /// accepts one (returned with its sequence) or rejects one, or `budget` runs out.
    pub async fn wait_for(
        &self,
        after: u64,
        budget: Duration,
        mut check: impl FnMut(&Status) -> Verdict,
    ) -> Result<(u64, Status), NatsError> {
        let stream = self
            .js
            .get_stream(STREAM_NAME)
            .await
            .map_err(|e| js_err("looking up the status stream")(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject(),
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
                        device_id: self.device_id.clone(),
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
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
            let status: Status = match serde_json::from_slice(&msg.payload) {
                Ok(s) => s,
                Err(e) => {
                    seen.push(format!("#{seq} unparsable ({e})"));
                    continue;
                }
            };
            match check(&status) {
                Verdict::Accept => return Ok((seq, status)),
                Verdict::Skip => {
                    if seen.len() < 20 {
                        seen.push(format!("#{seq} boot {} seq {}", status.boot_id, status.seq));
                    }
                }
                Verdict::Reject(reason) => {
                    return Err(NatsError::StatusRejected {
                        reason,
                        seq,
                        status,
                    });
                }
            }
        }
    }
}
