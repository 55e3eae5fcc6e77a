//! The firewall driver as the benchmarks load it: asking through the question channel (its
//! default, [`DriverEntry`]) or from work items over the port ([`work_item::DriverEntry`]).

use std::time::Duration;

use firewall_driver::{AskVia, Config, Firewall, Stats};
use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;

/// Longer than any benchmark waits, so no question times out into the default.
pub const PATIENT: Duration = Duration::from_secs(120);

/// The counters of every instance loaded with [`DriverEntry`] (they add up across machines:
/// compare snapshots).
pub static STATS: Stats = Stats::new();

/// `DriverEntry`: [`Config::DEFAULT`] (asks through the question channel, fail-closed, 1024
/// cache entries, 2048 pends at most, loopback permitted) with the [`PATIENT`] timeout and
/// [`STATS`].
#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
    firewall_driver::start(
        irql,
        driver,
        Config {
            timeout: PATIENT,
            stats: Some(&STATS),
            ..Config::DEFAULT
        },
    )
}

/// The firewall as [`DriverEntry`] loads it, but asking from a PASSIVE_LEVEL work item over the
/// filter-manager port (`AskVia::PortAndWorkItem`): the design the question channel replaces.
pub mod work_item {
    use super::*;

    /// `DriverEntry`: [`super::DriverEntry`]'s configuration with
    /// `ask_via: AskVia::PortAndWorkItem`.
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                ask_via: AskVia::PortAndWorkItem,
                timeout: PATIENT,
                stats: Some(&STATS),
                ..Config::DEFAULT
            },
        )
    }
}

/// The firewall as [`DriverEntry`] loads it, but with no verdict cache
/// (`Config::cache_capacity` 0): the baseline of [`pool_per_cached_verdict`].
pub mod without_cache {
    use super::*;

    /// `DriverEntry`: [`super::DriverEntry`]'s configuration with `cache_capacity: 0`.
    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                timeout: PATIENT,
                cache_capacity: 0,
                ..Config::DEFAULT
            },
        )
    }
}

/// Bytes of non-paged pool the firewall holds per cached verdict, measured: the pool the driver
/// holds once loaded with the default cache ([`firewall_driver::DEFAULT_CACHE_CAPACITY`]
/// verdicts), less what it holds loaded without one, divided by the capacity. (The simulator's
/// pool blocks are the sizes asked for; Windows adds a header per allocation, and the cache is
/// one allocation.)
pub fn pool_per_cached_verdict() -> f64 {
    let held = |entry: wfp_rs_sim::DriverEntryFn| {
        let machine = wfp_rs_sim::Machine::new();
        let driver = machine
            .load_driver("firewall", entry)
            .expect("the firewall loads");
        let bytes: usize = machine
            .pool_blocks()
            .iter()
            .filter(|block| block.driver.as_deref() == Some("firewall"))
            .map(|block| block.size)
            .sum();
        machine.unload_driver(driver).expect("the firewall unloads");
        assert_eq!(machine.pool_blocks(), [], "no pool left");
        bytes
    };
    let with = held(DriverEntry);
    let without = held(without_cache::DriverEntry);
    (with - without) as f64 / firewall_driver::DEFAULT_CACHE_CAPACITY as f64
}

