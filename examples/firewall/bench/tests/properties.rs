//! The example firewall under the simulator's property harness (`wfp_rs_sim::prop`), on both
//! designs (the question channel and the port with work items): random workloads —
//! connections out and in, TCP and UDP, IPv4 and IPv6, from two callers at either IRQL, the
//! service allowing, blocking, answering garbage, staying silent past the deadline, allowing
//! late or hanging up, established connections sending a packet, perhaps after another
//! provider's policy change — and random faults — allocations failing from the Nth allocation
//! of the workload, unload while the callers connect, the service restarted after it hung up,
//! its pending requests cancelled, the clock jumping — each on a machine deterministic in the
//! case's seed.
//! Beside the harness's invariants (every classification decided once, nothing left after
//! unload, no bug check), the firewall's own properties below.
//!
//! Here rather than in firewall-driver's tests: the service runs as a context of the machine
//! through [`ServiceEnd`], the soak's service end (firewall-bench), and firewall-driver cannot
//! depend on firewall-bench, which depends on it.
//!
//! The cache: every reply grants its verdict a cache lifetime, so the driver caches each one,
//! but the harness's process ids are unique per connection and the firewall's cache key has the
//! process id in it, so no verdict may answer another connection of a case: every permit must
//! be the service's allow for that very connection, and a cache hit is a failure
//! (`cache_hits == 0`) unless a policy change reauthorized an established connection, which the
//! firewall answers from the cache.
//!
//! A failure prints the minimal case, its seed and the command that replays it
//! (`WFP_SIM_SEED=<seed>`); `WFP_PROP_CASES=<n>` checks more seeds (`cargo xtask soak --prop`).

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use firewall_bench::service_end::ServiceEnd;
use firewall_driver::{AskVia, Config, Firewall, Stats, StatsSnapshot};
use firewall_protocol::{CacheLifetime, ConnectionReply, ConnectionRequest, Verdict};
use wfp_rs::Status;
use wfp_rs::classify::Action;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::port::Message;
use wfp_rs_sim::Machine;
use wfp_rs_sim::prop::{Answer, Case, ConnectionCase, Generation, Harness, Run, ServiceBody};

/// Seeds checked per design by `cargo test` (about 6 s for both in debug, on two cores); the
/// soak sets `WFP_PROP_CASES`.
const CI_CASES: u64 = 256;

/// More than a case has connections (so no case overloads the driver), and far fewer than
/// [`firewall_driver::VERDICT_SLOTS`]: the channel allocates a slot and a deadline timer per
/// pend it may hold at every load, which would make each case cost 40 times as much.
const MAX_PENDING: usize = 16;

static CHANNEL_STATS: Stats = Stats::new();
static PORT_STATS: Stats = Stats::new();

/// The firewall asking through the question channel: [`Config::DEFAULT`] (fail-closed, a
/// 500 ms deadline — virtual time, so a silent service costs nothing) with counters the
/// properties read.
mod channel {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                stats: Some(&CHANNEL_STATS),
                max_pending: MAX_PENDING,
                ..Config::DEFAULT
            },
        )
    }
}

/// The same firewall asking from work items over the port.
mod port {
    use super::*;

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
        firewall_driver::start(
            irql,
            driver,
            Config {
                ask_via: AskVia::PortAndWorkItem,
                stats: Some(&PORT_STATS),
                max_pending: MAX_PENDING,
                ..Config::DEFAULT
            },
        )
    }
}

fn stats(design: AskVia) -> &'static Stats {
    match design {
        AskVia::Channel => &CHANNEL_STATS,
        AskVia::PortAndWorkItem => &PORT_STATS,
    }
}

/// A question the service was asked, and what came of its answer.
#[derive(Clone, Debug)]
struct Asked {
    pid: u64,
    /// The driver took a valid verdict (the case's allow or block) as the answer.
    took_verdict: bool,
}

/// What the service saw in one case.
#[derive(Debug)]
struct Served {
    asked: Vec<Asked>,
    /// The design's counters when the service started (they count across cases).
    before: StatsSnapshot,
    design: AskVia,
}

/// Every question the service was asked in the case: by the service, and by the service
/// restarted after it hung up.
fn asked(run: &Run<Served>) -> impl Iterator<Item = &Asked> {
    run.service
        .asked
        .iter()
        .chain(run.restarted_service.iter().flat_map(|s| &s.asked))
}

fn times_asked(run: &Run<Served>, pid: u64) -> usize {
    asked(run).filter(|a| a.pid == pid).count()
}

