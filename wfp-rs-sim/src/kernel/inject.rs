//! Packet injection: injection handles, cloned net buffer lists, transport injection and the
//! injection state of a packet (`fwpsk.h`), and the NDIS routines that move a net buffer's data
//! start (`nblapi.h`).
//!
//! What is modelled, and how:
//! - A clone (`FwpsAllocateCloneNetBufferList0`) is a real `NET_BUFFER_LIST` with one
//!   `NET_BUFFER` over one MDL, holding a **copy** of the original's bytes (the whole MDL chain,
//!   so the used data space behind the data start is there too) with the same data offset and
//!   length. Windows's clone shares the original's MDLs and data (`NdisAllocateCloneNetBufferList`
//!   underneath) and the stack keeps the original until the clone is freed; a copy behaves the
//!   same for a callout that does not write to the data (INFERRED equivalence), and lets the
//!   simulator free the original when its classification returns. `ParentNetBufferList` is left
//!   null for that reason.
//! - The stack's packets carry the connection attempt they belong to in `NdisReserved[0]` (the
//!   owner's field; the simulator is the owner), and a clone inherits it, so an injected clone
//!   finds its connection.
//! - `FwpsInjectTransportReceiveAsync0` of a clone of a connection attempt the harness is
//!   waiting for (an inbound `Machine::connect` pended at ALE_AUTH_RECV_ACCEPT) queues it for
//!   that attempt: the connecting thread runs it through INBOUND_TRANSPORT,
//!   ALE_AUTH_RECV_ACCEPT and ALE_FLOW_ESTABLISHED again (the packet is the clone itself, its
//!   data start advanced to where each layer puts it), then calls the completion routine. Any
//!   other transport- or network-injected packet is indicated again at the one layer it
//!   re-enters (INBOUND_TRANSPORT or OUTBOUND_TRANSPORT, INBOUND_IPPACKET or OUTBOUND_IPPACKET;
//!   INFERRED simplification: the layers above it are not run, nothing in the harness waits for
//!   the packet), on the injecting thread, and its completion routine runs before the inject
//!   call returns, at `DISPATCH_LEVEL` (Windows may complete an injection inline or later; a
//!   driver must accept both).
//! - While an injected clone is in flight, `FwpsQueryPacketInjectionState0` says
//!   `FWPS_PACKET_INJECTED_BY_SELF` (and hands back the injection context) to the handle that
//!   injected it, `FWPS_PACKET_INJECTED_BY_OTHER` to any other handle.
//! - `FwpsInjectionHandleDestroy0` waits for the handle's injections in flight, as documented.
//! - An inject routine refuses, with `STATUS_INVALID_PARAMETER` (INFERRED), a handle that was
//!   not created for its injection type (`FWPS_INJECTION_TYPE_*`; flags 0 mean transport,
//!   stream and forward) or for the packet's address family. Network injection
//!   (`FwpsInjectNetworkSendAsync0`, `FwpsInjectNetworkReceiveAsync0`) and forward injection
//!   (`FwpsInjectForwardAsync0`) deliver the packet at once; a forward-injected packet is not
//!   classified again (documented); a network-injected one is indicated again at the IP packet
//!   layer of its direction before the inject routine returns (`reindicate`), and a callout
//!   that injects its own injections again stops the machine after a few rounds instead of
//!   looping for ever ([`INJECTION_LOOP`]).
//!
//! What Windows punishes stops the machine (INFERRED codes: Microsoft documents the rules, not
//! the bug checks; these misuses corrupt NDIS or WFP memory on Windows, so the simulator uses
//! WFP's own code, `WFP_INVALID_OPERATION`, as it does for other dead WFP objects), parameter 1
//! naming the rule ([`CLONE_NOT_LIVE`], [`CLONE_IN_FLIGHT`], [`HANDLE_NOT_LIVE`]), parameter 2
//! the object. Unloading with a clone not freed or an injection handle not destroyed stops with
//! `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`, parameter 3 [`UNLOAD_CLONES_LIVE`]
//! or [`UNLOAD_INJECTION_HANDLES_OPEN`] (INFERRED likewise: what fwpkclnt.sys allocated for the
//! driver is not charged to the driver's pool, so Verifier's 0xC4/0x62 does not apply; the
//! simulator reports it as the other leftovers at unload).

#[allow(unused_imports)]
use std::{boxed::Box, string::String, vec::Vec};

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use rustc_hash::{FxHashMap, FxHashSet};

use super::bugcheck::stop;
use super::state::{current, current_driver, require_irql};
use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::status::Status;
use wfp_rs::sys::*;

/// `FwpsFreeCloneNetBufferList0` or an inject routine with a net buffer list that is not a live
/// clone (freed already, or never allocated by `FwpsAllocateCloneNetBufferList0`): parameter 1
/// of the `WFP_INVALID_OPERATION` stop; parameter 3 is 1 if it is a clone freed recently.
pub(crate) const CLONE_NOT_LIVE: usize = 0x8000_0010;
/// A clone freed or injected again while an injection of it is in flight (the stack owns it
/// until the completion routine runs).
pub(crate) const CLONE_IN_FLIGHT: usize = 0x8000_0011;
/// An inject, query or destroy with an injection handle that is not live (destroyed, or never
/// created); parameter 3 is 1 if it was destroyed.
pub(crate) const HANDLE_NOT_LIVE: usize = 0x8000_0012;
/// A network-injected packet re-indicated more than [`REINDICATION_LIMIT`] times in a row: a
/// callout that injects its own injections again (it does not check
/// `FwpsQueryPacketInjectionState0`). Parameter 3 is the depth.
pub(crate) const INJECTION_LOOP: usize = 0x8000_0013;
/// How deep re-indications of network-injected packets may nest before the simulator calls it
/// a loop.
const REINDICATION_LIMIT: u32 = 8;

