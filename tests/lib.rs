//! Workspace integration tests for wfp-rs: simulator scenarios (`verifier`, `driver_lifecycle`),
//! compile-fail UI tests (`ui`) and checks of the driver image built for Windows
//! (`driver_image`). The simulator tests run wherever the simulator backend is selected: on any
//! non-Windows host, and on Windows with `--features sim`.

extern crate alloc;

#[cfg(any(not(windows), feature = "sim"))]
pub mod install {
    //! The setup most simulator tests share: a callout registered in a loaded driver, with a
    //! dynamic session holding its callout entry and one terminating filter that names it.

    use wfp_rs::Guid;
    use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration};
    use wfp_rs::driver::Driver;
    use wfp_rs::engine::{CalloutEntry, Engine, SessionOptions};
    use wfp_rs::filter::{Filter, FilterAction};
    use wfp_rs::layer::Layer;
    use wfp_rs_sim::{LoadedDriver, Machine};

    /// A registered callout and the session that added its management objects.
    pub struct Installed<L: Layer, C: Callout<L, F>, F: Send + Sync + 'static = ()> {
        /// The callout's registration.
        pub registration: CalloutRegistration<L, C, F>,
        /// The dynamic session: closing it deletes the callout entry and the filter.
        pub engine: Engine,
    }

    /// Registers the callout `make` builds (inside the driver, so it can take the driver's work
    /// queue) under `callout_key`, and adds its callout entry and a terminating filter
    /// `filter_key` at the key's layer `L`. Panics (failing the test) if any step fails.
    pub fn install<L, C, F>(
        machine: &Machine,
        driver: &LoadedDriver,
        callout_key: CalloutKey<L>,
        filter_key: Guid,
        make: impl FnOnce(&mut Driver<'_>) -> C,
    ) -> Installed<L, C, F>
    where
        L: Layer,
        C: Callout<L, F>,
        F: Send + Sync + 'static,
    {
        driver
            .run_in_driver(machine, |irql, d| {
                let callout = make(d);
                let registration =
                    CalloutRegistration::<L, C, F>::register(irql, d, callout_key, callout)
                        .unwrap_or_else(|e| panic!("registers: {}", e.status));
                let engine = Engine::open(irql, SessionOptions::new().dynamic()).expect("opens");
                engine
                    .add_callout(irql, &CalloutEntry::new(callout_key).name("test"))
                    .expect("adds the callout entry");
                engine
                    .add_filter(
                        irql,
                        &Filter::<L>::new(filter_key)
                            .name("test")
                            .action(FilterAction::CalloutTerminating(callout_key)),
                    )
                    .expect("adds the filter");
                Installed {
                    registration,
                    engine,
                }
            })
            .expect("an SDK driver")
    }

    impl<L: Layer, C: Callout<L, F>, F: Send + Sync + 'static> Installed<L, C, F> {
        /// The callout, to read what it recorded.
        pub fn callout(&self) -> &C {
            self.registration.callout()
        }

        /// Closes the session and unregisters the callout, in the driver. Panics if either fails.
        pub fn remove(self, machine: &Machine, driver: &LoadedDriver) {
            let Installed {
                registration,
                engine,
            } = self;
            driver.run_in_driver(machine, |irql, _| {
                engine.close(irql).expect("closes the session");
                registration
                    .unregister(irql)
                    .map_err(|(_, status)| status)
                    .expect("unregisters");
            });
        }
    }
}

#[cfg(any(not(windows), feature = "sim"))]
pub mod raw_redirect {
    //! A callout that misuses `FwpsAcquireWritableLayerDataPointer0` /
    //! `FwpsApplyModifiedLayerData0` through the raw functions, at whichever redirect layer it is
    //! registered: the bug-check tests of the connect and bind requests share it.

    use wfp_rs::callout::{Callout, Classify};
    use wfp_rs::irql::DispatchLevel;
    use wfp_rs::layer::Layer;
    use wfp_rs::sys;

    /// How [`Raw`] misuses the functions.
    #[derive(Clone, Copy, Debug)]
    pub enum Misuse {
        /// Applies the copy it acquired twice.
        ApplyTwice,
        /// Applies a buffer without acquiring anything.
        ApplyWithoutAcquire,
        /// Acquires, then applies a copy of the copy (another pointer).
        ApplyAnotherPointer,
        /// Acquires and returns without applying.
        NeverApply,
    }

    /// `FwpsAcquireClassifyHandle0` for the classification `c` is in (asserting success).
    pub fn classify_handle<L: Layer>(c: &Classify<'_, L>) -> u64 {
        let mut handle = 0u64;
        // SAFETY: the classification's own classify context, during classifyFn.
        let status = unsafe {
            sys::FwpsAcquireClassifyHandle0(c.raw_classify_context().cast_mut(), 0, &mut handle)
        };
        assert_eq!(status, 0);
        handle
    }

