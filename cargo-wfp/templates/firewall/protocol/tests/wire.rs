//! The wire format, byte by byte: round trips, the documented layout, every way a message can
//! be malformed, and a seeded random search for inputs that make `decode` misbehave.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_protocol::*;
use wfp_rs::port::{Malformed, Message};

const PATH: &str = r"\Device\HarddiskVolume3\Program Files\App\app.exe";

fn v4_request() -> ConnectionRequest {
    ConnectionRequest {
        request_id: 0x0102_0304_0506_0708,
        process_id: 4242,
        direction: Direction::Outbound,
        ip_protocol: ip_protocol::TCP,
        local_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        local_port: 50_000,
        remote_address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        remote_port: 443,
        image_path: ImagePath::from_str_truncating(PATH).unwrap(),
    }
}

fn v6_request() -> ConnectionRequest {
    ConnectionRequest {
        request_id: u64::MAX,
        process_id: 7,
        direction: Direction::Inbound,
        ip_protocol: ip_protocol::UDP,
        local_address: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 1, 2, 3, 4)),
        local_port: 53,
        remote_address: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        remote_port: 61_000,
        image_path: ImagePath::from_str_truncating(r"\Device\HarddiskVolume1\dns.exe").unwrap(),
    }
}

fn encode_request(request: &ConnectionRequest) -> Vec<u8> {
    let mut out = vec![0u8; ConnectionRequest::MAX_LEN];
    let len = request.encode(&mut out).unwrap();
    assert_eq!(len, request.encoded_len());
    out.truncate(len);
    out
}

fn encode_reply(reply: &ConnectionReply) -> Vec<u8> {
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    assert_eq!(reply.encode(&mut out), Ok(REPLY_LEN));
    out
}

/// `bytes` with `f` applied, then decoded as a request.
fn request_with(f: impl FnOnce(&mut Vec<u8>)) -> Result<ConnectionRequest, Malformed> {
    let mut bytes = encode_request(&v4_request());
    f(&mut bytes);
    ConnectionRequest::decode(&bytes)
}

/// A good reply with byte `offset` set to `byte`, decoded.
fn reply_with(offset: usize, byte: u8) -> Result<ConnectionReply, Malformed> {
    let mut bytes = encode_reply(&ConnectionReply::allow(9));
    bytes[offset] = byte;
    ConnectionReply::decode(&bytes)
}

#[test]
fn lengths_are_consistent() {
    assert_eq!(REQUEST_HEADER_LEN, 72);
    assert_eq!(ConnectionRequest::MIN_LEN, REQUEST_MIN_LEN);
    assert_eq!(ConnectionRequest::MAX_LEN, REQUEST_MAX_LEN);
    assert_eq!(REQUEST_MIN_LEN, 74);
    assert_eq!(REQUEST_MAX_LEN, 72 + 2 * 521);
    assert_eq!(REQUEST_MAX_LEN, request_len(MAX_PATH_UNITS));
    assert_eq!(ConnectionReply::MIN_LEN, 24);
    assert_eq!(ConnectionReply::MAX_LEN, 24);

    let mut empty = v4_request();
    empty.image_path = ImagePath::empty();
    assert_eq!(encode_request(&empty).len(), REQUEST_MIN_LEN);
    let mut longest = v4_request();
    longest.image_path = ImagePath::new(&[u16::from(b'a'); MAX_PATH_UNITS]).unwrap();
    assert_eq!(encode_request(&longest).len(), REQUEST_MAX_LEN);
}

