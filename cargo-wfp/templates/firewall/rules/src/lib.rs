//! The example firewall service's rules engine.
//!
//! A policy is a TOML file: a default action and an ordered list of rules. For each connection
//! the **first** rule whose match fields all hold decides; when none matches, the default does.
//!
//! ```toml
//! default = "deny"            # "allow" or "deny"; required
//!
//! [[rule]]
//! name = "browsers"           # optional, shown in decisions and the audit log
//! action = "allow"            # "allow" or "deny"; required
//! app = 'C:\Program Files\**\*.exe'   # optional glob on the DOS path of the process image
//! remote = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]  # optional address, CIDR, or a list
//! port = [80, 443, "8000-8100"]       # optional REMOTE port, "low-high" range, or a list
//! local_port = 22            # optional LOCAL port, same syntax as `port`
//! protocol = "tcp"            # optional: "tcp", "udp", "icmp", "icmpv6", "any", or 0..=255
//! direction = "outbound"      # optional: "outbound", "inbound" or "any"
//! ```
//!
//! A rule with no match fields matches every connection. Every field of a rule must match; a
//! list matches when any of its elements does.
//!
//! # Ports
//!
//! `port` is the **remote** port: the server's port for an outbound connection, but the peer's
//! (usually ephemeral) source port for an inbound one. `local_port` is this machine's port: the
//! listening port for an inbound connection (`local_port = 22` admits SSH), the (usually
//! ephemeral) source port for an outbound one. So an outbound rule names the service it
//! reaches with `port`, and an inbound rule names the service it exposes with `local_port`:
//!
//! ```toml
//! [[rule]]
//! name = "ssh-in"
//! action = "allow"
//! direction = "inbound"
//! protocol = "tcp"
//! local_port = 22             # not `port = 22`: that would match peers whose source port is 22
//! ```
//!
//! Both take a number, a `"low-high"` string (inclusive), or a list of them. Protocols without
//! ports (ICMP) have both ports 0. Unknown keys are errors, as are wrong types,
//! bad addresses or prefixes, reversed or out-of-range ports, bad globs and unknown actions,
//! protocols or directions. Every error carries the line and column (1-based, columns counted
//! in characters) of the offending key or value: `rules.toml:12:9: port range 9000-8000 is
//! reversed`.
//!
//! # Globs
//!
//! `app` is matched case-insensitively against the whole DOS path (`C:\windows\system32\curl.exe`).
//! `/` and `\` are the same separator. `?` matches one character other than a separator, `*`
//! any run of characters other than a separator, and `**` any run of characters including
//! separators (so `**\curl.exe` matches `curl.exe` in any folder, and `C:\tools\**` everything
//! under `C:\tools`). `***`, and the reserved characters `[ ] { }`, are errors. A connection
//! whose image path is unknown (empty) matches only a glob that matches the empty string (`*`
//! or `**`).
//!
//! # Addresses
//!
//! The remote address of a connection is canonicalized first (an IPv4-mapped IPv6 address
//! `::ffff:a.b.c.d` is matched as the IPv4 address `a.b.c.d`). An IPv4 CIDR never matches an
//! IPv6 address, nor the other way round. Host bits below the prefix are ignored
//! (`10.1.2.3/8` means `10.0.0.0/8`).
//!
//! # Connections and device paths
//!
//! The engine decides on its own [`Connection`], which the service builds from the driver's
//! `firewall_protocol::ConnectionRequest`: `app` from `image_path` through
//! [`VolumeMap::to_dos_path`], `remote` from `remote_address`, `port` from `remote_port`,
//! `local_port` from `local_port`, `protocol` from `ip_protocol`, and `direction` mapped one to one. The crate deliberately does
//! not depend on `firewall-protocol` (and so on `wfp-rs`): it is plain `std` + `toml`, and builds
//! and tests the same on every target, whatever features the rest of the workspace turns on in
//! `wfp-rs`. Its [`Verdict`] and [`Direction`] mirror the protocol's enums.
//!
//! The driver reports the process image as an NT device path
//! (`\device\harddiskvolume3\windows\system32\curl.exe`); a [`VolumeMap`] turns it into the
//! DOS path (`C:\windows\system32\curl.exe`) that rules are written against.
//!
//! # Caching decisions
//!
//! The example driver caches a verdict per process, image, direction, protocol and remote
//! endpoint: every field a rule matches except the local port. A decision that a different
//! local port could change must not be cached under that key; [`Decision::local_port_matters`]
//! says when that is so.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The file name [`Rules::parse`] uses in its errors.
pub const DEFAULT_FILE_NAME: &str = "rules.toml";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A rules file that could not be parsed: where, and why.
///
/// Displays as `FILE:LINE:COLUMN: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesError {
    /// The file name shown in the message.
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub column: usize,
    /// What is wrong, without the location.
    pub message: String,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for RulesError {}

