//! Benchmark (c): decisions per second of the three designs — the inverted call (the firewall's
//! question channel), the work item + port, and the seed's blocking design
//! (`firewall_bench::blocking`: classify waits for the service's reply) — at 1, 8, 64 and 1024
//! concurrent connections and a service latency of 0, 200 µs and 1 ms: C client threads each
//! open connections one after the other (ALE layers at `PASSIVE_LEVEL`, the only IRQL where the
//! blocking design may wait), and a service of `SERVICE_THREADS` threads takes the latency per
//! question (a sleep) and lets nothing be cached, so every connection asks. The designs' waves
//! are interleaved at each point (rotating which goes first).
//!
//! The work item design runs on the simulator's default two system worker threads; at 64
//! concurrent connections and 1 ms it is also measured with `MORE_WORKERS`, in the same
//! interleaved rounds.
//!
//! Also each design's CPU time per decision (the whole process's, user and kernel, over its
//! waves: what the decisions cost the machine, where the rate says how fast they came), the most
//! system worker threads each design kept blocked at once (the simulator's
//! `Machine::blocked_workers_max`), and the non-paged pool per outstanding question. The final
//! lines: `ratio c-inverted-over-blocking-min`, `ratio c-inverted-over-workitem-64-1ms`,
//! `blocked-workers-max inverted`. (No criterion groups here: 36 of them would take many
//! minutes; the rates are computed from the interleaved waves.)

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use firewall_bench::load::{Design, Load, LoadConfig};
use firewall_driver::AskVia;
use wfp_rs_sim::AleIrql;

const CONCURRENCY: [usize; 4] = [1, 8, 64, 1024];
const SERVICE_LATENCIES: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_micros(200),
    Duration::from_millis(1),
];
/// The service's threads: as many as the questions of 64 concurrent connections, so at 1 ms the
/// service could answer 64,000 questions a second — more than any design reaches on this
/// machine — and is not the only bottleneck (at 1024 concurrent connections it is one).
const SERVICE_THREADS: usize = 64;
/// The wait requests the service keeps pending on the question channel.
const SERVICE_OUTSTANDING: usize = 64;
/// The machine's system worker threads (what runs the work item design's questions): the
/// simulator's default, as in (b). Windows documents a pool of system worker threads but not its
/// size; the work item design can have at most this many questions in flight.
const WORKERS: usize = 2;
/// A larger pool, measured at the 64 concurrent / 1 ms point beside the others, so the work item
/// design's dependence on the pool's size is in the same run.
const MORE_WORKERS: usize = 8;
/// Questions outstanding in the memory measurement.
const MEMORY_QUESTIONS: usize = 64;

/// Connections per client per wave: at least 64 connections a wave, and at least 4 per client,
/// so that the wave's ramps (clients leaving the barrier one by one, the last connections
/// finishing alone) are a small part of it and most of it runs at the point's concurrency.
fn per_client(concurrency: usize) -> usize {
    (64 / concurrency).max(4)
}

