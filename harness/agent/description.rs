//! An on-device agent, described (what testcontainers' `Image` is to a container): what to
//! ship per architecture, which files to render per device, the Debian packages it needs, its
//! service, how it reports, and what the NATS server must offer it. The reference agent is
//! one description ([`crate::agent::reference::agent`]); a user's agent is another, and both go through
//! the same onboarding and the same verdicts.

use crate::model::arch::VmArchitecture;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Why an agent description cannot be used, found by [`AgentDescription::check`] before
/// anything boots or when a template is rendered for a device. Each names the agent and the
/// part of its description to fix.
#[derive(Debug, thiserror::Error)]
pub enum DescriptionError {
    /// A template names `{name}`, which is not one of [`TEMPLATE_VALUES`]: use one of those,
    /// or write `{{` and `}}` for literal braces.
    #[error(
        "agent {agent}: {what} names {{{name}}}, which is not a template value (use one of: {})",
        TEMPLATE_VALUES.join(", ")
    )]
    UnknownValue {
        /// The agent's name ([`AgentDescription::name`]).
        agent: String,
        /// The part holding the template (e.g. "the template for /etc/acme.toml", "the unit").
        what: String,
        /// The unknown name, without its braces.
        name: String,
    },
    /// A template has a `{` without its `}`: close it, or write `{{` for a literal brace.
    #[error("agent {agent}: {what} has an unclosed `{{` (write `{{{{` for a literal brace)")]
    Unclosed {
        /// The agent's name ([`AgentDescription::name`]).
        agent: String,
        /// The part holding the template (e.g. "the KV key", "the unit").
        what: String,
    },
    /// A per-architecture file (a [`Source::Prebuilt`] binary, a [`Package::Deb`]) has no
    /// entry for an architecture the tests boot: add one for `arch`.
    #[error(
        "agent {agent}: {what} has no file for {arch} (give one per architecture the tests boot)"
    )]
    MissingArch {
        /// The agent's name ([`AgentDescription::name`]).
        agent: String,
        /// What lacks the file: an installed file's path, or `the package <name>`.
        what: String,
        /// The first architecture without a file.
        arch: VmArchitecture,
    },
    /// Any other inconsistency (a KV bucket name JetStream refuses, a user unit whose user the
    /// description does not create); `problem` says what to change.
    #[error("agent {agent}: {problem}")]
    Invalid {
        /// The agent's name ([`AgentDescription::name`]).
        agent: String,
        /// What is wrong, and how to fix it.
        problem: String,
    },
}

/// What a template may name, as `{name}`.
pub const TEMPLATE_VALUES: [&str; 5] = [
    "device_id",
    "nats_url",
    "nats_user",
    "nats_password",
    "arch",
];

/// The values a template receives for one device. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct TemplateValues {
    /// The device's id, which its reports carry (the trials use the VM's name).
    pub device_id: String,
    /// The NATS URL as the guest sees it (the libvirt network's gateway).
    pub nats_url: String,
    /// The user the agent logs in to NATS as (the run's credentials).
    pub nats_user: String,
    /// The password for `nats_user`.
    pub nats_password: String,
    /// The device's architecture; a template receives its name (`x86_64`, `aarch64`).
    pub arch: VmArchitecture,
}

impl fmt::Debug for TemplateValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateValues")
            .field("device_id", &self.device_id)
            .field("nats_url", &self.nats_url)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &"<redacted>")
            .field("arch", &self.arch)
            .finish()
    }
}

impl TemplateValues {
    fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "device_id" => self.device_id.clone(),
            "nats_url" => self.nats_url.clone(),
            "nats_user" => self.nats_user.clone(),
            "nats_password" => self.nats_password.clone(),
            "arch" => self.arch.name().to_owned(),
            _ => return None,
        })
    }
}