/// An error before the location is resolved: byte offset and message.
struct At(usize, String);

fn at<T>(span: &Range<usize>, message: impl Into<String>) -> Result<T, At> {
    Err(At(span.start, message.into()))
}

/// 1-based (line, column in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

// ---------------------------------------------------------------------------------------------
// Volume map and connections
// ---------------------------------------------------------------------------------------------

/// NT device names to drive letters, for turning image paths into DOS paths.
///
/// On Windows the service fills it from `QueryDosDevice` for each drive letter (`C:` →
/// `\Device\HarddiskVolume3`); tests and the simulator build it with [`VolumeMap::insert`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeMap {
    /// (lower-case device name without trailing `\`, upper-case drive letter).
    entries: Vec<(String, char)>,
}

impl VolumeMap {
    /// An empty map: every path is left as it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` (such as `\Device\HarddiskVolume3`, any case) to drive `letter`
    /// (such as `'C'`). A later mapping of the same device replaces the earlier one.
    pub fn insert(&mut self, device: &str, letter: char) {
        let device = device.trim_end_matches('\\').to_lowercase();
        let letter = letter.to_ascii_uppercase();
        self.entries.retain(|(d, _)| *d != device);
        self.entries.push((device, letter));
    }

    /// `path` with its device prefix replaced by the drive (`\device\harddiskvolume3\x.exe` →
    /// `C:\x.exe`); a path on no mapped device is returned unchanged.
    pub fn to_dos_path(&self, path: &str) -> String {
        for (device, letter) in &self.entries {
            let Some(head) = path.get(..device.len()) else {
                continue;
            };
            let rest = &path[device.len()..];
            if head.to_lowercase() == *device && (rest.is_empty() || rest.starts_with('\\')) {
                return format!("{letter}:{rest}");
            }
        }
        path.to_owned()
    }
}

/// What the rules decide on: one connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The process image as a DOS path (`C:\windows\system32\curl.exe`), or as the driver
    /// reported it when its device is not mapped; empty when unknown.
    pub app: String,
    /// The remote address.
    pub remote: IpAddr,
    /// The remote port (0 for protocols without ports): the server's port for an outbound
    /// connection, the peer's source port for an inbound one. Rules match it with `port`.
    pub port: u16,
    /// The local port (0 for protocols without ports): the listening port for an inbound
    /// connection, the source port for an outbound one. Rules match it with `local_port`.
    pub local_port: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// Outbound or inbound.
    pub direction: Direction,
}

/// Which way a connection goes, seen from this machine (mirrors `firewall_protocol::Direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This machine connects out.
    Outbound,
    /// A remote peer connects in.
    Inbound,
}

impl Direction {
    /// `"outbound"` or `"inbound"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule's action and a decision's outcome (mirrors `firewall_protocol::Verdict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the connection through.
    Allow,
    /// Block it.
    Deny,
}

impl Verdict {
    /// `"allow"` or `"deny"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IANA numbers of the protocols the rules file names.
pub mod ip_protocol {
    /// ICMP for IPv4 (`"icmp"`).
    pub const ICMP: u8 = 1;
    /// TCP (`"tcp"`).
    pub const TCP: u8 = 6;
    /// UDP (`"udp"`).
    pub const UDP: u8 = 17;
    /// ICMP for IPv6 (`"icmpv6"`).
    pub const ICMPV6: u8 = 58;
}

// ---------------------------------------------------------------------------------------------
// Match fields
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum GlobToken {
    Char(char),
    One,
    Star,
    DoubleStar,
}

/// A compiled `app` pattern (see the [crate documentation](crate#globs)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<GlobToken>,
}

fn fold(c: char) -> char {
    if c == '/' {
        '\\'
    } else {
        c.to_lowercase().next().unwrap_or(c)
    }
}

