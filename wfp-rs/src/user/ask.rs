//! The service's side of a question channel ([`AskChannel`](crate::ask::AskChannel)).

use std::vec::Vec;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::{Device, Operation};
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
        };
        client.refill()?;
        Ok(client)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Operation>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends wait requests until `outstanding` are pending (or waited for by a caller).
    fn refill(&self) -> io::Result<()> {
        let mut waiting = self.waiting();
        while waiting.len() < self.outstanding {
            waiting.push_back(self.device.request(self.wait_code, &[], self.wait_len)?);
        }
        Ok(())
    }

    /// Waits for the next question, at most `timeout` (`None`: until one comes): `Ok(None)`
    /// when the timeout passed. Each question is returned once; a wait request that completed
    /// is replaced by a new one before this returns. An error for which
    /// [`is_cancelled`](super::is_cancelled) is true means the driver closed the channel (or
    /// the handle was closed); a request refused with another status fails with it.
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
        // A refill that failed before (the driver out of memory, say) is retried first.
        self.refill()?;
        let Some(operation) = self.waiting().pop_front() else {
            return Err(io::Error::other("no wait request could be sent"));
        };
        let output = match operation.wait(timeout) {
            Ok(Some(output)) => output,
            Ok(None) => {
                // Still the oldest request: it goes back to the front.
                self.waiting().push_front(operation);
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        drop(operation);
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
    /// question was then decided with the driver's default).
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
        let mut input = Vec::with_capacity(crate::ask::HEADER_LEN + body.len());
        input.extend_from_slice(&encode_header(id, body.len()));
        input.extend_from_slice(body);
        self.device
            .request(self.answer_code, &input, 0)?
            .wait(None)?;
        Ok(())
    }
}