/// Renders `{name}` placeholders (`{{` and `}}` are literal braces). `values` of `None` only
/// checks the names: what `AgentDescription::check` does before anything boots.
fn render_with(
    template: &str,
    values: Option<&TemplateValues>,
    agent: &str,
    what: &str,
) -> Result<String, DescriptionError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let (brace, after) = (&rest[i..i + 1], &rest[i + 1..]);
        if after.starts_with(brace) {
            out.push_str(brace);
            rest = &after[1..];
            continue;
        }
        if brace == "}" {
            out.push('}');
            rest = after;
            continue;
        }
        let end = after.find('}').ok_or_else(|| DescriptionError::Unclosed {
            agent: agent.to_owned(),
            what: what.to_owned(),
        })?;
        let name = &after[..end];
        if !TEMPLATE_VALUES.contains(&name) {
            return Err(DescriptionError::UnknownValue {
                agent: agent.to_owned(),
                what: what.to_owned(),
                name: name.to_owned(),
            });
        }
        if let Some(v) = values.and_then(|v| v.get(name)) {
            out.push_str(&v);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where a shipped file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A binary of a cargo package in the user's own workspace, built for the VM's target
    /// (cross linker set, ELF machine checked), into that workspace's target dir.
    Cargo {
        /// The `Cargo.toml` to build with (`--manifest-path`).
        manifest: PathBuf,
        /// The cargo package that has the binary (`--package`).
        package: String,
        /// The binary target to build and ship (`--bin`).
        bin: String,
    },
    /// A prebuilt binary per architecture (its ELF machine is checked).
    Prebuilt(BTreeMap<VmArchitecture, PathBuf>),
    /// The same plain file for every architecture (a script, data).
    File(PathBuf),
    /// Fixed contents.
    Bytes(Vec<u8>),
}

/// One file installed on the device (owner root; `group` may read it as `mode` allows).
#[derive(Debug, Clone)]
pub struct Installed {
    /// The onboarding step's name in reports (e.g. "binary", "config").
    pub step: String,
    /// The absolute path on the device (missing directories are created).
    pub path: String,
    /// The file's permission bits, e.g. `0o640`.
    pub mode: u32,
    /// The group that owns the file (the owner is always root).
    pub group: String,
    /// What the file holds.
    pub content: Content,
}

/// What an installed file holds: a file shipped as it is, or one rendered per device.
#[derive(Debug, Clone)]
pub enum Content {
    /// Shipped as it is (a binary is built or picked for the device's architecture).
    Shipped(Source),
    /// Rendered per device from a template (see [`TEMPLATE_VALUES`]). Values are put in as
    /// they are, not escaped for the file's format: a template for TOML, JSON or a shell
    /// script quotes them itself, or uses [`Content::Render`] with a serializer.
    Template(String),
    /// Rendered per device by code: for a config that has a typed form (serde).
    Render(Renderer),
}

/// Renders a file from a device's values.
#[derive(Clone)]
pub struct Renderer(pub Arc<dyn Fn(&TemplateValues) -> String + Send + Sync>);

impl std::ops::Deref for Renderer {
    type Target = dyn Fn(&TemplateValues) -> String + Send + Sync;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for Renderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Renderer(..)")
    }
}

/// A Debian package the device needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Package {
    /// From the guest's own mirror (needs a route out).
    Mirror(String),
    /// A `.deb` per architecture, uploaded and installed offline (air-gapped labs).
    Deb {
        /// The package's name as dpkg knows it (an installed package of the file's version is
        /// left alone).
        name: String,
        /// The `.deb` file for each architecture the tests boot.
        files: BTreeMap<VmArchitecture, PathBuf>,
    },
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// A system unit (`/etc/systemd/system/<unit>`); `text` may name `User=`.
    System {
        /// The unit's file name, e.g. `acme-agent.service`.
        unit: String,
        /// The unit file's contents, a template (see [`TEMPLATE_VALUES`]).
        text: String,
    },
    /// A user unit of `user` (`/etc/systemd/user/<unit>`), with linger so it starts at boot.
    User {
        /// The user whose systemd manager runs the unit; the description must create it
        /// ([`AgentDescription::user`]).
        user: String,
        /// The unit's file name, e.g. `acme-agent.service`.
        unit: String,
        /// The unit file's contents, a template (see [`TEMPLATE_VALUES`]).
        text: String,
    },
}

