//! User-mode processes as the kernel sees them: who calls (`IoGetCurrentProcess`,
//! `PsGetCurrentProcessId`), their primary token (`PsReferencePrimaryToken`,
//! `SeQueryInformationToken`) and their executable (`SeLocateProcessImageName`).
//!
//! A thread runs in the System process (pid 4) unless it is serving a user-mode call: the port
//! connect callback and a device's dispatch routines run in the calling [`Process`], as on
//! Windows.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::cell::RefCell;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use rustc_hash::FxHashMap;

use wfp_rs::bugcheck::BugCheckCode;
use wfp_rs::client::Sid;
use wfp_rs::sys::*;

use super::bugcheck::stop;
use super::irp::{Caller, token_sids};
use super::pool::kernel_allocate_with;
use super::state::{KernelCode, current_driver, require_irql};

const STATUS_SUCCESS: NTSTATUS = 0;
const STATUS_INSUFFICIENT_RESOURCES: NTSTATUS = 0xC000_009Au32 as i32;
const STATUS_INVALID_INFO_CLASS: NTSTATUS = 0xC000_0003u32 as i32;

/// `SE_GROUP_MANDATORY | SE_GROUP_ENABLED_BY_DEFAULT | SE_GROUP_ENABLED`: a group as a logon
/// puts it in a token.
const ENABLED_GROUP: u32 = 0x1 | 0x2 | SE_GROUP_ENABLED;

/// A simulated user-mode process: its id, its executable and its primary token (the account
/// class of [`Caller`], plus extra groups such as a service's own SID).
///
/// ```
/// use wfp_rs::client::Sid;
/// use wfp_rs_sim::{Caller, Process};
///
/// // A service running as LocalSystem with its per-service SID in its token
/// // (`sc sidtype <name> unrestricted` on Windows).
/// let service = Process::new(812, r"\Device\HarddiskVolume1\svc\service.exe", Caller::System)
///     .with_group(Sid::parse("S-1-5-80-1-2-3-4-5").unwrap());
/// assert_eq!(service.pid(), 812);
/// // A bare `Caller` is a process with a made-up id and image.
/// let admin = Process::from(Caller::Administrator);
/// assert_eq!(admin.caller(), Caller::Administrator);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pid: u32,
    image: String,
    caller: Caller,
    groups: Vec<(Sid, u32)>,
}

impl Process {
    /// A process `pid` running `image` (an NT path, as `SeLocateProcessImageName` returns it,
    /// such as `\Device\HarddiskVolume1\Program Files\x.exe`) with the token of `caller`.
    pub fn new(pid: u32, image: &str, caller: Caller) -> Process {
        Process {
            pid,
            image: image.to_owned(),
            caller,
            groups: Vec::new(),
        }
    }

    /// Adds an enabled group to the token: for a service, its per-service SID
    /// (`NT SERVICE\<name>`, `S-1-5-80-…`).
    pub fn with_group(mut self, sid: Sid) -> Process {
        self.groups.push((sid, ENABLED_GROUP));
        self
    }

