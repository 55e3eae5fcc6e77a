//! The service's decisions, without I/O: [`Service`].
//!
//! # What the service remembers, and why
//!
//! A reply may let the driver reuse its verdict for the same process, remote endpoint and
//! protocol for [`Service::cache_lifetime`]. When the rules change, some of those cached
//! verdicts may no longer be what the new rules decide; the driver must forget them, or the old
//! policy would go on deciding until they expire. The driver names its cache entries by the
//! request that created them, so the service remembers, for every cacheable verdict it gave,
//! the request id, the connection it described, the verdict and when the driver's entry
//! expires. [`Service::reload`] decides each remembered connection again under the new rules and
//! returns the ids whose verdict changed ([`Revocation`]).
//!
//! The driver's cache key (process, image, direction, protocol, remote endpoint, and the local
//! port of inbound connections) holds every field a rule matches except the local port of
//! outbound connections, which is fresh for each. An outbound verdict that a rule's
//! `local_port` makes depend on the local port
//! ([`Decision::local_port_matters`](firewall_rules::Decision::local_port_matters)) is
//! therefore never cacheable: the driver would give it to the same process's next connection
//! to the same endpoint from another local port. For the same reason a reload revokes a
//! remembered outbound verdict when the new rules make it depend on the local port, even if
//! they decide the remembered connection the same way.
//!
//! The memory is bounded ([`Service::memory_capacity`]). When it is full (after dropping what has
//! expired), the service answers **without** a cache lifetime rather than forget a verdict the
//! driver could still be holding: a verdict it cannot revoke is never cached.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use firewall_protocol::control::{MAX_REVOKE_IDS, REVOKE_MAX_LEN, Revoke};
use firewall_protocol::{CacheLifetime, ConnectionReply, ConnectionRequest};
use firewall_rules::{Connection, DecidedBy, Rules, RulesError, VolumeMap};

use crate::audit::{AuditRecord, Outcome};

/// The cache lifetime the service grants unless told otherwise, in seconds.
pub const DEFAULT_CACHE_SECONDS: u32 = 60;
/// How many cacheable verdicts the service remembers unless told otherwise.
pub const DEFAULT_MEMORY_CAPACITY: usize = 4096;

/// The rules and the verdicts the service gave under them. See the [module
/// documentation](self).
#[derive(Debug)]
pub struct Service {
    rules: Rules,
    rules_name: String,
    volumes: VolumeMap,
    cache: Option<CacheLifetime>,
    capacity: usize,
    remembered: BTreeMap<u64, Remembered>,
}

/// A cacheable verdict the service gave: what the driver may be holding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    /// The connection the request described, as the rules saw it.
    pub connection: Connection,
    /// The verdict given.
    pub verdict: firewall_rules::Verdict,
    /// When the driver's cache entry runs out.
    pub expires: SystemTime,
}

/// The cached verdicts a reload changed: the request ids whose replies the driver must forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocation {
    /// The request ids, in increasing order.
    pub ids: Vec<u64>,
}

impl Revocation {
    /// Whether nothing needs revoking.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids in batches of at most [`MAX_REVOKE_IDS`], one per revoke request.
    pub fn batches(&self) -> impl Iterator<Item = &[u64]> {
        self.ids.chunks(MAX_REVOKE_IDS)
    }

    /// The encoded revoke requests ([`Revoke::encode_requests`]), one per batch.
    pub fn encode(&self) -> Vec<Vec<u8>> {
        self.batches()
            .map(|batch| {
                let mut out = vec![0u8; REVOKE_MAX_LEN];
                // A batch holds at most MAX_REVOKE_IDS ids and the buffer has room for them.
                let len = Revoke::encode_requests(batch, &mut out).unwrap_or(0);
                out.truncate(len);
                out
            })
            .collect()
    }
}

/// How many times in a row a batch of ids may fail before the service asks the driver to revoke
/// everything instead.
pub const REVOKE_RETRIES: u32 = 5;

