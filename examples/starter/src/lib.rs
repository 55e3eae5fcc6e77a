//! The starter callout driver: logs every outbound TCP connection and blocks those to remote
//! port [`BLOCKED_PORT`].
//!
//! `DriverEntry` registers one callout for `ALE_AUTH_CONNECT_V4` and one for `_V6`, then adds,
//! in a dynamic session and one transaction, a provider, a sublayer, the two callout entries and
//! two filters that hand outbound TCP connection attempts to the callouts. Unload closes the
//! session, which deletes those objects, and then unregisters the callouts.
//!
//! The log goes to the kernel debugger at `DPFLTR_INFO_LEVEL`, which Windows filters out by
//! default: set `Kd_IHVDRIVER_Mask` to 0xF in the debugger, or the `IHVDRIVER` value under the
//! `Debug Print Filter` registry key, to see it.
//!
//! Copy it to start a driver. Generate your own keys (`uuidgen`): they name your objects in the
//! filter engine of every machine the driver runs on.
//!
//! Build and check the kernel image: `cargo wfp build --release -p starter` (`cargo install
//! cargo-wfp`).
//! Run it in the simulator: `cargo test -p starter`.

#![no_std]

// For `alloc` types (`Vec`, `Arc`, `Box`) in your own code; the SDK's management API allocates
// too. In the kernel image both are served by the pool allocator below.
extern crate alloc;

use core::net::{IpAddr, SocketAddr};

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::{BlockOutcome, RightsError};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, Match};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::value::{AppId, IpProtocol};
use wfp_rs::layer::{AleAuthConnectV4, AleAuthConnectV6, Field, Layer, fields};
use wfp_rs::{Guid, Status, guid, kd_print};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator =
    wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"Strt"));

/// Outbound TCP connections to this remote port are blocked.
pub const BLOCKED_PORT: u16 = 1234;

/// The weight of the starter's sublayer. Sublayers are evaluated from the highest weight down,
/// and a hard decision in a heavier one binds this one.
pub const SUBLAYER_WEIGHT: u16 = 0x7F00;

/// The provider that owns the starter's sublayer, callouts and filters.
pub const PROVIDER: Guid = guid!("a71784a1-4ff0-456c-9615-854560ca70b1");
/// The starter's sublayer.
pub const SUBLAYER: Guid = guid!("2404c309-6a0f-458d-a211-a7aa55b567f0");
/// The callout at `ALE_AUTH_CONNECT_V4`.
pub const CALLOUT_V4: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("016e29f9-c38f-4162-8149-429b682cfc91"));
/// The callout at `ALE_AUTH_CONNECT_V6`.
pub const CALLOUT_V6: CalloutKey<AleAuthConnectV6> =
    CalloutKey::new(guid!("29d5205e-eacd-4702-a437-f7f997a17eb6"));
/// The filter that sends outbound IPv4 TCP connections to [`CALLOUT_V4`].
pub const FILTER_V4: Guid = guid!("5f16eba0-8c06-4fa5-87ec-782cafdf2541");
/// The filter that sends outbound IPv6 TCP connections to [`CALLOUT_V6`].
pub const FILTER_V6: Guid = guid!("e864c824-82db-4ed2-b12d-8e9620d7ed2b");

/// The callout: logs each connection it is asked about, blocks [`BLOCKED_PORT`] and permits
/// the rest. One type serves both IP versions; the bounds say which fields it reads.
pub struct ConnectPolicy;

impl<L: Layer> Callout<L> for ConnectPolicy
where
    L::Address: Into<IpAddr>,
    fields::IpRemoteAddress: Field<L>,
    fields::IpRemotePort: Field<L>,
{
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let (Ok(address), Ok(port)) = (
            c.values.get::<fields::IpRemoteAddress>(),
            c.values.get::<fields::IpRemotePort>(),
        ) else {
            // ALE_AUTH_CONNECT always delivers both. Returning without a decision would block
            // (this is a terminating callout), so fail open instead.
            let _ = c.out.permit();
            return;
        };
        let verdict = if port == BLOCKED_PORT {
            match c.out.block() {
                BlockOutcome::Blocked => "blocked",
                // A heavier sublayer permitted hard; a callout's block still overrides that.
                BlockOutcome::Vetoed => "blocked (veto of a hard permit)",
                BlockOutcome::AlreadyBlocked => "already blocked by a hard decision",
            }
        } else {
            // A soft permit: a lighter sublayer may still block. Without the write right,
            // `permit` changes nothing and reports why.
            match c.out.permit() {
                Ok(()) => "permitted",
                Err(RightsError::NoWriteRight { .. }) => "not permitted: a hard decision stands",
            }
        };
        kd_print!(
            "starter: pid {} {} -> {}: {verdict}\n",
            c.metadata.process_id().unwrap_or_default(),
            c.metadata.process_path().unwrap_or(AppId::from_bytes(&[])),
            SocketAddr::new(address.into(), port),
        );
    }
}