thread_local! {
    /// How many network injections this thread is re-indicating, one inside the other.
    static REINDICATION_DEPTH: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

/// Parameter 3 of the unload stop for clones the driver never freed; parameter 4 how many.
pub(crate) const UNLOAD_CLONES_LIVE: usize = 5;
/// Parameter 3 of the unload stop for injection handles never destroyed; parameter 4 how many.
pub(crate) const UNLOAD_INJECTION_HANDLES_OPEN: usize = 6;

/// How many freed clones stay allocated (and so keep their addresses out of reuse), so that a
/// second free or an inject of a freed clone is recognised.
const QUARANTINE: usize = 1024;

/// The injection state of one machine.
#[derive(Default)]
pub(crate) struct Injections {
    state: Mutex<State>,
    /// Signalled when a clone is freed or injected, and when an injection completes.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    next_handle: usize,
    handles: FxHashMap<usize, HandleRecord>,
    destroyed: FxHashSet<usize>,
    clones: FxHashMap<usize, CloneRecord>,
    /// Freed clones, oldest first, kept allocated for [`QUARANTINE`] frees.
    freed: VecDeque<(usize, Box<CloneStorage>)>,
    /// Connection attempts a harness thread waits to deliver injected packets of.
    awaiting: FxHashSet<u64>,
    /// The most recent network and forward injections, oldest first (`Machine::injected_packets`).
    delivered: VecDeque<Delivered>,
}

/// How many network and forward injections a machine remembers.
const DELIVERED_KEPT: usize = 256;

/// A network or forward injection, as the harness sees it.
#[derive(Clone, Debug)]
pub(crate) struct Delivered {
    pub routine: &'static str,
    pub status: NTSTATUS,
    /// The packet's bytes from its data start.
    pub packet: Vec<u8>,
    /// The action of the packet's re-indication at its IP packet layer (network injection of a
    /// well-formed packet), `FWP_ACTION_PERMIT` or `FWP_ACTION_BLOCK`.
    pub reindicated: Option<FWP_ACTION_TYPE>,
}

/// The most recent network and forward injections of the machine, oldest first.
pub(crate) fn delivered(kernel: &super::state::Kernel) -> Vec<Delivered> {
    kernel.inject.state().delivered.iter().cloned().collect()
}

struct HandleRecord {
    driver: usize,
    /// Injections of this handle in flight.
    in_flight: usize,
    /// The injection types it was created for (`FWPS_INJECTION_TYPE_*`; 0 already mapped to
    /// what it means: transport, stream and forward).
    types: u32,
    /// The address family it was created for (`AF_UNSPEC`: either).
    family: ADDRESS_FAMILY,
}

struct CloneRecord {
    driver: usize,
    storage: Box<CloneStorage>,
    flight: Option<Flight>,
}

/// An injection in flight.
#[derive(Clone, Copy)]
pub(crate) struct Flight {
    pub handle: usize,
    pub injection_context: usize,
    pub completion: FWPS_INJECT_COMPLETE0,
    pub completion_context: usize,
    /// Receive injection (else send), and whether a harness thread delivers it.
    pub receive: bool,
    pub queued: bool,
    pub driver: usize,
}

/// A clone's structures and bytes, at stable heap addresses.
struct CloneStorage {
    nbl: NET_BUFFER_LIST,
    nb: NET_BUFFER,
    mdl: MDL,
    bytes: Box<[u8]>,
}

// SAFETY: the raw pointers point into the storage itself (or are null); the state is only
// touched under its lock.
unsafe impl Send for State {}

impl Injections {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connection attempt (origin) the stack's packet `nbl` belongs to: 0 for none.
pub(crate) fn origin_of(nbl: &NET_BUFFER_LIST) -> u64 {
    nbl.NdisReserved.0[0] as u64
}

/// Marks the stack's packet `nbl` as belonging to connection attempt `origin`.
pub(crate) fn set_origin(nbl: &mut NET_BUFFER_LIST, origin: u64) {
    nbl.NdisReserved.0[0] = origin as usize as PVOID;
}

/// Moves `nb`'s data start to `offset` bytes into its MDL chain, keeping its end.
fn set_data_offset(nb: &mut NET_BUFFER, offset: u32) {
    let end = nb.DataOffset as u64 + (nb.DataLength as u32) as u64;
    nb.DataOffset = offset;
    nb.DataLength = end.saturating_sub(u64::from(offset)) as usize;
    // The current MDL is the one holding the new start.
    let mut mdl = nb.MdlChain;
    let mut skip = offset;
    // SAFETY: the chain is the stack's or a clone's, valid while the net buffer is.
    while let Some(current) = unsafe { mdl.as_ref() } {
        if skip < current.ByteCount || current.Next.is_null() {
            break;
        }
        skip -= current.ByteCount;
        mdl = current.Next;
    }
    nb.CurrentMdl = mdl;
    nb.CurrentMdlOffset = skip;
}

/// Copies every byte of `nb`'s MDL chain (mapped MDLs only, as the simulator builds them).
fn chain_bytes(nb: &NET_BUFFER) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut mdl = nb.MdlChain;
    let mut walked = 0;
    // SAFETY: as in `set_data_offset`.
    while let Some(current) = unsafe { mdl.as_ref() } {
        walked += 1;
        if walked > wfp_rs::packet::MAX_CHAIN || current.MappedSystemVa.is_null() {
            return None;
        }
        // SAFETY: a mapped MDL describes `ByteCount` bytes at `MappedSystemVa`.
        bytes.extend_from_slice(unsafe {
            core::slice::from_raw_parts(
                current.MappedSystemVa.cast::<u8>(),
                current.ByteCount as usize,
            )
        });
        mdl = current.Next;
    }
    Some(bytes)
}

/// `FwpsInjectionHandleCreate0`: `PASSIVE_LEVEL`.
///
/// # Safety
///
/// `injectionHandle` must be writable.
pub unsafe extern "system" fn FwpsInjectionHandleCreate0(
    addressFamily: ADDRESS_FAMILY,
    flags: u32,
    injectionHandle: *mut HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsInjectionHandleCreate0", PASSIVE_LEVEL);
    if injectionHandle.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    const KNOWN: u32 = FWPS_INJECTION_TYPE_STREAM
        | FWPS_INJECTION_TYPE_TRANSPORT
        | FWPS_INJECTION_TYPE_NETWORK
        | FWPS_INJECTION_TYPE_FORWARD;
    if flags & !KNOWN != 0 || !matches!(addressFamily, AF_UNSPEC | AF_INET | AF_INET6) {
        return Status::INVALID_PARAMETER.raw();
    }
    // Documented: "for transport, stream, and forward injections" the family is optional, so a
    // network handle names one (INFERRED: the status Windows returns without one); flags 0 make
    // a handle for transport, stream and forward injection.
    if flags & FWPS_INJECTION_TYPE_NETWORK != 0 && addressFamily == AF_UNSPEC {
        return Status::INVALID_PARAMETER.raw();
    }
    let types = if flags == 0 {
        FWPS_INJECTION_TYPE_TRANSPORT | FWPS_INJECTION_TYPE_STREAM | FWPS_INJECTION_TYPE_FORWARD
    } else {
        flags
    };
    let kernel = current();
    let mut state = kernel.inject.state();
    state.next_handle += 1;
    // Opaque values with a tag of their own, so they never equal another kind of handle.
    let handle = (0x1A1E_usize << 48) | state.next_handle;
    state.handles.insert(
        handle,
        HandleRecord {
            driver: current_driver(),
            in_flight: 0,
            types,
            family: addressFamily,
        },
    );
    drop(state);
    // SAFETY: writable per the contract.
    unsafe { injectionHandle.write(handle as HANDLE) };
    0
}

/// Stops for a handle that is not live.
fn handle_not_live(routine: &str, handle: usize, destroyed: bool) -> ! {
    stop(
        BugCheckCode::WFP_INVALID_OPERATION,
        [HANDLE_NOT_LIVE, handle, usize::from(destroyed), 0],
        &if destroyed {
            format!("{routine} with an injection handle that was already destroyed")
        } else {
            format!("{routine} with an injection handle FwpsInjectionHandleCreate0 never returned")
        },
    )
}

/// `FwpsInjectionHandleDestroy0`: `PASSIVE_LEVEL`; returns once the handle's injections in
/// flight have completed.
///
/// # Safety
///
/// None beyond the contract's: the handle is the caller's.
pub unsafe extern "system" fn FwpsInjectionHandleDestroy0(injectionHandle: HANDLE) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsInjectionHandleDestroy0", PASSIVE_LEVEL);
    let handle = injectionHandle as usize;
    let kernel = current();
    let mut state = kernel.inject.state();
    loop {
        match state.handles.get(&handle) {
            None => {
                let destroyed = state.destroyed.contains(&handle);
                drop(state);
                handle_not_live("FwpsInjectionHandleDestroy0", handle, destroyed);
            }
            Some(record) if record.in_flight == 0 => break,
            Some(_) => {
                state = kernel.wait_once(
                    &kernel.inject.state,
                    state,
                    &kernel.inject.changed,
                    None,
                    "FwpsInjectionHandleDestroy0: waits for injections in flight",
                );
            }
        }
    }
    state.handles.remove(&handle);
    state.destroyed.insert(handle);
    0
}