/// How many ids may wait to be revoked; beyond it the service revokes everything instead (one
/// request, whatever the set's size).
pub const MAX_PENDING_REVOKE_IDS: usize = 16 * MAX_REVOKE_IDS;

/// The first wait before a failed revoke request is sent again; it doubles with each failure in
/// a row, up to [`REVOKE_MAX_BACKOFF`].
pub const REVOKE_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to revoke.
pub const REVOKE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Revocations the driver has not confirmed yet: kept until it does, retried with a bounded
/// backoff, and replaced by one revoke-all when a batch has failed [`REVOKE_RETRIES`] times in
/// a row or more than [`MAX_PENDING_REVOKE_IDS`] ids wait. Time is passed in, never read, so
/// the schedule is the same in a test as in the service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingRevocations {
    ids: std::collections::BTreeSet<u64>,
    all: bool,
    failures: u32,
    retry_at: Option<std::time::Instant>,
}

/// What one [`PendingRevocations::flush`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Ids the driver confirmed revoked (batches it answered).
    pub ids: usize,
    /// Cache entries the driver said it removed.
    pub removed: u64,
    /// Whether a revoke-all was confirmed (every cached verdict is gone).
    pub all: bool,
    /// Whether a request failed; what is left waits for the next attempt.
    pub failed: bool,
}

impl PendingRevocations {
    /// Nothing to revoke.
    pub fn new() -> PendingRevocations {
        PendingRevocations::default()
    }

    /// Adds a reload's ids (due at once).
    pub fn add(&mut self, revocation: Revocation) {
        if revocation.is_empty() {
            return;
        }
        if !self.all {
            self.ids.extend(revocation.ids);
            if self.ids.len() > MAX_PENDING_REVOKE_IDS {
                self.revoke_all();
            }
        }
        self.retry_at = None;
    }

    /// Revokes every cached verdict instead of the ids (due at once).
    pub fn revoke_all(&mut self) {
        self.ids.clear();
        self.all = true;
        self.retry_at = None;
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        !self.all && self.ids.is_empty()
    }

    /// Whether a revoke-all waits.
    pub fn wants_all(&self) -> bool {
        self.all
    }

    /// The ids waiting (empty when a revoke-all waits: it covers them).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.iter().copied()
    }

    /// Failed attempts in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether something waits and its retry time (if any) has come at `now`.
    pub fn due(&self, now: std::time::Instant) -> bool {
        !self.is_empty() && self.retry_at.is_none_or(|at| now >= at)
    }

    /// The wait after `failures` failures in a row.
    pub fn backoff(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        REVOKE_FIRST_BACKOFF
            .saturating_mul(1 << doublings)
            .min(REVOKE_MAX_BACKOFF)
    }

    /// Sends what waits, if [`due`](Self::due) at `now`: the revoke-all, or the ids in batches
    /// of at most [`MAX_REVOKE_IDS`]. `send` sends one encoded request and returns how many
    /// entries the driver removed, or `None` if it failed. An id is forgotten only when the
    /// driver answered its batch; at the first failure the rest waits until
    /// [`backoff`](Self::backoff) has passed, and after [`REVOKE_RETRIES`] failures in a row
    /// the ids give way to a revoke-all.
    pub fn flush(
        &mut self,
        now: std::time::Instant,
        mut send: impl FnMut(&[u8]) -> Option<u32>,
    ) -> Flushed {
        let mut flushed = Flushed::default();
        if !self.due(now) {
            return flushed;
        }
        if self.all {
            match send(&encode_revoke_all()) {
                Some(removed) => {
                    self.all = false;
                    flushed.all = true;
                    flushed.removed = u64::from(removed);
                }
                None => flushed.failed = true,
            }
        } else {
            while let Some(batch) = self.next_batch() {
                let revocation = Revocation { ids: batch };
                // One batch: one request.
                let Some(removed) = revocation.encode().first().and_then(|r| send(r)) else {
                    flushed.failed = true;
                    break;
                };
                for id in &revocation.ids {
                    self.ids.remove(id);
                }
                flushed.ids += revocation.ids.len();
                flushed.removed += u64::from(removed);
            }
        }
        if flushed.failed {
            self.failures = self.failures.saturating_add(1);
            if !self.all && self.failures >= REVOKE_RETRIES {
                self.revoke_all();
            }
            self.retry_at = Some(now + Self::backoff(self.failures));
        } else {
            self.failures = 0;
            self.retry_at = None;
        }
        flushed
    }

    fn next_batch(&self) -> Option<Vec<u64>> {
        let batch: Vec<u64> = self.ids.iter().copied().take(MAX_REVOKE_IDS).collect();
        (!batch.is_empty()).then_some(batch)
    }
}

