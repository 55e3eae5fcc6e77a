//! The verdict cache: the reusable part of the example, a map from a connection's
//! [`CacheKey`] to the [`Verdict`] the service gave for it, looked up at any IRQL up to
//! `DISPATCH_LEVEL` without allocating.
//!
//! - **Bounded**: every slot is allocated by [`VerdictCache::new`]; lookups and insertions never
//!   allocate.
//! - **Set-associative**: a key's hash picks a set of [`WAYS`] slots, and each operation scans
//!   that set only, under a spin lock, so its cost does not grow with the capacity. A new entry
//!   takes its key's own slot, else a free one, else the one that expired first, else the
//!   oldest.
//! - **Expiring**: each entry answers until its [`Answer::expires`], on the kernel's
//!   interrupt-time clock ([`Instant`]); a lookup that finds it expired removes it.
//! - **Revocable**: [`VerdictCache::revoke`] removes every entry, or those created by the
//!   replies to given requests, and keeps answers to questions asked before it out of the
//!   cache ([`VerdictCache::generation`]).
//!
//! ```
//! use core::net::{IpAddr, Ipv4Addr};
//! use core::time::Duration;
//! use firewall_driver::cache::{Answer, CacheKey, Insert, Lookup, VerdictCache};
//! use firewall_protocol::{Direction, Verdict};
//! use wfp_rs::time::Instant;
//!
//! # let machine = wfp_rs_sim::Machine::new();
//! # machine.at_dispatch(|irql| {
//! let cache = VerdictCache::new(1024).unwrap();
//! let key = CacheKey {
//!     pid: 42,
//!     app: 0x1234,
//!     direction: Direction::Outbound,
//!     protocol: 6,
//!     remote: (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 443),
//!     local_port: 0,
//! };
//! // Read before the question is asked, so a revocation in between keeps the answer out.
//! let generation = cache.generation();
//! let now = Instant::now();
//! let answer = Answer {
//!     verdict: Verdict::Allow,
//!     expires: now.saturating_add(Duration::from_secs(60)),
//!     request_id: 17,
//! };
//! assert_eq!(cache.insert(&mut *irql, key, answer, now, generation), Insert::Added);
//! assert_eq!(cache.lookup(&mut *irql, &key, now), Lookup::Hit(Verdict::Allow));
//! # });
//! ```

use alloc::vec::Vec;
use core::net::IpAddr;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use firewall_protocol::control::{MAX_REVOKE_IDS, Revoke};
use firewall_protocol::{Direction, Verdict};
use wfp_rs::Status;
use wfp_rs::irql::RaiseIrql;
use wfp_rs::spin_lock::SpinLock;
use wfp_rs::time::Instant;

/// How many slots one key may occupy: the cache is 8-way set-associative.
pub const WAYS: usize = 8;

/// What a cached verdict answers for: the process (its id, and its image so that a reused
/// process id is another key), the direction, the protocol, the remote endpoint and, for
/// inbound connections only, the local port. An outbound connection's local port is fresh each
/// time, so a key with it would never be found again; an inbound connection's is the port
/// connected to, which rules name (`local_port = 22`) and which a retransmitted attempt
/// repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey {
    /// The process id (`FWPS_INCOMING_METADATA_VALUES0::processId`).
    pub pid: u64,
    /// The keyed hash of the image path's bytes (`wfp_rs::pend::app_hash`, as in
    /// `wfp_rs::pend::ConnectionKey::app`).
    pub app: u64,
    /// Which way the connection goes.
    pub direction: Direction,
    /// The IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// The remote address and port.
    pub remote: (IpAddr, u16),
    /// The local port of an inbound connection; 0 for outbound ones.
    pub local_port: u16,
}

