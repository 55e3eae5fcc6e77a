//! docs/getting-started.md, run: every command of its ```sh blocks (and `$ ` lines of its
//! ```console blocks) in order, in an empty temporary folder, and every block it marks as a file
//! to write (`<!-- file: PATH -->`), an edit to make (`<!-- edit: PATH -->` before a ```diff
//! block), a part of a file to check (`<!-- excerpt: PATH -->`, with `// ...` for lines left
//! out) or a drawing of a folder's files to check (`<!-- tree: DIR -->`), at its place among the
//! commands. The guide fails this test if a command fails, if an
//! edit does not apply, if an excerpt is not in the file, if a file it writes does not compile
//! (the guide's own `cargo test` and `cargo wfp build` build it), or if a `#[test]` of a file
//! it writes is not listed as passed by a later `cargo test`. Paths the guide names
//! (`target/.../blocker.sys`, `target/wfp-package/blocker`) must be the ones `cargo wfp build`
//! and `cargo wfp package` print.
//!
//! The ```bat blocks (the Windows test machine) are not run. Each of their lines whose program
//! appears among the commands of the `INSTALL.txt` that the guide's `cargo wfp package` wrote
//! must be one of those commands, and every command of `INSTALL.txt`'s steps (but the `pnputil`
//! alternatives, which need a catalog file) must be in them: the guide cannot drift from the
//! tool. When the package is unsigned (no `osslsigncode`), its `certutil` lines cannot be
//! compared, which is printed as `SKIPPED: ...`.
//!
//! What the test substitutes, because it cannot run here (offline, from this checkout):
//!
//! - `cargo install cargo-wfp` is not run: the `cargo-wfp` binary under test
//!   (`CARGO_BIN_EXE_cargo-wfp`) is put first on the `PATH`, ahead of `$CARGO_HOME/bin`, so
//!   `cargo wfp` runs it;
//! - `rustup target add x86_64-pc-windows-msvc` is not run (it needs the network): when the
//!   target's standard library is missing, `cargo wfp build` says so (exit status 3) and the
//!   remaining steps print `SKIPPED: ...`;
//! - crates.io is replaced by this checkout: `.cargo/config.toml` in the temporary folder (above
//!   the guide's empty folder, so cargo reads it for every command) has `net.offline = true` and
//!   `[patch.crates-io]` entries pointing `wfp-rs`, `wfp-rs-sim` and `wfp-rs-build` at the
//!   repository;
//! - after `cargo wfp new`, the workspace's `Cargo.lock` is copied into the new project, so that
//!   offline resolution picks the versions already downloaded;
//! - every cargo command builds into the shared `<target>/cargo-wfp-projects` folder
//!   (`CARGO_TARGET_DIR`), as `new_build_package.rs` does, so the SDK compiles once.
//!
//! Any other command in a ```sh block fails the test until it is taught here.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    TARGET_MISSING, assert_success, cargo_program, describe, nested, projects_target, repo, say,
};

/// The SDK crates a generated project depends on, patched to this checkout.
const SDK_CRATES: &[&str] = &["wfp-rs", "wfp-rs-sim", "wfp-rs-build"];

/// Programs of `INSTALL.txt`'s commands; a line of its steps that starts with one is a command.
const INSTALL_PROGRAMS: &[&str] = &[
    "certutil", "bcdedit", "shutdown", "sc", "pnputil", "netsh", "fltmc", "reg",
];

/// What a marker comment before a code block asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Marker {
    File(String),
    Edit(String),
    Excerpt(String),
    Tree(String),
}

/// A fenced code block of the guide.
#[derive(Clone, Debug)]
struct Block {
    /// The info string (`sh`, `rust,ignore`, `diff`, `bat`, ...).
    info: String,
    /// The lines between the fences, each ending in `\n`.
    text: String,
    /// The marker comment before it, if any.
    marker: Option<Marker>,
    /// The line of the opening fence (1-based), for messages.
    line: usize,
}

fn parse_marker(line: &str) -> Option<Marker> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim();
    let (kind, path) = inner.split_once(':')?;
    let path = path.trim().to_owned();
    match kind.trim() {
        "file" => Some(Marker::File(path)),
        "edit" => Some(Marker::Edit(path)),
        "excerpt" => Some(Marker::Excerpt(path)),
        "tree" => Some(Marker::Tree(path)),
        _ => None,
    }
}