fn took_verdict(run: &Run<Served>, pid: u64) -> bool {
    asked(run).any(|a| a.pid == pid && a.took_verdict)
}

impl Served {
    /// What the driver counted during the case (it has unloaded when the properties run).
    fn counted(&self) -> StatsSnapshot {
        let after = stats(self.design).snapshot();
        let b = &self.before;
        StatsSnapshot {
            cache_hits: after.cache_hits - b.cache_hits,
            asked: after.asked - b.asked,
            asked_via_channel: after.asked_via_channel - b.asked_via_channel,
            asked_via_port: after.asked_via_port - b.asked_via_port,
            answered: after.answered - b.answered,
            defaults: after.defaults - b.defaults,
            loopback: after.loopback - b.loopback,
            cached: after.cached - b.cached,
            expired: after.expired - b.expired,
            evicted: after.evicted - b.evicted,
            revoked: after.revoked - b.revoked,
            not_cached_revoked: after.not_cached_revoked - b.not_cached_revoked,
            background_asks: after.background_asks - b.background_asks,
            background_skipped: after.background_skipped - b.background_skipped,
            overloaded: after.overloaded - b.overloaded,
            unaskable: after.unaskable - b.unaskable,
            policy_changes: after.policy_changes - b.policy_changes,
            established_kept: after.established_kept - b.established_kept,
            inbound_pended: after.inbound_pended - b.inbound_pended,
            reinjected: after.reinjected - b.reinjected,
            clones_dropped: after.clones_dropped - b.clones_dropped,
            own_reinjections: after.own_reinjections - b.own_reinjections,
            inbound_not_pended: after.inbound_not_pended - b.inbound_not_pended,
        }
    }
}

fn encode(reply: ConnectionReply) -> Vec<u8> {
    let mut out = vec![0u8; ConnectionReply::MAX_LEN];
    let len = reply.encode(&mut out).expect("a reply fits");
    out.truncate(len);
    out
}

/// A reply the driver must refuse, each an allow that would let the connection through if the
/// driver took it: the right reply for another request, the valid allow cut short, or with a
/// wrong magic (by the process id, so a case replays).
fn malformed(request: &ConnectionRequest) -> Vec<u8> {
    let valid = encode(request.reply(Verdict::Allow));
    match request.process_id % 3 {
        0 => encode(ConnectionReply::allow(request.request_id.wrapping_add(1))),
        1 => valid[..valid.len() - 1].to_vec(),
        _ => [b"XXXX".as_slice(), &valid[4..]].concat(),
    }
}

/// The service on `design`: answers each question as the case says for its process, granting
/// every verdict a cache lifetime (a delayed allow after the case's delay, doing nothing else
/// meanwhile); ends when the driver closes the connection (unload), when user mode cancels its
/// requests, or when it hangs up. Restarted while the driver unloads, it finds nothing to
/// connect to and ends at once.
fn service<'m>(machine: &'m Machine, case: &Case, design: AskVia) -> ServiceBody<'m, Served> {
    let before = stats(design).snapshot();
    let Ok(mut end) = ServiceEnd::connect(machine, design) else {
        return Box::new(move || Served {
            asked: Vec::new(),
            before,
            design,
        });
    };
    let case = case.clone();
    Box::new(move || {
        let mut asked = Vec::new();
        let lifetime = CacheLifetime::from_secs(60).expect("a valid lifetime");
        while let Ok(next) = end.next(Duration::from_millis(100)) {
            let Some(question) = next else { continue };
            let request =
                ConnectionRequest::decode(question.data()).expect("the driver's encoding");
            let pid = request.process_id;
            let (bytes, verdict) = match case.answer_for(pid) {
                Some(Answer::Allow) => (
                    encode(request.reply(Verdict::Allow).cached_for(lifetime)),
                    true,
                ),
                Some(Answer::Block) => (
                    encode(request.reply(Verdict::Deny).cached_for(lifetime)),
                    true,
                ),
                Some(Answer::Malformed) => (malformed(&request), false),
                Some(Answer::Delayed) => {
                    machine.sleep(case.reply_delay);
                    (
                        encode(request.reply(Verdict::Allow).cached_for(lifetime)),
                        true,
                    )
                }
                Some(Answer::Silent) => {
                    asked.push(Asked {
                        pid,
                        took_verdict: false,
                    });
                    continue;
                }
                Some(Answer::Hangup) | None => {
                    asked.push(Asked {
                        pid,
                        took_verdict: false,
                    });
                    // Killed: the port connection and the channel's handle close unanswered.
                    drop(end);
                    return Served {
                        asked,
                        before,
                        design,
                    };
                }
            };
            // Refused or disconnected: the driver decided without this reply.
            let took = end.reply(&question, &bytes).unwrap_or(false);
            asked.push(Asked {
                pid,
                took_verdict: verdict && took,
            });
        }
        Served {
            asked,
            before,
            design,
        }
    })
}

