//! Cloning a classified packet and injecting it back: what lets a callout hold a packet (pend,
//! ask someone) and let it through later.
//!
//! A callout that pends at ALE_AUTH_RECV_ACCEPT absorbs the connection's packet; completing the
//! pend does not bring it back (there is no reauthorization there). To let the connection
//! through, the callout **clones** the packet while it classifies it
//! ([`Classify::clone_for_receive`]), and once it has decided, **injects** the clone into the
//! receive path ([`ReceiveClone::inject`], `FwpsInjectTransportReceiveAsync0`). The injected
//! packet crosses the layers again — this callout included — so the callout first asks whether
//! a packet is its own reinjection ([`Classify::injection_state`],
//! `FwpsQueryPacketInjectionState0`) and permits it without deciding again (else: a loop).
//!
//! Ownership does the bookkeeping WFP leaves to C drivers:
//! - an [`InjectionHandle`] is created at `PASSIVE_LEVEL` and kept in the driver's state; it is
//!   destroyed when dropped at `PASSIVE_LEVEL` (at unload) or with [`InjectionHandle::destroy`],
//!   which waits for its injections in flight, as `FwpsInjectionHandleDestroy0` does;
//! - a clone ([`ReceiveClone`], [`SendClone`]) is owned: dropping it frees it
//!   (`FwpsFreeCloneNetBufferList0`), injecting it consumes it, and the SDK's completion routine
//!   frees it once the stack is done with it. So a clone is freed exactly once, and never
//!   injected after it was freed or while an injection of it is in flight.
//!
//! At the IP packet and forward layers the same is done with network and forward injection:
//! [`Classify::clone_for_network_receive`] (INBOUND_IPPACKET), [`clone_for_network_send`]
//! (OUTBOUND_IPPACKET) and [`clone_for_forward`] (IPFORWARD), injected with an
//! [`InjectionHandle<Network>`](InjectionHandle::network) (one per IP version) or an
//! [`InjectionHandle<Forward>`](InjectionHandle::forward); the handle's kind is in its type, so
//! a clone cannot be injected with a handle of another kind.
//!
//! [`clone_for_network_send`]: Classify::clone_for_network_send
//! [`clone_for_forward`]: Classify::clone_for_forward
//!
//! Every call takes an IRQL token: creating and destroying a handle need `PASSIVE_LEVEL`,
//! cloning, injecting and querying at most `DISPATCH_LEVEL` (`classify` has that token).
//! Cloning exists only at the layers whose packet can be injected that way:
//! [`ReceiveInjectable`] and [`SendInjectable`] layers; elsewhere it does not compile.
//!
//! ```
//! use std::sync::Arc;
//!
//! use wfp_rs::callout::{Callout, Classify};
//! use wfp_rs::inject::{InjectionHandle, InjectionState};
//! use wfp_rs::irql::{DispatchLevel, PassiveLevel};
//! use wfp_rs::layer::AleAuthRecvAcceptV4;
//! use wfp_rs::work_item::WorkQueue;
//!
//! struct AskFirst {
//!     injection: Arc<InjectionHandle>, // created in DriverEntry
//!     queue: WorkQueue,
//! }
//!
//! impl Callout<AleAuthRecvAcceptV4> for AskFirst {
//!     fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthRecvAcceptV4>) {
//!         if c.injection_state(irql, &self.injection) == InjectionState::InjectedBySelf {
//!             let _ = c.out.permit(); // our own reinjection: decided already
//!             return;
//!         }
//!         let Ok(clone) = c.clone_for_receive(irql) else {
//!             return; // no packet to hold: leave the decision to the next filter
//!         };
//!         let Ok(pended) = c.pend() else { return }; // `clone` is dropped (freed) here
//!         let injection = Arc::clone(&self.injection);
//!         let _ = self.queue.queue(irql, move |passive: &mut PassiveLevel<'_>| {
//!             let allowed = true; // ... ask, at PASSIVE_LEVEL ...
//!             pended.complete(passive);
//!             if allowed {
//!                 let _ = clone.inject(passive, &injection);
//!             } // else `clone` is dropped: freed, and the connection never completes
//!         });
//!     }
//! }
//! ```

use core::fmt;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use crate::callout::Classify;
use crate::irql::{AtMostDispatch, AtPassive, Irql};
use crate::layer::{IpVersion, Layer, PacketLayer, fields};
use crate::status::Status;
use crate::sys;

/// The address family of an IP version, as the injection routines take it.
const fn family(version: IpVersion) -> sys::ADDRESS_FAMILY {
    match version {
        IpVersion::V4 => sys::AF_INET,
        IpVersion::V6 => sys::AF_INET6,
    }
}

/// What an [`InjectionHandle`] injects: [`Transport`] (the default), [`Network`] or
/// [`Forward`]. The kind is in the handle's type, so a clone is injected only with a handle of
/// its kind (a transport handle for a network clone does not compile). Sealed.
pub trait InjectionKind: sealed::Sealed + 'static {
    /// The `FWPS_INJECTION_TYPE_*` flag `FwpsInjectionHandleCreate0` is given.
    const FLAG: u32;
}

