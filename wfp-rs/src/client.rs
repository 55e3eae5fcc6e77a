//! Who may talk to the driver: only the process the driver was installed to serve.
//!
//! The SDK's devices ([`ControlDevice`](crate::control::ControlDevice),
//! [`InvertedQueue`](crate::inverted::InvertedQueue)) and communication ports
//! ([`ServerPort`](crate::port::ServerPort)) are closed to everyone but SYSTEM and the
//! Administrators group by their security descriptors. That is not enough for a driver that asks
//! one service for verdicts: any elevated process passes that check, and a port with one
//! connection slot goes to whoever connects first. While the real service restarts, another
//! administrator's process can take the slot, lock the service out and answer "allow".
//!
//! A driver that calls [`Driver::admit_only`](crate::driver::Driver::admit_only) with a
//! [`ClientIdentity`] closes that gap: from then on every SDK device of the driver refuses to be
//! opened (`IRP_MJ_CREATE`), and every SDK port refuses to be connected to, by any process that
//! does not match, with `STATUS_ACCESS_DENIED`, before a connection slot is taken and before the
//! port's [`PortEvents::connected`](crate::port::PortEvents::connected) runs. Both checks run in
//! the context of the process that asks, which is what makes them possible:
//!
//! - the filter manager calls a port's connect callback (`ConnectNotifyCallback` of
//!   `FltCreateCommunicationPort`) at `PASSIVE_LEVEL` (documented), in the thread of the process
//!   that called `FilterConnectCommunicationPort` (INFERRED: the connect is that process's
//!   synchronous open of the port, and the documentation tells the callback to validate the
//!   connection attempt);
//! - the I/O manager calls the `IRP_MJ_CREATE` dispatch routine of the highest-level driver (ours:
//!   nobody is layered over these devices) in the thread that called `CreateFile`.
//!
//! So `PsGetCurrentProcess` (a macro for `IoGetCurrentProcess`) is the connecting process, and
//! the SDK checks it:
//!
//! - **a SID** ([`ClientIdentity::sid`]): the process's primary token
//!   (`PsReferencePrimaryToken`, `SeQueryInformationToken`) has it as its user (`TokenUser`) or as
//!   an enabled group that is not deny-only (`TokenGroups`). The SID to use is the service's own
//!   *per-service SID*, `NT SERVICE\<name>` = `S-1-5-80-…` (`sc showsid <name>` prints it): the
//!   service control manager puts it in the token of the service's process when the service's
//!   SID type is `unrestricted` (`sc sidtype <name> unrestricted`). No other process has it, not
//!   even another service running as LocalSystem, and an administrator cannot start a process
//!   with it without going through the service control manager (INFERRED from the documented
//!   behaviour of service SIDs; an administrator can still stop the service and start their own
//!   program *as* the service by reconfiguring it, which is a visible, audited change).
//! - **an image path** ([`ClientIdentity::image`]): the process's executable
//!   (`SeLocateProcessImageName`, an NT path such as
//!   `\Device\HarddiskVolume3\Program Files\Firewall\service.exe`), compared case-insensitively
//!   (`RtlEqualUnicodeString`). Weaker than the SID on its own (an administrator can start that
//!   executable too, or replace it), useful on top of it.
//!
//! Either or both; with both, both must match. The identity is configured "at install": read it
//! in `DriverEntry` from the driver's service key with
//! [`Driver::parameter`](crate::driver::Driver::parameter) (its `Parameters` subkey, written by
//! the installer), or compile it in.
//!
//! What it does not do: an administrator owns the machine, so this is about the race for the
//! slot, not about a determined administrator. They can open the service's process and duplicate
//! its handle or inject code into it (unless the service runs as a protected process), load a
//! driver of their own, or reconfigure the service; all of those are deliberate, visible acts,
//! unlike connecting first. A handle the service opened and then passed to another process (by
//! inheritance or `DuplicateHandle`) keeps working: the check is at open/connect time.
//!
//! ```
//! use wfp_rs::Status;
//! use wfp_rs::client::{ClientIdentity, Sid};
//! use wfp_rs::control::{CommandHandler, ControlDevice};
//! use wfp_rs::inverted::ControlCode;
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs_sim::{Caller, Machine, Process};
//!
//! struct Commands;
//! impl CommandHandler for Commands {
//!     fn command(&self, _: &mut PassiveLevel<'_>, _: ControlCode, _: &[u8], _: &mut [u8])
//!         -> Result<usize, Status> { Ok(0) }
//! }
//!
//! // `sc showsid WfpRsDocService` on Windows; any service SID here.
//! let service_sid = Sid::parse("S-1-5-80-1-2-3-4-5")?;
//! let machine = Machine::new();
//! let driver = machine.load_driver("doc", minimal::DriverEntry)?;
//! let device = driver
//!     .run_in_driver(&machine, |irql, d| -> Result<_, Status> {
//!         d.admit_only(irql, ClientIdentity::sid(service_sid.clone()))?;
//!         ControlDevice::new(irql, d, "WfpRsDocAdmission", Commands)
//!     })
//!     .expect("an SDK driver")?;
//!
//! // An elevated process that is not the service: refused, although the DACL admits it.
//! let other = Process::new(4242, r"\Device\HarddiskVolume1\tools\other.exe", Caller::Administrator);
//! assert_eq!(machine.open_device(r"\\.\WfpRsDocAdmission", other).err(), Some(Status::ACCESS_DENIED));
//! // The service: its token carries the service SID.
//! let service = Process::new(812, r"\Device\HarddiskVolume1\svc\service.exe", Caller::System)
//!     .with_group(service_sid);
//! let handle = machine.open_device(r"\\.\WfpRsDocAdmission", service)?;
//! drop(handle);
//! machine.at_passive(|irql| device.close(irql));
//! machine.unload_driver(driver)?;
//! # mod minimal {
//! #     #[wfp_rs::driver_entry]
//! #     fn entry(
//! #         _irql: &mut wfp_rs::irql::PassiveLevel<'_>,
//! #         _driver: &mut wfp_rs::driver::Driver<'_>,
//! #     ) -> Result<(), wfp_rs::Status> {
//! #         Ok(())
//! #     }
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;
use core::ptr::NonNull;

