//! The service loop behind `firewall serve`.
//!
//! 1. Load the rules file; a bad file at start is an error (there is no policy to keep).
//! 2. Connect to the driver's port ([`PORT_NAME`]). While it cannot (the driver is not loaded,
//!    or was unloaded), retry with a backoff that doubles from 100 ms up to
//!    [`ServeOptions::max_backoff`], logging each new reason once.
//! 3. Once connected, tell the driver to revoke **every** cached verdict ([`Revoke::All`](firewall_protocol::control::Revoke::All)): an
//!    earlier instance of the service, or an earlier policy, may have let it cache verdicts this
//!    one knows nothing about. The service's own memory starts empty then.
//! 4. Answer requests — from the port, and from the driver's question channel
//!    ([`ASK_DEVICE_PATH`], opened once connected; a driver asking through the port and a work
//!    item has none, and the service serves the port alone): decode, decide, append the audit
//!    record, reply. On the channel, [`ServeOptions::ask_threads`] threads each keep
//!    [`ServeOptions::ask_outstanding`] wait requests pending (`wfp_rs::user::AskClient`), so the
//!    driver hands a question over the moment it asks; one thread decides (it holds the policy
//!    and the audit log) and answers through the handle the question came through. A request that does not
//!    decode (a driver speaking another protocol version, or a bug) is logged and **not
//!    answered**: its request id cannot be trusted, and the driver applies its own default
//!    verdict (fail-open or fail-closed, the driver's configuration) when its wait times out.
//! 5. Every [`ServeOptions::poll_interval`], read the rules file; if its text changed, reload.
//!    A bad file is logged as `file:line:col: message` and the policy in force stays (until the
//!    text changes again). A good one replaces the policy, and the cached verdicts it changes
//!    are revoked at the driver, in batches of at most
//!    [`MAX_REVOKE_IDS`](firewall_protocol::control::MAX_REVOKE_IDS). An id is kept until the
//!    driver confirms its batch; a failed batch is sent again after a backoff (doubling from
//!    100 ms up to 5 s), and after 5 failures in a row, or with more than
//!    [`MAX_PENDING_REVOKE_IDS`](crate::service::MAX_PENDING_REVOKE_IDS) ids waiting, the
//!    service revokes every cached verdict instead ([`PendingRevocations`]). Revocations
//!    waiting when the connection is lost are covered by the revoke-all of step 3, which is
//!    retried the same way until the driver confirms it.
//! 6. When the port goes away (the driver unloads), go back to 2.
//!
//! Revocations go to the driver's control device ([`CONTROL_DEVICE_PATH`]). If it cannot be
//! opened (an older driver, or not enough rights), the service logs that and goes on serving:
//! verdicts already cached may then live out their lifetime (at most `--cache-seconds`) before
//! the new rules apply to them. The device is opened again at the next attempt.
//!
//! There is no signal handling: Ctrl-C ends the process, which closes its port connection (the
//! driver sees the disconnect and applies its default to what was in flight). Every audit record
//! is written and flushed whole, so nothing is left half-written.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use firewall_protocol::control::{CONTROL_DEVICE_PATH, REVOKE, REVOKED_LEN, Revoked};
use std::sync::atomic::{AtomicBool, Ordering};

use firewall_protocol::{
    ASK_CHANNEL, ASK_DEVICE_PATH, CacheLifetime, ConnectionReply, ConnectionRequest, PORT_NAME,
};
use firewall_rules::VolumeMap;
use wfp_rs::port::Message;
use wfp_rs::user::{AskClient, Device, PortConnection, Question, Request};

use crate::audit::AuditLog;
use crate::service::{LoadError, PendingRevocations, Service};