/// Transport injection (`FWPS_INJECTION_TYPE_TRANSPORT`): [`ReceiveClone`], [`SendClone`].
#[derive(Debug)]
pub enum Transport {}
/// Network injection (`FWPS_INJECTION_TYPE_NETWORK`): [`NetworkReceiveClone`],
/// [`NetworkSendClone`].
#[derive(Debug)]
pub enum Network {}
/// Forward injection (`FWPS_INJECTION_TYPE_FORWARD`): [`ForwardClone`].
#[derive(Debug)]
pub enum Forward {}

impl sealed::Sealed for Transport {}
impl InjectionKind for Transport {
    const FLAG: u32 = sys::FWPS_INJECTION_TYPE_TRANSPORT;
}
impl sealed::Sealed for Network {}
impl InjectionKind for Network {
    const FLAG: u32 = sys::FWPS_INJECTION_TYPE_NETWORK;
}
impl sealed::Sealed for Forward {}
impl InjectionKind for Forward {
    const FLAG: u32 = sys::FWPS_INJECTION_TYPE_FORWARD;
}

/// An injection handle (`FwpsInjectionHandleCreate0`) of kind `K`: transport (the default,
/// [`create`](InjectionHandle::create)), network ([`network`](InjectionHandle::network), one
/// per IP version, as Microsoft requires) or forward ([`forward`](InjectionHandle::forward)).
///
/// Keep it in the driver's state. Dropping it at `PASSIVE_LEVEL` destroys it (and waits for its
/// injections in flight); dropping it above `PASSIVE_LEVEL` cannot, so it is leaked with a
/// debugger message — and the simulator stops at unload, as a leaked handle would stay in
/// fwpkclnt.sys. [`destroy`](Self::destroy) reports the status.
pub struct InjectionHandle<K: InjectionKind = Transport> {
    raw: NonNull<core::ffi::c_void>,
    _kind: core::marker::PhantomData<K>,
}

// SAFETY: an injection handle is a kernel handle, usable from any thread (the injection routines
// are called on whatever processor runs the callout or the work item).
unsafe impl<K: InjectionKind> Send for InjectionHandle<K> {}
// SAFETY: every use through `&self` passes the handle to a routine that may run concurrently.
unsafe impl<K: InjectionKind> Sync for InjectionHandle<K> {}

impl InjectionHandle<Transport> {
    /// Creates a transport injection handle for `version`, or for both IP versions with
    /// `None`. Wraps `FwpsInjectionHandleCreate0` (`PASSIVE_LEVEL`).
    pub fn create(irql: &impl AtPassive, version: Option<IpVersion>) -> Result<Self, Status> {
        Self::create_raw(irql, version)
    }
}

impl InjectionHandle<Network> {
    /// Creates a network injection handle for `version` (`FWPS_INJECTION_TYPE_NETWORK`): a
    /// driver injecting IPv4 and IPv6 packets at the network layer creates one of each, as
    /// Microsoft's documentation of `FwpsInjectionHandleCreate0` requires. `PASSIVE_LEVEL`.
    pub fn network(irql: &impl AtPassive, version: IpVersion) -> Result<Self, Status> {
        Self::create_raw(irql, Some(version))
    }
}

impl InjectionHandle<Forward> {
    /// Creates a forward injection handle (`FWPS_INJECTION_TYPE_FORWARD`) for `version`, or
    /// for both with `None`. `PASSIVE_LEVEL`.
    pub fn forward(irql: &impl AtPassive, version: Option<IpVersion>) -> Result<Self, Status> {
        Self::create_raw(irql, version)
    }
}

impl<K: InjectionKind> InjectionHandle<K> {
    fn create_raw(irql: &impl AtPassive, version: Option<IpVersion>) -> Result<Self, Status> {
        crate::irql::verify(irql);
        let family = version.map_or(sys::AF_UNSPEC, family);
        let mut raw: sys::HANDLE = core::ptr::null_mut();
        // SAFETY: PASSIVE_LEVEL (the token); `raw` is writable.
        let status = unsafe { sys::FwpsInjectionHandleCreate0(family, K::FLAG, &mut raw) };
        Status::from_ntstatus(status)?;
        let raw = NonNull::new(raw).ok_or(Status::FWP_NULL_POINTER)?;
        Ok(InjectionHandle {
            raw,
            _kind: core::marker::PhantomData,
        })
    }

    /// Destroys the handle; returns once its injections in flight have completed. Wraps
    /// `FwpsInjectionHandleDestroy0` (`PASSIVE_LEVEL`).
    pub fn destroy(self, irql: &impl AtPassive) -> Result<(), Status> {
        crate::irql::verify(irql);
        let this = ManuallyDrop::new(self);
        // SAFETY: PASSIVE_LEVEL (the token); the handle is live and, `this` not being dropped,
        // destroyed exactly once.
        Status::from_ntstatus(unsafe { sys::FwpsInjectionHandleDestroy0(this.raw.as_ptr()) })
    }

