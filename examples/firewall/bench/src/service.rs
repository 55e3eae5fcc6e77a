//! The user-mode service, played by harness threads on the firewall's port.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use firewall_protocol::{CacheLifetime, ConnectionReply, ConnectionRequest, PORT_NAME, Verdict};
use wfp_rs::Status;
use wfp_rs::port::Message;
use wfp_rs_sim::{Machine, PortClient};

/// A service that allows every connection: `threads` threads share one connection to
/// [`PORT_NAME`] and answer each request after `latency` (a sleep; none if zero), until the
/// driver closes the connection (at unload).
pub struct Service {
    threads: Vec<JoinHandle<u64>>,
}

impl Service {
    /// Connects and starts answering. `cache` is the lifetime each reply grants the verdict in
    /// the driver's cache (`None`: not cached, so every connection asks).
    pub fn start(
        machine: &Machine,
        threads: usize,
        latency: Duration,
        cache: Option<CacheLifetime>,
    ) -> Service {
        let mut client = machine.port_client(PORT_NAME);
        client.connect(&[]).expect("the service connects");
        let client: Arc<PortClient> = Arc::new(client);
        let threads = (0..threads)
            .map(|_| {
                let client = Arc::clone(&client);
                thread::spawn(move || answer(&client, latency, cache))
            })
            .collect();
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

fn answer(client: &PortClient, latency: Duration, cache: Option<CacheLifetime>) -> u64 {
    let mut answered = 0;
    let mut out = [0u8; ConnectionReply::MAX_LEN];
    while let Some(message) = client.get_message(None) {
        let request = ConnectionRequest::decode(&message.data).expect("the driver's encoding");
        if !latency.is_zero() {
            thread::sleep(latency);
        }
        let mut reply = request.reply(Verdict::Allow);
        if let Some(lifetime) = cache {
            reply = reply.cached_for(lifetime);
        }
        let len = reply.encode(&mut out).expect("a reply fits");
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
