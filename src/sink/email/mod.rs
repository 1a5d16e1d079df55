//! The email alert sink (`sink.kind = "email"`): the alert of [`super::alert`] (same
//! triggers, same content) as an email to sales, over SMTP (lettre, rustls).
//!
//! Each message is multipart/alternative: a plain-text part and an HTML part, every
//! value of the lead HTML-escaped in the latter. What an SMTP reply means is decided
//! in one place, [`classify`]:
//! - 4xx: transient, retried with the shared back-off, then left pending;
//! - the login refused (530, 534, 535, 538), a recipient or the sender refused (550,
//!   551, 553, or an enhanced status 5.1.x, 5.7.x), a server that cannot be reached or
//!   whose TLS fails: an endpoint failure, the lead waits and the sink pauses;
//! - a refusal of this message (552 too big, 554, 5.3.4, 5.6.x): rejected, a dead
//!   letter quoting the reply.
//!
//! # Digest
//!
//! With `digest = "1h"` the alerts are gathered into one message per interval. Each
//! alert is appended to a queue file, `email-digest.jsonl` in `state.dir` (created
//! 0600), and the lead is answered delivered; [`LeadSink::sync`] fsyncs the queue,
//! and the pipeline commits the lead's outcome only after that sync. So a crash before
//! the sync loses nothing (the lead is offered again), and one after it finds the
//! alert in the queue. After every poll ([`LeadSink::tick`]) the sink sends the queue
//! as one message once its oldest alert is `digest` old, and empties the queue only
//! once the server took the message: a crash in between sends that digest again (at
//! least once, never lost). A partial last line (a crash during an append, before its
//! sync) is cut off when the queue is opened. While a digest fails on the endpoint,
//! new alerts are answered with the same endpoint failure, so the sink pauses and
//! health says why.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::alert::{self, Alert, Alerted};
use super::http::{self, Finished, Step, Verdict};
use super::mapping;
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::lead::Stage;
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

/// The sink's name, its `sink.kind` and config section.
const NAME: &str = "email";
/// How much of an SMTP reply a reason quotes.
const REPLY_CHARS: usize = 300;
/// The digest queue's file in `state.dir`.
pub const DIGEST_FILE: &str = "email-digest.jsonl";

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP upgraded with STARTTLS, which must be offered (submission, port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (implicit TLS, port 465).
    Tls,
    /// No TLS: only for a relay on this host or network (port 25); no login.
    None,
}

impl TlsMode {
    fn default_port(self) -> u16 {
        match self {
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TlsMode::Starttls => "starttls",
            TlsMode::Tls => "tls",
            TlsMode::None => "none",
        }
    }
}

/// `[sink.email]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// The SMTP server's host name (also the name its certificate must carry).
    pub host: String,
    /// Its port; unset: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    pub port: Option<u16>,
    /// `starttls` (default), `tls` (implicit TLS) or `none` (a local relay only).
    #[serde(default)]
    pub tls: TlsMode,
    /// A PEM file of certificates to trust besides the public roots (a relay with a
    /// private CA).
    pub ca_file: Option<PathBuf>,
    /// The login, with `password`; unset: no AUTH.
    pub username: Option<String>,
    /// The login's password, a secret: `{ env = "..." }`, `{ file = "..." }`,
    /// `{ credential = "..." }` (or `{ value = "..." }`).
    pub password: Option<SecretSource>,
    /// The sender, `leads@contoso.com` or `Marketplace leads <leads@contoso.com>`.
    pub from: String,
    /// The recipients, at least one.
    pub to: Vec<String>,
    /// Put before every subject, e.g. `"[leads] "`.
    pub subject_prefix: Option<String>,
    /// The stages that send a message (see [`super::alert`]).
    #[serde(default = "alert::default_stages")]
    pub stages: Vec<Stage>,
    /// Timeout of the connection and of each SMTP command.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// One message per this interval listing every alert, instead of one per alert.
    #[serde(default, with = "humantime_serde")]
    pub digest: Option<Duration>,
    /// Retries of one message on 4xx replies, timeouts and dropped connections.
    #[serde(default)]
    pub retry: RetrySettings,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn key(name: &str) -> String {
    format!("sink.{NAME}.{name}")
}