fn permitted(outcome: &wfp_rs_sim::ConnectOutcome) -> bool {
    outcome.decision.action == Action::Permit
}

/// Whether the firewall's filter met the connection: its first classification at its
/// authorization layer was the filter's. Only a connection made after an unload deleted the
/// filters is not, and nothing filters it then.
fn seen_by_the_firewall(c: &ConnectionCase, outcome: &wfp_rs_sim::ConnectOutcome) -> bool {
    let layer = match (c.inbound, c.ipv6) {
        (false, false) => "ALE_AUTH_CONNECT_V4",
        (false, true) => "ALE_AUTH_CONNECT_V6",
        (true, false) => "ALE_AUTH_RECV_ACCEPT_V4",
        (true, true) => "ALE_AUTH_RECV_ACCEPT_V6",
    };
    outcome
        .layers
        .iter()
        .find(|(l, _)| *l == layer)
        .is_some_and(|(_, d)| d.filter_id.is_some())
}

/// Fail-closed, exactly: a connection the firewall met is permitted only if the service's
/// allow for that very connection was taken (no cached verdict of another connection, no
/// default, no malformed reply lets it through); and, without allocation failures, a verdict
/// the driver took is the connection's decision. Only an unload leaves connections the
/// firewall does not meet.
fn only_what_the_service_allowed(run: &Run<Served>) -> Result<(), String> {
    let allocation_faults = !run.case.faults.allocation_failures.is_empty();
    for (c, outcome) in &run.outcomes {
        let took = took_verdict(run, c.pid);
        if !seen_by_the_firewall(c, outcome) {
            if !run.case.faults.unload_while_connecting {
                return Err(format!(
                    "pid {}: never met the firewall's filter, without an unload: {outcome:?}",
                    c.pid
                ));
            }
            continue;
        }
        let allows = matches!(c.answer, Answer::Allow | Answer::Delayed);
        if permitted(outcome) && !(allows && took) {
            return Err(format!(
                "pid {} permitted; the service was to answer {:?}, and its verdict was {}taken",
                c.pid,
                c.answer,
                if took { "" } else { "not " }
            ));
        }
        if took && !allocation_faults {
            let expected = if allows {
                Action::Permit
            } else {
                Action::Block
            };
            if outcome.decision.action != expected {
                return Err(format!(
                    "pid {}: the driver took the service's {:?}, but decided {:?}",
                    c.pid, c.answer, outcome.decision.action
                ));
            }
        }
    }
    Ok(())
}

/// The service is asked at most once per connection (an inbound attempt's reinjected packet is
/// the driver's own and is not asked about again), and once more if a policy change
/// reauthorized it established (the firewall keeps it and asks again in the background when
/// the cache has no verdict); without faults and with the service staying and prompt, every
/// connection, inbound first attempts included, is pended, asked about once and gets the
/// service's verdict (its allow or block; the default, block, for a malformed reply or
/// silence).
fn the_services_verdict(run: &Run<Served>) -> Result<(), String> {
    let most = if run.case.changes_policy() { 2 } else { 1 };
    for (c, _) in &run.outcomes {
        if times_asked(run, c.pid) > most {
            return Err(format!(
                "pid {}: asked {} times",
                c.pid,
                times_asked(run, c.pid)
            ));
        }
    }
    if !run.case.faults.is_empty()
        || run.case.service_hangs_up()
        || run.case.service_delays()
        || run.case.changes_policy()
    {
        return Ok(());
    }
    for (c, outcome) in &run.outcomes {
        let expected = if c.answer == Answer::Allow {
            Action::Permit
        } else {
            Action::Block
        };
        if !outcome.pended || outcome.decision.action != expected {
            return Err(format!(
                "pid {} (answer {:?}, inbound {}): pended {}, decided {:?}",
                c.pid, c.answer, c.inbound, outcome.pended, outcome.decision.action
            ));
        }
        if times_asked(run, c.pid) != 1 {
            return Err(format!(
                "pid {}: asked {} times",
                c.pid,
                times_asked(run, c.pid)
            ));
        }
    }
    Ok(())
}