    /// The raw handle, for the `sys` routines.
    pub fn raw(&self) -> sys::HANDLE {
        self.raw.as_ptr()
    }
}

impl<K: InjectionKind> Drop for InjectionHandle<K> {
    /// Destroys the handle at `PASSIVE_LEVEL`; above it, leaks it with a debugger message.
    fn drop(&mut self) {
        let irql = Irql::current();
        if irql != Irql::PASSIVE {
            crate::kd_print!(
                Error,
                "wfp-rs: an InjectionHandle was dropped at {irql}; FwpsInjectionHandleDestroy0 \
                 requires PASSIVE_LEVEL, so the handle is leaked (drop it at unload)\n"
            );
            return;
        }
        // SAFETY: PASSIVE_LEVEL (checked above); the handle is live and destroyed only here
        // (`destroy` does not run this destructor).
        let status = unsafe { sys::FwpsInjectionHandleDestroy0(self.raw.as_ptr()) };
        if let Err(status) = Status::from_ntstatus(status) {
            crate::kd_print!(
                Error,
                "wfp-rs: FwpsInjectionHandleDestroy0 failed: {status}\n"
            );
        }
    }
}

impl<K: InjectionKind> fmt::Debug for InjectionHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InjectionHandle").field(&self.raw).finish()
    }
}

/// What `FwpsQueryPacketInjectionState0` says of a classified packet, relative to a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InjectionState {
    /// Not an injected packet (`FWPS_PACKET_NOT_INJECTED`).
    NotInjected,
    /// Injected with this handle (`FWPS_PACKET_INJECTED_BY_SELF`): this callout decided it
    /// already; permit it.
    InjectedBySelf,
    /// Injected with another handle (`FWPS_PACKET_INJECTED_BY_OTHER`).
    InjectedByOther,
    /// Injected with this handle earlier and changed since
    /// (`FWPS_PACKET_PREVIOUSLY_INJECTED_BY_SELF`).
    PreviouslyInjectedBySelf,
    /// A value this crate does not know, kept as is.
    Other(i32),
}

impl InjectionState {
    /// Interprets a raw `FWPS_PACKET_INJECTION_STATE`.
    pub const fn from_raw(raw: sys::FWPS_PACKET_INJECTION_STATE) -> InjectionState {
        match raw {
            sys::FWPS_PACKET_NOT_INJECTED => InjectionState::NotInjected,
            sys::FWPS_PACKET_INJECTED_BY_SELF => InjectionState::InjectedBySelf,
            sys::FWPS_PACKET_INJECTED_BY_OTHER => InjectionState::InjectedByOther,
            sys::FWPS_PACKET_PREVIOUSLY_INJECTED_BY_SELF => {
                InjectionState::PreviouslyInjectedBySelf
            }
            other => InjectionState::Other(other),
        }
    }
}

/// Why a packet could not be cloned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloneError {
    /// The engine passed no packet to this classification.
    #[error("this classification carries no packet")]
    NoPacket,
    /// The packet is not inbound (receive injection) or not outbound (send injection).
    #[error("the packet does not travel in the direction this injection needs")]
    WrongDirection,
    /// The metadata lacks a value the injection needs (the header sizes, the endpoint handle).
    #[error("the classification's metadata lacks a value the injection needs")]
    MissingMetadata,
    /// A field the injection needs (interface index, remote address) could not be read.
    #[error("a field the injection needs could not be read")]
    MissingField,
    /// The stack refused: `NdisRetreatNetBufferDataStart` or `FwpsAllocateCloneNetBufferList0`
    /// failed.
    #[error("the clone could not be made: {0}")]
    Refused(Status),
}

/// An injection the stack refused; the clone comes back (drop it to free it, or retry).
#[derive(Debug)]
pub struct InjectError<P> {
    /// The status the inject routine returned.
    pub status: Status,
    /// The clone, still owned.
    pub packet: P,
}

impl<P> fmt::Display for InjectError<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injection refused: {}", self.status)
    }
}

impl<P: fmt::Debug> core::error::Error for InjectError<P> {}

/// A cloned net buffer list the driver owns; freed when dropped.
struct Clone {
    nbl: NonNull<sys::NET_BUFFER_LIST>,
}

impl Clone {
    /// Gives up ownership for an injection: the completion routine frees it.
    fn into_raw(self) -> *mut sys::NET_BUFFER_LIST {
        ManuallyDrop::new(self).nbl.as_ptr()
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        // SAFETY: a clone from FwpsAllocateCloneNetBufferList0, owned (not injected: injecting
        // takes it with `into_raw`), freed once; all driver code runs at <= DISPATCH_LEVEL.
        unsafe { sys::FwpsFreeCloneNetBufferList0(self.nbl.as_ptr(), 0) };
    }
}

