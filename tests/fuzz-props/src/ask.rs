//! The question channel's header, and the bodies the firewall and seed-fixed put behind it.

use wfp_rs::ask::{HEADER_LEN, decode_message, encode_header};

use crate::{protocol, seed};

pub(crate) fn message(data: &[u8]) -> bool {
    let decoded = decode_message(data);
    // The layout as the module documents it, read independently: id (u64), body length (u32,
    // equal to what follows), reserved (u32, 0), all little-endian.
    let documented = data.len() >= HEADER_LEN && data[12..16] == [0; 4] && {
        let len = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        usize::try_from(len).is_ok_and(|len| len == data.len() - HEADER_LEN)
    };
    assert_eq!(
        decoded.is_some(),
        documented,
        "decode_message disagrees with the documented header"
    );
    let Some((id, body)) = decoded else {
        return false;
    };
    assert_eq!(body, &data[HEADER_LEN..]);
    assert_eq!(id.raw().to_le_bytes(), data[..8]);
    assert_eq!(encode_header(id, body.len()), data[..HEADER_LEN]);
    // The bodies, with the limits each channel applies before decoding them.
    let firewall = firewall_protocol::ASK_CHANNEL;
    if body.len() <= firewall.max_answer {
        protocol::check_reply(body);
    }
    if body.len() <= firewall.max_question {
        protocol::check_request(body);
    }
    let seed_fixed = seed_fixed::protocol::CHANNEL;
    if body.len() <= seed_fixed.max_answer {
        seed::check_reply(body);
    }
    if body.len() <= seed_fixed.max_question {
        seed::check_request(body);
    }
    true
}