/// The driver's counters agree with the outcomes.
fn the_counters_agree(run: &Run<Served>) -> Result<(), String> {
    let s = run.service.counted();
    let check = |what: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!("{what}: {s:?}"))
        }
    };
    let count = |f: &dyn Fn(&ConnectionCase, &wfp_rs_sim::ConnectOutcome) -> bool| {
        run.outcomes.iter().filter(|(c, o)| f(c, o)).count() as u64
    };
    // Every key differs (process ids are unique), nothing is loopback, nothing overloads; only
    // a policy change's reauthorizations are answered from the cache or asked in the background.
    check(
        "no loopback, overload or unaskable path",
        s.loopback == 0 && s.overloaded == 0 && s.unaskable == 0,
    )?;
    if !run.case.changes_policy() {
        check(
            "no cache hit or background ask without a policy change",
            s.cache_hits == 0 && s.background_asks == 0 && s.established_kept == 0,
        )?;
    }
    let (this, other) = match run.service.design {
        AskVia::Channel => (s.asked_via_channel, s.asked_via_port),
        AskVia::PortAndWorkItem => (s.asked_via_port, s.asked_via_channel),
    };
    check(
        "asked only through the configured design",
        other == 0 && this == s.asked,
    )?;
    check(
        "every valid verdict taken is counted as answered",
        s.answered == asked(run).filter(|a| a.took_verdict).count() as u64,
    )?;
    check(
        "inbound_pended = reinjected + clones_dropped",
        s.inbound_pended == s.reinjected + s.clones_dropped,
    )?;
    check(
        "every pended inbound attempt permitted is a reinjected clone",
        s.reinjected == count(&|c, o| c.inbound && o.pended && permitted(o)),
    )?;
    check(
        "every pended inbound attempt is counted",
        s.inbound_pended == count(&|c, o| c.inbound && o.pended),
    )?;
    if !run.case.faults.is_empty()
        || run.case.service_hangs_up()
        || run.case.service_delays()
        || run.case.changes_policy()
    {
        return Ok(());
    }
    let answered = |a: Answer| count(&|c, _| c.answer == a);
    check(
        "without faults: each connection asked once, by its own question",
        s.asked == run.outcomes.len() as u64,
    )?;
    check(
        "without faults: answered = allows + blocks, defaults = malformed + silent",
        s.answered == answered(Answer::Allow) + answered(Answer::Block)
            && s.defaults == answered(Answer::Malformed) + answered(Answer::Silent),
    )?;
    check(
        "without faults: every verdict cached, and each reinjected clone met once",
        s.cached == s.answered && s.own_reinjections == s.reinjected,
    )
}

/// Another provider's policy change does not cut a connection the firewall let through: its
/// reauthorization is answered from the cache (the service's allow, cached for a minute), or,
/// when the cache has no verdict (expired by a clock jump, or never stored for lack of memory),
/// the connection is kept while the service is asked again in the background (crate
/// documentation, "Established connections"; a deny would cut it at its next packet, and each
/// connection sends one). A connection established after an unload is not the firewall's.
/// (The workloads reach the cache's answer; the kept-while-asked path needs the cache to lose
/// the verdict between a connection and its packet, which they rarely do: firewall-driver's
/// tests cover it.)
fn a_policy_change_keeps_what_the_firewall_let_through(run: &Run<Served>) -> Result<(), String> {
    for (c, packet) in &run.packets {
        if packet.cut {
            return Err(format!(
                "pid {} (answer {:?}, data {:?}): its flow was cut by a reauthorization",
                c.pid, c.answer, c.data
            ));
        }
    }
    Ok(())
}

/// The log (crate documentation, "Logging"): every question the driver pended and asked
/// (`firewall: #<id>: …: pended, asking the service`) is followed by exactly one decision line
/// for its request id (`firewall: #<id>: allow (service…)`, `… deny (default: <reason>)`, …).
fn each_question_logs_one_decision(run: &Run<Served>) -> Result<(), String> {
    let id_and_rest = |line: &str| -> Option<(u64, String)> {
        let rest = line.strip_prefix("firewall: #")?;
        let (id, rest) = rest.split_once(": ")?;
        Some((id.parse().ok()?, rest.trim_end().to_owned()))
    };
    let lines: Vec<(u64, String)> = run
        .debug_output
        .iter()
        .filter_map(|l| id_and_rest(l))
        .collect();
    for (id, _) in lines
        .iter()
        .filter(|(_, rest)| rest.ends_with(": pended, asking the service"))
    {
        let decisions: Vec<&String> = lines
            .iter()
            .filter(|(other, rest)| {
                other == id && (rest.starts_with("allow ") || rest.starts_with("deny "))
            })
            .map(|(_, rest)| rest)
            .collect();
        if decisions.len() != 1 {
            return Err(format!(
                "request #{id} was pended and asked, and logged {} decisions: {decisions:?}",
                decisions.len()
            ));
        }
    }
    Ok(())
}