/// The SDK's `FWPS_INJECT_COMPLETE0`: the injection is over, the clone is the driver's again,
/// and nothing else refers to it, so it is freed here.
unsafe extern "system" fn free_on_completion(
    context: *mut core::ffi::c_void,
    net_buffer_list: *mut sys::NET_BUFFER_LIST,
    dispatch_level: sys::BOOLEAN,
) {
    let _ = (context, dispatch_level);
    // SAFETY: the stack hands back the clone the SDK injected (from `Clone::into_raw`), once;
    // the completion routine runs at <= DISPATCH_LEVEL.
    unsafe { sys::FwpsFreeCloneNetBufferList0(net_buffer_list, 0) };
}

/// Layers whose inbound packet can be cloned for `FwpsInjectTransportReceiveAsync0`:
/// INBOUND_TRANSPORT and ALE_AUTH_RECV_ACCEPT. Only these have
/// [`Classify::clone_for_receive`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "a packet of `{Self}` cannot be cloned for receive injection",
    label = "`clone_for_receive` is for INBOUND_TRANSPORT and ALE_AUTH_RECV_ACCEPT",
    note = "see `wfp_rs::inject` and docs/packets.md"
)]
pub trait ReceiveInjectable: PacketLayer + sealed::Sealed {
    #[doc(hidden)]
    fn interfaces(values: &crate::layer::IncomingValues<'_, Self>) -> Option<(u32, u32)>;
}

/// Layers whose outbound packet can be cloned for `FwpsInjectTransportSendAsync0`:
/// OUTBOUND_TRANSPORT. Only these have [`Classify::clone_for_send`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "a packet of `{Self}` cannot be cloned for send injection",
    label = "`clone_for_send` is for OUTBOUND_TRANSPORT",
    note = "see `wfp_rs::inject` and docs/packets.md"
)]
pub trait SendInjectable: PacketLayer + sealed::Sealed {
    #[doc(hidden)]
    fn remote_address(values: &crate::layer::IncomingValues<'_, Self>) -> Option<[u8; 16]>;
}

/// Layers whose inbound packet can be cloned for `FwpsInjectNetworkReceiveAsync0`:
/// INBOUND_IPPACKET. Only these have [`Classify::clone_for_network_receive`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "a packet of `{Self}` cannot be cloned for network receive injection",
    label = "`clone_for_network_receive` is for INBOUND_IPPACKET",
    note = "see `wfp_rs::inject` and docs/packets.md"
)]
pub trait NetworkReceiveInjectable: PacketLayer + sealed::Sealed {
    #[doc(hidden)]
    fn interfaces(values: &crate::layer::IncomingValues<'_, Self>) -> Option<(u32, u32)>;
}

/// Layers whose outbound packet can be cloned for `FwpsInjectNetworkSendAsync0`:
/// OUTBOUND_IPPACKET. Only these have [`Classify::clone_for_network_send`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "a packet of `{Self}` cannot be cloned for network send injection",
    label = "`clone_for_network_send` is for OUTBOUND_IPPACKET",
    note = "see `wfp_rs::inject` and docs/packets.md"
)]
pub trait NetworkSendInjectable: PacketLayer + sealed::Sealed {}

