//! The templates are embedded with `include_dir!`, which cargo does not know reads files:
//! rebuild the crate when any of them changes.

fn main() {
    println!("cargo::rerun-if-changed=templates");
}