impl Service {
    /// The unit's file name.
    pub fn unit(&self) -> &str {
        match self {
            Self::System { unit, .. } | Self::User { unit, .. } => unit,
        }
    }
    /// The user whose manager runs it (`None`: the system manager).
    pub fn user(&self) -> Option<&str> {
        match self {
            Self::System { .. } => None,
            Self::User { user, .. } => Some(user),
        }
    }
    /// The unit file's contents, unrendered (a template).
    pub fn text(&self) -> &str {
        match self {
            Self::System { text, .. } | Self::User { text, .. } => text,
        }
    }
    /// Where the unit file is installed on the device.
    pub fn path(&self) -> String {
        match self {
            Self::System { unit, .. } => format!("/etc/systemd/system/{unit}"),
            Self::User { unit, .. } => format!("/etc/systemd/user/{unit}"),
        }
    }
    /// The shell command that prints this unit's last `lines` journal entries, for the failure
    /// artifacts and a failed start.
    pub fn journal_command(&self, lines: usize) -> String {
        let field = match self {
            Self::System { .. } => "_SYSTEMD_UNIT",
            Self::User { .. } => "_SYSTEMD_USER_UNIT",
        };
        format!(
            "sudo -n journalctl --no-pager -o short-precise -n {lines} {}",
            crate::ssh::session::shell_quote(&format!("{field}={}", self.unit()))
        )
    }
}

/// A user or group name `useradd`/`groupadd` accept (Debian's default rule).
fn is_account_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Why `path` cannot be installed to, if it cannot: it must be absolute and plain.
fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("is not absolute: give the full path on the device, e.g. /etc/acme/agent.toml");
    }
    if path.ends_with('/') {
        return Err("ends with `/`: name the file, not its directory");
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("holds a control character (a newline?)");
    }
    if path.split('/').any(|part| part == ".." || part == ".") {
        return Err("has a `.` or `..` part: give the plain path");
    }
    if path.contains("//") {
        return Err("has an empty part (`//`)");
    }
    Ok(())
}

/// What the verdicts need from one report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The device that sent it (a log read for one device skips other devices' reports).
    pub device_id: String,
    /// The agent's own clock, in milliseconds since the epoch.
    pub timestamp_ms: u64,
    /// Something that changes on every boot (the kernel's boot id), if the agent reports one.
    pub boot_marker: Option<String>,
    /// The agent's own report counter (+1 per report of one agent process), if it has one:
    /// the partition verdict checks that no number is missing or repeated.
    pub seq: Option<u64>,
    /// The generation of the desired state the device says it runs, for an agent with a
    /// [`Control`] part (`None`: the agent has none, or has nothing consistent to report,
    /// such as a torn state after a power cut).
    pub applied: Option<u64>,
    /// The generation the device says it is applying right now, if it says so (a power cut
    /// can be triggered on it).
    pub applying: Option<u64>,
    /// The version of the agent that sent it, if it says (what an update of the agent itself
    /// is judged by).
    pub version: Option<String>,
}

/// One stored message as a decoder sees it: its subject (a device id is often there, as in
/// most MQTT topics), its headers and its payload.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The subject it was published on (a KV put: `$KV.<bucket>.<key>`; an MQTT publish: the
    /// topic with `/` turned into `.`).
    pub subject: &'a str,
    /// Its headers, name and value, in no particular order (empty if it had none).
    pub headers: &'a [(String, String)],
    /// Its payload.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The value of the header `name` (case-sensitive, as NATS keeps them), if it has one.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The subject's `index`-th token (`.`-separated, from 0), if it has that many.
    pub fn subject_token(&self, index: usize) -> Option<&'a str> {
        self.subject.split('.').nth(index)
    }
}

/// Turns one stored message into a [`Report`], or says why it is not one.
pub type Decoder = Arc<dyn Fn(&Message<'_>) -> Result<Report, String> + Send + Sync>;

/// Where the agent's reports land. Subjects, keys and bucket names are templates
/// (`{device_id}` is the usual part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportsOn {
    /// A NATS subject; wildcards are allowed (`acme.{device_id}.>`: every subject under it).
    /// The run's stream captures it, so a device's whole history is kept in order.
    Subject(String),
    /// A key of a JetStream key-value bucket (the agent puts to `$KV.<bucket>.<key>`). The
    /// harness creates the bucket before the device boots, keeping the most history JetStream
    /// allows (64 revisions per key), unless it exists already.
    KeyValue {
        /// The bucket's name: letters, digits, `_` and `-` once rendered.
        bucket: String,
        /// The key the agent puts its reports to.
        key: String,
    },
}