/// Bytes of non-paged pool the firewall holds per question outstanding (asked, not answered),
/// measured: `questions` classifications at `ALE_AUTH_CONNECT_V4` pend and ask, every question
/// delivered to the service and none answered; then `questions` more; the pool the driver holds
/// after the second batch less what it held after the first, divided by `questions`. (The
/// difference of two batches leaves out what the first question allocates once for all.) The
/// classifications run on the harness's thread at `DISPATCH_LEVEL` (`Machine::classify`), so
/// each `classifyFn` has returned when the pool is counted. With `via` [`AskVia::Channel`] the
/// service keeps a wait request pending for every question; with [`AskVia::PortAndWorkItem`]
/// the machine has a system worker thread for every question and the service has taken every
/// message (each work item waits in `FltSendMessage`, its buffers held).
pub fn pool_per_outstanding_question(via: AskVia, questions: usize) -> f64 {
    use firewall_protocol::{ASK_CHANNEL, ConnectionReply, ConnectionRequest, PORT_NAME, Verdict};
    use wfp_rs::irql::Irql;
    use wfp_rs::port::Message;
    use wfp_rs_sim::{Caller, Machine, Pending};

    let machine = Machine::with_worker_threads(match via {
        AskVia::Channel => 2,
        AskVia::PortAndWorkItem => 2 * questions,
    });
    let entry: wfp_rs_sim::DriverEntryFn = match via {
        AskVia::Channel => DriverEntry,
        AskVia::PortAndWorkItem => work_item::DriverEntry,
    };
    let driver = machine
        .load_driver("firewall", entry)
        .expect("the firewall loads");
    let held = || -> usize {
        machine
            .pool_blocks()
            .iter()
            .filter(|block| block.driver.as_deref() == Some("firewall"))
            .map(|block| block.size)
            .sum()
    };
    let reply = |question: &[u8]| -> Vec<u8> {
        let request = ConnectionRequest::decode(question).expect("the driver's encoding");
        let mut out = [0u8; ConnectionReply::MAX_LEN];
        let len = request
            .reply(Verdict::Allow)
            .encode(&mut out)
            .expect("a reply fits");
        out[..len].to_vec()
    };
    // `questions` classifications more, each pended (and asked) by the firewall.
    let mut pends: Vec<Pending> = Vec::new();
    let ask = |pends: &mut Vec<Pending>| {
        for _ in 0..questions {
            let request = crate::hit::request(2000 + pends.len() as u16).pendable();
            let decision = machine.classify(Irql::DISPATCH, &request);
            pends.push(decision.pending.expect("the firewall pends and asks"));
        }
    };
    let (first, second) = match via {
        AskVia::Channel => {
            let service = machine
                .open_device(firewall_protocol::ASK_DEVICE_PATH, Caller::System)
                .expect("the service opens the channel");
            let mut delivered = Vec::new();
            let mut batch = |pends: &mut Vec<Pending>| {
                let waits: Vec<_> = (0..questions)
                    .map(|_| {
                        service.device_io_control(
                            ASK_CHANNEL.wait.raw(),
                            &[],
                            ASK_CHANNEL.wait_output_len(),
                        )
                    })
                    .collect();
                ask(pends);
                for wait in waits {
                    delivered.push(wait.wait().ok().expect("a question").to_vec());
                }
                held()
            };
            let first = batch(&mut pends);
            let second = batch(&mut pends);
            for message in delivered {
                let (id, body) = wfp_rs::ask::decode_message(&message).expect("a question");
                let body = reply(body);
                let mut answer = wfp_rs::ask::encode_header(id, body.len()).to_vec();
                answer.extend_from_slice(&body);
                service
                    .device_io_control(ASK_CHANNEL.answer.raw(), &answer, 0)
                    .wait()
                    .ok()
                    .expect("the answer is taken");
            }
            (first, second)
        }
        AskVia::PortAndWorkItem => {
            let mut service = machine.port_client(PORT_NAME);
            service.connect(&[]).expect("the service connects");
            let mut messages = Vec::new();
            let mut batch = |pends: &mut Vec<Pending>| {
                ask(pends);
                for _ in 0..questions {
                    messages.push(service.get_message(None).expect("a question"));
                }
                held()
            };
            let first = batch(&mut pends);
            let second = batch(&mut pends);
            for message in messages {
                service
                    .reply(message.id, &reply(&message.data))
                    .expect("the reply is taken");
            }
            (first, second)
        }
    };
    for (i, pending) in pends.into_iter().enumerate() {
        // Completed for reauthorization, which the driver answers from the verdict it recorded
        // (and which its unload waits for).
        assert_eq!(machine.wait_for_completion(pending), None);
        let reauthorization = crate::hit::request(2000 + i as u16)
            .with::<wfp_rs::layer::fields::Flags>(
                wfp_rs::layer::value::ConditionFlags::IS_REAUTHORIZE,
            )
            .reauthorization();
        let decision = machine.classify(Irql::DISPATCH, &reauthorization);
        assert_eq!(decision.action, wfp_rs::classify::Action::Permit);
    }
    machine.unload_driver(driver).expect("the firewall unloads");
    assert_eq!(machine.pool_blocks(), [], "no pool left");
    (second as f64 - first as f64) / questions as f64
}
