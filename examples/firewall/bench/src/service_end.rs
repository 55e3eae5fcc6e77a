//! The simulated service's end of the firewall's connection, for a service that runs as a
//! context of a [deterministic](wfp_rs_sim::Machine::deterministic) machine: every wait it
//! makes is one the machine schedules (a port client's timed `get_message`, an I/O request's
//! `wait_timeout`), never a host sleep. The soak ([`crate::soak`]) and the firewall's property
//! test (`tests/properties.rs`) serve through it, on either design.

use std::time::Duration;

use firewall_driver::AskVia;
use firewall_protocol::{ASK_CHANNEL, ASK_DEVICE_PATH, PORT_NAME};
use wfp_rs::Status;
use wfp_rs::ask::{QuestionId, decode_message, encode_header};
use wfp_rs_sim::{Caller, DeviceHandle, IoRequest, Machine, PortClient};

/// A question the service received, and where to answer it.
#[derive(Clone, Debug)]
pub enum Question {
    /// Over the port: the message id and the request's bytes.
    Port(u64, Vec<u8>),
    /// On the question channel: the question's id and the request's bytes.
    Channel(QuestionId, Vec<u8>),
}

impl Question {
    /// The request's bytes, as the driver encoded them.
    pub fn data(&self) -> &[u8] {
        match self {
            Question::Port(_, data) | Question::Channel(_, data) => data,
        }
    }
}

/// The simulated service's connection: the port and, on the channel design, the question
/// channel's device with wait requests pending (a question too long for the channel comes
/// through the port even then). Dropping it is the service being killed: the port connection
/// and the channel's handle close with whatever questions they hold unanswered.
pub struct ServiceEnd {
    port: PortClient,
    channel: Option<(DeviceHandle, Vec<IoRequest>)>,
}

/// The wait requests the service keeps pending on the channel.
pub const WAITS: usize = 8;

impl ServiceEnd {
    /// Connects to the port and, with [`AskVia::Channel`], opens the channel's device as
    /// LocalSystem and leaves [`WAITS`] wait requests pending on it.
    ///
    /// # Errors
    ///
    /// The status the port or the device refused with.
    pub fn connect(machine: &Machine, design: AskVia) -> Result<ServiceEnd, Status> {
        let mut port = machine.port_client(PORT_NAME);
        port.connect(&[])?;
        let channel = match design {
            AskVia::PortAndWorkItem => None,
            AskVia::Channel => {
                let handle = machine.open_device(ASK_DEVICE_PATH, Caller::System)?;
                let waits = (0..WAITS).map(|_| wait_request(&handle)).collect();
                Some((handle, waits))
            }
        };
        Ok(ServiceEnd { port, channel })
    }

    /// The next question, waiting about `within`.
    ///
    /// # Errors
    ///
    /// `Err` once the driver closed the connection (the port, or the channel's waits completed
    /// as cancelled: an unload).
    #[allow(clippy::result_unit_err)]
    pub fn next(&mut self, within: Duration) -> Result<Option<Question>, ()> {
        let Some((handle, waits)) = &mut self.channel else {
            return match self.port.get_message(Some(within)) {
                Some(m) => Ok(Some(Question::Port(m.id, m.data))),
                None if self.port.is_connected() => Ok(None),
                None => Err(()),
            };
        };
        if let Some(m) = self.port.get_message(Some(Duration::ZERO)) {
            return Ok(Some(Question::Port(m.id, m.data)));
        }
        let Some(completion) = waits[0].wait_timeout(within) else {
            return Ok(None);
        };
        waits.remove(0);
        if completion.status != 0 {
            return Err(());
        }
        waits.push(wait_request(handle));
        let (id, body) = decode_message(&completion.output).ok_or(())?;
        Ok(Some(Question::Channel(id, body.to_vec())))
    }

    /// Replies to `question` where it came from; `Ok(true)` if the driver took the reply as
    /// the answer to a waiting question (on the channel: and found it well-formed).
    ///
    /// # Errors
    ///
    /// The status the reply failed with otherwise (`STATUS_PORT_DISCONNECTED` or
    /// `STATUS_DELETE_PENDING` once the driver closed the connection).
    pub fn reply(&self, question: &Question, bytes: &[u8]) -> Result<bool, Status> {
        match question {
            Question::Port(id, _) => match self.port.reply(*id, bytes) {
                Ok(()) => Ok(true),
                Err(Status::FLT_NO_WAITER_FOR_REPLY) => Ok(false),
                Err(status) => Err(status),
            },
            Question::Channel(id, _) => {
                let (handle, _) = self.channel.as_ref().expect("a channel question");
                let mut input = encode_header(*id, bytes.len()).to_vec();
                input.extend_from_slice(bytes);
                let status = handle
                    .device_io_control(ASK_CHANNEL.answer.raw(), &input, 0)
                    .wait()
                    .status;
                match status {
                    0 => Ok(true),
                    // Malformed (decided with the default) or no longer waiting.
                    s if s == Status::INVALID_PARAMETER.raw() || s == Status::NOT_FOUND.raw() => {
                        Ok(false)
                    }
                    s => Err(Status::from_raw(s)),
                }
            }
        }
    }
}

fn wait_request(handle: &DeviceHandle) -> IoRequest {
    handle.device_io_control(ASK_CHANNEL.wait.raw(), &[], ASK_CHANNEL.wait_output_len())
}
