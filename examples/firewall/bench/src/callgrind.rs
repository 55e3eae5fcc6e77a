//! Instructions per cache hit, counted by callgrind (valgrind's instruction-counting tool):
//! benchmark (a)'s figure that does not depend on the machine's load.
//!
//! The bench binary runs itself under valgrind, once per variant and call count, as
//!
//! ```text
//! FIREWALL_BENCH_CALLGRIND=<sdk|raw>:<calls> valgrind --tool=callgrind \
//!     --collect-atstart=no --toggle-collect='<the variant's classifyFn>' \
//!     --callgrind-out-file=<file> <the bench binary>
//! ```
//!
//! and the child ([`child`]) prepares its machine, makes `<calls>` direct cache-hit calls of the
//! variant's classifyFn, and exits. `--collect-atstart=no` with `--toggle-collect` counts only
//! the instructions executed inside the classifyFn (the SDK's `classify_trampoline`, or the raw
//! baseline's `classify`) and what it calls: not the harness, not the simulator's call of the
//! classifyFn, not setup. The classifyFn also runs during setup (the SDK's first connection is
//! pended, asked and reauthorized; each machine makes one checked call), so each variant runs
//! twice, with [`SMALL`] and [`LARGE`] calls, and the instructions per hit are the difference
//! divided by the difference in calls: setup cancels out exactly, whatever it costs.

use std::path::{Path, PathBuf};
use std::process::Command;

use wfp_rs::classify::Action;

use crate::hit::{HitMachine, Variant};

/// The environment variable that makes a bench binary a callgrind child: `sdk:<calls>` or
/// `raw:<calls>`.
pub const CHILD_VAR: &str = "FIREWALL_BENCH_CALLGRIND";

/// The call counts of the two runs per variant.
pub const SMALL: u64 = 1_000;
/// See [`SMALL`].
pub const LARGE: u64 = 11_000;

/// The function callgrind counts in, for each variant: its classifyFn, by demangled name
/// (callgrind matches `--toggle-collect` against demangled names; `*` is a wildcard).
fn classify_fn(variant: Variant) -> &'static str {
    match variant {
        Variant::Sdk => "wfp_rs::callout::classify_trampoline*",
        Variant::Raw => "firewall_bench::raw_lookup::classify*",
    }
}

fn name(variant: Variant) -> &'static str {
    match variant {
        Variant::Sdk => "sdk",
        Variant::Raw => "raw",
    }
}

/// If this process is a callgrind child (see the [module documentation](self)), runs its calls
/// and returns `true`: the bench's `main` then returns at once.
pub fn child() -> bool {
    let Ok(request) = std::env::var(CHILD_VAR) else {
        return false;
    };
    let (variant, calls) = request
        .split_once(':')
        .and_then(|(variant, calls)| {
            let variant = match variant {
                "sdk" => Variant::Sdk,
                "raw" => Variant::Raw,
                _ => return None,
            };
            Some((variant, calls.parse::<u64>().ok()?))
        })
        .unwrap_or_else(|| panic!("{CHILD_VAR}={request}: expected sdk:<calls> or raw:<calls>"));
    let m = HitMachine::start(variant);
    let before = m.hits();
    let mut direct = m.direct();
    m.machine().at_dispatch(|irql| {
        for _ in 0..calls {
            assert_eq!(direct.call(irql), Action::Permit);
        }
    });
    assert_eq!(m.hits() - before, calls, "every call hit the cache");
    drop(direct);
    m.finish();
    true
}

/// Instructions per cache hit of the SDK's and the raw baseline's classifyFn.
#[derive(Clone, Copy, Debug)]
pub struct PerHit {
    /// The firewall's outbound callout through the SDK's `classify_trampoline`.
    pub sdk: f64,
    /// The raw C-style classifyFn ([`crate::raw_lookup`]).
    pub raw: f64,
}

impl PerHit {
    /// SDK over raw.
    pub fn ratio(&self) -> f64 {
        self.sdk / self.raw
    }
}

/// Why the instructions could not be counted.
#[derive(Debug)]
pub enum Error {
    /// `valgrind` could not be started (not installed?).
    NoValgrind(std::io::Error),
    /// An output file or its folder could not be written or read.
    Io(PathBuf, std::io::Error),
    /// A child failed; its stderr's tail.
    Child(String),
    /// Callgrind's output had no `summary:` or `totals:` line.
    NoTotal(PathBuf),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NoValgrind(e) => write!(
                f,
                "valgrind could not be run ({e}); install it (Debian: apt-get install valgrind)"
            ),
            Error::Io(path, e) => write!(f, "{}: {e}", path.display()),
            Error::Child(tail) => write!(f, "the callgrind run failed:\n{tail}"),
            Error::NoTotal(path) => write!(f, "no instruction total in {}", path.display()),
        }
    }
}

/// Counts both variants' instructions per hit: four runs of `bench_exe` (this bench binary)
/// under callgrind, output files in `out_dir`.
pub fn measure(bench_exe: &Path, out_dir: &Path) -> Result<PerHit, Error> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Io(out_dir.to_path_buf(), e))?;
    let per_hit = |variant| -> Result<f64, Error> {
        let small = run(bench_exe, out_dir, variant, SMALL)?;
        let large = run(bench_exe, out_dir, variant, LARGE)?;
        Ok((large as f64 - small as f64) / (LARGE - SMALL) as f64)
    };
    Ok(PerHit {
        sdk: per_hit(Variant::Sdk)?,
        raw: per_hit(Variant::Raw)?,
    })
}

/// The callgrind output file of a run.
pub fn out_file(out_dir: &Path, variant: Variant, calls: u64) -> PathBuf {
    out_dir.join(format!("callgrind.{}.{calls}.out", name(variant)))
}

/// One run: the instructions callgrind counted in the variant's classifyFn.
fn run(bench_exe: &Path, out_dir: &Path, variant: Variant, calls: u64) -> Result<u64, Error> {
    let out = out_file(out_dir, variant, calls);
    let output = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--collect-atstart=no")
        .arg(format!("--toggle-collect={}", classify_fn(variant)))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .env(CHILD_VAR, format!("{}:{calls}", name(variant)))
        .arg(bench_exe)
        .output()
        .map_err(Error::NoValgrind)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        return Err(Error::Child(format!("{}\n{tail}", output.status)));
    }
    total(&out)
}

/// The instruction total of a callgrind output file (its `summary:` line, or `totals:`).
fn total(out: &Path) -> Result<u64, Error> {
    let text = std::fs::read_to_string(out).map_err(|e| Error::Io(out.to_path_buf(), e))?;
    text.lines()
        .find_map(|line| {
            let rest = line
                .strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| Error::NoTotal(out.to_path_buf()))
}