impl Glob {
    /// Compiles `pattern`, or says what is wrong with it.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty glob".into());
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => {
                    let run = chars[i..].iter().take_while(|&&c| c == '*').count();
                    if run > 2 {
                        return Err(format!("bad glob `{pattern}`: `***` is not allowed"));
                    }
                    tokens.push(if run == 2 {
                        GlobToken::DoubleStar
                    } else {
                        GlobToken::Star
                    });
                    i += run;
                    continue;
                }
                '?' => tokens.push(GlobToken::One),
                c @ ('[' | ']' | '{' | '}') => {
                    return Err(format!("bad glob `{pattern}`: `{c}` is reserved"));
                }
                c => tokens.push(GlobToken::Char(fold(c))),
            }
            i += 1;
        }
        Ok(Glob {
            source: pattern.to_owned(),
            tokens,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` matches, case-insensitively, as a whole.
    pub fn matches(&self, path: &str) -> bool {
        let text: Vec<char> = path.chars().map(fold).collect();
        // reach[j]: the tokens so far can match text[..j].
        let mut reach = vec![false; text.len() + 1];
        reach[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; text.len() + 1];
            match token {
                GlobToken::Char(c) => {
                    for j in 0..text.len() {
                        next[j + 1] = reach[j] && text[j] == *c;
                    }
                }
                GlobToken::One => {
                    for j in 0..text.len() {
                        next[j + 1] = reach[j] && text[j] != '\\';
                    }
                }
                GlobToken::Star => {
                    next[0] = reach[0];
                    for j in 0..text.len() {
                        next[j + 1] = reach[j + 1] || (next[j] && text[j] != '\\');
                    }
                }
                GlobToken::DoubleStar => {
                    next[0] = reach[0];
                    for j in 0..text.len() {
                        next[j + 1] = reach[j + 1] || next[j];
                    }
                }
            }
            reach = next;
        }
        reach[text.len()]
    }
}

/// An address block: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or `x::y/n`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("bad prefix length in `{text}`: must be 0 to {max}")),
            },
        };
        Ok(Cidr { address, prefix })
    }

    /// Whether `address` (not canonicalized here) lies in the block.
    pub fn contains(&self, address: IpAddr) -> bool {
        let (net, addr, bits) = match (self.address, address) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                (u128::from(n.to_bits()), u128::from(a.to_bits()), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => (n.to_bits(), a.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= 128 || (net >> shift) == (addr >> shift)
    }
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The rule's `name`, if it has one.
    pub name: Option<String>,
    /// What the rule decides when it matches.
    pub action: Verdict,
    /// The 1-based line of the rule's `[[rule]]` header (or first key).
    pub line: usize,
    app: Option<Glob>,
    remote: Option<Vec<Cidr>>,
    ports: Option<Vec<(u16, u16)>>,
    local_ports: Option<Vec<(u16, u16)>>,
    protocol: Option<u8>,
    direction: Option<Direction>,
}

fn in_ranges(ranges: Option<&Vec<(u16, u16)>>, port: u16) -> bool {
    ranges.is_none_or(|rs| rs.iter().any(|&(lo, hi)| (lo..=hi).contains(&port)))
}

impl Rule {
    /// Whether every match field of the rule holds for `connection`.
    pub fn matches(&self, connection: &Connection) -> bool {
        self.matches_but_local_port(connection)
            && in_ranges(self.local_ports.as_ref(), connection.local_port)
    }

    /// Every field but `local_port` holds.
    fn matches_but_local_port(&self, connection: &Connection) -> bool {
        let remote = connection.remote.to_canonical();
        self.direction.is_none_or(|d| d == connection.direction)
            && self.protocol.is_none_or(|p| p == connection.protocol)
            && in_ranges(self.ports.as_ref(), connection.port)
            && self
                .remote
                .as_ref()
                .is_none_or(|cs| cs.iter().any(|c| c.contains(remote)))
            && self.app.as_ref().is_none_or(|g| g.matches(&connection.app))
    }
}

// ---------------------------------------------------------------------------------------------
// Policy and decisions
// ---------------------------------------------------------------------------------------------

/// A parsed policy: the ordered rules and the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    default: Verdict,
    rules: Vec<Rule>,
}

/// What decided a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy<'r> {
    /// The rule at `index` (0-based, in file order), with its name if it has one.
    Rule {
        /// 0-based position of the rule in the file.
        index: usize,
        /// The rule's `name`.
        name: Option<&'r str>,
    },
    /// No rule matched; the policy's default applied.
    Default,
}

/// The outcome of [`Rules::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'r> {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Which rule, or the default, decided.
    pub by: DecidedBy<'r>,
    /// Whether the same connection from or to another local port might be decided otherwise: a
    /// rule tried names `local_port`, and its other fields hold (so its `local_port` alone made
    /// it match or not). A verdict cached without the local port in its key (as the example
    /// driver's is) must not be cached when this is `true`.
    pub local_port_matters: bool,
}

impl Rules {
    /// Parses a rules file; errors name the file [`DEFAULT_FILE_NAME`].
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        Self::parse_named(DEFAULT_FILE_NAME, text)
    }

    /// Parses a rules file; errors name the file `file`.
    pub fn parse_named(file: &str, text: &str) -> Result<Rules, RulesError> {
        let error = |offset: usize, message: String| {
            let (line, column) = line_column(text, offset);
            RulesError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        let document = DeTable::parse(text).map_err(|e| {
            error(
                e.span().map_or(0, |s| s.start),
                e.message().trim_end().to_owned(),
            )
        })?;
        parse_document(text, document.get_ref())
            .map_err(|At(offset, message)| error(offset, message))
    }

    /// The policy's default action.
    pub fn default_action(&self) -> Verdict {
        self.default
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first matching rule's action, or the default.
    pub fn decide(&self, connection: &Connection) -> Decision<'_> {
        let mut local_port_matters = false;
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.matches_but_local_port(connection) {
                continue;
            }
            // Conservative for a `local_port` covering every port: it is counted all the same.
            local_port_matters |= rule.local_ports.is_some();
            if in_ranges(rule.local_ports.as_ref(), connection.local_port) {
                return Decision {
                    verdict: rule.action,
                    by: DecidedBy::Rule {
                        index,
                        name: rule.name.as_deref(),
                    },
                    local_port_matters,
                };
            }
        }
        Decision {
            verdict: self.default,
            by: DecidedBy::Default,
            local_port_matters,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

type Value<'i> = Spanned<DeValue<'i>>;

fn parse_document(text: &str, table: &DeTable<'_>) -> Result<Rules, At> {
    let mut default = None;
    let mut rules = Vec::new();
    for (key, value) in table {
        match key.get_ref().as_ref() {
            "default" => default = Some(parse_action(value, "default")?),
            "rule" => {
                let DeValue::Array(array) = value.get_ref() else {
                    return at(
                        &value.span(),
                        "`rule` must be an array of tables (`[[rule]]`)",
                    );
                };
                for item in array.iter() {
                    let DeValue::Table(t) = item.get_ref() else {
                        return at(&item.span(), "each `rule` must be a table (`[[rule]]`)");
                    };
                    rules.push(parse_rule(text, &item.span(), t)?);
                }
            }
            other => {
                return at(
                    &key.span(),
                    format!("unknown key `{other}` (expected `default` or `rule`)"),
                );
            }
        }
    }
    let Some(default) = default else {
        return at(
            &(0..0),
            "missing `default = \"allow\"` or `default = \"deny\"`",
        );
    };
    rules.sort_by_key(|r: &(usize, Rule)| r.0);
    Ok(Rules {
        default,
        rules: rules.into_iter().map(|(_, r)| r).collect(),
    })
}

fn parse_action(value: &Value<'_>, key: &str) -> Result<Verdict, At> {
    match value.get_ref() {
        DeValue::String(s) if s == "allow" => Ok(Verdict::Allow),
        DeValue::String(s) if s == "deny" => Ok(Verdict::Deny),
        DeValue::String(s) => at(
            &value.span(),
            format!("unknown {key} `{s}` (expected \"allow\" or \"deny\")"),
        ),
        other => at(
            &value.span(),
            format!(
                "`{key}` must be \"allow\" or \"deny\", found {}",
                other.type_str()
            ),
        ),
    }
}

fn string<'a>(value: &'a Value<'_>, key: &str) -> Result<&'a str, At> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s),
        other => at(
            &value.span(),
            format!("`{key}` must be a string, found {}", other.type_str()),
        ),
    }
}

