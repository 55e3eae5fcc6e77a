//! The example firewall's port messages and control commands.

use core::net::{IpAddr, Ipv6Addr};

use firewall_protocol::control::{MAX_REVOKE_IDS, REVOKE_MAX_LEN, Revoke, Revoked};
use firewall_protocol::{
    ConnectionReply, ConnectionRequest, Direction, MAX_CACHE_SECONDS, MAX_PATH_UNITS, PathBytes,
    REPLY_LEN, REQUEST_HEADER_LEN, REQUEST_MAX_LEN, REQUEST_MIN_LEN, RawReply, RawRequestHeader,
    RequestHead, request_len,
};
use wfp_rs::port::Message;

pub(crate) fn reply(data: &[u8]) -> bool {
    // The raw layer reads any 24 bytes and writes them back unchanged.
    if let Ok(raw) = <&[u8; REPLY_LEN]>::try_from(data) {
        assert_eq!(RawReply::from_bytes(raw).to_bytes(), *raw);
    }
    check_reply(data).is_some()
}

/// Decodes a reply and checks what an accepted one promises.
pub(crate) fn check_reply(data: &[u8]) -> Option<ConnectionReply> {
    let reply = ConnectionReply::decode(data).ok()?;
    assert_eq!(
        data.len(),
        REPLY_LEN,
        "an accepted reply is REPLY_LEN bytes"
    );
    if let Some(cache) = reply.cache {
        assert!(
            (1..=MAX_CACHE_SECONDS).contains(&cache.as_secs()),
            "cache lifetime {} out of 1..=MAX_CACHE_SECONDS",
            cache.as_secs()
        );
    }
    let mut out = [0u8; REPLY_LEN + 1];
    assert_eq!(reply.encode(&mut out), Ok(REPLY_LEN));
    assert_eq!(
        out[..REPLY_LEN],
        *data,
        "{reply:?} re-encodes to other bytes"
    );
    assert!(
        reply.encode(&mut out[..REPLY_LEN - 1]).is_err(),
        "a short buffer is an error"
    );
    Some(reply)
}

pub(crate) fn request(data: &[u8]) -> bool {
    if let Some(head) = data.first_chunk::<REQUEST_HEADER_LEN>() {
        assert_eq!(RawRequestHeader::from_bytes(head).to_bytes(), *head);
    }
    app_id(data);
    check_request(data).is_some()
}

/// Decodes a request and checks what an accepted one promises.
pub(crate) fn check_request(data: &[u8]) -> Option<ConnectionRequest> {
    let request = ConnectionRequest::decode(data).ok()?;
    assert!(
        (REQUEST_MIN_LEN..=REQUEST_MAX_LEN).contains(&data.len()),
        "an accepted request of {} bytes",
        data.len()
    );
    let path = request.image_path.as_units();
    assert!(
        path.len() <= MAX_PATH_UNITS,
        "a path of {} units",
        path.len()
    );
    assert!(!path.contains(&0), "a path with a NUL unit");
    assert_eq!(
        request.local_address.is_ipv4(),
        request.remote_address.is_ipv4(),
        "addresses of two IP versions"
    );
    assert_eq!(request.encoded_len(), data.len());
    let mut out = vec![0u8; data.len()];
    assert_eq!(request.encode(&mut out), Ok(data.len()));
    assert_eq!(out, data, "{request:?} re-encodes to other bytes");
    assert!(
        request.encode(&mut out[..data.len() - 1]).is_err(),
        "a short buffer is an error"
    );
    // The driver builds the same request from the application id's bytes (the path and its
    // NUL, as WFP hands them over) with its allocation-free encoder.
    let app_id = &data[REQUEST_HEADER_LEN..];
    let path_bytes = PathBytes::from_app_id(app_id)
        .unwrap_or_else(|e| panic!("an accepted request's path is not an application id: {e}"));
    assert_eq!(path_bytes.units(), path.len());
    out.fill(0xAA);
    assert_eq!(
        request.head().encode_with_path(path_bytes, &mut out),
        Ok(data.len())
    );
    assert_eq!(out, data, "the driver's encoder gives other bytes");
    Some(request)
}

/// Any bytes as the application id a classification carries: a path that fits a request whole,
/// or an error; never a part of it.
fn app_id(data: &[u8]) {
    let Ok(path) = PathBytes::from_app_id(data) else {
        return;
    };
    let bytes = path.as_bytes();
    assert!(data.starts_with(bytes));
    assert!(
        bytes.len() == data.len() || (bytes.len() + 2 == data.len() && data.ends_with(&[0, 0])),
        "only a final NUL is dropped"
    );
    assert_eq!(bytes.len() % 2, 0);
    assert_eq!(path.units(), bytes.len() / 2);
    assert!(path.units() <= MAX_PATH_UNITS);
    assert!(!bytes.chunks_exact(2).any(|unit| unit == [0, 0]));
    let head = RequestHead {
        request_id: u64::MAX,
        process_id: 4,
        direction: Direction::Inbound,
        ip_protocol: 17,
        local_address: IpAddr::V6(Ipv6Addr::LOCALHOST),
        local_port: 1,
        remote_address: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        remote_port: u16::MAX,
    };
    let mut out = vec![0u8; request_len(path.units())];
    assert_eq!(head.encode_with_path(path, &mut out), Ok(out.len()));
    let decoded = ConnectionRequest::decode(&out)
        .unwrap_or_else(|e| panic!("the driver's request does not decode: {e}"));
    assert_eq!(decoded.head(), head);
    let units: Vec<u8> = decoded
        .image_path
        .as_units()
        .iter()
        .flat_map(|unit| unit.to_le_bytes())
        .collect();
    assert_eq!(units, bytes, "the service sees another path");
}

pub(crate) fn control(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(revoke) = Revoke::decode(data) {
        accepted = true;
        assert!(data.len() <= REVOKE_MAX_LEN);
        let mut out = [0u8; REVOKE_MAX_LEN];
        let len = match revoke {
            Revoke::All => Revoke::encode_all(&mut out),
            Revoke::Requests(ids) => {
                let listed: Vec<u64> = ids.iter().collect();
                assert_eq!(listed.len(), ids.len());
                assert_eq!(listed.is_empty(), ids.is_empty());
                assert!(listed.len() <= MAX_REVOKE_IDS);
                // `contains` on the ends and on two ids that may be absent; every id would make
                // the check quadratic in the count, and the fuzzer slow.
                let ends = [listed.first(), listed.last()].into_iter().flatten();
                for &id in ends {
                    assert!(ids.contains(id));
                }
                for id in [0, u64::MAX] {
                    assert_eq!(ids.contains(id), listed.contains(&id));
                }
                Revoke::encode_requests(&listed, &mut out)
            }
        }
        .unwrap_or_else(|e| panic!("{revoke:?} does not re-encode: {e}"));
        assert_eq!(out[..len], *data, "{revoke:?} re-encodes to other bytes");
    }
    if let Ok(revoked) = Revoked::decode(data) {
        accepted = true;
        assert_eq!(revoked.to_bytes()[..], *data);
    }
    accepted
}