// Every request the driver can send, the longest image path included, fits the buffer
// `get_message` reads it into: one that did not would never be answered, and its connection
// would get the driver's default instead of the rules' verdict.
const _: () = assert!(firewall_protocol::REQUEST_MAX_LEN <= wfp_rs::user::MAX_MESSAGE_LEN);

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The rules file.
    pub rules: PathBuf,
    /// Where audit records go: a file, or `-` for standard output.
    pub audit: PathBuf,
    /// The cache lifetime granted to the driver; `None`: never cache.
    pub cache: Option<CacheLifetime>,
    /// NT device → drive letter, for matching `app` globs.
    pub volumes: VolumeMap,
    /// How often the rules file is read for changes.
    pub poll_interval: Duration,
    /// The longest wait between two connection attempts.
    pub max_backoff: Duration,
    /// How many cacheable verdicts the service remembers (see
    /// [`Service`]).
    pub memory_capacity: usize,
    /// The port to connect to; [`PORT_NAME`] normally.
    pub port_name: String,
    /// The control device for revocations; [`CONTROL_DEVICE_PATH`] normally.
    pub control_device: String,
    /// The question channel's device; [`ASK_DEVICE_PATH`] normally.
    pub ask_device: String,
    /// How many threads wait for the channel's questions, each with its own handle.
    pub ask_threads: usize,
    /// How many wait requests each of those handles keeps pending (K).
    pub ask_outstanding: usize,
}

/// The threads that wait for the channel's questions, by default.
pub const DEFAULT_ASK_THREADS: usize = 2;
/// The wait requests each keeps pending, by default.
pub const DEFAULT_ASK_OUTSTANDING: usize = 8;

/// What the service's reader threads hand the deciding thread.
enum Incoming<'a> {
    /// A message from the port, or the port's failure.
    Port(io::Result<Request>),
    /// A question from the channel, and the client to answer through.
    Question(Question, &'a AskClient),
}

impl ServeOptions {
    /// The defaults for the rules file `rules`: audit to standard output, 60-second cache,
    /// no volumes, 500 ms polling, backoff up to 5 s.
    pub fn new(rules: impl Into<PathBuf>) -> ServeOptions {
        ServeOptions {
            rules: rules.into(),
            audit: PathBuf::from("-"),
            cache: CacheLifetime::from_secs(crate::service::DEFAULT_CACHE_SECONDS).ok(),
            volumes: VolumeMap::new(),
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            memory_capacity: crate::service::DEFAULT_MEMORY_CAPACITY,
            port_name: PORT_NAME.to_owned(),
            control_device: CONTROL_DEVICE_PATH.to_owned(),
            ask_device: ASK_DEVICE_PATH.to_owned(),
            ask_threads: DEFAULT_ASK_THREADS,
            ask_outstanding: DEFAULT_ASK_OUTSTANDING,
        }
    }
}

/// Why `serve` stopped: only problems at start are fatal.
#[derive(Debug)]
pub enum ServeError {
    /// The rules file could not be loaded at start.
    Rules(LoadError),
    /// The audit log could not be opened.
    Audit {
        /// The file.
        file: PathBuf,
        /// Why.
        error: io::Error,
    },
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Rules(e) => e.fmt(f),
            ServeError::Audit { file, error } => {
                write!(f, "{}: cannot open the audit log: {error}", file.display())
            }
        }
    }
}

impl std::error::Error for ServeError {}

/// Writes one line of the service's log (standard error).
pub fn log(message: impl std::fmt::Display) {
    eprintln!("firewall: {message}");
}

/// Watches the rules file by reading it: the text (or the read error) last seen.
#[derive(Debug)]
pub struct RulesWatcher {
    path: PathBuf,
    last: Result<String, String>,
}

impl RulesWatcher {
    /// Watches `path`, whose text in force is `text`.
    pub fn new(path: &Path, text: String) -> RulesWatcher {
        RulesWatcher {
            path: path.to_owned(),
            last: Ok(text),
        }
    }

    /// Reads the file: `Some(Ok(text))` if its text changed since the last call, `Some(Err)` if
    /// it can no longer be read (said once, until it changes), `None` if nothing changed.
    pub fn poll(&mut self) -> Option<Result<String, String>> {
        let now = std::fs::read_to_string(&self.path).map_err(|e| e.to_string());
        if now == self.last {
            return None;
        }
        self.last = now.clone();
        Some(now)
    }
}

