//! Benchmark (b): the pended decision's round trip — from the start of the classification that
//! pends and asks to the layer's final decision (the service's answer completed the pend; the
//! reauthorization answered), `ConnectOutcome::pend_round_trip` — and the whole connection's
//! time (`Machine::connect`, every layer), with 1, 64 and 1024 connections outstanding at once,
//! the service answering at once, for each design: the inverted call (the firewall's question
//! channel), the work item + port, and the seed's blocking design (which does not pend: only
//! its connection time is measured).
//!
//! Each iteration is a wave: N client threads each open one connection at the same moment
//! (ALE layers at `DISPATCH_LEVEL`; at `PASSIVE_LEVEL` for the blocking design, the only IRQL
//! where it may wait); criterion times the waves, and the per-connection round trips give the
//! median and the 99th percentile, which criterion does not report.
//!
//! Then the floor: a bare cross-thread channel round trip (`firewall_bench::bare`), measured in
//! rounds interleaved with rounds of the inverted design's single connections (one client, and a
//! service answering with one thread, as the floor's echo thread), and the ratio of
//! their medians, `ratio b-p50-inverted-over-bare-channel` (the pended round trip's median), and
//! as figures the same for the whole connection's time,
//! `ratio b-p50-inverted-connection-over-bare-channel`, and for the inverted design with the
//! simulator's waits parking at once (`Machine::set_wait_spin(WaitSpin::Fixed(ZERO))`) instead
//! of its default adaptive spin, `ratio b-p50-inverted-parking-over-bare-channel`.

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use firewall_bench::Latencies;
use firewall_bench::bare::PingPong;
use firewall_bench::load::{Design, Load, LoadConfig};
use wfp_rs_sim::{AleIrql, WaitSpin};

/// The service's threads, and its pending wait requests on the question channel.
const SERVICE_THREADS: usize = 2;
const SERVICE_OUTSTANDING: usize = 8;
/// The machine's system worker threads (the simulator's default).
const WORKERS: usize = 2;

