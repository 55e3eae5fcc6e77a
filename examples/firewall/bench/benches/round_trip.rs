//! Benchmark (b): the pended decision's round trip — from `Machine::connect` (the
//! classification that pends) to the connection's final decision (the work item asked the
//! service, recorded the verdict and completed the pend; the reauthorization answered) — with
//! 1, 64 and 1024 connections outstanding at once, the service answering at once.
//!
//! Each iteration is a wave: N client threads each open one connection at the same moment
//! (ALE layers at `DISPATCH_LEVEL`); criterion times the waves, and the per-connection round
//! trips give the median and the 99th percentile, which criterion does not report.

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use firewall_bench::Latencies;
use firewall_bench::load::{Design, Load, LoadConfig};
use wfp_rs_sim::AleIrql;

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
    let mut group = c.benchmark_group("b-pended-round-trip");
    group.sampling_mode(SamplingMode::Flat);
    for n in [1usize, 64, 1024] {
        let load = Load::start(LoadConfig {
            design: Design::Pended,
            clients: n,
            per_client: 1,
            ale_irql: AleIrql::Dispatch,
            workers: 2,
            service_threads: 2,
            service_latency: Duration::ZERO,
        });
        let before = firewall_bench::firewall::STATS.snapshot();
        let mut latencies = Latencies::new();
        let (mut waves, mut denied) = (0u64, 0usize);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("connections", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let wave = load.wave();
                    total += wave.elapsed;
                    denied += wave.denied;
                    waves += 1;
                    latencies.extend(wave.latencies);
                }
                total
            })
        });
        // Why a connection would not get the service's verdict: more than `Config::max_pending`
        // connections pended or waiting for their reauthorization at once (overload: its own
        // decision, deny), or (a defect, the default) a verdict lost before its
        // reauthorization.
        let after = firewall_bench::firewall::STATS.snapshot();
        let overloaded = after.overloaded - before.overloaded;
        let defaults = after.defaults - before.defaults;
        let answered = load.finish();
        let p50 = latencies.percentile(50.0).unwrap_or_default();
        let p99 = latencies.percentile(99.0).unwrap_or_default();
        summary.push(format!(
            "(b) N = {n:>4}: round trip p50 = {:>9.1} µs, p99 = {:>9.1} µs over {} connections in {waves} waves; {denied} not permitted ({defaults} defaults, {overloaded} overload); {answered} questions answered",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            latencies.len(),
        ));
    }
    group.finish();
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