impl CacheKey {
    /// 64-bit FNV-1a over the key's fields, to pick its set.
    fn hash(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for byte in bytes {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(&self.pid.to_le_bytes());
        eat(&self.app.to_le_bytes());
        eat(&[
            match self.direction {
                Direction::Outbound => 0,
                Direction::Inbound => 1,
            },
            self.protocol,
        ]);
        match self.remote.0 {
            IpAddr::V4(v4) => eat(&v4.octets()),
            IpAddr::V6(v6) => eat(&v6.octets()),
        }
        eat(&self.remote.1.to_le_bytes());
        eat(&self.local_port.to_le_bytes());
        hash
    }
}

/// A [`CacheKey`] as an entry stores it: the same fields, losslessly, in 40 bytes instead of
/// 48 — the remote address in 16 bytes with its family in a flag rather than an `IpAddr` (17
/// bytes and padding). Two keys store equal exactly when they are equal (`stored_keys_are_equal_
/// exactly_when_the_keys_are` below): nothing is hashed or cut, so a lookup can only hit the
/// entry of its own key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StoredKey {
    pid: u64,
    app: u64,
    /// An IPv4 address in the first 4 bytes (the rest zero), an IPv6 address in all 16.
    remote_address: [u8; 16],
    remote_port: u16,
    local_port: u16,
    protocol: u8,
    /// [`INBOUND`](Self::INBOUND) and [`IPV6`](Self::IPV6).
    flags: u8,
}

impl StoredKey {
    const INBOUND: u8 = 1;
    const IPV6: u8 = 2;

    fn of(key: &CacheKey) -> StoredKey {
        let mut remote_address = [0u8; 16];
        let mut flags = match key.direction {
            Direction::Outbound => 0,
            Direction::Inbound => Self::INBOUND,
        };
        match key.remote.0 {
            IpAddr::V4(v4) => remote_address[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => {
                remote_address = v6.octets();
                flags |= Self::IPV6;
            }
        }
        StoredKey {
            pid: key.pid,
            app: key.app,
            remote_address,
            remote_port: key.remote.1,
            local_port: key.local_port,
            protocol: key.protocol,
            flags,
        }
    }
}

/// One cached verdict. 64 bytes with its `Option` (one cache line), which is what a slot of the
/// cache costs in non-paged pool: [`BYTES_PER_VERDICT`].
#[derive(Clone, Copy)]
struct Entry {
    key: StoredKey,
    verdict: Verdict,
    /// The first instant at which the entry no longer answers.
    expires: Instant,
    /// The request whose reply created the entry: what a revoke command names.
    request_id: u64,
    /// Insertion order within the cache, for "oldest first" eviction, modulo 2^32: ages are
    /// compared as the wrapping distance from the cache's current stamp, exact for the entries
    /// inserted in the last 2^32 insertions. An entry that outlived 4 billion insertions may be
    /// taken for a young one; that only changes which valid entry of a full set is evicted,
    /// never what a lookup answers.
    stamp: u32,
}

/// Bytes of non-paged pool per cached verdict: the cache is one allocation of `capacity` slots
/// of this size, made by [`VerdictCache::new`].
pub const BYTES_PER_VERDICT: usize = core::mem::size_of::<Option<Entry>>();

// The issue 11 budget: a cached verdict in at most one cache line.
const _: () = assert!(core::mem::size_of::<Entry>() <= 64);
const _: () = assert!(BYTES_PER_VERDICT <= 64);

/// A verdict to cache, with its expiry and the request it answered.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// The verdict.
    pub verdict: Verdict,
    /// The first instant at which it no longer answers.
    pub expires: Instant,
    /// The request whose reply gave it: what [`VerdictCache::revoke`] names.
    pub request_id: u64,
}

/// What [`VerdictCache::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A live entry: its verdict.
    Hit(Verdict),
    /// No entry for the key.
    Miss,
    /// An entry for the key had expired; it is gone now.
    Expired,
}

/// What [`VerdictCache::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// Into a free slot, or over an earlier entry for the same key.
    Added,
    /// Over an expired entry of the set.
    ReplacedExpired,
    /// Over the oldest entry of the full set, still valid.
    Evicted,
    /// Not cached: a revoke command came after the question was asked, so the answer may be
    /// one of those revoked.
    Revoked,
    /// Not cached: the cache has no slots.
    Disabled,
}

struct Inner {
    /// `sets * ways` slots; set `s` is `slots[s * ways..(s + 1) * ways]`.
    slots: Vec<Option<Entry>>,
    ways: usize,
    stamp: u32,
}

impl Inner {
    fn set_of(&self, key: &CacheKey) -> Option<Range<usize>> {
        let sets = self.slots.len().checked_div(self.ways)?;
        if sets == 0 {
            return None;
        }
        // `sets` fits in a usize, so the remainder does too.
        let set = (key.hash() % sets as u64) as usize;
        Some(set * self.ways..(set + 1) * self.ways)
    }
}