/// `FwpsAllocateCloneNetBufferList0`: at most `DISPATCH_LEVEL`. The clone copies the original's
/// first net buffer (see the module documentation); the pool handles are ignored (the default
/// pools).
///
/// # Safety
///
/// `originalNetBufferList` must be a valid net buffer list; `netBufferList` writable.
pub unsafe extern "system" fn FwpsAllocateCloneNetBufferList0(
    originalNetBufferList: *mut NET_BUFFER_LIST,
    netBufferListPoolHandle: HANDLE,
    netBufferPoolHandle: HANDLE,
    allocateCloneFlags: u32,
    netBufferList: *mut *mut NET_BUFFER_LIST,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (netBufferListPoolHandle, netBufferPoolHandle);
    require_irql("FwpsAllocateCloneNetBufferList0", DISPATCH_LEVEL);
    if netBufferList.is_null() || originalNetBufferList.is_null() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if allocateCloneFlags != 0 {
        return Status::INVALID_PARAMETER.raw();
    }
    // SAFETY: valid per the contract.
    let original = unsafe { &*originalNetBufferList };
    // SAFETY: likewise, its first net buffer.
    let Some(first) = (unsafe { original.FirstNetBuffer.as_ref() }) else {
        return Status::INVALID_PARAMETER.raw();
    };
    let Some(bytes) = chain_bytes(first) else {
        return Status::INVALID_PARAMETER.raw();
    };
    let mut bytes = bytes.into_boxed_slice();
    let address = bytes.as_mut_ptr() as usize;
    // SAFETY: the NDIS structures are plain data; zero is an empty, unlinked one.
    let (nbl, nb) = unsafe { core::mem::zeroed::<(NET_BUFFER_LIST, NET_BUFFER)>() };
    let mut storage = Box::new(CloneStorage {
        nbl,
        nb,
        mdl: MDL {
            Next: core::ptr::null_mut(),
            Size: size_of::<MDL>() as i16,
            MdlFlags: MDL_SOURCE_IS_NONPAGED_POOL,
            Process: core::ptr::null_mut(),
            MappedSystemVa: bytes.as_mut_ptr().cast(),
            StartVa: (address & !0xFFF) as PVOID,
            ByteCount: bytes.len() as u32,
            ByteOffset: (address & 0xFFF) as u32,
        },
        bytes,
    });
    storage.nb.MdlChain = &raw mut storage.mdl;
    storage.nb.DataOffset = first.DataOffset;
    storage.nb.DataLength = first.DataLength;
    let offset = first.DataOffset;
    set_data_offset(&mut storage.nb, offset);
    storage.nbl.FirstNetBuffer = &raw mut storage.nb;
    storage.nbl.NblFlags = original.NblFlags;
    set_origin(&mut storage.nbl, origin_of(original));
    let clone = &raw mut storage.nbl;
    let kernel = current();
    kernel.inject.state().clones.insert(
        clone as usize,
        CloneRecord {
            driver: current_driver(),
            storage,
            flight: None,
        },
    );
    // SAFETY: writable per the contract.
    unsafe { netBufferList.write(clone) };
    0
}

/// Stops for a net buffer list that is not a live clone.
fn clone_not_live(routine: &str, nbl: usize, state: MutexGuard<'_, State>) -> ! {
    let recently_freed = state.freed.iter().any(|(a, _)| *a == nbl);
    drop(state);
    stop(
        BugCheckCode::WFP_INVALID_OPERATION,
        [CLONE_NOT_LIVE, nbl, usize::from(recently_freed), 0],
        &if recently_freed {
            format!("{routine} with a cloned net buffer list that was already freed")
        } else {
            format!(
                "{routine} with a net buffer list FwpsAllocateCloneNetBufferList0 did not return"
            )
        },
    )
}

/// Stops for a clone whose injection is in flight.
fn clone_in_flight(routine: &str, nbl: usize) -> ! {
    stop(
        BugCheckCode::WFP_INVALID_OPERATION,
        [CLONE_IN_FLIGHT, nbl, 0, 0],
        &format!(
            "{routine} with a cloned net buffer list whose injection is still in flight (the \
             stack owns it until the completion routine runs)"
        ),
    )
}