/// Layers whose packet can be cloned for `FwpsInjectForwardAsync0`: IPFORWARD. Only these have
/// [`Classify::clone_for_forward`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "a packet of `{Self}` cannot be cloned for forward injection",
    label = "`clone_for_forward` is for IPFORWARD",
    note = "see `wfp_rs::inject` and docs/packets.md"
)]
pub trait ForwardInjectable: PacketLayer + sealed::Sealed {
    #[doc(hidden)]
    fn destination_interface(values: &crate::layer::IncomingValues<'_, Self>) -> Option<u32>;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! network_receive_injectable {
    ($($layer:ident),*) => {$(
        impl sealed::Sealed for crate::layer::$layer {}
        impl NetworkReceiveInjectable for crate::layer::$layer {
            fn interfaces(values: &crate::layer::IncomingValues<'_, Self>) -> Option<(u32, u32)> {
                let interface = values.get::<fields::InterfaceIndex>().ok()?;
                let sub_interface = values.get::<fields::SubInterfaceIndex>().ok()?;
                Some((interface, sub_interface))
            }
        }
    )*};
}

network_receive_injectable!(InboundIpPacketV4, InboundIpPacketV6);

impl sealed::Sealed for crate::layer::OutboundIpPacketV4 {}
impl NetworkSendInjectable for crate::layer::OutboundIpPacketV4 {}
impl sealed::Sealed for crate::layer::OutboundIpPacketV6 {}
impl NetworkSendInjectable for crate::layer::OutboundIpPacketV6 {}

macro_rules! forward_injectable {
    ($($layer:ident),*) => {$(
        impl sealed::Sealed for crate::layer::$layer {}
        impl ForwardInjectable for crate::layer::$layer {
            fn destination_interface(values: &crate::layer::IncomingValues<'_, Self>) -> Option<u32> {
                values.get::<fields::DestinationInterfaceIndex>().ok()
            }
        }
    )*};
}

forward_injectable!(IpForwardV4, IpForwardV6);

macro_rules! receive_injectable {
    ($($layer:ident),*) => {$(
        impl sealed::Sealed for crate::layer::$layer {}
        impl ReceiveInjectable for crate::layer::$layer {
            fn interfaces(values: &crate::layer::IncomingValues<'_, Self>) -> Option<(u32, u32)> {
                let interface = values.get::<fields::InterfaceIndex>().ok()?;
                let sub_interface = values.get::<fields::SubInterfaceIndex>().ok()?;
                Some((interface, sub_interface))
            }
        }
    )*};
}

receive_injectable!(
    InboundTransportV4,
    InboundTransportV6,
    AleAuthRecvAcceptV4,
    AleAuthRecvAcceptV6
);

impl sealed::Sealed for crate::layer::OutboundTransportV4 {}
impl SendInjectable for crate::layer::OutboundTransportV4 {
    fn remote_address(values: &crate::layer::IncomingValues<'_, Self>) -> Option<[u8; 16]> {
        let address = values.get::<fields::IpRemoteAddress>().ok()?;
        let mut bytes = [0; 16];
        bytes[..4].copy_from_slice(&address.octets());
        Some(bytes)
    }
}
impl sealed::Sealed for crate::layer::OutboundTransportV6 {}
impl SendInjectable for crate::layer::OutboundTransportV6 {
    fn remote_address(values: &crate::layer::IncomingValues<'_, Self>) -> Option<[u8; 16]> {
        Some(values.get::<fields::IpRemoteAddress>().ok()?.octets())
    }
}

/// A clone of an inbound packet, starting at its IP header, with where to inject it: the
/// interface and sub-interface it arrived on and its compartment, read from the classification.
/// Inject it with [`inject`](Self::inject); dropping it frees it.
pub struct ReceiveClone {
    clone: Clone,
    version: IpVersion,
    compartment: u32,
    interface: u32,
    sub_interface: u32,
}

// SAFETY: the clone is the driver's own net buffer list, usable from any thread at
// <= DISPATCH_LEVEL; nothing else refers to it until it is injected.
unsafe impl Send for ReceiveClone {}
// SAFETY: no method reads or writes through `&self`.
unsafe impl Sync for ReceiveClone {}

impl ReceiveClone {
    /// Injects the clone into the receive path (`FwpsInjectTransportReceiveAsync0`), with
    /// `handle`, consuming it: the SDK's completion routine frees it when the stack is done. The
    /// packet then crosses the inbound layers again, where [`Classify::injection_state`] with
    /// `handle` says [`InjectionState::InjectedBySelf`]. If the stack refuses, the clone comes
    /// back in the error.
    pub fn inject(
        self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle,
    ) -> Result<(), InjectError<ReceiveClone>> {
        crate::irql::verify(irql);
        let nbl = self.clone.nbl.as_ptr();
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed); the clone is
        // owned and starts at the IP header (`clone_for_receive`); `free_on_completion` frees it.
        let status = unsafe {
            sys::FwpsInjectTransportReceiveAsync0(
                handle.raw(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                0,
                family(self.version),
                self.compartment,
                self.interface,
                self.sub_interface,
                nbl,
                Some(free_on_completion),
                core::ptr::null_mut(),
            )
        };
        injected(status, self, |c| c.clone)
    }
}

impl fmt::Debug for ReceiveClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveClone")
            .field("version", &self.version)
            .field("interface", &self.interface)
            .field("sub_interface", &self.sub_interface)
            .finish_non_exhaustive()
    }
}

/// A clone of an outbound packet, starting at its transport header, with where to send it: the
/// endpoint, remote address and scope, and compartment, read from the classification. Inject it
/// with [`inject`](Self::inject); dropping it frees it. The socket control data of the original
/// send is not carried (the clone is sent without it).
pub struct SendClone {
    clone: Clone,
    version: IpVersion,
    compartment: u32,
    endpoint: u64,
    remote_address: [u8; 16],
    remote_scope: sys::SCOPE_ID,
}

// SAFETY: as for `ReceiveClone`.
unsafe impl Send for SendClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Sync for SendClone {}

impl SendClone {
    /// Injects the clone into the send path (`FwpsInjectTransportSendAsync0`), with `handle`,
    /// consuming it; the SDK's completion routine frees it. If the stack refuses, the clone
    /// comes back in the error.
    pub fn inject(
        mut self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle,
    ) -> Result<(), InjectError<SendClone>> {
        crate::irql::verify(irql);
        let nbl = self.clone.nbl.as_ptr();
        let mut params = sys::FWPS_TRANSPORT_SEND_PARAMS0 {
            remoteAddress: self.remote_address.as_mut_ptr(),
            remoteScopeId: self.remote_scope,
            controlData: core::ptr::null_mut(),
            controlDataLength: 0,
        };
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed); the clone is
        // owned and starts at the transport header; the parameters live across the call, which
        // copies them (INFERRED: fwpsk documents no lifetime beyond the call); the completion
        // routine frees the clone.
        let status = unsafe {
            sys::FwpsInjectTransportSendAsync0(
                handle.raw(),
                core::ptr::null_mut(),
                self.endpoint,
                0,
                &mut params,
                family(self.version),
                self.compartment,
                nbl,
                Some(free_on_completion),
                core::ptr::null_mut(),
            )
        };
        injected(status, self, |c| c.clone)
    }
}

