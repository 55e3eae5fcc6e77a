//! The figures of a whole `cargo bench -p firewall-bench` run, printed together at its end.
//!
//! Each bench target records its summary lines (`name = value`, [`record`]): its *figures*
//! (memory, counts) and its *final lines* (the ratios the run is judged by), in a file of its own
//! under `<target dir>/firewall-bench/`, stamped with the process id of its parent — `cargo`
//! itself, the same for every bench of one `cargo bench` invocation — and then prints every line
//! recorded by the same invocation ([`print()`]): every bench's figures, in the benches' order,
//! then every bench's final lines, in the benches' order. Whichever bench cargo runs last
//! therefore ends the run's output with all of the run's lines, the final ones last; a bench
//! run alone
//! (`--bench classify`) ends with its own. Files left by earlier invocations have another parent
//! and are skipped.
//!
//! The lines are `memory <name> = N`, `ratio <name> = X` and the like: a name, ` = `, a plain
//! number, so that scripts can read them (`grep '^ratio '`).

use std::path::{Path, PathBuf};

/// The bench targets that record lines, in the order their lines are printed.
pub const BENCHES: [&str; 3] = ["classify", "round_trip", "throughput"];

/// Where the summaries of the bench binary `bench_exe` (`<target>/<profile>/deps/<bench>-<hash>`)
/// go: `<target>/firewall-bench`.
pub fn dir(bench_exe: &Path) -> PathBuf {
    let target = bench_exe
        .ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
    target.join("firewall-bench")
}

/// The invocation this process belongs to: its parent's process id (`cargo`'s, under `cargo
/// bench`). 0 where the standard library cannot tell (not Unix): every file then counts.
fn invocation() -> u32 {
    #[cfg(unix)]
    {
        std::os::unix::process::parent_id()
    }
    #[cfg(not(unix))]
    {
        0
    }
}

fn file(dir: &Path, bench: &str) -> PathBuf {
    dir.join(format!("{bench}.summary"))
}

/// Records `figures` and `finals` as bench `bench`'s summary of this invocation (replacing its
/// earlier ones).
pub fn record(
    dir: &Path,
    bench: &str,
    figures: &[String],
    finals: &[String],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = format!("invocation {}\n", invocation());
    for (kind, lines) in [(FIGURE, figures), (FINAL, finals)] {
        for line in lines {
            text.push_str(kind);
            text.push_str(line);
            text.push('\n');
        }
    }
    std::fs::write(file(dir, bench), text)
}

const FIGURE: &str = "figure ";
const FINAL: &str = "final ";

/// Every line recorded by this invocation's benches: the figures in [`BENCHES`] order, then the
/// final lines in [`BENCHES`] order.
pub fn collect(dir: &Path) -> Vec<String> {
    let stamp = format!("invocation {}", invocation());
    let (mut figures, mut finals) = (Vec::new(), Vec::new());
    for bench in BENCHES {
        let Ok(text) = std::fs::read_to_string(file(dir, bench)) else {
            continue;
        };
        let mut recorded = text.lines();
        if recorded.next() != Some(stamp.as_str()) {
            continue;
        }
        for line in recorded {
            if let Some(figure) = line.strip_prefix(FIGURE) {
                figures.push(figure.to_owned());
            } else if let Some(last) = line.strip_prefix(FINAL) {
                finals.push(last.to_owned());
            }
        }
    }
    figures.extend(finals);
    figures
}

/// Prints [`collect`]'s lines under a heading: the end of this bench's output.
pub fn print(dir: &Path) {
    println!("firewall-bench summary (every bench of this cargo invocation so far):");
    for line in collect(dir) {
        println!("{line}");
    }
}
