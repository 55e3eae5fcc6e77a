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
        image_path: PATH.parse().unwrap(),
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
        image_path: r"\Device\HarddiskVolume1\dns.exe".parse().unwrap(),
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
    // UNICODE_STRING_MAX_CHARS: a UNICODE_STRING's byte length is a USHORT.
    assert_eq!(MAX_PATH_UNITS, 32_767);
    assert_eq!(MAX_PATH_UNITS, usize::from(u16::MAX) / 2);
    assert_eq!(REQUEST_MAX_LEN, 72 + 2 * 32_768);
    assert_eq!(REQUEST_MAX_LEN, request_len(MAX_PATH_UNITS));
    assert_eq!(ConnectionReply::MIN_LEN, 24);
    assert_eq!(ConnectionReply::MAX_LEN, 24);

    let mut empty = v4_request();
    empty.image_path = ImagePath::empty();
    assert_eq!(empty.encoded_len(), REQUEST_MIN_LEN);
    assert_eq!(encode_request(&empty).len(), REQUEST_MIN_LEN);
    let mut longest = v4_request();
    longest.image_path = ImagePath::new(&[u16::from(b'a'); MAX_PATH_UNITS]).unwrap();
    assert_eq!(longest.encoded_len(), REQUEST_MAX_LEN);
    assert_eq!(encode_request(&longest).len(), REQUEST_MAX_LEN);
}

#[test]
fn v4_request_round_trips_in_the_documented_layout() {
    let request = v4_request();
    let bytes = encode_request(&request);
    let units = PATH.encode_utf16().count();
    assert_eq!(bytes.len(), 72 + 2 * (units + 1));
    assert_eq!(&bytes[0..4], b"FWRQ");
    assert_eq!(&bytes[4..8], &[2, 0, 0, 0]); // version 2, reserved0
    assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]); // request id, little-endian
    assert_eq!(&bytes[16..24], &4242u64.to_le_bytes());
    assert_eq!(&bytes[24..28], &[0, 6, 4, 0]); // outbound, TCP, IPv4, no flags
    assert_eq!(&bytes[28..32], &[units as u8, 0, 0, 0]); // path_len, reserved1
    assert_eq!(&bytes[32..36], &[0x50, 0xc3, 0xbb, 0x01]); // ports 50000 and 443
    assert_eq!(&bytes[36..40], &(bytes.len() as u32).to_le_bytes()); // message_len
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

/// Paths of every size round-trip whole: empty, short, just past version 1's cut (520 units),
/// and the longest NT path.
#[test]
fn paths_empty_long_and_longest_round_trip_whole() {
    let named = |units: usize| {
        // ASCII: its length in bytes is its length in UTF-16 units.
        let mut path = r"\Device\HarddiskVolume3".to_owned();
        let before_file = units - r"\nc.exe".len();
        while path.len() + r"\dir".len() <= before_file {
            path.push_str(r"\dir");
        }
        while path.len() < before_file {
            path.push('x');
        }
        path.push_str(r"\nc.exe");
        assert_eq!(path.encode_utf16().count(), units);
        path.parse::<ImagePath>().unwrap()
    };
    for path in [
        ImagePath::empty(),
        ImagePath::new(&[0xd800]).unwrap(), // an unpaired surrogate is carried as is
        named(520),
        named(521),
        named(4096),
        named(MAX_PATH_UNITS),
        ImagePath::new(&[u16::from(b'x'); MAX_PATH_UNITS]).unwrap(),
    ] {
        let request = ConnectionRequest {
            image_path: path,
            ..v6_request()
        };
        let bytes = encode_request(&request);
        assert_eq!(bytes.len(), request_len(request.image_path.len()));
        assert_eq!(bytes[27], 0, "no flags");
        let decoded = ConnectionRequest::decode(&bytes).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(decoded.image_path.len(), request.image_path.len());
    }
    let long = named(600).to_string();
    assert!(long.ends_with(r"\nc.exe"), "{long}");
    assert_eq!(ImagePath::new(&[0xd800]).unwrap().to_string(), "\u{fffd}");
}

#[test]
fn image_path_constructors_reject_what_cannot_be_sent_whole() {
    let too_long = Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
    assert_eq!(
        ImagePath::new(&[u16::from(b'a'); MAX_PATH_UNITS + 1]),
        too_long
    );
    assert_eq!(
        "z".repeat(MAX_PATH_UNITS + 1).parse::<ImagePath>(),
        too_long
    );
    assert!("z".repeat(MAX_PATH_UNITS).parse::<ImagePath>().is_ok());
    let nul = Err(Malformed("the image path contains a NUL unit"));
    assert_eq!(ImagePath::new(&[1, 0, 2]), nul);
    assert_eq!(ImagePath::new(&[0]), nul);
    assert_eq!("a\0b".parse::<ImagePath>(), nul);
    // A NUL anywhere is an error, however far in: nothing is cut off.
    let mut late = vec![u16::from(b'a'); MAX_PATH_UNITS];
    late[MAX_PATH_UNITS - 1] = 0;
    assert_eq!(ImagePath::new(&late), nul);
}

