//! The Windows backend of [`crate::user`]: Win32 calls through `windows-sys`, with overlapped
//! I/O so that waits can time out and be cancelled.
//!
//! Not yet run on a Windows machine: it compiles and passes clippy in CI only.

#[allow(unused_imports)]
use std::{boxed::Box, vec, vec::Vec};

use core::cell::UnsafeCell;
use core::ptr::{null, null_mut};
use std::io;
use std::time::Duration;

use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_IO_INCOMPLETE, ERROR_IO_PENDING, ERROR_NOT_FOUND, ERROR_OPERATION_ABORTED,
    GENERIC_READ, GENERIC_WRITE, GetLastError, HANDLE, INVALID_HANDLE_VALUE, NTSTATUS,
    STATUS_DELETE_PENDING, WAIT_TIMEOUT,
};
use windows_sys::Win32::Storage::FileSystem::{CreateFileW, FILE_FLAG_OVERLAPPED, OPEN_EXISTING};
use windows_sys::Win32::Storage::InstallableFileSystems::{
    FILTER_MESSAGE_HEADER, FILTER_REPLY_HEADER, FilterConnectCommunicationPort, FilterGetMessage,
    FilterReplyMessage,
};
use windows_sys::Win32::System::IO::{
    CancelIoEx, DeviceIoControl, GetOverlappedResult, GetOverlappedResultEx, OVERLAPPED,
};
use windows_sys::Win32::System::Threading::{CreateEventW, INFINITE};

use super::{MAX_MESSAGE_LEN, Request, cancelled, closed};

/// `HRESULT_FROM_WIN32(ERROR_IO_PENDING)`: `FilterGetMessage` on an overlapped handle is under
/// way.
const HRESULT_IO_PENDING: i32 = (0x8007_0000u32 | ERROR_IO_PENDING).cast_signed();

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(core::iter::once(0)).collect()
}

fn hresult(hr: i32) -> io::Result<()> {
    if hr < 0 {
        Err(io::Error::from_raw_os_error(hr))
    } else {
        Ok(())
    }
}

fn last_error() -> io::Error {
    // SAFETY: GetLastError has no preconditions.
    let code = unsafe { GetLastError() };
    if code == ERROR_OPERATION_ABORTED {
        cancelled()
    } else {
        io::Error::from_raw_os_error(code.cast_signed())
    }
}

/// The status of a request that is no longer under way, from `OVERLAPPED::Internal`, which
/// Microsoft documents as the request's status code once it completed (`STATUS_PENDING` before).
/// An `NTSTATUS` is 32 bits; the kernel writes it into the low half of the `ULONG_PTR`.
fn completed_status(overlapped: &OVERLAPPED) -> NTSTATUS {
    u32::try_from(overlapped.Internal & 0xFFFF_FFFF)
        .unwrap_or(u32::MAX)
        .cast_signed()
}

/// The error of a request that failed: the driver closed the device if the request's status
/// says so (`STATUS_DELETE_PENDING`, which the Win32 error alone cannot tell from other
/// refusals: both are `ERROR_ACCESS_DENIED`), otherwise `error`, the Win32 error.
fn failed(overlapped: &OVERLAPPED, error: io::Error) -> io::Error {
    if completed_status(overlapped) == STATUS_DELETE_PENDING {
        closed()
    } else {
        error
    }
}

fn milliseconds(timeout: Option<Duration>) -> u32 {
    timeout.map_or(INFINITE, |t| {
        u32::try_from(t.as_millis()).map_or(INFINITE - 1, |ms| ms.min(INFINITE - 1))
    })
}

/// An owned kernel handle, closed on drop.
struct Handle(HANDLE);

// SAFETY: a kernel handle is a process-wide index, usable from any thread; the Win32 calls made
// on it (I/O, CancelIoEx, CloseHandle) are thread-safe.
unsafe impl Send for Handle {}
// SAFETY: as above; shared use only issues thread-safe Win32 calls.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: this handle is owned, valid and closed exactly once, here.
        unsafe { CloseHandle(self.0) };
    }
}

/// A manual-reset event for one overlapped operation.
fn event() -> io::Result<Handle> {
    // SAFETY: no security attributes, no name; the returned handle is checked.
    let event = unsafe { CreateEventW(null(), 1, 0, null()) };
    if event.is_null() {
        Err(last_error())
    } else {
        Ok(Handle(event))
    }
}

fn overlapped(event: &Handle) -> OVERLAPPED {
    // SAFETY: OVERLAPPED is plain data for which all zeroes is the documented initial state.
    let mut overlapped: OVERLAPPED = unsafe { core::mem::zeroed() };
    overlapped.hEvent = event.0;
    overlapped
}

pub(super) struct Port {
    handle: Handle,
}

