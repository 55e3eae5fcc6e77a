//! The user-mode bridge's server: a simulated machine's communication ports and devices, served
//! on a Unix domain socket so that a user-mode service can be another process (`wfp_rs::user`
//! is the client). The wire protocol (`wfp_rs::__sim::bridge`) lives in wfp-rs, next to the
//! client, so both sides share one definition.

#[allow(unused_imports)]
use std::{boxed::Box, string::String, vec::Vec};

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use wfp_rs::__sim::bridge::{Answer, Call, malformed, read_frame, write_frame};

use wfp_rs::client::Sid;

use crate::kernel::irp::{Caller, DeviceHandle, IoRequest};
use crate::kernel::process::Process;
use crate::kernel::state::Kernel;

// --- the server -------------------------------------------------------------------------------

/// One open port connection or device handle of a client.
enum Session {
    Port {
        client: usize,
        open: AtomicBool,
    },
    Device {
        handle: Mutex<Option<DeviceHandle>>,
        operations: Mutex<HashMap<u64, Arc<IoRequest>>>,
    },
}

struct Shared {
    kernel: Arc<Kernel>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Every stream accepted and not finished, to shut them down when the bridge stops.
    streams: Mutex<HashMap<u64, UnixStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Extra token groups by executable: what [`UserModeBridge::identify`] registered.
    identities: Mutex<Vec<(PathBuf, Vec<Sid>)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn session(&self, id: u64) -> Option<Arc<Session>> {
        lock(&self.sessions).get(&id).cloned()
    }

    /// The process at the other end of `stream`, as the simulated kernel sees it: SYSTEM's
    /// token (as every bridge client has always had), the peer's process id and executable
    /// (`SO_PEERCRED` and `/proc/<pid>/exe`, on Linux), and the groups registered for that
    /// executable. Elsewhere, or if the peer is gone, pid 0 and an empty image.
    fn peer(&self, stream: &UnixStream) -> Process {
        let (pid, exe) = peer_pid_and_exe(stream).unwrap_or((0, PathBuf::new()));
        let mut process = Process::new(pid, &exe.to_string_lossy(), Caller::System);
        if !exe.as_os_str().is_empty() {
            let identities = lock(&self.identities);
            for (registered, groups) in identities.iter() {
                if registered == &exe {
                    for sid in groups {
                        process = process.with_group(sid.clone());
                    }
                }
            }
        }
        process
    }

    /// Serves one accepted stream until it ends.
    fn serve(self: &Arc<Self>, mut stream: UnixStream) -> io::Result<()> {
        let Some(body) = read_frame(&mut stream)? else {
            return Ok(());
        };
        let call = Call::decode(&body)?;
        match call {
            Call::PortConnect { name, context } => {
                let process = Arc::new(self.peer(&stream));
                match crate::kernel::flt::user_connect(&self.kernel, &name, &context, &process) {
                    Ok(client) => {
                        let session = Arc::new(Session::Port {
                            client,
                            open: AtomicBool::new(true),
                        });
                        self.own(stream, session)
                    }
                    Err(status) => write_frame(&mut stream, &Answer::Failed(status).encode()),
                }
            }
            Call::DeviceOpen { path } => {
                match crate::kernel::irp::open(&self.kernel, &path, self.peer(&stream)) {
                    Ok(handle) => {
                        let session = Arc::new(Session::Device {
                            handle: Mutex::new(Some(handle)),
                            operations: Mutex::new(HashMap::new()),
                        });
                        self.own(stream, session)
                    }
                    Err(status) => write_frame(&mut stream, &Answer::Failed(status.raw()).encode()),
                }
            }
            call => {
                let answer = self.answer(call);
                write_frame(&mut stream, &answer.encode())
            }
        }
    }