/// The guide's code blocks, in order, with their markers.
fn blocks(guide: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut marker: Option<(Marker, usize)> = None;
    let mut lines = guide.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        if let Some(found) = parse_marker(line) {
            assert!(
                marker.is_none(),
                "docs/getting-started.md:{}: a marker follows a marker without a code block",
                index + 1
            );
            marker = Some((found, index + 1));
            continue;
        }
        if let Some(info) = line.strip_prefix("```") {
            let mut text = String::new();
            let mut closed = false;
            for (_, inner) in lines.by_ref() {
                if inner.trim_end() == "```" {
                    closed = true;
                    break;
                }
                text.push_str(inner);
                text.push('\n');
            }
            assert!(
                closed,
                "docs/getting-started.md:{}: unclosed code block",
                index + 1
            );
            out.push(Block {
                info: info.trim().to_owned(),
                text,
                marker: marker.take().map(|(m, _)| m),
                line: index + 1,
            });
            continue;
        }
        if let Some((found, at)) = &marker {
            assert!(
                line.trim().is_empty(),
                "docs/getting-started.md:{at}: the marker {found:?} must be followed by a code block"
            );
        }
    }
    assert!(
        marker.is_none(),
        "docs/getting-started.md: a marker at the end has no code block"
    );
    out
}

/// The commands of a ```sh or ```console block (comments and, for console, output dropped).
fn commands(block: &Block) -> Vec<String> {
    let console = block.info == "console";
    block
        .text
        .lines()
        .filter_map(|line| {
            let line = if console {
                line.strip_prefix("$ ")?
            } else {
                line
            };
            let line = match line.find(" #") {
                Some(at) => &line[..at],
                None => line,
            };
            let line = line.trim();
            (!line.is_empty() && !line.starts_with('#')).then(|| line.to_owned())
        })
        .collect()
}

/// The `#[test]` functions of a Rust file's text.
fn test_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_attribute = false;
    for line in text.lines().map(str::trim) {
        if line == "#[test]" {
            after_attribute = true;
        } else if after_attribute && let Some(rest) = line.strip_prefix("fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
            after_attribute = false;
        }
    }
    names
}

/// `text` with the edit of a ```diff block applied: the context and `-` lines, found exactly
/// once, become the context and `+` lines.
fn apply_edit(text: &str, diff: &str, what: &str) -> String {
    let (mut old, mut new) = (String::new(), String::new());
    for line in diff.lines() {
        let (kind, rest) = match line.chars().next() {
            None => (' ', ""),
            Some(c @ (' ' | '-' | '+')) => (c, &line[1..]),
            Some(_) => panic!("{what}: `{line}` is not a diff line (' ', '-' or '+' first)"),
        };
        if kind != '+' {
            old.push_str(rest);
            old.push('\n');
        }
        if kind != '-' {
            new.push_str(rest);
            new.push('\n');
        }
    }
    let found = text.matches(old.as_str()).count();
    assert_eq!(
        found, 1,
        "{what}: expected the lines to replace exactly once in the file, found them {found} \
         times:\n{old}"
    );
    text.replacen(old.as_str(), &new, 1)
}

/// Panics unless every part of `excerpt` (split at `// ...` lines) is in `text`, in order.
fn check_excerpt(text: &str, excerpt: &str, what: &str) {
    let mut parts = vec![String::new()];
    for line in excerpt.lines() {
        if line.trim() == "// ..." {
            parts.push(String::new());
        } else {
            let part = parts.last_mut().expect("one part at least");
            part.push_str(line);
            part.push('\n');
        }
    }
    let mut from = 0;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        match text[from..].find(part.as_str()) {
            Some(at) => from += at + part.len(),
            None => panic!(
                "{what}: expected this part of the excerpt in the file (after the previous \
                 part), found it missing:\n{part}\n--- the file ---\n{text}"
            ),
        }
    }
}

