//! The example firewall's rules file and its globs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_rules::{
    Connection, DEFAULT_FILE_NAME, DecidedBy, Direction, Glob, Rules, RulesError, ip_protocol,
};

/// Splits the fuzzer's bytes at the first NUL: text (lossily UTF-8) before, the rest after.
fn split(data: &[u8]) -> (String, &[u8]) {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    (String::from_utf8_lossy(text).into_owned(), rest)
}

pub(crate) fn rules(data: &[u8]) -> bool {
    let (text, rest) = split(data);
    let rules = match Rules::parse(&text) {
        Ok(rules) => rules,
        Err(error) => {
            check_error(&text, &error);
            return false;
        }
    };
    let lines = text.split('\n').count();
    let mut previous = 1;
    for rule in rules.rules() {
        assert!(
            (previous..=lines).contains(&rule.line),
            "rule at line {} after line {previous}, in a file of {lines} lines",
            rule.line
        );
        previous = rule.line;
    }
    for connection in connections(rest).chain(fixed_connections()) {
        check_decision(&rules, &connection);
    }
    true
}

/// An error points at a character of the text (or just past a line's end) and says something.
fn check_error(text: &str, error: &RulesError) {
    assert_eq!(error.file, DEFAULT_FILE_NAME);
    assert!(!error.message.is_empty(), "an error without a message");
    assert!(error.line >= 1 && error.column >= 1, "{error}");
    let line = text
        .split('\n')
        .nth(error.line - 1)
        .unwrap_or_else(|| panic!("{error}: the text has no line {}", error.line));
    assert!(
        error.column <= line.chars().count() + 1,
        "{error}: line {} has {} characters",
        error.line,
        line.chars().count()
    );
    assert!(error.to_string().starts_with(&format!(
        "{DEFAULT_FILE_NAME}:{}:{}: ",
        error.line, error.column
    )));
}

/// The connections the fuzzer describes after the text, up to 16: a flags byte (bit 0 inbound,
/// bit 1 IPv6), the protocol, the remote and local ports (u16 LE), the remote address (4 or 16
/// bytes), an image path length and that many bytes of path.
fn connections(mut bytes: &[u8]) -> impl Iterator<Item = Connection> + '_ {
    std::iter::from_fn(move || {
        let (&[flags, protocol, p0, p1, l0, l1], rest) = bytes.split_first_chunk::<6>()?;
        let (remote, rest) = if flags & 2 == 0 {
            let (octets, rest) = rest.split_first_chunk::<4>()?;
            (IpAddr::V4(Ipv4Addr::from(*octets)), rest)
        } else {
            let (octets, rest) = rest.split_first_chunk::<16>()?;
            (IpAddr::V6(Ipv6Addr::from(*octets)), rest)
        };
        let (&len, rest) = rest.split_first()?;
        let (app, rest) = rest.split_at_checked(usize::from(len))?;
        bytes = rest;
        Some(Connection {
            app: String::from_utf8_lossy(app).into_owned(),
            remote,
            port: u16::from_le_bytes([p0, p1]),
            local_port: u16::from_le_bytes([l0, l1]),
            protocol,
            direction: if flags & 1 == 0 {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
        })
    })
    .take(16)
}

/// A few connections every parsed file is asked about, whatever follows the text.
fn fixed_connections() -> impl Iterator<Item = Connection> {
    let connection =
        |app: &str, remote: IpAddr, port, local_port, protocol, direction| Connection {
            app: app.to_owned(),
            remote,
            port,
            local_port,
            protocol,
            direction,
        };
    [
        connection(
            r"C:\Windows\System32\curl.exe",
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            443,
            50_000,
            ip_protocol::TCP,
            Direction::Outbound,
        ),
        connection(
            r"C:\Program Files\Browser\browser.exe",
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            80,
            50_001,
            ip_protocol::TCP,
            Direction::Outbound,
        ),
        connection(
            r"C:\Windows\System32\svchost.exe",
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            53,
            53_000,
            ip_protocol::UDP,
            Direction::Outbound,
        ),
        connection(
            "",
            IpAddr::V6(Ipv4Addr::new(10, 0, 0, 9).to_ipv6_mapped()),
            40_000,
            22,
            ip_protocol::TCP,
            Direction::Inbound,
        ),
        connection(
            r"\device\harddiskvolume3\tools\ping.exe",
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
            0,
            0,
            ip_protocol::ICMP,
            Direction::Outbound,
        ),
    ]
    .into_iter()
}