    /// Registers `session`, answers with its id, and closes it when the owner stream ends.
    fn own(&self, mut stream: UnixStream, session: Arc<Session>) -> io::Result<()> {
        let id = self.id();
        lock(&self.sessions).insert(id, Arc::clone(&session));
        let result = (|| {
            write_frame(&mut stream, &Answer::Done(id).encode())?;
            while let Some(body) = read_frame(&mut stream)? {
                if Call::decode(&body)? != Call::DeviceClose {
                    return Err(malformed());
                }
                if let Session::Device { handle, .. } = &*session {
                    let handle = lock(handle).take();
                    drop(handle);
                }
                write_frame(&mut stream, &Answer::Done(0).encode())?;
            }
            Ok(())
        })();
        // The client closed its handle or died: close the session as Windows closes the handles
        // of an exiting process.
        lock(&self.sessions).remove(&id);
        match &*session {
            Session::Port { client, open } => {
                if open.swap(false, Ordering::SeqCst) {
                    crate::kernel::flt::user_disconnect(&self.kernel, *client);
                }
            }
            Session::Device { handle, .. } => {
                let handle = lock(handle).take();
                drop(handle);
            }
        }
        result
    }

    /// Answers a call on a session.
    fn answer(&self, call: Call) -> Answer {
        use crate::kernel::flt;
        let session_id = match &call {
            Call::GetMessage { session, .. }
            | Call::Reply { session, .. }
            | Call::IoControl { session, .. }
            | Call::Wait { session, .. }
            | Call::Cancel { session, .. }
            | Call::Release { session, .. } => *session,
            _ => return Answer::Unknown,
        };
        let Some(session) = self.session(session_id) else {
            return Answer::Unknown;
        };
        match (&*session, call) {
            (Session::Port { client, open }, Call::GetMessage { timeout, .. }) => {
                let disconnected = Answer::Failed(wfp_rs::Status::PORT_DISCONNECTED.raw());
                if !open.load(Ordering::SeqCst) {
                    return disconnected;
                }
                match flt::user_get_message(&self.kernel, *client, timeout) {
                    Some(m) => Answer::Message {
                        id: m.id,
                        reply_length: m.reply_length,
                        data: m.data,
                    },
                    // No message: the timeout passed, or the connection broke — which the
                    // client must hear as an error, not as "nothing yet".
                    None if flt::user_is_connected(&self.kernel, *client) => Answer::NoMessage,
                    None => disconnected,
                }
            }
            (
                Session::Port { client, open },
                Call::Reply {
                    message_id, reply, ..
                },
            ) => {
                if !open.load(Ordering::SeqCst) {
                    return Answer::Failed(wfp_rs::Status::PORT_DISCONNECTED.raw());
                }
                match flt::user_reply(&self.kernel, *client, message_id, &reply) {
                    Ok(()) => Answer::Done(0),
                    Err(status) => Answer::Failed(status),
                }
            }
            (
                Session::Device { handle, operations },
                Call::IoControl {
                    code,
                    input,
                    output_len,
                    ..
                },
            ) => {
                let request = match &*lock(handle) {
                    Some(handle) => handle.device_io_control(
                        code,
                        &input,
                        usize::try_from(output_len).unwrap_or(usize::MAX),
                    ),
                    None => return Answer::Failed(wfp_rs::Status::INVALID_HANDLE.raw()),
                };
                let id = self.id();
                lock(operations).insert(id, Arc::new(request));
                Answer::Done(id)
            }
            (
                Session::Device { operations, .. },
                Call::Wait {
                    operation, timeout, ..
                },
            ) => {
                let Some(request) = lock(operations).get(&operation).cloned() else {
                    return Answer::Unknown;
                };
                let completion = match timeout {
                    None => Some(request.wait()),
                    Some(timeout) => request.wait_timeout(timeout),
                };
                match completion {
                    Some(c) => Answer::Completed {
                        status: c.status,
                        information: c.information as u64,
                        output: c.output,
                    },
                    None => Answer::Pending,
                }
            }
            (Session::Device { operations, .. }, Call::Cancel { operation, .. }) => {
                match lock(operations).get(&operation).cloned() {
                    Some(request) => Answer::Done(u64::from(request.cancel())),
                    None => Answer::Unknown,
                }
            }
            (Session::Device { operations, .. }, Call::Release { operation, .. }) => {
                match lock(operations).remove(&operation) {
                    Some(_) => Answer::Done(0),
                    None => Answer::Unknown,
                }
            }
            _ => Answer::Unknown,
        }
    }
}

