//! The faults a field device meets, on demand: verbs on a [`Vm`], each undone by its
//! counterpart and at the latest when the handle goes (the domain, and with it every guest-side
//! change, is destroyed; a partition's network filter goes with the domain's interface). Each
//! is logged with the time it took effect ([`Vm::fault_log`]).
//!
//! | verb | where it acts |
//! | --- | --- |
//! | `unplug_network` / `plug_network` | libvirt: the interface's link state (the guest sees carrier loss) |
//! | `partition` / `heal` | libvirt: a network filter on the interface drops every frame, both ways |
//! | `degrade_link` / `restore_link` | the guest: `tc netem` on its egress (this host's kernel has no netem) |
//! | `freeze` / `thaw` | libvirt: the domain is suspended and resumed |
//! | `set_clock` / `restore_clock` | the guest's clock (`date`) and its RTC for later boots (libvirt `<clock>`) |
//! | `fill_disk` / `free_disk` | the guest's root file system: one preallocated file |

use super::error::VmError;
use super::handle::Vm;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the guest reads its clock: seconds since the epoch, with nanoseconds (GNU date).
const CLOCK_COMMAND: &str = "date +%s.%N";

/// How the guest reads how long it has run (`CLOCK_BOOTTIME`, which no clock step moves), in
/// seconds.
pub(crate) const UPTIME_COMMAND: &str = "cut -d ' ' -f 1 /proc/uptime";

/// A round trip short enough for a clock reading to be taken as it is (its error is half of
/// it); a longer one is read again, up to three times.
const CLOCK_READ_ENOUGH: Duration = Duration::from_millis(500);

/// How far the guest's clock may be from the host's once [`Vm::restore_clock`] stepped it: an
/// SSH round trip or two, under emulation on a busy host.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(5);

/// A bad link, as `tc netem` shapes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadLink {
    /// Delay added to every packet the device sends (millisecond resolution).
    pub latency: Duration,
    /// How far each packet's delay may vary around `latency`, either way.
    pub jitter: Duration,
    /// Packets lost, in percent.
    pub loss_percent: f64,
    /// A rate cap in kbit/s, if any.
    pub rate_kbit: Option<u64>,
}

impl BadLink {
    fn netem_args(&self) -> String {
        let mut args = format!(
            "delay {}ms {}ms loss {}%",
            self.latency.as_millis(),
            self.jitter.as_millis(),
            self.loss_percent
        );
        if let Some(rate) = self.rate_kbit {
            args.push_str(&format!(" rate {rate}kbit"));
        }
        args
    }
}

/// The file `fill_disk` fills the root file system with.
const FILL_FILE: &str = "/var/devicelab-fill";
/// The guest's interface with the default route.
const DEFAULT_DEV: &str = "$(ip -o route show default | awk '{print $5; exit}')";

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

impl Vm {
    /// The faults injected so far, with the time each took effect.
    pub fn fault_log(&self) -> Vec<(String, SystemTime)> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn log_fault(&self, what: String) {
        tracing::info!("VM {}: fault: {what}", self.name());
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((what, SystemTime::now()));
    }

    async fn libvirt_call(
        &self,
        call: impl FnOnce(
            &crate::host::libvirt::Libvirt,
            &virt::domain::Domain,
            &str,
        ) -> Result<(), crate::host::libvirt::LibvirtError>
        + Send
        + 'static,
    ) -> Result<(), VmError> {
        let name = self.name().to_owned();
        Ok(self
            .owned
            .libvirt
            .run(move |lv| call(lv, &lv.domain(&name)?, &name))
            .await?)
    }

    /// The cable is pulled: the interface's link goes down and the guest sees carrier loss.
    pub async fn unplug_network(&self) -> Result<(), VmError> {
        self.libvirt_call(|lv, dom, name| lv.set_link(dom, name, false))
            .await?;
        self.log_fault("network unplugged (link down)".into());
        Ok(())
    }

    /// The cable is back.
    pub async fn plug_network(&self) -> Result<(), VmError> {
        self.libvirt_call(|lv, dom, name| lv.set_link(dom, name, true))
            .await?;
        self.log_fault("network plugged (link up)".into());
        Ok(())
    }

    /// Everything between the device and the rest (the NATS server, the harness's own SSH) is
    /// silently dropped while the link stays up: no reset, no ICMP, TCP keeps waiting.
    /// Commands over SSH wait until [`Vm::heal`].
    pub async fn partition(&self) -> Result<(), VmError> {
        self.session.lock().await.take();
        self.libvirt_call(|lv, dom, name| lv.set_partitioned(dom, name, true))
            .await?;
        self.log_fault(format!(
            "partitioned (the network filter {} on its interface)",
            crate::host::libvirt::PARTITION_FILTER
        ));
        Ok(())
    }

    /// Ends a partition.
    pub async fn heal(&self) -> Result<(), VmError> {
        self.libvirt_call(|lv, dom, name| lv.set_partitioned(dom, name, false))
            .await?;
        self.log_fault("healed (the network filter removed)".into());
        Ok(())
    }

