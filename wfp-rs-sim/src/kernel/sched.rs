//! Deterministic mode: a cooperative scheduler that decides, from a seed, which simulated
//! context runs next, and a virtual clock.
//!
//! # Why a scheduler of our own, chosen at run time
//!
//! Crates that explore schedules (`shuttle`, `loom`) replace `std`'s threads and locks at compile
//! time, and their primitives work only inside their own runner. Behind a cargo feature that
//! would switch every machine of every test in the workspace build (features unify), including
//! the real-threads tests that measure contention; and the simulator's contexts are host threads
//! that drivers' code runs on unchanged. So the mode is chosen per machine
//! ([`crate::Machine::deterministic`]) and the scheduler is a small one here: every simulated
//! context (the harness thread that made the machine, system worker threads, the DPC thread,
//! threads a test starts with [`crate::Machine::spawn`]) is still a host thread, but it runs
//! only while it holds the machine's *baton*; at a yield point it hands the baton to a task the
//! seeded generator picks and parks until it is handed back.
//!
//! # Tasks, waits and progress
//!
//! A task is `Runnable`, `Waiting` or `Finished`. A wait ([`Kernel::wait_while`]) that cannot
//! go on marks its task `Waiting` and passes the baton; the task does not know what it waits
//! for, so it becomes eligible again when any task made *progress* after it last looked (the
//! `epoch` moved), and re-checks its condition when picked. A re-check that fails passes the
//! baton on without counting as progress, so waiting tasks cannot wake each other forever.
//! When no task is eligible, the clock jumps to the earliest deadline of a waiting task (a
//! timed wait, the DPC thread's next timer); with none, every task waits for another: the
//! schedule is deadlocked, and the process ends with a report (the seed, the command that
//! replays it, every task's state and the schedule's last steps) instead of hanging.
//!
//! # Virtual time
//!
//! The machine's interrupt time is the scheduler's clock: it moves only when the harness
//! advances it (`Machine::advance_clock`) or every task waits (above). Host time never enters
//! a deterministic run.

#[allow(unused_imports)]
use std::{
    borrow::ToOwned,
    boxed::Box,
    string::{String, ToString},
    vec::Vec,
};

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// A task's index in its scheduler.
pub(crate) type TaskId = usize;

/// How many of the schedule's last steps a deadlock report shows.
const REPORT_TAIL: usize = 24;

/// How many clock jumps in a row only the timer thread may make progress across, while every
/// other task waits with no deadline, before the schedule counts as deadlocked: a periodic
/// timer keeps a deadline for ever, so without this bound its DPCs would keep the clock jumping
/// and the test would hang. A driver whose timer signals a waiter only after this many periods
/// is reported wrongly; none is known (a second's period makes this almost three hours).
const TIMER_ONLY_JUMPS: u64 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TaskState {
    Runnable,
    /// Blocked in a wait: eligible again once the epoch passes `seen` (another task made
    /// progress) or the clock reaches `deadline`.
    Waiting {
        seen: u64,
        deadline: Option<u64>,
    },
    Finished,
}

struct Task {
    name: String,
    state: TaskState,
    /// Picked from `Waiting` and has not yet been told its wait's condition held: blocking
    /// again at the same wait now is a failed re-check, not progress.
    rechecking: bool,
    /// The wait it blocked in last.
    blocked_at: &'static str,
    /// The timer (DPC) thread: its waits end on timers' due times, so it alone never makes a
    /// schedule stall (see [`TIMER_ONLY_JUMPS`]).
    timer_thread: bool,
}

/// One step of a deterministic schedule: a task that gave up the baton, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleStep {
    /// The step's number, from 1.
    pub step: u64,
    /// The machine's interrupt time at the step, in 100-ns ticks.
    pub time: u64,
    /// The task that ran up to this point (its thread's name: `harness`, `sim-worker-0`,
    /// `sim-dpc`, or the name given to [`Machine::spawn`](crate::Machine::spawn)).
    pub task: String,
    /// The yield point: what the task did or waits for.
    pub label: &'static str,
}

impl core::fmt::Display for ScheduleStep {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "#{} t={} {}: {}",
            self.step, self.time, self.task, self.label
        )
    }
}