/// `FwpsFreeCloneNetBufferList0`: at most `DISPATCH_LEVEL`.
///
/// # Safety
///
/// `netBufferList` must be a clone the caller owns.
pub unsafe extern "system" fn FwpsFreeCloneNetBufferList0(
    netBufferList: *mut NET_BUFFER_LIST,
    freeCloneFlags: u32,
) {
    let _kernel = super::state::KernelCode::enter();
    let _ = freeCloneFlags;
    require_irql("FwpsFreeCloneNetBufferList0", DISPATCH_LEVEL);
    let nbl = netBufferList as usize;
    let kernel = current();
    let mut state = kernel.inject.state();
    match state.clones.get(&nbl) {
        None => clone_not_live("FwpsFreeCloneNetBufferList0", nbl, state),
        Some(record) if record.flight.is_some() => {
            drop(state);
            clone_in_flight("FwpsFreeCloneNetBufferList0", nbl)
        }
        Some(_) => {}
    }
    let record = state.clones.remove(&nbl).expect("checked above");
    state.freed.push_back((nbl, record.storage));
    if state.freed.len() > QUARANTINE {
        state.freed.pop_front();
    }
    drop(state);
    kernel.inject.changed.notify_all();
}

/// What an inject routine checks and records, for both directions: returns whether a harness
/// thread delivers it (a receive injection of a `deliverable` packet of an attempt it waits for).
fn begin_flight(routine: &str, nbl: usize, mut flight: Flight, deliverable: bool) -> bool {
    let kernel = current();
    let mut state = kernel.inject.state();
    if !state.handles.contains_key(&flight.handle) {
        let destroyed = state.destroyed.contains(&flight.handle);
        drop(state);
        handle_not_live(routine, flight.handle, destroyed);
    }
    let origin = match state.clones.get(&nbl) {
        None => clone_not_live(routine, nbl, state),
        Some(record) if record.flight.is_some() => {
            drop(state);
            clone_in_flight(routine, nbl)
        }
        Some(record) => origin_of(&record.storage.nbl),
    };
    flight.queued =
        deliverable && flight.receive && origin != 0 && state.awaiting.contains(&origin);
    if let Some(record) = state.clones.get_mut(&nbl) {
        record.flight = Some(flight);
    }
    if let Some(handle) = state.handles.get_mut(&flight.handle) {
        handle.in_flight += 1;
    }
    drop(state);
    kernel.inject.changed.notify_all();
    flight.queued
}

/// Ends the injection of `nbl`: sets its status, calls the completion routine as the injecting
/// driver's code at `DISPATCH_LEVEL`, and releases the handle.
pub(crate) fn complete_flight(nbl: usize, status: NTSTATUS) {
    let kernel = current();
    let flight = {
        let mut state = kernel.inject.state();
        let Some(record) = state.clones.get_mut(&nbl) else {
            return;
        };
        record.storage.nbl.Status = status;
        record.flight.take()
    };
    let Some(flight) = flight else { return };
    if let Some(completion) = flight.completion {
        let run = || {
            super::wfp::in_driver(flight.driver, 0, "the injection completion routine", || {
                // SAFETY: the routine the driver passed for this injection, with its context and
                // the clone it injected; at DISPATCH_LEVEL, as `dispatchLevel` says.
                unsafe { completion(flight.completion_context as PVOID, nbl as _, TRUE) }
            });
        };
        if super::state::irql() >= DISPATCH_LEVEL {
            run();
        } else {
            super::state::with_context(&kernel, DISPATCH_LEVEL, flight.driver, run);
        }
    }
    let mut state = kernel.inject.state();
    if let Some(handle) = state.handles.get_mut(&flight.handle) {
        handle.in_flight = handle.in_flight.saturating_sub(1);
    }
    drop(state);
    kernel.inject.changed.notify_all();
}

/// Whether the first byte at the data start of `nbl` is the IP header of `family`.
fn starts_at_ip_header(nbl: usize, family: ADDRESS_FAMILY) -> bool {
    let kernel = current();
    let state = kernel.inject.state();
    let Some(record) = state.clones.get(&nbl) else {
        return false;
    };
    let offset = record.storage.nb.DataOffset as usize;
    let version = record.storage.bytes.get(offset).map(|b| b >> 4);
    matches!((family, version), (AF_INET, Some(4)) | (AF_INET6, Some(6)))
}

/// `FwpsInjectTransportReceiveAsync0`: at most `DISPATCH_LEVEL`. The clone must start at the
/// IP header; one that does not is dropped by the stack (its completion routine sees
/// `STATUS_INVALID_PARAMETER` in the list's `Status`; INFERRED: Windows parses the bytes as an
/// IP header and drops a malformed packet).
///
/// # Safety
///
/// As documented: `netBufferList` is a clone the caller owns, `completionFn` callable.
pub unsafe extern "system" fn FwpsInjectTransportReceiveAsync0(
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    reserved: PVOID,
    flags: u32,
    addressFamily: ADDRESS_FAMILY,
    compartmentId: u32,
    interfaceIndex: u32,
    subInterfaceIndex: u32,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (compartmentId, interfaceIndex, subInterfaceIndex);
    require_irql("FwpsInjectTransportReceiveAsync0", DISPATCH_LEVEL);
    if netBufferList.is_null() || completionFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if !reserved.is_null() || flags != 0 || !matches!(addressFamily, AF_INET | AF_INET6) {
        return Status::INVALID_PARAMETER.raw();
    }
    let nbl = netBufferList as usize;
    if !handle_fits(
        injectionHandle as usize,
        FWPS_INJECTION_TYPE_TRANSPORT,
        addressFamily,
    ) {
        return Status::INVALID_PARAMETER.raw();
    }
    let flight = Flight {
        handle: injectionHandle as usize,
        injection_context: injectionContext as usize,
        completion: completionFn,
        completion_context: completionContext as usize,
        receive: true,
        queued: false,
        driver: current_driver(),
    };
    // A malformed packet is dropped at once, never delivered to a waiting attempt.
    let well_formed = starts_at_ip_header(nbl, addressFamily);
    let queued = begin_flight("FwpsInjectTransportReceiveAsync0", nbl, flight, well_formed);
    if !queued {
        let status = if well_formed {
            reindicate(nbl, addressFamily, Reentry::TransportReceive);
            0
        } else {
            Status::INVALID_PARAMETER.raw()
        };
        complete_flight(nbl, status);
    }
    0
}

