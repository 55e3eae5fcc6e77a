//! Connections in waves: benchmarks (b) and (c).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use wfp_rs::classify::Action;
use wfp_rs_sim::{AleIrql, LoadedDriver, Machine};

use crate::{Service, Transport};

/// Which driver decides the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Design {
    /// The firewall driver as it ships (`AskVia::Channel`): pend, hand the question to a wait
    /// request the service left pending (the inverted call), return; the service's answer
    /// completes the pend, and the reauthorization is answered from the verdict.
    Inverted,
    /// The firewall driver with `AskVia::PortAndWorkItem`: pend, ask from a PASSIVE_LEVEL work
    /// item over the port (the work item waits for the reply), complete, answer the
    /// reauthorization.
    WorkItem,
    /// The seed's design ([`crate::blocking`]): the classification waits for the reply.
    Blocking,
}

impl Design {
    /// Every design, in the order the benchmarks print them.
    pub const ALL: [Design; 3] = [Design::Inverted, Design::WorkItem, Design::Blocking];

    /// The name the benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Design::Inverted => "inverted",
            Design::WorkItem => "work-item",
            Design::Blocking => "blocking",
        }
    }
}

/// A workload: `clients` threads, each opening `per_client` connections one after the other
/// per wave, against a service of `service_threads` threads that answers each request after
/// `service_latency` without letting the driver cache it (so every connection asks).
#[derive(Clone, Copy, Debug)]
pub struct LoadConfig {
    /// The driver.
    pub design: Design,
    /// Connection threads, each with one connection outstanding at a time.
    pub clients: usize,
    /// Connections per thread per wave.
    pub per_client: usize,
    /// The IRQL of the ALE authorization layers.
    pub ale_irql: AleIrql,
    /// The machine's system worker threads (what runs the firewall's work items).
    pub workers: usize,
    /// The service's threads.
    pub service_threads: usize,
    /// How long the service takes per request (a sleep; none if zero).
    pub service_latency: Duration,
    /// The wait requests the service keeps pending on the question channel
    /// ([`Design::Inverted`] only).
    pub service_outstanding: usize,
}

/// One wave's outcome.
#[derive(Clone, Debug, Default)]
pub struct Wave {
    /// From the release of the clients to the last final decision.
    pub elapsed: Duration,
    /// The CPU time the whole process used meanwhile (every thread: clients, service, the
    /// simulator's own; user and kernel): the wave's cost, as long as the process does nothing
    /// else at the time (other loads idle between their waves).
    pub cpu: Duration,
    /// Each connection's time: from `Machine::connect` to its final decision (every layer;
    /// for a pended connection the completion and the reauthorization too).
    pub latencies: Vec<Duration>,
    /// Each pended connection's round trip ([`wfp_rs_sim::ConnectOutcome::pend_round_trip`]):
    /// from the classification that pended to the layer's final decision. Empty for the
    /// blocking design, which does not pend.
    pub round_trips: Vec<Duration>,
    /// Connections that were not permitted (the service allows everything, so each is a
    /// default: a timeout, or a verdict evicted before its reauthorization).
    pub denied: usize,
}

/// One connection of a wave, as its client thread saw it.
struct Decided {
    /// From `Machine::connect` to its return.
    connection: Duration,
    /// `ConnectOutcome::pend_round_trip`.
    round_trip: Option<Duration>,
    permitted: bool,
}

/// The machine, the driver, the service and the client threads of a [`LoadConfig`], ready for
/// waves.
pub struct Load {
    config: LoadConfig,
    machine: Arc<Machine>,
    driver: Option<LoadedDriver>,
    service: Option<Service>,
    clients: Vec<JoinHandle<()>>,
    start: Arc<Barrier>,
    done: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Decided>>>,
    /// Held while a [`Design::Blocking`] driver is loaded: its state is a global of the process
    /// ([`crate::blocking`]), so one instance at a time.
    _blocking: Option<MutexGuard<'static, ()>>,
}

/// Serializes the loads of the blocking driver (see [`Load`]).
static BLOCKING: Mutex<()> = Mutex::new(());