/// The verdict cache. All of its memory is allocated by [`new`](Self::new); lookups and
/// insertions take a spin lock and scan one set of [`WAYS`] slots.
pub struct VerdictCache {
    inner: SpinLock<Inner>,
    /// Incremented, under the lock, by every revocation. A question remembers it when it is
    /// asked, and its answer is cached only if no revocation came in between.
    generation: AtomicU64,
}

impl VerdictCache {
    /// A cache of `capacity` slots, rounded down to a multiple of [`WAYS`] when it is larger
    /// (smaller caches are one fully associative set). 0 disables caching. Fails only without
    /// pool.
    pub fn new(capacity: usize) -> Result<VerdictCache, Status> {
        let ways = capacity.clamp(1, WAYS);
        let slots_len = capacity - capacity % ways;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(slots_len)
            .map_err(|_| Status::INSUFFICIENT_RESOURCES)?;
        slots.resize(slots_len, None);
        Ok(VerdictCache {
            inner: SpinLock::new(Inner {
                slots,
                ways,
                stamp: 0,
            }),
            generation: AtomicU64::new(0),
        })
    }

    /// How many slots the cache has.
    pub fn capacity(&self, irql: impl RaiseIrql) -> usize {
        self.inner.lock(irql, |inner, _| inner.slots.len())
    }

    /// The verdict cached for `key`, if one is and it has not expired at `now`. An expired
    /// entry is removed.
    pub fn lookup(&self, irql: impl RaiseIrql, key: &CacheKey, now: Instant) -> Lookup {
        let stored = StoredKey::of(key);
        self.inner.lock(irql, |inner, _| {
            let Some(set) = inner.set_of(key) else {
                return Lookup::Miss;
            };
            for slot in &mut inner.slots[set] {
                if let Some(entry) = slot
                    && entry.key == stored
                {
                    if now >= entry.expires {
                        *slot = None;
                        return Lookup::Expired;
                    }
                    return Lookup::Hit(entry.verdict);
                }
            }
            Lookup::Miss
        })
    }

    /// The revocation generation now: read it before asking the question whose answer may be
    /// cached.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches `answer` for `key` until it expires, unless a
    /// revocation came since `generation` was read. In the key's set it takes the key's own
    /// slot, else a free one, else the one that expired first (if any has at `now`), else the
    /// oldest.
    pub fn insert(
        &self,
        irql: impl RaiseIrql,
        key: CacheKey,
        answer: Answer,
        now: Instant,
        generation: u64,
    ) -> Insert {
        let Answer {
            verdict,
            expires,
            request_id,
        } = answer;
        let stored = StoredKey::of(&key);
        self.inner.lock(irql, |inner, _| {
            // Revocations change the generation under this lock: checked here, the answer is
            // either cached before a revocation (and revoked by it) or not at all.
            if self.generation.load(Ordering::SeqCst) != generation {
                return Insert::Revoked;
            }
            let Some(set) = inner.set_of(&key) else {
                return Insert::Disabled;
            };
            inner.stamp = inner.stamp.wrapping_add(1);
            let stamp = inner.stamp;
            let (mut same, mut free, mut expired, mut oldest) =
                (None, None, None::<(usize, Instant)>, None::<(usize, u32)>);
            for index in set {
                match &inner.slots[index] {
                    Some(entry) if entry.key == stored => {
                        same = Some(index);
                        break;
                    }
                    Some(entry) if now >= entry.expires => {
                        if expired.is_none_or(|(_, first)| entry.expires < first) {
                            expired = Some((index, entry.expires));
                        }
                    }
                    Some(entry) => {
                        let age = stamp.wrapping_sub(entry.stamp);
                        if oldest.is_none_or(|(_, most)| age > most) {
                            oldest = Some((index, age));
                        }
                    }
                    None => {
                        free.get_or_insert(index);
                    }
                }
            }
            let (index, outcome) = match (same, free, expired, oldest) {
                (Some(index), ..) | (None, Some(index), ..) => (index, Insert::Added),
                (None, None, Some((index, _)), _) => (index, Insert::ReplacedExpired),
                (None, None, None, Some((index, _))) => (index, Insert::Evicted),
                // A set has at least one slot, and each is one of the above.
                (None, None, None, None) => return Insert::Disabled,
            };
            inner.slots[index] = Some(Entry {
                key: stored,
                verdict,
                expires,
                request_id,
                stamp,
            });
            outcome
        })
    }

