//! Chooses the kernel backend: the real Windows kernel (`wfp_nt`) when compiling for Windows
//! without the `sim` feature, the host simulator (`wfp_sim`) everywhere else.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wfp_nt)");
    println!("cargo::rustc-check-cfg=cfg(wfp_sim)");
    println!("cargo::rerun-if-changed=build.rs");
    let windows = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "windows");
    let sim_feature = std::env::var_os("CARGO_FEATURE_SIM").is_some();
    if windows && !sim_feature {
        println!("cargo::rustc-cfg=wfp_nt");
    } else {
        println!("cargo::rustc-cfg=wfp_sim");
    }
}