impl Load {
    /// Boots a machine with `config.workers` worker threads and Windows' default debug filter,
    /// loads the design's driver, starts the service and the client threads (waiting for the
    /// first wave).
    pub fn start(config: LoadConfig) -> Load {
        let blocking = (config.design == Design::Blocking)
            .then(|| BLOCKING.lock().unwrap_or_else(PoisonError::into_inner));
        let machine = Arc::new(Machine::with_worker_threads(config.workers));
        // Only errors reach the debugger, as on a machine nobody debugs: the firewall's
        // per-connection Info lines are measured at what they cost there (a filter query).
        machine.set_debug_filter_mask(0);
        let (entry, transport): (wfp_rs_sim::DriverEntryFn, Transport) = match config.design {
            Design::Inverted => (
                crate::firewall::DriverEntry,
                Transport::Channel {
                    outstanding: config.service_outstanding,
                },
            ),
            Design::WorkItem => (crate::firewall::work_item::DriverEntry, Transport::Port),
            Design::Blocking => (crate::blocking::DriverEntry, Transport::Port),
        };
        let driver = machine
            .load_driver("firewall", entry)
            .expect("the driver loads");
        let service = Service::start(
            &machine,
            transport,
            config.service_threads,
            config.service_latency,
            None,
        );
        let start = Arc::new(Barrier::new(config.clients + 1));
        let done = Arc::new(Barrier::new(config.clients + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::with_capacity(
            config.clients * config.per_client,
        )));
        let clients = (0..config.clients)
            .map(|i| {
                let (machine, start, done, stop, results) = (
                    Arc::clone(&machine),
                    Arc::clone(&start),
                    Arc::clone(&done),
                    Arc::clone(&stop),
                    Arc::clone(&results),
                );
                // One local port per client: its connections are never outstanding together.
                let c = crate::connection(1024 + i as u16);
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let mut mine = Vec::with_capacity(config.per_client);
                        loop {
                            start.wait();
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                            for _ in 0..config.per_client {
                                let began = Instant::now();
                                let outcome = machine.connect(&c, config.ale_irql);
                                mine.push(Decided {
                                    connection: began.elapsed(),
                                    round_trip: outcome.pend_round_trip,
                                    permitted: outcome.decision.action == Action::Permit,
                                });
                            }
                            results.lock().unwrap().append(&mut mine);
                            done.wait();
                        }
                    })
                    .expect("a client thread starts")
            })
            .collect();
        Load {
            config,
            machine,
            driver: Some(driver),
            service: Some(service),
            clients,
            start,
            done,
            stop,
            results,
            _blocking: blocking,
        }
    }

    /// The workload.
    pub fn config(&self) -> LoadConfig {
        self.config
    }

    /// The machine (for its counters: `Machine::blocked_workers_max`, ...).
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Connections per wave.
    pub fn connections_per_wave(&self) -> usize {
        self.config.clients * self.config.per_client
    }

    /// Releases the clients and waits until every connection of the wave has its decision.
    pub fn wave(&self) -> Wave {
        let began = Instant::now();
        let cpu_began = cpu_time::ProcessTime::now();
        self.start.wait();
        self.done.wait();
        let elapsed = began.elapsed();
        let cpu = cpu_began.elapsed();
        let results = std::mem::take(&mut *self.results.lock().unwrap());
        assert_eq!(
            results.len(),
            self.connections_per_wave(),
            "every connection decided"
        );
        Wave {
            elapsed,
            cpu,
            denied: results.iter().filter(|d| !d.permitted).count(),
            round_trips: results.iter().filter_map(|d| d.round_trip).collect(),
            latencies: results.iter().map(|d| d.connection).collect(),
        }
    }

    /// Stops the clients, unloads the driver (which disconnects the service), and checks that
    /// nothing is left: no pend, no pool. Returns how many requests the service answered.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.start.wait();
        for client in self.clients.drain(..) {
            client.join().expect("a client thread failed");
        }
        let driver = self.driver.take().expect("loaded");
        self.machine
            .unload_driver(driver)
            .expect("the driver unloads");
        let answered = self.service.take().expect("started").join();
        assert_eq!(self.machine.pending_classifications(), 0, "no pend left");
        assert_eq!(self.machine.pool_blocks(), [], "no pool left");
        answered
    }
}
