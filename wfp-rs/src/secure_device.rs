//! The named device that [`InvertedQueue`](crate::inverted::InvertedQueue) and
//! [`ControlDevice`](crate::control::ControlDevice) create: `\Device\<name>` with the link
//! `\??\<name>`, opened only by SYSTEM and Administrators, whose requests reach the SDK's
//! dispatch routine ([`crate::dispatch`]).
//!
//! The steps are split so that each owner can put its extension in order between them:
//! [`create`] (the device exists but cannot be opened: `DO_DEVICE_INITIALIZING`), then the owner
//! initialises the extension, then [`publish`] (DACL, link, cleared flag). Teardown is the
//! reverse: [`delete_link`], the owner's own shutdown, then `IoDeleteDevice`.

use core::ptr::NonNull;

use crate::driver::Driver;
use crate::irql::{AtPassive, DispatchLevel};
use crate::status::Status;
use crate::sys;

/// The longest device name accepted, in UTF-16 units.
pub(crate) const MAX_NAME_LEN: usize = 64;

const DEVICE_PREFIX: &str = "\\Device\\";
const LINK_PREFIX: &str = "\\??\\";
const NAME_CAPACITY: usize = DEVICE_PREFIX.len() + MAX_NAME_LEN;

/// A device's name and its link's, from the name the driver chose.
pub(crate) struct Names {
    pub(crate) device: WideName,
    pub(crate) link: WideName,
}

impl Names {
    /// No names yet, for [`Names::set`].
    pub(crate) const EMPTY: Names = Names {
        device: WideName::new(),
        link: WideName::new(),
    };

    /// Sets `\Device\<name>` and `\??\<name>`; `STATUS_OBJECT_NAME_INVALID` for an empty name,
    /// one longer than [`MAX_NAME_LEN`] or one with a backslash or NUL.
    ///
    /// In place, not a constructor: a `Names` is some 300 bytes, and in a debug build a value
    /// returned through a `Result` is copied through several temporaries, each with a stack slot
    /// of its own in the frame that creates the device (`cargo xtask stack --debug`).
    pub(crate) fn set(&mut self, name: &str) -> Result<(), Status> {
        if !self.device.push_name(DEVICE_PREFIX, name) || !self.link.push_name(LINK_PREFIX, name) {
            return Err(Status::OBJECT_NAME_INVALID);
        }
        Ok(())
    }
}

/// Routes the driver's requests to the SDK's dispatch routine (failing with
/// `STATUS_INVALID_DEVICE_STATE` if the driver installed its own) and creates the named device
/// with an extension of `extension_size` bytes (`IoCreateDevice`, `FILE_DEVICE_SECURE_OPEN`).
/// The device is still initializing: nobody can open it until [`publish`]. Returns the device
/// and its zero-filled, pool-aligned extension, for the caller to initialise.
pub(crate) fn create(
    irql: &impl AtPassive,
    driver: &Driver<'_>,
    names: &Names,
    extension_size: usize,
    device_type: sys::DEVICE_TYPE,
) -> Result<(NonNull<sys::DEVICE_OBJECT>, NonNull<u8>), Status> {
    crate::irql::verify(irql);
    let size = u32::try_from(extension_size).map_err(|_| Status::INVALID_PARAMETER)?;
    let object = NonNull::new(driver.raw_object()).ok_or(Status::INVALID_PARAMETER)?;
    crate::dispatch::ensure_installed(object)?;
    let mut raw_device: *mut sys::DEVICE_OBJECT = core::ptr::null_mut();
    let device_string = names.device.as_unicode();
    // SAFETY: PASSIVE_LEVEL (the token); a named device of the driver's own object; the name
    // and the out pointer are locals that outlive the call (the name is captured).
    let status = unsafe {
        sys::IoCreateDevice(
            object.as_ptr(),
            size,
            &device_string,
            device_type,
            sys::FILE_DEVICE_SECURE_OPEN,
            sys::FALSE,
            &mut raw_device,
        )
    };
    Status::from_ntstatus(status)?;
    let device = NonNull::new(raw_device).ok_or(Status::UNSUCCESSFUL)?;
    // SAFETY: IoCreateDevice allocated an extension of `size` bytes with the device object.
    let extension = unsafe { (*device.as_ptr()).DeviceExtension }.cast::<u8>();
    match NonNull::new(extension) {
        Some(extension) => Ok((device, extension)),
        None => {
            // SAFETY: PASSIVE_LEVEL; the device was created above and nothing refers to it.
            unsafe { sys::IoDeleteDevice(device.as_ptr()) };
            Err(Status::UNSUCCESSFUL)
        }
    }
}

