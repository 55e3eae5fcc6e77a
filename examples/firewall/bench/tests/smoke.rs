//! The benchmarks' scenarios, once each and small, so `cargo test` keeps them working: every
//! classification hits the cache it is meant to hit, every connection gets the service's
//! verdict, and every machine unloads clean. (The measurements themselves: `cargo bench -p
//! firewall-bench`.)

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use firewall_bench::hit::{self, HitMachine, Variant};
use firewall_bench::load::{Design, Load, LoadConfig};
use wfp_rs::classify::Action;
use wfp_rs_sim::AleIrql;

#[test]
fn both_callouts_answer_from_their_cache_directly_and_through_the_engine() {
    for variant in [Variant::Sdk, Variant::Raw] {
        let m = HitMachine::start(variant);
        let before = m.hits();
        let mut direct = m.direct();
        m.machine().at_dispatch(|irql| {
            for _ in 0..100 {
                assert_eq!(direct.call(irql), Action::Permit, "{variant:?}");
            }
        });
        m.machine().at_passive(|irql| {
            assert_eq!(direct.call(irql), Action::Permit, "{variant:?} at passive");
        });
        drop(direct);
        let request = hit::request(3);
        for _ in 0..10 {
            assert_eq!(m.classify(&request), Action::Permit, "{variant:?}");
        }
        // Hits, not defaults (the default is deny) nor loopback.
        assert_eq!(
            m.hits() - before,
            111,
            "{variant:?}: every call hit the cache"
        );
        m.finish();
    }
}

#[test]
fn every_design_decides_every_connection_of_a_wave() {
    for (design, ale_irql) in [
        (Design::Inverted, AleIrql::Dispatch),
        (Design::Inverted, AleIrql::Passive),
        (Design::WorkItem, AleIrql::Dispatch),
        (Design::WorkItem, AleIrql::Passive),
        (Design::Blocking, AleIrql::Passive),
    ] {
        let load = Load::start(LoadConfig {
            design,
            clients: 4,
            per_client: 3,
            ale_irql,
            workers: 2,
            service_threads: 2,
            service_latency: Duration::from_micros(50),
            service_outstanding: 2,
        });
        for _ in 0..2 {
            let wave = load.wave();
            assert_eq!(wave.latencies.len(), 12, "{design:?}");
            // Every connection pends, except in the blocking design.
            let pended = if design == Design::Blocking { 0 } else { 12 };
            assert_eq!(wave.round_trips.len(), pended, "{design:?}");
            assert_eq!(wave.denied, 0, "{design:?}: the service allows everything");
        }
        assert_eq!(load.finish(), 24, "{design:?}: every connection asked once");
    }
}

#[test]
fn only_the_work_item_design_blocks_system_worker_threads() {
    // More clients than service threads and worker threads, so questions queue everywhere.
    let blocked = |design: Design| {
        let load = Load::start(LoadConfig {
            design,
            clients: 16,
            per_client: 4,
            ale_irql: AleIrql::Passive,
            workers: 4,
            service_threads: 4,
            service_latency: Duration::from_micros(100),
            service_outstanding: 4,
        });
        let wave = load.wave();
        assert_eq!(wave.denied, 0, "{design:?}");
        let machine = load.machine();
        let counts = (
            machine.blocked_workers_max(),
            machine.blocked_classifying_max(),
        );
        load.finish();
        counts
    };
    let (workers, classifying) = blocked(Design::Inverted);
    assert_eq!(
        (workers, classifying),
        (0, 0),
        "the inverted call holds no thread"
    );
    let (workers, classifying) = blocked(Design::WorkItem);
    // Every question waits in FltSendMessage on a worker thread: at least one, at most all 4.
    assert!((1..=4).contains(&workers), "work item: {workers} workers");
    assert_eq!(
        classifying, 0,
        "the work item design's classifyFn returns at once"
    );
    let (workers, classifying) = blocked(Design::Blocking);
    assert_eq!(workers, 0, "the blocking design runs no work item");
    assert!(
        (1..=16).contains(&classifying),
        "blocking: {classifying} classifying threads"
    );
}

#[test]
fn the_pool_per_outstanding_question_is_the_same_for_every_question() {
    use firewall_driver::AskVia;
    for via in [AskVia::Channel, AskVia::PortAndWorkItem] {
        let (few, more) = (
            firewall_bench::firewall::pool_per_outstanding_question(via, 4),
            firewall_bench::firewall::pool_per_outstanding_question(via, 12),
        );
        assert_eq!(few, more, "{via:?}: per question, however many");
        assert_eq!(few.fract(), 0.0, "{via:?}: whole bytes per question: {few}");
    }
}

#[test]
fn the_firewall_holds_64_bytes_of_pool_per_cached_verdict() {
    let measured = firewall_bench::firewall::pool_per_cached_verdict();
    assert_eq!(measured, firewall_driver::cache::BYTES_PER_VERDICT as f64);
    assert!(
        measured <= 64.0,
        "issue 11: at most 64 bytes per cached verdict"
    );
}

