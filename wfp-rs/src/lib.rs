//! Write Windows Filtering Platform (WFP) callout drivers in Rust, with the IRQL rules that crash
//! C drivers checked by the compiler, and test them on any host in a simulator that stops where
//! Windows would bug check.
//!
//! The bug this crate was built for: a callout's `classifyFn` asks a user-mode service for a
//! verdict with `FltSendMessage`. `classifyFn` may run at `DISPATCH_LEVEL`; `FltSendMessage`
//! requires `IRQL <= APC_LEVEL`; the machine bug checks. Here a callback that may run at
//! `DISPATCH_LEVEL` holds a [`&DispatchLevel`](irql::DispatchLevel) token, every kernel service
//! states the IRQL it needs in its signature, and the mistake is a compile error that says to
//! queue a [work item](work_item).
//!
//! No Windows Driver Kit and no Visual Studio are needed: the kernel image links on any host with
//! the LLVM linker rustup ships.
//!
//! # Quick start
//!
//! The shortest path is [`cargo wfp`](https://crates.io/crates/cargo-wfp), which writes a driver
//! crate that builds and tests as generated:
//!
//! ```sh
//! cargo install cargo-wfp
//! rustup target add x86_64-pc-windows-msvc     # once: the kernel image's target
//! cargo wfp new my-driver --template callout   # or minimal, firewall
//! cd my-driver
//! cargo test                                   # the driver in the simulator
//! cargo wfp build --release                    # target/.../my_driver.sys, checked
//! cargo wfp package --release                  # .sys, INF, test signature, install steps
//! ```
//!
//! By hand, a driver crate is four pieces.
//!
//! **The manifest.** The library is a `cdylib` (the `.sys` image when built for
//! `x86_64-pc-windows-msvc`) and an `rlib` (the same driver as a library the simulator loads in
//! tests). Kernel code cannot unwind, so both profiles abort on panic.
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [features]
//! # Tests on a Windows host: `cargo test --features sim`.
//! sim = ["wfp-rs/sim", "wfp-rs-sim/sim"]
//!
//! [dependencies]
//! wfp-rs = "0.1"
//!
//! [build-dependencies]
//! wfp-rs-build = "0.1"
//!
//! [dev-dependencies]
//! wfp-rs-sim = "0.1"
//!
//! [profile.dev]
//! panic = "abort"
//!
//! [profile.release]
//! panic = "abort"
//! ```
//!
//! **The build script** (`build.rs`) adds the kernel image's linker arguments when the target is
//! Windows, and nothing otherwise ([`wfp-rs-build`](https://docs.rs/wfp-rs-build)):
//!
//! ```no_run
//! fn main() {
//!     wfp_rs_build::driver();
//! }
//! ```
//!
//! **The driver** (`src/lib.rs`): a callout at `ALE_AUTH_CONNECT_V4` that blocks outbound TCP
//! connections to port 1234, and the filter that hands it every outbound TCP connection. The
//! filter is added in a dynamic session, so closing the session at unload deletes it.
//!
//! ```
//! #![no_std]
//! extern crate alloc;
//!
//! use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
//! use wfp_rs::driver::{Driver, DriverState};
//! use wfp_rs::engine::{Engine, SessionOptions};
//! use wfp_rs::filter::{Filter, FilterAction, Match};
//! use wfp_rs::irql::{DispatchLevel, PassiveLevel};
//! use wfp_rs::layer::{AleAuthConnectV4, fields, value::IpProtocol};
//! use wfp_rs::{Status, guid};
//!
//! // The kernel image allocates from the pool (the management API allocates too).
//! #[cfg(all(windows, not(feature = "sim")))]
//! #[global_allocator]
//! static ALLOCATOR: wfp_rs::pool::PoolAllocator =
//!     wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"MyDr"));
//!
//! // Your own keys (`uuidgen`): they name your objects in the filter engine of every machine.
//! pub const CALLOUT: CalloutKey<AleAuthConnectV4> =
//!     CalloutKey::new(guid!("7d1c5e0a-9f0b-4e8a-a1f2-3b6c8d9e0f11"));
//! pub const FILTER: wfp_rs::Guid = guid!("2a4f6b8c-0d1e-4f3a-b5c7-d9e1f3a5b7c9");
//!
//! pub struct BlockPort1234;
//!
//! impl Callout<AleAuthConnectV4> for BlockPort1234 {
//!     fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
//!         if c.values.get::<fields::IpRemotePort>() == Ok(1234) {
//!             c.out.block();
//!         } else {
//!             // Without the write right a heavier filter has decided; permit changes nothing.
//!             let _ = c.out.permit();
//!         }
//!     }
//! }
//!
//! pub struct MyDriver {
//!     engine: Engine,
//!     callout: CalloutRegistration<AleAuthConnectV4, BlockPort1234>,
//! }
//!
//! impl DriverState for MyDriver {
//!     fn unload(self, irql: &mut PassiveLevel<'_>) {
//!         // The filter goes first: a terminating filter without its callout blocks everything.
//!         let _ = self.engine.close(irql);
//!         let _ = self.callout.unregister(irql);
//!     }
//! }
//!
//! #[wfp_rs::driver_entry]
//! fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<MyDriver, Status> {
//!     let callout = CalloutRegistration::register(irql, driver, CALLOUT, BlockPort1234)?;
//!     let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
//!     engine.add_callout(irql, &wfp_rs::engine::CalloutEntry::new(CALLOUT))?;
//!     engine.add_filter(
//!         irql,
//!         &Filter::<AleAuthConnectV4>::new(FILTER)
//!             .action(FilterAction::CalloutTerminating(CALLOUT))
//!             .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp)),
//!     )?;
//!     Ok(MyDriver { engine, callout })
//! }
//! # fn main() {}
//! ```
//!
//! **A test** (`tests/block.rs`): [`wfp-rs-sim`](https://docs.rs/wfp-rs-sim) boots a simulated
//! Windows kernel in the test process, loads the driver through the `DriverEntry` that
//! [`#[driver_entry]`](driver_entry) generated, and classifies connections at the IRQL you choose.
//! A driver that breaks a kernel rule stops the simulated machine with the bug check Windows would
//! raise.
//!
//! ```rust,ignore
//! use wfp_rs::classify::Action;
//! use wfp_rs::irql::Irql;
//! use wfp_rs::layer::{AleAuthConnectV4, fields, value::IpProtocol};
//! use wfp_rs_sim::{ClassifyRequest, Machine};
//!
//! #[test]
//! fn blocks_port_1234() {
//!     let machine = Machine::new();
//!     let driver = machine.load_driver("my-driver", my_driver::DriverEntry).expect("loads");
//!     let connect = |port: u16| {
//!         ClassifyRequest::<AleAuthConnectV4>::new()
//!             .with::<fields::IpProtocol>(IpProtocol::Tcp)
//!             .with::<fields::IpRemotePort>(port)
//!     };
//!     assert_eq!(machine.classify(Irql::DISPATCH, &connect(1234)).action, Action::Block);
//!     assert_eq!(machine.classify(Irql::DISPATCH, &connect(443)).action, Action::Permit);
//!     machine.unload_driver(driver).expect("unloads without leaks");
//! }
//! ```
//!
//! **The kernel image**: `cargo wfp build --release` builds the crate for
//! `x86_64-pc-windows-msvc` (rustup installs the target; no `.cargo/config.toml` needed), writes
//! `my_driver.sys` and checks it: native subsystem, WDM driver, imports only from kernel modules,
//! and a worst-case stack depth within the kernel stack. `cargo wfp package` writes an
//! installable folder: the `.sys`, its INF, a test signature where `osslsigncode` is installed,
//! and the Windows commands to install it ([building a driver image]).
//!
//! # Guides
//!
//! - [Getting started](https://github.com/wfp-rs/wfp-rs/blob/main/docs/getting-started.md):
//!   from an empty folder to a driver that blocks a port — changed, tested in the simulator,
//!   built as a `.sys`, packaged, and installed on Windows, every command shown.
//! - [The IRQL model](https://github.com/wfp-rs/wfp-rs/blob/main/docs/irql.md): tokens,
//!   bounds, raising and lowering, and what the compiler rejects.
//! - [Writing a callout](https://github.com/wfp-rs/wfp-rs/blob/main/docs/callouts.md): layers
//!   and fields, classify, registration, filters, `DriverEntry` and unload order.
//! - [Asynchronous decisions](https://github.com/wfp-rs/wfp-rs/blob/main/docs/async-decisions.md):
//!   asking user mode without blocking `classifyFn` — pend, work items, ports, the inverted call,
//!   the question channel.
//! - [The simulator](https://github.com/wfp-rs/wfp-rs/blob/main/docs/simulator.md): what it
//!   simulates, the bug checks it raises, and how to test a driver with it.
//! - [Building a driver image]: manifest, build script, linking, the stack check, installing.
//! - [The example firewall](https://github.com/wfp-rs/wfp-rs/blob/main/docs/firewall.md): the
//!   whole allow/deny system, and how to install it on Windows.
//! - [Benchmarks](https://github.com/wfp-rs/wfp-rs/blob/main/docs/benchmarks.md): the ways to
//!   ask user mode, measured against each other.
//!
//! [building a driver image]: https://github.com/wfp-rs/wfp-rs/blob/main/docs/building-drivers.md
//!
//! # Examples
//!
//! - [`minimal-driver`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/minimal-driver):
//!   the smallest driver — entry, spin lock, work items, clean unload.
//! - [`starter`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/starter): the classic
//!   starter callout — logs outbound TCP connections, blocks remote port 1234.
//! - [`seed-fixed`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/seed-fixed): the bug
//!   above, fixed twice — pend, ask the service through the question channel from classify
//!   (or over a port from a work item), complete, answer the reauthorization.
//! - [`stream-inspect`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/stream-inspect):
//!   stream inspection — logs the HTTP `Host` of outbound connections, blocks a deny list.
//! - [`firewall`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/firewall): the example
//!   firewall — driver, user-mode service, wire protocol, rules and benchmarks.
//! - [`sim-demo`](https://github.com/wfp-rs/wfp-rs/tree/main/examples/sim-demo): loads a
//!   driver into the simulator and shows the verifier stopping a bad one.
//!
//! # Modules
//!
//! - [`irql`]: tokens that prove an upper bound on the IRQL, so that a `PASSIVE_LEVEL`-only call
//!   from code that may run at `DISPATCH_LEVEL` does not compile.
//! - [`driver`]: `DriverEntry` and unload glue ([`driver_entry`]).
//! - [`callout`], [`layer`], [`classify`], [`metadata`]: callouts, the typed fields of each
//!   layer, the classify decision, and the metadata of a classification.
//! - [`engine`], [`filter`]: the filter engine's management API — sessions, transactions,
//!   providers, sublayers, callout entries and typed filters.
//! - [`pend`]: pending a classification and completing it later.
//! - [`spin_lock`], [`event`], [`work_item`], [`pool`], [`time`]: the kernel services a callout
//!   driver uses, each taking the IRQL token it needs.
//! - The simulator (boot a simulated machine, load drivers, assert bug checks) is its own crate,
//!   `wfp-rs-sim`: a driver's tests add it to `[dev-dependencies]`.
//! - [`port`], [`inverted`], [`control`]: talking to a user-mode service — filter-manager ports,
//!   the inverted call (requests pended by the service, completed by the driver) and commands
//!   (requests the driver answers at once).
//! - [`ask`]: the question channel — ask the service from `classifyFn` without a work item or a
//!   blocked thread, with a deadline per question and exactly one decision each.
//! - `user` (feature `user`): the service's side of ports, the inverted call, commands and the
//!   question channel.
//! - [`guid`](mod@guid), [`status`], [`debug`], [`bugcheck`]: GUIDs ([`guid!`] checks them at compile
//!   time), `NTSTATUS`, the kernel debugger's output ([`kd_print!`]), bug checks.
//! - [`sys`]: the raw kernel ABI under all of this.
//!
//! # Feature flags
//!
//! - **`user`**: the user-mode side, for the service that talks to your driver — connecting to
//!   its ports, keeping inverted-call requests pending, sending commands. It links `std`, so a
//!   driver crate must not enable it: build the driver and the service as separate packages
//!   (`cargo wfp build -p <driver>`). On Windows it calls Win32; elsewhere it talks to a
//!   simulated machine in another process.
//! - **`sim`**: build against the simulator even when compiling for Windows, to run a driver's
//!   tests on a Windows host (`cargo test --features sim`). On every other host the simulator is
//!   the only backend and the feature changes nothing.
//!
//! # Two backends, one driver
//!
//! Your driver and this crate's safe layer are the same code everywhere. Under them, [`sys`] is
//! either
//!
//! - **the Windows kernel**, when compiling for Windows without `sim`: `#[repr(C)]` types pinned
//!   to the WDK's x64 layouts and imports from `ntoskrnl.exe`, `fwpkclnt.sys`, `fltmgr.sys`,
//!   `netio.sys` and `cng.sys` — this is the kernel image; or
//! - **the simulator** ([`wfp-rs-sim`](https://docs.rs/wfp-rs-sim)), everywhere else: the same
//!   kernel functions implemented in Rust. It tracks the IRQL of every thread, runs work items on
//!   system worker threads, accounts for every pool block, and stops with the real bug check
//!   code wherever Windows with Driver Verifier would.
//!
//! The documentation on docs.rs defaults to the Windows target, that is the real kernel; the
//! Linux build shows the simulator backend. Items marked *Windows and non-crate feature `sim`*
//! exist only in the kernel image; items marked *non-Windows or crate feature `sim`* only with
//! the simulator.