/// Makes a device from [`create`] reachable: sets the SYSTEM-and-Administrators DACL, creates
/// the link and clears `DO_DEVICE_INITIALIZING`. On failure the device stays unreachable (no
/// link is left behind) and the caller deletes it.
pub(crate) fn publish(
    irql: &impl AtPassive,
    device: NonNull<sys::DEVICE_OBJECT>,
    names: &Names,
) -> Result<(), Status> {
    restrict_to_admins_and_system(irql, device)?;
    let link_string = names.link.as_unicode();
    let device_string = names.device.as_unicode();
    // SAFETY: PASSIVE_LEVEL (the token); both strings are valid for the call.
    let status = unsafe { sys::IoCreateSymbolicLink(&link_string, &device_string) };
    Status::from_ntstatus(status)?;
    // SAFETY: the caller's device; clearing DO_DEVICE_INITIALIZING lets the I/O manager open it,
    // now that its extension, DACL and link are in place.
    unsafe { (*device.as_ptr()).Flags &= !sys::DO_DEVICE_INITIALIZING };
    Ok(())
}

/// Deletes a link [`publish`] created (`IoDeleteSymbolicLink`); a failure is reported on the
/// debugger, as there is nothing else to do about it.
pub(crate) fn delete_link(irql: &impl AtPassive, link: &WideName) {
    crate::irql::verify(irql);
    let link = link.as_unicode();
    // SAFETY: PASSIVE_LEVEL (the token); the string is valid for the call.
    let status = unsafe { sys::IoDeleteSymbolicLink(&link) };
    if let Err(error) = Status::from_ntstatus(status) {
        crate::kd_print!(Error, "wfp-rs: IoDeleteSymbolicLink failed: {error}\n");
    }
}

/// A token for code the kernel calls back (dispatch, cancel-safe queue callbacks), which runs
/// at IRQL <= DISPATCH_LEVEL and uses the token only for `Event::set` or to take a spin lock
/// briefly (never while another token of the thread is used to raise the IRQL).
pub(crate) fn callback_token<'t>() -> DispatchLevel<'t> {
    // SAFETY: the I/O manager calls dispatch routines at PASSIVE_LEVEL and the cancel-safe queue
    // callbacks at <= DISPATCH_LEVEL; the token lives for one short call.
    unsafe { DispatchLevel::new_unchecked() }
}

/// Sets the DACL `D:P(A;;FA;;;SY)(A;;FA;;;BA)` on the device through a kernel handle.
fn restrict_to_admins_and_system(
    irql: &impl AtPassive,
    device: NonNull<sys::DEVICE_OBJECT>,
) -> Result<(), Status> {
    crate::irql::verify(irql);
    let mut handle: sys::HANDLE = core::ptr::null_mut();
    // SAFETY: PASSIVE_LEVEL (the token); a kernel-mode open of our own device object, for which
    // the object type may be null; the out pointer is a local.
    let status = unsafe {
        sys::ObOpenObjectByPointer(
            device.as_ptr().cast(),
            sys::OBJ_KERNEL_HANDLE,
            core::ptr::null_mut(),
            sys::WRITE_DAC,
            core::ptr::null_mut(),
            sys::KernelMode,
            &mut handle,
        )
    };
    Status::from_ntstatus(status)?;
    // SAFETY: PASSIVE_LEVEL; the handle was opened with WRITE_DAC; the descriptor is a valid
    // self-relative security descriptor in read-only memory, which the kernel only reads.
    let status = unsafe {
        sys::ZwSetSecurityObject(
            handle,
            sys::DACL_SECURITY_INFORMATION,
            (&raw const ADMINS_AND_SYSTEM_ONLY).cast_mut().cast(),
        )
    };
    // SAFETY: PASSIVE_LEVEL; the handle was opened above and is closed once.
    let closed = unsafe { sys::ZwClose(handle) };
    Status::from_ntstatus(status)?;
    Status::from_ntstatus(closed)
}