impl fmt::Debug for SendClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendClone")
            .field("version", &self.version)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A clone of an inbound IP packet, starting at its IP header, with the interface and
/// sub-interface it arrived on and its compartment, read from the classification. Inject it
/// into the receive path with [`inject`](Self::inject) and a [`Network`] handle of its IP
/// version; dropping it frees it.
pub struct NetworkReceiveClone {
    clone: Clone,
    version: IpVersion,
    compartment: u32,
    interface: u32,
    sub_interface: u32,
}

/// A clone of an outbound IP packet, starting at its IP header, with its compartment. Inject it
/// into the send path with [`inject`](Self::inject) and a [`Network`] handle of its IP version;
/// dropping it frees it.
pub struct NetworkSendClone {
    clone: Clone,
    version: IpVersion,
    compartment: u32,
}

/// A clone of a forwarded IP packet, starting at its IP header, with the interface it is
/// forwarded to and its compartment. Inject it into the forwarding path with
/// [`inject`](Self::inject) and a [`Forward`] handle; dropping it frees it. A forward-injected
/// packet is not classified again at the forward layer (Microsoft's documentation of
/// `FwpsInjectForwardAsync0`).
pub struct ForwardClone {
    clone: Clone,
    version: IpVersion,
    compartment: u32,
    interface: u32,
}

// SAFETY: as for `ReceiveClone`.
unsafe impl Send for NetworkReceiveClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Sync for NetworkReceiveClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Send for NetworkSendClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Sync for NetworkSendClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Send for ForwardClone {}
// SAFETY: as for `ReceiveClone`.
unsafe impl Sync for ForwardClone {}

/// What an inject routine returned, as the clone's fate: on success the stack owns it (the
/// completion routine frees it), else it comes back in the error.
fn injected<P>(
    status: sys::NTSTATUS,
    clone: P,
    take: impl FnOnce(P) -> Clone,
) -> Result<(), InjectError<P>> {
    match Status::from_ntstatus(status) {
        Ok(()) => {
            // The stack owns it now; the completion routine frees it.
            let _ = take(clone).into_raw();
            Ok(())
        }
        Err(status) => Err(InjectError {
            status,
            packet: clone,
        }),
    }
}

impl NetworkReceiveClone {
    /// Injects the clone into the receive path of its interface
    /// (`FwpsInjectNetworkReceiveAsync0`) with `handle`, a network handle of the clone's IP
    /// version, consuming it: the SDK's completion routine frees it. The packet can be indicated
    /// to the inbound layers again, where [`Classify::injection_state`] with `handle` says
    /// [`InjectionState::InjectedBySelf`]: permit it there. If the stack refuses, the clone
    /// comes back in the error.
    pub fn inject(
        self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle<Network>,
    ) -> Result<(), InjectError<NetworkReceiveClone>> {
        crate::irql::verify(irql);
        let nbl = self.clone.nbl.as_ptr();
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed) and a network
        // one (its type); the clone is owned and starts at the IP header
        // (`clone_for_network_receive`); `free_on_completion` frees it.
        let status = unsafe {
            sys::FwpsInjectNetworkReceiveAsync0(
                handle.raw(),
                core::ptr::null_mut(),
                0,
                self.compartment,
                self.interface,
                self.sub_interface,
                nbl,
                Some(free_on_completion),
                core::ptr::null_mut(),
            )
        };
        injected(status, self, |c| c.clone)
    }

    /// The clone's IP version (the version of the network handle to inject it with).
    pub fn version(&self) -> IpVersion {
        self.version
    }
}

impl NetworkSendClone {
    /// Injects the clone into the send path (`FwpsInjectNetworkSendAsync0`) with `handle`, a
    /// network handle of the clone's IP version, consuming it; the SDK's completion routine
    /// frees it. The packet can be indicated to the outbound layers again (check
    /// [`Classify::injection_state`]). If the stack refuses, the clone comes back in the error.
    pub fn inject(
        self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle<Network>,
    ) -> Result<(), InjectError<NetworkSendClone>> {
        crate::irql::verify(irql);
        let nbl = self.clone.nbl.as_ptr();
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed) and a network
        // one; the clone is owned and starts at the IP header; the completion routine frees it.
        let status = unsafe {
            sys::FwpsInjectNetworkSendAsync0(
                handle.raw(),
                core::ptr::null_mut(),
                0,
                self.compartment,
                nbl,
                Some(free_on_completion),
                core::ptr::null_mut(),
            )
        };
        injected(status, self, |c| c.clone)
    }

    /// The clone's IP version (the version of the network handle to inject it with).
    pub fn version(&self) -> IpVersion {
        self.version
    }
}