    /// Whether the VM is partitioned now ([`Vm::partition`]), as libvirt says.
    pub async fn is_partitioned(&self) -> Result<bool, VmError> {
        let name = self.name().to_owned();
        Ok(self
            .owned
            .libvirt
            .run(move |lv| lv.is_partitioned(&lv.domain(&name)?, &name))
            .await?)
    }

    /// The device's link turns bad: `link`'s latency, jitter, loss and rate on everything it
    /// sends (`tc netem` in the guest, whose kernel has it; this host's does not). A power
    /// cycle restores the link (the qdisc is not persistent), as does [`Vm::restore_link`].
    pub async fn degrade_link(&self, link: BadLink) -> Result<(), VmError> {
        self.set_root_qdisc(
            &format!(
                "sudo -n modprobe sch_netem 2>/dev/null; \
                 sudo -n tc qdisc replace dev {DEFAULT_DEV} root netem {}",
                link.netem_args()
            ),
            true,
        )
        .await?;
        self.log_fault(format!("link degraded (netem {})", link.netem_args()));
        Ok(())
    }

    /// The link is good again (checked: no netem qdisc is left on the interface).
    pub async fn restore_link(&self) -> Result<(), VmError> {
        self.set_root_qdisc(
            &format!("sudo -n tc qdisc del dev {DEFAULT_DEV} root 2>/dev/null || true"),
            false,
        )
        .await?;
        self.log_fault("link restored".into());
        Ok(())
    }

    /// Runs `change`, then checks that the interface's root qdisc is netem (`netem`) or not;
    /// both in one round trip.
    async fn set_root_qdisc(&self, change: &str, netem: bool) -> Result<(), VmError> {
        let command = format!("{{ {change}; }} && sudo -n tc qdisc show dev {DEFAULT_DEV} root");
        let shown = self.succeed(&command).await?;
        if shown.contains("netem") != netem {
            return Err(VmError::UnexpectedOutput {
                vm: self.name().to_owned(),
                command,
                output: shown,
                expected: if netem {
                    "a netem root qdisc once the link is degraded (is sch_netem in the guest's kernel?)"
                } else {
                    "no netem qdisc once the link is restored"
                },
            });
        }
        Ok(())
    }

    /// The whole device stops (the domain is suspended: no CPU, no clock, no network
    /// answers) until [`Vm::thaw`].
    pub async fn freeze(&self) -> Result<(), VmError> {
        self.session.lock().await.take();
        self.libvirt_call(|lv, dom, name| lv.set_paused(dom, name, true))
            .await?;
        self.log_fault("frozen (domain suspended)".into());
        Ok(())
    }

    /// The device runs again after [`Vm::freeze`] (the domain is resumed).
    pub async fn thaw(&self) -> Result<(), VmError> {
        self.libvirt_call(|lv, dom, name| lv.set_paused(dom, name, false))
            .await?;
        self.log_fault("thawed (domain resumed)".into());
        Ok(())
    }

    /// Throws the device's clock to `to` (the epoch, or an offset from now), now and for every
    /// later boot (its RTC is set the same distance from the host's), as on a board without a
    /// battery-backed RTC after a power loss. Undone by [`Vm::restore_clock`].
    pub async fn set_clock(&self, to: SystemTime) -> Result<(), VmError> {
        let secs = unix_secs(to);
        let offset = secs - unix_secs(SystemTime::now());
        self.succeed(&format!("sudo -n date -u -s @{secs} >/dev/null"))
            .await?;
        self.libvirt_call(move |lv, dom, name| lv.set_rtc_offset(dom, name, Some(offset)))
            .await?;
        self.log_fault(format!(
            "clock thrown to {secs} s since the epoch ({offset:+} s from the host's), RTC too"
        ));
        Ok(())
    }

    /// The device's clock and RTC are the host's again (checked: the guest's clock is within
    /// [`CLOCK_TOLERANCE`] of the host's afterwards).
    pub async fn restore_clock(&self) -> Result<(), VmError> {
        self.libvirt_call(|lv, dom, name| lv.set_rtc_offset(dom, name, None))
            .await?;
        self.step_clock_to_host().await?;
        let (off, printed) = self.clock_offset().await?;
        if off.abs() > CLOCK_TOLERANCE.as_secs_f64() {
            return Err(VmError::UnexpectedOutput {
                vm: self.name().to_owned(),
                command: CLOCK_COMMAND.into(),
                output: format!("{} ({off:+.1} s from the host's)", printed.trim()),
                expected: "the host's time once the clock is restored (within CLOCK_TOLERANCE)",
            });
        }
        self.log_fault("clock restored to the host's".into());
        Ok(())
    }

    /// Seconds the guest prints for `command` ([`CLOCK_COMMAND`], [`UPTIME_COMMAND`]), and
    /// what it printed.
    async fn guest_seconds(&self, command: &str) -> Result<(f64, String), VmError> {
        let printed = self.succeed(command).await?;
        let guest = printed
            .trim()
            .parse()
            .map_err(|_| VmError::UnexpectedOutput {
                vm: self.name().to_owned(),
                command: command.into(),
                output: printed.clone(),
                expected: "a number of seconds",
            })?;
        Ok((guest, printed))
    }

