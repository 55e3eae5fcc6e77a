//! seed-fixed's messages.

use seed_fixed::protocol::{MESSAGE_LEN, VerdictReply, VerdictRequest};
use wfp_rs::port::Message;

pub(crate) fn messages(data: &[u8]) -> bool {
    let request = check_request(data);
    let reply = check_reply(data);
    request || reply
}

/// Decodes a request (what the service receives) and checks an accepted one re-encodes to it.
pub(crate) fn check_request(data: &[u8]) -> bool {
    let Ok(request) = VerdictRequest::decode(data) else {
        return false;
    };
    let mut out = [0u8; MESSAGE_LEN];
    assert_eq!(request.encode(&mut out), Ok(MESSAGE_LEN));
    assert_eq!(out[..], *data, "{request:?} re-encodes to other bytes");
    true
}

/// Decodes a reply (what the driver receives) and checks an accepted one re-encodes to it.
pub(crate) fn check_reply(data: &[u8]) -> bool {
    let Ok(reply) = VerdictReply::decode(data) else {
        return false;
    };
    let mut out = [0u8; MESSAGE_LEN];
    assert_eq!(reply.encode(&mut out), Ok(MESSAGE_LEN));
    assert_eq!(out[..], *data, "{reply:?} re-encodes to other bytes");
    true
}
