//! Benchmark (c): throughput of the firewall's pended design against the seed's blocking design
//! (`firewall_bench::blocking`: classify waits for the service's reply), same workload, same
//! run: 8 client threads each opening 32 connections one after the other (ALE layers at
//! `PASSIVE_LEVEL`, the only IRQL where the blocking design may wait), a service of 8 threads
//! that takes a fixed time per request (a sleep: 200 µs, then 1 ms) and lets nothing be cached,
//! so every connection asks.
//!
//! The pended design runs its questions on the machine's system worker threads: with 8 (as
//! many as the clients and the service's threads, so both designs may have 8 questions in
//! flight) and with the simulator's default of 2. The ratio is computed from interleaved waves
//! in the same run (see `docs/benchmarks.md`).

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use firewall_bench::load::{Design, Load, LoadConfig};
use wfp_rs_sim::AleIrql;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 32;
const SERVICE_THREADS: usize = 8;
const SERVICE_LATENCIES: [Duration; 2] = [Duration::from_micros(200), Duration::from_millis(1)];

fn workload(design: Design, workers: usize, service_latency: Duration) -> LoadConfig {
    LoadConfig {
        design,
        clients: CLIENTS,
        per_client: PER_CLIENT,
        ale_irql: AleIrql::Passive,
        workers,
        service_threads: SERVICE_THREADS,
        service_latency,
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    if !measuring {
        println!(
            "(criterion's test mode: one small round each; the figures below are not measurements)"
        );
    }
    let mut summary = Vec::new();
    for latency in SERVICE_LATENCIES {
        let variants = [
            ("blocking", workload(Design::Blocking, 2, latency)),
            ("pended-8-workers", workload(Design::Pended, 8, latency)),
            ("pended-2-workers", workload(Design::Pended, 2, latency)),
        ];
        let loads: Vec<(&str, Load)> = variants
            .iter()
            .map(|(name, config)| (*name, Load::start(*config)))
            .collect();

        let micros = latency.as_micros();
        let mut group = c.benchmark_group(format!("c-throughput-service-{micros}us"));
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(Throughput::Elements((CLIENTS * PER_CLIENT) as u64));
        for (name, load) in &loads {
            group.bench_with_input(BenchmarkId::new("design", name), name, |b, _| {
                b.iter_custom(|iters| (0..iters).map(|_| load.wave().elapsed).sum())
            });
        }
        group.finish();

        // The ratio: waves of the designs interleaved (rotating who goes first), so a change in the
        // machine's load over the run hits them alike.
        let rounds = if measuring { 30 } else { 1 };
        let mut time = vec![Duration::ZERO; loads.len()];
        let mut denied = vec![0usize; loads.len()];
        for round in 0..rounds {
            for k in 0..loads.len() {
                let i = (round + k) % loads.len();
                let wave = loads[i].1.wave();
                time[i] += wave.elapsed;
                denied[i] += wave.denied;
            }
        }
        let per_run = (rounds * CLIENTS * PER_CLIENT) as f64;
        let rate: Vec<f64> = time.iter().map(|t| per_run / t.as_secs_f64()).collect();
        for (i, (name, _)) in loads.iter().enumerate() {
            println!(
                "(c) service {micros:>4} µs: {name:<17} {:>8.0} connections/s ({} connections in {rounds} interleaved waves, {:.3} s; {} not permitted)",
                rate[i],
                rounds * CLIENTS * PER_CLIENT,
                time[i].as_secs_f64(),
                denied[i],
            );
        }
        summary.push(format!(
            "ratio (c) pended/blocking, service {micros} µs, 8 workers = {:.2}",
            rate[1] / rate[0]
        ));
        summary.push(format!(
            "ratio (c) pended/blocking, service {micros} µs, 2 workers = {:.2}",
            rate[2] / rate[0]
        ));
        for (name, load) in loads {
            let answered = load.finish();
            println!("(c) service {micros} µs: {name}: the service answered {answered} questions");
        }
    }
    for line in summary {
        println!("{line}");
    }
    c.final_summary();
    if measuring {
        // The run's summary lines so far (see `firewall_bench::summary`): the last bench ends
        // `cargo bench -p firewall-bench` with all of them.
        let exe = std::env::current_exe().expect("the bench binary's path");
        firewall_bench::summary::print(&firewall_bench::summary::dir(&exe));
    }
}