/// A simulated machine's communication ports and devices served to user-mode processes on a Unix
/// domain socket: see [`Machine::serve_user_mode`](super::Machine::serve_user_mode). Dropping it
/// stops the bridge: it closes every client's port connections and device handles (as if every
/// client process exited), waits for its threads and removes the socket file.
pub struct UserModeBridge {
    shared: Arc<Shared>,
    path: PathBuf,
    listener: Option<JoinHandle<()>>,
    /// The listening socket, to wake the accepting thread when the bridge stops.
    wake: Option<UnixListener>,
}

impl core::fmt::Debug for UserModeBridge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UserModeBridge")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl UserModeBridge {
    pub(crate) fn start(kernel: Arc<Kernel>, path: &Path) -> io::Result<UserModeBridge> {
        let listener = UnixListener::bind(path)?;
        let wake = listener.try_clone().ok();
        let shared = Arc::new(Shared {
            kernel,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            identities: Mutex::new(Vec::new()),
        });
        let accepting = Arc::clone(&shared);
        let listener = std::thread::Builder::new()
            .name("wfp-rs user-mode bridge".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if accepting.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let id = accepting.id();
                    if let Ok(clone) = stream.try_clone() {
                        lock(&accepting.streams).insert(id, clone);
                    }
                    let serving = Arc::clone(&accepting);
                    let thread = std::thread::spawn(move || {
                        // A client that breaks the protocol or dies mid-frame loses its stream;
                        // the bridge goes on serving the others.
                        let _ = serving.serve(stream);
                        lock(&serving.streams).remove(&id);
                    });
                    let mut threads = lock(&accepting.threads);
                    threads.retain(|t| !t.is_finished());
                    threads.push(thread);
                }
            })?;
        Ok(UserModeBridge {
            shared,
            path: path.to_path_buf(),
            listener: Some(listener),
            wake,
        })
    }

    /// The socket's path: the value for `WFP_RS_SIM_SOCKET` in a client process.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Gives processes running `executable` (compared with the peer's `/proc/<pid>/exe`, so pass
    /// a canonical path) the token groups `groups` from now on: what a service's SID type does
    /// on Windows, where the service control manager adds `NT SERVICE\<name>` to the token of
    /// the service's process. A client cannot claim an identity itself: the bridge derives it
    /// from the operating system's record of the peer (Linux only; elsewhere every client is
    /// pid 0 with no image and no extra groups).
    pub fn identify(&self, executable: &Path, groups: impl IntoIterator<Item = Sid>) {
        lock(&self.shared.identities)
            .push((executable.to_path_buf(), groups.into_iter().collect()));
    }
}

/// The peer's process id and executable, from the kernel's record of the socket.
#[cfg(target_os = "linux")]
fn peer_pid_and_exe(stream: &UnixStream) -> Option<(u32, PathBuf)> {
    let credentials = rustix::net::sockopt::socket_peercred(stream).ok()?;
    let pid = credentials.pid.as_raw_nonzero().get();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    Some((u32::try_from(pid).ok()?, exe))
}

#[cfg(not(target_os = "linux"))]
fn peer_pid_and_exe(_stream: &UnixStream) -> Option<(u32, PathBuf)> {
    None
}

#[cfg(target_os = "linux")]
fn wake_accept(listener: &UnixListener) -> bool {
    rustix::net::shutdown(listener, rustix::net::Shutdown::Both).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn wake_accept(_listener: &UnixListener) -> bool {
    false
}

impl Drop for UserModeBridge {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accepting thread, which then sees `stopping`. On Linux, shutting the
        // listening socket down fails a blocked `accept` at once, even when the socket file is
        // gone; elsewhere (or if that fails), a connection to the socket's path wakes it.
        if !self.wake.as_ref().is_some_and(wake_accept) {
            drop(UnixStream::connect(&self.path));
        }
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        for stream in lock(&self.shared.streams).values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // Owner streams end: their sessions close, which ends blocked calls on them.
        let threads = core::mem::take(&mut *lock(&self.shared.threads));
        for thread in threads {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
