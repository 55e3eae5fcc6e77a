//! The audit log: one JSON object per decision, one per line ("JSON lines").
//!
//! ```json
//! {"time":"2026-11-24T07:40:00.123Z","request_id":7,"pid":4242,
//!  "image":"\\Device\\HarddiskVolume3\\Windows\\System32\\curl.exe",
//!  "image_dos":"C:\\Windows\\System32\\curl.exe",
//!  "direction":"outbound","protocol":6,"protocol_name":"tcp",
//!  "local":"10.0.0.2:50000","remote":"192.0.2.7:443","verdict":"allow",
//!  "decided_by":"rule 4 \"curl\"","rule_index":4,"rule_name":"curl","cache_seconds":60}
//! ```
//!
//! (shown wrapped; each record is one line). `rule_index` is 1-based, as rules are counted in
//! the file, and `null` with `rule_name` when the default decided (`"decided_by":"default"`).
//! `cache_seconds` is what the reply granted (0: not cached). `image_dos` is the path the rules
//! were matched against. Each record is written with a single `write` and flushed, so a killed
//! service leaves whole lines behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use firewall_protocol::ConnectionRequest;
use serde::{Deserialize, Serialize};

/// One decision, as the audit log records it. See the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the decision was made, RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// The driver's request id.
    pub request_id: u64,
    /// The connecting process.
    pub pid: u64,
    /// The process image as the driver reported it, whole (an NT device path; lossily decoded).
    pub image: String,
    /// The path the rules matched: the DOS path when the device is mapped.
    pub image_dos: String,
    /// `"outbound"` or `"inbound"`.
    pub direction: String,
    /// IANA protocol number.
    pub protocol: u8,
    /// `"tcp"`, `"udp"`, `"icmp"` or `"icmpv6"`; `null` for other numbers.
    pub protocol_name: Option<String>,
    /// Local address and port.
    pub local: String,
    /// Remote address and port.
    pub remote: String,
    /// `"allow"` or `"deny"`.
    pub verdict: String,
    /// `rule N "name"`, `rule N`, or `default`.
    pub decided_by: String,
    /// The deciding rule's 1-based position in the file; `null` for the default.
    pub rule_index: Option<usize>,
    /// The deciding rule's name, if it has one.
    pub rule_name: Option<String>,
    /// The cache lifetime the reply granted; 0 when not cached.
    pub cache_seconds: u32,
}

/// The usual name of IANA protocol `number`, if it has one the rules know.
pub fn protocol_name(number: u8) -> Option<&'static str> {
    use firewall_protocol::ip_protocol::*;
    match number {
        TCP => Some("tcp"),
        UDP => Some("udp"),
        ICMP => Some("icmp"),
        ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

impl AuditRecord {
    /// The record of `request`, decided at `time`: `image_dos` is the path the rules matched,
    /// the rest describes the outcome.
    pub(crate) fn of(request: &ConnectionRequest, time: SystemTime, outcome: Outcome) -> Self {
        AuditRecord {
            time: rfc3339(time),
            request_id: request.request_id,
            pid: request.process_id,
            image: request.image_path.chars_lossy().collect(),
            image_dos: outcome.image_dos,
            direction: request.direction.as_str().to_owned(),
            protocol: request.ip_protocol,
            protocol_name: protocol_name(request.ip_protocol).map(str::to_owned),
            local: SocketAddr::new(request.local_address, request.local_port).to_string(),
            remote: SocketAddr::new(request.remote_address, request.remote_port).to_string(),
            verdict: outcome.verdict.as_str().to_owned(),
            decided_by: outcome.decided_by,
            rule_index: outcome.rule_index,
            rule_name: outcome.rule_name,
            cache_seconds: outcome.cache_seconds,
        }
    }

    /// The record as one line of JSON, without the newline.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What the service decided, for [`AuditRecord::of`].
pub(crate) struct Outcome {
    pub(crate) image_dos: String,
    pub(crate) verdict: firewall_rules::Verdict,
    pub(crate) decided_by: String,
    pub(crate) rule_index: Option<usize>,
    pub(crate) rule_name: Option<String>,
    pub(crate) cache_seconds: u32,
}

/// `time` as RFC 3339 in UTC with milliseconds (`2026-11-24T07:40:00.123Z`). Times before 1970
/// are shown as 1970-01-01T00:00:00.000Z.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Where audit records go: standard output, or a file opened for appending.
#[derive(Debug)]
pub enum AuditLog {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(File),
    /// Nowhere (for tests and tools that only want the decisions).
    Discard,
}

impl AuditLog {
    /// `-` is standard output; anything else a file, created if missing and appended to.
    pub fn open(target: &Path) -> io::Result<AuditLog> {
        if target.as_os_str() == "-" {
            return Ok(AuditLog::Stdout);
        }
        let file = OpenOptions::new().create(true).append(true).open(target)?;
        Ok(AuditLog::File(file))
    }

    /// Appends `record` as one line, in one write, and flushes it.
    pub fn write(&mut self, record: &AuditRecord) -> io::Result<()> {
        let mut line = record.to_json();
        line.push('\n');
        match self {
            AuditLog::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            AuditLog::File(file) => {
                file.write_all(line.as_bytes())?;
                file.flush()
            }
            AuditLog::Discard => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day in a year divisible by 400) 12:34:56.789.
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000Z");
    }
}
