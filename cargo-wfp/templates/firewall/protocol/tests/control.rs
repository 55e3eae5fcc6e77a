//! The revoke command's encoding: layout, round trips, and every malformed input rejected.

use firewall_protocol::control::{
    MAX_REVOKE_IDS, REVOKE, REVOKE_HEADER_LEN, REVOKE_MAX_LEN, Revoke, Revoked,
};
use wfp_rs::inverted::RequiredAccess;
use wfp_rs::port::Malformed;

fn encode_requests(ids: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; REVOKE_MAX_LEN];
    let len = Revoke::encode_requests(ids, &mut out).expect("encodes");
    out.truncate(len);
    out
}

#[test]
fn the_control_code_is_a_vendor_buffered_write_code() {
    assert_eq!(REVOKE.device_type(), 0x8A5E);
    assert_eq!(REVOKE.function(), 0x801);
    assert_eq!(REVOKE.method(), 0, "METHOD_BUFFERED");
    assert_eq!(
        REVOKE,
        wfp_rs::inverted::ControlCode::buffered(0x8A5E, 0x801, RequiredAccess::Write)
    );
}

#[test]
fn revoke_requests_round_trip_in_the_documented_layout() {
    let bytes = encode_requests(&[1, 0x0102_0304_0506_0708]);
    assert_eq!(
        bytes,
        [
            b'F', b'W', b'R', b'V', 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, //
            1, 0, 0, 0, 0, 0, 0, 0, //
            8, 7, 6, 5, 4, 3, 2, 1,
        ]
    );
    let Revoke::Requests(ids) = Revoke::decode(&bytes).expect("decodes") else {
        panic!("not a list of requests");
    };
    assert_eq!(ids.len(), 2);
    assert_eq!(ids.iter().collect::<Vec<_>>(), [1, 0x0102_0304_0506_0708]);
    assert!(ids.contains(1) && !ids.contains(2));

    let mut all = [0u8; REVOKE_HEADER_LEN];
    assert_eq!(Revoke::encode_all(&mut all), Ok(REVOKE_HEADER_LEN));
    assert_eq!(&all[..8], [b'F', b'W', b'R', b'V', 1, 0, 1, 0]);
    assert_eq!(Revoke::decode(&all), Ok(Revoke::All));

    let longest: Vec<u64> = (0..MAX_REVOKE_IDS as u64).collect();
    let bytes = encode_requests(&longest);
    assert_eq!(bytes.len(), REVOKE_MAX_LEN);
    let Revoke::Requests(ids) = Revoke::decode(&bytes).expect("decodes") else {
        panic!("not a list of requests");
    };
    assert_eq!(ids.iter().collect::<Vec<_>>(), longest);
}

#[test]
fn encoding_refuses_what_does_not_fit() {
    let too_many: Vec<u64> = (0..=MAX_REVOKE_IDS as u64).collect();
    let mut out = vec![0u8; REVOKE_MAX_LEN + 8];
    assert_eq!(
        Revoke::encode_requests(&too_many, &mut out),
        Err(Malformed("a revoke request names more than MAX_REVOKE_IDS"))
    );
    let mut short = [0u8; REVOKE_HEADER_LEN + 7];
    assert_eq!(
        Revoke::encode_requests(&[5], &mut short),
        Err(Malformed("the buffer is too short for this revoke request"))
    );
}

#[test]
fn every_malformed_revoke_request_is_rejected_with_its_reason() {
    let valid = encode_requests(&[7, 8]);
    let with = |offset: usize, byte: u8| {
        let mut bytes = valid.clone();
        bytes[offset] = byte;
        Revoke::decode(&bytes).map(|_| ())
    };
    let cases: [(Result<(), Malformed>, &str); 8] = [
        (
            Revoke::decode(&valid[..15]).map(|_| ()),
            "a revoke request is shorter than its header",
        ),
        (with(0, b'X'), "bad revoke magic"),
        (with(4, 2), "unsupported protocol version"),
        (with(6, 0x02), "unknown revoke flags are set"),
        (with(12, 1), "reserved revoke fields are not zero"),
        (
            with(8, 3),
            "the revoke request length does not match its count",
        ),
        (
            with(9, 1),
            "a revoke request names more than MAX_REVOKE_IDS",
        ),
        (with(6, 0x01), "a revoke-all request names no request ids"),
    ];
    for (result, reason) in cases {
        assert_eq!(result, Err(Malformed(reason)));
    }
    let mut trailing = valid.clone();
    trailing.push(0);
    assert_eq!(
        Revoke::decode(&trailing),
        Err(Malformed(
            "the revoke request length does not match its count"
        ))
    );
}

#[test]
fn revoke_replies_round_trip_and_are_checked() {
    let reply = Revoked {
        removed: 0x0102_0304,
    };
    let bytes = reply.to_bytes();
    assert_eq!(bytes, [b'F', b'W', b'R', b'D', 4, 3, 2, 1]);
    assert_eq!(Revoked::decode(&bytes), Ok(reply));
    assert_eq!(
        Revoked::decode(&bytes[..7]),
        Err(Malformed("a revoke reply is 8 bytes"))
    );
    let mut bad = bytes;
    bad[0] = b'x';
    assert_eq!(
        Revoked::decode(&bad),
        Err(Malformed("bad revoke reply magic"))
    );
}
