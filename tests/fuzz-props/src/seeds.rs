//! Valid inputs for every target, made by the real encoders, to start the fuzzer from meaningful
//! messages (`cargo run -p fuzz-props --example seed-corpus` writes them into `fuzz/corpus/`).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_protocol::control::{MAX_REVOKE_IDS, REVOKE_MAX_LEN, Revoke, Revoked};
use firewall_protocol::{
    ASK_MAX_PATH_UNITS, CacheLifetime, ConnectionReply, ConnectionRequest, Direction, ImagePath,
    PathBytes, RequestHead, Verdict, ip_protocol, request_len,
};
use seed_fixed::protocol::{VerdictReply, VerdictRequest};
use wfp_rs::ask::{QuestionId, encode_header};
use wfp_rs::port::Message;

/// One seed input: the target it is for, a name for its file, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    /// The target's name ([`crate::TARGETS`]).
    pub target: &'static str,
    /// A short name, unique within the target; `refused-...` for an input the decoder must
    /// refuse.
    pub name: String,
    /// The input.
    pub bytes: Vec<u8>,
}

/// Named inputs for one target.
type Inputs = Vec<(&'static str, Vec<u8>)>;

fn encoded(message: &impl Message) -> Vec<u8> {
    let mut out = vec![0u8; message.encoded_len()];
    let len = message
        .encode(&mut out)
        .expect("a seed message the encoder accepts");
    out.truncate(len);
    out
}

fn head(request_id: u64, direction: Direction, local: IpAddr, remote: IpAddr) -> RequestHead {
    RequestHead {
        request_id,
        process_id: 4242,
        direction,
        ip_protocol: ip_protocol::TCP,
        local_address: local,
        local_port: 50_000,
        remote_address: remote,
        remote_port: 443,
    }
}

fn requests() -> Inputs {
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let curl = r"\device\harddiskvolume3\windows\system32\curl.exe";
    let long: String = core::iter::repeat_n('a', ASK_MAX_PATH_UNITS).collect();
    // An unpaired surrogate: NT names may hold one, and the request carries it as it is.
    let surrogate = ImagePath::new(&[0x5C, 0xD800, 0x61]).expect("a path without NUL");
    let request = |head: RequestHead, path: ImagePath| encoded(&ConnectionRequest::new(head, path));
    let path = |text: &str| text.parse::<ImagePath>().expect("a seed path");
    let outbound = head(1, Direction::Outbound, v4(10, 0, 0, 2), v4(192, 0, 2, 1));
    let inbound = head(2, Direction::Inbound, v6, v6);
    // The driver's own encoder, from an application id with its NUL.
    let app_id: Vec<u8> = concat!(r"\device\harddiskvolume3\app.exe", "\0")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut from_driver = vec![0u8; request_len(app_id.len() / 2 - 1)];
    outbound
        .encode_with_path(
            PathBytes::from_app_id(&app_id).expect("a seed application id"),
            &mut from_driver,
        )
        .expect("a seed request");
    vec![
        ("v4-curl", request(outbound, path(curl))),
        ("v6-inbound", request(inbound, path(curl))),
        ("empty-path", request(outbound, ImagePath::empty())),
        ("ask-max-path", request(inbound, path(&long))),
        ("surrogate", request(outbound, surrogate)),
        ("driver-encoder", from_driver),
    ]
}

fn replies() -> Inputs {
    let minute = CacheLifetime::from_secs(60).expect("a valid lifetime");
    vec![
        ("allow", encoded(&ConnectionReply::allow(1))),
        ("deny", encoded(&ConnectionReply::deny(u64::MAX))),
        (
            "allow-cached",
            encoded(&ConnectionReply::allow(7).cached_for(minute)),
        ),
        (
            "deny-cached-max",
            encoded(&ConnectionReply::new(8, Verdict::Deny).cached_for(CacheLifetime::MAX)),
        ),
    ]
}

fn controls() -> Inputs {
    let revoke = |ids: Option<&[u64]>| {
        let mut out = vec![0u8; REVOKE_MAX_LEN];
        let len = match ids {
            None => Revoke::encode_all(&mut out),
            Some(ids) => Revoke::encode_requests(ids, &mut out),
        }
        .expect("a seed revoke request");
        out.truncate(len);
        out
    };
    let many: Vec<u64> = (0..MAX_REVOKE_IDS as u64)
        .map(|i| i * 0x1_0000_0001)
        .collect();
    vec![
        ("revoke-all", revoke(None)),
        ("revoke-none", revoke(Some(&[]))),
        ("revoke-three", revoke(Some(&[1, 2, u64::MAX]))),
        ("revoke-max", revoke(Some(&many))),
        ("revoked", Revoked { removed: 3 }.to_bytes().to_vec()),
    ]
}

fn seed_messages() -> Inputs {
    vec![
        ("request", encoded(&VerdictRequest { pid: 4242 })),
        (
            "reply-allow",
            encoded(&VerdictReply {
                pid: 4242,
                verdict: seed_fixed::protocol::Verdict::Allow,
            }),
        ),
        (
            "reply-block",
            encoded(&VerdictReply {
                pid: 1,
                verdict: seed_fixed::protocol::Verdict::Block,
            }),
        ),
    ]
}

fn framed(id: u64, body: &[u8]) -> Vec<u8> {
    let mut message = encode_header(QuestionId::from_raw(id), body.len()).to_vec();
    message.extend_from_slice(body);
    message
}

fn ask_messages() -> Inputs {
    let mut out = vec![("empty", framed(0, &[]))];
    let reply = replies().swap_remove(2).1;
    out.push(("firewall-answer", framed(0x1_0000_0002, &reply)));
    let request = requests().swap_remove(0).1;
    out.push(("firewall-question", framed(3, &request)));
    for (name, body) in seed_messages() {
        out.push((name, framed(0x7_0000_0001, &body)));
    }
    out
}

/// Answers on the question channel: a flags byte (bit 0: the question's id goes over the
/// header's), then the answer.
fn answers() -> Inputs {
    let flagged = |flags: u8, message: Vec<u8>| {
        let mut bytes = vec![flags];
        bytes.extend(message);
        bytes
    };
    let mut out: Vec<_> = replies()
        .into_iter()
        .map(|(name, reply)| (name, flagged(1, framed(0, &reply))))
        .collect();
    // Accepted but malformed: the question is decided `Malformed`.
    out.push((
        "request-as-answer",
        flagged(1, ask_messages().swap_remove(2).1),
    ));
    out
}

/// A rules file, then connections as [`crate::rules`] reads them after a NUL.
fn rules_files() -> Inputs {
    let with_connections = |text: &str| {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        // Outbound TCP from curl to 10.1.2.3:443, local port 50000.
        bytes.extend_from_slice(&[0, ip_protocol::TCP]);
        bytes.extend_from_slice(&443u16.to_le_bytes());
        bytes.extend_from_slice(&50_000u16.to_le_bytes());
        bytes.extend_from_slice(&[10, 1, 2, 3]);
        let app = br"C:\Windows\System32\curl.exe";
        bytes.push(app.len() as u8);
        bytes.extend_from_slice(app);
        // Inbound TCP from 2001:db8::1:40000 to local port 22, no image.
        bytes.extend_from_slice(&[3, ip_protocol::TCP]);
        bytes.extend_from_slice(&40_000u16.to_le_bytes());
        bytes.extend_from_slice(&22u16.to_le_bytes());
        bytes.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        bytes.push(0);
        bytes
    };
    vec![
        (
            "example",
            with_connections(include_str!(
                "../../../examples/firewall/rules/rules.example.toml"
            )),
        ),
        (
            "demo",
            with_connections(include_str!(
                "../../../examples/firewall/service/demo-rules.toml"
            )),
        ),
        (
            "demo-lockdown",
            with_connections(include_str!(
                "../../../examples/firewall/service/demo-rules-lockdown.toml"
            )),
        ),
        (
            "local-ports",
            with_connections(concat!(
                "default = \"allow\"\n",
                "[[rule]]\naction = \"deny\"\nlocal_port = [22, \"1000-2000\"]\nremote = \"::ffff:10.0.0.0/104\"\n",
                "[[rule]]\nname = \"icmp\"\naction = \"allow\"\nprotocol = 1\ndirection = \"any\"\n",
            )),
        ),
    ]
}

fn globs() -> Inputs {
    let glob = |pattern: &str, paths: &[&str]| {
        let mut bytes = pattern.as_bytes().to_vec();
        for path in paths {
            bytes.push(0);
            bytes.extend_from_slice(path.as_bytes());
        }
        bytes
    };
    vec![
        (
            "program-files",
            glob(
                r"C:\Program Files\**\*.exe",
                &[
                    r"c:\program files\browser\bin\browser.exe",
                    r"C:\Program Files\x.dll",
                ],
            ),
        ),
        (
            "any-curl",
            glob(
                r"**\curl.exe",
                &[r"C:/Windows/System32/CURL.EXE", "curl.exe", ""],
            ),
        ),
        (
            "one",
            glob(r"C:\tools\?.exe", &[r"C:\tools\a.exe", r"C:\tools\\.exe"]),
        ),
        ("star", glob("*", &["", "a", r"a\b"])),
    ]
}

/// Every seed, for every target.
pub fn seeds() -> Vec<Seed> {
    let groups: [(&'static str, Inputs); 9] = [
        ("reply", replies()),
        ("request", requests()),
        ("control", controls()),
        ("ask_message", ask_messages()),
        ("seed_messages", seed_messages()),
        ("ask_answer", answers()),
        (
            "firewall_control",
            controls()
                .into_iter()
                .filter(|(_, bytes)| Revoke::decode(bytes).is_ok())
                // One byte past the control device's limit, so that the fuzzer's inputs may
                // be as long (libFuzzer's default limit is the longest seed's, or 4096).
                .chain([(
                    "refused-over-max-input",
                    vec![0u8; wfp_rs::control::MAX_INPUT + 1],
                )])
                .collect(),
        ),
        ("rules", rules_files()),
        ("glob", globs()),
    ];
    groups
        .into_iter()
        .flat_map(|(target, inputs)| {
            inputs.into_iter().map(move |(name, bytes)| Seed {
                target,
                name: name.to_owned(),
                bytes,
            })
        })
        .collect()
}