impl ReportsOn {
    /// The JetStream stream that stores these reports, given the run's own stream.
    pub fn stream(&self, run_stream: &str) -> String {
        match self {
            Self::Subject(_) => run_stream.to_owned(),
            Self::KeyValue { bucket, .. } => format!("KV_{bucket}"),
        }
    }
    /// The subject (a filter, with wildcards) these reports are published on.
    pub fn subject(&self) -> String {
        match self {
            Self::Subject(s) => s.clone(),
            Self::KeyValue { bucket, key } => format!("$KV.{bucket}.{key}"),
        }
    }
}

impl fmt::Display for ReportsOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subject(s) => write!(f, "subject {s}"),
            Self::KeyValue { bucket, key } => write!(f, "key {key} of the KV bucket {bucket}"),
        }
    }
}

/// How the agent reports: where ([`ReportsOn`]), and its decoder.
#[derive(Clone)]
pub struct Reports {
    /// Where the reports land (templates, rendered per device).
    pub on: ReportsOn,
    /// Turns one stored message into a [`Report`].
    pub decode: Decoder,
}

impl Reports {
    /// Reports published on `subject` (a template; wildcards allowed), each decoded from its
    /// payload alone: the easy case, where the payload says everything ([`Reports::decoded_by`]
    /// reads the subject and headers too).
    pub fn subject(
        subject: impl Into<String>,
        decode: impl Fn(&[u8]) -> Result<Report, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            on: ReportsOn::Subject(subject.into()),
            decode: payload_only(decode),
        }
    }
    /// Reports put to `key` (a template) of the JetStream KV bucket `bucket`, each decoded
    /// from its payload alone.
    pub fn key_value(
        bucket: impl Into<String>,
        key: impl Into<String>,
        decode: impl Fn(&[u8]) -> Result<Report, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            on: ReportsOn::KeyValue {
                bucket: bucket.into(),
                key: key.into(),
            },
            decode: payload_only(decode),
        }
    }
    /// The same reports, decoded from the whole [`Message`]: for an agent whose device id is
    /// in the subject and not in the payload (most MQTT devices), or whose version is in a
    /// header.
    pub fn decoded_by(
        self,
        decode: impl Fn(&Message<'_>) -> Result<Report, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            on: self.on,
            decode: Arc::new(decode),
        }
    }
}

/// A [`Decoder`] that reads the payload alone.
fn payload_only(
    decode: impl Fn(&[u8]) -> Result<Report, String> + Send + Sync + 'static,
) -> Decoder {
    Arc::new(move |m: &Message<'_>| decode(m.payload))
}

impl fmt::Debug for Reports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reports")
            .field("on", &self.on)
            .finish_non_exhaustive()
    }
}

/// Where the platform puts the desired state: a key of a JetStream KV bucket (the harness
/// creates the bucket before the device boots) or a subject. Templates, like [`ReportsOn`].
pub type DesiredOn = ReportsOn;

/// Turns a generation and its document into the bytes the agent reads as its desired state.
pub type Encoder = Arc<dyn Fn(u64, &str) -> Vec<u8> + Send + Sync>;

/// How the platform talks to the agent: where its desired state goes, how it is encoded, and
/// the subject it answers commands on. With it the harness is the control plane:
/// [`OnboardedDevice::desire`](crate::OnboardedDevice::desire),
/// [`command`](crate::OnboardedDevice::command) and the convergence verdicts.
#[derive(Clone)]
pub struct Control {
    /// Where the desired state goes (templates, rendered per device).
    pub desired: DesiredOn,
    /// Encodes a generation and its document.
    pub encode: Encoder,
    /// A request/reply subject (template) the agent answers commands on, if it takes any.
    pub commands: Option<String>,
}

impl Control {
    /// The desired state put to `key` (a template) of the KV bucket `bucket`, encoded by
    /// `encode`.
    pub fn key_value(
        bucket: impl Into<String>,
        key: impl Into<String>,
        encode: impl Fn(u64, &str) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        Self {
            desired: DesiredOn::KeyValue {
                bucket: bucket.into(),
                key: key.into(),
            },
            encode: Arc::new(encode),
            commands: None,
        }
    }

