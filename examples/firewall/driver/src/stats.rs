//! Counters of what the driver decided and why, readable while it runs.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// The driver's counters. Each is updated with one atomic add where the event happens (the
/// cache-hit path included: no lock, no allocation), so a [`snapshot`](Self::snapshot) taken
/// while connections are classified is a consistent count of each counter, not of all together.
///
/// The driver keeps its own; a `#[driver_entry]` that wants to read them while the driver runs
/// (a test, the service's simulator demo) gives it a `static` through [`Config::stats`]:
///
/// ```
/// use firewall_driver::{Config, Firewall, Stats};
/// use wfp_rs::driver::Driver;
/// use wfp_rs::irql::PassiveLevel;
/// use wfp_rs::Status;
///
/// static STATS: Stats = Stats::new();
///
/// #[wfp_rs::driver_entry]
/// fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
///     firewall_driver::start(irql, driver, Config { stats: Some(&STATS), ..Config::DEFAULT })
/// }
/// # let machine = wfp_rs_sim::Machine::new();
/// # let driver = machine.load_driver("firewall", DriverEntry).unwrap();
/// assert_eq!(STATS.snapshot().asked, 0);
/// # machine.unload_driver(driver).unwrap();
/// ```
///
/// [`Config::stats`]: crate::Config::stats
pub struct Stats {
    cache_hits: AtomicU64,
    asked_via_channel: AtomicU64,
    asked_via_port: AtomicU64,
    answered: AtomicU64,
    defaults: AtomicU64,
    loopback: AtomicU64,
    cached: AtomicU64,
    expired: AtomicU64,
    evicted: AtomicU64,
    revoked: AtomicU64,
    not_cached_revoked: AtomicU64,
    background_asks: AtomicU64,
    background_skipped: AtomicU64,
    overloaded: AtomicU64,
    unaskable: AtomicU64,
    policy_changes: AtomicU64,
    established_kept: AtomicU64,
    inbound_pended: AtomicU64,
    reinjected: AtomicU64,
    clones_dropped: AtomicU64,
    own_reinjections: AtomicU64,
    inbound_not_pended: AtomicU64,
}

/// The counters at one moment (see [`Stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Classifications answered from the verdict cache.
    pub cache_hits: u64,
    /// Questions put to the service (outbound and inbound pends, and background asks), whether
    /// or not a service was connected to receive them.
    pub asked: u64,
    /// Of `asked`, the questions put to the question channel ([`AskVia::Channel`]).
    ///
    /// [`AskVia::Channel`]: crate::AskVia::Channel
    pub asked_via_channel: u64,
    /// Of `asked`, the questions a work item sent over the port ([`AskVia::PortAndWorkItem`]).
    ///
    /// [`AskVia::PortAndWorkItem`]: crate::AskVia::PortAndWorkItem
    pub asked_via_port: u64,
    /// Valid replies to those requests (the right `request_id`, well-formed, in time).
    pub answered: u64,
    /// Classifications decided by [`Config::default`](crate::Config::default) (every row of
    /// the crate documentation's table that says "the default").
    pub defaults: u64,
    /// Loopback connections permitted without asking.
    pub loopback: u64,
    /// Verdicts put in the cache.
    pub cached: u64,
    /// Cached verdicts found expired by a lookup, or replaced by a new verdict once expired.
    pub expired: u64,
    /// Cached verdicts still valid that made room for a new one (their set was full).
    pub evicted: u64,
    /// Cached verdicts removed by revoke commands.
    pub revoked: u64,
    /// Replies that granted a cache lifetime but were not cached, because a revoke command
    /// came while they were being asked for.
    pub not_cached_revoked: u64,
    /// Misses asked about in the background: inbound connections that were not pended, and
    /// established connections after a rules change.
    pub background_asks: u64,
    /// Inbound misses that did not, because [`Config::background_asks`] were in flight already
    /// (or no work item could be queued).
    ///
    /// [`Config::background_asks`]: crate::Config::background_asks
    pub background_skipped: u64,
    /// New outbound connections the cache did not answer that were not pended, because
    /// [`Config::max_pending`] connections were pended or waiting for their reauthorization
    /// already: each got [`Config::overload`] at once (not counted in `defaults`).
    ///
    /// [`Config::max_pending`]: crate::Config::max_pending
    /// [`Config::overload`]: crate::Config::overload
    pub overloaded: u64,
    /// Connections denied without asking because their image path cannot be carried whole in
    /// a request (longer than any NT path, or not a path at all: an odd number of bytes, a NUL
    /// inside), whatever [`Config::default`](crate::Config::default) says: a question about
    /// part of a path could be answered more permissively than one about the whole path (not
    /// counted in `defaults`).
    pub unaskable: u64,
    /// Policy changes the driver made so that WFP reauthorizes established connections (after a
    /// revoke command, and after a verdict denied an established connection).
    pub policy_changes: u64,
    /// Reauthorizations of established connections after a policy change that the cache did
    /// not answer: each connection kept running while the service was asked in the
    /// background (counted in `background_asks` or `background_skipped` too).
    pub established_kept: u64,
    /// New inbound connections the cache did not answer that were pended at
    /// `ALE_AUTH_RECV_ACCEPT`, their packet cloned, to ask the service (counted in `asked`
    /// too, unless nobody could be asked).
    pub inbound_pended: u64,
    /// Clones of pended inbound packets reinjected because the verdict (the service's or the
    /// default) allowed: each lets its attempt through.
    pub reinjected: u64,
    /// Clones of pended inbound packets freed instead: the verdict denied, the stack refused
    /// the injection, or no work item could be queued to ask. Each such attempt fails.
    /// `inbound_pended` = `reinjected` + `clones_dropped` once every question has ended.
    pub clones_dropped: u64,
    /// Classifications of the driver's own reinjected packets, permitted without asking.
    pub own_reinjections: u64,
    /// New inbound connections the cache did not answer that were not pended: the bound
    /// ([`Config::max_pending`] or [`QUESTION_BYTES`]) was reached, or the packet could not be
    /// cloned. Each got the default at once (counted in `defaults`) and a background ask for
    /// later attempts (`background_asks` or `background_skipped`).
    ///
    /// [`Config::max_pending`]: crate::Config::max_pending
    /// [`QUESTION_BYTES`]: crate::QUESTION_BYTES
    pub inbound_not_pended: u64,
}