/// The request to revoke every cached verdict, encoded.
pub fn encode_revoke_all() -> Vec<u8> {
    let mut out = vec![0u8; REVOKE_MAX_LEN];
    let len = Revoke::encode_all(&mut out).unwrap_or(0);
    out.truncate(len);
    out
}

/// A rules file that could not be used: unreadable, or not a valid policy.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Read {
        /// The file.
        file: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not a valid policy: `file:line:col: message`.
    Rules(RulesError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read { file, error } => write!(f, "{file}: cannot read: {error}"),
            LoadError::Rules(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<RulesError> for LoadError {
    fn from(error: RulesError) -> Self {
        LoadError::Rules(error)
    }
}

/// Reads and parses the rules file at `path`; errors name it as given.
pub fn load_rules(path: &Path) -> Result<Rules, LoadError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| LoadError::Read {
        file: file.clone(),
        error,
    })?;
    Ok(Rules::parse_named(&file, &text)?)
}

/// The drive letters' NT devices as Windows maps them now (`QueryDosDeviceW` for `A:` to
/// `Z:`): `C` → `\Device\HarddiskVolume3`, and so on. Letters mapped to something other than a
/// `\Device\...` path (a `subst` drive maps to `\??\C:\dir`) are left out. Empty on other
/// hosts, where the simulator's paths are mapped with `--volume`.
#[cfg(windows)]
pub fn system_volumes() -> VolumeMap {
    let mut map = VolumeMap::new();
    for letter in 'A'..='Z' {
        let name: Vec<u16> = format!("{letter}:").encode_utf16().chain([0]).collect();
        let mut target = vec![0u16; 1024];
        // SAFETY: `name` is NUL-terminated and lives across the call; `target` has
        // `target.len()` writable units, which is what the call is told it may write.
        let len = unsafe {
            windows_sys::Win32::Storage::FileSystem::QueryDosDeviceW(
                name.as_ptr(),
                target.as_mut_ptr(),
                target.len() as u32,
            )
        };
        // A list of NUL-terminated names; the first is the mapping in force.
        let written = target.get(..len as usize).unwrap_or_default();
        let first = written.split(|&u| u == 0).next().unwrap_or_default();
        let device = String::from_utf16_lossy(first);
        if device.starts_with(r"\Device\") {
            map.insert(&device, letter);
        }
    }
    map
}

/// The drive letters' NT devices: none outside Windows (see the Windows version).
#[cfg(not(windows))]
pub fn system_volumes() -> VolumeMap {
    VolumeMap::new()
}

/// `request` as the rules see it: the image path, whole, turned into a DOS path with
/// `volumes`.
pub fn connection_of(request: &ConnectionRequest, volumes: &VolumeMap) -> Connection {
    let nt = request.image_path.chars_lossy().collect::<String>();
    let app = volumes.to_dos_path(&nt);
    Connection {
        app,
        remote: request.remote_address,
        port: request.remote_port,
        local_port: request.local_port,
        protocol: request.ip_protocol,
        direction: match request.direction {
            firewall_protocol::Direction::Outbound => firewall_rules::Direction::Outbound,
            firewall_protocol::Direction::Inbound => firewall_rules::Direction::Inbound,
        },
    }
}