// --- the security descriptor --------------------------------------------------------------------

/// S-1-5-18: LocalSystem. (Revision 1, one sub-authority, SECURITY_NT_AUTHORITY,
/// SECURITY_LOCAL_SYSTEM_RID.)
const SYSTEM_SID: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
/// S-1-5-32-544: BUILTIN\Administrators. (Two sub-authorities: SECURITY_BUILTIN_DOMAIN_RID,
/// DOMAIN_ALIAS_RID_ADMINS.)
const ADMINS_SID: [u8; 16] = [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 0x02, 0, 0];

const SD_HEADER_LEN: usize = core::mem::size_of::<sys::SECURITY_DESCRIPTOR_RELATIVE>();
const ACL_HEADER_LEN: usize = core::mem::size_of::<sys::ACL>();
/// An ACCESS_ALLOWED_ACE is an ACE header and a mask (8 bytes), then the SID.
const ACE_FIXED_LEN: usize = 8;
const ACL_LEN: usize =
    ACL_HEADER_LEN + ACE_FIXED_LEN + SYSTEM_SID.len() + ACE_FIXED_LEN + ADMINS_SID.len();
const SD_LEN: usize = SD_HEADER_LEN + ACL_LEN;

/// A self-relative security descriptor; the kernel reads its `ULONG`s in place, so it is
/// aligned.
#[repr(C, align(8))]
struct SelfRelative([u8; SD_LEN]);

/// `D:P(A;;FA;;;SY)(A;;FA;;;BA)`: a protected DACL granting FILE_ALL_ACCESS to SYSTEM and to
/// Administrators, nothing to anyone else. No owner, group or SACL: `ZwSetSecurityObject` is
/// asked to set the DACL only.
static ADMINS_AND_SYSTEM_ONLY: SelfRelative = SelfRelative(admins_and_system_only());

const fn put_u16(out: &mut [u8; SD_LEN], at: usize, value: u16) {
    let bytes = value.to_le_bytes();
    out[at] = bytes[0];
    out[at + 1] = bytes[1];
}

const fn put_u32(out: &mut [u8; SD_LEN], at: usize, value: u32) {
    let bytes = value.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        out[at + i] = bytes[i];
        i += 1;
    }
}

/// Writes an ACCESS_ALLOWED_ACE for `sid` with `mask` at `at`; returns the offset after it.
const fn put_allow_ace(out: &mut [u8; SD_LEN], at: usize, mask: u32, sid: &[u8]) -> usize {
    let size = ACE_FIXED_LEN + sid.len();
    out[at] = sys::ACCESS_ALLOWED_ACE_TYPE;
    out[at + 1] = 0;
    put_u16(out, at + 2, size as u16);
    put_u32(out, at + 4, mask);
    let mut i = 0;
    while i < sid.len() {
        out[at + ACE_FIXED_LEN + i] = sid[i];
        i += 1;
    }
    at + size
}

const fn admins_and_system_only() -> [u8; SD_LEN] {
    let mut out = [0u8; SD_LEN];
    // SECURITY_DESCRIPTOR_RELATIVE: revision, padding, control, then owner, group, SACL, DACL.
    out[0] = sys::SECURITY_DESCRIPTOR_REVISION;
    put_u16(
        &mut out,
        2,
        sys::SE_SELF_RELATIVE | sys::SE_DACL_PRESENT | sys::SE_DACL_PROTECTED,
    );
    put_u32(&mut out, 16, SD_HEADER_LEN as u32);
    // ACL header: revision, padding, size, ACE count, padding.
    let acl = SD_HEADER_LEN;
    out[acl] = sys::ACL_REVISION;
    put_u16(&mut out, acl + 2, ACL_LEN as u16);
    put_u16(&mut out, acl + 4, 2);
    let next = put_allow_ace(
        &mut out,
        acl + ACL_HEADER_LEN,
        sys::FILE_ALL_ACCESS,
        &SYSTEM_SID,
    );
    let end = put_allow_ace(&mut out, next, sys::FILE_ALL_ACCESS, &ADMINS_SID);
    assert!(end == SD_LEN);
    out
}