/// Parses an address as a `Mailbox` (`a@b.c` or `Name <a@b.c>`).
fn mailbox(key: &str, text: &str) -> Result<Mailbox, (String, String)> {
    text.trim().parse::<Mailbox>().map_err(|e| {
        (
            key.to_owned(),
            format!("{text:?} is not an email address ({e}); write `sales@contoso.com` or `Sales <sales@contoso.com>`"),
        )
    })
}

impl EmailSettings {
    /// Checks what types cannot express, the addresses included (no I/O).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |name: &str, why: &str| Err((key(name), why.to_owned()));
        let host = self.host.trim();
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
            return bad("host", "must be a host name such as smtp.office365.com");
        }
        if self.port == Some(0) {
            return bad("port", "must be between 1 and 65535");
        }
        mailbox(&key("from"), &self.from)?;
        if self.to.is_empty() {
            return bad("to", "must name at least one recipient");
        }
        for to in &self.to {
            mailbox(&key("to"), to)?;
        }
        match (&self.username, &self.password) {
            (Some(user), Some(_)) if user.trim().is_empty() => {
                return bad("username", "must not be empty")
            }
            (Some(_), None) => return bad("password", "is required with sink.email.username"),
            (None, Some(_)) => return bad("username", "is required with sink.email.password"),
            _ => {}
        }
        if self.tls == TlsMode::None && self.username.is_some() {
            return bad(
                "tls",
                "\"none\" would send the password in clear text: use \"starttls\" or \"tls\" (\"none\" is for a local relay without login)",
            );
        }
        if self
            .subject_prefix
            .as_deref()
            .is_some_and(|p| p.contains(|c: char| c.is_control()))
        {
            return bad("subject_prefix", "must be one line");
        }
        alert::validate_stages(&key("stages"), &self.stages)?;
        if self.timeout.is_zero() {
            return bad("timeout", "must be greater than zero");
        }
        if self.digest.is_some_and(|d| d < Duration::from_secs(1)) {
            return bad("digest", "must be at least 1s (e.g. \"1h\"), or left out");
        }
        self.retry.validate(&key("retry"))
    }

    fn port(&self) -> u16 {
        self.port.unwrap_or_else(|| self.tls.default_port())
    }
}

/// What one SMTP reply means, by its code and (when the server sends one) its
/// enhanced status code (RFC 3463: `5.1.1`: class, subject, detail). `reply` is the
/// server's text, quoted in the reason.
pub fn classify(code: u16, reply: &str) -> Verdict {
    let quoted = mapping::truncate(reply.trim(), REPLY_CHARS).0;
    let enhanced = enhanced_status(reply);
    let login = || {
        Verdict::Endpoint {
        reason: format!(
            "the SMTP server refused the login ({quoted}): check sink.email.username and sink.email.password"
        ),
    }
    };
    let address = || {
        Verdict::Endpoint {
        reason: format!(
            "the SMTP server refused a recipient or the sender ({quoted}): check sink.email.to and sink.email.from"
        ),
    }
    };
    let policy = || {
        Verdict::Endpoint {
        reason: format!(
            "the SMTP server refused to relay for this account ({quoted}): check sink.email.from, sink.email.to and the account's right to send"
        ),
    }
    };
    let reject = || Verdict::Reject {
        reason: format!("the SMTP server refused the message: {quoted}"),
    };
    match code {
        400..=499 => Verdict::Retry {
            after: None,
            reason: format!("the SMTP server answered {quoted}"),
        },
        530 | 534 | 535 | 538 => login(),
        _ => match enhanced {
            Some((_, 1, _)) => address(),
            Some((_, 2, 3)) | Some((_, 3, 4)) | Some((_, 6, _)) => reject(),
            Some((_, 2, _)) => address(),
            Some((_, 7, 8)) => login(),
            Some((_, 7, _)) => policy(),
            _ => match code {
                550 | 551 | 553 | 521 | 556 => address(),
                500..=504 => Verdict::Endpoint {
                    reason: format!(
                        "the SMTP server does not take leadsync's commands ({quoted}): check sink.email.host, sink.email.port and sink.email.tls"
                    ),
                },
                _ => reject(),
            },
        },
    }
}