/// Whether a decision on `connection` depends on something the driver's cache key leaves out:
/// the local port of an outbound connection (`local_port_matters`, from
/// [`Decision::local_port_matters`](firewall_rules::Decision::local_port_matters)). Such a
/// verdict must not be cached. See the [module documentation](self).
pub fn outside_the_drivers_key(connection: &Connection, local_port_matters: bool) -> bool {
    local_port_matters && connection.direction == firewall_rules::Direction::Outbound
}

/// The protocol's verdict for the rules' one.
pub fn wire_verdict(verdict: firewall_rules::Verdict) -> firewall_protocol::Verdict {
    match verdict {
        firewall_rules::Verdict::Allow => firewall_protocol::Verdict::Allow,
        firewall_rules::Verdict::Deny => firewall_protocol::Verdict::Deny,
    }
}

/// How a decision is named in the audit log and the demo: `rule 3 "browsers"` (1-based, as
/// an operator counts rules in the file), `rule 4` for an unnamed rule, or `default`.
pub fn describe_decided_by(by: &DecidedBy<'_>) -> String {
    match by {
        DecidedBy::Rule {
            index,
            name: Some(name),
        } => format!("rule {} \"{name}\"", index + 1),
        DecidedBy::Rule { index, name: None } => format!("rule {}", index + 1),
        DecidedBy::Default => "default".to_owned(),
    }
}

impl Service {
    /// A service deciding with `rules` (named `rules_name` in reload errors), mapping image
    /// paths with `volumes`, granting `cache` (`None`: replies are never cached) and remembering
    /// up to [`DEFAULT_MEMORY_CAPACITY`] cacheable verdicts.
    pub fn new(
        rules: Rules,
        rules_name: impl Into<String>,
        volumes: VolumeMap,
        cache: Option<CacheLifetime>,
    ) -> Service {
        Service {
            rules,
            rules_name: rules_name.into(),
            volumes,
            cache,
            capacity: DEFAULT_MEMORY_CAPACITY,
            remembered: BTreeMap::new(),
        }
    }

    /// The same service remembering at most `capacity` cacheable verdicts (0: never cache).
    pub fn with_memory_capacity(mut self, capacity: usize) -> Service {
        self.capacity = capacity;
        self
    }

    /// The policy in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The name the rules file has in errors.
    pub fn rules_name(&self) -> &str {
        &self.rules_name
    }

    /// The volume map.
    pub fn volumes(&self) -> &VolumeMap {
        &self.volumes
    }

    /// The cache lifetime the service grants, if any.
    pub fn cache_lifetime(&self) -> Option<CacheLifetime> {
        self.cache
    }

    /// How many cacheable verdicts the service remembers at most.
    pub fn memory_capacity(&self) -> usize {
        self.capacity
    }

    /// The cacheable verdicts remembered, by request id (expired ones may linger until the next
    /// [`decide_at`](Self::decide_at) or [`reload_at`](Self::reload_at)).
    pub fn remembered(&self) -> &BTreeMap<u64, Remembered> {
        &self.remembered
    }

    /// [`decide_at`](Self::decide_at) now.
    pub fn decide(&mut self, request: &ConnectionRequest) -> (ConnectionReply, AuditRecord) {
        self.decide_at(request, SystemTime::now())
    }