/// `FwpsInjectTransportSendAsync0`: at most `DISPATCH_LEVEL`. The packet is indicated again at
/// OUTBOUND_TRANSPORT (see `reindicate`), then delivered.
///
/// # Safety
///
/// As documented: `netBufferList` is a clone the caller owns, `sendArgs` null or valid.
pub unsafe extern "system" fn FwpsInjectTransportSendAsync0(
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    endpointHandle: u64,
    flags: u32,
    sendArgs: *mut FWPS_TRANSPORT_SEND_PARAMS0,
    addressFamily: ADDRESS_FAMILY,
    compartmentId: u32,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = compartmentId;
    require_irql("FwpsInjectTransportSendAsync0", DISPATCH_LEVEL);
    if netBufferList.is_null() || completionFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if flags != 0 || !matches!(addressFamily, AF_INET | AF_INET6) {
        return Status::INVALID_PARAMETER.raw();
    }
    let nbl = netBufferList as usize;
    if !handle_fits(
        injectionHandle as usize,
        FWPS_INJECTION_TYPE_TRANSPORT,
        addressFamily,
    ) {
        return Status::INVALID_PARAMETER.raw();
    }
    let flight = Flight {
        handle: injectionHandle as usize,
        injection_context: injectionContext as usize,
        completion: completionFn,
        completion_context: completionContext as usize,
        receive: false,
        queued: false,
        driver: current_driver(),
    };
    begin_flight("FwpsInjectTransportSendAsync0", nbl, flight, true);
    // SAFETY: `sendArgs` is null or valid per the contract, its `remoteAddress` null or pointing
    // to the address (4 bytes for IPv4, 16 for IPv6).
    let remote = unsafe { sendArgs.as_ref() }
        .filter(|args| !args.remoteAddress.is_null())
        .map(|args| {
            let len = if addressFamily == AF_INET { 4 } else { 16 };
            let mut address = [0u8; 16];
            // SAFETY: as above.
            address[..len].copy_from_slice(unsafe {
                core::slice::from_raw_parts(args.remoteAddress.cast_const(), len)
            });
            address
        });
    reindicate_with(
        nbl,
        addressFamily,
        Reentry::TransportSend,
        Sent {
            endpoint: endpointHandle,
            remote,
        },
    );
    complete_flight(nbl, 0);
    0
}

/// Whether `handle` (if live) was created for injections of `kind` (`FWPS_INJECTION_TYPE_*`)
/// of `family` (`AF_UNSPEC`: of any family, for a packet that is not IP at all, which the stack
/// then drops). A handle that is not live is left to `begin_flight`, which stops for it.
fn handle_fits(handle: usize, kind: u32, family: ADDRESS_FAMILY) -> bool {
    let kernel = current();
    let state = kernel.inject.state();
    state.handles.get(&handle).is_none_or(|record| {
        record.types & kind != 0
            && (family == AF_UNSPEC || record.family == AF_UNSPEC || record.family == family)
    })
}

/// The address family of the IP header at the data start of clone `nbl` (`AF_UNSPEC` if none).
fn family_at_start(nbl: usize) -> ADDRESS_FAMILY {
    if starts_at_ip_header(nbl, AF_INET) {
        AF_INET
    } else if starts_at_ip_header(nbl, AF_INET6) {
        AF_INET6
    } else {
        AF_UNSPEC
    }
}

/// What the network and forward inject routines share: the checks, then delivery at once.
/// `family` is the one the caller names (forward) or the packet's own (network); a packet that
/// does not start with an IP header of it is dropped by the stack (its completion routine sees
/// `STATUS_INVALID_PARAMETER`, as for transport receive injection). A handle not created for
/// `kind` of `family` is refused with `STATUS_INVALID_PARAMETER` and the clone stays the
/// caller's (INFERRED: the documentation requires the type; it does not say what Windows
/// returns otherwise).
#[allow(clippy::too_many_arguments)]
fn inject_at_once(
    routine: &'static str,
    kind: u32,
    family: ADDRESS_FAMILY,
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let nbl = netBufferList as usize;
    let handle = injectionHandle as usize;
    if !handle_fits(handle, kind, family) {
        return Status::INVALID_PARAMETER.raw();
    }
    let flight = Flight {
        handle,
        injection_context: injectionContext as usize,
        completion: completionFn,
        completion_context: completionContext as usize,
        receive: kind == FWPS_INJECTION_TYPE_NETWORK,
        queued: false,
        driver: current_driver(),
    };
    let well_formed = family != AF_UNSPEC && starts_at_ip_header(nbl, family);
    begin_flight(routine, nbl, flight, false);
    let status = if well_formed {
        0
    } else {
        Status::INVALID_PARAMETER.raw()
    };
    {
        let kernel = current();
        let mut state = kernel.inject.state();
        let packet = state
            .clones
            .get(&nbl)
            .map(|record| {
                let start = record.storage.nb.DataOffset as usize;
                record
                    .storage
                    .bytes
                    .get(start..)
                    .unwrap_or_default()
                    .to_vec()
            })
            .unwrap_or_default();
        state.delivered.push_back(Delivered {
            routine,
            status,
            packet,
            reindicated: None,
        });
        if state.delivered.len() > DELIVERED_KEPT {
            state.delivered.pop_front();
        }
    }
    if well_formed && kind == FWPS_INJECTION_TYPE_NETWORK {
        let reentry = if routine == "FwpsInjectNetworkReceiveAsync0" {
            Reentry::NetworkReceive
        } else {
            Reentry::NetworkSend
        };
        let action = reindicate(nbl, family, reentry);
        let kernel = current();
        let mut state = kernel.inject.state();
        // Its own entry: the newest of this routine's entries for no re-indication yet (inner
        // injections, re-indicated first, pushed theirs after it).
        if let Some(entry) = state
            .delivered
            .iter_mut()
            .rev()
            .find(|d| d.routine == routine && d.reindicated.is_none())
        {
            entry.reindicated = Some(action);
        }
    }
    complete_flight(nbl, status);
    0
}

/// Where an injected packet is indicated again.
#[derive(Clone, Copy)]
enum Reentry {
    /// INBOUND_IPPACKET, past the IP header the clone starts at.
    NetworkReceive,
    /// OUTBOUND_IPPACKET, at the IP header the clone starts at.
    NetworkSend,
    /// INBOUND_TRANSPORT, past the IP and transport headers the clone starts at.
    TransportReceive,
    /// OUTBOUND_TRANSPORT, at the transport header the clone starts at.
    TransportSend,
}