    /// Removes what `revoke` names — every entry, or those created by the replies to the
    /// listed requests — and returns how many entries it removed. Every revocation, even one
    /// that removes nothing, keeps answers to questions asked before it out of the cache (see
    /// [`insert`](Self::insert)).
    pub fn revoke(&self, irql: impl RaiseIrql, revoke: &Revoke<'_>) -> u32 {
        // Sorted before the lock is taken, so the scan under it is a binary search per entry.
        let mut ids = [0u64; MAX_REVOKE_IDS];
        let ids = match revoke {
            Revoke::All => &mut ids[..0],
            Revoke::Requests(named) => {
                let mut len = 0;
                // `Revoke::decode` admits at most MAX_REVOKE_IDS.
                for (slot, id) in ids.iter_mut().zip(named.iter()) {
                    *slot = id;
                    len += 1;
                }
                let ids = &mut ids[..len];
                ids.sort_unstable();
                ids
            }
        };
        self.inner.lock(irql, |inner, _| {
            self.generation.fetch_add(1, Ordering::SeqCst);
            let mut removed = 0u32;
            for slot in inner.slots.iter_mut() {
                let named = match (revoke, &slot) {
                    (_, None) => false,
                    (Revoke::All, Some(_)) => true,
                    (Revoke::Requests(_), Some(entry)) => {
                        ids.binary_search(&entry.request_id).is_ok()
                    }
                };
                if named {
                    *slot = None;
                    removed += 1;
                }
            }
            removed
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::net::Ipv4Addr;

    use firewall_protocol::control::{REVOKE_MAX_LEN, Revoke};
    use wfp_rs::irql::DispatchLevel;
    use wfp_rs_sim::Machine;

    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey {
            pid: 42,
            app: 7,
            direction: Direction::Outbound,
            protocol: 6,
            remote: (IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 443),
            local_port: 0,
        }
    }

    fn at(ticks: u64) -> Instant {
        Instant::from_ticks(ticks)
    }

    fn answer(verdict: Verdict, expires: u64, request_id: u64) -> Answer {
        Answer {
            verdict,
            expires: at(expires),
            request_id,
        }
    }

    fn with_cache(capacity: usize, test: impl FnOnce(&mut DispatchLevel<'_>, &VerdictCache)) {
        let machine = Machine::new();
        let cache = VerdictCache::new(capacity).unwrap();
        machine.at_dispatch(|irql| test(irql, &cache));
    }

    fn revoke_ids(ids: &[u64], test: impl FnOnce(&Revoke<'_>)) {
        let mut bytes = [0u8; REVOKE_MAX_LEN];
        let len = Revoke::encode_requests(ids, &mut bytes).unwrap();
        test(&Revoke::decode(&bytes[..len]).unwrap());
    }

    #[test]
    fn a_cached_verdict_is_64_bytes() {
        // The crate documentation's memory figures.
        assert_eq!(BYTES_PER_VERDICT, 64);
        assert_eq!(core::mem::size_of::<Option<Entry>>(), 64);
    }

    /// Keys that differ in one field each, and in the address family only.
    fn distinct_keys() -> Vec<CacheKey> {
        let base = key(1);
        let v6 = |octets: [u8; 16]| IpAddr::V6(core::net::Ipv6Addr::from(octets));
        let mut v4_in_v6 = [0u8; 16];
        v4_in_v6[..4].copy_from_slice(&[192, 0, 2, 1]);
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[192, 0, 2, 1]);
        let mut keys = Vec::from([base]);
        let mut with = |change: &dyn Fn(&mut CacheKey)| {
            let mut k = base;
            change(&mut k);
            keys.push(k);
        };
        with(&|k| k.pid = 43);
        with(&|k| k.pid = 42 | 1 << 40);
        with(&|k| k.app = 8);
        with(&|k| k.direction = Direction::Inbound);
        with(&|k| k.protocol = 17);
        with(&|k| k.remote.0 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)));
        // The same 16 bytes as the IPv4 key stores, as an IPv6 address: another key.
        with(&|k| k.remote.0 = v6(v4_in_v6));
        with(&|k| k.remote.0 = v6(mapped));
        with(&|k| k.remote.0 = v6([0; 16]));
        with(&|k| k.remote.0 = IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        with(&|k| k.remote.1 = 444);
        with(&|k| k.local_port = 1);
        with(&|k| {
            k.direction = Direction::Inbound;
            k.remote.0 = v6(v4_in_v6);
        });
        keys
    }

    #[test]
    fn stored_keys_are_equal_exactly_when_the_keys_are() {
        let keys = distinct_keys();
        for (i, a) in keys.iter().enumerate() {
            for (j, b) in keys.iter().enumerate() {
                assert_eq!(a == b, i == j, "{a:?} {b:?}");
                assert_eq!(StoredKey::of(a) == StoredKey::of(b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn a_lookup_hits_only_its_own_key() {
        // One set of two ways: each pair of distinct keys shares it.
        let keys = distinct_keys();
        with_cache(2, |irql, cache| {
            for (i, a) in keys.iter().enumerate() {
                for b in keys.iter().skip(i + 1) {
                    cache.revoke(&mut *irql, &Revoke::All);
                    let g = cache.generation();
                    let (allow, deny) = (
                        answer(Verdict::Allow, 1_000, 1),
                        answer(Verdict::Deny, 1_000, 2),
                    );
                    assert_eq!(cache.insert(&mut *irql, *a, allow, at(0), g), Insert::Added);
                    assert_eq!(cache.insert(&mut *irql, *b, deny, at(0), g), Insert::Added);
                    assert_eq!(
                        cache.lookup(&mut *irql, a, at(0)),
                        Lookup::Hit(Verdict::Allow)
                    );
                    assert_eq!(
                        cache.lookup(&mut *irql, b, at(0)),
                        Lookup::Hit(Verdict::Deny)
                    );
                    revoke_ids(&[1], |revoke| {
                        assert_eq!(cache.revoke(&mut *irql, revoke), 1)
                    });
                    assert_eq!(cache.lookup(&mut *irql, a, at(0)), Lookup::Miss, "{a:?}");
                    assert_eq!(
                        cache.lookup(&mut *irql, b, at(0)),
                        Lookup::Hit(Verdict::Deny),
                        "{b:?}"
                    );
                }
            }
        });
    }

    #[test]
    fn eviction_takes_the_oldest_across_the_stamps_wrap() {
        with_cache(2, |irql, cache| {
            // Just before the insertion stamp wraps.
            cache
                .inner
                .lock(&mut *irql, |inner, _| inner.stamp = u32::MAX - 1);
            let g = cache.generation();
            let a = answer(Verdict::Allow, 1_000, 1);
            // Stamps u32::MAX, then 0 (wrapped), then 1.
            assert_eq!(cache.insert(&mut *irql, key(1), a, at(0), g), Insert::Added);
            assert_eq!(cache.insert(&mut *irql, key(2), a, at(0), g), Insert::Added);
            assert_eq!(
                cache.insert(&mut *irql, key(3), a, at(0), g),
                Insert::Evicted
            );
            assert_eq!(
                cache.lookup(&mut *irql, &key(1), at(0)),
                Lookup::Miss,
                "the oldest"
            );
            assert_eq!(
                cache.lookup(&mut *irql, &key(2), at(0)),
                Lookup::Hit(Verdict::Allow)
            );
            assert_eq!(
                cache.insert(&mut *irql, key(4), a, at(0), g),
                Insert::Evicted
            );
            assert_eq!(
                cache.lookup(&mut *irql, &key(2), at(0)),
                Lookup::Miss,
                "then 2"
            );
            assert_eq!(
                cache.lookup(&mut *irql, &key(3), at(0)),
                Lookup::Hit(Verdict::Allow)
            );
        });
    }

    #[test]
    fn capacity_is_rounded_down_to_whole_sets() {
        with_cache(10, |irql, cache| assert_eq!(cache.capacity(&mut *irql), 8));
        with_cache(3, |irql, cache| assert_eq!(cache.capacity(&mut *irql), 3));
        with_cache(0, |irql, cache| {
            assert_eq!(cache.capacity(&mut *irql), 0);
            let g = cache.generation();
            let outcome = cache.insert(&mut *irql, key(1), answer(Verdict::Allow, 10, 1), at(0), g);
            assert_eq!(outcome, Insert::Disabled);
            assert_eq!(cache.lookup(&mut *irql, &key(1), at(0)), Lookup::Miss);
        });
    }

    #[test]
    fn a_verdict_answers_until_it_expires() {
        with_cache(8, |irql, cache| {
            let g = cache.generation();
            let outcome = cache.insert(&mut *irql, key(1), answer(Verdict::Deny, 100, 1), at(0), g);
            assert_eq!(outcome, Insert::Added);
            assert_eq!(
                cache.lookup(&mut *irql, &key(1), at(99)),
                Lookup::Hit(Verdict::Deny)
            );
            assert_eq!(cache.lookup(&mut *irql, &key(2), at(99)), Lookup::Miss);
            assert_eq!(cache.lookup(&mut *irql, &key(1), at(100)), Lookup::Expired);
            assert_eq!(
                cache.lookup(&mut *irql, &key(1), at(0)),
                Lookup::Miss,
                "removed"
            );
        });
    }

    #[test]
    fn a_full_set_loses_its_first_expired_entry_then_its_oldest() {
        with_cache(4, |irql, cache| {
            let g = cache.generation();
            for (n, expires) in [(1, 50), (2, 40), (3, 1_000), (4, 1_000)] {
                let a = answer(Verdict::Allow, expires, u64::from(n));
                assert_eq!(cache.insert(&mut *irql, key(n), a, at(0), g), Insert::Added);
            }
            // Same key: replaced in place.
            let a = answer(Verdict::Deny, 1_000, 9);
            assert_eq!(cache.insert(&mut *irql, key(4), a, at(0), g), Insert::Added);
            assert_eq!(
                cache.lookup(&mut *irql, &key(4), at(0)),
                Lookup::Hit(Verdict::Deny)
            );
            // At 60 both 1 and 2 have expired; 2 expired first.
            let a = answer(Verdict::Allow, 1_000, 5);
            assert_eq!(
                cache.insert(&mut *irql, key(5), a, at(60), g),
                Insert::ReplacedExpired
            );
            assert_eq!(cache.lookup(&mut *irql, &key(2), at(0)), Lookup::Miss);
            assert_eq!(
                cache.lookup(&mut *irql, &key(1), at(0)),
                Lookup::Hit(Verdict::Allow)
            );
            // Nothing expired at 10: the oldest (1) goes.
            let a = answer(Verdict::Allow, 1_000, 6);
            assert_eq!(
                cache.insert(&mut *irql, key(6), a, at(10), g),
                Insert::Evicted
            );
            assert_eq!(cache.lookup(&mut *irql, &key(1), at(10)), Lookup::Miss);
            for n in [3, 4, 5, 6] {
                assert!(matches!(
                    cache.lookup(&mut *irql, &key(n), at(10)),
                    Lookup::Hit(_)
                ));
            }
        });
    }

    #[test]
    fn revoke_removes_the_named_requests_verdicts_or_all() {
        with_cache(64, |irql, cache| {
            let g = cache.generation();
            for n in 1..=10u8 {
                let a = answer(Verdict::Allow, 1_000, 100 + u64::from(n));
                cache.insert(&mut *irql, key(n), a, at(0), g);
            }
            revoke_ids(&[110, 999, 103, 105], |revoke| {
                assert_eq!(cache.revoke(&mut *irql, revoke), 3);
            });
            for n in 1..=10u8 {
                let expected = if [3, 5, 10].contains(&n) {
                    Lookup::Miss
                } else {
                    Lookup::Hit(Verdict::Allow)
                };
                assert_eq!(cache.lookup(&mut *irql, &key(n), at(0)), expected, "{n}");
            }
            assert_eq!(cache.revoke(&mut *irql, &Revoke::All), 7);
            assert_eq!(cache.revoke(&mut *irql, &Revoke::All), 0);
        });
    }

    #[test]
    fn an_answer_to_a_question_asked_before_a_revoke_is_not_cached() {
        with_cache(8, |irql, cache| {
            let asked = cache.generation();
            revoke_ids(&[12345], |revoke| {
                assert_eq!(cache.revoke(&mut *irql, revoke), 0)
            });
            let a = answer(Verdict::Allow, 1_000, 1);
            assert_eq!(
                cache.insert(&mut *irql, key(1), a, at(0), asked),
                Insert::Revoked
            );
            assert_eq!(cache.lookup(&mut *irql, &key(1), at(0)), Lookup::Miss);
            let asked_after = cache.generation();
            assert_eq!(
                cache.insert(&mut *irql, key(1), a, at(0), asked_after),
                Insert::Added
            );
        });
    }
}
