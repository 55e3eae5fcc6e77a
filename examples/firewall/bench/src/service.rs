//! The user-mode service, played by harness threads on either of the firewall's transports.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use firewall_protocol::{
    ASK_CHANNEL, ASK_DEVICE_PATH, CacheLifetime, ConnectionReply, ConnectionRequest, PORT_NAME,
    Verdict,
};
use wfp_rs::Status;
use wfp_rs::ask::{HEADER_LEN, decode_message, encode_header};
use wfp_rs::port::Message;
use wfp_rs_sim::{Caller, DeviceHandle, IoRequest, Machine, PortClient};

/// How the service receives questions and sends answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The filter-manager port ([`PORT_NAME`]): each thread waits in `FilterGetMessage` and
    /// answers with `FilterReplyMessage` (the firewall's `AskVia::PortAndWorkItem`).
    Port,
    /// The question channel ([`ASK_CHANNEL`] on [`ASK_DEVICE_PATH`]): one handle that keeps
    /// `outstanding` wait requests pending, oldest answered first, each replaced as soon as it
    /// completes — what `wfp_rs::user::AskClient` does — and answers sent as control requests
    /// (the firewall's `AskVia::Channel`).
    Channel {
        /// Wait requests kept pending.
        outstanding: usize,
    },
}

/// A service that allows every connection: `threads` threads share one connection (a port
/// connection or a channel handle) and answer each question after `latency` (a sleep; none if
/// zero), until the driver closes the connection (at unload).
///
/// The service's latency is modelled the same way on both transports: each thread takes one
/// question, sleeps `latency`, answers, and only then takes the next, so `threads` questions at
/// most are being worked on at once, whichever way they came.
///
/// Both transports use the simulator's in-process handles (`Machine::port_client`,
/// `Machine::open_device`): `wfp_rs::user::AskClient` and `wfp_rs::user::Port` reach a
/// simulated machine only through its bridge socket, one Unix-socket connection per call, which
/// would weigh on the benchmarks more than the designs they compare.
pub struct Service {
    threads: Vec<JoinHandle<u64>>,
}

impl Service {
    /// Connects and starts answering. `cache` is the lifetime each reply grants the verdict in
    /// the driver's cache (`None`: not cached, so every connection asks).
    pub fn start(
        machine: &Machine,
        transport: Transport,
        threads: usize,
        latency: Duration,
        cache: Option<CacheLifetime>,
    ) -> Service {
        let threads = match transport {
            Transport::Port => {
                let mut client = machine.port_client(PORT_NAME);
                client.connect(&[]).expect("the service connects");
                let client: Arc<PortClient> = Arc::new(client);
                (0..threads)
                    .map(|_| {
                        let client = Arc::clone(&client);
                        thread::spawn(move || answer_port(&client, latency, cache))
                    })
                    .collect()
            }
            Transport::Channel { outstanding } => {
                let channel = Arc::new(Channel::open(machine, outstanding));
                (0..threads)
                    .map(|_| {
                        let channel = Arc::clone(&channel);
                        thread::spawn(move || channel.answer_all(latency, cache))
                    })
                    .collect()
            }
        };
        Service { threads }
    }

    /// Waits for the threads, which end when the driver closes the connection; returns how
    /// many requests they answered.
    pub fn join(self) -> u64 {
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a service thread failed"))
            .sum()
    }
}

/// The reply to `request`: allow, cached for `cache` if given.
fn reply_to(request: &ConnectionRequest, cache: Option<CacheLifetime>) -> ConnectionReply {
    let reply = request.reply(Verdict::Allow);
    match cache {
        Some(lifetime) => reply.cached_for(lifetime),
        None => reply,
    }
}

fn answer_port(client: &PortClient, latency: Duration, cache: Option<CacheLifetime>) -> u64 {
    let mut answered = 0;
    let mut out = [0u8; ConnectionReply::MAX_LEN];
    while let Some(message) = client.get_message(None) {
        let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
        if !latency.is_zero() {
            thread::sleep(latency);
        }
        let len = reply_to(&request, cache)
            .encode(&mut out)
            .expect("a reply fits");
        match client.reply(message.id, &out[..len]) {
            Ok(()) => answered += 1,
            // The driver closed the connection (unload): nobody waits any more.
            Err(Status::PORT_DISCONNECTED) => break,
            // A sender that timed out no longer waits; the benchmarks' timeouts are long, so
            // this is a failure of the run.
            Err(status) => panic!("the driver is waiting for this reply: {status}"),
        }
    }
    answered
}

/// The service's handle to the question channel's device and its pending wait requests.
struct Channel {
    /// Oldest first: the driver hands a question to the oldest waiting request.
    waiting: Mutex<VecDeque<IoRequest>>,
    device: DeviceHandle,
    outstanding: usize,
}

impl Channel {
    fn open(machine: &Machine, outstanding: usize) -> Channel {
        let device = machine
            .open_device(ASK_DEVICE_PATH, Caller::System)
            .expect("the service opens the question channel");
        Channel {
            waiting: Mutex::new(VecDeque::new()),
            device,
            outstanding: outstanding.max(1),
        }
    }

    /// Sends wait requests until `outstanding` are queued (besides those other threads wait
    /// for), then takes the oldest, as `AskClient::next_question` does.
    fn next_request(&self) -> IoRequest {
        let mut waiting = self.waiting.lock().unwrap();
        while waiting.len() < self.outstanding {
            waiting.push_back(self.device.device_io_control(
                ASK_CHANNEL.wait.raw(),
                &[],
                ASK_CHANNEL.wait_output_len(),
            ));
        }
        waiting.pop_front().expect("just refilled")
    }

    /// One thread's loop: the oldest wait request's question, the latency, the answer; until
    /// the channel closes (a wait request fails: cancelled at unload, or refused).
    fn answer_all(&self, latency: Duration, cache: Option<CacheLifetime>) -> u64 {
        let mut answered = 0;
        let mut out = [0u8; HEADER_LEN + ConnectionReply::MAX_LEN];
        loop {
            let completion = self.next_request().wait();
            let Ok(message) = completion.ok() else {
                return answered;
            };
            let (id, body) = decode_message(message).expect("the channel's header");
            let question = ConnectionRequest::decode(body).expect("the driver's encoding");
            if !latency.is_zero() {
                thread::sleep(latency);
            }
            let len = reply_to(&question, cache)
                .encode(&mut out[HEADER_LEN..])
                .expect("a reply fits");
            out[..HEADER_LEN].copy_from_slice(&encode_header(id, len));
            let answer = self
                .device
                .device_io_control(ASK_CHANNEL.answer.raw(), &out[..HEADER_LEN + len], 0)
                .wait();
            match answer.ok() {
                Ok(_) => answered += 1,
                // The channel is closing (unload): nobody waits any more.
                Err(Status::DELETE_PENDING) => return answered,
                // A question that timed out is no longer waiting; the benchmarks' timeouts are
                // long, so this is a failure of the run.
                Err(status) => panic!("the driver is waiting for this answer: {status}"),
            }
        }
    }
}