fn workload(design: Design, concurrency: usize, service_latency: Duration) -> LoadConfig {
    LoadConfig {
        design,
        clients: concurrency,
        per_client: per_client(concurrency),
        ale_irql: AleIrql::Passive,
        workers: WORKERS,
        service_threads: SERVICE_THREADS,
        service_latency,
        service_outstanding: SERVICE_OUTSTANDING,
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    if !measuring {
        println!("(test mode: one wave each; the figures below are not measurements)");
    }
    let rounds = if measuring { 6 } else { 1 };
    let designs = Design::ALL;
    let mut blocked_workers = [0usize; 3];
    let mut blocked_classifying = [0usize; 3];
    let mut min_over_blocking = f64::INFINITY;
    // Where the inverted design's rate is smallest against the blocking design's: the ratio of
    // their CPU time per decision there.
    let mut cpu_at_min = None;
    let mut over_work_item_64_1ms = None;
    let mut more_workers_64_1ms = None;
    println!(
        "(c) decisions per second ({rounds} interleaved waves per point; {SERVICE_THREADS} service threads, {WORKERS} system worker threads):"
    );
    println!(
        "(c) {:>11} {:>8} {:>12} {:>12} {:>12} {:>14} {:>15} {:>26}",
        "concurrent",
        "latency",
        "inverted",
        "work-item",
        "blocking",
        "inv/blocking",
        "inv/work-item",
        "cpu µs/decision inv/wi/bl"
    );
    for latency in SERVICE_LATENCIES {
        for concurrency in CONCURRENCY {
            let headline = concurrency == 64 && latency == Duration::from_millis(1);
            let mut loads: Vec<Load> = designs
                .iter()
                .map(|&design| Load::start(workload(design, concurrency, latency)))
                .collect();
            if headline {
                loads.push(Load::start(LoadConfig {
                    workers: MORE_WORKERS,
                    ..workload(Design::WorkItem, concurrency, latency)
                }));
            }
            // Warm-up, not counted: the threads started and the allocator's pools filled.
            for load in &loads {
                load.wave();
                load.machine().reset_blocked_max();
            }
            let mut time = [Duration::ZERO; 4];
            let mut cpu = [Duration::ZERO; 4];
            let mut denied = [0usize; 4];
            for round in 0..rounds {
                for k in 0..loads.len() {
                    let i = (round + k) % loads.len();
                    let wave = loads[i].wave();
                    time[i] += wave.elapsed;
                    cpu[i] += wave.cpu;
                    denied[i] += wave.denied;
                }
            }
            let per_design = (rounds * loads[0].connections_per_wave()) as f64;
            let rate: Vec<f64> = time[..loads.len()]
                .iter()
                .map(|t| per_design / t.as_secs_f64())
                .collect();
            let cpu_per_decision: Vec<f64> = cpu[..loads.len()]
                .iter()
                .map(|c| c.as_secs_f64() * 1e6 / per_design)
                .collect();
            for (i, load) in loads.iter().enumerate().take(designs.len()) {
                blocked_workers[i] = blocked_workers[i].max(load.machine().blocked_workers_max());
                blocked_classifying[i] =
                    blocked_classifying[i].max(load.machine().blocked_classifying_max());
            }
            for (i, load) in loads.into_iter().enumerate() {
                load.finish();
                assert_eq!(
                    denied[i],
                    0,
                    "{}: the service allows every connection",
                    designs
                        .get(i)
                        .map_or("work-item (more workers)", |d| d.name())
                );
            }
            let over_blocking = rate[0] / rate[2];
            let over_work_item = rate[0] / rate[1];
            if over_blocking < min_over_blocking {
                cpu_at_min = Some((
                    concurrency,
                    latency,
                    cpu_per_decision[0] / cpu_per_decision[2],
                ));
            }
            min_over_blocking = min_over_blocking.min(over_blocking);
            if headline {
                over_work_item_64_1ms = Some(over_work_item);
                more_workers_64_1ms = Some((rate[3], rate[0] / rate[3]));
            }
            println!(
                "(c) {concurrency:>11} {:>5} µs {:>12.0} {:>12.0} {:>12.0} {over_blocking:>14.2} {over_work_item:>15.2} {:>10.1} {:>7.1} {:>7.1}",
                latency.as_micros(),
                rate[0],
                rate[1],
                rate[2],
                cpu_per_decision[0],
                cpu_per_decision[1],
                cpu_per_decision[2],
            );
        }
    }
    let (more_workers_rate, over_more_workers) =
        more_workers_64_1ms.expect("the point is measured");
    let (min_concurrency, min_latency, cpu_over_blocking_at_min) =
        cpu_at_min.expect("every point is measured");
    println!(
        "(c) at the smallest inverted / blocking ({min_concurrency} concurrent, {} µs), the inverted design used {cpu_over_blocking_at_min:.2} × the blocking design's CPU time per decision",
        min_latency.as_micros()
    );
    println!(
        "(c) at 64 concurrent, 1 ms, the work item design with {MORE_WORKERS} system worker threads: {more_workers_rate:.0} a second (inverted / it = {over_more_workers:.2})"
    );
    for (i, design) in designs.iter().enumerate() {
        println!(
            "(c) {}: at most {} system worker threads and {} classifying threads blocked at once",
            design.name(),
            blocked_workers[i],
            blocked_classifying[i],
        );
    }

    let per_question =
        firewall_bench::firewall::pool_per_outstanding_question(AskVia::Channel, MEMORY_QUESTIONS);
    let per_question_work_item = firewall_bench::firewall::pool_per_outstanding_question(
        AskVia::PortAndWorkItem,
        MEMORY_QUESTIONS,
    );
    println!(
        "(c) non-paged pool per outstanding question ({MEMORY_QUESTIONS} outstanding): inverted {per_question} bytes, work-item {per_question_work_item} bytes"
    );

    let figures = [
        format!("memory bytes-per-outstanding-question = {per_question}"),
        format!("memory bytes-per-outstanding-question-work-item = {per_question_work_item}"),
        format!(
            "ratio c-inverted-over-workitem-{MORE_WORKERS}-workers-64-1ms = {over_more_workers:.2}"
        ),
        format!(
            "ratio c-cpu-per-decision-inverted-over-blocking-at-min = {cpu_over_blocking_at_min:.2}"
        ),
        format!("blocked-workers-max work-item = {}", blocked_workers[1]),
        format!("blocked-workers-max blocking = {}", blocked_workers[2]),
        format!(
            "blocked-classifying-threads-max blocking = {}",
            blocked_classifying[2]
        ),
    ];
    let finals = [
        format!("ratio c-inverted-over-blocking-min = {min_over_blocking:.2}"),
        format!(
            "ratio c-inverted-over-workitem-64-1ms = {:.2}",
            over_work_item_64_1ms.expect("the point is measured")
        ),
        format!("blocked-workers-max inverted = {}", blocked_workers[0]),
    ];
    if measuring {
        // The run's summary lines so far (see `firewall_bench::summary`): the last bench ends
        // `cargo bench -p firewall-bench` with all of them.
        let exe = std::env::current_exe().expect("the bench binary's path");
        let dir = firewall_bench::summary::dir(&exe);
        firewall_bench::summary::record(&dir, "throughput", &figures, &finals)
            .expect("the summary is written");
        firewall_bench::summary::print(&dir);
    } else {
        for line in figures.iter().chain(&finals) {
            println!("{line}");
        }
    }
}
