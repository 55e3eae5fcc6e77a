//! # wfp-rs
//!
//! Write Windows Filtering Platform callout drivers in Rust, with the IRQL rules that crash C
//! drivers checked by the compiler, and test them on any host in a simulator that stops where
//! Windows would bugcheck.
//!
//! - [`irql`]: tokens that prove an upper bound on the IRQL, so that a `PASSIVE_LEVEL`-only call
//!   from code that may run at `DISPATCH_LEVEL` does not compile.
//! - [`driver`]: `DriverEntry` and unload glue ([`driver_entry`]).
//! - [`spin_lock`], [`event`], [`work_item`], [`pool`]: the kernel services a callout driver
//!   uses, each taking the IRQL token it needs; [`time`]: the monotonic interrupt-time clock.
//! - [`sys`]: the raw kernel ABI, with two backends: the real kernel (`nt`, when compiling for
//!   Windows) and the host simulator (everywhere else, or with the `sim` feature).
//! - The simulator (boot a simulated machine, load drivers, assert bug checks) is its own crate,
//!   `wfp-rs-sim`: a driver's tests add it to `[dev-dependencies]`.
//! - [`port`], [`inverted`], [`control`]: talking to a user-mode service — filter-manager ports,
//!   the inverted call (requests pended by the service, completed by the driver) and commands
//!   (requests the driver answers at once).
//! - `user` (feature `user`): the user-mode service's side of ports, the inverted call and
//!   commands, on Windows or against a simulated machine in another process.
//!
//! The guides in the repository's `docs/` folder start from the bug this crate was built to
//! prevent: `FltSendMessage` called from `classifyFn` at `DISPATCH_LEVEL`.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

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

pub mod bugcheck;
pub mod callout;
pub mod classify;
pub mod control;
pub mod debug;
mod dispatch;
pub mod driver;
pub mod engine;
pub mod event;
pub mod filter;
pub mod guid;
pub mod inverted;
pub mod irql;
pub mod layer;
pub mod metadata;
pub mod pend;
pub mod pool;
pub mod port;
mod secure_device;
pub mod spin_lock;
pub mod status;
pub mod sys;
pub mod time;
pub mod work_item;

// What the simulator (the `wfp-rs-sim` crate) needs from inside the SDK; not API.
#[cfg(wfp_sim)]
#[doc(hidden)]
pub mod __sim;

// The user-mode side needs the bridge's Unix domain socket in the simulator backend.
#[cfg(all(feature = "user", any(wfp_nt, unix)))]
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