    /// Decides `request` at time `now`: the reply for the driver, and the audit record. The
    /// reply is cacheable if the service grants a lifetime, the verdict of an outbound connection
    /// does not depend on its local port (see the [module documentation](self)), and there is
    /// room to remember it.
    pub fn decide_at(
        &mut self,
        request: &ConnectionRequest,
        now: SystemTime,
    ) -> (ConnectionReply, AuditRecord) {
        let connection = connection_of(request, &self.volumes);
        let decision = self.rules.decide(&connection);
        let verdict = decision.verdict;
        let decided_by = decision.by;
        let (rule_index, rule_name) = match decided_by {
            DecidedBy::Rule { index, name } => (Some(index + 1), name.map(str::to_owned)),
            DecidedBy::Default => (None, None),
        };
        let by = describe_decided_by(&decided_by);
        let mut reply = request.reply(wire_verdict(verdict));
        if let Some(lifetime) = self.cache
            && !outside_the_drivers_key(&connection, decision.local_port_matters)
            && self.make_room(now)
        {
            reply = reply.cached_for(lifetime);
            let expires = now + Duration::from_secs(u64::from(lifetime.as_secs()));
            self.remembered.insert(
                request.request_id,
                Remembered {
                    connection: connection.clone(),
                    verdict,
                    expires,
                },
            );
        }
        let record = AuditRecord::of(
            request,
            now,
            Outcome {
                image_dos: connection.app,
                verdict,
                decided_by: by,
                rule_index,
                rule_name,
                cache_seconds: reply.cache.map_or(0, CacheLifetime::as_secs),
            },
        );
        (reply, record)
    }

    /// Drops what has expired at `now`; whether there is room for one more.
    fn make_room(&mut self, now: SystemTime) -> bool {
        if self.remembered.len() >= self.capacity {
            self.forget_expired(now);
        }
        self.remembered.len() < self.capacity
    }

    /// Forgets the verdicts whose cache entries have run out at `now`.
    pub fn forget_expired(&mut self, now: SystemTime) {
        self.remembered.retain(|_, r| r.expires > now);
    }

    /// Forgets every remembered verdict: after the driver was told to revoke them all (at
    /// start, and after reconnecting).
    pub fn forget_all(&mut self) {
        self.remembered.clear();
    }

    /// [`reload_at`](Self::reload_at) now.
    pub fn reload(&mut self, text: &str) -> Result<Revocation, RulesError> {
        self.reload_at(text, SystemTime::now())
    }

    /// Replaces the policy with the one in `text` (errors name the file as
    /// [`rules_name`](Self::rules_name)). On error the policy in force stays. On success,
    /// returns the remembered verdicts, still cached at `now`, that the new rules decide
    /// differently, or (outbound) whose decision depends on the local port under the new rules;
    /// they are forgotten here, and the caller must have the driver revoke them.
    pub fn reload_at(&mut self, text: &str, now: SystemTime) -> Result<Revocation, RulesError> {
        let rules = Rules::parse_named(&self.rules_name, text)?;
        self.forget_expired(now);
        let ids: Vec<u64> = self
            .remembered
            .iter()
            .filter(|(_, r)| {
                let decision = rules.decide(&r.connection);
                decision.verdict != r.verdict
                    || outside_the_drivers_key(&r.connection, decision.local_port_matters)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &ids {
            self.remembered.remove(id);
        }
        self.rules = rules;
        Ok(Revocation { ids })
    }

    /// Decides a connection described directly (not by the driver), for operator tools: the
    /// rules' [`Decision`](firewall_rules::Decision) on `app` (an NT path is mapped to DOS with
    /// the volume map), `remote`:`port` and this machine's `local_port`.
    pub fn explain(
        &self,
        app: &str,
        remote: IpAddr,
        port: u16,
        local_port: u16,
        protocol: u8,
        direction: firewall_rules::Direction,
    ) -> (Connection, firewall_rules::Verdict, String) {
        let connection = Connection {
            app: self.volumes.to_dos_path(app),
            remote,
            port,
            local_port,
            protocol,
            direction,
        };
        let decision = self.rules.decide(&connection);
        let by = describe_decided_by(&decision.by);
        (connection.clone(), decision.verdict, by)
    }
}
