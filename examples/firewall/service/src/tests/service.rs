//! `Service`: decisions and their audit records, reloads, and the revocations a reload computes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::audit::AuditRecord;
use crate::service::{
    MAX_PENDING_REVOKE_IDS, PendingRevocations, REVOKE_MAX_BACKOFF, REVOKE_RETRIES, Revocation,
    Service, encode_revoke_all,
};
use firewall_protocol::control::{MAX_REVOKE_IDS, Revoke};
use firewall_protocol::{
    CacheLifetime, ConnectionRequest, Direction, MAX_PATH_UNITS, Verdict, ip_protocol,
};
use firewall_rules::{Rules, VolumeMap};

const POLICY: &str = r#"default = "deny"

[[rule]]
name = "dns"
action = "allow"
protocol = "udp"
port = 53

[[rule]]
action = "deny"
remote = "203.0.113.0/24"

[[rule]]
name = "curl"
action = "allow"
app = '**\system32\curl.exe'
protocol = "tcp"
port = [443, "8000-8100"]

[[rule]]
name = "tools"
action = "allow"
app = 'C:\tools\**'
"#;

const T0: Duration = Duration::from_secs(1_795_000_000);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

fn volumes() -> VolumeMap {
    let mut map = VolumeMap::new();
    map.insert(r"\Device\HarddiskVolume3", 'C');
    map
}

fn service(cache: u32) -> Service {
    Service::new(
        Rules::parse_named("policy.toml", POLICY).unwrap(),
        "policy.toml",
        volumes(),
        CacheLifetime::from_secs(cache).ok(),
    )
}

fn request(id: u64, image: &str, remote: IpAddr, port: u16, protocol: u8) -> ConnectionRequest {
    let local = match remote {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    };
    ConnectionRequest {
        request_id: id,
        process_id: 4000 + id,
        direction: Direction::Outbound,
        ip_protocol: protocol,
        local_address: local,
        local_port: 50_000,
        remote_address: remote,
        remote_port: port,
        image_path: image.parse().unwrap(),
    }
}

const CURL: &str = r"\Device\HarddiskVolume3\Windows\System32\curl.exe";

