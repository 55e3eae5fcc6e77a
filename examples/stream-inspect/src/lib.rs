//! Stream inspection: logs the HTTP `Host` header of outbound connections to port 80 and blocks
//! the flows whose host is denied.
//!
//! `DriverEntry` registers one callout at `STREAM_V4` and one at `STREAM_V6`, and adds, in a
//! dynamic session, a provider, a sublayer, the callout entries and a filter per layer that
//! hands the callouts the stream data of TCP connections to remote port [`HTTP_PORT`].
//!
//! The callout looks at a flow's first outbound data only: it reads up to
//! [`http::SCAN_LIMIT`] bytes through [`Classify::stream`] (the bytes may lie in several MDLs;
//! the view reads across them), finds the request's `Host` header ([`http::request_host`]),
//! logs `stream-inspect: host <name>`, and blocks the data if the name is denied. The verdict is
//! kept as the flow's context, so the rest of a denied flow — in both directions — is blocked
//! too, and the rest of a permitted one passes without being searched again. Data without a
//! recognisable request (not HTTP, cut short, no `Host`) is permitted.
//!
//! The deny list is the `DeniedHosts` string value under the driver's `Parameters` registry key
//! (host names separated by commas or spaces; see [`http::is_denied`]), read once at load;
//! without it, [`DEFAULT_DENIED_HOSTS`].
//!
//! What this example does not do: it cannot ask the filter engine for more data
//! (`FWPS_STREAM_ACTION_NEED_MORE_DATA`) or drop the connection
//! (`FWPS_STREAM_ACTION_DROP_CONNECTION`): the SDK's stream view is read-only. So a `Host`
//! header that arrives after the first indication is not seen, and a denied flow's data is
//! blocked, indication by indication, rather than the connection reset. Later requests on a
//! kept-alive connection are not searched.
//!
//! Build and check the kernel image: `cargo wfp build --release -p stream-inspect`.
//! Run it in the simulator: `cargo test -p stream-inspect`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod http;

use alloc::string::String;

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter, FilterAction, Match};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{Field, Layer, StreamLayer, StreamV4, StreamV6, fields};
use wfp_rs::packet::StreamData;
use wfp_rs::{Guid, Status, guid, kd_print};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator =
    wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"StIn"));

/// The remote port whose streams are inspected: plain HTTP.
pub const HTTP_PORT: u16 = 80;

/// The registry value (under the driver's `Parameters` key) holding the deny list.
pub const DENIED_HOSTS_PARAMETER: &str = "DeniedHosts";

/// The deny list when the registry has none (`.example` names are reserved for examples).
pub const DEFAULT_DENIED_HOSTS: &str = "blocked.example";

/// The weight of the driver's sublayer.
pub const SUBLAYER_WEIGHT: u16 = 0x7E00;

/// The provider that owns the driver's sublayer, callouts and filters.
pub const PROVIDER: Guid = guid!("bd3acabb-d376-4c2c-83f9-0ac4e5495f7b");
/// The driver's sublayer.
pub const SUBLAYER: Guid = guid!("84c3adca-ea1c-481b-9255-6274a30f949f");
/// The callout at `STREAM_V4`.
pub const CALLOUT_V4: CalloutKey<StreamV4> =
    CalloutKey::new(guid!("7d064c55-db96-436a-b40a-4b764e6e80d0"));
/// The callout at `STREAM_V6`.
pub const CALLOUT_V6: CalloutKey<StreamV6> =
    CalloutKey::new(guid!("a92018e8-08a2-4f91-956a-a6dc8e1053a4"));
/// The filter that hands IPv4 streams to port 80 to [`CALLOUT_V4`].
pub const FILTER_V4: Guid = guid!("ae1ff8f0-e64b-4877-b371-39bc387d35b9");
/// The filter that hands IPv6 streams to port 80 to [`CALLOUT_V6`].
pub const FILTER_V6: Guid = guid!("c7cffc9c-4eb0-4f5c-9077-1e2f5e232542");

/// What the callout decided for a flow, kept as the flow's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    /// The first request was permitted: the rest of the flow passes unsearched.
    Permitted,
    /// The first request named a denied host: the rest of the flow is blocked.
    Denied,
}

/// The callout: one type for both IP versions.
pub struct HostInspector {
    /// The deny list, as [`http::is_denied`] reads it.
    denied: String,
}

impl HostInspector {
    /// The verdict for a flow's first outbound data, logging the host it names; `None` when
    /// the data could not be read (the next data of the flow is looked at instead).
    fn inspect(&self, stream: &StreamData<'_>) -> Option<FlowVerdict> {
        let mut buffer = [0u8; http::SCAN_LIMIT];
        let length = stream.len().min(http::SCAN_LIMIT);
        let scanned = buffer.get_mut(..length)?;
        if let Err(error) = stream.read(0, scanned) {
            kd_print!(Error, "stream-inspect: unreadable stream data: {error}\n");
            return None;
        }
        let Some(host) = http::request_host(scanned) else {
            return Some(FlowVerdict::Permitted);
        };
        kd_print!("stream-inspect: host {host}\n");
        if http::is_denied(host, &self.denied) {
            kd_print!("stream-inspect: blocked {host}\n");
            Some(FlowVerdict::Denied)
        } else {
            Some(FlowVerdict::Permitted)
        }
    }
}