use alloc::vec::Vec;

use crate::irql::AtPassive;
use crate::status::Status;
use crate::sys;

/// The longest SID: 8 bytes of header and authority, then up to 15 sub-authorities of 4 bytes.
const MAX_SID_LEN: usize = 8 + 4 * sys::SID_MAX_SUB_AUTHORITIES as usize;

/// The longest image path accepted, in UTF-16 units (a `UNICODE_STRING` holds at most 32767).
pub const MAX_IMAGE_LEN: usize = crate::unicode::MAX_UNITS;

/// A security identifier (`SID`), in its binary form: revision 1, a 48-bit identifier
/// authority and 0 to 15 sub-authorities.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Sid {
    bytes: [u8; MAX_SID_LEN],
    len: usize,
}

impl Sid {
    /// Parses the string form `S-1-<authority>-<sub-authority>...` (decimal; an authority of
    /// 2^32 or more may be written in hexadecimal, `0x…`, as Windows prints it). Fails with
    /// `STATUS_INVALID_SID` for anything else.
    ///
    /// ```
    /// use wfp_rs::client::Sid;
    /// let system = Sid::parse("S-1-5-18").unwrap();
    /// assert_eq!(system.as_bytes(), [1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0]);
    /// assert_eq!(system.to_string(), "S-1-5-18");
    /// assert!(Sid::parse("S-1-5-x").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Sid, Status> {
        let invalid = Status::INVALID_SID;
        let mut parts = text.split('-');
        if !matches!(parts.next(), Some("S" | "s")) || parts.next() != Some("1") {
            return Err(invalid);
        }
        let authority = parts.next().ok_or(invalid)?;
        let authority = match authority
            .strip_prefix("0x")
            .or(authority.strip_prefix("0X"))
        {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => authority.parse::<u64>(),
        }
        .map_err(|_| invalid)?;
        if authority >= 1 << 48 {
            return Err(invalid);
        }
        let mut sid = Sid {
            bytes: [0; MAX_SID_LEN],
            len: 8,
        };
        sid.bytes[0] = sys::SID_REVISION;
        sid.bytes[2..8].copy_from_slice(&authority.to_be_bytes()[2..]);
        for part in parts {
            // Decimal digits only: `parse` would also take a leading '+'.
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid);
            }
            let value = part.parse::<u32>().map_err(|_| invalid)?;
            let slot = sid.bytes.get_mut(sid.len..sid.len + 4).ok_or(invalid)?;
            slot.copy_from_slice(&value.to_le_bytes());
            sid.len += 4;
            sid.bytes[1] += 1;
        }
        Ok(sid)
    }

    /// Reads a SID in binary form; `bytes` must be exactly one SID. Fails with
    /// `STATUS_INVALID_SID` otherwise.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sid, Status> {
        let invalid = Status::INVALID_SID;
        if bytes.len() < 8 || bytes[0] != sys::SID_REVISION {
            return Err(invalid);
        }
        let count = bytes[1];
        if count > sys::SID_MAX_SUB_AUTHORITIES || bytes.len() != 8 + 4 * usize::from(count) {
            return Err(invalid);
        }
        let mut sid = Sid {
            bytes: [0; MAX_SID_LEN],
            len: bytes.len(),
        };
        sid.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(sid)
    }

    /// The binary form, as in a token or an ACE.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut authority = [0u8; 8];
        authority[2..].copy_from_slice(&self.bytes[2..8]);
        let authority = u64::from_be_bytes(authority);
        if authority >= 1 << 32 {
            write!(f, "S-1-{authority:#x}")?;
        } else {
            write!(f, "S-1-{authority}")?;
        }
        for sub in self.bytes[8..self.len].chunks_exact(4) {
            write!(
                f,
                "-{}",
                u32::from_le_bytes([sub[0], sub[1], sub[2], sub[3]])
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sid({self})")
    }
}