#![no_std]
#![allow(
    clippy::needless_doctest_main,
    reason = "the quick start shows a build script, and its `main` is the point"
)]
// docs.rs (and `.ci/run`) pass `--cfg docsrs` on nightly: label items with the configuration
// they need in user terms — the backend cfgs are internal, so their labels are written out.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(docsrs, doc(auto_cfg(hide(wfp_nt, wfp_sim))))]

extern crate alloc;
// The proc macros name this crate `::wfp_rs`, also when used inside it.
extern crate self as wfp_rs;
// The simulator backend is host code: its hooks for the simulator use std.
#[cfg(wfp_sim)]
#[macro_use]
extern crate std;
// The user-mode client is host code too; with the simulator backend std is linked already.
#[cfg(all(feature = "user", not(wfp_sim)))]
extern crate std;

pub mod ask;
pub mod bugcheck;
pub mod callout;
pub mod classify;
pub mod client;
pub mod control;
pub mod debug;
mod dispatch;
pub mod driver;
pub mod engine;
pub mod event;
pub mod filter;
pub mod guid;
pub mod inject;
pub mod inverted;
pub mod irql;
pub mod layer;
pub mod metadata;
pub mod packet;
pub mod pend;
pub mod pool;
pub mod port;
pub mod redirect;
mod registry;
mod secure_device;
pub mod spin_lock;
pub mod status;
pub mod sys;
pub mod time;
pub mod timer;
mod unicode;
pub mod work_item;

// What the simulator (the `wfp-rs-sim` crate) needs from inside the SDK; not API.
#[cfg(wfp_sim)]
#[doc(hidden)]
pub mod __sim;

// The user-mode side needs the bridge's Unix domain socket in the simulator backend.
#[cfg(all(feature = "user", any(wfp_nt, unix)))]
#[cfg_attr(docsrs, doc(cfg(feature = "user")))]
pub mod user;

#[doc(hidden)]
pub mod panic;

pub use guid::Guid;
pub use status::Status;
pub use wfp_rs_macros::{driver_entry, guid};

#[doc(hidden)]
pub mod __private {
    pub use crate::guid::Guid;
    pub use crate::sys::GUID;
}

// The crates.io page's code, compiled (its simulator test waits for wfp-rs-sim).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
