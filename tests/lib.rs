//! Workspace integration tests for wfp-rs: simulator scenarios (`verifier`, `driver_lifecycle`),
//! compile-fail UI tests (`ui`) and checks of the driver image built for Windows
//! (`driver_image`). The simulator tests run wherever the simulator backend is selected: on any
//! non-Windows host, and on Windows with `--features sim`.