/// The decision is the first matching rule's (or the default), and does not change where the
/// documentation says nothing that changed can matter.
fn check_decision(rules: &Rules, connection: &Connection) {
    let decision = rules.decide(connection);
    let first = rules
        .rules()
        .iter()
        .position(|rule| rule.matches(connection));
    match (decision.by, first) {
        (DecidedBy::Rule { index, name }, Some(first)) => {
            let rule = &rules.rules()[first];
            assert_eq!(
                index, first,
                "decided by a rule that is not the first match"
            );
            assert_eq!(name, rule.name.as_deref());
            assert_eq!(decision.verdict, rule.action);
        }
        (DecidedBy::Default, None) => assert_eq!(decision.verdict, rules.default_action()),
        (by, first) => panic!("decided by {by:?}, first matching rule {first:?}: {connection:?}"),
    }
    let outcome = |other: &Connection| {
        let decision = rules.decide(other);
        (decision.verdict, decision.by)
    };
    let this = (decision.verdict, decision.by);
    // What the driver's cache relies on: a decision that says the local port does not matter
    // is the same for every local port.
    if !decision.local_port_matters {
        let local = connection.local_port;
        for local_port in [
            0,
            1,
            22,
            443,
            u16::MAX,
            local.wrapping_add(1),
            local.wrapping_sub(1),
        ] {
            let other = Connection {
                local_port,
                ..connection.clone()
            };
            assert_eq!(
                outcome(&other),
                this,
                "local_port_matters is false, but local port {local_port} decides otherwise: {connection:?}"
            );
        }
    }
    // An IPv4 address is matched as its IPv4-mapped IPv6 form is.
    if let IpAddr::V4(v4) = connection.remote {
        let mapped = Connection {
            remote: IpAddr::V6(v4.to_ipv6_mapped()),
            ..connection.clone()
        };
        assert_eq!(outcome(&mapped), this, "the mapped form decides otherwise");
    }
    // Image paths are matched ignoring case, with `/` and `\` the same.
    let folded = Connection {
        app: connection.app.to_ascii_uppercase().replace('/', "\\"),
        ..connection.clone()
    };
    assert_eq!(
        outcome(&folded),
        this,
        "the path in other case or separators decides otherwise"
    );
}

pub(crate) fn glob(data: &[u8]) -> bool {
    let (pattern, rest) = split(data);
    let documented_error =
        pattern.is_empty() || pattern.contains("***") || pattern.contains(['[', ']', '{', '}']);
    let glob = match Glob::new(&pattern) {
        Ok(glob) => glob,
        Err(message) => {
            assert!(
                documented_error,
                "`{pattern}` refused for no documented reason: {message}"
            );
            return false;
        }
    };
    assert!(!documented_error, "`{pattern}` compiled");
    assert_eq!(glob.as_str(), pattern);
    if !pattern.contains(['*', '?']) {
        assert!(glob.matches(&pattern), "`{pattern}` does not match itself");
    }
    for path in rest.split(|&b| b == 0).take(8) {
        let path = String::from_utf8_lossy(path);
        let matched = glob.matches(&path);
        if let Some(expected) = backtracking_match(&pattern, &path) {
            assert_eq!(matched, expected, "`{pattern}` against `{path}`");
        }
    }
    true
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    One,
    Star,
    DoubleStar,
}

/// The case and separator folding the documentation describes.
fn fold(c: char) -> char {
    if c == '/' {
        '\\'
    } else {
        c.to_lowercase().next().unwrap_or(c)
    }
}

/// Whether `path` matches `pattern`, by memoized backtracking over the pattern's tokens: an
/// independent reading of the documented glob rules. `None` for inputs too large to be worth it.
fn backtracking_match(pattern: &str, path: &str) -> Option<bool> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        tokens.push(match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 1;
                Token::DoubleStar
            }
            '*' => Token::Star,
            '?' => Token::One,
            c => Token::Char(fold(c)),
        });
        i += 1;
    }
    let text: Vec<char> = path.chars().map(fold).collect();
    if tokens.len() > 256 || text.len() > 256 {
        return None;
    }
    let mut memo = vec![None; (tokens.len() + 1) * (text.len() + 1)];
    Some(matches_from(&tokens, &text, 0, 0, &mut memo))
}

fn matches_from(
    tokens: &[Token],
    text: &[char],
    t: usize,
    c: usize,
    memo: &mut [Option<bool>],
) -> bool {
    let key = t * (text.len() + 1) + c;
    if let Some(known) = memo[key] {
        return known;
    }
    let next = text.get(c).copied();
    let result = match tokens.get(t) {
        None => next.is_none(),
        Some(Token::Char(want)) => {
            next == Some(*want) && matches_from(tokens, text, t + 1, c + 1, memo)
        }
        Some(Token::One) => {
            next.is_some_and(|ch| ch != '\\') && matches_from(tokens, text, t + 1, c + 1, memo)
        }
        Some(Token::Star) => {
            matches_from(tokens, text, t + 1, c, memo)
                || (next.is_some_and(|ch| ch != '\\') && matches_from(tokens, text, t, c + 1, memo))
        }
        Some(Token::DoubleStar) => {
            matches_from(tokens, text, t + 1, c, memo)
                || (next.is_some() && matches_from(tokens, text, t, c + 1, memo))
        }
    };
    memo[key] = Some(result);
    result
}