/// The IP header's size and the transport header's size (TCP's data offset, UDP's 8, else 0)
/// of `bytes`, which start at an IP header if `ip`, else at a transport header of `protocol`.
fn header_sizes(bytes: &[u8], ip: bool, protocol: u8) -> (u32, u32) {
    let (ip_size, protocol) = if ip {
        match bytes.first() {
            Some(b) if b >> 4 == 4 => (u32::from(b & 0x0F) * 4, bytes.get(9).copied().unwrap_or(0)),
            Some(_) => (40, bytes.get(6).copied().unwrap_or(0)),
            None => (0, 0),
        }
    } else {
        (0, protocol)
    };
    let transport = match protocol {
        6 => bytes
            .get(ip_size as usize + 12)
            .map_or(20, |b| u32::from(b >> 4) * 4),
        17 => 8,
        _ => 0,
    };
    (ip_size, transport)
}

/// Indicates injected clone `nbl` to the layer it re-enters, as Microsoft documents for
/// network and transport injection ("the injected packet can be indicated to the callout driver
/// again"): at `DISPATCH_LEVEL`, on the injecting thread before the inject routine returns
/// (INFERRED: Windows may do it later, on another processor; a callout must be ready for both),
/// with the injection in flight, so `FwpsQueryPacketInjectionState0` says `INJECTED_BY_SELF` to
/// the injecting handle. Only the layer's filters and callouts decide it; its fields are empty.
/// A callout that injects every packet it sees, its own injections included, would loop for
/// ever on Windows; here it stops with `WFP_INVALID_OPERATION` ([`INJECTION_LOOP`]) once the
/// re-indications nest [`REINDICATION_LIMIT`] deep. Returns the layer's action.
fn reindicate(nbl: usize, family: ADDRESS_FAMILY, reentry: Reentry) -> FWP_ACTION_TYPE {
    reindicate_with(nbl, family, reentry, Sent::default())
}

/// What a transport send injection says of the packet beyond its bytes, which carry no IP
/// header: the endpoint it is sent from, and its remote address (`sendArgs`).
#[derive(Clone, Copy, Default)]
struct Sent {
    endpoint: u64,
    remote: Option<[u8; 16]>,
}

/// The value of an address field: IPv4 as `FWP_UINT32` in host order, IPv6 as 16 bytes.
fn address_value(v4: bool, bytes: &[u8]) -> super::wfp::SimValue {
    if v4 {
        let mut a = [0u8; 4];
        a.copy_from_slice(bytes.get(..4).unwrap_or(&[0; 4]));
        super::wfp::SimValue::U32(u32::from_be_bytes(a))
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(bytes.get(..16).unwrap_or(&[0; 16]));
        super::wfp::SimValue::Bytes16(a)
    }
}

