//! `cargo wfp new`: a driver project that builds and tests as generated.
//!
//! The templates are the repository's examples, copied into this crate's `templates/` folder
//! by `cargo xtask templates` (a test fails when the copy is stale, so they cannot drift):
//!
//! | template   | from                                                     | generates |
//! |------------|----------------------------------------------------------|-----------|
//! | `minimal`  | `examples/minimal-driver`                                | one crate |
//! | `callout`  | `examples/starter`                                       | one crate |
//! | `firewall` | `examples/firewall/{driver,protocol,rules,service}`      | a workspace |
//!
//! Generating a project from them is mechanical, and the same for every template:
//!
//! - **names**: the example's crate name becomes `NAME` (`firewall-driver` → `NAME-driver`,
//!   `firewall_protocol` → `NAME_protocol`, ...) in every file and file name, and its product
//!   identifier (`WfpRsFirewall`: service, port, device and symbolic-link names) becomes `NAME`
//!   in UpperCamelCase;
//! - **GUIDs**: every GUID written as `guid!("...")` anywhere in the template is replaced by a
//!   fresh random one, everywhere it occurs (so a key that two crates share stays shared);
//! - **manifests**: `workspace = true` keys take the repository workspace's values (a copy of
//!   its `Cargo.toml` is in the templates), and SDK crates (path dependencies outside the
//!   example) become registry dependencies (`wfp-rs = "0.1"`); with `--sdk-path` a
//!   `[patch.crates-io]` section points them at a local checkout;
//! - **project files**: `panic = "abort"` profiles, `.cargo/config.toml` with the linker, a
//!   README and a `.gitignore`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use include_dir::{Dir, include_dir};
use toml_edit::{DocumentMut, InlineTable, Item, Table, Value};
use uuid::Uuid;

use crate::Error;

/// The templates, as `cargo xtask templates` copied them from the examples.
static TEMPLATES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates");

/// The name manifests have in `templates/`: `cargo package` leaves out every folder that holds
/// a `Cargo.toml` (it takes it for another package), so the copies are renamed.
pub const MANIFEST_IN_TEMPLATES: &str = "Cargo.toml.in";

/// Where each template folder comes from in the wfp-rs repository (`templates/<first>` is a
/// copy of `<second>`); `workspace` holds the repository's root manifest, whose
/// `[workspace.package]`, `[workspace.dependencies]` and `[workspace.lints]` the examples use.
pub const TEMPLATE_SOURCES: &[(&str, &str)] = &[
    ("workspace", "."),
    ("minimal", "examples/minimal-driver"),
    ("callout", "examples/starter"),
    ("firewall/driver", "examples/firewall/driver"),
    ("firewall/protocol", "examples/firewall/protocol"),
    ("firewall/rules", "examples/firewall/rules"),
    ("firewall/service", "examples/firewall/service"),
];

/// A project template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Template {
    /// One driver crate: an entry point, a spin lock, work items, a clean unload.
    #[default]
    Minimal,
    /// One callout driver crate: logs outbound TCP connections and blocks a port.
    Callout,
    /// A workspace: callout driver, the protocol it shares with its user-mode service, the
    /// service, and the service's rules engine.
    Firewall,
}

impl Template {
    /// Every template.
    pub const ALL: [Template; 3] = [Template::Minimal, Template::Callout, Template::Firewall];

    /// The template's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Template::Minimal => "minimal",
            Template::Callout => "callout",
            Template::Firewall => "firewall",
        }
    }

    fn spec(self) -> Spec {
        match self {
            Template::Minimal => Spec {
                crates: &[("minimal", "examples/minimal-driver", "", Role::Driver)],
                old_hyphen: "minimal-driver",
                old_underscore: "minimal_driver",
                old_product: "WfpRsMinimal",
                name_is_a_word: false,
            },
            Template::Callout => Spec {
                crates: &[("callout", "examples/starter", "", Role::Driver)],
                old_hyphen: "starter",
                old_underscore: "starter",
                old_product: "WfpRsStarter",
                name_is_a_word: false,
            },
            Template::Firewall => Spec {
                crates: &[
                    (
                        "firewall/driver",
                        "examples/firewall/driver",
                        "driver",
                        Role::Driver,
                    ),
                    (
                        "firewall/protocol",
                        "examples/firewall/protocol",
                        "protocol",
                        Role::Library,
                    ),
                    (
                        "firewall/rules",
                        "examples/firewall/rules",
                        "rules",
                        Role::Library,
                    ),
                    (
                        "firewall/service",
                        "examples/firewall/service",
                        "service",
                        Role::Service,
                    ),
                ],
                old_hyphen: "firewall",
                old_underscore: "firewall",
                old_product: "WfpRsFirewall",
                name_is_a_word: true,
            },
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Template {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Template::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::usage(format!(
                    "unknown template `{s}`; the templates are minimal, callout and firewall"
                ))
            })
    }
}

/// What a crate of a template is, for its package name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The driver: package `NAME` alone, `NAME-driver` in a workspace (the rename does it).
    Driver,
    /// A library of the workspace (`NAME-protocol`, `NAME-rules`: the rename does it).
    Library,
    /// The service: package and binary `NAME`.
    Service,
}

