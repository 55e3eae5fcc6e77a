//! The metadata of a classification (`FWPS_INCOMING_METADATA_VALUES0`): who and what, beyond the
//! layer's fields. Each value is present only when its `FWPS_METADATA_FIELD_*` bit is set, so
//! each accessor returns an `Option`.

use core::fmt;

use crate::layer::value::AppId;
use crate::sys;

/// The direction of a packet or connection (`FWP_DIRECTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `FWP_DIRECTION_OUTBOUND`.
    Outbound,
    /// `FWP_DIRECTION_INBOUND`.
    Inbound,
}

/// The metadata of one classification.
#[derive(Clone, Copy)]
pub struct Metadata<'a> {
    raw: &'a sys::FWPS_INCOMING_METADATA_VALUES0,
}

impl<'a> Metadata<'a> {
    /// Wraps the engine's metadata for the duration of a callback.
    pub(crate) fn new(raw: &'a sys::FWPS_INCOMING_METADATA_VALUES0) -> Metadata<'a> {
        Metadata { raw }
    }

    /// Whether the `FWPS_METADATA_FIELD_*` bit `field` is set.
    pub fn has(&self, field: u32) -> bool {
        self.raw.currentMetadataValues & field == field
    }

    fn get<T>(&self, field: u32, value: T) -> Option<T> {
        self.has(field).then_some(value)
    }

    /// The process that owns the endpoint (`FWPS_METADATA_FIELD_PROCESS_ID`).
    pub fn process_id(&self) -> Option<u64> {
        self.get(sys::FWPS_METADATA_FIELD_PROCESS_ID, self.raw.processId)
    }

    /// The process's image path (`FWPS_METADATA_FIELD_PROCESS_PATH`), as an NT path.
    pub fn process_path(&self) -> Option<AppId<'a>> {
        if !self.has(sys::FWPS_METADATA_FIELD_PROCESS_PATH) {
            return None;
        }
        // SAFETY: with the bit set the engine passes a valid blob for the callback.
        let blob = unsafe { self.raw.processPath.as_ref() }?;
        if blob.data.is_null() {
            return None;
        }
        // SAFETY: a valid blob holds `size` bytes at `data`, valid for the callback ('a).
        let bytes = unsafe { core::slice::from_raw_parts(blob.data, blob.size as usize) };
        Some(AppId::from_bytes(bytes))
    }

    /// The token handle of the process (`FWPS_METADATA_FIELD_TOKEN`).
    pub fn token(&self) -> Option<u64> {
        self.get(sys::FWPS_METADATA_FIELD_TOKEN, self.raw.token)
    }

    /// The flow handle (`FWPS_METADATA_FIELD_FLOW_HANDLE`), for flow contexts.
    pub fn flow_handle(&self) -> Option<u64> {
        self.get(sys::FWPS_METADATA_FIELD_FLOW_HANDLE, self.raw.flowHandle)
    }

    /// The completion handle (`FWPS_METADATA_FIELD_COMPLETION_HANDLE`), present where the
    /// classification may be pended.
    pub fn completion_handle(&self) -> Option<sys::HANDLE> {
        self.get(
            sys::FWPS_METADATA_FIELD_COMPLETION_HANDLE,
            self.raw.completionHandle,
        )
        .filter(|handle| !handle.is_null())
    }

    /// The connection's redirect records (`FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE`), which
    /// ALE_CONNECT_REDIRECT hands its callouts for `FwpsQueryConnectionRedirectState0` (see
    /// [`Classify::redirect_state`](crate::callout::Classify::redirect_state)).
    pub fn redirect_records(&self) -> Option<sys::HANDLE> {
        self.get(
            sys::FWPS_METADATA_FIELD_REDIRECT_RECORD_HANDLE,
            self.raw.redirectRecords,
        )
        .filter(|handle| !handle.is_null())
    }

    /// The transport endpoint handle (`FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE`).
    pub fn transport_endpoint_handle(&self) -> Option<u64> {
        self.get(
            sys::FWPS_METADATA_FIELD_TRANSPORT_ENDPOINT_HANDLE,
            self.raw.transportEndpointHandle,
        )
    }

    /// The packet direction (`FWPS_METADATA_FIELD_PACKET_DIRECTION`).
    pub fn direction(&self) -> Option<Direction> {
        self.get(
            sys::FWPS_METADATA_FIELD_PACKET_DIRECTION,
            self.raw.packetDirection,
        )
        .and_then(|direction| match direction {
            sys::FWP_DIRECTION_OUTBOUND => Some(Direction::Outbound),
            sys::FWP_DIRECTION_INBOUND => Some(Direction::Inbound),
            _ => None,
        })
    }

    /// The network compartment (`FWPS_METADATA_FIELD_COMPARTMENT_ID`).
    pub fn compartment_id(&self) -> Option<u32> {
        self.get(
            sys::FWPS_METADATA_FIELD_COMPARTMENT_ID,
            self.raw.compartmentId,
        )
    }

    /// The IP header size (`FWPS_METADATA_FIELD_IP_HEADER_SIZE`).
    pub fn ip_header_size(&self) -> Option<u32> {
        self.get(
            sys::FWPS_METADATA_FIELD_IP_HEADER_SIZE,
            self.raw.ipHeaderSize,
        )
    }

    /// The transport header size (`FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE`).
    pub fn transport_header_size(&self) -> Option<u32> {
        self.get(
            sys::FWPS_METADATA_FIELD_TRANSPORT_HEADER_SIZE,
            self.raw.transportHeaderSize,
        )
    }

    /// The raw structure, for members this type does not wrap.
    pub fn raw(&self) -> &'a sys::FWPS_INCOMING_METADATA_VALUES0 {
        self.raw
    }
}

impl fmt::Debug for Metadata<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metadata")
            .field("process_id", &self.process_id())
            .field("process_path", &self.process_path())
            .field("flow_handle", &self.flow_handle())
            .field("pendable", &self.completion_handle().is_some())
            .field("direction", &self.direction())
            .finish_non_exhaustive()
    }
}
