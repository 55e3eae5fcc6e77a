//! The `Host` parser on its own: what it finds, what it refuses.

use stream_inspect::http::{MAX_HOST, is_denied, request_host};

#[test]
fn finds_the_host_without_its_port() {
    let cases: &[(&[u8], Option<&str>)] = &[
        (
            b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
            Some("example.com"),
        ),
        (
            b"GET / HTTP/1.1\nhost:example.com:8080\n\n",
            Some("example.com"),
        ),
        (
            b"HEAD /x HTTP/1.0\r\nA: b\r\nHOST: \t[2001:db8::1]:80 \r\n",
            Some("[2001:db8::1]"),
        ),
        (b"GET / HTTP/1.1\r\nHost: example.com", None),
        (b"GET / HTTP/1.1\r\nHostname: example.com\r\n\r\n", None),
        (b"GET / HTTP/2\r\nHost: example.com\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", None),
    ];
    for (data, expected) in cases {
        assert_eq!(
            request_host(data),
            *expected,
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
}

#[test]
fn refuses_a_host_longer_than_the_limit() {
    let mut request = b"GET / HTTP/1.1\r\nHost: ".to_vec();
    request.resize(request.len() + MAX_HOST + 1, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    assert_eq!(request_host(&request), None);
}

#[test]
fn deny_lists_match_whole_names_case_insensitively() {
    assert!(is_denied("Tracker.Example", "ads.example,tracker.example"));
    assert!(is_denied("tracker.example.", " tracker.example "));
    assert!(!is_denied("sub.tracker.example", "tracker.example"));
    assert!(!is_denied("tracker.example", ""));
    assert!(!is_denied("", ",,"));
}