#[test]
fn a_decision_and_its_audit_record() {
    let mut service = service(60);
    let asked = request(7, CURL, "192.0.2.7".parse().unwrap(), 443, ip_protocol::TCP);
    let (reply, record) = service.decide_at(&asked, at(0));
    assert_eq!(reply.request_id, 7);
    assert_eq!(reply.verdict, Verdict::Allow);
    assert_eq!(reply.cache, Some(CacheLifetime::from_secs(60).unwrap()));
    let expected = AuditRecord {
        time: "2026-11-18T11:06:40.000Z".to_owned(),
        request_id: 7,
        pid: 4007,
        image: CURL.to_owned(),
        image_dos: r"C:\Windows\System32\curl.exe".to_owned(),
        direction: "outbound".to_owned(),
        protocol: 6,
        protocol_name: Some("tcp".to_owned()),
        local: "10.0.0.2:50000".to_owned(),
        remote: "192.0.2.7:443".to_owned(),
        verdict: "allow".to_owned(),
        decided_by: "rule 3 \"curl\"".to_owned(),
        rule_index: Some(3),
        rule_name: Some("curl".to_owned()),
        cache_seconds: 60,
    };
    assert_eq!(record, expected);
    let line = record.to_json();
    assert!(!line.contains('\n'));
    assert_eq!(
        serde_json::from_str::<AuditRecord>(&line).unwrap(),
        expected
    );
    assert!(
        line.starts_with(r#"{"time":"2026-11-18T11:06:40.000Z","request_id":7,"pid":4007,"#),
        "{line}"
    );
    assert_eq!(service.remembered().len(), 1);
    assert_eq!(service.remembered()[&7].expires, at(60));
}

#[test]
fn unnamed_rules_the_default_ipv6_and_unknown_protocols_are_recorded() {
    let mut service = service(0);
    // An unnamed rule: by its position only.
    let (reply, record) = service.decide_at(
        &request(
            1,
            CURL,
            "203.0.113.9".parse().unwrap(),
            443,
            ip_protocol::TCP,
        ),
        at(1),
    );
    assert_eq!(reply.verdict, Verdict::Deny);
    assert_eq!(reply.cache, None, "--cache-seconds 0 never caches");
    assert_eq!(record.decided_by, "rule 2");
    assert_eq!((record.rule_index, record.rule_name), (Some(2), None));
    assert_eq!(record.cache_seconds, 0);
    // The default, IPv6, a protocol without a name, an unmapped device.
    let (reply, record) = service.decide_at(
        &request(
            2,
            r"\Device\HarddiskVolume9\x.exe",
            "2001:db8::1".parse().unwrap(),
            0,
            47,
        ),
        at(2),
    );
    assert_eq!(reply.verdict, Verdict::Deny);
    assert_eq!(record.decided_by, "default");
    assert_eq!(
        (record.rule_index, record.rule_name.as_deref()),
        (None, None)
    );
    assert_eq!(record.remote, "[2001:db8::1]:0");
    assert_eq!(record.local, "[fd00::2]:50000");
    assert_eq!(record.protocol_name, None);
    assert_eq!(record.image_dos, r"\Device\HarddiskVolume9\x.exe");
    assert!(service.remembered().is_empty());
    let json = record.to_json();
    assert!(
        json.contains(r#""rule_index":null,"rule_name":null"#),
        "{json}"
    );
}

/// The driver sends the whole path, however long, and the rules match it whole: a rule
/// naming a file matches at the end of a path far beyond the 520 units where version 1 of the
/// protocol cut it, and the audit record holds the whole path.
#[test]
fn a_long_path_is_matched_and_recorded_whole() {
    let mut service = service(60);
    let long_curl = format!(
        r"\Device\HarddiskVolume3\{}system32\curl.exe",
        r"d\".repeat(2000)
    );
    let (reply, record) = service.decide_at(
        &request(2, &long_curl, "192.0.2.7".parse().unwrap(), 443, 6),
        at(0),
    );
    assert_eq!(
        (reply.verdict, record.decided_by.as_str()),
        (Verdict::Allow, "rule 3 \"curl\"")
    );
    assert_eq!(record.image, long_curl);
    assert!(
        record.image_dos.starts_with(r"C:\d\d\"),
        "{}",
        record.image_dos
    );
    assert!(record.image_dos.ends_with(r"\system32\curl.exe"));

    // Under a default-allow policy, a deny rule naming a program's file denies it from the
    // longest path there is.
    let policy = "default = \"allow\"\n\n[[rule]]\nname = \"no-nc\"\naction = \"deny\"\napp = '**\\nc.exe'\n";
    let rules = Rules::parse_named("open.toml", policy).unwrap();
    let mut open = Service::new(
        rules,
        "open.toml",
        volumes(),
        CacheLifetime::from_secs(60).ok(),
    );
    let prefix = r"\Device\HarddiskVolume3\";
    let file = r"\nc.exe";
    let longest = format!(
        "{prefix}{}{file}",
        "x".repeat(MAX_PATH_UNITS - prefix.len() - file.len())
    );
    assert_eq!(longest.encode_utf16().count(), MAX_PATH_UNITS);
    for path in [&longest[..], &longest[..600 - file.len()]] {
        let path = if path.ends_with(file) {
            path.to_owned()
        } else {
            format!("{path}{file}")
        };
        let (reply, record) = open.decide_at(
            &request(3, &path, "192.0.2.7".parse().unwrap(), 443, 6),
            at(0),
        );
        assert_eq!(
            (reply.verdict, record.decided_by.as_str()),
            (Verdict::Deny, "rule 1 \"no-nc\""),
            "{} units",
            path.len()
        );
        assert_eq!(record.image, path);
    }
    // Another program from the same long folder is allowed by the default.
    let other = longest.replace(file, r"\ok.exe");
    let (reply, _) = open.decide_at(
        &request(4, &other, "192.0.2.7".parse().unwrap(), 443, 6),
        at(0),
    );
    assert_eq!(reply.verdict, Verdict::Allow);
}

#[test]
fn a_bad_reload_keeps_the_policy_in_force_and_says_where() {
    let mut service = service(60);
    let allowed = request(1, CURL, "192.0.2.7".parse().unwrap(), 443, 6);
    assert_eq!(service.decide_at(&allowed, at(0)).0.verdict, Verdict::Allow);
    let bad = POLICY.replace(
        r#"port = [443, "8000-8100"]"#,
        r#"port = [443, "9000-8000"]"#,
    );
    let error = service.reload_at(&bad, at(1)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "policy.toml:18:14: port range 9000-8000 is reversed"
    );
    assert_eq!(service.rules(), &Rules::parse(POLICY).unwrap());
    assert_eq!(service.remembered().len(), 1, "nothing revoked");
    let again = request(2, CURL, "192.0.2.7".parse().unwrap(), 443, 6);
    assert_eq!(service.decide_at(&again, at(2)).0.verdict, Verdict::Allow);

    let error = service
        .reload_at("default = \"deny\"\n[[rule]]\naction = \"alow\"\n", at(3))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "policy.toml:3:10: unknown action `alow` (expected \"allow\" or \"deny\")"
    );
    let error = service.reload_at("default = ", at(3)).unwrap_err();
    assert_eq!((error.file.as_str(), error.line), ("policy.toml", 1));
    assert_eq!(service.rules(), &Rules::parse(POLICY).unwrap());
}

#[test]
fn a_reload_revokes_the_changed_verdicts_that_are_still_cached() {
    let mut service = service(60);
    let curl_v4 = request(1, CURL, "192.0.2.7".parse().unwrap(), 443, 6);
    let curl_v6 = request(2, CURL, "2001:db8::7".parse().unwrap(), 443, 6);
    let dns = request(3, CURL, "192.0.2.53".parse().unwrap(), 53, ip_protocol::UDP);
    let other = request(
        4,
        r"\Device\HarddiskVolume3\x.exe",
        "192.0.2.1".parse().unwrap(),
        80,
        6,
    );
    let early = request(5, CURL, "192.0.2.8".parse().unwrap(), 443, 6);
    service.decide_at(&early, at(0));
    for r in [&curl_v4, &curl_v6, &dns, &other] {
        service.decide_at(r, at(30));
    }
    // curl may no longer reach 192.0.2.0/24; everything else is as before. `early` (same
    // change) has expired at 61 s: the driver no longer holds it.
    let new = POLICY.replace(
        "[[rule]]\nname = \"curl\"",
        "[[rule]]\naction = \"deny\"\nremote = \"192.0.2.0/24\"\napp = '**\\curl.exe'\n\n[[rule]]\nname = \"curl\"",
    );
    let revocation = service.reload_at(&new, at(61)).unwrap();
    assert_eq!(revocation.ids, vec![1]);
    assert_eq!(
        service.remembered().keys().copied().collect::<Vec<_>>(),
        vec![2, 3, 4],
        "revoked and expired verdicts are forgotten; the others are still cached"
    );
    assert_eq!(service.decide_at(&curl_v4, at(62)).0.verdict, Verdict::Deny);
    let requests = revocation.encode();
    assert_eq!(requests.len(), 1);
    let Revoke::Requests(ids) = Revoke::decode(&requests[0]).unwrap() else {
        panic!("a revoke of request ids");
    };
    assert_eq!(ids.iter().collect::<Vec<_>>(), vec![1]);
    assert_eq!(Revoke::decode(&encode_revoke_all()).unwrap(), Revoke::All);
}

#[test]
fn revocations_come_in_batches_of_at_most_max_revoke_ids() {
    let mut service = service(600).with_memory_capacity(10_000);
    for id in 0..600 {
        service.decide_at(&request(id, "", "192.0.2.1".parse().unwrap(), 1, 6), at(0));
    }
    let revocation = service.reload_at("default = \"allow\"", at(1)).unwrap();
    assert_eq!(revocation.ids, (0..600).collect::<Vec<_>>());
    let mut decoded = Vec::new();
    let sizes: Vec<usize> = revocation.batches().map(<[u64]>::len).collect();
    assert_eq!(
        sizes,
        vec![MAX_REVOKE_IDS, MAX_REVOKE_IDS, 600 - 2 * MAX_REVOKE_IDS]
    );
    for bytes in revocation.encode() {
        match Revoke::decode(&bytes).unwrap() {
            Revoke::Requests(ids) => decoded.extend(ids.iter()),
            Revoke::All => panic!("not a revoke-all"),
        }
    }
    assert_eq!(decoded, revocation.ids);
    assert!(Revocation::default().encode().is_empty());
}

#[test]
fn a_full_memory_answers_without_caching_rather_than_forget() {
    let mut service = service(60).with_memory_capacity(2);
    let ask = |id| request(id, CURL, "192.0.2.7".parse().unwrap(), 443, 6);
    assert!(service.decide_at(&ask(1), at(0)).0.cache.is_some());
    assert!(service.decide_at(&ask(2), at(10)).0.cache.is_some());
    let (reply, record) = service.decide_at(&ask(3), at(20));
    assert_eq!((reply.cache, record.cache_seconds), (None, 0), "no room");
    assert_eq!(
        reply.verdict,
        Verdict::Allow,
        "the verdict itself is the same"
    );
    // At 60 s request 1's entry has expired: room again.
    assert!(service.decide_at(&ask(4), at(60)).0.cache.is_some());
    assert_eq!(
        service.remembered().keys().copied().collect::<Vec<_>>(),
        vec![2, 4]
    );
    let mut never = service_with_capacity_zero();
    assert_eq!(never.decide_at(&ask(5), at(0)).0.cache, None);
}

fn service_with_capacity_zero() -> Service {
    service(60).with_memory_capacity(0)
}

const SSH_POLICY: &str = r#"default = "deny"

[[rule]]
name = "dns"
action = "allow"
protocol = "udp"
port = 53

[[rule]]
name = "ssh-in"
action = "allow"
direction = "inbound"
protocol = "tcp"
local_port = 22
"#;

fn inbound(id: u64, remote_port: u16, local_port: u16) -> ConnectionRequest {
    let mut asked = request(id, "", "10.1.2.3".parse().unwrap(), remote_port, 6);
    asked.direction = Direction::Inbound;
    asked.local_port = local_port;
    asked
}

#[test]
fn rules_see_the_local_port_of_the_request() {
    let mut service = Service::new(
        Rules::parse(SSH_POLICY).unwrap(),
        "rules.toml",
        volumes(),
        None,
    );
    let (reply, record) = service.decide_at(&inbound(1, 50_123, 22), at(0));
    assert_eq!(
        (reply.verdict, record.decided_by.as_str()),
        (Verdict::Allow, "rule 2 \"ssh-in\"")
    );
    assert_eq!(record.local, "10.0.0.2:22");
    // The peer's source port is 22, the local port is not: not SSH.
    let (reply, record) = service.decide_at(&inbound(2, 22, 50_123), at(0));
    assert_eq!(
        (reply.verdict, record.decided_by.as_str()),
        (Verdict::Deny, "default")
    );
    let (connection, verdict, by) = service.explain(
        "",
        "10.1.2.3".parse().unwrap(),
        50_123,
        22,
        ip_protocol::TCP,
        firewall_rules::Direction::Inbound,
    );
    assert_eq!((connection.port, connection.local_port), (50_123, 22));
    assert_eq!(
        (verdict, by.as_str()),
        (firewall_rules::Verdict::Allow, "rule 2 \"ssh-in\"")
    );
}

#[test]
fn an_outbound_verdict_that_depends_on_the_local_port_is_not_cached() {
    // The driver's cache key has the local port of inbound connections only (an outbound one's
    // is fresh each time): caching "allow" for an outbound connection from local port 1000
    // would allow the same process and endpoint from any local port.
    let policy = format!(
        "{SSH_POLICY}\n[[rule]]\nname = \"low-source\"\naction = \"allow\"\ndirection = \"outbound\"\nlocal_port = \"1-1023\"\n"
    );
    let mut service = Service::new(
        Rules::parse(&policy).unwrap(),
        "rules.toml",
        volumes(),
        CacheLifetime::from_secs(60).ok(),
    );
    let web = |id, local_port| {
        let mut asked = request(id, "", "192.0.2.7".parse().unwrap(), 443, ip_protocol::TCP);
        asked.local_port = local_port;
        asked
    };
    for (id, local_port, verdict) in [(1, 1000, Verdict::Allow), (2, 50_000, Verdict::Deny)] {
        let (reply, record) = service.decide_at(&web(id, local_port), at(0));
        assert_eq!(reply.verdict, verdict, "local port {local_port}");
        assert_eq!((reply.cache, record.cache_seconds), (None, 0));
    }
    // Inbound, the local port is in the driver's key: cacheable, allowed or not.
    for (id, local_port, verdict) in [(3, 22, Verdict::Allow), (4, 8080, Verdict::Deny)] {
        let (reply, _) = service.decide_at(&inbound(id, 50_123, local_port), at(0));
        assert_eq!(reply.verdict, verdict, "local port {local_port}");
        assert!(reply.cache.is_some(), "local port {local_port}");
    }
    // Decided before any `local_port` rule: cacheable.
    let dns = request(5, "", "10.0.0.53".parse().unwrap(), 53, ip_protocol::UDP);
    assert!(service.decide_at(&dns, at(0)).0.cache.is_some());
    assert_eq!(
        service.remembered().keys().copied().collect::<Vec<_>>(),
        vec![3, 4, 5]
    );

    // Without the outbound `local_port` rule, outbound verdicts are cacheable again.
    let mut service = Service::new(
        Rules::parse(SSH_POLICY).unwrap(),
        "rules.toml",
        volumes(),
        CacheLifetime::from_secs(60).ok(),
    );
    assert!(service.decide_at(&web(6, 50_000), at(0)).0.cache.is_some());
    assert!(service.decide_at(&dns, at(0)).0.cache.is_some());
    // A reload that makes the cached outbound verdict depend on the local port revokes it,
    // although the remembered connection (local port 50000) is still denied.
    let revocation = service.reload_at(&policy, at(1)).unwrap();
    assert_eq!(revocation.ids, vec![6]);
    assert_eq!(
        service.decide_at(&web(7, 50_000), at(2)).0.verdict,
        Verdict::Deny
    );
}

// --- revocations against a recompute, on random policies ------------------------------------

/// splitmix64: a small deterministic generator, so every case is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const APPS: [&str; 4] = [
    r"\Device\HarddiskVolume3\Windows\System32\curl.exe",
    r"\Device\HarddiskVolume3\Program Files\Browser\browser.exe",
    r"\Device\HarddiskVolume3\tools\nc.exe",
    "",
];
const REMOTES: [&str; 5] = [
    "10.1.2.3",
    "192.0.2.7",
    "203.0.113.9",
    "2001:db8::1",
    "::ffff:10.9.9.9",
];
const PORTS: [u16; 4] = [22, 53, 443, 8080];
const LOCAL_PORTS: [u16; 4] = [22, 443, 8080, 50_000];

fn random_policy(rng: &mut Rng) -> String {
    let mut text = format!(
        "default = \"{}\"\n",
        if rng.chance(50) { "allow" } else { "deny" }
    );
    for _ in 0..rng.below(6) {
        text.push_str("\n[[rule]]\n");
        text.push_str(if rng.chance(50) {
            "action = \"allow\"\n"
        } else {
            "action = \"deny\"\n"
        });
        if rng.chance(40) {
            let app = rng.pick(&[
                r"**\curl.exe",
                r"C:\Program Files\**",
                r"C:\tools\*.exe",
                "**",
            ]);
            text.push_str(&format!("app = '{app}'\n"));
        }
        if rng.chance(40) {
            let remote = rng.pick(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "0.0.0.0/0"]);
            text.push_str(&format!("remote = \"{remote}\"\n"));
        }
        if rng.chance(40) {
            let port = rng.pick(&["22", "53", "443", "\"8000-9000\"", "[22, 443]"]);
            text.push_str(&format!("port = {port}\n"));
        }
        if rng.chance(25) {
            let port = rng.pick(&["22", "443", "\"8000-9000\"", "[22, 443]"]);
            text.push_str(&format!("local_port = {port}\n"));
        }
        if rng.chance(30) {
            let protocol = rng.pick(&["\"tcp\"", "\"udp\"", "\"any\""]);
            text.push_str(&format!("protocol = {protocol}\n"));
        }
        if rng.chance(30) {
            let direction = rng.pick(&["\"outbound\"", "\"inbound\""]);
            text.push_str(&format!("direction = {direction}\n"));
        }
    }
    text
}