    /// The desired state published on `subject` (a template; no wildcards), encoded by
    /// `encode`. A message on a subject reaches an agent that listens then: a device that is
    /// off misses it (a KV key does not).
    pub fn subject(
        subject: impl Into<String>,
        encode: impl Fn(u64, &str) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        Self {
            desired: DesiredOn::Subject(subject.into()),
            encode: Arc::new(encode),
            commands: None,
        }
    }

    /// The same, with commands taken on `subject` (a template), request/reply.
    pub fn with_commands(self, subject: impl Into<String>) -> Self {
        Self {
            commands: Some(subject.into()),
            ..self
        }
    }
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("desired", &self.desired)
            .field("commands", &self.commands)
            .finish_non_exhaustive()
    }
}

/// A [`Control`] part rendered for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlOn {
    /// Where this device's desired state goes.
    pub desired: DesiredOn,
    /// The subject this device answers commands on, if any.
    pub commands: Option<String>,
}

/// An agent, described.
#[derive(Debug, Clone)]
pub struct AgentDescription {
    /// Short, for logs and artifacts.
    pub name: String,
    /// A user the agent runs as, created on the device (`None`: it runs as root or as a user
    /// the image has).
    pub user: Option<String>,
    /// Debian packages the device needs, installed first (the "packages" step).
    pub packages: Vec<Package>,
    /// The files installed on the device, in order, each its own onboarding step.
    pub files: Vec<Installed>,
    /// The systemd unit that runs the agent, installed and started after the files.
    pub service: Service,
    /// Where the agent reports, and how a report is decoded.
    pub reports: Reports,
    /// Extra nats-server configuration (accounts, listeners, JetStream limits), merged into the
    /// run's server configuration, container and process alike.
    pub nats_config: String,
    /// How the platform tells the agent what to run (`None`: the agent only reports).
    pub control: Option<Control>,
    /// What the device's own NATS user may do beyond what the rest of the description
    /// implies ([`AgentDescription::permissions`]); templates. Empty for most agents.
    pub nats_permissions: Permissions,
}

/// What one device's NATS user may do: the subjects it may publish to and subscribe to
/// (wildcards allowed), and whether it may answer requests (publish once to the reply subject
/// of a message it received). Everything else the server refuses (a "Permissions Violation").
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Permissions {
    /// Subjects the device may publish to.
    pub publish: Vec<String>,
    /// Subjects the device may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer a request it received.
    pub allow_responses: bool,
}

impl Permissions {
    /// What `self` or `other` allows (each list sorted, without repeats).
    pub fn merge(mut self, other: Permissions) -> Permissions {
        self.publish.extend(other.publish);
        self.subscribe.extend(other.subscribe);
        self.allow_responses |= other.allow_responses;
        for list in [&mut self.publish, &mut self.subscribe] {
            list.sort();
            list.dedup();
        }
        self
    }
}

pub use devicelab_agent::inbox_prefix;

impl AgentDescription {
    /// Checks everything that can be checked before a VM boots: templates name known values,
    /// every architecture in `archs` has its per-architecture files, a user unit has a user.
    pub fn check(&self, archs: &[VmArchitecture]) -> Result<(), DescriptionError> {
        let agent = &self.name;
        self.check_names()?;
        for f in &self.files {
            match &f.content {
                Content::Template(t) => {
                    render_with(t, None, agent, &format!("the template for {}", f.path))?;
                }
                Content::Shipped(Source::Prebuilt(per_arch)) => {
                    self.every_arch(per_arch, archs, &f.path)?;
                }
                Content::Shipped(_) | Content::Render(_) => {}
            }
        }
        for p in &self.packages {
            if let Package::Deb { name, files } = p {
                self.every_arch(files, archs, &format!("the package {name}"))?;
            }
        }
        self.render_reports_on(None)?;
        self.render_control_on(None)?;
        self.render_permissions(None)?;
        render_with(self.service.text(), None, agent, "the unit")?;
        if let Service::User { user, .. } = &self.service
            && self.user.as_deref() != Some(user.as_str())
        {
            return Err(DescriptionError::Invalid {
                agent: agent.clone(),
                problem: format!(
                    "the user unit runs as {user}, but the description creates {:?}: set `user` to {user:?}",
                    self.user
                ),
            });
        }
        Ok(())
    }

