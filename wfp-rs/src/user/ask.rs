//! The service's side of a question channel ([`AskChannel`](crate::ask::AskChannel)).

use std::vec::Vec;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Device, Operation, closed, is_cancelled, is_closed};
use crate::ask::{ChannelSpec, QuestionId, decode_message, encode_header};

/// A question from the driver, as [`AskClient::next_question`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Names the question to [`AskClient::answer`].
    pub id: QuestionId,
    /// The question, as the driver encoded it.
    pub body: Vec<u8>,
}

/// The service's end of a driver's question channel: a handle to the channel's device that
/// keeps `outstanding` wait requests pending (overlapped `DeviceIoControl`), so the driver can
/// hand a question to one the moment it asks, and sends answers.
///
/// Answer every question through the client that received it: the driver accepts an answer only
/// from the handle its question was delivered to. Dropping the client closes the handle: the
/// driver decides the questions delivered to it and not answered with its default
/// (`Outcome::ServiceGone`).
///
/// When the driver closes or stops the channel (it unloads, say), the client's calls fail with
/// an error for which [`is_closed`](super::is_closed) is true, and
/// [`is_closed`](Self::is_closed) says so from then on: the handle is useless, and a new client
/// must open the device once the driver is back.
///
/// The methods take `&self`: several threads may wait for questions and answer them at once.
///
/// ```no_run
/// use wfp_rs::ask::ChannelSpec;
/// use wfp_rs::inverted::{ControlCode, RequiredAccess};
/// use wfp_rs::user::AskClient;
///
/// const SPEC: ChannelSpec = ChannelSpec {
///     wait: ControlCode::buffered(0x8000, 0x810, RequiredAccess::Any),
///     answer: ControlCode::buffered(0x8000, 0x811, RequiredAccess::Any),
///     max_question: 64,
///     max_answer: 1,
/// };
///
/// let client = AskClient::open(r"\\.\WfpRsAsk", &SPEC, 8)?;
/// while let Some(question) = client.next_question(None)? {
///     let allow = !question.body.starts_with(b"pid 666");
///     if let Err(refused) = client.answer(question.id, &[u8::from(allow)]) {
///         eprintln!("answer to {:?} refused: {refused}", question.id); // late, most likely
///     }
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct AskClient {
    /// Oldest first: the driver completes the oldest waiting request first.
    waiting: Mutex<VecDeque<Operation>>,
    device: Device,
    wait_code: u32,
    answer_code: u32,
    wait_len: usize,
    outstanding: usize,
    /// Set once a request showed that the driver closed the channel.
    closed: AtomicBool,
}

