//! The properties the fuzz targets in `fuzz/` check, one function per target, shared with the
//! stable-toolchain test that replays the targets' corpora (`tests/corpora.rs`).
//!
//! Each function takes the fuzzer's bytes, runs one decoder of untrusted bytes on them, and
//! panics if the decoder broke a property it promises: beyond "no panic", a message it accepts
//! re-encodes to exactly the bytes it came from (the protocol crates document that `decode`
//! accepts only such messages), its lengths and counts are within the documented maxima, and a
//! parsed rules file decides every connection as its first matching rule says. Each returns
//! whether the decoder accepted the input, which the seed test uses to check that the seeds are
//! valid messages.
//!
//! The code lives in this ordinary workspace crate, not in `fuzz/` (its own workspace, built
//! with nightly by `cargo fuzz`), so that `cargo test` on the pinned stable toolchain runs the
//! same property code over every corpus file: a property the fuzzer checks cannot drift from the
//! one the replay checks. See docs/reliability.md.
//!
//! Two targets run a driver in the simulator, so on a Windows host the crate needs its `sim`
//! feature (as the workspace's other simulator tests do); without it the crate is empty.

#![cfg(any(not(windows), feature = "sim"))]

mod ask;
mod driver;
mod protocol;
mod rules;
mod seed;
mod seeds;

pub use seeds::{Seed, seeds};

/// One fuzz target: its name (the file `fuzz/fuzz_targets/<name>.rs` and the corpus folder
/// `fuzz/corpus/<name>/`) and its property check.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The target's name, as `cargo fuzz run` takes it.
    pub name: &'static str,
    /// What the decoder under test is, in a line.
    pub decoder: &'static str,
    /// Runs the decoder on the bytes and panics if a property fails; returns whether the
    /// decoder accepted them.
    pub check: fn(&[u8]) -> bool,
}

/// Every fuzz target, in the order docs/reliability.md lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "reply",
        decoder: "firewall: ConnectionReply::decode (service -> driver, port reply or channel answer body)",
        check: reply,
    },
    Target {
        name: "request",
        decoder: "firewall: ConnectionRequest::decode (driver -> service), PathBytes::from_app_id and the driver's encoder",
        check: request,
    },
    Target {
        name: "control",
        decoder: "firewall: Revoke::decode (service -> driver control request), Revoked::decode (its answer)",
        check: control,
    },
    Target {
        name: "ask_message",
        decoder: "wfp_rs::ask::decode_message (question channel header, both ways) and the bodies behind it",
        check: ask_message,
    },
    Target {
        name: "seed_messages",
        decoder: "seed-fixed: VerdictRequest::decode, VerdictReply::decode",
        check: seed_messages,
    },
    Target {
        name: "ask_answer",
        decoder: "wfp_rs::ask::AskChannel's answer path in the simulator, with the firewall's reply decoder",
        check: ask_answer,
    },
    Target {
        name: "firewall_control",
        decoder: "the example firewall driver's control device in the simulator (REVOKE requests)",
        check: firewall_control,
    },
    Target {
        name: "rules",
        decoder: "firewall-rules: Rules::parse and Rules::decide",
        check: rules,
    },
    Target {
        name: "glob",
        decoder: "firewall-rules: Glob::new and Glob::matches",
        check: glob,
    },
];

/// The firewall driver's reply decoder, as the port and the question channel run it on what the
/// service sent: a reply it accepts is 24 bytes, re-encodes to the same bytes, and caches for at
/// most `MAX_CACHE_SECONDS`.
pub fn reply(data: &[u8]) -> bool {
    protocol::reply(data)
}

/// The firewall service's request decoder: a request it accepts is within
/// `REQUEST_MIN_LEN..=REQUEST_MAX_LEN`, has a path of at most `MAX_PATH_UNITS` units without a
/// NUL, and re-encodes to the same bytes both through `Message::encode` and through the driver's
/// own `RequestHead::encode_with_path`. Also: any bytes as an application id either fit a
/// request whole or are refused, and the request the driver builds from them decodes to them.
pub fn request(data: &[u8]) -> bool {
    protocol::request(data)
}

/// The firewall driver's control command decoder (`Revoke::decode`) and the service's decoder of
/// its answer (`Revoked::decode`): accepted commands name at most `MAX_REVOKE_IDS` ids and
/// re-encode to the same bytes.
pub fn control(data: &[u8]) -> bool {
    protocol::control(data)
}

/// The question channel's header (`wfp_rs::ask::decode_message`, run by the driver on answers
/// and by `AskClient` on questions), checked against an independent reading of the documented
/// layout, then each body as the firewall and seed-fixed decode it.
pub fn ask_message(data: &[u8]) -> bool {
    ask::message(data)
}

/// seed-fixed's two 16-byte messages: accepted ones re-encode to the same bytes.
pub fn seed_messages(data: &[u8]) -> bool {
    seed::messages(data)
}

/// The question channel's answer path in the kernel, end to end in the simulator: a question is
/// asked and delivered, the bytes are the service's answer (its first byte a flag: bit 0 set
/// puts the question's id over the next 8 bytes). The answer request's status and the
/// question's one decision are the ones `wfp_rs::ask` documents for it.
pub fn ask_answer(data: &[u8]) -> bool {
    driver::ask_answer(data)
}

/// The example firewall's control device, end to end in the simulator: the bytes are a
/// `REVOKE` request's input, which succeeds with a `Revoked` answer exactly when
/// `Revoke::decode` accepts it.
pub fn firewall_control(data: &[u8]) -> bool {
    driver::firewall_control(data)
}

/// The rules file parser: the text before the first NUL byte is the file, the bytes after it
/// describe connections. Errors point inside the text; a parsed policy decides each connection
/// by its first matching rule, the same when only a local port the decision says does not
/// matter changes, for an IPv4 address and its IPv4-mapped form, and whatever the ASCII case or
/// separators of the image path.
pub fn rules(data: &[u8]) -> bool {
    rules::rules(data)
}

/// The rules' `app` globs: the pattern before the first NUL byte, paths after it (NUL
/// separated). A pattern compiles exactly when the documentation says it does, and matches
/// exactly the paths a straightforward backtracking matcher says it does.
pub fn glob(data: &[u8]) -> bool {
    rules::glob(data)
}
