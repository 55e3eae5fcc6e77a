//! GUIDs, as WFP names layers, callouts, sublayers and providers.

use core::fmt;

use crate::sys;

/// A GUID with the layout of the C `GUID`. Write literals with [`guid!`](crate::guid!), which
/// checks them at compile time.
///
/// ```
/// use wfp_rs::{guid, Guid};
/// const CALLOUT: Guid = guid!("7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4f5");
/// assert_eq!(CALLOUT.to_string(), "7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4f5");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Guid(pub sys::GUID);

impl Guid {
    /// Builds a GUID from its fields.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
        Guid(sys::GUID {
            Data1: data1,
            Data2: data2,
            Data3: data3,
            Data4: data4,
        })
    }

    /// The C structure.
    pub const fn raw(&self) -> &sys::GUID {
        &self.0
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            g.Data1,
            g.Data2,
            g.Data3,
            g.Data4[0],
            g.Data4[1],
            g.Data4[2],
            g.Data4[3],
            g.Data4[4],
            g.Data4[5],
            g.Data4[6],
            g.Data4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}