/// The enhanced status code at the start of a reply's text (`5.1.1 <x>: unknown`),
/// after the basic code if it is there.
fn enhanced_status(reply: &str) -> Option<(u8, u16, u16)> {
    let mut words = reply.split_whitespace();
    let mut word = words.next()?;
    if word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) {
        word = words.next()?;
    }
    let mut parts = word.trim_end_matches([':', ',', ';']).split('.');
    let class = parts
        .next()?
        .parse()
        .ok()
        .filter(|c| [2, 4, 5].contains(c))?;
    let subject = parts.next()?.parse().ok()?;
    let detail = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((class, subject, detail))
}

/// One alert as an email shows it; owned, so the digest queue can hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// [`Alert::id`]: one event alerted twice is listed once in a digest.
    id: u64,
    /// Unix milliseconds when it was queued (the digest is due `digest` after the oldest).
    queued_at_ms: u64,
    title: String,
    facts: Vec<(String, String)>,
    next_step: String,
    deadline: String,
    footer: String,
    /// The customer's record in the CRM, when another sink of the deployment knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Entry {
    fn of(alert: &Alert<'_>, link: Option<&String>) -> Entry {
        let message = alert.message();
        Entry {
            id: alert.id(),
            queued_at_ms: now_ms(),
            title: message.title,
            facts: message
                .facts
                .into_iter()
                .map(|(label, value)| (label.to_owned(), value))
                .collect(),
            next_step: message.next_step,
            deadline: message.deadline,
            footer: message.footer,
            link: link.cloned(),
        }
    }

    fn text(&self, out: &mut String) {
        out.push_str(&self.title);
        out.push_str("\n\n");
        let width = self.facts.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
        for (label, value) in &self.facts {
            out.push_str(&format!("{:<width$} {value}\n", format!("{label}:")));
        }
        if let Some(link) = &self.link {
            out.push_str(&format!("\nIn the CRM: {link}\n"));
        }
        out.push_str(&format!(
            "\nFollow up by: {} (the marketplace asks for a follow-up within 24 hours)\nNext step: {}\n\n{}\n",
            self.deadline, self.next_step, self.footer
        ));
    }

    fn html(&self, out: &mut String) {
        out.push_str(&format!(
            "<h2 style=\"font-size:18px\">{}</h2>\n<table cellpadding=\"4\" style=\"border-collapse:collapse\">\n",
            escape(&self.title)
        ));
        for (label, value) in &self.facts {
            out.push_str(&format!(
                "<tr><th align=\"left\" valign=\"top\">{}</th><td>{}</td></tr>\n",
                escape(label),
                escape(value)
            ));
        }
        out.push_str("</table>\n");
        if let Some(link) = &self.link {
            out.push_str(&format!(
                "<p><a href=\"{}\">Open in the CRM</a></p>\n",
                escape(link)
            ));
        }
        out.push_str(&format!(
            "<p><strong>Follow up by:</strong> {} (the marketplace asks for a follow-up within 24 hours)</p>\n<p><strong>Next step:</strong> {}</p>\n<p style=\"color:#666666;font-size:12px\">{}</p>\n",
            escape(&self.deadline),
            escape(&self.next_step),
            escape(&self.footer)
        ));
    }
}