/// The process a driver admits to its devices and ports; see the [module
/// documentation](self). Build it with [`sid`](Self::sid) or [`image`](Self::image), add the
/// other with [`and_image`](Self::and_image) / [`and_sid`](Self::and_sid), and hand it to
/// [`Driver::admit_only`](crate::driver::Driver::admit_only).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    sid: Option<Sid>,
    image: Option<Vec<u16>>,
}

impl ClientIdentity {
    /// Processes whose primary token has `sid` as its user or as an enabled group (not
    /// deny-only). Use the service's per-service SID (`S-1-5-80-…`).
    pub fn sid(sid: Sid) -> ClientIdentity {
        ClientIdentity {
            sid: Some(sid),
            image: None,
        }
    }

    /// Processes whose executable is `path`, an NT path as `SeLocateProcessImageName` returns it
    /// (`\Device\HarddiskVolume3\...`), compared case-insensitively. Fails with
    /// `STATUS_INVALID_PARAMETER` for an empty path or one longer than [`MAX_IMAGE_LEN`], and
    /// `STATUS_INSUFFICIENT_RESOURCES` without pool for its copy.
    pub fn image(path: &str) -> Result<ClientIdentity, Status> {
        Ok(ClientIdentity {
            sid: None,
            image: Some(crate::unicode::wide(path)?),
        })
    }

    /// Also requires the SID (see [`sid`](Self::sid)).
    pub fn and_sid(mut self, sid: Sid) -> ClientIdentity {
        self.sid = Some(sid);
        self
    }

    /// Also requires the image (see [`image`](Self::image)).
    pub fn and_image(mut self, path: &str) -> Result<ClientIdentity, Status> {
        self.image = Some(crate::unicode::wide(path)?);
        Ok(self)
    }

    /// The SID required, if any.
    pub fn required_sid(&self) -> Option<&Sid> {
        self.sid.as_ref()
    }

    /// The image path required, if any, as UTF-16.
    pub fn required_image(&self) -> Option<&[u16]> {
        self.image.as_deref()
    }

    /// Checks the process this thread runs in (`PsGetCurrentProcess`): `Ok` if it matches,
    /// `STATUS_ACCESS_DENIED` if it does not, or the failure of a query (which refuses too).
    /// The SDK calls it for its devices and ports; a driver may call it from code of its own that
    /// runs in the caller's context.
    pub fn check_current_process(&self, irql: &impl AtPassive) -> Result<(), Status> {
        crate::irql::verify(irql);
        // SAFETY: at PASSIVE_LEVEL (the token); the current process is valid while this thread
        // runs in it, which it does for this whole call.
        let process = unsafe { sys::IoGetCurrentProcess() };
        if process.is_null() {
            return Err(Status::ACCESS_DENIED);
        }
        if let Some(sid) = &self.sid
            && !token_has(process, sid)?
        {
            return Err(Status::ACCESS_DENIED);
        }
        if let Some(image) = &self.image
            && !image_is(process, image)?
        {
            return Err(Status::ACCESS_DENIED);
        }
        Ok(())
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let image = self.image.as_deref().map(|units| {
            char::decode_utf16(units.iter().copied())
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect::<alloc::string::String>()
        });
        f.debug_struct("ClientIdentity")
            .field("sid", &self.sid)
            .field("image", &image)
            .finish()
    }
}