    /// The guest's clock minus the host's, in seconds, and what the guest printed.
    async fn clock_offset(&self) -> Result<(f64, String), VmError> {
        self.seconds_offset(CLOCK_COMMAND).await
    }

    /// The seconds the guest prints for `command` minus the host's clock (seconds since the
    /// epoch), and what the guest printed: read against the middle of the round trip, the
    /// shortest of up to three (a busy guest answers late), so it is off by at most half that
    /// round trip.
    pub(crate) async fn seconds_offset(&self, command: &str) -> Result<(f64, String), VmError> {
        let host_now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        let mut best: Option<(f64, f64, String)> = None;
        for _ in 0..3 {
            let sent = host_now();
            let (guest, printed) = self.guest_seconds(command).await?;
            let back = host_now();
            let round_trip = back - sent;
            if best
                .as_ref()
                .is_none_or(|(shortest, ..)| round_trip < *shortest)
            {
                best = Some((round_trip, guest - (sent + back) / 2.0, printed));
            }
            if round_trip < CLOCK_READ_ENOUGH.as_secs_f64() {
                break;
            }
        }
        let (_, offset, printed) = best.expect("one reading at least");
        Ok((offset, printed))
    }

    /// Sets the guest's clock to the host's. The offset is read first ([`Vm::clock_offset`]),
    /// then `date` itself moves the clock by it, from its own reading: however late the
    /// command arrives, and however long `sudo` takes to start.
    async fn step_clock_to_host(&self) -> Result<(), VmError> {
        let (offset, _) = self.clock_offset().await?;
        self.succeed(&format!(
            "sudo -n date -u -s '{:+.9} seconds' >/dev/null",
            -offset
        ))
        .await
        .map(drop)
    }

    /// Sets the guest's clock to `base` (seconds since the epoch) plus its uptime
    /// ([`UPTIME_COMMAND`]'s seconds) as the guest reads it when `date` runs: one round trip,
    /// however late the command arrives, and whatever moved the clock meanwhile (no clock step
    /// moves the uptime).
    pub(crate) async fn set_clock_from_uptime(&self, base: f64) -> Result<(), VmError> {
        // Whole hundredths: /proc/uptime's precision, and the shell's integer arithmetic.
        let base = (base * 100.0).round() as i64;
        self.succeed(&format!(
            r#"sudo -n sh -c 'read up _ < /proc/uptime; at=$(({base} + ${{up%.*}} * 100 + 1${{up#*.}} - 100)); date -u -s "@$((at / 100)).$(printf %02d $((at % 100)))" >/dev/null'"#
        ))
        .await
        .map(drop)
    }

    /// Fills the root file system until at most `leave` bytes are free, counting the blocks
    /// ext4 reserves for root (so root's writes fail too); returns the bytes left free (the
    /// file system's own metadata may keep a few blocks more than asked).
    pub async fn fill_disk(&self, leave: u64) -> Result<u64, VmError> {
        // fallocate cannot take the very last blocks (its extents need some): written zeros
        // take what it left, 64 KiB at a time, up to `leave`.
        let out = self
            .succeed(&format!(
                "sudo -n sh -c 'free() {{ echo $(( $(stat -f -c \"%f * %S\" /) )); }}; \
                 want=$(( $(free) - {leave} )); [ $want -gt 0 ] && fallocate -l $want {FILL_FILE} 2>/dev/null; \
                 want=$(( ($(free) - {leave}) / 65536 )); \
                 [ $want -gt 0 ] && dd if=/dev/zero of={FILL_FILE}.rest bs=64k count=$want 2>/dev/null; \
                 sync; free'"
            ))
            .await?;
        let left = out.trim().parse().map_err(|_| VmError::UnexpectedOutput {
            vm: self.name().to_owned(),
            command: format!("fill the disk to {leave} bytes free"),
            output: out.clone(),
            expected: "the bytes left free",
        })?;
        self.log_fault(format!(
            "disk filled ({FILL_FILE}): {left} bytes left free (asked for at most {leave})"
        ));
        Ok(left)
    }

    /// Gives back what [`Vm::fill_disk`] took.
    pub async fn free_disk(&self) -> Result<(), VmError> {
        self.succeed(&format!(
            "sudo -n rm -f {FILL_FILE} {FILL_FILE}.rest && sync"
        ))
        .await?;
        self.log_fault("disk space given back".into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_link_renders_netem_arguments() {
        let link = BadLink {
            latency: Duration::from_millis(300),
            jitter: Duration::from_millis(50),
            loss_percent: 5.0,
            rate_kbit: None,
        };
        assert_eq!(link.netem_args(), "delay 300ms 50ms loss 5%");
        let capped = BadLink {
            rate_kbit: Some(256),
            ..link
        };
        assert_eq!(capped.netem_args(), "delay 300ms 50ms loss 5% rate 256kbit");
    }

    #[test]
    fn times_before_the_epoch_are_negative() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}