/// What the driver keeps while it is loaded.
pub struct Starter {
    /// The dynamic session that added the provider, the sublayer, the callout entries and the
    /// filters: closing it deletes them all.
    pub engine: Engine,
    /// The callout at `ALE_AUTH_CONNECT_V4`.
    pub v4: CalloutRegistration<AleAuthConnectV4, ConnectPolicy>,
    /// The callout at `ALE_AUTH_CONNECT_V6`.
    pub v6: CalloutRegistration<AleAuthConnectV6, ConnectPolicy>,
}

impl DriverState for Starter {
    fn unload(self, irql: &mut PassiveLevel<'_>) {
        let Starter { engine, v4, v6 } = self;
        // The filters go first, with the dynamic session: a terminating filter whose callout
        // is unregistered blocks everything it matches.
        if let Err(status) = engine.close(irql) {
            kd_print!(Error, "starter: closing the session failed: {status}\n");
        }
        if let Err((_, status)) = v4.unregister(&mut *irql) {
            kd_print!(Error, "starter: unregistering (IPv4) failed: {status}\n");
        }
        if let Err((_, status)) = v6.unregister(irql) {
            kd_print!(Error, "starter: unregistering (IPv6) failed: {status}\n");
        }
    }
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Starter, Status> {
    // Registered before the filters that name them exist, so no connection meets a filter
    // whose callout is missing (it would be blocked).
    let v4 = CalloutRegistration::register(irql, driver, CALLOUT_V4, ConnectPolicy)?;
    let v6 = CalloutRegistration::register(irql, driver, CALLOUT_V6, ConnectPolicy)?;

    // Dynamic: closing the session deletes everything added in it, so neither unload nor an
    // error below needs a list of what to delete.
    let engine = Engine::open(irql, SessionOptions::new().dynamic().name("wfp-rs starter"))?;
    // All or nothing: dropped on an error, the transaction is aborted.
    let txn = engine.transaction(irql)?;
    txn.add_provider(irql, &Provider::new(PROVIDER).name("wfp-rs starter"))?;
    txn.add_sublayer(
        irql,
        &Sublayer::new(SUBLAYER)
            .name("wfp-rs starter")
            .provider(PROVIDER)
            .weight(SUBLAYER_WEIGHT),
    )?;
    add_connect_filter(irql, &txn, CALLOUT_V4, FILTER_V4, "starter (IPv4)")?;
    add_connect_filter(irql, &txn, CALLOUT_V6, FILTER_V6, "starter (IPv6)")?;
    txn.commit(irql)?;

    kd_print!("starter: watching outbound TCP connections, blocking port {BLOCKED_PORT}\n");
    Ok(Starter { engine, v4, v6 })
}

/// Adds the callout entry `callout` at its layer `L` and the filter `filter` that hands it every
/// TCP connection attempt.
pub fn add_connect_filter<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    filter: Guid,
    name: &str,
) -> Result<(), Status>
where
    fields::IpProtocol: Field<L>,
{
    add_callout_entry::<L>(irql, engine, callout, name)?;
    engine.add_filter(irql, &tcp_filter::<L>(filter, callout, name))?;
    Ok(())
}

/// Adds the callout entry `callout` at layer `L`.
///
/// This and [`tcp_filter`] are functions of their own to keep the stack shallow: in a debug
/// build each builder step is a copy on the stack, and those copies must not lie under
/// [`Engine::add_filter`], the deepest path when the driver loads. `cargo wfp build -p starter`
/// checks it
/// ([building a driver image](https://github.com/wfp-rs/wfp-rs/blob/main/docs/building-drivers.md)).
#[inline(never)]
fn add_callout_entry<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    name: &str,
) -> Result<(), Status> {
    engine.add_callout(
        irql,
        &CalloutEntry::new(callout).name(name).provider(PROVIDER),
    )?;
    Ok(())
}

/// The terminating filter `filter` that hands `callout` every TCP connection attempt.
#[inline(never)]
fn tcp_filter<'a, L: Layer>(filter: Guid, callout: CalloutKey<L>, name: &'a str) -> Filter<'a, L>
where
    fields::IpProtocol: Field<L>,
{
    Filter::<L>::new(filter)
        .name(name)
        .provider(PROVIDER)
        .sublayer(SUBLAYER)
        .action(FilterAction::CalloutTerminating(callout))
        .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
}