fn random_request(rng: &mut Rng, id: u64) -> ConnectionRequest {
    let remote: IpAddr = rng.pick(&REMOTES).parse().unwrap();
    let app: &str = rng.pick::<&str>(&APPS);
    let mut asked = request(
        id,
        app,
        remote,
        *rng.pick(&PORTS),
        *rng.pick(&[ip_protocol::TCP, ip_protocol::UDP]),
    );
    if rng.chance(30) {
        asked.direction = Direction::Inbound;
    }
    asked.local_port = *rng.pick(&LOCAL_PORTS);
    asked
}

/// Whether `rules` decide `asked` the same way whatever its local port (among every case the
/// random policies distinguish), as a verdict the driver may cache must be when its key has no
/// local port (outbound); inbound, the key has it, and this holds trivially.
fn same_for_every_local_port(rules: &Rules, asked: &ConnectionRequest) -> bool {
    if asked.direction == Direction::Inbound {
        return true;
    }
    let volumes = volumes();
    let verdict_at = |local_port| {
        let mut c = crate::service::connection_of(asked, &volumes);
        c.local_port = local_port;
        rules.decide(&c).verdict
    };
    let first = verdict_at(0);
    LOCAL_PORTS
        .iter()
        .chain(&[0, 8000, 9000, 9001, 65_535])
        .all(|&p| verdict_at(p) == first)
}