// --- names ------------------------------------------------------------------------------------

/// A device or link name as UTF-16, in a fixed buffer (no allocation).
#[derive(Clone)]
pub(crate) struct WideName {
    units: [u16; NAME_CAPACITY],
    len: usize,
}

impl WideName {
    pub(crate) const fn new() -> WideName {
        WideName {
            units: [0; NAME_CAPACITY],
            len: 0,
        }
    }

    /// `prefix` followed by `name`; false if `name` is not a valid device name.
    pub(crate) fn push_name(&mut self, prefix: &str, name: &str) -> bool {
        if name.is_empty() || name.contains(['\\', '\0']) {
            return false;
        }
        let mut len = 0;
        for unit in prefix.encode_utf16().chain(name.encode_utf16()) {
            let Some(slot) = self.units.get_mut(len) else {
                return false;
            };
            *slot = unit;
            len += 1;
        }
        if len - prefix.len() > MAX_NAME_LEN {
            return false;
        }
        self.len = len;
        true
    }

    /// A `UNICODE_STRING` that borrows the buffer (valid while `self` does not move).
    pub(crate) fn as_unicode(&self) -> sys::UNICODE_STRING {
        sys::UNICODE_STRING {
            Length: (self.len * 2) as u16,
            MaximumLength: (self.len * 2) as u16,
            Buffer: self.units.as_ptr().cast_mut(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn the_security_descriptor_is_the_protected_system_and_admins_dacl() {
        let sd = &ADMINS_AND_SYSTEM_ONLY.0;
        assert_eq!(SD_LEN, 72);
        // Revision 1, control SE_SELF_RELATIVE | SE_DACL_PROTECTED | SE_DACL_PRESENT, no owner,
        // group or SACL, DACL at 20.
        assert_eq!(
            sd[..20],
            [
                1, 0, 0x04, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0
            ]
        );
        // ACL revision 2, 52 bytes, 2 ACEs.
        assert_eq!(sd[20..28], [2, 0, 52, 0, 2, 0, 0, 0]);
        // ACCESS_ALLOWED_ACE, 20 bytes, FILE_ALL_ACCESS (0x1F01FF), S-1-5-18.
        assert_eq!(sd[28..36], [0, 0, 20, 0, 0xFF, 0x01, 0x1F, 0x00]);
        assert_eq!(sd[36..48], SYSTEM_SID);
        // ACCESS_ALLOWED_ACE, 24 bytes, FILE_ALL_ACCESS, S-1-5-32-544.
        assert_eq!(sd[48..56], [0, 0, 24, 0, 0xFF, 0x01, 0x1F, 0x00]);
        assert_eq!(sd[56..72], ADMINS_SID);
    }

    #[test]
    fn names_are_checked() {
        let mut names = Names::EMPTY;
        names.set("WfpRs").unwrap();
        let device = &names.device;
        assert_eq!(
            String::from_utf16_lossy(&device.units[..device.len]),
            "\\Device\\WfpRs"
        );
        let link = &names.link;
        assert_eq!(
            String::from_utf16_lossy(&link.units[..link.len]),
            "\\??\\WfpRs"
        );
        for bad in ["", "a\\b", "nul\0", &"x".repeat(MAX_NAME_LEN + 1)] {
            let mut names = Names::EMPTY;
            assert_eq!(names.set(bad), Err(Status::OBJECT_NAME_INVALID), "{bad:?}");
        }
        let mut names = Names::EMPTY;
        assert_eq!(names.set(&"x".repeat(MAX_NAME_LEN)), Ok(()));
    }
}