impl Port {
    pub(super) fn connect(name: &str, context: &[u8]) -> io::Result<Port> {
        let size = u16::try_from(context.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a connection context is at most 65535 bytes",
            )
        })?;
        let name = wide(name);
        let mut handle: HANDLE = null_mut();
        // SAFETY: `name` is NUL-terminated UTF-16; `context` is readable for `size` bytes; the
        // port handle is written to `handle`. Options 0: the handle allows overlapped I/O.
        let hr = unsafe {
            FilterConnectCommunicationPort(
                name.as_ptr(),
                0,
                context.as_ptr().cast(),
                size,
                null(),
                &mut handle,
            )
        };
        hresult(hr)?;
        Ok(Port {
            handle: Handle(handle),
        })
    }

    pub(super) fn get_message(&self, timeout: Option<Duration>) -> io::Result<Option<Request>> {
        const HEADER: usize = size_of::<FILTER_MESSAGE_HEADER>();
        // u64 words: FILTER_MESSAGE_HEADER is 8-aligned.
        let mut buffer = vec![0u64; (HEADER + MAX_MESSAGE_LEN).div_ceil(8)];
        let size = u32::try_from(buffer.len() * 8).unwrap_or(u32::MAX);
        let event = event()?;
        let mut overlapped = overlapped(&event);
        let mut transferred = 0u32;
        // SAFETY: the buffer and `overlapped` live until the operation has completed: every path
        // below either sees it complete or cancels it and waits for it (GetOverlappedResult with
        // bWait) before returning.
        let hr = unsafe {
            FilterGetMessage(
                self.handle.0,
                buffer.as_mut_ptr().cast(),
                size,
                &mut overlapped,
            )
        };
        if hr != HRESULT_IO_PENDING {
            hresult(hr)?;
        }
        // SAFETY: `overlapped` belongs to the operation started on this handle above.
        let done = unsafe {
            GetOverlappedResultEx(
                self.handle.0,
                &overlapped,
                &mut transferred,
                milliseconds(timeout),
                0,
            )
        };
        if done == 0 {
            let error = last_error();
            if error.raw_os_error() != Some(WAIT_TIMEOUT.cast_signed()) {
                return Err(error);
            }
            // SAFETY: cancels only the operation `overlapped` describes.
            unsafe { CancelIoEx(self.handle.0, &overlapped) };
            // SAFETY: waits for that operation to end, so the buffer can be freed.
            let done =
                unsafe { GetOverlappedResult(self.handle.0, &overlapped, &mut transferred, 1) };
            if done == 0 {
                // Cancelled: the timeout passed without a message.
                return Ok(None);
            }
        }
        let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_ne_bytes()).collect();
        const _: () = assert!(core::mem::offset_of!(FILTER_MESSAGE_HEADER, MessageId) == 8);
        let word = |at: usize| bytes[at..at + 8].try_into().map(u64::from_ne_bytes);
        let id = word(8).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let reply_length = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let end = (transferred as usize).clamp(HEADER, bytes.len());
        Ok(Some(Request {
            id,
            reply_length,
            data: bytes[HEADER..end].to_vec(),
        }))
    }

    pub(super) fn reply(&self, message_id: u64, reply: &[u8]) -> io::Result<()> {
        const HEADER: usize = size_of::<FILTER_REPLY_HEADER>();
        const _: () = assert!(core::mem::offset_of!(FILTER_REPLY_HEADER, MessageId) == 8);
        // FILTER_REPLY_HEADER { Status: 0, (padding), MessageId }, then the reply, in u64 words
        // (the header is 8-aligned).
        let mut bytes = vec![0u8; HEADER];
        bytes[8..16].copy_from_slice(&message_id.to_ne_bytes());
        bytes.extend_from_slice(reply);
        let buffer: Vec<u64> = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        let size = u32::try_from(HEADER + reply.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "reply too long"))?;
        // SAFETY: the buffer holds a FILTER_REPLY_HEADER followed by the reply, `size` bytes.
        let hr = unsafe { FilterReplyMessage(self.handle.0, buffer.as_ptr().cast(), size) };
        hresult(hr)
    }
}

pub(super) struct Device {
    handle: Handle,
}

/// One overlapped `DeviceIoControl`: boxed, so its `OVERLAPPED` and buffers stay where the
/// kernel writes them until the operation has ended.
pub(super) struct Op(Box<OpState>);

struct OpState {
    overlapped: UnsafeCell<OVERLAPPED>,
    /// Kept alive for the kernel (METHOD_BUFFERED copies it, other methods may not).
    _input: Vec<u8>,
    output: UnsafeCell<Vec<u8>>,
    _event: Handle,
}

// SAFETY: the kernel writes the cells only while the operation runs; this side reads them only
// after GetOverlappedResult(Ex) has reported the operation complete.
unsafe impl Send for OpState {}
// SAFETY: as above.
unsafe impl Sync for OpState {}