/// Panics unless the files a tree drawing lists (after its first line, the folder; each line
/// a path after the drawing characters, then a description) are the files of `dir`, but
/// `Cargo.lock` (copied in by this test) and `target/`.
fn check_tree(dir: &Path, drawing: &str, at: &str) {
    let mut listed: Vec<String> = drawing
        .lines()
        .skip(1)
        .filter_map(|line| {
            line.trim_start_matches(['├', '└', '│', '─', ' '])
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .collect();
    listed.sort();
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in fs::read_dir(&folder).expect("reads the project") {
            let path = entry.expect("an entry").path();
            let relative = path.strip_prefix(dir).expect("below dir");
            let shown: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if path.is_dir() {
                if shown != ["target"] {
                    stack.push(path);
                }
            } else if shown != ["Cargo.lock"] {
                found.push(shown.join("/"));
            }
        }
    }
    found.sort();
    assert_eq!(
        listed, found,
        "{at}: expected the tree to list the project's files"
    );
}

/// `$CARGO_HOME/bin`, where `cargo install` puts binaries and where cargo looks for
/// subcommands before the `PATH` unless the `PATH` names it.
fn cargo_home_bin() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::home_dir().map(|home| home.join(".cargo")))?;
    Some(home.join("bin"))
}

/// `path` relative to the shared target folder, written as the guide writes it.
fn as_in_guide(path: &Path) -> String {
    let relative = path
        .strip_prefix(projects_target())
        .unwrap_or_else(|_| panic!("expected {} in the target folder", path.display()));
    let mut shown = String::from("target");
    for part in relative.components() {
        shown.push('/');
        shown.push_str(&part.as_os_str().to_string_lossy());
    }
    shown
}

/// The guide being run.
struct Run {
    guide: String,
    /// The folder the guide's commands are in now.
    cwd: PathBuf,
    /// The folder with the `cargo-wfp` under test.
    bin: PathBuf,
    /// `#[test]` functions of written files not yet seen passing, with the file.
    tests_to_see: Vec<(String, String)>,
    /// Why the rest is skipped, once it is.
    skipped: Option<String>,
    /// The folder `cargo wfp package` wrote.
    package: Option<PathBuf>,
    /// Each command and how long it took.
    timings: Vec<(String, Duration)>,
}