/// `&`, `<`, `>`, `"` and `'` as HTML entities: a customer's text stays text.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A subject on one line: control characters (a newline in a customer's name) become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Subject, text and HTML of a message listing `entries` (one: a single alert).
fn render(prefix: &str, entries: &[Entry]) -> (String, String, String) {
    let subject = match entries {
        [one] => one.title.clone(),
        many => format!("{} marketplace leads to follow up", many.len()),
    };
    let mut text = String::new();
    let mut html = String::from(
        "<!DOCTYPE html>\n<html><body style=\"font-family:Segoe UI,Helvetica,Arial,sans-serif\">\n",
    );
    if entries.len() > 1 {
        text.push_str(&format!("{subject}\n\n"));
        html.push_str(&format!(
            "<h1 style=\"font-size:20px\">{}</h1>\n",
            escape(&subject)
        ));
    }
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            text.push_str("\n----------------------------------------\n\n");
            html.push_str("<hr>\n");
        }
        entry.text(&mut text);
        entry.html(&mut html);
    }
    html.push_str("</body></html>\n");
    (one_line(&format!("{prefix}{subject}")), text, html)
}

/// The digest queue: JSON lines of [`Entry`] in a 0600 file.
#[derive(Debug)]
struct Queue {
    path: PathBuf,
    file: Option<File>,
    /// Alerts appended since the last sync (forgotten if the sync fails).
    unsynced: Vec<u64>,
}

impl Queue {
    /// The open file; on first use, creates it (and its directory) or cuts off a
    /// partial last line left by a crash.
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            crate::private_fs::create_dir_all(dir)?;
            let created = !self.path.exists();
            let file = crate::private_fs::options()
                .read(true)
                .append(true)
                .create(true)
                .open(&self.path)?;
            if created {
                // The new name must survive a crash too.
                File::open(dir)?.sync_all()?;
            } else {
                crate::private_fs::warn_if_shared(&self.path, "email digest queue");
            }
            let bytes = std::fs::read(&self.path)?;
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                tracing::warn!(path = %self.path.display(), "The email digest queue ends in a partial line (a crash while queuing); cutting it off.");
                file.set_len(keep as u64)?;
                file.sync_data()?;
            }
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).expect("strings and numbers");
        line.push(b'\n');
        self.file()?.write_all(&line)?;
        self.unsynced.push(entry.id);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        self.unsynced.clear();
        Ok(())
    }

    /// Every queued alert, each event once.
    fn read(&mut self) -> io::Result<Vec<Entry>> {
        self.file()?;
        let text = std::fs::read_to_string(&self.path)?;
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            match serde_json::from_str::<Entry>(line) {
                Ok(entry) if seen.insert(entry.id) => entries.push(entry),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), line = n + 1, error = %e, "Unreadable line in the email digest queue; skipping it.")
                }
            }
        }
        Ok(entries)
    }

    fn clear(&mut self) -> io::Result<()> {
        let file = self.file()?;
        file.set_len(0)?;
        file.sync_data()
    }
}

#[derive(Debug)]
struct Digest {
    every: Duration,
    queue: tokio::sync::Mutex<Queue>,
    /// Why the last digest could not be sent, while the endpoint is at fault.
    failing: std::sync::Mutex<Option<String>>,
}

/// The email alert sink.
pub struct EmailSink {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `smtp.contoso.com:587 (starttls)`, for messages.
    shown: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    subject_prefix: String,
    stages: Vec<Stage>,
    timeout: Duration,
    retry: RetrySettings,
    /// The password, scrubbed from any reason or log line.
    password: Option<SecretString>,
    alerted: Alerted,
    digest: Option<Digest>,
}