impl Device {
    pub(super) fn open(path: &str) -> io::Result<Device> {
        let path = wide(path);
        // SAFETY: `path` is NUL-terminated UTF-16; no security attributes, no template.
        let handle = unsafe {
            CreateFileW(
                path.as_ptr(),
                GENERIC_READ | GENERIC_WRITE,
                0,
                null(),
                OPEN_EXISTING,
                FILE_FLAG_OVERLAPPED,
                null_mut(),
            )
        };
        if handle == INVALID_HANDLE_VALUE {
            return Err(last_error());
        }
        Ok(Device {
            handle: Handle(handle),
        })
    }

    pub(super) fn request(&self, code: u32, input: &[u8], output_len: usize) -> io::Result<Op> {
        let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "buffer too long");
        let input_len = u32::try_from(input.len()).map_err(|_| too_long())?;
        let output_size = u32::try_from(output_len).map_err(|_| too_long())?;
        let event = event()?;
        let state = Box::new(OpState {
            overlapped: UnsafeCell::new(overlapped(&event)),
            _input: input.to_vec(),
            output: UnsafeCell::new(vec![0u8; output_len]),
            _event: event,
        });
        let input_ptr = state._input.as_ptr();
        // SAFETY: no other reference to the new output buffer exists yet.
        let output_ptr = unsafe { (*state.output.get()).as_mut_ptr() };
        // SAFETY: the boxed state (OVERLAPPED, input, output) outlives the operation: `Op` is
        // only freed by `release`, which waits for the operation to end.
        let ok = unsafe {
            DeviceIoControl(
                self.handle.0,
                code,
                input_ptr.cast(),
                input_len,
                output_ptr.cast(),
                output_size,
                null_mut(),
                state.overlapped.get(),
            )
        };
        if ok == 0 {
            // SAFETY: GetLastError has no preconditions.
            let code = unsafe { GetLastError() };
            if code != ERROR_IO_PENDING {
                // Failed at once: no operation is under way, the state can go.
                let error = if code == ERROR_OPERATION_ABORTED {
                    cancelled()
                } else {
                    io::Error::from_raw_os_error(code.cast_signed())
                };
                // SAFETY: no operation is under way: nothing writes the OVERLAPPED any more.
                // (INFERRED: for a request refused at once the kernel may leave `Internal` as
                // it was; then only the Win32 error is known.)
                let overlapped = unsafe { &*state.overlapped.get() };
                return Err(failed(overlapped, error));
            }
        }
        Ok(Op(state))
    }

    pub(super) fn wait(&self, op: &Op, timeout: Option<Duration>) -> io::Result<Option<Vec<u8>>> {
        let mut transferred = 0u32;
        // SAFETY: the OVERLAPPED belongs to an operation started on this handle.
        let done = unsafe {
            GetOverlappedResultEx(
                self.handle.0,
                op.0.overlapped.get(),
                &mut transferred,
                milliseconds(timeout),
                0,
            )
        };
        if done == 0 {
            let error = last_error();
            // A timeout of 0 on a request still pending reports ERROR_IO_INCOMPLETE.
            let pending = [WAIT_TIMEOUT, ERROR_IO_INCOMPLETE].map(|code| Some(code.cast_signed()));
            if pending.contains(&error.raw_os_error()) {
                return Ok(None);
            }
            // SAFETY: the operation has completed (with an error): the kernel no longer writes
            // the OVERLAPPED.
            let overlapped = unsafe { &*op.0.overlapped.get() };
            return Err(failed(overlapped, error));
        }
        // SAFETY: the operation has completed: the kernel no longer writes the output buffer.
        let output = unsafe { &*op.0.output.get() };
        Ok(Some(
            output[..(transferred as usize).min(output.len())].to_vec(),
        ))
    }

    pub(super) fn cancel(&self, op: &Op) -> io::Result<()> {
        // SAFETY: cancels only the operation this OVERLAPPED describes, on this handle.
        let ok = unsafe { CancelIoEx(self.handle.0, op.0.overlapped.get()) };
        // SAFETY: GetLastError has no preconditions.
        if ok == 0 && unsafe { GetLastError() } != ERROR_NOT_FOUND {
            return Err(last_error());
        }
        Ok(())
    }

    pub(super) fn release(&self, op: Op) {
        let _ = self.cancel(&op);
        let mut transferred = 0u32;
        // SAFETY: waits until the operation has ended, so its state can be freed below.
        unsafe { GetOverlappedResult(self.handle.0, op.0.overlapped.get(), &mut transferred, 1) };
        drop(op);
    }

    pub(super) fn cancel_all(&self) {
        // SAFETY: cancels every operation this process started on this handle.
        unsafe { CancelIoEx(self.handle.0, null()) };
    }
}