    /// Adds a deny-only group to the token (`SE_GROUP_USE_FOR_DENY_ONLY`, as in a filtered
    /// token): it denies access but never grants it.
    pub fn with_deny_only_group(mut self, sid: Sid) -> Process {
        self.groups.push((sid, SE_GROUP_USE_FOR_DENY_ONLY));
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The executable's path.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The account class of the token, for access checks against DACLs.
    pub fn caller(&self) -> Caller {
        self.caller
    }

    /// The System process (pid 4), where kernel threads run: work items, `DriverEntry`, timers.
    fn system() -> Process {
        // INFERRED: SeLocateProcessImageName of the System process has no file to name; an
        // empty path stands for it.
        Process::new(4, "", Caller::System)
    }

    /// The token's user SID, then its groups with their attributes.
    fn token(&self) -> (Vec<u8>, Vec<(Vec<u8>, u32)>) {
        let sids = token_sids(self.caller);
        let user = sids[0].to_vec();
        let mut groups: Vec<(Vec<u8>, u32)> = sids[1..]
            .iter()
            .map(|sid| (sid.to_vec(), ENABLED_GROUP))
            .collect();
        groups.extend(
            self.groups
                .iter()
                .map(|(sid, attributes)| (sid.as_bytes().to_vec(), *attributes)),
        );
        (user, groups)
    }
}

impl From<Caller> for Process {
    /// A process with the token of `caller`, a made-up id and a made-up executable under
    /// `\Device\HarddiskVolume1\Simulated\` (`system.exe`, `admin.exe`, `user.exe`).
    fn from(caller: Caller) -> Process {
        let (pid, name) = match caller {
            Caller::System => (1000, "system"),
            Caller::Administrator => (2000, "admin"),
            Caller::User => (3000, "user"),
        };
        Process::new(
            pid,
            &format!("\\Device\\HarddiskVolume1\\Simulated\\{name}.exe"),
            caller,
        )
    }
}

static SYSTEM: LazyLock<Arc<Process>> = LazyLock::new(|| Arc::new(Process::system()));

thread_local! {
    /// The process this thread serves a call of, if any.
    static CURRENT: RefCell<Option<Arc<Process>>> = const { RefCell::new(None) };
}

/// Referenced primary tokens: the token's address (its process's) → the process and the count
/// of references drivers hold.
type Tokens = FxHashMap<usize, (Arc<Process>, usize)>;

static TOKENS: LazyLock<Mutex<Tokens>> = LazyLock::new(|| Mutex::new(FxHashMap::default()));

fn tokens() -> std::sync::MutexGuard<'static, Tokens> {
    TOKENS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on this thread as `process` (a user-mode call into the kernel).
pub(crate) fn with_process<R>(process: &Arc<Process>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|current| current.replace(Some(Arc::clone(process))));
    struct Restore(Option<Arc<Process>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            CURRENT.with(|current| *current.borrow_mut() = before);
        }
    }
    let _restore = Restore(before);
    f()
}

fn current_process() -> Arc<Process> {
    CURRENT
        .with(|current| current.borrow().clone())
        .unwrap_or_else(|| Arc::clone(&SYSTEM))
}

fn bad_object(routine: &str, what: &str, address: usize) -> ! {
    stop(
        BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
        [0xC000_0005, 0, 0, address],
        &format!(
            "{routine}: {address:#x} is not a {what}; the kernel would dereference it (an access violation in kernel mode)"
        ),
    )
}

/// `IoGetCurrentProcess` (`PsGetCurrentProcess`): the process this thread runs in.
///
/// # Safety
///
/// None.
pub unsafe extern "system" fn IoGetCurrentProcess() -> PEPROCESS {
    let _kernel = KernelCode::enter();
    require_irql("IoGetCurrentProcess", DISPATCH_LEVEL);
    Arc::as_ptr(&current_process()).cast_mut().cast()
}

/// `PsGetCurrentProcessId`.
///
/// # Safety
///
/// None.
pub unsafe extern "system" fn PsGetCurrentProcessId() -> HANDLE {
    current_process().pid as usize as HANDLE
}

/// `PsReferencePrimaryToken`: only the current process can be passed (the simulator has no
/// other way to reference a process).
///
/// # Safety
///
/// `Process` is the current process.
pub unsafe extern "system" fn PsReferencePrimaryToken(Process: PEPROCESS) -> PACCESS_TOKEN {
    let _kernel = KernelCode::enter();
    require_irql("PsReferencePrimaryToken", PASSIVE_LEVEL);
    let current = current_process();
    let address = Arc::as_ptr(&current) as usize;
    if Process as usize != address {
        bad_object(
            "PsReferencePrimaryToken",
            "referenced process",
            Process as usize,
        );
    }
    tokens()
        .entry(address)
        .or_insert_with(|| (Arc::clone(&current), 0))
        .1 += 1;
    address as PACCESS_TOKEN
}