#[test]
fn replies_round_trip_in_the_documented_layout() {
    let reply = ConnectionReply::deny(0x0102).cached_for(CacheLifetime::from_secs(300).unwrap());
    let bytes = encode_reply(&reply);
    assert_eq!(
        bytes,
        b"FWRP\x02\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00\x2c\x01\x00\x00\x00\x00\x00\x00"
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

/// Sets a request's `message_len` to its length, so that a test of another length check gets
/// past that one.
fn with_consistent_message_len(bytes: &mut [u8]) {
    let len = bytes.len() as u32;
    bytes[36..40].copy_from_slice(&len.to_le_bytes());
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
    // Version 1, whose paths could be truncated, is not understood any more.
    assert_eq!(request_with(|b| b[4] = 1), version);
    assert_eq!(request_with(|b| b[4] = 3), version);
    assert_eq!(request_with(|b| b[5] = 1), version);
    let reserved = m("reserved request fields are not zero");
    for offset in [6, 7, 30, 31] {
        assert_eq!(request_with(|b| b[offset] = 1), reserved, "offset {offset}");
    }
    let message_len = m("the request's message_len is not the length received");
    assert_eq!(request_with(|b| b[36] += 1), message_len);
    assert_eq!(request_with(|b| b[36] -= 1), message_len);
    assert_eq!(request_with(|b| b[39] = 1), message_len);
    assert_eq!(request_with(|b| b[36..40].fill(0)), message_len);
    // Bytes after the message (a transport's larger buffer) are not part of it.
    assert_eq!(request_with(|b| b.push(0)), message_len);
    assert_eq!(request_with(|b| b.extend([0, 0])), message_len);
    assert_eq!(
        request_with(|b| {
            b.truncate(b.len() - 2);
        }),
        message_len
    );
    assert_eq!(
        request_with(|b| b[28..30].copy_from_slice(&u16::MAX.to_le_bytes())),
        m("the image path is longer than MAX_PATH_UNITS")
    );
    let too_long = (MAX_PATH_UNITS as u16 + 1).to_le_bytes();
    assert_eq!(
        request_with(|b| b[28..30].copy_from_slice(&too_long)),
        m("the image path is longer than MAX_PATH_UNITS")
    );
    // `path_len` and `message_len` must agree, whichever of them lies.
    let mismatch = m("the request length does not match its image path length");
    assert_eq!(request_with(|b| b[28] += 1), mismatch);
    assert_eq!(request_with(|b| b[28] -= 1), mismatch);
    assert_eq!(
        request_with(|b| {
            b.extend([0, 0]);
            with_consistent_message_len(b);
        }),
        mismatch
    );
    assert_eq!(
        request_with(|b| {
            b.truncate(b.len() - 2);
            with_consistent_message_len(b);
        }),
        mismatch
    );
    assert_eq!(
        request_with(|b| {
            b.push(0);
            with_consistent_message_len(b);
        }),
        mismatch
    );
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
    // Bit 0 was version 1's "truncated" flag: no request says its path is cut any more.
    for bit in 0..8 {
        assert_eq!(
            request_with(|b| b[27] = 1 << bit),
            m("unknown request flags are set")
        );
    }
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

/// The same checks at the far end: a request with the longest path is accepted, one unit more
/// is not, whatever the lengths claim.
#[test]
fn the_longest_request_is_accepted_and_nothing_longer() {
    let longest = ConnectionRequest {
        image_path: ImagePath::new(&[u16::from(b'q'); MAX_PATH_UNITS]).unwrap(),
        ..v4_request()
    };
    let bytes = encode_request(&longest);
    assert_eq!(bytes.len(), REQUEST_MAX_LEN);
    assert_eq!(ConnectionRequest::decode(&bytes), Ok(longest));
    let mut over = bytes.clone();
    over.splice(72..72, [b'q', 0]);
    over[28..30].copy_from_slice(&(MAX_PATH_UNITS as u16 + 1).to_le_bytes());
    with_consistent_message_len(&mut over);
    assert_eq!(
        ConnectionRequest::decode(&over),
        Err(Malformed("a request is longer than REQUEST_MAX_LEN"))
    );
    // A longest-path header in front of a short body.
    let mut claims = encode_request(&v4_request());
    claims[28..30].copy_from_slice(&(MAX_PATH_UNITS as u16).to_le_bytes());
    assert_eq!(
        ConnectionRequest::decode(&claims),
        Err(Malformed(
            "the request length does not match its image path length"
        ))
    );
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
    assert_eq!(reply_with(4, 1), m("unsupported protocol version"));
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
        mixed.encode(&mut vec![0u8; REQUEST_MAX_LEN]),
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

    /// A length for random bytes: mostly up to 2 KiB, sometimes around the longest request.
    fn length(&mut self) -> usize {
        if self.below(32) == 0 {
            REQUEST_MAX_LEN - 40 + self.below(80)
        } else {
            self.below(2048)
        }
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
    let long = ConnectionRequest {
        image_path: "\\d\\".repeat(300).parse().unwrap(),
        ..v4_request()
    };
    let valid_requests = [
        encode_request(&v4_request()),
        encode_request(&v6_request()),
        encode_request(&long),
    ];
    let valid_reply = encode_reply(&ConnectionReply::deny(3));
    let (mut requests_ok, mut replies_ok) = (0, 0);
    for case in 0..50_000 {
        let bytes = match case % 4 {
            // Random bytes of any length around the valid ones.
            0 => {
                let len = rng.length();
                rng.bytes(len)
            }
            // Random bytes behind a valid magic and version, so decoding goes deeper.
            1 => {
                let len = rng.length();
                let mut bytes = rng.bytes(len);
                let prefix = if rng.below(2) == 0 {
                    &valid_requests[rng.below(valid_requests.len())][..6]
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
                    valid_requests[rng.below(valid_requests.len())].clone()
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

/// `path` as WFP's application id: UTF-16LE, then a NUL unit.
fn app_id(path: &str) -> Vec<u8> {
    path.encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// What a driver does: the application id's bytes, checked, copied once into a buffer of the
/// request's exact length, with the connection's other fields. It gives the bytes `encode`
/// gives for the same request, and the service decodes the whole path.
#[test]
fn a_request_encoded_from_the_application_id_is_the_request_with_its_whole_path() {
    let head = v4_request().head();
    let long = format!(r"\device\harddiskvolume3{}\nc.exe", r"\d".repeat(2000));
    for path in ["", r"\device\harddiskvolume3\app.exe", long.as_str()] {
        let blob = app_id(path);
        let bytes = PathBytes::from_app_id(&blob).unwrap();
        assert_eq!(bytes.units(), path.encode_utf16().count());
        let mut out = vec![0xAAu8; request_len(bytes.units())];
        assert_eq!(head.encode_with_path(bytes, &mut out), Ok(out.len()));
        let request = ConnectionRequest::new(head, path.parse().unwrap());
        assert_eq!(out, encode_request(&request));
        let decoded = ConnectionRequest::decode(&out).unwrap();
        assert_eq!(decoded.image_path.to_string(), path);
        assert_eq!(decoded.head(), head);
        // One byte short is an error, not a cut path.
        let mut short = vec![0u8; out.len() - 1];
        assert_eq!(
            head.encode_with_path(bytes, &mut short),
            Err(Malformed("the buffer is too short for this request"))
        );
    }
    // The terminator is optional; an empty blob is the empty path.
    let unterminated: Vec<u8> = "ab".encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert_eq!(PathBytes::from_app_id(&unterminated).unwrap().units(), 2);
    assert_eq!(PathBytes::from_app_id(&[]).unwrap().units(), 0);
    assert_eq!(PathBytes::from_app_id(&[0, 0]).unwrap().units(), 0);
}

/// What cannot be carried whole is refused, never cut: an odd byte, a NUL inside, a path
/// longer than any NT path.
#[test]
fn an_application_id_that_cannot_be_carried_whole_is_refused() {
    let longest = app_id(&"a".repeat(MAX_PATH_UNITS));
    assert_eq!(
        PathBytes::from_app_id(&longest).unwrap().units(),
        MAX_PATH_UNITS
    );
    let too_long = Err(Malformed("the image path is longer than MAX_PATH_UNITS"));
    assert_eq!(
        PathBytes::from_app_id(&app_id(&"a".repeat(MAX_PATH_UNITS + 1))),
        too_long
    );
    // Without a terminator the same: the bound is on the path, not the blob.
    assert_eq!(
        PathBytes::from_app_id(&longest[..longest.len() - 2]).map(|p| p.units()),
        Ok(MAX_PATH_UNITS)
    );
    let nul = Err(Malformed("the image path contains a NUL unit"));
    assert_eq!(PathBytes::from_app_id(&app_id("a\0b")), nul);
    assert_eq!(PathBytes::from_app_id(&[0, 0, 0, 0]), nul);
    assert_eq!(PathBytes::from_app_id(&app_id("\0")), nul);
    let odd = Err(Malformed(
        "the application id is not whole UTF-16 units (an odd number of bytes)",
    ));
    assert_eq!(PathBytes::from_app_id(b"a"), odd);
    let mut blob = app_id("abc");
    blob.pop();
    assert_eq!(PathBytes::from_app_id(&blob), odd);
    // Nor can a head be encoded with a path longer than the maximum by any other route.
    let mut out = vec![0u8; REQUEST_MAX_LEN + 2];
    let head = v4_request().head();
    let path = PathBytes::from_app_id(&longest).unwrap();
    assert_eq!(head.encode_with_path(path, &mut out), Ok(REQUEST_MAX_LEN));
}