/// Which counter to add to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    CacheHits,
    AskedViaChannel,
    AskedViaPort,
    Answered,
    Defaults,
    Loopback,
    Cached,
    Expired,
    Evicted,
    Revoked,
    NotCachedRevoked,
    BackgroundAsks,
    BackgroundSkipped,
    Overloaded,
    Unaskable,
    PolicyChanges,
    EstablishedKept,
    InboundPended,
    Reinjected,
    ClonesDropped,
    OwnReinjections,
    InboundNotPended,
}

impl Stats {
    /// All zero.
    pub const fn new() -> Stats {
        Stats {
            cache_hits: AtomicU64::new(0),
            asked_via_channel: AtomicU64::new(0),
            asked_via_port: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            defaults: AtomicU64::new(0),
            loopback: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            not_cached_revoked: AtomicU64::new(0),
            background_asks: AtomicU64::new(0),
            background_skipped: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            unaskable: AtomicU64::new(0),
            policy_changes: AtomicU64::new(0),
            established_kept: AtomicU64::new(0),
            inbound_pended: AtomicU64::new(0),
            reinjected: AtomicU64::new(0),
            clones_dropped: AtomicU64::new(0),
            own_reinjections: AtomicU64::new(0),
            inbound_not_pended: AtomicU64::new(0),
        }
    }

    fn counter(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::CacheHits => &self.cache_hits,
            Counter::AskedViaChannel => &self.asked_via_channel,
            Counter::AskedViaPort => &self.asked_via_port,
            Counter::Answered => &self.answered,
            Counter::Defaults => &self.defaults,
            Counter::Loopback => &self.loopback,
            Counter::Cached => &self.cached,
            Counter::Expired => &self.expired,
            Counter::Evicted => &self.evicted,
            Counter::Revoked => &self.revoked,
            Counter::NotCachedRevoked => &self.not_cached_revoked,
            Counter::BackgroundAsks => &self.background_asks,
            Counter::BackgroundSkipped => &self.background_skipped,
            Counter::Overloaded => &self.overloaded,
            Counter::Unaskable => &self.unaskable,
            Counter::PolicyChanges => &self.policy_changes,
            Counter::EstablishedKept => &self.established_kept,
            Counter::InboundPended => &self.inbound_pended,
            Counter::Reinjected => &self.reinjected,
            Counter::ClonesDropped => &self.clones_dropped,
            Counter::OwnReinjections => &self.own_reinjections,
            Counter::InboundNotPended => &self.inbound_not_pended,
        }
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        // Counters order nothing: each is only ever read as a total.
        self.counter(counter).fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter| self.counter(counter).load(Ordering::Relaxed);
        StatsSnapshot {
            cache_hits: get(Counter::CacheHits),
            asked_via_channel: get(Counter::AskedViaChannel),
            asked_via_port: get(Counter::AskedViaPort),
            asked: get(Counter::AskedViaChannel) + get(Counter::AskedViaPort),
            answered: get(Counter::Answered),
            defaults: get(Counter::Defaults),
            loopback: get(Counter::Loopback),
            cached: get(Counter::Cached),
            expired: get(Counter::Expired),
            evicted: get(Counter::Evicted),
            revoked: get(Counter::Revoked),
            not_cached_revoked: get(Counter::NotCachedRevoked),
            background_asks: get(Counter::BackgroundAsks),
            background_skipped: get(Counter::BackgroundSkipped),
            overloaded: get(Counter::Overloaded),
            unaskable: get(Counter::Unaskable),
            policy_changes: get(Counter::PolicyChanges),
            established_kept: get(Counter::EstablishedKept),
            inbound_pended: get(Counter::InboundPended),
            reinjected: get(Counter::Reinjected),
            clones_dropped: get(Counter::ClonesDropped),
            own_reinjections: get(Counter::OwnReinjections),
            inbound_not_pended: get(Counter::InboundNotPended),
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cache hits, {} asked ({} through the channel, {} through the port), {} answered, {} defaults, {} loopback, {} cached, \
             {} expired, {} evicted, {} revoked, {} overloaded, {} unaskable",
            self.cache_hits,
            self.asked,
            self.asked_via_channel,
            self.asked_via_port,
            self.answered,
            self.defaults,
            self.loopback,
            self.cached,
            self.expired,
            self.evicted,
            self.revoked,
            self.overloaded,
            self.unaskable
        )
    }
}