/// A summary of a deterministic machine's whole schedule, kept however many steps the trace
/// keeps (`Machine::set_schedule_trace_limit`): two runs with one seed give equal
/// fingerprints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScheduleFingerprint {
    /// How many steps the schedule has had.
    pub steps: u64,
    /// FNV-1a over every step's number, interrupt time, task name and label, in order.
    pub hash: u64,
}

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    hash
}

struct Step {
    step: u64,
    time: u64,
    task: TaskId,
    label: &'static str,
}

struct State {
    rng: fastrand::Rng,
    /// A second stream for the kernel's random numbers (`BCryptGenRandom`), so that a driver
    /// drawing more or fewer bytes does not shift the schedule.
    random: fastrand::Rng,
    tasks: Vec<Task>,
    running: Option<TaskId>,
    /// Counts progress: moved by every task that gives up the baton after doing work.
    epoch: u64,
    step: u64,
    /// The last `trace_limit` steps (every step without a limit).
    trace: std::collections::VecDeque<Step>,
    trace_limit: Option<usize>,
    /// The fingerprint's hash over every step so far.
    hash: u64,
    /// Clock jumps in a row across which only the timer thread made progress while every other
    /// task waited with no deadline (see [`TIMER_ONLY_JUMPS`]).
    timer_only_jumps: u64,
}

/// Why no task can run.
#[derive(Clone, Copy)]
enum Stall {
    /// Every task waits with no deadline.
    Deadlock,
    /// Every task but the timer thread waits with no deadline, and only timers have fired for
    /// [`TIMER_ONLY_JUMPS`] clock jumps.
    OnlyTimers,
}

/// The scheduler of one deterministic machine.
pub(crate) struct Scheduler {
    seed: u64,
    /// The command that replays this machine's run, made on the thread that made the machine
    /// (the test's thread, which libtest names after the test).
    replay: String,
    state: Mutex<State>,
    /// Signalled when the baton moves.
    turn: Condvar,
    /// The virtual interrupt time, in 100-ns ticks. Written under `state`'s lock; read anywhere.
    now: AtomicU64,
    /// Set when the machine shuts down: every task runs free from then on (real-threads mode),
    /// and nothing more is traced.
    released: AtomicBool,
}

/// How many deterministic machines are alive in the process: while none is, the yield points on
/// the hottest paths (spin locks) cost one relaxed load and a branch.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The schedulers alive, by address.
static ALIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Whether any deterministic machine is alive (see [`LIVE`]).
#[inline]
pub(crate) fn any_live() -> bool {
    LIVE.load(Ordering::Relaxed) != 0
}

thread_local! {
    /// The scheduler (by address) and task this thread is, if it is a task.
    static TASK: Cell<Option<(usize, TaskId)>> = const { Cell::new(None) };
}