struct Spec {
    /// (template folder, repository folder, project folder, role)
    crates: &'static [(&'static str, &'static str, &'static str, Role)],
    old_hyphen: &'static str,
    old_underscore: &'static str,
    old_product: &'static str,
    /// The crate name is also the word for what the product is ("a firewall that asks"), so in
    /// prose it stays; a name such as `starter` is renamed everywhere.
    name_is_a_word: bool,
}

/// What `cargo wfp new` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOptions {
    /// The project name: lower-case letters, digits and `-`, starting with a letter.
    pub name: String,
    /// The template.
    pub template: Template,
    /// A local checkout of wfp-rs to build against (`[patch.crates-io]`), instead of the
    /// crates on crates.io.
    pub sdk_path: Option<PathBuf>,
}

/// The names a project's identifiers are made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// `NAME` as given: the package name.
    pub package: String,
    /// `NAME` with `-` as `_`: the crate name in Rust paths.
    pub ident: String,
    /// `NAME` in UpperCamelCase: the service, port and device names.
    pub product: String,
}

impl Names {
    /// Checks `name` and derives the others from it.
    ///
    /// ```
    /// let names = cargo_wfp::new::Names::new("acme-guard2").unwrap();
    /// assert_eq!(names.ident, "acme_guard2");
    /// assert_eq!(names.product, "AcmeGuard2");
    /// assert!(cargo_wfp::new::Names::new("Acme").is_err());
    /// let error = cargo_wfp::new::Names::new("My_Driver").unwrap_err();
    /// assert_eq!(error.hint(), Some("cargo wfp new my-driver"));
    /// assert!(cargo_wfp::new::Names::new("core").is_err());
    /// ```
    pub fn new(name: &str) -> Result<Self, Error> {
        let valid = |name: &str| {
            name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !name.ends_with('-')
                && !name.contains("--")
        };
        if !valid(name) {
            let error = Error::usage(format!(
                "`{name}` is not a usable project name: use lower-case letters, digits and \
                 single `-`, starting with a letter (e.g. `acme-guard`)"
            ));
            // `My_Driver` → `my-driver`, when that is a name.
            let suggestion = name.to_ascii_lowercase().replace(['_', ' '], "-");
            return Err(if valid(&suggestion) {
                error.with_hint(format!("cargo wfp new {suggestion}"))
            } else {
                error
            });
        }
        const RESERVED: &[&str] = &[
            "core",
            "std",
            "alloc",
            "test",
            "proc-macro",
            "build",
            "wfp-rs",
            "wfp-rs-build",
            "wfp-rs-macros",
            "wfp-rs-sim",
            "wfp-rs-stack",
            "self",
            "super",
            "crate",
            "fn",
            "mod",
            "use",
            "type",
            "struct",
            "enum",
            "impl",
            "trait",
            "match",
            "loop",
            "async",
            "await",
        ];
        if RESERVED.contains(&name) || name.starts_with("wfp-rs") {
            return Err(Error::usage(format!(
                "`{name}` is reserved (a Rust keyword, a standard crate or an SDK crate); \
                 choose another project name"
            )));
        }
        let product = name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect();
        Ok(Self {
            package: name.to_owned(),
            ident: name.replace('-', "_"),
            product,
        })
    }
}

/// A generated project: its files (relative path → content) and what it was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    /// Every file of the project, by its path relative to the project folder.
    pub files: BTreeMap<PathBuf, String>,
    /// Each template GUID and the fresh GUID that replaced it.
    pub guids: BTreeMap<String, String>,
    /// The SDK crates the project depends on (registry name → folder in the wfp-rs checkout).
    pub sdk_crates: BTreeMap<String, String>,
}

/// The files of the embedded templates: path below `templates/` → contents.
pub fn embedded_templates() -> BTreeMap<String, &'static [u8]> {
    fn walk(dir: &'static Dir<'static>, out: &mut BTreeMap<String, &'static [u8]>) {
        for file in dir.files() {
            out.insert(
                file.path().to_string_lossy().replace('\\', "/"),
                file.contents(),
            );
        }
        for sub in dir.dirs() {
            walk(sub, out);
        }
    }
    let mut out = BTreeMap::new();
    walk(&TEMPLATES, &mut out);
    out
}