#[test]
fn the_summary_prints_this_invocations_figures_then_final_lines_in_bench_order() {
    use firewall_bench::summary;
    let dir = std::env::temp_dir().join(format!("firewall-bench-summary-{}", std::process::id()));
    // A file of another invocation is skipped.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("round_trip.summary"),
        "invocation 0\nratio stale = 1\n",
    )
    .unwrap();
    summary::record(
        &dir,
        "throughput",
        &["memory q = 1".to_owned()],
        &["ratio c = 2".to_owned()],
    )
    .unwrap();
    summary::record(
        &dir,
        "classify",
        &["memory m = 64".to_owned()],
        &["ratio a = 1.05".to_owned()],
    )
    .unwrap();
    // Every figure first, then the final lines, each in the benches' order.
    assert_eq!(
        summary::collect(&dir),
        [
            "memory m = 64",
            "memory q = 1",
            "ratio a = 1.05",
            "ratio c = 2"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_summary_goes_under_the_target_directory() {
    let exe = std::path::Path::new("/work/target/release/deps/classify-0123");
    assert_eq!(
        firewall_bench::summary::dir(exe),
        std::path::Path::new("/work/target/firewall-bench")
    );
}

#[test]
fn a_small_soak_decides_every_connection_and_leaves_nothing_on_both_designs() {
    use firewall_bench::soak::{self, SoakConfig};
    use firewall_driver::AskVia;

    for design in [AskVia::Channel, AskVia::PortAndWorkItem] {
        let config = SoakConfig {
            connections: 3 * soak::PHASE / 2,
            seed: 0x50A4,
            clients: 4,
            phase: soak::PHASE,
            design,
            deterministic: false,
        };
        let report = soak::run(config, &|_| {}).unwrap_or_else(|failure| panic!("{failure}"));
        eprintln!("{report}");
        assert_eq!(report.permitted + report.blocked, config.connections);
        assert!(report.permitted > 0 && report.blocked > 0, "{report}");
        assert!(
            report.pended_outbound > 0 && report.pended_inbound > 0,
            "{report}"
        );
        assert!(report.checked_answers > 0, "{report}");
        assert!(report.garbage_replies > 0, "{report}");
        assert_eq!(
            (
                report.leaked_pool_blocks,
                report.leaked_io_requests,
                report.leaked_pends
            ),
            (0, 0, 0)
        );
    }
}

/// The soak on deterministic machines (issue 13): the firewall, its service (killed and
/// restarted at random, replying garbage, stalling past the timeout), three client contexts
/// and, in one phase in five, allocation failures, all scheduled by the seed in virtual time.
/// Every run checks that every connection is decided once, by the rules or the default, that
/// every decision the service's valid answer reached is that answer, and that nothing is left
/// after unload; a second run of each seed must give the same schedule and the same figures.
/// A failure prints the seed and the command that replays it (`WFP_SIM_SEED`).
#[test]
fn on_deterministic_machines_the_soak_decides_every_connection_and_one_seed_replays() {
    use firewall_bench::soak::{self, SoakConfig, SoakReport};
    use firewall_driver::AskVia;

    const SEEDS: u64 = 3;
    let mut all: Vec<SoakReport> = Vec::new();
    wfp_rs_sim::for_each_seed(0..SEEDS, |seed| {
        for design in [AskVia::Channel, AskVia::PortAndWorkItem] {
            let config = SoakConfig {
                connections: 300,
                seed,
                clients: 3,
                phase: 50,
                design,
                deterministic: true,
            };
            let report = soak::run(config, &|_| {}).unwrap_or_else(|failure| panic!("{failure}"));
            assert_eq!(report.permitted + report.blocked, config.connections);
            assert!(report.permitted > 0 && report.blocked > 0, "{report}");
            assert_eq!(
                (
                    report.leaked_pool_blocks,
                    report.leaked_io_requests,
                    report.leaked_pends
                ),
                (0, 0, 0)
            );
            eprintln!("{report}");
            let schedule = report.schedule.expect("a deterministic run has a schedule");
            assert!(schedule.steps > config.connections, "{report}");
            let again = soak::run(config, &|_| {}).unwrap_or_else(|failure| panic!("{failure}"));
            assert_eq!(
                again.schedule,
                Some(schedule),
                "seed {seed}, {design:?}: two runs, two schedules"
            );
            let figures = |r: &SoakReport| {
                (
                    [r.permitted, r.blocked, r.pended_outbound, r.pended_inbound],
                    [r.checked_answers, r.answered, r.defaults, r.cache_hits],
                    [r.garbage_replies, r.stalls, r.kills, r.allocation_failures],
                    r.default_reasons.clone(),
                )
            };
            assert_eq!(figures(&again), figures(&report), "seed {seed}, {design:?}");
            all.push(report);
        }
    });
    if all.len() > 2 {
        // Over the seeds, every kind of fault happened and answers were checked.
        let sum = |f: fn(&SoakReport) -> u64| all.iter().map(f).sum::<u64>();
        assert!(sum(|r| r.checked_answers) > 0);
        assert!(sum(|r| r.garbage_replies) > 0, "no garbage reply");
        assert!(sum(|r| r.kills) > 0, "the service was never killed");
        assert!(sum(|r| r.allocation_failures) > 0, "no allocation failed");
        assert!(
            sum(|r| r.defaults) > 0,
            "no connection decided by the default"
        );
        let fingerprints: std::collections::HashSet<_> =
            all.iter().map(|r| r.schedule.map(|s| s.hash)).collect();
        assert_eq!(
            fingerprints.len(),
            all.len(),
            "every seed and design, its own schedule"
        );
    }
}