/// A value or an array of them, each with its span; an empty array is an error.
fn one_or_many<'a, 'i>(value: &'a Value<'i>, key: &str) -> Result<Vec<&'a Value<'i>>, At> {
    match value.get_ref() {
        DeValue::Array(array) => {
            let items: Vec<_> = array.iter().collect();
            if items.is_empty() {
                return at(
                    &value.span(),
                    format!("`{key}` is an empty list, which matches nothing"),
                );
            }
            Ok(items)
        }
        _ => Ok(vec![value]),
    }
}

/// Returns (byte offset of the rule, rule) so rules keep file order.
fn parse_rule(text: &str, span: &Range<usize>, table: &DeTable<'_>) -> Result<(usize, Rule), At> {
    let mut rule = Rule {
        name: None,
        action: Verdict::Deny,
        line: line_column(text, span.start).0,
        app: None,
        remote: None,
        ports: None,
        local_ports: None,
        protocol: None,
        direction: None,
    };
    let mut action = None;
    for (key, value) in table {
        let vspan = value.span();
        match key.get_ref().as_ref() {
            "name" => rule.name = Some(string(value, "name")?.to_owned()),
            "action" => action = Some(parse_action(value, "action")?),
            "app" => rule.app = Some(Glob::new(string(value, "app")?).or_else(|m| at(&vspan, m))?),
            "remote" => {
                let mut cidrs = Vec::new();
                for item in one_or_many(value, "remote")? {
                    let s = string(item, "remote")?;
                    cidrs.push(Cidr::parse(s).or_else(|m| at(&item.span(), m))?);
                }
                rule.remote = Some(cidrs);
            }
            key @ ("port" | "local_port") => {
                let mut ports = Vec::new();
                for item in one_or_many(value, key)? {
                    ports.push(parse_port(item, key)?);
                }
                if key == "port" {
                    rule.ports = Some(ports);
                } else {
                    rule.local_ports = Some(ports);
                }
            }
            "protocol" => rule.protocol = parse_protocol(value)?,
            "direction" => {
                rule.direction = match string(value, "direction")? {
                    "outbound" => Some(Direction::Outbound),
                    "inbound" => Some(Direction::Inbound),
                    "any" => None,
                    other => {
                        return at(
                            &vspan,
                            format!(
                                "unknown direction `{other}` (expected \"outbound\", \"inbound\" or \"any\")"
                            ),
                        );
                    }
                }
            }
            other => {
                return at(
                    &key.span(),
                    format!(
                        "unknown key `{other}` in rule (expected name, action, app, remote, port, local_port, protocol or direction)"
                    ),
                );
            }
        }
    }
    match action {
        Some(a) => rule.action = a,
        None => return at(span, "rule has no `action` (\"allow\" or \"deny\")"),
    }
    Ok((span.start, rule))
}

