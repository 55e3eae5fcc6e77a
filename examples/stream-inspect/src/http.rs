//! The HTTP/1.x request header this driver looks for: the `Host` header of a request at the
//! start of a flow's outbound data. Plain functions over bytes, with no kernel in them, so they
//! are tested on any input (tests/http.rs).
//!
//! The parser never indexes out of bounds and allocates nothing: it walks at most the bytes it
//! is given, and the driver gives it at most [`SCAN_LIMIT`] of them.

/// How many bytes of a flow's first outbound data are searched for the `Host` header. A request
/// whose `Host` line ends later is not recognised (the flow is permitted). Browsers and HTTP
/// libraries send `Host` right after the request line, well within it.
pub const SCAN_LIMIT: usize = 1024;

/// The longest `Host` value accepted: a DNS name has at most 253 characters, and a port or IPv6
/// brackets add a few.
pub const MAX_HOST: usize = 262;

/// The host named by the `Host` header of the HTTP/1.x request at the start of `data`, without
/// its port; `None` if `data` does not start with a request line, the headers end without a
/// `Host` header, the `Host` line is not complete in `data` (a request cut short), or its value
/// is empty, too long ([`MAX_HOST`]) or not printable ASCII.
///
/// The header name is matched case-insensitively, as HTTP field names are.
pub fn request_host(data: &[u8]) -> Option<&str> {
    let mut rest = data;
    let mut first_line = true;
    loop {
        // A line without its end may be cut short: nothing in it is trusted.
        let end = rest.iter().position(|&byte| byte == b'\n')?;
        let line = rest.get(..end)?;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = rest.get(end + 1..)?;
        if first_line {
            if !is_request_line(line) {
                return None;
            }
            first_line = false;
            continue;
        }
        if line.is_empty() {
            return None; // the end of the headers
        }
        if let Some(value) = header_value(line, b"host") {
            return host_name(value);
        }
    }
}

/// Whether `line` looks like an HTTP/1.x request line: `METHOD target HTTP/1.x`, the method in
/// upper-case letters.
fn is_request_line(line: &[u8]) -> bool {
    let method_length = line
        .iter()
        .take_while(|byte| byte.is_ascii_uppercase())
        .count();
    method_length > 0
        && line.get(method_length) == Some(&b' ')
        && line.windows(7).any(|window| window == b" HTTP/1")
}

/// The value of `line` if it is the header `name` (lower case), spaces and tabs around it
/// trimmed.
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (field, value) = line.split_at_checked(name.len())?;
    if !field.eq_ignore_ascii_case(name) {
        return None;
    }
    let value = value.strip_prefix(b":")?;
    Some(value.trim_ascii())
}

/// The host of a `Host` value: without its port, an IPv6 literal with its brackets.
fn host_name(value: &[u8]) -> Option<&str> {
    if value.is_empty() || value.len() > MAX_HOST || !value.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let host = if value.starts_with(b"[") {
        let close = value.iter().position(|&byte| byte == b']')?;
        value.get(..=close)?
    } else {
        value.split(|&byte| byte == b':').next()?
    };
    if host.is_empty() {
        return None;
    }
    core::str::from_utf8(host).ok()
}

/// Whether `host` is in `denied`, a list of host names separated by commas or white space.
/// Names are compared case-insensitively, without a trailing dot; a name matches itself only,
/// not its subdomains.
pub fn is_denied(host: &str, denied: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    denied
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .map(|name| name.strip_suffix('.').unwrap_or(name))
        .filter(|name| !name.is_empty())
        .any(|name| name.eq_ignore_ascii_case(host))
}