impl ForwardClone {
    /// Injects the clone into the forwarding path (`FwpsInjectForwardAsync0`) with `handle`,
    /// towards the interface it was being forwarded to, consuming it; the SDK's completion
    /// routine frees it. If the stack refuses, the clone comes back in the error.
    pub fn inject(
        self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle<Forward>,
    ) -> Result<(), InjectError<ForwardClone>> {
        crate::irql::verify(irql);
        let nbl = self.clone.nbl.as_ptr();
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed) and a forward
        // one; the clone is owned and starts at the IP header; the completion routine frees it.
        let status = unsafe {
            sys::FwpsInjectForwardAsync0(
                handle.raw(),
                core::ptr::null_mut(),
                0,
                family(self.version),
                self.compartment,
                self.interface,
                nbl,
                Some(free_on_completion),
                core::ptr::null_mut(),
            )
        };
        injected(status, self, |c| c.clone)
    }
}

impl fmt::Debug for NetworkReceiveClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkReceiveClone")
            .field("version", &self.version)
            .field("interface", &self.interface)
            .field("sub_interface", &self.sub_interface)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for NetworkSendClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkSendClone")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ForwardClone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardClone")
            .field("version", &self.version)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

impl<L: Layer, F: 'static> Classify<'_, L, F> {
    /// Whether the packet being classified was injected, and by whom, relative to `handle`
    /// (`FwpsQueryPacketInjectionState0`). [`InjectionState::NotInjected`] when the
    /// classification carries no packet.
    pub fn injection_state<K: InjectionKind>(
        &self,
        irql: &impl AtMostDispatch,
        handle: &InjectionHandle<K>,
    ) -> InjectionState
    where
        L: PacketLayer,
    {
        crate::irql::verify(irql);
        let Some(nbl) = NonNull::new(self.layer_data_mut().cast::<sys::NET_BUFFER_LIST>()) else {
            return InjectionState::NotInjected;
        };
        // SAFETY: <= DISPATCH_LEVEL (the token); the handle is live (borrowed); at a packet
        // layer a non-null `layerData` is the engine's net buffer list for this classification.
        let raw = unsafe {
            sys::FwpsQueryPacketInjectionState0(
                handle.raw(),
                nbl.as_ptr().cast_const(),
                core::ptr::null_mut(),
            )
        };
        InjectionState::from_raw(raw)
    }