fn integer(value: &Value<'_>) -> Option<i128> {
    match value.get_ref() {
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix()).ok(),
        _ => None,
    }
}

/// One element of `port` or `local_port` (`key`, for the messages).
fn parse_port(value: &Value<'_>, key: &str) -> Result<(u16, u16), At> {
    let span = value.span();
    let number = |s: &str| -> Result<u16, At> {
        s.trim()
            .parse::<u16>()
            .or_else(|_| at(&span, format!("`{s}` is not a port (0 to 65535)")))
    };
    match value.get_ref() {
        DeValue::Integer(_) => match integer(value).and_then(|n| u16::try_from(n).ok()) {
            Some(p) => Ok((p, p)),
            None => at(&span, format!("{key} out of range (0 to 65535)")),
        },
        DeValue::String(s) => match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return at(&span, format!("{key} range {lo}-{hi} is reversed"));
                }
                Ok((lo, hi))
            }
            None => number(s).map(|p| (p, p)),
        },
        other => at(
            &span,
            format!(
                "`{key}` must be a number or a \"low-high\" string, found {}",
                other.type_str()
            ),
        ),
    }
}

fn parse_protocol(value: &Value<'_>) -> Result<Option<u8>, At> {
    let span = value.span();
    match value.get_ref() {
        DeValue::String(s) => match s.as_ref() {
            "tcp" => Ok(Some(ip_protocol::TCP)),
            "udp" => Ok(Some(ip_protocol::UDP)),
            "icmp" => Ok(Some(ip_protocol::ICMP)),
            "icmpv6" => Ok(Some(ip_protocol::ICMPV6)),
            "any" => Ok(None),
            other => at(
                &span,
                format!(
                    "unknown protocol `{other}` (expected tcp, udp, icmp, icmpv6, any or 0 to 255)"
                ),
            ),
        },
        DeValue::Integer(_) => match integer(value).and_then(|n| u8::try_from(n).ok()) {
            Some(p) => Ok(Some(p)),
            None => at(&span, "protocol number out of range (0 to 255)"),
        },
        other => at(
            &span,
            format!(
                "`protocol` must be a name or a number, found {}",
                other.type_str()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let text = "ab\ncé d";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, text.find('d').unwrap()), (2, 4));
    }

    #[test]
    fn cidr_edges() {
        let any = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(any.contains("1.2.3.4".parse().unwrap()));
        assert!(!any.contains("::1".parse().unwrap()));
        let all6 = Cidr::parse("::/0").unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()));
    }
}