impl<L: StreamLayer> Callout<L, FlowVerdict> for HostInspector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L, FlowVerdict>) {
        let verdict = match c.flow_context().copied() {
            Some(known) => Some(known),
            None => match c.stream() {
                // Only the client's request names the host.
                Some(stream) if stream.flags() & wfp_rs::sys::FWPS_STREAM_FLAG_SEND != 0 => {
                    self.inspect(&stream).inspect(|&verdict| {
                        // Without a context (no memory, no flow handle) the flow's next data is
                        // inspected again: slower, not wrong.
                        let _ = c.associate_flow_context(irql, verdict);
                    })
                }
                _ => None,
            },
        };
        if verdict == Some(FlowVerdict::Denied) {
            c.out.block();
        } else {
            // A soft permit; without the write right a heavier decision stands.
            let _ = c.out.permit();
        }
    }
}

/// What the driver keeps while it is loaded.
pub struct StreamInspect {
    /// The dynamic session that added the provider, sublayer, callout entries and filters:
    /// closing it deletes them all.
    pub engine: Engine,
    /// The callout at `STREAM_V4`.
    pub v4: CalloutRegistration<StreamV4, HostInspector, FlowVerdict>,
    /// The callout at `STREAM_V6`.
    pub v6: CalloutRegistration<StreamV6, HostInspector, FlowVerdict>,
}

impl DriverState for StreamInspect {
    fn unload(self, irql: &mut PassiveLevel<'_>) {
        let StreamInspect { engine, v4, v6 } = self;
        // The filters go first: a terminating filter whose callout is unregistered blocks.
        if let Err(status) = engine.close(irql) {
            kd_print!(
                Error,
                "stream-inspect: closing the session failed: {status}\n"
            );
        }
        // Unregistering removes the flow contexts still attached.
        if let Err((_, status)) = v4.unregister(&mut *irql) {
            kd_print!(
                Error,
                "stream-inspect: unregistering (IPv4) failed: {status}\n"
            );
        }
        if let Err((_, status)) = v6.unregister(irql) {
            kd_print!(
                Error,
                "stream-inspect: unregistering (IPv6) failed: {status}\n"
            );
        }
    }
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<StreamInspect, Status> {
    let denied = match driver.parameter(irql, DENIED_HOSTS_PARAMETER)? {
        Some(configured) => configured,
        None => String::from(DEFAULT_DENIED_HOSTS),
    };
    kd_print!("stream-inspect: denying {denied}\n");
    let v4 = CalloutRegistration::register(
        irql,
        driver,
        CALLOUT_V4,
        HostInspector {
            denied: denied.clone(),
        },
    )?;
    let v6 = CalloutRegistration::register(irql, driver, CALLOUT_V6, HostInspector { denied })?;

    let engine = Engine::open(
        irql,
        SessionOptions::new()
            .dynamic()
            .name("wfp-rs stream-inspect"),
    )?;
    let txn = engine.transaction(irql)?;
    txn.add_provider(irql, &Provider::new(PROVIDER).name("wfp-rs stream-inspect"))?;
    txn.add_sublayer(
        irql,
        &Sublayer::new(SUBLAYER)
            .name("wfp-rs stream-inspect")
            .provider(PROVIDER)
            .weight(SUBLAYER_WEIGHT),
    )?;
    add_stream_filter(irql, &txn, CALLOUT_V4, FILTER_V4, "stream-inspect (IPv4)")?;
    add_stream_filter(irql, &txn, CALLOUT_V6, FILTER_V6, "stream-inspect (IPv6)")?;
    txn.commit(irql)?;
    Ok(StreamInspect { engine, v4, v6 })
}

/// Adds the callout entry `callout` at its layer `L` and the filter `filter` that hands it the
/// streams to remote port [`HTTP_PORT`].
#[inline(never)]
fn add_stream_filter<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    filter: Guid,
    name: &str,
) -> Result<(), Status>
where
    fields::IpRemotePort: Field<L>,
{
    engine.add_callout(
        irql,
        &CalloutEntry::new(callout).name(name).provider(PROVIDER),
    )?;
    engine.add_filter(
        irql,
        &Filter::<L>::new(filter)
            .name(name)
            .provider(PROVIDER)
            .sublayer(SUBLAYER)
            .action(FilterAction::CalloutTerminating(callout))
            .condition::<fields::IpRemotePort>(Match::Equal(HTTP_PORT)),
    )?;
    Ok(())
}