impl fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailSink")
            .field("server", &self.shown)
            .field("to", &self.to.len())
            .field("stages", &self.stages)
            .field("digest", &self.digest.as_ref().map(|d| d.every))
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// Validates the settings, reads the password and the CA file; no network I/O.
    /// The digest queue lives in `state_dir`.
    pub fn new(settings: &EmailSettings, state_dir: &Path) -> Result<Self, SinkError> {
        let error = |message: String| SinkError {
            sink: NAME.into(),
            message,
        };
        let keyed =
            |(key, message): (String, String)| error(format!("config key `{key}`: {message}"));
        settings.validate().map_err(keyed)?;
        let from = mailbox(&key("from"), &settings.from).map_err(keyed)?;
        let to = settings
            .to
            .iter()
            .map(|t| mailbox(&key("to"), t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(keyed)?;
        let password = match &settings.password {
            Some(source) => Some(
                source
                    .resolve(&key("password"))
                    .map_err(|e| error(e.to_string()))?,
            ),
            None => None,
        };
        let host = settings.host.trim().to_owned();
        let port = settings.port();
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                error(format!(
                    "config key `{}`: cannot read {}: {e}",
                    key("ca_file"),
                    path.display()
                ))
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                error(format!(
                    "config key `{}`: {} is not a PEM certificate: {e}",
                    key("ca_file"),
                    path.display()
                ))
            })?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| error(format!("cannot set up TLS for {host}: {e}")))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
            .port(port)
            .timeout(Some(settings.timeout))
            .tls(match settings.tls {
                TlsMode::Starttls => Tls::Required(tls),
                TlsMode::Tls => Tls::Wrapper(tls),
                TlsMode::None => Tls::None,
            });
        if let (Some(user), Some(password)) = (&settings.username, &password) {
            builder = builder.credentials(Credentials::new(
                user.trim().to_owned(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            shown: format!("{host}:{port} ({})", settings.tls.as_str()),
            from,
            to,
            subject_prefix: settings.subject_prefix.clone().unwrap_or_default(),
            stages: settings.stages.clone(),
            timeout: settings.timeout,
            retry: settings.retry.clone(),
            password,
            alerted: Alerted::default(),
            digest: settings.digest.map(|every| Digest {
                every,
                queue: tokio::sync::Mutex::new(Queue {
                    path: state_dir.join(DIGEST_FILE),
                    file: None,
                    unsynced: Vec::new(),
                }),
                failing: Default::default(),
            }),
        })
    }

    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(p) if !p.expose_secret().is_empty() && text.contains(p.expose_secret()) => {
                text.replace(p.expose_secret(), "[redacted]")
            }
            _ => text,
        }
    }

    /// What a failed send means. lettre 0.11 tells a refused connection or TLS
    /// handshake ("Connection error") from a connection lost mid-session ("network
    /// error") only in its message.
    fn verdict(&self, e: &lettre::transport::smtp::Error) -> Verdict {
        let mut text = e.to_string();
        if let Some(code) = e.status() {
            // `permanent error (550): 5.1.1 <x>: unknown`: the reply is after the colon.
            let reply = text
                .split_once("): ")
                .map_or("", |(_, r)| r)
                .replace('\n', " ");
            let code = u16::from(code);
            return classify(code, &self.scrub(format!("{code} {reply}")));
        }
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        let text = self.scrub(text);
        if e.is_timeout() {
            Verdict::Retry {
                after: None,
                reason: format!(
                    "no answer from {} within {} (sink.email.timeout)",
                    self.shown,
                    humantime::format_duration(self.timeout)
                ),
            }
        } else if text.starts_with("network error") || e.is_transport_shutdown() {
            Verdict::Retry {
                after: None,
                reason: format!("the connection to {} was lost: {text}", self.shown),
            }
        } else {
            Verdict::Endpoint {
                reason: format!(
                    "cannot use the SMTP server {}: {text}; check sink.email.host, sink.email.port, sink.email.tls and sink.email.ca_file",
                    self.shown
                ),
            }
        }
    }

    /// Sends one message listing `entries`, retrying transient failures.
    async fn send(&self, entries: &[Entry], test: bool) -> Finished<Result<(), String>> {
        let (subject, text, html) = render(&self.subject_prefix, entries);
        let subject = if test {
            format!("[TEST] {subject}")
        } else {
            subject
        };
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(None);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let mail = match builder.multipart(MultiPart::alternative_plain_html(text, html)) {
            Ok(mail) => mail,
            Err(e) => {
                return Finished::Failed {
                    reason: format!("cannot build the message: {e}"),
                }
            }
        };
        http::retrying(&self.retry, NAME, |_| {
            let mail = mail.clone();
            async move {
                // lettre's timeout bounds the connection; this bounds the whole
                // conversation (a server that stops answering mid-way).
                let whole = self.timeout.saturating_mul(4);
                match tokio::time::timeout(whole, self.transport.send(mail)).await {
                    Ok(Ok(_)) => Step::Done(Ok(())),
                    Ok(Err(e)) => self.verdict(&e).step(),
                    Err(_) => Step::Retry {
                        after: None,
                        reason: format!(
                            "{} did not finish the message within {} (4 × sink.email.timeout)",
                            self.shown,
                            humantime::format_duration(whole)
                        ),
                    },
                }
            }
        })
        .await
    }

    async fn deliver_now(&self, alert: &Alert<'_>, link: Option<&String>) -> Outcome {
        let entry = Entry::of(alert, link);
        match self.send(std::slice::from_ref(&entry), false).await {
            Finished::Done(Ok(())) => {
                self.alerted.remember(alert);
                tracing::info!(sink = NAME, customer = %alert.lead.log_key(), stage = alert.stage.as_str(), "Alert emailed.");
                Outcome::Delivered
            }
            Finished::Done(Err(reason)) => Outcome::EndpointFailed { reason },
            Finished::GaveUp { after, reason } => Outcome::RetryLater { after, reason },
            Finished::Failed { reason } => Outcome::Rejected { reason },
        }
    }

    async fn queue(&self, digest: &Digest, alert: &Alert<'_>, link: Option<&String>) -> Outcome {
        if let Some(reason) = digest.failing.lock().expect("not poisoned").clone() {
            return Outcome::EndpointFailed { reason };
        }
        let entry = Entry::of(alert, link);
        let mut queue = digest.queue.lock().await;
        match queue.append(&entry) {
            Ok(()) => {
                self.alerted.remember(alert);
                tracing::debug!(sink = NAME, customer = %alert.lead.log_key(), stage = alert.stage.as_str(), "Alert queued for the digest.");
                Outcome::Delivered
            }
            Err(e) => Outcome::RetryLater {
                after: None,
                reason: format!("cannot queue the alert in {}: {e}", queue.path.display()),
            },
        }
    }

    /// Sends the digest if its oldest alert is `digest` old; empties the queue once the
    /// server took it.
    async fn send_digest(&self, digest: &Digest) {
        let mut queue = digest.queue.lock().await;
        let entries = match queue.read() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(path = %queue.path.display(), error = %e, "Cannot read the email digest queue.");
                return;
            }
        };
        let Some(oldest) = entries.iter().map(|e| e.queued_at_ms).min() else {
            return;
        };
        if now_ms() < oldest.saturating_add(digest.every.as_millis() as u64) {
            return;
        }
        let finished = self.send(&entries, false).await;
        let failing = match finished {
            Finished::Done(Ok(())) => {
                if let Err(e) = queue.clear() {
                    tracing::error!(path = %queue.path.display(), error = %e, "The digest was sent but its queue cannot be emptied; it may be sent again.");
                }
                tracing::info!(sink = NAME, alerts = entries.len(), "Digest emailed.");
                None
            }
            Finished::GaveUp { reason, .. } => {
                tracing::warn!(sink = NAME, alerts = entries.len(), %reason, "The digest could not be sent; trying again after the next poll.");
                None
            }
            Finished::Done(Err(reason)) | Finished::Failed { reason } => {
                tracing::error!(sink = NAME, alerts = entries.len(), %reason, "The digest cannot be sent; new alerts wait until it is.");
                Some(format!(
                    "the digest of {} alerts cannot be sent: {reason}",
                    entries.len()
                ))
            }
        };
        *digest.failing.lock().expect("not poisoned") = failing;
    }

    /// `leadsync check --send-test-lead`: one message marked as a test, no customer in it.
    pub async fn send_test_message(&self) -> Result<String, SinkError> {
        let entry = Entry {
            link: None,
            id: 0,
            queued_at_ms: now_ms(),
            title: "leadsync check: a test message (no customer)".into(),
            facts: vec![
                (
                    "Stage".into(),
                    "test (sent by leadsync check --send-test-lead)".into(),
                ),
                ("Server".into(), self.shown.clone()),
            ],
            next_step: "Nothing: this message shows that leadsync's alerts reach this mailbox."
                .into(),
            deadline: "-".into(),
            footer: "leadsync · check".into(),
        };
        match self.send(&[entry], true).await {
            Finished::Done(Ok(())) => Ok(format!(
                "a test message went to {} recipient(s) through {}",
                self.to.len(),
                self.shown
            )),
            Finished::Done(Err(reason))
            | Finished::GaveUp { reason, .. }
            | Finished::Failed { reason } => Err(SinkError {
                sink: NAME.into(),
                message: reason,
            }),
        }
    }
}