/// Refuses the current process with `STATUS_ACCESS_DENIED` (or the failure of a query) if the
/// driver of `object` restricted its clients and the process does not match; otherwise `Ok`.
/// Reports refusals on the debugger, with the process id.
pub(crate) fn admit(object: *mut sys::DRIVER_OBJECT, irql: &impl AtPassive) -> Result<(), Status> {
    let result = crate::driver::with_admitted_client(object, |identity| match identity {
        Some(identity) => identity.check_current_process(irql),
        None => Ok(()),
    });
    if let Err(status) = result {
        // SAFETY: callable at any IRQL; it reads the current process's id.
        let pid = unsafe { sys::PsGetCurrentProcessId() } as usize;
        crate::kd_print!(
            Warning,
            "wfp-rs: process {pid} refused: it is not the client this driver admits ({status})\n"
        );
    }
    result
}

/// A block the kernel allocated for an answer, freed with `ExFreePool`.
struct KernelAnswer(NonNull<core::ffi::c_void>);

impl Drop for KernelAnswer {
    fn drop(&mut self) {
        // SAFETY: the block came from SeQueryInformationToken or SeLocateProcessImageName, whose
        // contract is to free it with ExFreePool, once (this owner is dropped once); the SDK calls
        // them at PASSIVE_LEVEL, where paged pool may be freed.
        unsafe { sys::ExFreePool(self.0.as_ptr()) };
    }
}

/// The SID at `sid`, if it is one; `None` for null or a sub-authority count over 15.
///
/// # Safety
///
/// `sid` is null or points to a SID the kernel wrote, valid for `'a`.
unsafe fn sid_at<'a>(sid: sys::PSID) -> Option<&'a [u8]> {
    let header = NonNull::new(sid.cast::<u8>())?;
    // SAFETY: a SID starts with its revision and sub-authority count (per the contract), so
    // the second byte is in it.
    let count_at = unsafe { header.add(1) };
    // SAFETY: as above; a byte needs no alignment.
    let count = unsafe { count_at.read() };
    if count > sys::SID_MAX_SUB_AUTHORITIES {
        return None;
    }
    // SAFETY: a SID with `count` sub-authorities is 8 + 4 * count bytes (per the contract).
    Some(unsafe { core::slice::from_raw_parts(header.as_ptr(), 8 + 4 * usize::from(count)) })
}

/// `SeQueryInformationToken` for a class whose answer is a block.
fn query_token(
    token: sys::PACCESS_TOKEN,
    class: sys::TOKEN_INFORMATION_CLASS,
) -> Result<KernelAnswer, Status> {
    let mut answer: sys::PVOID = core::ptr::null_mut();
    // SAFETY: PASSIVE_LEVEL (the callers' token); a referenced primary token; TokenUser and
    // TokenGroups answer with a block the kernel allocates and stores in the local out pointer.
    let status = unsafe { sys::SeQueryInformationToken(token, class, &mut answer) };
    Status::from_ntstatus(status)?;
    NonNull::new(answer)
        .map(KernelAnswer)
        .ok_or(Status::UNSUCCESSFUL)
}

/// Whether the primary token of `process` has `sid` as its user or an enabled group.
fn token_has(process: sys::PEPROCESS, sid: &Sid) -> Result<bool, Status> {
    // SAFETY: PASSIVE_LEVEL (the callers' token); the current process. The reference is dropped
    // below, once.
    let token = unsafe { sys::PsReferencePrimaryToken(process) };
    if token.is_null() {
        return Err(Status::ACCESS_DENIED);
    }
    let found = token_has_referenced(token, sid);
    // SAFETY: the reference taken above, released once.
    unsafe { sys::PsDereferencePrimaryToken(token) };
    found
}