impl fmt::Debug for AskClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AskClient")
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl AskClient {
    /// Opens the channel's device at `path` (`\\.\Name`, see [`Device::open`]) and sends
    /// `outstanding` wait requests (at least one).
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// let client = wfp_rs::user::AskClient::open(r"\\.\WfpRsAsk", &SPEC, 4)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open(path: &str, spec: &ChannelSpec, outstanding: usize) -> io::Result<AskClient> {
        AskClient::with_device(Device::open(path)?, spec, outstanding)
    }

    /// Like [`open`](Self::open), through the bridge at `socket` instead of the one
    /// [`SIM_SOCKET_VARIABLE`](super::SIM_SOCKET_VARIABLE) names (simulator backend only).
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// let client = wfp_rs::user::AskClient::open_at("/tmp/wfp.sock".as_ref(), r"\\.\WfpRsAsk", &SPEC, 4)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[cfg(wfp_sim)]
    #[cfg_attr(docsrs, doc(cfg(any(not(windows), feature = "sim"))))]
    pub fn open_at(
        socket: &std::path::Path,
        path: &str,
        spec: &ChannelSpec,
        outstanding: usize,
    ) -> io::Result<AskClient> {
        AskClient::with_device(Device::open_at(socket, path)?, spec, outstanding)
    }

    /// A client on a device already open.
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// let device = wfp_rs::user::Device::open(r"\\.\WfpRsAsk")?;
    /// let client = wfp_rs::user::AskClient::with_device(device, &SPEC, 4)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_device(
        device: Device,
        spec: &ChannelSpec,
        outstanding: usize,
    ) -> io::Result<AskClient> {
        let client = AskClient {
            waiting: Mutex::new(VecDeque::new()),
            device,
            wait_code: spec.wait.raw(),
            answer_code: spec.answer.raw(),
            wait_len: spec.wait_output_len(),
            outstanding: outstanding.max(1),
            closed: AtomicBool::new(false),
        };
        client.refill()?;
        Ok(client)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Operation>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the driver closed (or stopped) the channel, as a call of this client found out.
    /// Once true it stays true, and every call fails with an error for which
    /// [`is_closed`](super::is_closed) is true.
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// # let client = wfp_rs::user::AskClient::open(r"\\.\WfpRsAsk", &SPEC, 4)?;
    /// match client.next_question(None) {
    ///     Err(error) if client.is_closed() => eprintln!("the driver closed the channel: {error}"),
    ///     other => drop(other),
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Records that the channel closed; the error to return.
    fn closed(&self) -> io::Error {
        self.closed.store(true, Ordering::SeqCst);
        closed()
    }

    /// Sends a wait request. A refusal with access denied is the channel closing: the driver
    /// refuses requests with `STATUS_DELETE_PENDING` then, which Windows reports as
    /// `ERROR_ACCESS_DENIED` (its documented mapping of that status); nothing else refuses a
    /// wait request on a handle that is open already.
    fn send_wait(&self) -> io::Result<Operation> {
        self.device
            .request(self.wait_code, &[], self.wait_len)
            .map_err(|error| {
                if is_closed(&error) || error.kind() == io::ErrorKind::PermissionDenied {
                    self.closed()
                } else {
                    error
                }
            })
    }

    /// Sends wait requests until `outstanding` are pending (or waited for by a caller).
    fn refill(&self) -> io::Result<()> {
        let mut waiting = self.waiting();
        while waiting.len() < self.outstanding {
            waiting.push_back(self.send_wait()?);
        }
        Ok(())
    }

    /// Waits for the next question, at most `timeout` (`None`: until one comes): `Ok(None)`
    /// when the timeout passed. Each question is returned once; a wait request that completed
    /// is replaced by a new one before this returns. When the driver closed or stopped the
    /// channel, fails with an error for which [`is_closed`](super::is_closed) is true; a request
    /// refused with another status fails with it.
    ///
    /// A wait request that ends cancelled is replaced and the wait goes on: the driver cancels
    /// the waiting requests when it closes the channel, and then refuses the replacement (which
    /// is how the client tells); Windows also cancels the requests a thread sent when the thread
    /// exits, and then the replacement waits.
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// # let client = wfp_rs::user::AskClient::open(r"\\.\WfpRsAsk", &SPEC, 4)?;
    /// if let Some(question) = client.next_question(Some(std::time::Duration::from_secs(1)))? {
    ///     client.answer(question.id, &[1])?;
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn next_question(&self, timeout: Option<Duration>) -> io::Result<Option<Question>> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let output = loop {
            if self.is_closed() {
                return Err(closed());
            }
            // A refill that failed before (the driver out of memory, say) is retried first.
            self.refill()?;
            let Some(operation) = self.waiting().pop_front() else {
                return Err(io::Error::other("no wait request could be sent"));
            };
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match operation.wait(remaining) {
                Ok(Some(output)) => break output,
                Ok(None) => {
                    // Still the oldest request: it goes back to the front.
                    self.waiting().push_front(operation);
                    return Ok(None);
                }
                Err(error) if is_closed(&error) => return Err(self.closed()),
                // Replaced at the top of the loop; a closed channel refuses the replacement.
                Err(error) if is_cancelled(&error) => {}
                Err(error) => return Err(error),
            }
        };
        // The question is returned even if no replacement can be sent now: the next call
        // tries again, and the driver holds further questions until a request comes.
        let _ = self.refill();
        let (id, body) = decode_message(&output).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the driver sent a question whose header does not match its size",
            )
        })?;
        Ok(Some(Question {
            id,
            body: body.to_vec(),
        }))
    }

    /// Answers question `id` with `body` (at most the channel's `max_answer` bytes), and waits
    /// until the driver has taken it. Fails with the driver's refusal: `NotFound`-like
    /// (`STATUS_NOT_FOUND`) when the question is no longer waiting for an answer (it timed
    /// out, was answered, cancelled, or never asked), access denied when it was delivered to
    /// another handle, invalid parameter when the answer did not pass the driver's checks (the
    /// question was then decided with the driver's default), and an error for which
    /// [`is_closed`](super::is_closed) is true when the driver closed or stopped the channel.
    ///
    /// On Windows a foreign answer and a closed channel both come back as `ERROR_ACCESS_DENIED`;
    /// the client then sends one more wait request, which a closed channel refuses too and an
    /// open one keeps (it waits for a question like the others).
    ///
    /// ```no_run
    /// # const SPEC: wfp_rs::ask::ChannelSpec = wfp_rs::ask::ChannelSpec {
    /// #     wait: wfp_rs::inverted::ControlCode::from_raw(0x8000_2040),
    /// #     answer: wfp_rs::inverted::ControlCode::from_raw(0x8000_2044),
    /// #     max_question: 64, max_answer: 1 };
    /// # let client = wfp_rs::user::AskClient::open(r"\\.\WfpRsAsk", &SPEC, 4)?;
    /// # let question = client.next_question(None)?.unwrap();
    /// client.answer(question.id, &[0])?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn answer(&self, id: QuestionId, body: &[u8]) -> io::Result<()> {
        if self.is_closed() {
            return Err(closed());
        }
        let mut input = Vec::with_capacity(crate::ask::HEADER_LEN + body.len());
        input.extend_from_slice(&encode_header(id, body.len()));
        input.extend_from_slice(body);
        let answered = self
            .device
            .request(self.answer_code, &input, 0)
            .and_then(|operation| operation.wait(None));
        match answered {
            Ok(_) => Ok(()),
            Err(error) if is_closed(&error) => Err(self.closed()),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                match self.send_wait() {
                    Ok(operation) => {
                        self.waiting().push_back(operation);
                        Err(error)
                    }
                    Err(probe) if is_closed(&probe) => Err(probe),
                    Err(_) => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }
}