impl Run {
    fn step(&mut self, block: &Block) {
        let at = format!("docs/getting-started.md:{}", block.line);
        match (&block.marker, block.info.as_str()) {
            (Some(Marker::File(path)), _) => {
                let file = self.cwd.join(path);
                if let Some(parent) = file.parent() {
                    fs::create_dir_all(parent).expect("creates the file's folder");
                }
                fs::write(&file, &block.text).expect("writes the guide's file");
                for name in test_names(&block.text) {
                    self.tests_to_see.push((name, path.clone()));
                }
            }
            (Some(Marker::Edit(path)), info) => {
                assert_eq!(info, "diff", "{at}: an edit is a ```diff block");
                let file = self.cwd.join(path);
                let text = fs::read_to_string(&file)
                    .unwrap_or_else(|e| panic!("{at}: expected to read {path}: {e}"));
                let edited = apply_edit(&text, &block.text, &format!("{at} (edit of {path})"));
                fs::write(&file, edited).expect("writes the edited file");
            }
            (Some(Marker::Excerpt(path)), _) => {
                let text = fs::read_to_string(self.cwd.join(path))
                    .unwrap_or_else(|e| panic!("{at}: expected to read {path}: {e}"));
                check_excerpt(&text, &block.text, &format!("{at} (excerpt of {path})"));
            }
            (Some(Marker::Tree(path)), _) => {
                check_tree(&self.cwd.join(path), &block.text, &at);
            }
            (None, "sh" | "console") => {
                for command in commands(block) {
                    self.command(&command, &at);
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, line: &str, at: &str) {
        if let Some(reason) = &self.skipped {
            say(&format!("SKIPPED: `{line}` ({at}): {reason}"));
            return;
        }
        assert!(
            !line.contains(['"', '\'', '$', '|', '&', ';', '<', '>', '*', '`', '\\']),
            "{at}: `{line}`: the guide's commands are run without a shell; keep them plain"
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["cd", dir] => {
                self.cwd = self.cwd.join(dir);
                assert!(
                    self.cwd.is_dir(),
                    "{at}: `{line}`: expected the folder {} to exist",
                    self.cwd.display()
                );
            }
            // Substituted (module docs): the target's absence shows at `cargo wfp build`.
            ["rustup", "target", "add", target] => {
                assert_eq!(*target, cargo_wfp::DRIVER_TARGET, "{at}: `{line}`");
            }
            // Substituted (module docs): the binary under test is first on the PATH.
            ["cargo", "install", "cargo-wfp"] => {}
            ["cargo", args @ ..] => self.cargo(line, args, at),
            _ => panic!(
                "{at}: the guide runs `{line}`, which this test does not know how to run: teach \
                 it here, and list any substitution in the module documentation"
            ),
        }
    }

    fn cargo(&mut self, line: &str, args: &[&str], at: &str) {
        let mut path = vec![self.bin.clone()];
        path.extend(cargo_home_bin());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let mut command = nested(Command::new(cargo_program()));
        command
            .current_dir(&self.cwd)
            .args(args)
            .env("PATH", std::env::join_paths(path).expect("a PATH"));
        let started = Instant::now();
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("{at}: expected to run `{line}`, found: {e}"));
        self.timings.push((line.to_owned(), started.elapsed()));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let wfp_build = matches!(args, ["wfp", "build" | "package", ..]);
        if wfp_build && output.status.code() == Some(TARGET_MISSING) {
            let reason = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            say(&format!("SKIPPED: `{line}` ({at}): {reason}"));
            self.skipped = Some(format!("`{line}` could not build: {reason}"));
            return;
        }
        assert_success(&format!("{at}: `{line}`"), &output);
        let printed = stdout.lines().last().unwrap_or_default().trim();
        match args {
            ["wfp", "new", ..] => {
                // Substituted (module docs): the workspace's versions, offline.
                let project = self.cwd.join(printed);
                fs::copy(repo().join("Cargo.lock"), project.join("Cargo.lock"))
                    .expect("copies Cargo.lock into the new project");
            }
            ["test", ..] => {
                for (name, file) in std::mem::take(&mut self.tests_to_see) {
                    assert!(
                        stdout.contains(&format!("test {name} ... ok")),
                        "{at}: expected `{line}` to run the guide's test `{name}` ({file}) and \
                         pass it, found:\n{}",
                        describe(line, &output)
                    );
                }
            }
            ["wfp", "build", ..] | ["wfp", "package", ..] => {
                let shown = as_in_guide(Path::new(printed));
                assert!(
                    self.guide.contains(&shown),
                    "{at}: `{line}` printed {printed}: expected the guide to name it as `{shown}`"
                );
                if args[1] == "package" {
                    self.package = Some(PathBuf::from(printed));
                }
            }
            _ => {}
        }
    }
}

/// The commands of `INSTALL.txt`'s numbered steps: lines that start with one of
/// [`INSTALL_PROGRAMS`] before "What still needs Windows".
fn install_commands(install: &str) -> Vec<String> {
    install
        .lines()
        .take_while(|line| !line.starts_with("What still needs Windows"))
        .map(str::trim)
        .filter(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|program| INSTALL_PROGRAMS.contains(&program))
        })
        .map(str::to_owned)
        .collect()
}

/// The guide's Windows commands against the `INSTALL.txt` in `package`.
fn check_windows_steps(blocks: &[Block], package: &Path) {
    let install = fs::read_to_string(package.join("INSTALL.txt")).expect("reads INSTALL.txt");
    let expected = install_commands(&install);
    let programs: Vec<&str> = expected
        .iter()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let signed = fs::read_dir(package)
        .expect("reads the package")
        .flatten()
        .any(|entry| entry.path().extension().is_some_and(|e| e == "cer"));
    let mut guide_lines = Vec::new();
    for block in blocks.iter().filter(|b| b.info == "bat") {
        for (offset, line) in block.text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with("REM ") || line.starts_with("::") {
                continue;
            }
            let at = format!("docs/getting-started.md:{}", block.line + 1 + offset);
            let program = line.split_whitespace().next().unwrap_or_default();
            if programs.contains(&program) {
                assert!(
                    expected.iter().any(|command| command == line),
                    "{at}: `{line}` is not what `cargo wfp package` wrote; its commands are:\n{}",
                    expected.join("\n")
                );
            } else if program == "certutil" && !signed {
                say(&format!(
                    "SKIPPED: {at}: `{line}` not compared: the package is unsigned \
                     (osslsigncode is not installed), so INSTALL.txt has no certutil commands"
                ));
            }
            guide_lines.push(line.to_owned());
        }
    }
    for command in expected.iter().filter(|c| !c.starts_with("pnputil ")) {
        assert!(
            guide_lines.contains(command),
            "expected the guide's Windows steps to show `{command}` from INSTALL.txt:\n{install}"
        );
    }
}