/// One case: random decisions under a random policy over time, then a reload at a random time;
/// the revocation must be exactly the recomputed set, and every verdict the driver may cache
/// (before and after the reload) must hold for every local port, since its key has none.
fn revocation_case(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let old = random_policy(&mut rng);
    let new = random_policy(&mut rng);
    let lifetime = 1 + rng.below(100) as u32;
    let mut service = Service::new(
        Rules::parse(&old).unwrap(),
        "rules.toml",
        volumes(),
        CacheLifetime::from_secs(lifetime).ok(),
    )
    .with_memory_capacity(1 + rng.below(40));
    // What the driver holds, recomputed from the replies alone: id → (request, verdict, expiry).
    let mut cached: BTreeMap<u64, (ConnectionRequest, Verdict, SystemTime)> = BTreeMap::new();
    let mut now = 0;
    for id in 0..rng.below(60) as u64 {
        now += rng.below(10) as u64;
        let asked = random_request(&mut rng, id);
        let (reply, record) = service.decide_at(&asked, at(now));
        assert_eq!(reply.request_id, id);
        assert_eq!(record.verdict, reply.verdict.as_str());
        if let Some(life) = reply.cache {
            assert_eq!(life.as_secs(), lifetime);
            assert!(
                same_for_every_local_port(service.rules(), &asked),
                "seed {seed}: cached a verdict that depends on the local port: {asked:?}\n{old}"
            );
            cached.insert(
                id,
                (asked, reply.verdict, at(now + u64::from(life.as_secs()))),
            );
        }
    }
    now += rng.below(50) as u64;
    let reload_at = at(now);
    let new_rules = Rules::parse(&new).unwrap();
    let volumes = volumes();
    let expected: Vec<u64> = cached
        .iter()
        .filter(|(_, (_, _, expires))| *expires > reload_at)
        .filter(|(_, (asked, verdict, _))| {
            let connection = crate::service::connection_of(asked, &volumes);
            let decision = new_rules.decide(&connection);
            crate::service::wire_verdict(decision.verdict) != *verdict
                || (asked.direction == Direction::Outbound && decision.local_port_matters)
        })
        .map(|(&id, _)| id)
        .collect();
    let revocation = service.reload_at(&new, reload_at).unwrap();
    assert_eq!(
        revocation.ids, expected,
        "seed {seed}: old policy:\n{old}\nnew policy:\n{new}"
    );
    for id in service.remembered().keys() {
        assert!(
            !expected.contains(id) && cached[id].2 > reload_at,
            "seed {seed}: remembers a revoked or expired verdict {id}"
        );
        assert!(
            same_for_every_local_port(&new_rules, &cached[id].0),
            "seed {seed}: keeps a verdict that depends on the local port: {id}\n{new}"
        );
    }
    expected.len()
}