/// The service's state while serving.
struct Server {
    options: ServeOptions,
    service: Service,
    watcher: RulesWatcher,
    audit: AuditLog,
    control: Option<Device>,
    /// What the driver has not confirmed revoking yet.
    revocations: PendingRevocations,
}

/// Runs the service until the process is stopped; returns only if it cannot start.
pub fn serve(options: ServeOptions) -> Result<std::convert::Infallible, ServeError> {
    let name = options.rules.display().to_string();
    let text = std::fs::read_to_string(&options.rules).map_err(|error| {
        ServeError::Rules(LoadError::Read {
            file: name.clone(),
            error,
        })
    })?;
    let rules = firewall_rules::Rules::parse_named(&name, &text)
        .map_err(|e| ServeError::Rules(LoadError::Rules(e)))?;
    let audit = AuditLog::open(&options.audit).map_err(|error| ServeError::Audit {
        file: options.audit.clone(),
        error,
    })?;
    let service = Service::new(rules, name, options.volumes.clone(), options.cache)
        .with_memory_capacity(options.memory_capacity);
    let mut server = Server {
        watcher: RulesWatcher::new(&options.rules, text),
        options,
        service,
        audit,
        control: None,
        revocations: PendingRevocations::new(),
    };
    server.run()
}

impl Server {
    fn run(&mut self) -> ! {
        let first_backoff = Duration::from_millis(100);
        let mut backoff = first_backoff;
        let mut last_error = String::new();
        loop {
            self.check_rules();
            match PortConnection::connect(&self.options.port_name, &[]) {
                Ok(port) => {
                    backoff = first_backoff;
                    last_error.clear();
                    self.revoke_all();
                    log(format_args!(
                        "serving {} with {} ({} rules, default {}); cache {}",
                        self.options.port_name,
                        self.service.rules_name(),
                        self.service.rules().rules().len(),
                        self.service.rules().default_action(),
                        match self.service.cache_lifetime() {
                            Some(l) => format!("{}s", l.as_secs()),
                            None => "off".to_owned(),
                        }
                    ));
                    let error = self.serve_connection(&port);
                    log(format_args!(
                        "lost {}: {error}; reconnecting",
                        self.options.port_name
                    ));
                }
                Err(error) => {
                    let error = error.to_string();
                    if error != last_error {
                        log(format_args!(
                            "cannot connect to {}: {error}; retrying (up to every {} ms)",
                            self.options.port_name,
                            self.options.max_backoff.as_millis()
                        ));
                        last_error = error;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    /// The question channel's clients, one per reader thread; none if the driver has no
    /// channel (it asks through the port) or it cannot be opened (logged).
    fn open_channel(&self) -> Vec<AskClient> {
        let mut clients = Vec::new();
        for _ in 0..self.options.ask_threads {
            match AskClient::open(
                &self.options.ask_device,
                &ASK_CHANNEL,
                self.options.ask_outstanding,
            ) {
                Ok(client) => clients.push(client),
                Err(error) => {
                    log(format_args!(
                        "no question channel at {} ({error}): answering the port only",
                        self.options.ask_device
                    ));
                    return Vec::new();
                }
            }
        }
        log(format_args!(
            "answering the question channel {} too: {} thread(s), {} waits pending each",
            self.options.ask_device,
            clients.len(),
            self.options.ask_outstanding
        ));
        clients
    }

    /// Answers requests until the connection fails; returns the failure.
    ///
    /// A reader thread waits in `get_message` without a timeout, which is how a broken
    /// connection shows (a wait with a timeout that ends without a message may mean either);
    /// the channel's readers wait for questions, each on its own handle, until the port fails
    /// or the driver closes the channel; this thread answers what they read and reads the rules
    /// file between messages.
    fn serve_connection(&mut self, port: &PortConnection) -> io::Error {
        let clients = self.open_channel();
        let (sender, messages) = mpsc::channel();
        let done = AtomicBool::new(false);
        let error = std::thread::scope(|scope| {
            let port_sender = sender.clone();
            scope.spawn(move || {
                loop {
                    let message = port.get_message(None).and_then(|m| {
                        m.ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
                    });
                    let failed = message.is_err();
                    if port_sender.send(Incoming::Port(message)).is_err() || failed {
                        return;
                    }
                }
            });
            for client in &clients {
                let (sender, done) = (sender.clone(), &done);
                scope.spawn(move || {
                    // A bounded wait, so the thread sees `done` when the port fails while the
                    // channel stays.
                    while !done.load(Ordering::SeqCst) {
                        match client.next_question(Some(Duration::from_millis(200))) {
                            Ok(Some(question)) => {
                                if sender.send(Incoming::Question(question, client)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {}
                            Err(error) => {
                                log(format_args!("question channel closed: {error}"));
                                return;
                            }
                        }
                    }
                });
            }
            drop(sender);
            let error = self.answer_messages(port, &messages);
            done.store(true, Ordering::SeqCst);
            error
        });
        // The clients close after this (declared first, dropped last): the driver decides
        // what they were asked and did not answer with its default.
        error
    }

    /// Answers what the readers send until the port fails.
    fn answer_messages(
        &mut self,
        port: &PortConnection,
        messages: &mpsc::Receiver<Incoming<'_>>,
    ) -> io::Error {
        {
            let mut next_poll = Instant::now() + self.options.poll_interval;
            loop {
                let wait = next_poll.saturating_duration_since(Instant::now());
                match messages.recv_timeout(wait) {
                    Ok(Incoming::Port(Ok(request))) => self.answer(port, &request),
                    Ok(Incoming::Question(question, client)) => {
                        self.answer_question(client, &question)
                    }
                    Ok(Incoming::Port(Err(error))) => return error,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        return io::Error::other("the port reader stopped");
                    }
                }
                if Instant::now() >= next_poll {
                    self.check_rules();
                    self.flush_revocations();
                    next_poll = Instant::now() + self.options.poll_interval;
                }
            }
        }
    }

    /// Decides a request, audits the decision and encodes the reply; `None` (logged) for a
    /// request that does not decode, which is not answered.
    fn decide(&mut self, data: &[u8]) -> Option<(u64, Vec<u8>)> {
        let request = match ConnectionRequest::decode(data) {
            Ok(request) => request,
            Err(malformed) => {
                log(format_args!(
                    "malformed request ({} bytes): {}; not answered (the driver applies its default when its wait times out)",
                    data.len(),
                    malformed.0
                ));
                return None;
            }
        };
        let (reply, record) = self.service.decide(&request);
        // Audited before the driver learns the verdict: every verdict that took effect is in
        // the log, even if the service is killed right after replying.
        if let Err(error) = self.audit.write(&record) {
            log(format_args!("cannot write the audit log: {error}"));
        }
        let mut bytes = [0u8; ConnectionReply::MAX_LEN];
        match reply.encode(&mut bytes) {
            Ok(len) => Some((request.request_id, bytes[..len].to_vec())),
            Err(error) => {
                log(format_args!(
                    "request {}: cannot encode the reply: {}",
                    request.request_id, error.0
                ));
                None
            }
        }
    }

    /// Answers a question from the channel, through the client it came through.
    fn answer_question(&mut self, client: &AskClient, question: &Question) {
        let Some((request_id, reply)) = self.decide(&question.body) else {
            return;
        };
        if let Err(error) = client.answer(question.id, &reply) {
            // Most likely late: the driver applied its default at the deadline.
            log(format_args!(
                "request {request_id}: the answer was not taken: {error}"
            ));
        }
    }

    fn answer(&mut self, port: &PortConnection, message: &Request) {
        let Some((request_id, reply)) = self.decide(&message.data) else {
            return;
        };
        if message.wants_reply()
            && let Err(error) = port.reply(message, &reply)
        {
            log(format_args!(
                "request {request_id}: the reply was not delivered: {error}"
            ));
        }
    }

    /// Reloads the rules if the file changed, and revokes what the new rules change.
    fn check_rules(&mut self) {
        match self.watcher.poll() {
            None => {}
            Some(Err(error)) => log(format_args!(
                "{}: cannot read: {error}; the policy in force stays",
                self.service.rules_name()
            )),
            Some(Ok(text)) => match self.service.reload(&text) {
                Err(error) => log(format_args!("{error}; the policy in force stays")),
                Ok(revocation) => {
                    log(format_args!(
                        "reloaded {}: {} rules, default {}; {} cached verdicts to revoke",
                        self.service.rules_name(),
                        self.service.rules().rules().len(),
                        self.service.rules().default_action(),
                        revocation.ids.len()
                    ));
                    self.revocations.add(revocation);
                    self.flush_revocations();
                }
            },
        }
    }

    /// The control device, opened if it is not yet.
    fn control(&mut self) -> Option<&Device> {
        if self.control.is_none() {
            match Device::open(&self.options.control_device) {
                Ok(device) => self.control = Some(device),
                Err(error) => log(format_args!(
                    "cannot open the control device {}: {error}; cached verdicts expire on their own (at most {} s)",
                    self.options.control_device,
                    self.service
                        .cache_lifetime()
                        .map_or(0, CacheLifetime::as_secs)
                )),
            }
        }
        self.control.as_ref()
    }

    /// Has the driver revoke every cached verdict (at connection: an earlier instance or
    /// policy may have let it cache verdicts this one knows nothing about).
    fn revoke_all(&mut self) {
        self.revocations.revoke_all();
        self.flush_revocations();
    }

    /// Sends the revocations that wait, if their retry time has come. Nothing is forgotten
    /// before the driver confirms it: a failed batch stays, and is sent again after a backoff
    /// (or replaced by a revoke-all, see [`PendingRevocations::flush`]).
    fn flush_revocations(&mut self) {
        let mut revocations = std::mem::take(&mut self.revocations);
        let flushed = revocations.flush(Instant::now(), |request| self.send_revoke(request));
        self.revocations = revocations;
        if flushed.all {
            // The driver holds none of the remembered verdicts any more.
            self.service.forget_all();
            log(format_args!(
                "revoked every cached verdict ({} entries)",
                flushed.removed
            ));
        }
        if flushed.ids > 0 {
            log(format_args!(
                "revoked {} cached verdicts ({} entries removed)",
                flushed.ids, flushed.removed
            ));
        }
        if flushed.failed {
            let failures = self.revocations.failures();
            log(format_args!(
                "{} not confirmed ({failures} failure(s) in a row); trying again in {} ms",
                if self.revocations.wants_all() {
                    "revoking every cached verdict".to_owned()
                } else {
                    format!(
                        "revoking {} cached verdicts",
                        self.revocations.ids().count()
                    )
                },
                PendingRevocations::backoff(failures).as_millis()
            ));
        }
    }

    /// Sends one encoded revoke request; the number of entries the driver removed, or `None`
    /// (logged) if it failed. A failed device is closed, to be opened again next time.
    fn send_revoke(&mut self, request: &[u8]) -> Option<u32> {
        let device = self.control()?;
        let outcome = device
            .request(REVOKE.raw(), request, REVOKED_LEN)
            .and_then(|op| op.wait(Some(Duration::from_secs(10))))
            .and_then(|out| {
                let out = out.ok_or_else(|| io::Error::other("no answer in 10 s"))?;
                Revoked::decode(&out).map_err(|m| io::Error::other(m.0))
            });
        match outcome {
            Ok(revoked) => Some(revoked.removed),
            Err(error) => {
                log(format_args!(
                    "revoke request to {} failed: {error}",
                    self.options.control_device
                ));
                self.control = None;
                None
            }
        }
    }
}