#[test]
fn v4_request_round_trips_in_the_documented_layout() {
    let request = v4_request();
    let bytes = encode_request(&request);
    let units = PATH.encode_utf16().count();
    assert_eq!(bytes.len(), 72 + 2 * (units + 1));
    assert_eq!(&bytes[0..4], b"FWRQ");
    assert_eq!(&bytes[4..8], &[1, 0, 0, 0]); // version 1, reserved0
    assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]); // request id, little-endian
    assert_eq!(&bytes[16..24], &4242u64.to_le_bytes());
    assert_eq!(&bytes[24..28], &[0, 6, 4, 0]); // outbound, TCP, IPv4, no flags
    assert_eq!(&bytes[28..32], &[units as u8, 0, 0, 0]); // path_len, reserved1
    assert_eq!(&bytes[32..36], &[0x50, 0xc3, 0xbb, 0x01]); // ports 50000 and 443
    assert_eq!(&bytes[36..40], &[0; 4]); // reserved2
    assert_eq!(
        &bytes[40..56],
        &[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &bytes[56..72],
        &[192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(&bytes[72..76], &[b'\\', 0, b'D', 0]);
    assert_eq!(&bytes[bytes.len() - 2..], &[0, 0]);
    assert_eq!(ConnectionRequest::decode(&bytes), Ok(request.clone()));

    let header = RawRequestHeader::from_bytes(bytes[..72].try_into().unwrap());
    assert_eq!(header.to_bytes(), bytes[..72]);
    assert_eq!(header.path_len as usize, units);
    assert_eq!(request.image_path.to_string(), PATH);
}

#[test]
fn v6_request_round_trips() {
    let request = v6_request();
    let bytes = encode_request(&request);
    assert_eq!(&bytes[24..28], &[1, 17, 6, 0]); // inbound, UDP, IPv6, no flags
    assert_eq!(bytes[40..56], request_octets(request.local_address));
    assert_eq!(bytes[56..72], request_octets(request.remote_address));
    assert_eq!(ConnectionRequest::decode(&bytes), Ok(request));
}

fn request_octets(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(_) => unreachable!(),
    }
}

#[test]
fn paths_empty_longest_and_truncated_round_trip() {
    for path in [
        ImagePath::empty(),
        ImagePath::new(&[0xd800]).unwrap(), // an unpaired surrogate is carried as is
        ImagePath::new(&[u16::from(b'x'); MAX_PATH_UNITS]).unwrap(),
        ImagePath::from_units_truncating(&[u16::from(b'y'); MAX_PATH_UNITS + 5]).unwrap(),
        ImagePath::from_str_truncating(&"z".repeat(2000)).unwrap(),
    ] {
        let request = ConnectionRequest {
            image_path: path,
            ..v6_request()
        };
        let bytes = encode_request(&request);
        let decoded = ConnectionRequest::decode(&bytes).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(
            bytes[27] & FLAG_PATH_TRUNCATED != 0,
            decoded.image_path.is_truncated()
        );
    }
    let cut = ImagePath::from_str_truncating(&"z".repeat(600)).unwrap();
    assert!(cut.is_truncated());
    assert_eq!(cut.len(), MAX_PATH_UNITS);
    assert!(cut.to_string().ends_with("z..."));
    assert!(
        !ImagePath::from_str_truncating(&"z".repeat(520))
            .unwrap()
            .is_truncated()
    );
    assert_eq!(ImagePath::new(&[0xd800]).unwrap().to_string(), "\u{fffd}");
}

#[test]
fn image_path_constructors_reject_what_cannot_be_sent() {
    assert_eq!(
        ImagePath::new(&[u16::from(b'a'); MAX_PATH_UNITS + 1]),
        Err(Malformed("the image path is longer than MAX_PATH_UNITS"))
    );
    let nul = Err(Malformed("the image path contains a NUL unit"));
    assert_eq!(ImagePath::new(&[1, 0, 2]), nul);
    assert_eq!(ImagePath::from_units_truncating(&[0]), nul);
    assert_eq!(ImagePath::from_str_truncating("a\0b"), nul);
    // A NUL beyond the kept prefix is dropped with the rest.
    let mut long = vec![u16::from(b'a'); MAX_PATH_UNITS];
    long.push(0);
    assert!(
        ImagePath::from_units_truncating(&long)
            .unwrap()
            .is_truncated()
    );
}

#[test]
fn replies_round_trip_in_the_documented_layout() {
    let reply = ConnectionReply::deny(0x0102).cached_for(CacheLifetime::from_secs(300).unwrap());
    let bytes = encode_reply(&reply);
    assert_eq!(
        bytes,
        b"FWRP\x01\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00\x2c\x01\x00\x00\x00\x00\x00\x00"
    );
    assert_eq!(ConnectionReply::decode(&bytes), Ok(reply));
    for reply in [
        ConnectionReply::allow(0),
        ConnectionReply::deny(u64::MAX),
        ConnectionReply::allow(5).cached_for(CacheLifetime::MAX),
        v4_request().reply(Verdict::Allow),
    ] {
        assert_eq!(ConnectionReply::decode(&encode_reply(&reply)), Ok(reply));
    }
    assert!(v4_request().reply(Verdict::Deny).answers(&v4_request()));
    assert!(!ConnectionReply::allow(1).answers(&v4_request()));
    assert_eq!(
        RawReply::from_bytes(bytes.as_slice().try_into().unwrap()).to_bytes(),
        bytes[..]
    );
}

#[test]
fn cache_lifetimes_are_bounded() {
    assert_eq!(CacheLifetime::from_secs(1).unwrap().as_secs(), 1);
    assert_eq!(CacheLifetime::MAX.as_secs(), MAX_CACHE_SECONDS);
    assert_eq!(
        CacheLifetime::from_secs(0),
        Err(Malformed("a cache lifetime is at least one second"))
    );
    assert_eq!(
        CacheLifetime::from_secs(MAX_CACHE_SECONDS + 1),
        Err(Malformed("the cache lifetime exceeds MAX_CACHE_SECONDS"))
    );
}

#[test]
fn display_names() {
    assert_eq!(Direction::Outbound.to_string(), "outbound");
    assert_eq!(Direction::Inbound.to_string(), "inbound");
    assert_eq!(Verdict::Allow.to_string(), "allow");
    assert_eq!(Verdict::Deny.to_string(), "deny");
}

#[test]
fn every_malformed_request_is_rejected_with_its_reason() {
    let m = |s| Err(Malformed(s));
    let short = m("a request is shorter than its header and path terminator");
    assert_eq!(ConnectionRequest::decode(&[]), short);
    assert_eq!(request_with(|b| b.truncate(REQUEST_MIN_LEN - 1)), short);
    assert_eq!(
        ConnectionRequest::decode(&vec![0u8; REQUEST_MAX_LEN + 1]),
        m("a request is longer than REQUEST_MAX_LEN")
    );
    assert_eq!(request_with(|b| b[0] = b'X'), m("bad request magic"));
    assert_eq!(request_with(|b| b[3] = b'P'), m("bad request magic"));
    let version = m("unsupported protocol version");
    assert_eq!(request_with(|b| b[4] = 2), version);
    assert_eq!(request_with(|b| b[5] = 1), version);
    let reserved = m("reserved request fields are not zero");
    for offset in [6, 7, 30, 31, 36, 37, 38, 39] {
        assert_eq!(request_with(|b| b[offset] = 1), reserved, "offset {offset}");
    }
    assert_eq!(
        request_with(|b| b[24] = 2),
        m("the direction is 0 (outbound) or 1 (inbound)")
    );
    for version in [0, 5, 255] {
        assert_eq!(
            request_with(|b| b[26] = version),
            m("the IP version is 4 or 6")
        );
    }
    let padding = m("an IPv4 address has non-zero padding");
    assert_eq!(request_with(|b| b[44] = 1), padding);
    assert_eq!(request_with(|b| b[71] = 1), padding);
    for bit in 1..8 {
        assert_eq!(
            request_with(|b| b[27] = 1 << bit),
            m("unknown request flags are set")
        );
    }
    assert_eq!(
        request_with(|b| b[27] = FLAG_PATH_TRUNCATED),
        m("a truncated image path is exactly MAX_PATH_UNITS long")
    );
    let too_long = (MAX_PATH_UNITS as u16 + 1).to_le_bytes();
    assert_eq!(
        request_with(|b| b[28..30].copy_from_slice(&too_long)),
        m("the image path is longer than MAX_PATH_UNITS")
    );
    assert_eq!(
        request_with(|b| b[28..30].copy_from_slice(&u16::MAX.to_le_bytes())),
        m("the image path is longer than MAX_PATH_UNITS")
    );
    let mismatch = m("the request length does not match its image path length");
    assert_eq!(request_with(|b| b[28] += 1), mismatch);
    assert_eq!(request_with(|b| b[28] -= 1), mismatch);
    assert_eq!(request_with(|b| b.push(0)), mismatch);
    assert_eq!(request_with(|b| b.extend([0, 0])), mismatch);
    assert_eq!(
        request_with(|b| {
            b.truncate(b.len() - 2);
        }),
        mismatch
    );
    let unterminated = m("the image path is not NUL-terminated");
    assert_eq!(
        request_with(|b| {
            let n = b.len();
            b[n - 2] = b'!';
        }),
        unterminated
    );
    assert_eq!(
        request_with(|b| {
            let n = b.len();
            b[n - 1] = 1;
        }),
        unterminated
    );
    let nul = m("the image path contains a NUL unit");
    assert_eq!(request_with(|b| b[72..74].copy_from_slice(&[0, 0])), nul);
    assert_eq!(
        request_with(|b| {
            let n = b.len();
            b[n - 4..n - 2].copy_from_slice(&[0, 0]);
        }),
        nul
    );
    // A reply is not a request.
    let reply = encode_reply(&ConnectionReply::allow(1));
    assert_eq!(ConnectionRequest::decode(&reply), short);
}

#[test]
fn every_malformed_reply_is_rejected_with_its_reason() {
    let m = |s| Err(Malformed(s));
    let good = encode_reply(&ConnectionReply::allow(9));
    let length = m("a reply is 24 bytes");
    assert_eq!(ConnectionReply::decode(&[]), length);
    assert_eq!(ConnectionReply::decode(&good[..23]), length);
    assert_eq!(
        ConnectionReply::decode(&[good.as_slice(), &[0]].concat()),
        length
    );
    assert_eq!(reply_with(0, b'X'), m("bad reply magic"));
    assert_eq!(reply_with(3, b'Q'), m("bad reply magic"));
    assert_eq!(reply_with(4, 0), m("unsupported protocol version"));
    assert_eq!(reply_with(5, 1), m("unsupported protocol version"));
    for verdict in [2, 0x80, 0xff] {
        assert_eq!(
            reply_with(6, verdict),
            m("the verdict is 0 (deny) or 1 (allow)")
        );
    }
    for offset in [7, 20, 21, 22, 23] {
        assert_eq!(
            reply_with(offset, 1),
            m("reserved reply fields are not zero"),
            "offset {offset}"
        );
    }
    let mut over = good.clone();
    over[16..20].copy_from_slice(&(MAX_CACHE_SECONDS + 1).to_le_bytes());
    assert_eq!(
        ConnectionReply::decode(&over),
        m("the cache lifetime exceeds MAX_CACHE_SECONDS")
    );
    over[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        ConnectionReply::decode(&over),
        m("the cache lifetime exceeds MAX_CACHE_SECONDS")
    );
    // The first 24 bytes of a request are not a reply.
    let request = encode_request(&v4_request());
    assert_eq!(
        ConnectionReply::decode(&request[..24]),
        m("bad reply magic")
    );
}

#[test]
fn encoding_errors_are_errors_not_panics() {
    let request = v4_request();
    let mut short = vec![0u8; request.encoded_len() - 1];
    assert_eq!(
        request.encode(&mut short),
        Err(Malformed("the buffer is too short for this request"))
    );
    let mixed = ConnectionRequest {
        remote_address: IpAddr::V6(Ipv6Addr::LOCALHOST),
        ..v4_request()
    };
    assert_eq!(
        mixed.encode(&mut [0u8; REQUEST_MAX_LEN]),
        Err(Malformed(
            "the local and remote addresses are of different IP versions"
        ))
    );
    assert_eq!(
        ConnectionReply::allow(1).encode(&mut [0u8; 23]),
        Err(Malformed("the buffer is too short for a reply"))
    );
}

/// splitmix64: a small, well-mixed generator, so a failing seed replays exactly.
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

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// `FIREWALL_PROTOCOL_SEED` if set, else a seed from the clock; printed so that a failure
/// (whose output the test harness shows) can be replayed.
fn seed() -> u64 {
    let seed = match std::env::var("FIREWALL_PROTOCOL_SEED") {
        Ok(text) => text
            .parse()
            .expect("FIREWALL_PROTOCOL_SEED is a decimal u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    println!("seed {seed}; replay with FIREWALL_PROTOCOL_SEED={seed}");
    seed
}

/// Decodes `bytes` as `M`; if that succeeds, encoding gives back exactly `bytes`.
fn check<M: Message + core::fmt::Debug>(bytes: &[u8], seed: u64, case: usize) -> bool {
    let Ok(message) = M::decode(bytes) else {
        return false;
    };
    let mut out = vec![0u8; M::MAX_LEN];
    let len = message
        .encode(&mut out)
        .unwrap_or_else(|e| panic!("seed {seed} case {case}: {message:?} does not encode: {e}"));
    assert!(
        (M::MIN_LEN..=M::MAX_LEN).contains(&len),
        "seed {seed} case {case}: encoded length {len}"
    );
    assert_eq!(
        &out[..len],
        bytes,
        "seed {seed} case {case}: encode(decode(x)) != x"
    );
    true
}

#[test]
fn decode_never_panics_and_inverts_encode_on_random_bytes() {
    let seed = seed();
    let mut rng = Rng(seed);
    let valid_requests = [encode_request(&v4_request()), encode_request(&v6_request())];
    let valid_reply = encode_reply(&ConnectionReply::deny(3));
    let (mut requests_ok, mut replies_ok) = (0, 0);
    for case in 0..50_000 {
        let bytes = match case % 4 {
            // Random bytes of any length around the valid ones.
            0 => {
                let len = rng.below(REQUEST_MAX_LEN + 40);
                rng.bytes(len)
            }
            // Random bytes behind a valid magic and version, so decoding goes deeper.
            1 => {
                let len = rng.below(REQUEST_MAX_LEN + 40);
                let mut bytes = rng.bytes(len);
                let prefix = if rng.below(2) == 0 {
                    &valid_requests[rng.below(2)][..6]
                } else {
                    &valid_reply[..6]
                };
                let n = prefix.len().min(bytes.len());
                bytes[..n].copy_from_slice(&prefix[..n]);
                bytes
            }
            // A valid message with a few bytes flipped, and sometimes cut or extended.
            _ => {
                let mut bytes = if case % 4 == 2 {
                    valid_requests[rng.below(2)].clone()
                } else {
                    valid_reply.clone()
                };
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
                match rng.below(8) {
                    0 => bytes.truncate(rng.below(bytes.len() + 1)),
                    1 => {
                        let extra = 1 + rng.below(4);
                        bytes.extend(rng.bytes(extra));
                    }
                    _ => {}
                }
                bytes
            }
        };
        requests_ok += usize::from(check::<ConnectionRequest>(&bytes, seed, case));
        replies_ok += usize::from(check::<ConnectionReply>(&bytes, seed, case));
    }
    // The mutations reach valid messages too, so the round-trip half of the property is
    // exercised, not only the rejections.
    assert!(requests_ok > 0, "seed {seed}: no random request decoded");
    assert!(replies_ok > 0, "seed {seed}: no random reply decoded");
}

/// The driver fills a request's path in pool memory with `set_units_truncating`: it must give
/// what `from_units_truncating` gives, replace whatever path was there, read no unit past the
/// cut, and leave an empty path on a NUL.
#[test]
fn set_units_truncating_replaces_the_path_in_place() {
    let mut path = ImagePath::from_str_truncating(r"\Device\HarddiskVolume1\old.exe").unwrap();
    path.set_units_truncating("ab".encode_utf16()).unwrap();
    assert_eq!(path, ImagePath::from_str_truncating("ab").unwrap());

    let long = vec![u16::from(b'q'); MAX_PATH_UNITS + 3];
    path.set_units_truncating(long.iter().copied()).unwrap();
    assert_eq!(path, ImagePath::from_units_truncating(&long).unwrap());
    assert!(path.is_truncated());

    // Exactly MAX_PATH_UNITS units: whole, not truncated.
    path.set_units_truncating(long[..MAX_PATH_UNITS].iter().copied())
        .unwrap();
    assert!(!path.is_truncated());
    assert_eq!(path.as_units().len(), MAX_PATH_UNITS);

    // Units past the cut are never read: an iterator that panics after them is fine.
    let endless = core::iter::repeat_n(u16::from(b'r'), MAX_PATH_UNITS + 1)
        .chain(core::iter::from_fn(|| panic!("read past the cut")));
    path.set_units_truncating(endless).unwrap();
    assert!(path.is_truncated());

    assert_eq!(
        path.set_units_truncating([u16::from(b'a'), 0, u16::from(b'b')]),
        Err(Malformed("the image path contains a NUL unit"))
    );
    assert_eq!(path, ImagePath::empty());
    assert!(!path.is_truncated());
}