#[test]
fn revocations_match_a_recompute_on_random_policies() {
    let seeds: Vec<u64> = match std::env::var("FIREWALL_TEST_SEED") {
        Ok(seed) => vec![seed.parse().expect("FIREWALL_TEST_SEED is a number")],
        Err(_) => (0..400).collect(),
    };
    let (mut some, mut none) = (0, 0);
    for &seed in &seeds {
        match std::panic::catch_unwind(|| revocation_case(seed)) {
            Ok(0) => none += 1,
            Ok(_) => some += 1,
            Err(panic) => {
                eprintln!("failed with seed {seed} (rerun with FIREWALL_TEST_SEED={seed})");
                std::panic::resume_unwind(panic);
            }
        }
    }
    if seeds.len() > 1 {
        // The generator must exercise both outcomes, or the comparison proves little.
        assert!(
            some > 50 && none > 50,
            "{some} cases revoked something, {none} nothing"
        );
    }
}

// --- revocations the driver has not confirmed ---------------------------------------------------

/// A stand-in for the driver's control device: fails the requests it is told to, answers the
/// others, and keeps every request it received.
struct FakeDevice {
    fail_next: u32,
    received: Vec<Vec<u8>>,
}

impl FakeDevice {
    fn send(&mut self, request: &[u8]) -> Option<u32> {
        self.received.push(request.to_vec());
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return None;
        }
        match Revoke::decode(request).unwrap() {
            Revoke::All => Some(7),
            Revoke::Requests(ids) => Some(u32::try_from(ids.len()).unwrap()),
        }
    }
}