fn token_has_referenced(token: sys::PACCESS_TOKEN, sid: &Sid) -> Result<bool, Status> {
    let wanted = Some(sid.as_bytes());
    let user = query_token(token, sys::TokenUser)?;
    // SAFETY: a TokenUser answer is a TOKEN_USER, alive while `user` is.
    let user_entry = unsafe { user.0.cast::<sys::TOKEN_USER>().read() }.User;
    // SAFETY: its SID lies in the same block.
    let user_sid = unsafe { sid_at(user_entry.Sid) };
    if user_sid == wanted {
        return Ok(true);
    }
    drop(user);
    let groups = query_token(token, sys::TokenGroups)?;
    let groups = groups.0.cast::<sys::TOKEN_GROUPS>();
    // SAFETY: a TokenGroups answer is a TOKEN_GROUPS with `GroupCount` entries, then their
    // SIDs, in one block alive while `groups` is.
    let count = unsafe { groups.as_ref() }.GroupCount as usize;
    // SAFETY: as above; the entries start at `Groups` (no reference to the one-element array
    // is made, the block holds `count` of them).
    let entries =
        unsafe { (&raw const (*groups.as_ptr()).Groups).cast::<sys::SID_AND_ATTRIBUTES>() };
    for index in 0..count {
        // SAFETY: `index < GroupCount` entries, as above.
        let at = unsafe { entries.add(index) };
        // SAFETY: as above; the kernel wrote the entry, aligned, in the block.
        let entry = unsafe { at.read() };
        let usable = entry.Attributes & sys::SE_GROUP_ENABLED != 0
            && entry.Attributes & sys::SE_GROUP_USE_FOR_DENY_ONLY == 0;
        // SAFETY: the entry's SID lies in the block, as above.
        if usable && unsafe { sid_at(entry.Sid) } == wanted {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether the executable of `process` is `image` (case-insensitive).
fn image_is(process: sys::PEPROCESS, image: &[u16]) -> Result<bool, Status> {
    let mut name: *mut sys::UNICODE_STRING = core::ptr::null_mut();
    // SAFETY: PASSIVE_LEVEL (the callers' token); the current process; the out pointer is a
    // local.
    let status = unsafe { sys::SeLocateProcessImageName(process, &mut name) };
    Status::from_ntstatus(status)?;
    let answer = NonNull::new(name.cast())
        .map(KernelAnswer)
        .ok_or(Status::UNSUCCESSFUL)?;
    let expected = crate::unicode::counted(image)?;
    // SAFETY: PASSIVE_LEVEL; both strings are valid for the call (the kernel's lives in
    // `answer`); neither is written.
    let equal =
        unsafe { sys::RtlEqualUnicodeString(answer.0.as_ptr().cast(), &expected, sys::TRUE) };
    Ok(equal != sys::FALSE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn sids_round_trip_through_text() {
        for text in [
            "S-1-5-18",
            "S-1-5-32-544",
            "S-1-5-80-1-2-3-4-5",
            "S-1-0",
            "S-1-0x1000000000-7",
        ] {
            let sid = Sid::parse(text).unwrap();
            assert_eq!(sid.to_string(), text);
            assert_eq!(Sid::from_bytes(sid.as_bytes()).unwrap(), sid);
        }
        let admins = Sid::parse("S-1-5-32-544").unwrap();
        assert_eq!(
            admins.as_bytes(),
            [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 0x02, 0, 0]
        );
    }

    #[test]
    fn bad_sids_are_refused() {
        let sixteen = "S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16";
        for text in [
            "",
            "S",
            "S-1",
            "S-2-5-18",
            "X-1-5-18",
            "S-1-5-",
            "S-1-5-+1",
            "S-1-5-4294967296",
            "S-1-281474976710656",
            sixteen,
        ] {
            assert_eq!(Sid::parse(text), Err(Status::INVALID_SID), "{text:?}");
        }
        assert_eq!(
            Sid::from_bytes(&[1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0]),
            Err(Status::INVALID_SID)
        );
        assert_eq!(
            Sid::from_bytes(&[2, 0, 0, 0, 0, 0, 0, 5]),
            Err(Status::INVALID_SID)
        );
        assert!(Sid::parse("S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15").is_ok());
    }

    #[test]
    fn images_are_bounded() {
        assert_eq!(ClientIdentity::image(""), Err(Status::INVALID_PARAMETER));
        let identity = ClientIdentity::image("\\Device\\X\\a.exe").unwrap();
        assert_eq!(identity.required_image().map(<[u16]>::len), Some(15));
        assert_eq!(identity.required_sid(), None);
    }
}
