//! What may be published, and how docs.rs documents it: `cargo xtask publishable` and
//! `cargo xtask docs-rs`, which `.ci/run` uses to package and document every publishable crate,
//! so a new crate is checked as soon as it joins the workspace.

use std::path::Path;

use serde_json::Value;

/// The targets `cargo xtask docs-rs` prints: the two the workspace is built for.
pub(crate) const DOCS_RS_TARGETS_CHECKED: [&str; 2] =
    ["x86_64-unknown-linux-gnu", "x86_64-pc-windows-msvc"];

/// The targets docs.rs documents when a package names none (<https://docs.rs/about/metadata>).
const DOCS_RS_DEFAULT_TARGETS: [&str; 5] = [
    "x86_64-unknown-linux-gnu",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
    "aarch64-unknown-linux-gnu",
    "i686-pc-windows-msvc",
];

/// A package that may be published.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Publishable {
    pub(crate) name: String,
    pub(crate) docs_rs: DocsRs,
}

/// A package's `[package.metadata.docs.rs]`, the parts that choose what is documented.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DocsRs {
    default_target: Option<String>,
    targets: Option<Vec<String>>,
    features: Vec<String>,
    all_features: bool,
    no_default_features: bool,
}

impl DocsRs {
    /// From a package's `[package.metadata]` table.
    fn from_metadata(metadata: &Value) -> Self {
        // `[package.metadata.docs.rs]` is the table `rs` inside the table `docs`.
        let Some(table) = metadata.pointer("/docs/rs") else {
            return Self::default();
        };
        let strings = |key: &str| {
            table.get(key).and_then(Value::as_array).map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        };
        let flag = |key: &str| table.get(key).and_then(Value::as_bool).unwrap_or(false);
        Self {
            default_target: table
                .get("default-target")
                .and_then(Value::as_str)
                .map(str::to_owned),
            targets: strings("targets"),
            features: strings("features").unwrap_or_default(),
            all_features: flag("all-features"),
            no_default_features: flag("no-default-features"),
        }
    }

    /// The targets docs.rs documents, its landing page's first: `default-target` and then
    /// `targets`; without `default-target`, `targets` (its first is the landing page); without
    /// either, docs.rs's own list.
    pub(crate) fn targets(&self) -> Vec<&str> {
        let mut targets: Vec<&str> = Vec::new();
        if let Some(default) = &self.default_target {
            targets.push(default);
        }
        match &self.targets {
            Some(listed) => targets.extend(listed.iter().map(String::as_str)),
            None if self.default_target.is_none() => targets.extend(DOCS_RS_DEFAULT_TARGETS),
            None => {}
        }
        let mut seen = Vec::new();
        targets.retain(|target| {
            let new = !seen.contains(target);
            seen.push(*target);
            new
        });
        targets
    }

    /// The `cargo doc` flags that select the features docs.rs documents.
    pub(crate) fn feature_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.all_features {
            flags.push("--all-features".to_owned());
        }
        if self.no_default_features {
            flags.push("--no-default-features".to_owned());
        }
        if !self.features.is_empty() {
            flags.push("--features".to_owned());
            flags.push(self.features.join(","));
        }
        flags
    }
}

/// The packages of the workspace at `workspace` that may be published, in workspace order.
/// `publish = false` is `[]` in cargo's metadata; `null` (any registry) or a list of registries
/// is publishable.
pub(crate) fn publishable(workspace: &Path) -> Result<Vec<Publishable>, String> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .cargo_path(cargo_wfp::build::cargo_program())
        .current_dir(workspace)
        .no_deps()
        .exec()
        .map_err(|e| format!("cargo metadata failed: {e}"))?;
    let members: Vec<_> = metadata.workspace_packages().into_iter().collect();
    Ok(members
        .into_iter()
        .filter(|package| !package.publish.as_ref().is_some_and(Vec::is_empty))
        .map(|package| Publishable {
            name: package.name.to_string(),
            docs_rs: DocsRs::from_metadata(&package.metadata),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_rs_metadata() {
        let package: Value = serde_json::from_str(
            r#"{"docs":{"rs":{"default-target":"x86_64-pc-windows-msvc",
                "targets":["x86_64-pc-windows-msvc","x86_64-unknown-linux-gnu"],"features":["user","x"],
                "no-default-features":true}}}"#,
        )
        .unwrap();
        let wfp_rs = DocsRs::from_metadata(&package);
        assert_eq!(
            wfp_rs.targets(),
            ["x86_64-pc-windows-msvc", "x86_64-unknown-linux-gnu"]
        );
        assert_eq!(
            wfp_rs.feature_flags(),
            ["--no-default-features", "--features", "user,x"]
        );
        let in_house = DocsRs::from_metadata(&Value::Null);
        assert_eq!(in_house.targets(), DOCS_RS_DEFAULT_TARGETS);
        assert!(in_house.feature_flags().is_empty());
    }

    #[test]
    fn docs_rs_targets() {
        let only_default = DocsRs {
            default_target: Some("x86_64-pc-windows-msvc".into()),
            ..DocsRs::default()
        };
        assert_eq!(only_default.targets(), ["x86_64-pc-windows-msvc"]);
        let listed = DocsRs {
            targets: Some(vec!["x86_64-unknown-linux-gnu".into()]),
            all_features: true,
            ..DocsRs::default()
        };
        assert_eq!(listed.targets(), ["x86_64-unknown-linux-gnu"]);
        assert_eq!(listed.feature_flags(), ["--all-features"]);
    }
}