fn ids(range: std::ops::Range<u64>) -> Revocation {
    Revocation {
        ids: range.collect(),
    }
}

/// A batch that fails is kept, not sent again before its backoff, then sent again; only what
/// the driver confirmed is forgotten. Time is given, never read.
#[test]
fn a_failed_batch_is_kept_and_retried_after_its_backoff() {
    let start = std::time::Instant::now();
    let mut device = FakeDevice {
        fail_next: 0,
        received: Vec::new(),
    };
    let mut pending = PendingRevocations::new();
    let n = u64::try_from(MAX_REVOKE_IDS).unwrap();
    pending.add(ids(1..n + 3));
    // The first batch goes through; the second fails.
    device.fail_next = 0;
    let flushed = pending.flush(start, |r| {
        if device.received.len() == 1 {
            device.fail_next = 1;
        }
        device.send(r)
    });
    assert_eq!(
        (flushed.ids, flushed.failed, flushed.all),
        (MAX_REVOKE_IDS, true, false)
    );
    assert_eq!(pending.ids().collect::<Vec<_>>(), [n + 1, n + 2]);
    assert_eq!(pending.failures(), 1);
    // Not due before the backoff.
    let backoff = PendingRevocations::backoff(1);
    assert!(!pending.due(start + backoff - Duration::from_millis(1)));
    let flushed = pending.flush(start, |r| device.send(r));
    assert_eq!(flushed, crate::service::Flushed::default(), "nothing sent");
    assert_eq!(device.received.len(), 2);
    // Then sent again, and confirmed.
    let flushed = pending.flush(start + backoff, |r| device.send(r));
    assert_eq!(
        (flushed.ids, flushed.removed, flushed.failed),
        (2, 2, false)
    );
    assert!(pending.is_empty());
    assert_eq!(pending.failures(), 0);
    assert_eq!(
        Revoke::decode(&device.received[2]).unwrap(),
        Revoke::decode(&device.received[1]).unwrap(),
        "the same batch again"
    );
}

