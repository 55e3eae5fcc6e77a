//! Links the cdylib as a Windows kernel driver image when building for Windows.

fn main() {
    wfp_rs_build::driver();
}