/// What `templates/` must hold, read from the examples of the wfp-rs checkout at `repo`: every
/// file below each [`TEMPLATE_SOURCES`] folder (but `target/` and hidden files; for the
/// workspace, its `Cargo.toml` only), manifests renamed to [`MANIFEST_IN_TEMPLATES`].
pub fn templates_from_examples(repo: &Path) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), Error> {
        let entries = fs::read_dir(dir)
            .map_err(|e| Error::failed(format!("could not read {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::failed(format!("could not read {}: {e}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            let path = entry.path();
            let key = format!(
                "{prefix}/{}",
                if name == "Cargo.toml" {
                    MANIFEST_IN_TEMPLATES
                } else {
                    &name
                }
            );
            if path.is_dir() {
                walk(&path, &format!("{prefix}/{name}"), out)?;
            } else {
                let data = fs::read(&path).map_err(|e| {
                    Error::failed(format!("could not read {}: {e}", path.display()))
                })?;
                out.insert(key, data);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for (template, source) in TEMPLATE_SOURCES {
        if *source == "." {
            let path = repo.join("Cargo.toml");
            let data = fs::read(&path)
                .map_err(|e| Error::failed(format!("could not read {}: {e}", path.display())))?;
            out.insert(format!("{template}/{MANIFEST_IN_TEMPLATES}"), data);
        } else {
            walk(&repo.join(source), template, &mut out)?;
        }
    }
    Ok(out)
}

/// Generates the project `options` describes, taking fresh GUIDs from `fresh_guid`.
pub fn generate(
    options: &NewOptions,
    fresh_guid: &mut dyn FnMut() -> Uuid,
) -> Result<Project, Error> {
    let names = Names::new(&options.name)?;
    let spec = options.template.spec();
    let templates = embedded_templates();
    let text = |path: &str| -> Result<String, Error> {
        let data = templates
            .get(path)
            .ok_or_else(|| Error::failed(format!("template file `{path}` is missing")))?;
        String::from_utf8(data.to_vec())
            .map_err(|_| Error::failed(format!("template file `{path}` is not UTF-8")))
    };
    let workspace: DocumentMut = text(&format!("workspace/{MANIFEST_IN_TEMPLATES}"))?
        .parse()
        .map_err(|e| Error::failed(format!("the workspace template is not TOML: {e}")))?;
    let sdk_version = workspace
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(Item::as_str)
        .ok_or_else(|| Error::failed("the workspace template has no version"))?;
    let sdk_requirement = caret_requirement(sdk_version);
    let standalone = spec.crates.len() == 1;

    let mut files = BTreeMap::new();
    let mut sdk_crates = BTreeMap::new();
    for (template_dir, repo_dir, project_dir, role) in spec.crates {
        let prefix = format!("{template_dir}/");
        for (path, data) in templates.range(prefix.clone()..) {
            let Some(relative) = path.strip_prefix(&prefix) else {
                break;
            };
            let Ok(contents) = std::str::from_utf8(data) else {
                return Err(Error::failed(format!(
                    "template file `{path}` is not UTF-8"
                )));
            };
            let renamed_path = rename(relative, &spec, &names);
            let mut contents = rename(contents, &spec, &names);
            let mut out_path = Path::new(project_dir).join(&renamed_path);
            if relative == MANIFEST_IN_TEMPLATES {
                out_path = Path::new(project_dir).join("Cargo.toml");
                let context = ManifestContext {
                    workspace: &workspace,
                    sdk_requirement: &sdk_requirement,
                    repo_dir,
                    siblings: spec.crates.iter().map(|c| c.1).collect(),
                    standalone,
                };
                let package = match role {
                    Role::Service => Some(names.package.as_str()),
                    Role::Driver if standalone => Some(names.package.as_str()),
                    _ => None,
                };
                contents = manifest(&contents, &context, package, &mut sdk_crates)?;
            }
            files.insert(out_path, contents);
        }
    }
    let sdk_path = options.sdk_path.as_deref();
    if standalone {
        let manifest = files
            .get_mut(Path::new("Cargo.toml"))
            .ok_or_else(|| Error::failed("the template has no manifest"))?;
        manifest.push_str(&project_tables(None, &workspace, &sdk_crates, sdk_path));
    } else {
        let members: Vec<&str> = spec.crates.iter().map(|c| c.2).collect();
        files.insert(
            PathBuf::from("Cargo.toml"),
            project_tables(Some(&members), &workspace, &sdk_crates, sdk_path),
        );
    }
    files.insert(PathBuf::from(".cargo/config.toml"), CARGO_CONFIG.to_owned());
    files.insert(PathBuf::from(".gitignore"), "/target\n".to_owned());
    files.insert(
        PathBuf::from("README.md"),
        readme(options.template, &names, &files),
    );

    let guids = freshen_guids(&mut files, fresh_guid);
    Ok(Project {
        files,
        guids,
        sdk_crates,
    })
}

/// Writes `project` into `dir`, which must not exist or be empty.
pub fn write(project: &Project, dir: &Path) -> Result<(), Error> {
    if dir.exists() {
        let empty = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
        if !empty {
            return Err(
                Error::usage(format!("{} already exists and is not empty", dir.display()))
                    .with_hint("choose another name or `--path DIR`"),
            );
        }
    }
    for (path, contents) in &project.files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| {
                Error::failed(format!("could not create {}: {e}", parent.display()))
            })?;
        }
        fs::write(&path, contents)
            .map_err(|e| Error::failed(format!("could not write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The `.cargo/config.toml` of a generated project: `cargo wfp build` passes the same settings
/// itself; the file makes plain `cargo build --target x86_64-pc-windows-msvc` work too.
const CARGO_CONFIG: &str = "\
# Kernel drivers for Windows link on any host with the LLVM linker that ships with rustup: no
# Visual Studio, no Windows SDK, no WDK. (`cargo wfp build` passes these settings itself; this
# file makes plain `cargo build --target x86_64-pc-windows-msvc -p <driver>` work too.)
[target.x86_64-pc-windows-msvc]
linker = \"rust-lld\"
rustflags = [\"-Clinker-flavor=lld-link\"]
";

/// `^MAJOR.MINOR` for a 0.x version (`0.1.0` → `0.1`), `MAJOR` otherwise: what `cargo add`
/// writes.
fn caret_requirement(version: &str) -> String {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    if major == "0" {
        format!("0.{minor}")
    } else {
        major.to_owned()
    }
}

/// `text` with the template's names replaced by the project's: the product identifier
/// (`WfpRsFirewall`) anywhere, and the crate name as a whole word (letters and digits around
/// it end it; `-` and `_` do not): its `-` spelling, or the `_` one followed by `-`, becomes
/// `NAME`, the `_` spelling otherwise `NAME` with `_`. A name inside a path (`/firewall/`) or a
/// link to a guide (`firewall.md`) is not a crate name and stays, and so does a name that is an
/// English word for the product where it is prose (below).
fn rename(text: &str, spec: &Spec, names: &Names) -> String {
    let text = text.replace(spec.old_product, &names.product);
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    let mut copied = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric();
    while index < bytes.len() {
        let candidates = [(spec.old_hyphen, true), (spec.old_underscore, false)];
        let found = candidates.into_iter().find(|(old, _)| {
            bytes[index..].starts_with(old.as_bytes())
                && (index == 0 || (!is_word(bytes[index - 1]) && bytes[index - 1] != b'/'))
                && bytes
                    .get(index + old.len())
                    .is_none_or(|&b| !is_word(b) && b != b'/')
                && !bytes[index + old.len()..].starts_with(b".md")
        });
        match found {
            Some((old, hyphen)) => {
                let next = bytes.get(index + old.len()).copied();
                let previous = index.checked_sub(1).map(|at| bytes[at]);
                let path = bytes[index + old.len()..].starts_with(b"::");
                // `-p NAME` takes the package name, whatever the spelling.
                let package_flag =
                    bytes[..index].ends_with(b"-p ") || bytes[..index].ends_with(b"--package ");
                // A name that is also what the product is (`firewall`) is a crate or
                // program name only in code: a compound (`firewall-driver`), a path
                // (`firewall::cli`), a file name (`starter.sys`), a string, code span or line
                // it starts (`"firewall: #17"`, `` `firewall serve` ``), a `-p` argument.
                // Elsewhere it is prose ("the firewall's driver") or a local variable, and
                // stays.
                let plain_word = !old.contains(['-', '_']);
                // The driver's files (not `firewall.shared`, a field of a local variable).
                let file_name = [".sys", ".inf", ".cat", ".cer", ".map", ".dll", ".pdb"]
                    .iter()
                    .any(|extension| {
                        let after = index + old.len();
                        bytes[after..].starts_with(extension.as_bytes())
                            && bytes
                                .get(after + extension.len())
                                .is_none_or(|&b| !is_word(b))
                    });
                let starts_code = matches!(previous, Some(b'"' | b'`' | b'\n'));
                let in_code = matches!(next, Some(b'-' | b'_'))
                    || path
                    || file_name
                    || starts_code
                    || package_flag;
                if spec.name_is_a_word && !in_code {
                    index += old.len();
                    continue;
                }
                out.push_str(&text[copied..index]);
                // The bare word starting a code span or string is a command line or a log
                // line, which name the program, that is the package; a string that is just the
                // word (`[lib] name = "firewall"`) is the crate name.
                let program = plain_word
                    && starts_code
                    && !path
                    && !file_name
                    && next != Some(b'_')
                    && !(previous == Some(b'"') && next == Some(b'"'));
                let replacement = if (hyphen && old.contains('-'))
                    || next == Some(b'-')
                    || package_flag
                    || program
                {
                    &names.package
                } else {
                    &names.ident
                };
                out.push_str(replacement);
                index += old.len();
                copied = index;
            }
            None => index += 1,
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Replaces every GUID that appears in a `guid!("...")` in `files` with a fresh one,
/// everywhere it occurs; returns the map.
fn freshen_guids(
    files: &mut BTreeMap<PathBuf, String>,
    fresh_guid: &mut dyn FnMut() -> Uuid,
) -> BTreeMap<String, String> {
    const MACRO: &str = "guid!(\"";
    let mut old = BTreeSet::new();
    for contents in files.values() {
        let mut rest = contents.as_str();
        while let Some(at) = rest.find(MACRO) {
            rest = &rest[at + MACRO.len()..];
            if let Some(candidate) = rest.get(..36)
                && Uuid::parse_str(candidate).is_ok()
            {
                old.insert(candidate.to_owned());
            }
        }
    }
    let map: BTreeMap<String, String> = old
        .into_iter()
        .map(|guid| {
            let fresh = fresh_guid().hyphenated().to_string();
            (guid, fresh)
        })
        .collect();
    for contents in files.values_mut() {
        for (from, to) in &map {
            if contents.contains(from.as_str()) {
                *contents = contents.replace(from.as_str(), to);
            }
            let upper = from.to_ascii_uppercase();
            if contents.contains(upper.as_str()) {
                *contents = contents.replace(upper.as_str(), &to.to_ascii_uppercase());
            }
        }
    }
    map
}

struct ManifestContext<'a> {
    workspace: &'a DocumentMut,
    sdk_requirement: &'a str,
    /// The crate's folder in the repository (for its relative paths).
    repo_dir: &'a str,
    /// Every crate folder of the template in the repository: a path dependency into one of
    /// them stays a path dependency.
    siblings: Vec<&'a str>,
    standalone: bool,
}

/// The example's manifest `text` (already renamed) as the generated project's: workspace
/// inheritance resolved, SDK crates from the registry (recorded in `sdk_crates`), the package
/// named `package` when given.
fn manifest(
    text: &str,
    context: &ManifestContext<'_>,
    package: Option<&str>,
    sdk_crates: &mut BTreeMap<String, String>,
) -> Result<String, Error> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| Error::failed(format!("a template manifest is not TOML: {e}")))?;
    let workspace = context
        .workspace
        .get("workspace")
        .and_then(Item::as_table_like)
        .ok_or_else(|| Error::failed("the workspace template has no [workspace]"))?;
    let inherited_package = workspace.get("package").and_then(Item::as_table_like);
    let inherited_deps = workspace.get("dependencies").and_then(Item::as_table_like);

    if let Some(table) = doc.get_mut("package").and_then(Item::as_table_like_mut) {
        let keys: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
        for key in keys {
            let inherits = table
                .get(&key)
                .and_then(Item::as_table_like)
                .and_then(|t| t.get("workspace"))
                .and_then(Item::as_bool)
                == Some(true);
            if inherits {
                let value = inherited_package
                    .and_then(|p| p.get(&key))
                    .and_then(Item::as_value)
                    .ok_or_else(|| {
                        Error::failed(format!("the workspace template has no package.{key}"))
                    })?;
                table.insert(&key, Item::Value(value.clone()));
            }
        }
        if let Some(name) = package {
            table.insert("name", toml_edit::value(name));
        }
    }
    if let Some(name) = package
        && let Some(bins) = doc.get_mut("bin").and_then(Item::as_array_of_tables_mut)
    {
        for bin in bins.iter_mut() {
            bin.insert("name", toml_edit::value(name));
        }
    }

    let mut dependency_tables: Vec<Vec<String>> =
        ["dependencies", "dev-dependencies", "build-dependencies"]
            .iter()
            .map(|t| vec![(*t).to_owned()])
            .collect();
    if let Some(targets) = doc.get("target").and_then(Item::as_table_like) {
        for (cfg, table) in targets.iter() {
            if let Some(table) = table.as_table_like() {
                for (kind, _) in table.iter() {
                    dependency_tables.push(vec!["target".into(), cfg.to_owned(), kind.to_owned()]);
                }
            }
        }
    }
    for path in dependency_tables {
        let mut item: Option<&mut Item> = None;
        for key in &path {
            item = match item {
                None => doc.get_mut(key),
                Some(parent) => parent.get_mut(key),
            };
            if item.is_none() {
                break;
            }
        }
        let Some(table) = item.and_then(Item::as_table_like_mut) else {
            continue;
        };
        let names: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
        for name in names {
            let Some(dependency) = table.get(&name) else {
                continue;
            };
            if let Some(resolved) =
                dependency_spec(&name, dependency, inherited_deps, context, sdk_crates)?
            {
                table.insert(&name, resolved);
            }
        }
    }

    let mut text = doc.to_string();
    if context.standalone {
        let inherits_lints = doc
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(Item::as_bool)
            == Some(true);
        if inherits_lints {
            let lints = workspace
                .get("lints")
                .and_then(Item::as_table)
                .ok_or_else(|| Error::failed("the workspace template has no [workspace.lints]"))?;
            doc.remove("lints");
            text = doc.to_string();
            text.push_str(&render_lints(lints, None));
        }
    }
    Ok(text)
}

/// `lints` as `[lints.rust]`, `[lints.clippy]`, ... tables (below `[<parent>.lints...]` when
/// `parent` is given), each preceded by a blank line.
fn render_lints(lints: &Table, parent: Option<&str>) -> String {
    let mut lints = lints.clone();
    lints.set_implicit(true);
    let mut doc = DocumentMut::new();
    match parent {
        Some(parent) => {
            let mut outer = Table::new();
            outer.set_implicit(true);
            outer.insert("lints", Item::Table(lints));
            doc.insert(parent, Item::Table(outer));
        }
        None => {
            doc.insert("lints", Item::Table(lints));
        }
    }
    format!("\n{}", doc.to_string().trim_start())
}

/// The SDK's crates; each is in the folder of its name in the wfp-rs repository.
const SDK_CRATES: &[&str] = &[
    "wfp-rs",
    "wfp-rs-macros",
    "wfp-rs-build",
    "wfp-rs-sim",
    "wfp-rs-stack",
];

/// The generated form of dependency `name` = `item`, or `None` to keep it as it is.
fn dependency_spec(
    name: &str,
    item: &Item,
    inherited: Option<&dyn toml_edit::TableLike>,
    context: &ManifestContext<'_>,
    sdk_crates: &mut BTreeMap<String, String>,
) -> Result<Option<Item>, Error> {
    // The examples depend on the SDK from the registry (`wfp-rs = "0.1.0"`), as a copy of one
    // does; the repository's workspace patches them. The project gets the same requirement as
    // for an inherited SDK dependency, and `--sdk-path` patches it.
    if SDK_CRATES.contains(&name) {
        if item.as_str().is_some() {
            sdk_crates.insert(name.to_owned(), name.to_owned());
            return Ok(Some(toml_edit::value(context.sdk_requirement)));
        }
        if let Some(table) = item.as_table_like()
            && table.get("path").is_none()
            && table.get("workspace").is_none()
        {
            sdk_crates.insert(name.to_owned(), name.to_owned());
            let mut spec = InlineTable::new();
            spec.insert("version", context.sdk_requirement.into());
            for (key, value) in table.iter() {
                if key != "version"
                    && let Some(value) = value.as_value()
                {
                    spec.insert(key, value.clone());
                }
            }
            spec.fmt();
            return Ok(Some(Item::Value(Value::InlineTable(spec))));
        }
    }
    let Some(table) = item.as_table_like() else {
        return Ok(None);
    };
    let mut spec = InlineTable::new();
    if table.get("workspace").and_then(Item::as_bool) == Some(true) {
        let base = inherited.and_then(|d| d.get(name)).ok_or_else(|| {
            Error::failed(format!(
                "the workspace template has no dependency `{name}` to inherit"
            ))
        })?;
        if let Some(version) = base.as_str() {
            spec.insert("version", version.into());
        } else if let Some(base) = base.as_table_like() {
            for (key, value) in base.iter() {
                if let Some(value) = value.as_value() {
                    spec.insert(key, value.clone());
                }
            }
        }
        if let Some(path) = spec.remove("path") {
            let path = path.as_str().unwrap_or_default().to_owned();
            sdk_crates.insert(name.to_owned(), normalize(&path));
            spec.insert("version", context.sdk_requirement.into());
        }
    } else if let Some(path) = table.get("path").and_then(Item::as_str) {
        let resolved = normalize(&format!("{}/{path}", context.repo_dir));
        if context.siblings.iter().any(|s| *s == resolved) {
            return Ok(None);
        }
        sdk_crates.insert(name.to_owned(), resolved);
        spec.insert("version", context.sdk_requirement.into());
    } else {
        return Ok(None);
    }
    for (key, value) in table.iter() {
        if matches!(key, "workspace" | "path") {
            continue;
        }
        if let Some(value) = value.as_value() {
            spec.insert(key, value.clone());
        }
    }
    if spec.len() == 1
        && let Some(version) = spec.get("version")
    {
        return Ok(Some(Item::Value(version.clone())));
    }
    spec.fmt();
    Ok(Some(Item::Value(Value::InlineTable(spec))))
}

/// `path` with `.` and `..` folded (`examples/starter/../../wfp-rs-build` → `wfp-rs-build`).
fn normalize(path: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

/// The tables of the project's root manifest: `[workspace]` (with `members`, or empty for a
/// lone crate, so that it is its own workspace wherever it is put), the kernel profiles, and
/// the patches of `--sdk-path`.
fn project_tables(
    members: Option<&[&str]>,
    workspace: &DocumentMut,
    sdk_crates: &BTreeMap<String, String>,
    sdk_path: Option<&Path>,
) -> String {
    let mut out = String::new();
    match members {
        Some(members) => {
            out.push_str("[workspace]\nresolver = \"3\"\nmembers = [");
            out.push_str(
                &members
                    .iter()
                    .map(|m| format!("\"{m}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            out.push_str("]\n");
            if let Some(lints) = workspace
                .get("workspace")
                .and_then(|w| w.get("lints"))
                .and_then(Item::as_table)
            {
                out.push_str(&render_lints(lints, Some("workspace")));
            }
        }
        None => out.push_str(
            "\n# This crate is a workspace of its own, wherever it is put.\n[workspace]\n",
        ),
    }
    out.push_str(
        "\n# Kernel code cannot unwind: a panic in a driver is a bug check. Without these the \
         Windows\n# build fails with \"unwinding panics are not supported without std\". (Test \
         harnesses\n# ignore this and unwind, as `cargo test` requires.)\n[profile.dev]\n\
         panic = \"abort\"\n\n[profile.release]\npanic = \"abort\"\n",
    );
    if let Some(sdk) = sdk_path {
        out.push_str(
            "\n# Build against a local checkout of wfp-rs instead of the crates on crates.io \
             (`cargo wfp new --sdk-path`).\n[patch.crates-io]\n",
        );
        let mut crates: BTreeMap<&str, String> = sdk_crates
            .iter()
            .map(|(name, dir)| (name.as_str(), dir.clone()))
            .collect();
        // The macros come with wfp-rs: patch them with it, so both are the checkout's.
        if crates.contains_key("wfp-rs") {
            crates
                .entry("wfp-rs-macros")
                .or_insert_with(|| "wfp-rs-macros".to_owned());
        }
        for (name, dir) in crates {
            let path = sdk.join(dir);
            let path = path.to_string_lossy().replace('\\', "/");
            out.push_str(&format!("{name} = {{ path = \"{path}\" }}\n"));
        }
    }
    out
}

/// The generated project's README: what it is, the commands, and what a product must change.
fn readme(template: Template, names: &Names, files: &BTreeMap<PathBuf, String>) -> String {
    let infs: Vec<String> = files
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "inf"))
        .map(|p| p.display().to_string())
        .collect();
    let driver = match template {
        Template::Firewall => format!("{}-driver", names.package),
        _ => names.package.clone(),
    };
    let mut text = format!(
        "# {package}\n\n\
         A Windows Filtering Platform callout driver written with \
         [wfp-rs](https://github.com/wfp-rs/wfp-rs), generated by `cargo wfp new --template \
         {template}`.\n\n\
         ```sh\n\
         cargo test                          # the driver in the simulator, on any host\n\
         cargo wfp build --release           # the kernel image, checked: target/x86_64-pc-windows-msvc/release/*.sys\n\
         cargo wfp package --release         # an installable folder with the INF and the Windows commands\n\
         ```\n\n\
         `cargo wfp` is `cargo install cargo-wfp`; the image needs `rustup target add \
         x86_64-pc-windows-msvc` once. The guides: \
         <https://github.com/wfp-rs/wfp-rs/tree/main/docs>.\n\n\
         {demo}\
         ## What a product must change\n\n\
         The generator gave every `guid!` key (provider, sublayer, callouts, filters) a fresh \
         GUID and named everything after `{package}`. Before shipping, check:\n\n\
         - the service name `{product}` in {infs} (and, for a driver that names them, the \
         port, device and symbolic-link names derived from it);\n\
         - the pool tags (`PoolTag::new(b\"....\")` in the driver): four characters of your \
         own, so that pool leaks can be traced to `{driver}`;\n\
         - `Provider` and the descriptions in the INF's `[Strings]`, and the `description` of \
         each crate in its Cargo.toml, which still describe the example;\n",
        package = names.package,
        product = names.product,
        infs = infs.join(", "),
        demo = if template == Template::Firewall {
            format!(
                "The whole firewall (driver, service, rules) runs in the simulator with \
                 `cargo run --release -p {} -- demo` (`--ask-via port` for the port + work item \
                 design); `service/README.md` describes the service's commands.\n\n",
                names.package
            )
        } else {
            String::new()
        },
    );
    if template != Template::Minimal {
        text.push_str(
            "- the display names (`.name(\"...\")`) the driver gives its session, provider, \
             sublayer, callouts and filters, which `netsh wfp show state` lists, as the example \
             wrote them;\n",
        );
    }
    if template == Template::Firewall {
        text.push_str(
            "- the minifilter **altitude** in the INF (`Instance1.Altitude`): the value there is \
             a PLACEHOLDER for testing; a product must request its own altitude from Microsoft \
             (<https://learn.microsoft.com/windows-hardware/drivers/ifs/minifilter-altitude-request>).\n",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(template: Template) -> Spec {
        template.spec()
    }

    #[test]
    fn rename_keeps_words_and_paths() {
        let names = Names::new("acme-guard").unwrap();
        let firewall = spec(Template::Firewall);
        assert_eq!(
            rename(
                "firewall-driver firewall_protocol::X firewall::cli firewalls \\WfpRsFirewallPort \
                 docs/firewall.md examples/firewall/driver let firewall = 1; -p firewall",
                &firewall,
                &names
            ),
            "acme-guard-driver acme_guard_protocol::X acme_guard::cli firewalls \\AcmeGuardPort \
             docs/firewall.md examples/firewall/driver let firewall = 1; -p acme-guard"
        );
        // Prose keeps the word; code (strings, code spans, paths) gets the names, a command or
        // log line the program's (the package's) name.
        assert_eq!(
            rename(
                "//! The example firewall's driver; a firewall that asks. `firewall serve` and \
                 `firewall::cli` `firewall_protocol`; kd_print!(\"firewall: #{id}\"); \
                 load_driver(\"firewall\") install firewall.sys\nfirewall serve firewall.shared",
                &firewall,
                &names
            ),
            "//! The example firewall's driver; a firewall that asks. `acme-guard serve` and \
             `acme_guard::cli` `acme_guard_protocol`; kd_print!(\"acme-guard: #{id}\"); \
             load_driver(\"acme_guard\") install acme_guard.sys\nacme-guard serve firewall.shared"
        );
        // A name that is not the product's word is renamed in prose too.
        let callout = spec(Template::Callout);
        assert_eq!(
            rename(
                "//! The starter's sublayer. let starter = 1; \"starter: pid\" starter.sys",
                &callout,
                &names
            ),
            "//! The acme_guard's sublayer. let acme_guard = 1; \"acme-guard: pid\" acme_guard.sys"
        );
        let minimal = spec(Template::Minimal);
        assert_eq!(
            rename(
                "minimal-driver: loaded; minimal_driver::GREETINGS minimal",
                &minimal,
                &names
            ),
            "acme-guard: loaded; acme_guard::GREETINGS minimal"
        );
    }

    #[test]
    fn guids_are_replaced_consistently() {
        let mut files = BTreeMap::new();
        let a = "a71784a1-4ff0-456c-9615-854560ca70b1";
        files.insert(
            PathBuf::from("a.rs"),
            format!("const K: Guid = guid!(\"{a}\");"),
        );
        files.insert(PathBuf::from("b.txt"), format!("{a} {}", a.to_uppercase()));
        let mut n = 0u128;
        let map = freshen_guids(&mut files, &mut || {
            n += 1;
            Uuid::from_u128(n)
        });
        let fresh = Uuid::from_u128(1).hyphenated().to_string();
        assert_eq!(map.get(a), Some(&fresh));
        assert_eq!(
            files[Path::new("a.rs")],
            format!("const K: Guid = guid!(\"{fresh}\");")
        );
        assert_eq!(
            files[Path::new("b.txt")],
            format!("{fresh} {}", fresh.to_uppercase())
        );
    }

    /// An SDK crate the examples start to use (as the simulator harness crate will be) needs no
    /// change here: a workspace or path dependency outside the example becomes a registry
    /// dependency with a patch.
    #[test]
    fn sdk_dependencies_become_registry_dependencies_with_patches() {
        let workspace: DocumentMut = "[workspace.package]\nversion = \"0.1.0\"\nedition = \"2024\"\n\
             [workspace.dependencies]\nwfp-rs-sim = { path = \"wfp-rs-sim\", version = \"0.1.0\" }\n\
             [workspace.lints.rust]\nmissing_docs = \"warn\"\n"
            .parse()
            .unwrap();
        let context = ManifestContext {
            workspace: &workspace,
            sdk_requirement: "0.1",
            repo_dir: "examples/firewall/driver",
            siblings: vec!["examples/firewall/driver", "examples/firewall/protocol"],
            standalone: false,
        };
        let mut sdk = BTreeMap::new();
        let text = manifest(
            "[package]\nname = \"d\"\nversion.workspace = true\n\
             [dependencies]\nproto = { path = \"../protocol\" }\nwfp-rs = \"0.1.0\"\n\
             wfp-rs-stack = { version = \"0.1.0\", features = [\"y\"] }\n\
             [dev-dependencies]\nwfp-rs-sim = { workspace = true, features = [\"x\"] }\n\
             [target.'cfg(unix)'.dependencies]\nwfp-rs-build = { path = \"../../../wfp-rs-build\" }\n\
             [lints]\nworkspace = true\n",
            &context,
            None,
            &mut sdk,
        )
        .unwrap();
        assert!(text.contains("version = \"0.1.0\""), "{text}");
        assert!(
            text.contains("proto = { path = \"../protocol\" }"),
            "{text}"
        );
        assert!(
            text.contains("wfp-rs-sim = { version = \"0.1\", features = [\"x\"] }"),
            "{text}"
        );
        assert!(text.contains("wfp-rs-build = \"0.1\""), "{text}");
        // Registry dependencies on the SDK, as the examples have them, are SDK crates too.
        assert!(text.contains("wfp-rs = \"0.1\"\n"), "{text}");
        assert!(
            text.contains("wfp-rs-stack = { version = \"0.1\", features = [\"y\"] }"),
            "{text}"
        );
        assert!(text.contains("[lints]\nworkspace = true"), "{text}");
        assert_eq!(
            sdk.into_iter().collect::<Vec<_>>(),
            [
                ("wfp-rs".to_owned(), "wfp-rs".to_owned()),
                ("wfp-rs-build".to_owned(), "wfp-rs-build".to_owned()),
                ("wfp-rs-sim".to_owned(), "wfp-rs-sim".to_owned()),
                ("wfp-rs-stack".to_owned(), "wfp-rs-stack".to_owned())
            ]
        );
        let patches = project_tables(
            Some(&["driver"]),
            &workspace,
            &BTreeMap::from([("wfp-rs-sim".to_owned(), "wfp-rs-sim".to_owned())]),
            Some(Path::new("/sdk")),
        );
        assert!(
            patches.contains("[patch.crates-io]\nwfp-rs-sim = { path = \"/sdk/wfp-rs-sim\" }"),
            "{patches}"
        );
    }

    #[test]
    fn caret_requirements() {
        assert_eq!(caret_requirement("0.1.0"), "0.1");
        assert_eq!(caret_requirement("1.4.2"), "1");
    }

    #[test]
    fn normalize_folds_parents() {
        assert_eq!(
            normalize("examples/starter/../../wfp-rs-build"),
            "wfp-rs-build"
        );
        assert_eq!(
            normalize("examples/firewall/driver/../protocol"),
            "examples/firewall/protocol"
        );
    }
}
