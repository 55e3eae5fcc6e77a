//! Link flags that turn the cdylib into a kernel driver image when building for Windows.
//! (`rust-lld` in lld-link mode is configured in `.cargo/config.toml`.)

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-pc-windows-msvc") {
        for arg in [
            "/SUBSYSTEM:NATIVE,10.00",
            "/DRIVER:WDM",
            "/ENTRY:DriverEntry",
            "/NODEFAULTLIB",
            "/RELEASE",
            "/MERGE:.rdata=.text",
        ] {
            println!("cargo::rustc-cdylib-link-arg={arg}");
        }
    }
}