/// After `REVOKE_RETRIES` failures in a row the ids give way to a revoke-all, which is itself
/// retried until confirmed; the backoff doubles and stays bounded.
#[test]
fn retries_run_out_into_a_revoke_all_that_is_retried_until_confirmed() {
    let start = std::time::Instant::now();
    let mut device = FakeDevice {
        fail_next: REVOKE_RETRIES + 3,
        received: Vec::new(),
    };
    let mut pending = PendingRevocations::new();
    pending.add(ids(1..4));
    let mut now = start;
    let mut waits = Vec::new();
    while !pending.is_empty() {
        assert!(device.received.len() < 20, "never confirmed");
        let flushed = pending.flush(now, |r| device.send(r));
        if flushed.failed {
            let wait = PendingRevocations::backoff(pending.failures());
            waits.push(wait);
            now += wait;
        } else {
            assert!(flushed.all, "confirmed by a revoke-all");
        }
    }
    let kinds: Vec<bool> = device
        .received
        .iter()
        .map(|r| Revoke::decode(r).unwrap() == Revoke::All)
        .collect();
    let retries = usize::try_from(REVOKE_RETRIES).unwrap();
    assert!(kinds[..retries].iter().all(|all| !all), "{kinds:?}");
    assert!(kinds[retries..].iter().all(|all| *all), "{kinds:?}");
    assert_eq!(kinds.len(), retries + 4);
    assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
    assert!(waits.iter().all(|w| *w <= REVOKE_MAX_BACKOFF), "{waits:?}");
    assert_eq!(waits.last(), Some(&REVOKE_MAX_BACKOFF));
}

/// Too many ids waiting: one revoke-all instead; a reload's ids while a revoke-all waits are
/// covered by it.
#[test]
fn too_many_ids_waiting_become_one_revoke_all() {
    let start = std::time::Instant::now();
    let mut pending = PendingRevocations::new();
    let n = u64::try_from(MAX_PENDING_REVOKE_IDS).unwrap();
    pending.add(ids(1..n + 1));
    assert!(!pending.wants_all());
    pending.add(ids(n + 1..n + 2));
    assert!(pending.wants_all());
    assert_eq!(pending.ids().count(), 0);
    pending.add(ids(n + 2..n + 5));
    let mut sent = Vec::new();
    let flushed = pending.flush(start, |r| {
        sent.push(Revoke::decode(r).unwrap() == Revoke::All);
        Some(9)
    });
    assert_eq!(sent, [true]);
    assert_eq!((flushed.all, flushed.removed), (true, 9));
    assert!(pending.is_empty());
}
