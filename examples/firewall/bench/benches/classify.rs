//! Benchmark (a): a cache-hit classification through the SDK's `classify_trampoline` (the
//! firewall driver's own outbound callout) against a raw C-style classifyFn doing the same
//! lookup (`firewall_bench::raw_lookup`), both registered with the simulated filter engine.
//!
//! Two views: **direct** (`wfp_rs_sim::DirectClassify`: the engine's call of the classifyFn
//! alone, with structures prepared once) and **engine** (`Machine::classify`: filter matching
//! and arbitration included, the same for both). The ratio is computed from interleaved rounds
//! in the same run (see `docs/benchmarks.md`).
//!
//! Then the figures that do not depend on the machine's load: the instructions per hit of each
//! classifyFn, counted by callgrind (`firewall_bench::callgrind`: this binary runs itself under
//! valgrind), and the non-paged pool per cached verdict. They end the output as summary lines
//! (`firewall_bench::summary`): `memory bytes-per-cached-verdict = N` and
//! `ratio a-instructions-sdk-over-raw = X`.

#![cfg(any(not(windows), feature = "sim"))]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use firewall_bench::hit::{self, HitMachine, Variant};
use firewall_bench::{callgrind, summary};
use wfp_rs::classify::Action;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs_sim::DirectClassify;

/// Calls `direct` `n` times at `DISPATCH_LEVEL` in `machine`; the time taken.
fn direct_calls(m: &HitMachine, direct: &mut DirectClassify<AleAuthConnectV4>, n: u64) -> Duration {
    m.machine().at_dispatch(|irql| {
        let began = Instant::now();
        for _ in 0..n {
            black_box(direct.call(irql));
        }
        began.elapsed()
    })
}

/// Classifies through the engine `n` times; the time taken.
fn engine_calls(m: &HitMachine, n: u64) -> Duration {
    let request = hit::request(2);
    let began = Instant::now();
    for _ in 0..n {
        black_box(m.classify(black_box(&request)));
    }
    began.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ns per call, median over `rounds` rounds that alternate the two variants (so drift in the
/// machine's load hits both alike).
fn interleaved(
    rounds: usize,
    mut ours: impl FnMut() -> f64,
    mut raw: impl FnMut() -> f64,
) -> (f64, f64) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, too.
        if round % 2 == 0 {
            a.push(ours());
            b.push(raw());
        } else {
            b.push(raw());
            a.push(ours());
        }
    }
    (median(a), median(b))
}

fn main() {
    if firewall_bench::callgrind::child() {
        return;
    }
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    if !measuring {
        println!(
            "(criterion's test mode: one small round each; the figures below are not measurements)"
        );
    }
    let sdk = HitMachine::start(Variant::Sdk);
    let raw = HitMachine::start(Variant::Raw);
    let (sdk_hits, raw_hits) = (sdk.hits(), raw.hits());
    let mut sdk_direct = sdk.direct();
    let mut raw_direct = raw.direct();
    for (m, d) in [(&sdk, &mut sdk_direct), (&raw, &mut raw_direct)] {
        assert_eq!(m.machine().at_dispatch(|irql| d.call(irql)), Action::Permit);
    }

    let mut group = c.benchmark_group("a-cache-hit-direct");
    group.bench_function("sdk-trampoline", |b| {
        b.iter_custom(|n| direct_calls(&sdk, &mut sdk_direct, n))
    });
    group.bench_function("raw-classifyFn", |b| {
        b.iter_custom(|n| direct_calls(&raw, &mut raw_direct, n))
    });
    group.finish();
    let mut group = c.benchmark_group("a-cache-hit-engine");
    group.bench_function("sdk-trampoline", |b| {
        b.iter_custom(|n| engine_calls(&sdk, n))
    });
    group.bench_function("raw-classifyFn", |b| {
        b.iter_custom(|n| engine_calls(&raw, n))
    });
    group.finish();

    let (rounds, direct_block, engine_block) = if measuring {
        (41, 20_000, 2_000)
    } else {
        (3, 100, 10)
    };
    let (ours, base) = interleaved(
        rounds,
        || {
            direct_calls(&sdk, &mut sdk_direct, direct_block).as_nanos() as f64
                / direct_block as f64
        },
        || {
            direct_calls(&raw, &mut raw_direct, direct_block).as_nanos() as f64
                / direct_block as f64
        },
    );
    println!(
        "(a) cache-hit classify, direct: sdk-trampoline {ours:.1} ns, raw-classifyFn {base:.1} ns (median of {rounds} interleaved rounds of {direct_block} calls)"
    );
    println!("ratio (a) ours/raw, direct = {:.2}", ours / base);
    let (ours, base) = interleaved(
        rounds,
        || engine_calls(&sdk, engine_block).as_nanos() as f64 / engine_block as f64,
        || engine_calls(&raw, engine_block).as_nanos() as f64 / engine_block as f64,
    );
    println!(
        "(a) cache-hit classify, through Machine::classify: sdk-trampoline {ours:.0} ns, raw-classifyFn {base:.0} ns (median of {rounds} interleaved rounds of {engine_block} calls)"
    );
    println!("ratio (a) ours/raw, engine = {:.2}", ours / base);

    // Every call above was a hit (a miss would be the default, deny).
    let sdk_calls = sdk.hits() - sdk_hits;
    let raw_calls = raw.hits() - raw_hits;
    assert!(sdk_calls > 0 && raw_calls > 0);
    println!("(a) cache hits counted: sdk {sdk_calls}, raw {raw_calls}");
    drop((sdk_direct, raw_direct));
    sdk.finish();
    raw.finish();
    c.final_summary();

    let memory = firewall_bench::firewall::pool_per_cached_verdict();
    println!(
        "(a) non-paged pool per cached verdict: {memory} bytes ({} verdicts, the default capacity, in one allocation)",
        firewall_driver::DEFAULT_CACHE_CAPACITY
    );
    let exe = std::env::current_exe().expect("the bench binary's path");
    let dir = summary::dir(&exe);
    let instructions = match callgrind::measure(&exe, &dir) {
        Ok(per_hit) => per_hit,
        // `cargo test --benches` need not have valgrind; a measurement must.
        Err(error) if !measuring => {
            println!("(a) instructions per hit not counted: {error}");
            return;
        }
        Err(error) => panic!("(a) instructions per hit: {error}"),
    };
    println!(
        "(a) instructions per cache hit, classifyFn and everything it calls (callgrind; ({} - {} calls) / {}): sdk-trampoline {:.1}, raw-classifyFn {:.1}, difference {:.1}",
        callgrind::LARGE,
        callgrind::SMALL,
        callgrind::LARGE - callgrind::SMALL,
        instructions.sdk,
        instructions.raw,
        instructions.sdk - instructions.raw,
    );
    let figures = [format!("memory bytes-per-cached-verdict = {memory}")];
    let finals = [format!(
        "ratio a-instructions-sdk-over-raw = {:.3}",
        instructions.ratio()
    )];
    if measuring {
        summary::record(&dir, "classify", &figures, &finals).expect("the summary is written");
        summary::print(&dir);
    } else {
        // Counted the same way in criterion's test mode, but not recorded as a run's figures.
        for line in figures.iter().chain(&finals) {
            println!("{line}");
        }
    }
}