fn cases() -> u64 {
    std::env::var("WFP_PROP_CASES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(CI_CASES)
}

/// Whether a connection of the case has `f`.
fn any(
    run: &Run<Served>,
    f: impl Fn(&ConnectionCase, &wfp_rs_sim::ConnectOutcome) -> bool,
) -> bool {
    run.outcomes.iter().any(|(c, o)| f(c, o))
}

fn check_design(design: AskVia) {
    let entry: wfp_rs_sim::DriverEntryFn = match design {
        AskVia::Channel => channel::DriverEntry,
        AskVia::PortAndWorkItem => port::DriverEntry,
    };
    Harness::new("firewall", entry, move |machine, case| {
        service(machine, case, design)
    })
    .generation(Generation {
        // The firewall filters UDP as well as TCP.
        udp: true,
        ..Generation::default()
    })
    .property(
        "fail-closed: only what the service allowed",
        only_what_the_service_allowed,
    )
    .property(
        "each connection asked once, and the service's verdict without faults",
        the_services_verdict,
    )
    .property("the driver's counters agree", the_counters_agree)
    .property(
        "a policy change keeps what the firewall let through",
        a_policy_change_keeps_what_the_firewall_let_through,
    )
    .property(
        "each question logs one decision",
        each_question_logs_one_decision,
    )
    // What the workloads and faults must reach, or the properties above hold vacuously.
    .effect("a pended outbound connection", |run| {
        any(run, |c, o| !c.inbound && o.pended)
    })
    .effect("a pended inbound attempt", |run| {
        any(run, |c, o| c.inbound && o.pended)
    })
    .effect("a reinjected inbound attempt", |run| {
        any(run, |c, o| c.inbound && o.pended && permitted(o))
    })
    .effect("a pended UDP connection", |run| {
        any(run, |c, o| c.udp && o.pended)
    })
    .effect("a pended IPv6 connection", |run| {
        any(run, |c, o| c.ipv6 && o.pended)
    })
    .effect("a malformed reply refused", |run| {
        any(run, |c, o| {
            c.answer == Answer::Malformed && times_asked(run, c.pid) > 0 && !permitted(o)
        })
    })
    .effect("a silent service's question decided", |run| {
        any(run, |c, o| {
            c.answer == Answer::Silent && times_asked(run, c.pid) > 0 && !permitted(o)
        })
    })
    // An allow that a fault (an allocation failure, the unload, a hang-up before it) turned
    // into the default.
    .effect("an allow a fault turned into a block", |run| {
        any(run, |c, o| c.answer == Answer::Allow && !permitted(o))
    })
    // Decided without asking: unloading, no service, or could not pend, clone or queue.
    .effect("a connection decided without asking", |run| {
        any(run, |_, o| !o.pended)
    })
    .effect("the service hanging up on a question", |run| {
        run.service
            .asked
            .iter()
            .any(|a| run.case.answer_for(a.pid) == Some(Answer::Hangup))
    })
    // Where every connection must get the service's verdict.
    .effect("neither faults nor a hang-up", |run| {
        run.case.faults.is_empty() && !run.case.service_hangs_up()
    })
    .effect(
        "an established connection reauthorized by a policy change",
        |run| {
            run.packets
                .iter()
                .any(|(c, p)| c.data == wfp_rs_sim::prop::Data::AfterPolicyChange && !p.cut)
        },
    )
    .effect("a question to the restarted service", |run| {
        run.restarted_service
            .as_ref()
            .is_some_and(|s| !s.asked.is_empty())
    })
    .effect("a late allow refused", |run| {
        any(run, |c, o| {
            c.answer == Answer::Delayed
                && run.case.reply_delay > Config::DEFAULT.timeout
                && times_asked(run, c.pid) > 0
                && !permitted(o)
        })
    })
    .assert_holds(0..cases());
}

#[test]
fn the_channel_design_keeps_its_properties_over_random_workloads_and_faults() {
    check_design(AskVia::Channel);
}

#[test]
fn the_port_design_keeps_its_properties_over_random_workloads_and_faults() {
    check_design(AskVia::PortAndWorkItem);
}