    /// Clones the inbound packet being classified for receive injection
    /// (`FwpsAllocateCloneNetBufferList0`). The packet's data start is at the payload here, so
    /// the SDK retreats it by the IP and transport header sizes before cloning
    /// (`NdisRetreatNetBufferDataStart`) and advances it back after
    /// (`NdisAdvanceNetBufferDataStart`), as Microsoft's "Packet Indication Format" requires
    /// before `classifyFn` returns: the clone starts at the IP header, as
    /// `FwpsInjectTransportReceiveAsync0` requires. `&mut self`: no view of the packet is alive
    /// while its start moves.
    pub fn clone_for_receive(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<ReceiveClone, CloneError>
    where
        L: ReceiveInjectable,
    {
        crate::irql::verify(irql);
        let version = L::IP_VERSION.ok_or(CloneError::MissingField)?;
        if self.metadata.direction() == Some(crate::metadata::Direction::Outbound) {
            return Err(CloneError::WrongDirection);
        }
        let (interface, sub_interface) =
            L::interfaces(&self.values).ok_or(CloneError::MissingField)?;
        let compartment = self.metadata.compartment_id().unwrap_or(0);
        // An inbound packet's data starts past the transport header at both receive-injectable
        // layers (Microsoft's "Data offset positions"): the headers are behind it.
        let behind = self
            .metadata
            .ip_header_size()
            .zip(self.metadata.transport_header_size())
            .map(|(ip, transport)| ip + transport)
            .ok_or(CloneError::MissingMetadata)?;
        let clone = self.clone_with_start_moved(behind)?;
        Ok(ReceiveClone {
            clone,
            version,
            compartment,
            interface,
            sub_interface,
        })
    }

    /// Clones the outbound packet being classified for send injection
    /// (`FwpsAllocateCloneNetBufferList0`); it starts at the transport header, where the layer
    /// indicates it and where `FwpsInjectTransportSendAsync0` expects it.
    pub fn clone_for_send(&mut self, irql: &impl AtMostDispatch) -> Result<SendClone, CloneError>
    where
        L: SendInjectable,
    {
        crate::irql::verify(irql);
        let version = L::IP_VERSION.ok_or(CloneError::MissingField)?;
        if self.metadata.direction() == Some(crate::metadata::Direction::Inbound) {
            return Err(CloneError::WrongDirection);
        }
        let remote_address = L::remote_address(&self.values).ok_or(CloneError::MissingField)?;
        let endpoint = self
            .metadata
            .transport_endpoint_handle()
            .ok_or(CloneError::MissingMetadata)?;
        let remote_scope = if self.metadata.has(sys::FWPS_METADATA_FIELD_REMOTE_SCOPE_ID) {
            self.metadata.raw().remoteScopeId
        } else {
            sys::SCOPE_ID::default()
        };
        let compartment = self.metadata.compartment_id().unwrap_or(0);
        let clone = self.clone_with_start_moved(0)?;
        Ok(SendClone {
            clone,
            version,
            compartment,
            endpoint,
            remote_address,
            remote_scope,
        })
    }

    /// Clones the inbound IP packet being classified for network receive injection
    /// (`FwpsAllocateCloneNetBufferList0`). At INBOUND_IPPACKET the data starts past the IP
    /// header (Microsoft's "Data offset positions"), so the SDK retreats it by the IP header
    /// size before cloning and advances it back after, as for
    /// [`clone_for_receive`](Self::clone_for_receive): the clone starts at the IP header, as
    /// `FwpsInjectNetworkReceiveAsync0` requires.
    pub fn clone_for_network_receive(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<NetworkReceiveClone, CloneError>
    where
        L: NetworkReceiveInjectable,
    {
        crate::irql::verify(irql);
        let version = L::IP_VERSION.ok_or(CloneError::MissingField)?;
        let (interface, sub_interface) =
            L::interfaces(&self.values).ok_or(CloneError::MissingField)?;
        let compartment = self.metadata.compartment_id().unwrap_or(0);
        let behind = self
            .metadata
            .ip_header_size()
            .ok_or(CloneError::MissingMetadata)?;
        let clone = self.clone_with_start_moved(behind)?;
        Ok(NetworkReceiveClone {
            clone,
            version,
            compartment,
            interface,
            sub_interface,
        })
    }

    /// Clones the outbound IP packet being classified for network send injection
    /// (`FwpsAllocateCloneNetBufferList0`); at OUTBOUND_IPPACKET it starts at the IP header,
    /// where `FwpsInjectNetworkSendAsync0` expects it.
    pub fn clone_for_network_send(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<NetworkSendClone, CloneError>
    where
        L: NetworkSendInjectable,
    {
        crate::irql::verify(irql);
        let version = L::IP_VERSION.ok_or(CloneError::MissingField)?;
        let compartment = self.metadata.compartment_id().unwrap_or(0);
        let clone = self.clone_with_start_moved(0)?;
        Ok(NetworkSendClone {
            clone,
            version,
            compartment,
        })
    }

    /// Clones the forwarded packet being classified for forward injection
    /// (`FwpsAllocateCloneNetBufferList0`); at IPFORWARD it starts at the IP header, where
    /// `FwpsInjectForwardAsync0` expects it. The clone is injected towards the classification's
    /// destination interface.
    pub fn clone_for_forward(
        &mut self,
        irql: &impl AtMostDispatch,
    ) -> Result<ForwardClone, CloneError>
    where
        L: ForwardInjectable,
    {
        crate::irql::verify(irql);
        let version = L::IP_VERSION.ok_or(CloneError::MissingField)?;
        let interface = L::destination_interface(&self.values).ok_or(CloneError::MissingField)?;
        let compartment = self.metadata.compartment_id().unwrap_or(0);
        let clone = self.clone_with_start_moved(0)?;
        Ok(ForwardClone {
            clone,
            version,
            compartment,
            interface,
        })
    }

    /// Clones the packet with its first net buffer's data start `behind` bytes earlier, and
    /// puts the start back.
    fn clone_with_start_moved(&mut self, behind: u32) -> Result<Clone, CloneError> {
        let nbl = NonNull::new(self.layer_data_mut().cast::<sys::NET_BUFFER_LIST>())
            .ok_or(CloneError::NoPacket)?;
        // SAFETY: at a packet layer a non-null `layerData` is the engine's net buffer list,
        // valid for the classification; `&mut self` keeps every view of it borrowed out.
        let first = unsafe { (*nbl.as_ptr()).FirstNetBuffer };
        if first.is_null() {
            return Err(CloneError::NoPacket);
        }
        if behind != 0 {
            // SAFETY: <= DISPATCH_LEVEL (classifyFn); the engine's net buffer; the start moves
            // back below before this returns (and before classifyFn does).
            let status = unsafe { sys::NdisRetreatNetBufferDataStart(first, behind, 0, None) };
            if status != sys::NDIS_STATUS_SUCCESS {
                return Err(CloneError::Refused(Status::from_raw(status)));
            }
        }
        let mut clone: *mut sys::NET_BUFFER_LIST = core::ptr::null_mut();
        // SAFETY: <= DISPATCH_LEVEL; the engine's list; `clone` is writable.
        let status = unsafe {
            sys::FwpsAllocateCloneNetBufferList0(
                nbl.as_ptr(),
                core::ptr::null_mut(),
                core::ptr::null_mut(),
                0,
                &mut clone,
            )
        };
        if behind != 0 {
            // SAFETY: undoes the retreat above, on the same net buffer.
            unsafe { sys::NdisAdvanceNetBufferDataStart(first, behind, sys::FALSE, None) };
        }
        Status::from_ntstatus(status).map_err(CloneError::Refused)?;
        let nbl = NonNull::new(clone).ok_or(CloneError::Refused(Status::FWP_NULL_POINTER))?;
        Ok(Clone { nbl })
    }
}