fn workload(design: Design, clients: usize, per_client: usize) -> LoadConfig {
    LoadConfig {
        design,
        clients,
        per_client,
        ale_irql: match design {
            Design::Blocking => AleIrql::Passive,
            Design::Inverted | Design::WorkItem => AleIrql::Dispatch,
        },
        workers: WORKERS,
        service_threads: SERVICE_THREADS,
        service_latency: Duration::ZERO,
        service_outstanding: SERVICE_OUTSTANDING,
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    if !measuring {
        println!(
            "(criterion's test mode: one small round each; the figures below are not measurements)"
        );
    }
    let mut summary = Vec::new();
    for n in [1usize, 64, 1024] {
        let mut group = c.benchmark_group(format!("b-round-trip-{n}"));
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(Throughput::Elements(n as u64));
        for design in Design::ALL {
            let load = Load::start(workload(design, n, 1));
            let before = firewall_bench::firewall::STATS.snapshot();
            let mut latencies = Latencies::new();
            let mut round_trips = Latencies::new();
            let (mut waves, mut denied) = (0u64, 0usize);
            group.bench_with_input(BenchmarkId::new(design.name(), n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let wave = load.wave();
                        total += wave.elapsed;
                        denied += wave.denied;
                        waves += 1;
                        latencies.extend(wave.latencies);
                        round_trips.extend(wave.round_trips);
                    }
                    total
                })
            });
            // Why a firewall connection would not get the service's verdict: more than
            // `Config::max_pending` connections outstanding at once (overload: its own
            // decision, deny), or (a defect, the default) a verdict lost before its
            // reauthorization. (The blocking design counts neither.)
            let after = firewall_bench::firewall::STATS.snapshot();
            let overloaded = after.overloaded - before.overloaded;
            let defaults = after.defaults - before.defaults;
            let answered = load.finish();
            let p50 = latencies.percentile(50.0).unwrap_or_default();
            let p99 = latencies.percentile(99.0).unwrap_or_default();
            let pended = match (round_trips.percentile(50.0), round_trips.percentile(99.0)) {
                (Some(p50), Some(p99)) => format!(
                    "round trip p50 = {:>9.1} µs, p99 = {:>9.1} µs",
                    micros(p50),
                    micros(p99)
                ),
                _ => "no pend (the classification waits)".to_owned(),
            };
            summary.push(format!(
                "(b) {:<9} N = {n:>4}: {pended}; connection p50 = {:>9.1} µs, p99 = {:>9.1} µs; over {} connections in {waves} waves; {denied} not permitted ({defaults} defaults, {overloaded} overload); {answered} questions answered",
                design.name(),
                micros(p50),
                micros(p99),
                latencies.len(),
            ));
        }
        group.finish();
    }
    for line in &summary {
        println!("{line}");
    }

    // The floor, interleaved with the inverted design's single connections so that a change in
    // the machine's load hits both alike: per round, CONNECTIONS connections one after another
    // (one client) with the simulator's default waits (spinning as long as they learn it pays,
    // as the floor's channel spins before it parks), as many with its waits parking at once,
    // and as many bare round trips; which goes first rotates. The service answers with one
    // thread, as the floor's echo thread does: at N = 1 a second thread has nothing to answer,
    // only the two CPUs to take from the two threads that do the round trip (the waves above,
    // N = 1 included, keep SERVICE_THREADS).
    const CONNECTIONS: usize = 200;
    let rounds = if measuring { 21 } else { 3 };
    let load = Load::start(LoadConfig {
        service_threads: 1,
        ..workload(Design::Inverted, 1, CONNECTIONS)
    });
    let bare = PingPong::start();
    // Warm-up, not counted: threads started, caches and the allocator's pools filled.
    load.wave();
    bare.round_trips(CONNECTIONS);
    let (mut inverted, mut connections, mut parking, mut floor) = (
        Latencies::new(),
        Latencies::new(),
        Latencies::new(),
        Latencies::new(),
    );
    let mut denied = 0;
    for round in 0..rounds {
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => floor.extend(bare.round_trips(CONNECTIONS)),
                part => {
                    let park = part == 2;
                    load.machine().set_wait_spin(if park {
                        WaitSpin::Fixed(Duration::ZERO)
                    } else {
                        WaitSpin::Adaptive
                    });
                    let wave = load.wave();
                    denied += wave.denied;
                    assert_eq!(
                        wave.round_trips.len(),
                        wave.latencies.len(),
                        "every connection pended"
                    );
                    if park {
                        parking.extend(wave.round_trips);
                    } else {
                        inverted.extend(wave.round_trips);
                        connections.extend(wave.latencies);
                    }
                }
            }
        }
    }
    load.machine().set_wait_spin(WaitSpin::Adaptive);
    drop(bare);
    load.finish();
    assert_eq!(denied, 0, "the service allows every connection");
    let inverted_p50 = inverted.percentile(50.0).expect("measured");
    let connection_p50 = connections.percentile(50.0).expect("measured");
    let parking_p50 = parking.percentile(50.0).expect("measured");
    let floor_p50 = floor.percentile(50.0).expect("measured");
    println!(
        "(b) interleaved, {rounds} rounds: inverted N = 1 round trip p50 = {:.1} µs, p99 = {:.1} µs, connection p50 = {:.1} µs, p99 = {:.1} µs ({} connections); with the waits parking at once: round trip p50 = {:.1} µs, p99 = {:.1} µs ({} connections); bare channel round trip p50 = {:.1} µs, p99 = {:.1} µs ({} round trips)",
        micros(inverted_p50),
        micros(inverted.percentile(99.0).expect("measured")),
        micros(connection_p50),
        micros(connections.percentile(99.0).expect("measured")),
        inverted.len(),
        micros(parking_p50),
        micros(parking.percentile(99.0).expect("measured")),
        parking.len(),
        micros(floor_p50),
        micros(floor.percentile(99.0).expect("measured")),
        floor.len(),
    );
    let figures = [
        format!(
            "ratio b-p50-inverted-connection-over-bare-channel = {:.2}",
            connection_p50.as_secs_f64() / floor_p50.as_secs_f64()
        ),
        format!(
            "ratio b-p50-inverted-parking-over-bare-channel = {:.2}",
            parking_p50.as_secs_f64() / floor_p50.as_secs_f64()
        ),
    ];
    let finals = [format!(
        "ratio b-p50-inverted-over-bare-channel = {:.2}",
        inverted_p50.as_secs_f64() / floor_p50.as_secs_f64()
    )];
    c.final_summary();
    if measuring {
        // The run's summary lines so far (see `firewall_bench::summary`): the last bench ends
        // `cargo bench -p firewall-bench` with all of them.
        let exe = std::env::current_exe().expect("the bench binary's path");
        let dir = firewall_bench::summary::dir(&exe);
        firewall_bench::summary::record(&dir, "round_trip", &figures, &finals)
            .expect("the summary is written");
        firewall_bench::summary::print(&dir);
    } else {
        for line in figures.iter().chain(&finals) {
            println!("{line}");
        }
    }
}