#[test]
#[cfg_attr(
    windows,
    ignore = "on a Windows host the guide's `cargo test` is `cargo test --features sim`"
)]
fn the_getting_started_guide_runs_as_written() {
    if !common::in_repository("docs/getting-started.md") {
        return;
    }
    let started = Instant::now();
    let guide =
        fs::read_to_string(repo().join("docs/getting-started.md")).expect("reads the guide");
    let blocks = blocks(&guide);

    let temp = tempfile::tempdir().expect("a temporary folder");
    let root = temp.path();
    // Inside the repository, its `.cargo/config.toml` (aliases, linker) would apply too.
    assert!(
        !root
            .canonicalize()
            .expect("a temporary folder")
            .starts_with(repo().canonicalize().expect("the repository")),
        "expected the temporary folder outside the repository (TMPDIR={})",
        root.display()
    );
    let bin = root.join("bin");
    fs::create_dir(&bin).expect("creates bin");
    let tool = Path::new(env!("CARGO_BIN_EXE_cargo-wfp"));
    let installed = bin.join(tool.file_name().expect("a file name"));
    fs::hard_link(tool, &installed)
        .or_else(|_| fs::copy(tool, &installed).map(|_| ()))
        .expect("puts cargo-wfp in bin");
    fs::create_dir(root.join(".cargo")).expect("creates .cargo");
    let mut config = String::from("[net]\noffline = true\n\n[patch.crates-io]\n");
    for name in SDK_CRATES {
        config.push_str(&format!(
            "{name} = {{ path = '{}' }}\n",
            repo().join(name).display()
        ));
    }
    fs::write(root.join(".cargo/config.toml"), config).expect("writes .cargo/config.toml");
    let empty = root.join("work");
    fs::create_dir(&empty).expect("creates the guide's empty folder");

    let mut run = Run {
        guide: guide.clone(),
        cwd: empty,
        bin,
        tests_to_see: Vec::new(),
        skipped: None,
        package: None,
        timings: Vec::new(),
    };
    for block in &blocks {
        run.step(block);
    }
    if run.skipped.is_none() {
        assert!(
            run.tests_to_see.is_empty(),
            "expected a `cargo test` after the guide's test files, found none for {:?}",
            run.tests_to_see
        );
        let package = run
            .package
            .as_deref()
            .expect("expected the guide to run `cargo wfp package`");
        check_windows_steps(&blocks, package);
    } else {
        say("SKIPPED: the guide's Windows commands against INSTALL.txt: nothing was packaged");
    }
    let steps: Vec<String> = run
        .timings
        .iter()
        .map(|(line, took)| format!("`{line}` {:.1}s", took.as_secs_f64()))
        .collect();
    say(&format!(
        "TIMING: docs/getting-started.md: {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        steps.join(", ")
    ));
}

#[test]
fn edits_apply_once_and_excerpts_allow_elisions() {
    let text = "a\nb\nc\nd\n";
    assert_eq!(
        apply_edit(text, " b\n-c\n+C\n+C2\n", "test"),
        "a\nb\nC\nC2\nd\n"
    );
    let result = std::panic::catch_unwind(|| apply_edit("x\nx\n", "-x\n+y\n", "test"));
    assert!(result.is_err(), "an ambiguous edit is refused");
    check_excerpt(text, "a\n// ...\nd\n", "test");
    let result = std::panic::catch_unwind(|| check_excerpt(text, "d\n// ...\na\n", "test"));
    assert!(result.is_err(), "parts must be in order");
    assert_eq!(
        test_names("#[test]\nfn one() {}\nfn helper() {}\n#[test]\nfn two_2() {}\n"),
        ["one", "two_2"]
    );
    let guide = "<!-- file: tests/x.rs -->\n\n```rust,ignore\n#[test]\nfn x() {}\n```\n\n```sh\ncargo test   # all\n# a comment\n```\n";
    let parsed = blocks(guide);
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0].marker, Some(Marker::File("tests/x.rs".into())));
    assert_eq!(commands(&parsed[1]), ["cargo test"]);
}