/// `PsDereferencePrimaryToken`.
///
/// # Safety
///
/// `PrimaryToken` comes from `PsReferencePrimaryToken` and is released once.
pub unsafe extern "system" fn PsDereferencePrimaryToken(PrimaryToken: PACCESS_TOKEN) {
    let _kernel = KernelCode::enter();
    // Documented as below DISPATCH_LEVEL, unlike the reference (PASSIVE_LEVEL).
    require_irql("PsDereferencePrimaryToken", APC_LEVEL);
    let mut tokens = tokens();
    let Some(entry) = tokens.get_mut(&(PrimaryToken as usize)) else {
        drop(tokens);
        bad_object(
            "PsDereferencePrimaryToken",
            "referenced token",
            PrimaryToken as usize,
        );
    };
    entry.1 -= 1;
    if entry.1 == 0 {
        tokens.remove(&(PrimaryToken as usize));
    }
}

/// Pool tags of the blocks the kernel allocates for answers.
const TOKEN_TAG: u32 = u32::from_le_bytes(*b"SeTi");
const IMAGE_TAG: u32 = u32::from_le_bytes(*b"SePa");

/// `SeQueryInformationToken` for `TokenUser` and `TokenGroups`; other classes fail with
/// `STATUS_INVALID_INFO_CLASS`. The answer is one block of pool charged to the caller, so an
/// answer never freed with `ExFreePool` is a pool leak at unload.
///
/// # Safety
///
/// `Token` is a referenced token; `TokenInformation` is writable.
pub unsafe extern "system" fn SeQueryInformationToken(
    Token: PACCESS_TOKEN,
    TokenInformationClass: TOKEN_INFORMATION_CLASS,
    TokenInformation: *mut PVOID,
) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    require_irql("SeQueryInformationToken", PASSIVE_LEVEL);
    let Some(process) = tokens()
        .get(&(Token as usize))
        .map(|(process, _)| Arc::clone(process))
    else {
        bad_object(
            "SeQueryInformationToken",
            "referenced token",
            Token as usize,
        );
    };
    if TokenInformation.is_null() {
        bad_object("SeQueryInformationToken", "writable pointer", 0);
    }
    let (user, groups) = process.token();
    let header = core::mem::size_of::<SID_AND_ATTRIBUTES>();
    let entries: Vec<(Vec<u8>, u32)> = if TokenInformationClass == TokenUser {
        vec![(user, 0)]
    } else if TokenInformationClass == TokenGroups {
        groups
    } else {
        return STATUS_INVALID_INFO_CLASS;
    };
    // TOKEN_USER is one entry; TOKEN_GROUPS a count (padded to 8) and the entries. The SIDs
    // follow, in the same block.
    let prefix = if TokenInformationClass == TokenGroups {
        8
    } else {
        0
    };
    let table = prefix + header * entries.len().max(1);
    let size = table + entries.iter().map(|(sid, _)| sid.len()).sum::<usize>();
    // Paged pool, as documented: freeing it above APC_LEVEL stops.
    let block = kernel_allocate_with(size, TOKEN_TAG, current_driver(), POOL_FLAG_PAGED);
    if block.is_null() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    // The block's bytes, built here and copied once: the entries point into the block.
    let mut bytes = vec![0u8; size];
    if prefix != 0 {
        bytes[..4].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    }
    let mut sid_at = table;
    for (index, (sid, attributes)) in entries.iter().enumerate() {
        let entry = prefix + index * header;
        bytes[entry..entry + 8].copy_from_slice(&(block as usize + sid_at).to_le_bytes());
        bytes[entry + 8..entry + 12].copy_from_slice(&attributes.to_le_bytes());
        bytes[sid_at..sid_at + sid.len()].copy_from_slice(sid);
        sid_at += sid.len();
    }
    // SAFETY: the block holds `size` bytes.
    unsafe { block.copy_from_nonoverlapping(bytes.as_ptr(), size) };
    // SAFETY: checked non-null; the caller passes a writable out pointer.
    unsafe { TokenInformation.write(block.cast()) };
    STATUS_SUCCESS
}