    /// `FwpsAcquireWritableLayerDataPointer0` with `handle` for `filter_id`, without a
    /// classify-out (asserting success): the engine's writable copy of the layer data. Only
    /// with a handle [`classify_handle`] just acquired, during the classification.
    fn writable(handle: u64, filter_id: u64) -> sys::PVOID {
        let mut data: sys::PVOID = core::ptr::null_mut();
        // SAFETY: the callers pass a classify handle just acquired for the classification in
        // progress; `data` is writable.
        let status = unsafe {
            sys::FwpsAcquireWritableLayerDataPointer0(
                handle,
                filter_id,
                0,
                &mut data,
                core::ptr::null_mut(),
            )
        };
        assert_eq!(status, 0);
        data
    }

    /// The classify handle and the writable connect request of the classification `c` is in
    /// (at ALE_CONNECT_REDIRECT), through the raw functions, which let a test leave out what
    /// the safe API requires. The caller applies the copy and releases the handle.
    pub fn connect_request<L: Layer>(
        c: &Classify<'_, L>,
    ) -> (u64, *mut sys::FWPS_CONNECT_REQUEST0) {
        let handle = classify_handle(c);
        (handle, writable(handle, c.filter.id()).cast())
    }

    /// Misuses the writable layer data as told, then permits.
    pub struct Raw(pub Misuse);

    impl<L: Layer> Callout<L> for Raw {
        fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
            let handle = classify_handle(c);
            let data = if matches!(self.0, Misuse::ApplyWithoutAcquire) {
                core::ptr::null_mut()
            } else {
                writable(handle, c.filter.id())
            };
            // Larger than any request (FWPS_CONNECT_REQUEST0 is 312 bytes), 8-byte aligned.
            let mut other = [0u64; 64];
            match self.0 {
                Misuse::ApplyTwice => {
                    // SAFETY: the copy acquired above, applied once here; the second apply is
                    // the misuse under test.
                    unsafe { sys::FwpsApplyModifiedLayerData0(handle, data, 0) };
                    // SAFETY: none; the simulator stops here.
                    unsafe { sys::FwpsApplyModifiedLayerData0(handle, data, 0) };
                }
                Misuse::ApplyWithoutAcquire | Misuse::ApplyAnotherPointer => {
                    // SAFETY: none; the simulator stops here.
                    unsafe {
                        sys::FwpsApplyModifiedLayerData0(handle, other.as_mut_ptr().cast(), 0)
                    };
                }
                Misuse::NeverApply => {
                    // SAFETY: acquired above; the un-applied copy is the misuse.
                    unsafe { sys::FwpsReleaseClassifyHandle0(handle) };
                }
            }
            let _ = c.out.permit();
        }
    }
}

#[cfg(any(not(windows), feature = "sim"))]
pub mod protocol {
    //! The little protocol the port tests (kernel side and user-mode side) speak.

    use wfp_rs::port::{Malformed, Message, Protocol};

    /// Driver → service: a process id.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ask {
        /// The process.
        pub pid: u32,
    }

    /// Service → driver: `b'V'`, then 0 (block) or 1 (allow), then up to 6 zero bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Verdict {
        /// May connect.
        Allow,
        /// May not.
        Block,
    }

    impl Message for Ask {
        const MIN_LEN: usize = 4;
        const MAX_LEN: usize = 4;

        fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
            out.get_mut(..4)
                .ok_or(Malformed("short buffer"))?
                .copy_from_slice(&self.pid.to_le_bytes());
            Ok(4)
        }

        fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
            let pid = bytes
                .try_into()
                .map_err(|_| Malformed("an Ask is 4 bytes"))?;
            Ok(Ask {
                pid: u32::from_le_bytes(pid),
            })
        }
    }

    impl Message for Verdict {
        const MIN_LEN: usize = 2;
        const MAX_LEN: usize = 8;

        fn encode(&self, out: &mut [u8]) -> Result<usize, Malformed> {
            let out = out.get_mut(..2).ok_or(Malformed("short buffer"))?;
            out[0] = b'V';
            out[1] = u8::from(*self == Verdict::Allow);
            Ok(2)
        }

        fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
            let [magic, verdict, rest @ ..] = bytes else {
                return Err(Malformed("too short"));
            };
            if *magic != b'V' {
                return Err(Malformed("bad magic"));
            }
            if rest.iter().any(|&b| b != 0) {
                return Err(Malformed("reserved bytes are not zero"));
            }
            match verdict {
                0 => Ok(Verdict::Block),
                1 => Ok(Verdict::Allow),
                _ => Err(Malformed("the verdict is 0 or 1")),
            }
        }
    }

    /// The request/reply pair the port tests speak.
    pub struct Firewall;

    impl Protocol for Firewall {
        type Request = Ask;
        type Reply = Verdict;
    }
}