    /// The names the onboarding script and the device use: the agent's, the user's, each
    /// step's, path's, mode's and group's, the unit's and the packages'. Each must be what the
    /// tools on the device accept, and none may be given twice.
    fn check_names(&self) -> Result<(), DescriptionError> {
        let invalid = |problem: String| DescriptionError::Invalid {
            agent: self.name.clone(),
            problem,
        };
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_graphic() && c != '/') {
            return Err(invalid(format!(
                "the agent's name {:?} must be non-empty, without spaces or `/` (it names logs and artifacts)",
                self.name
            )));
        }
        if let Some(user) = &self.user
            && !is_account_name(user)
        {
            return Err(invalid(format!(
                "the user name {user:?} is not one `useradd` accepts: lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 32"
            )));
        }
        let reserved = [
            "packages", "user", "unit", "linger", "service", "active", "flush",
        ];
        let mut steps = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::from([self.service.path()]);
        for f in &self.files {
            let step = &f.step;
            if step.is_empty()
                || !step
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(format!(
                    "the step name {step:?} (for {}) must be letters, digits, `-`, `_` and `.`",
                    f.path
                )));
            }
            if reserved.contains(&step.as_str()) {
                return Err(invalid(format!(
                    "the step name {step:?} (for {}) is one of onboarding's own ({}): pick another",
                    f.path,
                    reserved.join(", ")
                )));
            }
            if !steps.insert(step.as_str()) {
                return Err(invalid(format!(
                    "two files have the step name {step:?}: give each its own"
                )));
            }
            check_path(&f.path)
                .map_err(|why| invalid(format!("the path {:?} (step {step}) {why}", f.path)))?;
            if !paths.insert(f.path.clone()) {
                return Err(invalid(format!(
                    "the path {} is installed twice (step {step}, and another file or the unit): install each path once",
                    f.path
                )));
            }
            if f.mode > 0o7777 {
                return Err(invalid(format!(
                    "the mode {:o} of {} is not a permission mode: at most 0o7777 (e.g. 0o644)",
                    f.mode, f.path
                )));
            }
            if !is_account_name(&f.group) {
                return Err(invalid(format!(
                    "the group {:?} of {} is not a group name: lowercase letters, digits, `_` and `-`",
                    f.group, f.path
                )));
            }
        }
        let unit = self.service.unit();
        let unit_chars = |c: char| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c);
        if !unit.ends_with(".service")
            || unit.len() <= ".service".len()
            || unit.len() > 255
            || !unit.chars().all(unit_chars)
        {
            return Err(invalid(format!(
                "the unit name {unit:?} is not a systemd service name: letters, digits, `:_.\\@-`, ending in `.service` (e.g. acme-agent.service)"
            )));
        }
        if let Some(user) = self.service.user()
            && !is_account_name(user)
        {
            return Err(invalid(format!(
                "the user unit's user {user:?} is not a user name: lowercase letters, digits, `_` and `-`"
            )));
        }
        let mut packages = std::collections::BTreeSet::new();
        for p in &self.packages {
            let name = match p {
                Package::Mirror(name) | Package::Deb { name, .. } => name,
            };
            let valid = name.len() >= 2
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !valid {
                return Err(invalid(format!(
                    "the package name {name:?} is not a Debian package name: lowercase letters, digits, `+`, `-` and `.`, as `dpkg -s` knows it"
                )));
            }
            if !packages.insert(name.as_str()) {
                return Err(invalid(format!(
                    "the package {name} is listed twice: list it once"
                )));
            }
        }
        Ok(())
    }

    /// `per_arch` has an entry for each of `archs`, or the error names `what` and the first
    /// architecture missing.
    fn every_arch(
        &self,
        per_arch: &BTreeMap<VmArchitecture, PathBuf>,
        archs: &[VmArchitecture],
        what: &str,
    ) -> Result<(), DescriptionError> {
        match archs.iter().find(|a| !per_arch.contains_key(a)) {
            Some(&arch) => Err(DescriptionError::MissingArch {
                agent: self.name.clone(),
                what: what.to_owned(),
                arch,
            }),
            None => Ok(()),
        }
    }

    /// `template` with this device's values.
    pub fn render(
        &self,
        template: &str,
        values: &TemplateValues,
    ) -> Result<String, DescriptionError> {
        render_with(template, Some(values), &self.name, "a template")
    }

    /// Where this device's reports land.
    pub fn reports_on(&self, values: &TemplateValues) -> Result<ReportsOn, DescriptionError> {
        self.render_reports_on(Some(values))
    }

    /// Where this device's desired state goes and where it takes commands (`None`: the agent
    /// has no [`Control`] part).
    pub fn control_on(
        &self,
        values: &TemplateValues,
    ) -> Result<Option<ControlOn>, DescriptionError> {
        self.render_control_on(Some(values))
    }

    /// What this device's own NATS user may do, and no more:
    /// - publish its reports (a KV report: put to its key, and read the bucket's info);
    /// - read its desired state (a KV key: a direct get of that key alone, and the bucket's
    ///   info; a subject: subscribe to it);
    /// - answer commands on its command subject;
    /// - receive replies under its own inbox prefix ([`inbox_prefix`]);
    /// - what the description's [`nats_permissions`](Self::nats_permissions) add.
    pub fn permissions(&self, values: &TemplateValues) -> Result<Permissions, DescriptionError> {
        self.render_permissions(Some(values))
    }

    fn render_permissions(
        &self,
        values: Option<&TemplateValues>,
    ) -> Result<Permissions, DescriptionError> {
        let device = values.map_or("", |v| v.device_id.as_str());
        let mut p = Permissions {
            subscribe: vec![format!("{}.>", inbox_prefix(device))],
            ..Permissions::default()
        };
        match self.render_reports_on(values)? {
            ReportsOn::Subject(s) => p.publish.push(s),
            ReportsOn::KeyValue { bucket, key } => p.publish.extend([
                format!("$KV.{bucket}.{key}"),
                format!("$JS.API.STREAM.INFO.KV_{bucket}"),
            ]),
        }
        if let Some(control) = self.render_control_on(values)? {
            match control.desired {
                DesiredOn::Subject(s) => p.subscribe.push(s),
                DesiredOn::KeyValue { bucket, key } => p.publish.extend([
                    format!("$JS.API.STREAM.INFO.KV_{bucket}"),
                    format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"),
                ]),
            }
            if let Some(commands) = control.commands {
                p.subscribe.push(commands);
                p.allow_responses = true;
            }
        }
        let render = |list: &[String]| {
            list.iter()
                .map(|t| render_with(t, values, &self.name, "a NATS permission"))
                .collect::<Result<Vec<_>, _>>()
        };
        let extra = Permissions {
            publish: render(&self.nats_permissions.publish)?,
            subscribe: render(&self.nats_permissions.subscribe)?,
            allow_responses: self.nats_permissions.allow_responses,
        };
        Ok(p.merge(extra))
    }

    fn render_reports_on(
        &self,
        values: Option<&TemplateValues>,
    ) -> Result<ReportsOn, DescriptionError> {
        self.render_on(&self.reports.on, values, "report")
    }

    fn render_control_on(
        &self,
        values: Option<&TemplateValues>,
    ) -> Result<Option<ControlOn>, DescriptionError> {
        let Some(control) = &self.control else {
            return Ok(None);
        };
        let desired = self.render_on(&control.desired, values, "desired state")?;
        // The harness publishes to these: each must name one subject.
        let one_subject = |subject: &str, what: &str, example: &str| {
            if subject.split('.').any(|t| t == "*" || t == ">") {
                Err(DescriptionError::Invalid {
                    agent: self.name.clone(),
                    problem: format!(
                        "{what} {subject:?} has a wildcard: the harness publishes to it, so name one subject (e.g. {example})"
                    ),
                })
            } else {
                Ok(())
            }
        };
        match &desired {
            DesiredOn::Subject(s) => {
                one_subject(s, "the desired state's subject", "acme.desired.{device_id}")?
            }
            DesiredOn::KeyValue { key, .. } => {
                one_subject(key, "the desired state's KV key", "{device_id}")?
            }
        }
        let commands = match &control.commands {
            Some(c) => {
                let c = render_with(c, values, &self.name, "the command subject")?;
                one_subject(&c, "the command subject", "acme.command.{device_id}")?;
                Some(c)
            }
            None => None,
        };
        Ok(Some(ControlOn { desired, commands }))
    }

    /// Renders a subject, or a bucket and key (a bucket name JetStream would refuse is an
    /// error now, not when the server is asked to create it); `what` names its use.
    fn render_on(
        &self,
        on: &ReportsOn,
        values: Option<&TemplateValues>,
        what: &str,
    ) -> Result<ReportsOn, DescriptionError> {
        let agent = &self.name;
        Ok(match on {
            ReportsOn::Subject(s) => ReportsOn::Subject(render_with(
                s,
                values,
                agent,
                &format!("the {what} subject"),
            )?),
            ReportsOn::KeyValue { bucket, key } => {
                let bucket = render_with(bucket, values, agent, &format!("the {what} KV bucket"))?;
                let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                // Unrendered, a template's values are empty: only the literal part is checked.
                if (values.is_some() && bucket.is_empty()) || !bucket.chars().all(valid) {
                    return Err(DescriptionError::Invalid {
                        agent: agent.clone(),
                        problem: format!(
                            "the KV bucket name {bucket:?} is not one JetStream accepts: use letters, digits, `_` and `-` only"
                        ),
                    });
                }
                let key = render_with(key, values, agent, &format!("the {what} KV key"))?;
                ReportsOn::KeyValue { bucket, key }
            }
        })
    }

    /// The onboarding steps this description has, in the order they run.
    pub fn steps(&self) -> Vec<String> {
        let mut steps = Vec::new();
        if !self.packages.is_empty() {
            steps.push("packages".to_owned());
        }
        if self.user.is_some() {
            steps.push("user".to_owned());
        }
        if self.service.user().is_some() {
            steps.push("linger".to_owned());
        }
        steps.extend(self.files.iter().map(|f| f.step.clone()));
        steps.push("unit".to_owned());
        steps.push("service".to_owned());
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> TemplateValues {
        TemplateValues {
            device_id: "dev-1".into(),
            nats_url: "nats://10.0.0.1:4222".into(),
            nats_user: "u".into(),
            nats_password: "p".into(),
            arch: VmArchitecture::Aarch64,
        }
    }

    #[test]
    fn templates_render_known_values_and_literal_braces() {
        let out = render_with(
            "id={device_id} url={nats_url} arch={arch} json={{\"a\": 1}}",
            Some(&values()),
            "a",
            "t",
        )
        .unwrap();
        assert_eq!(
            out,
            "id=dev-1 url=nats://10.0.0.1:4222 arch=aarch64 json={\"a\": 1}"
        );
    }

    #[test]
    fn an_unknown_value_is_an_error_naming_the_known_ones() {
        let err = render_with("x={device}", None, "acme", "the config")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("acme") && err.contains("{device}") && err.contains("device_id"),
            "{err}"
        );
        let err = render_with("x={device_id", None, "acme", "the config")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unclosed"), "{err}");
    }

    #[test]
    fn a_wildcard_where_the_harness_publishes_is_refused_before_anything_boots() {
        let encode = |_: u64, _: &str| Vec::new();
        for (control, names) in [
            (
                Control::subject("acme.desired.*", encode),
                "desired state's subject",
            ),
            (
                Control::key_value("b", "{device_id}.>", encode),
                "desired state's KV key",
            ),
            (
                Control::key_value("b", "{device_id}", encode).with_commands("acme.cmd.>"),
                "command subject",
            ),
        ] {
            let agent = AgentDescription {
                control: Some(control),
                ..crate::reference::agent()
            };
            let err = agent
                .check(&[VmArchitecture::X86_64])
                .unwrap_err()
                .to_string();
            assert!(err.contains(names) && err.contains("wildcard"), "{err}");
        }
        crate::reference::agent()
            .check(&[VmArchitecture::X86_64])
            .unwrap();
    }
}