/// [`reindicate`], with what a transport send injection adds ([`Sent`]).
fn reindicate_with(
    nbl: usize,
    family: ADDRESS_FAMILY,
    reentry: Reentry,
    sent: Sent,
) -> FWP_ACTION_TYPE {
    let depth = REINDICATION_DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    struct Unnest;
    impl Drop for Unnest {
        fn drop(&mut self) {
            REINDICATION_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    let _unnest = Unnest;
    if depth > REINDICATION_LIMIT {
        stop(
            BugCheckCode::WFP_INVALID_OPERATION,
            [INJECTION_LOOP, nbl, depth as usize, 0],
            &format!(
                "an injected packet was injected again {depth} times in a row: a callout \
                 injects its own injections (check FwpsQueryPacketInjectionState0 and permit \
                 FWPS_PACKET_INJECTED_BY_SELF)"
            ),
        );
    }
    let v4 = family == AF_INET;
    let layer_id = match (reentry, v4) {
        (Reentry::NetworkReceive, true) => FWPS_LAYER_INBOUND_IPPACKET_V4,
        (Reentry::NetworkReceive, false) => FWPS_LAYER_INBOUND_IPPACKET_V6,
        (Reentry::NetworkSend, true) => FWPS_LAYER_OUTBOUND_IPPACKET_V4,
        (Reentry::NetworkSend, false) => FWPS_LAYER_OUTBOUND_IPPACKET_V6,
        (Reentry::TransportReceive, true) => FWPS_LAYER_INBOUND_TRANSPORT_V4,
        (Reentry::TransportReceive, false) => FWPS_LAYER_INBOUND_TRANSPORT_V6,
        (Reentry::TransportSend, true) => FWPS_LAYER_OUTBOUND_TRANSPORT_V4,
        (Reentry::TransportSend, false) => FWPS_LAYER_OUTBOUND_TRANSPORT_V6,
    };
    let Some(layer) = wfp_rs::layer::layer_by_id(layer_id) else {
        return FWP_ACTION_PERMIT;
    };
    let kernel = current();
    let ip_present = !matches!(reentry, Reentry::TransportSend);
    let (start, ip_size, transport_size, bytes) = {
        let state = kernel.inject.state();
        state
            .clones
            .get(&nbl)
            .map_or((0, 0, 0, Vec::new()), |record| {
                let start = record.storage.nb.DataOffset;
                let bytes = record
                    .storage
                    .bytes
                    .get(start as usize..)
                    .unwrap_or_default();
                // A send clone carries no IP header to read the protocol from: TCP if the header
                // is TCP-sized (INFERRED: the simulator's packets are SYNs or UDP headers).
                let guessed = if bytes.len() >= 20 { 6 } else { 17 };
                let (ip, transport) = header_sizes(bytes, ip_present, guessed);
                (start, ip, transport, bytes.to_vec())
            })
    };
    let offset = start
        + match reentry {
            Reentry::NetworkReceive => ip_size,
            Reentry::TransportReceive => ip_size + transport_size,
            Reentry::NetworkSend | Reentry::TransportSend => 0,
        };
    let layer_data = position(&kernel, nbl, offset);
    // The address and port fields, from the packet's headers (and, for a send, `sendArgs`):
    // enough for a callout to clone the packet again, as on Windows, where every field is
    // filled (INFERRED: the other fields are left empty here).
    let inbound = matches!(reentry, Reentry::NetworkReceive | Reentry::TransportReceive);
    let (local, remote): (Option<&[u8]>, Option<&[u8]>) = if ip_present {
        let (source, destination) = if v4 {
            (bytes.get(12..16), bytes.get(16..20))
        } else {
            (bytes.get(8..24), bytes.get(24..40))
        };
        if inbound {
            (destination, source)
        } else {
            (source, destination)
        }
    } else {
        (None, sent.remote.as_ref().map(|r| &r[..]))
    };
    let ports = bytes.get(ip_size as usize..ip_size as usize + 4).map(|p| {
        let (source, destination) = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
        if inbound {
            (destination, source)
        } else {
            (source, destination)
        }
    });
    let transport_layer = matches!(reentry, Reentry::TransportReceive | Reentry::TransportSend);
    let values = || {
        let mut values = vec![super::wfp::SimValue::Empty; layer.field_count as usize];
        for field in layer.fields {
            let value = match field.name {
                "IpLocalAddress" => local.map(|a| address_value(v4, a)),
                "IpRemoteAddress" => remote.map(|a| address_value(v4, a)),
                "IpLocalPort" if transport_layer => {
                    ports.map(|(l, _)| super::wfp::SimValue::U16(l))
                }
                "IpRemotePort" if transport_layer => {
                    ports.map(|(_, r)| super::wfp::SimValue::U16(r))
                }
                _ => None,
            };
            if let (Some(value), Some(slot)) = (value, values.get_mut(field.index as usize)) {
                *slot = value;
            }
        }
        values
    };
    // SAFETY: the metadata structure is plain data, valid when zeroed (no field present).
    let mut metadata: FWPS_INCOMING_METADATA_VALUES0 = unsafe { core::mem::zeroed() };
    if ip_present {
        metadata.ipHeaderSize = ip_size;
        metadata.currentMetadataValues |= FWPS_METADATA_FIELD_IP_HEADER_SIZE;
    }
    if transport_layer {
        metadata.transportHeaderSize = transport_size;
        metadata.currentMetadataValues |= FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE;
    }
    if matches!(reentry, Reentry::TransportSend) && sent.endpoint != 0 {
        metadata.transportEndpointHandle = sent.endpoint;
        metadata.currentMetadataValues |= FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE;
    }
    let mut incoming = super::wfp::Incoming {
        layer,
        values: super::wfp::Values::new(&values),
        metadata,
        process_path: None,
        layer_data,
        packet: None,
        classify_context: core::ptr::null(),
        flow_context: 0,
        pendable: false,
        reauthorization: false,
    };
    let was = super::state::irql();
    if was < DISPATCH_LEVEL {
        super::state::set_irql(DISPATCH_LEVEL);
    }
    let verdict = super::wfp::classify(&mut incoming);
    if was < DISPATCH_LEVEL {
        super::state::set_irql(was);
    }
    // Back where the driver injected it from, for the completion routine.
    position(&kernel, nbl, start);
    verdict.action
}

/// `FwpsInjectNetworkSendAsync0`: at most `DISPATCH_LEVEL`. The packet (a clone starting at its
/// IP header) is indicated to OUTBOUND_IPPACKET again (see `reindicate`), then delivered.
///
/// # Safety
///
/// As documented: `netBufferList` is a clone the caller owns, `completionFn` callable.
pub unsafe extern "system" fn FwpsInjectNetworkSendAsync0(
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    flags: u32,
    compartmentId: u32,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = compartmentId;
    require_irql("FwpsInjectNetworkSendAsync0", DISPATCH_LEVEL);
    if netBufferList.is_null() || completionFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if flags != 0 {
        return Status::INVALID_PARAMETER.raw();
    }
    inject_at_once(
        "FwpsInjectNetworkSendAsync0",
        FWPS_INJECTION_TYPE_NETWORK,
        family_at_start(netBufferList as usize),
        injectionHandle,
        injectionContext,
        netBufferList,
        completionFn,
        completionContext,
    )
}

/// `FwpsInjectNetworkReceiveAsync0`: at most `DISPATCH_LEVEL`. As `FwpsInjectNetworkSendAsync0`,
/// into the receive path.
///
/// # Safety
///
/// As documented: `netBufferList` is a clone the caller owns, `completionFn` callable.
pub unsafe extern "system" fn FwpsInjectNetworkReceiveAsync0(
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    flags: u32,
    compartmentId: u32,
    interfaceIndex: u32,
    subInterfaceIndex: u32,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (compartmentId, interfaceIndex, subInterfaceIndex);
    require_irql("FwpsInjectNetworkReceiveAsync0", DISPATCH_LEVEL);
    if netBufferList.is_null() || completionFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if flags != 0 {
        return Status::INVALID_PARAMETER.raw();
    }
    inject_at_once(
        "FwpsInjectNetworkReceiveAsync0",
        FWPS_INJECTION_TYPE_NETWORK,
        family_at_start(netBufferList as usize),
        injectionHandle,
        injectionContext,
        netBufferList,
        completionFn,
        completionContext,
    )
}

/// `FwpsInjectForwardAsync0`: at most `DISPATCH_LEVEL`. The packet is delivered at once and,
/// as documented, not classified again at the forward layer.
///
/// # Safety
///
/// As documented: `netBufferList` is a clone the caller owns, `completionFn` callable.
pub unsafe extern "system" fn FwpsInjectForwardAsync0(
    injectionHandle: HANDLE,
    injectionContext: HANDLE,
    flags: u32,
    addressFamily: ADDRESS_FAMILY,
    compartmentId: u32,
    interfaceIndex: u32,
    netBufferList: *mut NET_BUFFER_LIST,
    completionFn: FWPS_INJECT_COMPLETE0,
    completionContext: HANDLE,
) -> NTSTATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (compartmentId, interfaceIndex);
    require_irql("FwpsInjectForwardAsync0", DISPATCH_LEVEL);
    if netBufferList.is_null() || completionFn.is_none() {
        return Status::FWP_NULL_POINTER.raw();
    }
    if flags != 0 || !matches!(addressFamily, AF_INET | AF_INET6) {
        return Status::INVALID_PARAMETER.raw();
    }
    inject_at_once(
        "FwpsInjectForwardAsync0",
        FWPS_INJECTION_TYPE_FORWARD,
        addressFamily,
        injectionHandle,
        injectionContext,
        netBufferList,
        completionFn,
        completionContext,
    )
}

/// `FwpsQueryPacketInjectionState0`: at most `DISPATCH_LEVEL`.
///
/// # Safety
///
/// `netBufferList` must be valid; `injectionContext` null or writable.
pub unsafe extern "system" fn FwpsQueryPacketInjectionState0(
    injectionHandle: HANDLE,
    netBufferList: *const NET_BUFFER_LIST,
    injectionContext: *mut HANDLE,
) -> FWPS_PACKET_INJECTION_STATE {
    let _kernel = super::state::KernelCode::enter();
    require_irql("FwpsQueryPacketInjectionState0", DISPATCH_LEVEL);
    let handle = injectionHandle as usize;
    let kernel = current();
    let state = kernel.inject.state();
    if !state.handles.contains_key(&handle) {
        let destroyed = state.destroyed.contains(&handle);
        drop(state);
        handle_not_live("FwpsQueryPacketInjectionState0", handle, destroyed);
    }
    let flight = state
        .clones
        .get(&(netBufferList as usize))
        .and_then(|record| record.flight);
    drop(state);
    match flight {
        None => FWPS_PACKET_NOT_INJECTED,
        Some(flight) if flight.handle == handle => {
            if !injectionContext.is_null() {
                // SAFETY: writable per the contract.
                unsafe { injectionContext.write(flight.injection_context as HANDLE) };
            }
            FWPS_PACKET_INJECTED_BY_SELF
        }
        Some(_) => FWPS_PACKET_INJECTED_BY_OTHER,
    }
}

/// `NdisRetreatNetBufferDataStart`: at most `DISPATCH_LEVEL`. The simulator's packets always
/// have the used data space asked for; a retreat beyond it (which Windows satisfies by
/// allocating an MDL) fails with `NDIS_STATUS_RESOURCES` here (not modelled).
///
/// # Safety
///
/// `NetBuffer` must be valid.
pub unsafe extern "system" fn NdisRetreatNetBufferDataStart(
    NetBuffer: *mut NET_BUFFER,
    DataOffsetDelta: u32,
    DataBackFill: u32,
    AllocateMdlHandler: NET_BUFFER_ALLOCATE_MDL,
) -> NDIS_STATUS {
    let _kernel = super::state::KernelCode::enter();
    let _ = (DataBackFill, AllocateMdlHandler);
    require_irql("NdisRetreatNetBufferDataStart", DISPATCH_LEVEL);
    // SAFETY: valid per the contract.
    let Some(nb) = (unsafe { NetBuffer.as_mut() }) else {
        return NDIS_STATUS_FAILURE;
    };
    let Some(offset) = nb.DataOffset.checked_sub(DataOffsetDelta) else {
        return NDIS_STATUS_RESOURCES;
    };
    set_data_offset(nb, offset);
    NDIS_STATUS_SUCCESS
}

/// `NdisAdvanceNetBufferDataStart`: at most `DISPATCH_LEVEL`. Advancing past the end of the
/// data stops at the end (INFERRED: Windows does not check).
///
/// # Safety
///
/// `NetBuffer` must be valid.
pub unsafe extern "system" fn NdisAdvanceNetBufferDataStart(
    NetBuffer: *mut NET_BUFFER,
    DataOffsetDelta: u32,
    FreeMdl: BOOLEAN,
    FreeMdlHandler: NET_BUFFER_FREE_MDL,
) {
    let _kernel = super::state::KernelCode::enter();
    let _ = (FreeMdl, FreeMdlHandler);
    require_irql("NdisAdvanceNetBufferDataStart", DISPATCH_LEVEL);
    // SAFETY: valid per the contract.
    if let Some(nb) = unsafe { NetBuffer.as_mut() } {
        let length = nb.DataLength as u32;
        let offset = nb.DataOffset + DataOffsetDelta.min(length);
        set_data_offset(nb, offset);
    }
}

/// The harness waits to deliver the injected packets of connection attempt `origin`.
pub(crate) fn await_origin(kernel: &super::state::Kernel, origin: u64) {
    kernel.inject.state().awaiting.insert(origin);
}

/// The harness no longer waits for `origin`.
pub(crate) fn forget_origin(kernel: &super::state::Kernel, origin: u64) {
    kernel.inject.state().awaiting.remove(&origin);
}

/// What became of the absorbed packet of connection attempt `origin`.
pub(crate) enum Fate {
    /// A clone of it was receive-injected: the clone's list, to deliver.
    Injected(usize),
    /// No clone of it is alive (none was made, or all were freed): the attempt fails.
    Dropped,
    /// Clones stayed alive, uninjected, until the deadline.
    TimedOut,
}

/// Waits until a clone of `origin`'s packet is queued for delivery, or none is alive, or
/// `deadline` passes.
pub(crate) fn wait_for_fate(
    kernel: &super::state::Kernel,
    origin: u64,
    deadline: super::state::Deadline,
) -> Fate {
    let mut state = kernel.inject.state();
    loop {
        let mut alive = false;
        for (&nbl, record) in &state.clones {
            if origin_of(&record.storage.nbl) != origin {
                continue;
            }
            match record.flight {
                Some(flight) if flight.queued => return Fate::Injected(nbl),
                _ => alive = true,
            }
        }
        if !alive {
            return Fate::Dropped;
        }
        if kernel.has_passed(deadline) {
            return Fate::TimedOut;
        }
        state = kernel.wait_once(
            &kernel.inject.state,
            state,
            &kernel.inject.changed,
            Some(deadline),
            "waits for a clone's reinjection",
        );
    }
}

/// Moves the data start of the queued clone `nbl` to `offset` bytes into its bytes (where a
/// layer puts it) and returns the list, for the delivering classification's `layerData`.
pub(crate) fn position(kernel: &super::state::Kernel, nbl: usize, offset: u32) -> PVOID {
    let mut state = kernel.inject.state();
    if let Some(record) = state.clones.get_mut(&nbl) {
        set_data_offset(&mut record.storage.nb, offset);
    }
    nbl as PVOID
}

/// At unload of `driver`: a clone not freed, or an injection handle not destroyed, stops the
/// machine (see the module documentation).
pub(crate) fn check_unload(kernel: &super::state::Kernel, driver: usize, name: &str) {
    let state = kernel.inject.state();
    let mut clones: Vec<usize> = state
        .clones
        .iter()
        .filter(|(_, r)| r.driver == driver)
        .map(|(&a, _)| a)
        .collect();
    let mut handles: Vec<usize> = state
        .handles
        .iter()
        .filter(|(_, r)| r.driver == driver)
        .map(|(&h, _)| h)
        .collect();
    drop(state);
    clones.sort_unstable();
    handles.sort_unstable();
    if let Some(&first) = clones.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [0, first, UNLOAD_CLONES_LIVE, clones.len()],
            &format!(
                "driver {name} unloaded with {} cloned net buffer list(s) never freed (first \
                 {first:#x}); the stack holds each clone's original packet until it is freed. \
                 Free every clone (FwpsFreeCloneNetBufferList0) or inject it",
                clones.len()
            ),
        );
    }
    if let Some(&first) = handles.first() {
        stop(
            BugCheckCode::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            [0, first, UNLOAD_INJECTION_HANDLES_OPEN, handles.len()],
            &format!(
                "driver {name} unloaded with {} injection handle(s) never destroyed (first \
                 {first:#x}). Destroy every handle (FwpsInjectionHandleDestroy0) before unload \
                 returns",
                handles.len()
            ),
        );
    }
}