/// Checks a guide's test as its doctest. A doctest is compiled without the test harness, which
/// drops `#[test]` items (and so `bugcheck_test!`'s expansion) before their bodies are checked;
/// the guide wraps the test in this macro, on hidden lines, instead.
///
/// - `#[test] fn name() { .. }`: the body is compiled and run.
/// - `wfp_rs_sim::bugcheck_test! { .. }`: the invocation is passed on to the real macro (so its
///   shape is checked), and the body and the bug check's name are compiled but not run (a bug
///   check ends the process; the tests in `tests/` run such scenarios in a child process).
///
/// Not an API: only the doctests in `guides` use it.
#[doc(hidden)]
#[macro_export]
macro_rules! guide_test {
    (#[test] fn $name:ident() $body:block) => {
        fn $name() $body
        $name();
    };
    (wfp_rs_sim::bugcheck_test! {
        fn $name:ident() expects $code:ident $(($p1:expr))? $body:block
    }) => {
        wfp_rs_sim::bugcheck_test! {
            fn $name() expects $code $(($p1))? $body
        }
        let _ = wfp_rs::bugcheck::BugCheckCode::$code;
        $(let _: usize = $p1;)?
        let _ = || $body;
    };
}

#[cfg(any(not(windows), feature = "sim"))]
pub mod race {
    //! For tests of what must wait for driver code running on another thread (an unload waiting
    //! for a callback, say): a [`Gate`] holds the driver's routine where the test wants it, and
    //! [`assert_keeps_waiting`] checks the waiter does not go on meanwhile.

    use std::sync::{Condvar, Mutex};
    use std::thread::ScopedJoinHandle;
    use std::time::Duration;

    /// Where a driver routine waits until the test lets it go on. One per scenario: tests run in
    /// parallel.
    pub struct Gate {
        /// (a routine waits at the gate, the gate is open)
        state: Mutex<(bool, bool)>,
        changed: Condvar,
    }

    impl Gate {
        /// The longest a routine waits at a gate nobody opens.
        pub const LIMIT: Duration = Duration::from_secs(20);

        /// A closed gate.
        pub const fn new() -> Gate {
            Gate {
                state: Mutex::new((false, false)),
                changed: Condvar::new(),
            }
        }

        /// Called by the driver's routine: waits until the test opens the gate (at most
        /// [`LIMIT`](Self::LIMIT)), as harness code.
        pub fn pass(&self) {
            wfp_rs_sim::as_harness(|| {
                let mut gate = self.state.lock().unwrap();
                gate.0 = true;
                self.changed.notify_all();
                drop(
                    self.changed
                        .wait_timeout_while(gate, Self::LIMIT, |gate| !gate.1),
                );
            });
        }

        /// Waits until a routine waits at the gate.
        pub fn wait_for_a_routine(&self) {
            let mut gate = self.state.lock().unwrap();
            while !gate.0 {
                gate = self.changed.wait(gate).unwrap();
            }
        }

        /// Lets the routine (and every later one) go on.
        pub fn open(&self) {
            self.state.lock().unwrap().1 = true;
            self.changed.notify_all();
        }
    }

    impl Default for Gate {
        fn default() -> Self {
            Gate::new()
        }
    }

    /// Asserts for 200 ms that `waiter` has not finished, with `what` as the failure: a wait
    /// that is there passes whatever the timing; one that is missing fails as long as the
    /// waiter gets to run meanwhile.
    pub fn assert_keeps_waiting<T>(waiter: &ScopedJoinHandle<'_, T>, what: &str) {
        for _ in 0..20 {
            assert!(!waiter.is_finished(), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The guides' Rust code blocks, compiled (and the `compile_fail` ones checked to fail with their
/// error code) as doctests of this crate, so the guides cannot drift from the API:
/// `cargo test -p wfp-rs-tests --doc`.
#[cfg(doctest)]
pub mod guides {
    #[doc = include_str!("../docs/async-decisions.md")]
    pub mod async_decisions {}
    #[doc = include_str!("../docs/benchmarks.md")]
    pub mod benchmarks {}
    #[doc = include_str!("../docs/building-drivers.md")]
    pub mod building_drivers {}
    #[doc = include_str!("../docs/callouts.md")]
    pub mod callouts {}
    #[doc = include_str!("../docs/clients.md")]
    pub mod clients {}
    #[doc = include_str!("../docs/firewall.md")]
    pub mod firewall {}
    #[doc = include_str!("../docs/getting-started.md")]
    pub mod getting_started {}
    #[doc = include_str!("../docs/irql.md")]
    pub mod irql {}
    #[doc = include_str!("../docs/packets.md")]
    pub mod packets {}
    #[doc = include_str!("../docs/reliability.md")]
    pub mod reliability {}
    #[doc = include_str!("../docs/simulator.md")]
    pub mod simulator {}
    #[doc = include_str!("../docs/timers.md")]
    pub mod timers {}
}