/// `SeLocateProcessImageName`: a `UNICODE_STRING` and its text in one block of pool charged to
/// the caller (free it with `ExFreePool`).
///
/// # Safety
///
/// `Process` is the current process; `pImageFileName` is writable.
pub unsafe extern "system" fn SeLocateProcessImageName(
    Process: PEPROCESS,
    pImageFileName: *mut *mut UNICODE_STRING,
) -> NTSTATUS {
    let _kernel = KernelCode::enter();
    require_irql("SeLocateProcessImageName", PASSIVE_LEVEL);
    let current = current_process();
    if !std::ptr::eq(Process.cast_const().cast(), Arc::as_ptr(&current)) {
        bad_object(
            "SeLocateProcessImageName",
            "referenced process",
            Process as usize,
        );
    }
    if pImageFileName.is_null() {
        bad_object("SeLocateProcessImageName", "writable pointer", 0);
    }
    let units: Vec<u16> = current.image.encode_utf16().collect();
    let header = core::mem::size_of::<UNICODE_STRING>();
    let text_bytes = units.len() * 2;
    // Paged pool (INFERRED: like SeQueryInformationToken's answers, which are documented so).
    let block = kernel_allocate_with(
        header + text_bytes,
        IMAGE_TAG,
        current_driver(),
        POOL_FLAG_PAGED,
    );
    if block.is_null() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    // A UNICODE_STRING (Length, MaximumLength, padding, Buffer), then the text it points to.
    let mut bytes = vec![0u8; header + text_bytes];
    bytes[0..2].copy_from_slice(&(text_bytes as u16).to_le_bytes());
    bytes[2..4].copy_from_slice(&(text_bytes as u16).to_le_bytes());
    bytes[8..16].copy_from_slice(&(block as usize + header).to_le_bytes());
    for (index, unit) in units.iter().enumerate() {
        bytes[header + 2 * index..header + 2 * index + 2].copy_from_slice(&unit.to_le_bytes());
    }
    // SAFETY: the block holds the header and the text.
    unsafe { block.copy_from_nonoverlapping(bytes.as_ptr(), bytes.len()) };
    // SAFETY: checked non-null; the caller passes a writable out pointer.
    unsafe { pImageFileName.write(block.cast()) };
    STATUS_SUCCESS
}

/// `RtlEqualUnicodeString`. Case-insensitive comparison upper-cases each UTF-16 unit that is a
/// character with a one-character upper case (INFERRED to match `RtlUpcaseUnicodeChar`, which
/// maps one unit to one unit).
///
/// # Safety
///
/// Both strings are valid `UNICODE_STRING`s.
pub unsafe extern "system" fn RtlEqualUnicodeString(
    String1: *const UNICODE_STRING,
    String2: *const UNICODE_STRING,
    CaseInSensitive: BOOLEAN,
) -> BOOLEAN {
    let _kernel = KernelCode::enter();
    require_irql("RtlEqualUnicodeString", PASSIVE_LEVEL);
    // SAFETY: the caller passes valid strings.
    let a = unsafe { units(String1) };
    // SAFETY: as above.
    let b = unsafe { units(String2) };
    let upcase = |unit: u16| -> u16 {
        if CaseInSensitive == FALSE {
            return unit;
        }
        let Some(c) = char::from_u32(u32::from(unit)) else {
            return unit;
        };
        let mut upper = c.to_uppercase();
        match (upper.next(), upper.next()) {
            (Some(u), None) => u16::try_from(u32::from(u)).unwrap_or(unit),
            _ => unit,
        }
    };
    let equal = a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| upcase(x) == upcase(y));
    BOOLEAN::from(equal)
}

/// The units of a `UNICODE_STRING`.
///
/// # Safety
///
/// `string` is null or a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn units<'a>(string: *const UNICODE_STRING) -> &'a [u16] {
    // SAFETY: per the contract.
    let Some(string) = (unsafe { string.as_ref() }) else {
        bad_object("RtlEqualUnicodeString", "UNICODE_STRING", 0);
    };
    if string.Buffer.is_null() || string.Length == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { core::slice::from_raw_parts(string.Buffer, usize::from(string.Length / 2)) }
}