#[async_trait::async_trait]
impl LeadSink for EmailSink {
    fn name(&self) -> &str {
        NAME
    }

    /// It tells people: its batches go after the record sinks' (the link it does not
    /// show yet).
    fn is_alert(&self) -> bool {
        true
    }

    /// One lead after the other; once the server failed as an endpoint, the rest of
    /// the batch that needs a message waits with it, without another connection.
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        self.deliver_linked(batch, &[]).await
    }

    /// As `deliver`; a message links the customer's CRM record when `links` has it.
    async fn deliver_linked(
        &self,
        batch: &[CustomerLead],
        links: &[Option<String>],
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut endpoint_failed: Option<String> = None;
        for (i, lead) in batch.iter().enumerate() {
            let link = links.get(i).and_then(Option::as_ref);
            let Some(alert) = alert::due(NAME, lead, &self.stages, &self.alerted) else {
                outcomes.push(Outcome::Delivered);
                continue;
            };
            if let Some(reason) = &endpoint_failed {
                outcomes.push(Outcome::EndpointFailed {
                    reason: reason.clone(),
                });
                continue;
            }
            let outcome = match &self.digest {
                Some(digest) => self.queue(digest, &alert, link).await,
                None => self.deliver_now(&alert, link).await,
            };
            if let Outcome::EndpointFailed { reason } = &outcome {
                endpoint_failed = Some(reason.clone());
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Digest mode: the queued alerts reach the disk before their outcomes are committed.
    async fn sync(&self) -> Result<(), SinkError> {
        let Some(digest) = &self.digest else {
            return Ok(());
        };
        let mut queue = digest.queue.lock().await;
        queue.sync().map_err(|e| {
            for id in queue.unsynced.drain(..) {
                self.alerted.forget(id);
            }
            SinkError {
                sink: NAME.into(),
                message: format!("cannot sync the digest queue {}: {e}", queue.path.display()),
            }
        })
    }

    /// Connects, says EHLO, sets up TLS, logs in (if configured) and says NOOP and
    /// QUIT: nothing is sent.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let error = |message: String| SinkError {
            sink: NAME.into(),
            message,
        };
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(error(format!(
                "{} took the login but did not answer NOOP",
                self.shown
            ))),
            Err(e) => Err(error(match self.verdict(&e) {
                Verdict::Endpoint { reason }
                | Verdict::Retry { reason, .. }
                | Verdict::Reject { reason } => reason,
                Verdict::Delivered => String::new(),
            })),
        }
    }

    async fn tick(&self) {
        if let Some(digest) = &self.digest {
            self.send_digest(digest).await;
        }
    }
}

#[cfg(test)]
mod tests;