/// Ends the calling task when dropped, also by a panic: a task that ends without saying so
/// would leave the others waiting for it.
pub(crate) struct FinishOnDrop<'s>(pub(crate) &'s Scheduler);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Scheduler {
    /// A scheduler whose first task, running now, is the calling thread (the harness).
    pub(crate) fn new(seed: u64) -> Box<Scheduler> {
        let scheduler = Box::new(Scheduler {
            seed,
            replay: replay_hint(seed),
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(seed),
                random: fastrand::Rng::with_seed(seed ^ 0x5eed_5eed_5eed_5eed),
                tasks: Vec::new(),
                running: Some(0),
                epoch: 0,
                step: 0,
                trace: std::collections::VecDeque::new(),
                trace_limit: None,
                hash: FNV_OFFSET,
                timer_only_jumps: 0,
            }),
            turn: Condvar::new(),
            now: AtomicU64::new(0),
            released: AtomicBool::new(false),
        });
        let id = scheduler.add("harness", false);
        let me = scheduler.address();
        let mut live = ALIVE.lock().unwrap_or_else(|p| p.into_inner());
        TASK.with(|t| {
            // A machine dropped on another thread leaves this thread's mark behind: only a
            // machine still alive counts.
            if let Some((other, _)) = t.get()
                && other != me
                && live.contains(&other)
            {
                panic!(
                    "wfp-rs simulator: this thread is already a task of another deterministic machine; drop that machine first (one deterministic machine per thread at a time)"
                );
            }
            t.set(Some((me, id)));
        });
        live.push(me);
        LIVE.fetch_add(1, Ordering::Relaxed);
        drop(live);
        scheduler
    }

    fn address(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// The command that replays this machine's run.
    pub(crate) fn replay(&self) -> &str {
        &self.replay
    }

    pub(crate) fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// The virtual interrupt time.
    pub(crate) fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Moves the clock forward (the harness's `advance_clock`).
    pub(crate) fn advance(&self, ticks: u64) {
        let _state = self.lock();
        let now = self.now.load(Ordering::SeqCst).saturating_add(ticks);
        self.now.store(now, Ordering::SeqCst);
    }

    /// A new task, runnable, for a thread about to start; the thread calls
    /// [`attach`](Self::attach) first. Tasks are added by running tasks, so their ids are
    /// deterministic.
    /// `timer_thread`: the task is the machine's timer (DPC) thread.
    pub(crate) fn add(&self, name: &str, timer_thread: bool) -> TaskId {
        let mut state = self.lock();
        state.tasks.push(Task {
            name: name.to_owned(),
            state: TaskState::Runnable,
            rechecking: false,
            blocked_at: "",
            timer_thread,
        });
        state.tasks.len() - 1
    }

    /// Task `me` made progress (the epoch moved).
    fn progress(state: &mut State, me: TaskId) {
        state.epoch += 1;
        if !state.tasks[me].timer_thread {
            state.timer_only_jumps = 0;
        }
    }

    /// Makes the calling (new) thread task `id` and waits for its first turn.
    pub(crate) fn attach(&self, id: TaskId) {
        TASK.with(|t| t.set(Some((self.address(), id))));
        let state = self.lock();
        drop(self.wait_turn(state, id));
    }

    /// The calling thread's task.
    ///
    /// # Panics
    ///
    /// If the thread is not a task of this scheduler: a deterministic machine decides when
    /// each of its contexts runs, so a thread it does not know cannot enter it.
    pub(crate) fn current(&self) -> TaskId {
        match TASK.with(Cell::get) {
            Some((scheduler, id)) if scheduler == self.address() => id,
            _ => panic!(
                "wfp-rs simulator: a thread that is not one of its tasks entered a deterministic machine (Machine::deterministic); start threads that use it with Machine::spawn"
            ),
        }
    }

    /// Checks that the calling thread may enter the machine (see [`current`](Self::current)).
    pub(crate) fn require_task(&self) {
        if !self.is_released() {
            let _ = self.current();
        }
    }

    /// A yield point: the calling task may be preempted here; another task (or itself) runs
    /// next, as the seed decides.
    pub(crate) fn point(&self, label: &'static str) {
        if self.is_released() {
            return;
        }
        let me = self.current();
        let mut state = self.lock();
        Scheduler::progress(&mut state, me);
        state.tasks[me].rechecking = false;
        self.switch(state, me, label);
    }

    /// The calling task waits: it runs again when picked after another task made progress, or
    /// when the clock reaches `deadline` (virtual interrupt time). The caller re-checks what it
    /// waits for and calls [`progressed`](Self::progressed) once it holds.
    pub(crate) fn block(&self, label: &'static str, deadline: Option<u64>) {
        if self.is_released() {
            return;
        }
        let me = self.current();
        let mut state = self.lock();
        // A wait whose loop does not say when its condition held (`Kernel::wait_once`) counts
        // as progress when the task blocks somewhere else than it was woken from.
        let task = &state.tasks[me];
        if !task.rechecking || task.blocked_at != label {
            Scheduler::progress(&mut state, me);
        }
        state.tasks[me].blocked_at = label;
        let seen = state.epoch;
        state.tasks[me].state = TaskState::Waiting { seen, deadline };
        self.switch(state, me, label);
    }

    /// The calling task's wait is over: what it does next is progress.
    pub(crate) fn progressed(&self) {
        if self.is_released() {
            return;
        }
        let me = self.current();
        self.lock().tasks[me].rechecking = false;
    }

    /// The calling task ends (its thread returns); the baton goes on.
    pub(crate) fn finish(&self) {
        if self.is_released() {
            return;
        }
        let Some((scheduler, me)) = TASK.with(Cell::get) else {
            return;
        };
        if scheduler != self.address() {
            return;
        }
        TASK.with(|t| t.set(None));
        let mut state = self.lock();
        Scheduler::progress(&mut state, me);
        state.tasks[me].state = TaskState::Finished;
        self.record(&mut state, me, "finished");
        match self.pick(&mut state) {
            Ok(next) => self.hand_to(&mut state, next),
            Err(stall) => self.deadlocked(&state, stall),
        }
    }

    /// Whether task `id` has finished.
    pub(crate) fn is_finished(&self, id: TaskId) -> bool {
        self.lock().tasks[id].state == TaskState::Finished
    }

    /// The machine shuts down: every task runs free, as in real-threads mode.
    pub(crate) fn release(&self) {
        let _state = self.lock();
        self.released.store(true, Ordering::SeqCst);
        self.turn.notify_all();
        TASK.with(|t| {
            if t.get().is_some_and(|(s, _)| s == self.address()) {
                t.set(None);
            }
        });
    }

    /// Fills `buffer` from the seed's stream of kernel random numbers.
    pub(crate) fn fill_random(&self, buffer: &mut [u8]) {
        let mut state = self.lock();
        for byte in buffer {
            *byte = state.random.u8(..);
        }
    }

    /// The schedule so far.
    pub(crate) fn trace(&self) -> Vec<ScheduleStep> {
        let state = self.lock();
        state
            .trace
            .iter()
            .map(|s| ScheduleStep {
                step: s.step,
                time: s.time,
                task: state.tasks[s.task].name.clone(),
                label: s.label,
            })
            .collect()
    }

    fn record(&self, state: &mut State, me: TaskId, label: &'static str) {
        state.step += 1;
        let step = Step {
            step: state.step,
            time: self.now(),
            task: me,
            label,
        };
        let mut hash = fnv(state.hash, &step.step.to_le_bytes());
        hash = fnv(hash, &step.time.to_le_bytes());
        hash = fnv(hash, state.tasks[me].name.as_bytes());
        state.hash = fnv(hash, label.as_bytes());
        if state
            .trace_limit
            .is_some_and(|limit| state.trace.len() >= limit)
        {
            state.trace.pop_front();
        }
        if state.trace_limit != Some(0) {
            state.trace.push_back(step);
        }
    }

    /// Keeps only the last `limit` steps in the trace from now on (`None`: every step).
    pub(crate) fn set_trace_limit(&self, limit: Option<usize>) {
        let mut state = self.lock();
        state.trace_limit = limit;
        if let Some(limit) = limit {
            let excess = state.trace.len().saturating_sub(limit);
            state.trace.drain(..excess);
        }
    }

    pub(crate) fn fingerprint(&self) -> ScheduleFingerprint {
        let state = self.lock();
        ScheduleFingerprint {
            steps: state.step,
            hash: state.hash,
        }
    }

    /// Records the step, hands the baton to the task the seed picks, and parks until it comes
    /// back.
    fn switch(&self, mut state: MutexGuard<'_, State>, me: TaskId, label: &'static str) {
        self.record(&mut state, me, label);
        match self.pick(&mut state) {
            Ok(next) => self.hand_to(&mut state, next),
            Err(stall) => self.deadlocked(&state, stall),
        }
        // A stay at DISPATCH_LEVEL counts only this task's own turns.
        super::watchdog::park();
        drop(self.wait_turn(state, me));
        super::watchdog::resume();
    }

    fn hand_to(&self, state: &mut State, next: TaskId) {
        let task = &mut state.tasks[next];
        if matches!(task.state, TaskState::Waiting { .. }) {
            task.state = TaskState::Runnable;
            task.rechecking = true;
        }
        state.running = Some(next);
        self.turn.notify_all();
    }

    fn wait_turn<'s>(
        &'s self,
        mut state: MutexGuard<'s, State>,
        me: TaskId,
    ) -> MutexGuard<'s, State> {
        loop {
            if self.is_released() {
                return state;
            }
            if state.running == Some(me) {
                return state;
            }
            state = self.turn.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next task, picked by the seed among the eligible ones; when none is, the clock
    /// jumps to the earliest deadline. `Err`: no task can ever run (see [`Stall`]).
    fn pick(&self, state: &mut State) -> Result<TaskId, Stall> {
        loop {
            let now = self.now();
            let epoch = state.epoch;
            let eligible: Vec<TaskId> = state
                .tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| match t.state {
                    TaskState::Runnable => true,
                    TaskState::Waiting { seen, deadline } => {
                        seen < epoch || deadline.is_some_and(|d| d <= now)
                    }
                    TaskState::Finished => false,
                })
                .map(|(id, _)| id)
                .collect();
            if !eligible.is_empty() {
                return Ok(eligible[state.rng.usize(..eligible.len())]);
            }
            let earliest = state
                .tasks
                .iter()
                .filter_map(|t| match t.state {
                    TaskState::Waiting { deadline, .. } => deadline,
                    _ => None,
                })
                .min()
                .ok_or(Stall::Deadlock)?;
            let only_timers = state.tasks.iter().all(|t| {
                t.timer_thread
                    || matches!(
                        t.state,
                        TaskState::Waiting { deadline: None, .. } | TaskState::Finished
                    )
            });
            if only_timers {
                state.timer_only_jumps += 1;
                if state.timer_only_jumps > TIMER_ONLY_JUMPS {
                    return Err(Stall::OnlyTimers);
                }
            } else {
                state.timer_only_jumps = 0;
            }
            self.now.store(earliest.max(now), Ordering::SeqCst);
        }
    }

    /// Every task waits and none can wake: on Windows the machine would hang (or some
    /// contexts would, forever). The simulator reports the schedule instead, and ends the
    /// process as a bug check does: the task that found it may be in a kernel routine, which
    /// cannot unwind into the driver.
    fn deadlocked(&self, state: &State, stall: Stall) -> ! {
        let report = self.deadlock_report(state, stall);
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "{report}");
        let _ = stderr.flush();
        std::process::abort();
    }

    fn deadlock_report(&self, state: &State, stall: Stall) -> String {
        let why = match stall {
            Stall::Deadlock => "every task waits and no wait has a deadline".to_owned(),
            Stall::OnlyTimers => format!(
                "every task but the timer thread waits and no wait has a deadline, and only \
                 timers' DPCs have run for {TIMER_ONLY_JUMPS} clock jumps (a periodic timer \
                 keeps the clock moving)"
            ),
        };
        let mut report = format!(
            "wfp-rs simulator: deterministic machine (seed {}): {why} (a deadlock in this schedule)\n{}\ntasks:",
            self.seed, self.replay
        );
        for task in &state.tasks {
            let what = match task.state {
                TaskState::Waiting { .. } => "waiting",
                TaskState::Runnable => "runnable",
                TaskState::Finished => "finished",
            };
            report.push_str(&format!("\n  {}: {what}", task.name));
        }
        report.push_str("\nlast steps:");
        let skip = state.trace.len().saturating_sub(REPORT_TAIL);
        for step in state.trace.iter().skip(skip) {
            report.push_str(&format!(
                "\n  #{} t={} {}: {}",
                step.step, step.time, state.tasks[step.task].name, step.label
            ));
        }
        report
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let me = self.address();
        ALIVE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&s| s != me);
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The environment variable that replays one seed ([`crate::for_each_seed`]).
pub const SEED_VARIABLE: &str = "WFP_SIM_SEED";

/// How to replay `seed`: the command, for the test this thread runs (libtest names a test's
/// thread after the test; the test binary's file name gives the target).
pub(crate) fn replay_hint(seed: u64) -> String {
    let test = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(ToOwned::to_owned);
    let target = std::env::current_exe().ok().and_then(|exe| {
        let stem = exe.file_stem()?.to_str()?.to_owned();
        // Cargo names test binaries `<target>-<16 hex digits>`.
        Some(match stem.rsplit_once('-') {
            Some((target, hash)) if hash.len() == 16 => target.to_owned(),
            _ => stem,
        })
    });
    let package = std::env::var("CARGO_PKG_NAME").ok();
    let mut command = format!("replay: {SEED_VARIABLE}={seed} cargo test");
    if let Some(package) = &package {
        command.push_str(&format!(" -p {package}"));
    }
    match (target, package) {
        // A crate's unit tests: the binary is named after the library.
        (Some(target), Some(package)) if target == package.replace('-', "_") => {
            command.push_str(" --lib");
        }
        (Some(target), _) => command.push_str(&format!(" --test {target}")),
        (None, _) => {}
    }
    if let Some(test) = test {
        command.push_str(&format!(" -- --exact {test}"));
    }
    command
}
