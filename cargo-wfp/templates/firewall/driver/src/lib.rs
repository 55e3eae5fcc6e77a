//! The example firewall's callout driver: every new TCP or UDP connection, out or in, over IPv4
//! or IPv6, is allowed or denied by a user-mode service — answered at once from a verdict cache
//! when the service has answered the same question before.
//!
//! The driver and the service speak [`firewall_protocol`]: a [`ConnectionRequest`] as a question
//! on the question channel [`firewall_protocol::ASK_CHANNEL`] (device
//! [`firewall_protocol::ASK_DEVICE_NAME`]; [`AskVia::Channel`], the default) or over the
//! filter-manager port [`firewall_protocol::PORT_NAME`] ([`AskVia::PortAndWorkItem`]), a
//! [`ConnectionReply`] back, and the [`REVOKE`] command on the control device
//! [`CONTROL_DEVICE_NAME`].
//!
//! # Two ways to ask
//!
//! [`Config::ask_via`] chooses; both decide every case of the tables below the same way, and
//! [`StatsSnapshot::asked_via_channel`] / [`StatsSnapshot::asked_via_port`] count which asked.
//!
//! - [`AskVia::Channel`] (the default, [`wfp_rs::ask`]): the classify callback pends and puts the
//!   question to the channel itself, at `DISPATCH_LEVEL`, with the pend, the connection's keys
//!   and the request id as the question's context. The service keeps wait requests pending on
//!   the channel's device and answers on the same handle; the channel's handler
//!   ([`QuestionHandler::decide`], exactly once per question) checks the reply answers the
//!   request, caches it if allowed, records the verdict for the reauthorization and completes
//!   the pend (inbound: completes the pend and reinjects or frees the packet's clone), or
//!   applies the default for every other outcome — the same code that ends a question asked
//!   over the port. No work item, no thread waits.
//!   The channel has [`Config::max_pending`] + [`Config::background_asks`] slots, so a
//!   connection that reserved a slot of the [`VerdictTable`] finds one; each slot holds a
//!   question of at most [`ASK_MAX_QUESTION`](firewall_protocol::ASK_MAX_QUESTION) bytes (an
//!   image path of [`ASK_MAX_PATH_UNITS`](firewall_protocol::ASK_MAX_PATH_UNITS) units),
//!   allocated at load. A longer question (or one that finds every slot taken, which the
//!   sizing rules out) is asked through the port and a work item, whole. Only the admitted
//!   service may open the channel's device ([`Driver::admit_only`](wfp_rs::driver::Driver::admit_only)
//!   applies to every device the SDK creates).
//! - [`AskVia::PortAndWorkItem`]: a work item at `PASSIVE_LEVEL` sends the question over the
//!   port and waits for the reply (the first design; the benchmarks compare the two).
//!
//! [`QuestionHandler::decide`]: wfp_rs::ask::QuestionHandler::decide
//!
//! # Where it filters
//!
//! | layer | callout | connections |
//! |---|---|---|
//! | `ALE_AUTH_CONNECT_V4`, `_V6` | [`Outbound`] | this machine connects out (TCP `connect`, the first UDP send to a destination) |
//! | `ALE_AUTH_RECV_ACCEPT_V4`, `_V6` | [`Inbound`] | a remote peer connects in (TCP accept, the first UDP datagram from a source) |
//!
//! One terminating filter per layer hands the callout every connection whose IP protocol is TCP
//! or UDP (two consecutive conditions on `IP_PROTOCOL`, which the engine ORs). **ICMP and other
//! protocols are not filtered**: at these layers WFP puts an ICMP message's type and code in
//! the port fields (`FWPM_CONDITION_ICMP_TYPE` is `FWPM_CONDITION_IP_LOCAL_PORT`, the code the
//! remote port), which the service's port rules would misread, and leaving ICMP to the Windows
//! firewall keeps `ping` working whatever the service says. A product that wants to filter ICMP
//! adds `1` and `58` to [`FILTERED_PROTOCOLS`] and teaches its rules the type and code; nothing
//! in the driver depends on ports.
//!
//! The provider, sublayer, callout entries and filters are added in one dynamic session, in one
//! transaction, after the callouts are registered, as in the [seed-fixed example] — or
//! persistent, with boot-time filters, with [`Config::fail_closed_at_boot`] (see
//! [Fail-closed from boot](#fail-closed-from-boot)).
//!
//! # The decision, outbound (`ALE_AUTH_CONNECT`)
//!
//! 1. **Loopback** (the `FLAGS` field has `FWP_CONDITION_FLAG_IS_LOOPBACK`): permitted without
//!    asking, when [`Config::permit_loopback`] (the default). Local IPC over TCP is not a
//!    firewall question, and asking about it would make the service ask about itself.
//! 2. **The reauthorization of a connection this driver pended**: the verdict the channel's
//!    handler or the work item recorded in its [`VerdictTable`] (keyed by [`ConnectionKey`], local port included).
//! 3. **Any other classification** (a new connection, or a reauthorization the driver did not
//!    cause): the **verdict cache**, if it holds a live verdict for the connection's
//!    [cache key](#the-verdict-cache).
//! 4. **An image path no request can carry whole** (longer than [`MAX_PATH_UNITS`], the
//!    longest NT path, or not a path: an odd number of bytes, a NUL inside), when the cache
//!    does not answer: denied, whatever [`Config::default`] says, without asking (see
//!    [The whole path](#the-whole-path)).
//! 5. **A new connection the cache does not answer**: if fewer than [`Config::max_pending`]
//!    connections are outstanding (pended, or completed and not yet reauthorized), it takes a
//!    slot of the [`VerdictTable`] and is pended ([`Classify::pend`]); the question channel
//!    (or a work item, over the port) asks with a [`ConnectionRequest`] (process id, the whole image path, protocol, both
//!    endpoints, direction) and waits at most [`Config::timeout`]; it checks that the reply
//!    [`answers`](ConnectionReply::answers) the request, caches the verdict if the reply allows
//!    it (`cache_seconds > 0`), records it for the reauthorization, and completes the pend.
//!    WFP reauthorizes the connection and step 2 answers, which frees the slot. Otherwise it is
//!    not pended: it gets [`Config::overload`] at once (see [Overload](#overload)).
//!
//! Every failure gives [`Config::default`] — fail-closed ([`Verdict::Deny`]) in
//! [`Config::DEFAULT`]: a firewall that asks before letting a process connect should not let
//! it connect because nobody answered. Each case is logged with its reason.
//!
//! | situation | decision |
//! |---|---|
//! | a loopback connection, with [`Config::permit_loopback`] | permit, nobody asked |
//! | a live cached verdict for the cache key | that verdict, at once (no allocation, no work item) |
//! | **an image path no request can carry whole** (longer than [`MAX_PATH_UNITS`], an odd number of bytes, a NUL inside), reauthorizations included | **deny**, whatever the default, at once (nothing pended, nobody asked); counted in [`StatsSnapshot::unaskable`], not in `defaults`, and logged |
//! | the service replies in time with a valid reply to this request | its verdict |
//! | **channel**: no service has the channel open (not started yet, or exited) | not asked ([`NotAskedReason::NoService`]): the default at once — the connection, pended to be asked, is completed in the same classifyFn and its reauthorization gets the default (the service opens the port and the channel together, so the port is not tried; no work item is queued to find nobody) |
//! | **channel**: the service has the channel open but no request waiting | the question stays queued for its next request: its verdict, or the default at the deadline ([`Config::timeout`]) |
//! | **channel**: the service's handle closes (it exited, was killed) with the question delivered and not answered, or its last handle closes with the question still queued | the default, at once (`Outcome::ServiceGone`) |
//! | **channel**: no answer by the deadline; a late answer is refused (`STATUS_NOT_FOUND`) | the default |
//! | **channel**: an answer that does not decode, or a reply to another request | the default |
//! | **channel**: an answer through a handle the question was not delivered to (foreign) | refused (`STATUS_ACCESS_DENIED`); the question waits for its own handle or its deadline |
//! | **channel**: a second answer to a decided question (duplicate) | refused (`STATUS_NOT_FOUND`); the first decided |
//! | **channel**: unload with questions outstanding | the default for each, in `stopping`, while the filters are still there |
//! | **port**: no service connected ([`SendError::NotConnected`]) | the default |
//! | **port**: the service disconnects (is killed) before replying ([`SendError::Disconnected`]) | the default |
//! | **port**: no reply within [`Config::timeout`] ([`SendError::Timeout`]); a late reply is discarded | the default |
//! | a reply too short, too long, or malformed (any field [`ConnectionReply`]'s decoder rejects) | the default |
//! | a well-formed reply to another request (its `request_id` is not this one's) | the default |
//! | no pool to send ([`SendError::Status`]) | the default |
//! | **port**: the work item cannot be queued (no pool): the default is recorded, and the closure that came back is dropped with the pend in it, which completes it | the default |
//! | **overload**: [`Config::max_pending`] connections are pended or waiting for their reauthorization already, or the questions waiting for the service hold [`QUESTION_BYTES`] of pool and this one's does not fit, and the cache has no verdict | **[`Config::overload`]** (deny unless configured otherwise, whatever the default), at once (nothing pended); counted in [`StatsSnapshot::overloaded`], not in `defaults` |
//! | **an established connection reauthorized after a policy change** (a rules change: see "Established connections") | the cache's verdict if it has one; else **kept** (allow) while the service is asked in the background ([`StatsSnapshot::established_kept`]); a deny then cuts it at its next packet |
//! | another reauthorization the driver did not cause | the cache's verdict if it has one, else the default |
//! | a second pend of the same connection (process, image, protocol, both endpoints) while the first waits for its reauthorization: one verdict is kept, for one of the two | the other: the cache's verdict if it has one, else the default |
//! | the connection's fields cannot be read (a field missing, of the wrong type), there is no pool for the request, or the classification cannot be pended | the default, at once (nothing pended) |
//! | a heavier sublayer already decided hard (no write right) | that decision stands |
//! | the driver is unloading | the default, at once (nothing is pended any more) |
//!
//! A default is never cached: the next connection with the same key asks again.
//!
//! ## Overload
//!
//! A pended connection holds a slot of the [`VerdictTable`] from before its pend until its
//! reauthorization takes the verdict, so a verdict the service gave is never evicted before
//! the reauthorization it is for: every pended connection gets the service's verdict (or the
//! default for the reasons above). The price is a bound: with [`Config::max_pending`]
//! connections outstanding, a new connection the cache does not answer is not pended, and gets
//! the **overload decision**, [`Config::overload`], at once. It is not the default: the default
//! answers "the service could not answer", and a product may choose fail-open for that (a
//! service crash should not cut the machine off), but anyone who can open connections fast
//! can fill the table on purpose, and with fail-open every further connection would then be
//! permitted without asking — a way around every deny rule. So overload has its own decision,
//! [`Verdict::Deny`] in [`Config::DEFAULT`] whatever the default is. That case is counted
//! ([`StatsSnapshot::overloaded`], not in `defaults`) and logged once when a burst starts and
//! once when it ends (with how many connections it refused), not per connection. The default
//! bound, [`VERDICT_SLOTS`] (2048, 160 KiB of non-paged pool), is twice the largest burst the
//! benchmarks make (1024 new connections at once, none refused).
//!
//! The questions are bounded in bytes too: each holds its request, up to 64 KiB with the whole
//! image path, until its work item ends (or, asked through the channel, until the channel has
//! copied it into a slot of its own), and together they hold at most [`QUESTION_BYTES`]
//! (4 MiB; [`VERDICT_SLOTS`] questions about the longest path would be 128 MiB). A connection
//! whose question does not fit gets the overload decision the same way, counted and logged the
//! same way; an inbound miss whose question does not fit gets the default and is not asked about
//! in the background.
//!
//! Inbound pends share the bound: each takes a slot before its pend, and gives it back when its
//! question ends (nothing is reauthorized at `ALE_AUTH_RECV_ACCEPT`). An inbound miss beyond it
//! gets the default and a background ask (see the inbound decision below), counted in
//! [`StatsSnapshot::inbound_not_pended`] rather than `overloaded`; the burst's log lines count it
//! with the refused outbound connections.
//!
//! A slot is freed only by the reauthorization that takes its verdict (or by the classification
//! that reserved it, when it decides without pending). WFP reauthorizes every connection whose
//! pend at `ALE_AUTH_CONNECT` is completed; if it ever did not, that slot would stay taken until
//! unload (which then gives up after its grace period and says so), and the bound would shrink
//! by one.
//!
//! # The decision, inbound (`ALE_AUTH_RECV_ACCEPT`)
//!
//! Completing a pend at `ALE_AUTH_RECV_ACCEPT` does not reauthorize the connection: the packet
//! that carried it is absorbed, and only a callout that cloned it and reinjects the clone
//! (`FwpsInjectTransportReceiveAsync0`) lets the connection through (Microsoft's "Processing
//! classify callouts asynchronously"; [`wfp_rs::inject`]). So the inbound callout pends *and
//! clones*: a new connection the cache does not answer takes a slot of the same bound as the
//! outbound pends ([`Config::max_pending`], and [`QUESTION_BYTES`] for its question), its packet
//! is cloned ([`Classify::clone_for_receive`]), the classification pended (BLOCK + ABSORB) and
//! the service asked exactly as for an outbound connection, on either design. The question's
//! end (exactly once, whatever ends it) completes the pend, then, if the verdict allows,
//! reinjects the clone with the driver's injection handle — the packet crosses the inbound
//! layers again, and the connection is established — or, if it denies, frees the clone, and
//! the attempt fails. Nothing is recorded (there is no reauthorization to answer); the slot is
//! freed at once.
//!
//! The reinjected packet meets this callout again. [`Classify::injection_state`] says it is the
//! driver's own (`InjectedBySelf`) and it is permitted without asking, before anything else:
//! asking would pend it again, forever. So the service is asked once per attempt.
//!
//! | situation | decision |
//! |---|---|
//! | the driver's own reinjected packet (`InjectedBySelf`) | permit, nobody asked; counted in [`StatsSnapshot::own_reinjections`] |
//! | a loopback connection, with [`Config::permit_loopback`] | permit, nobody asked |
//! | a live cached verdict for the cache key | that verdict, at once |
//! | an image path no request can carry whole | **deny**, whatever the default, at once; nobody asked |
//! | a new connection, within the bound | pended with a clone of its packet ([`StatsSnapshot::inbound_pended`]); **the service's verdict at the first attempt**: allow reinjects the clone ([`StatsSnapshot::reinjected`]), deny frees it ([`StatsSnapshot::clones_dropped`]) |
//! | the service does not answer (every "the default" row of the outbound table: no service, killed, timeout, a reply that does not decode or answers another request, unload) | the default, the same way: allow reinjects the clone, deny frees it |
//! | the stack refuses to inject the clone | the clone is freed and this attempt fails (logged, counted in `clones_dropped`); the peer's next attempt is decided again |
//! | **port**: the work item cannot be queued (no pool) | the pend and the clone are in the closure that came back, which cannot give them back: dropping it completes the pend and frees the clone, so this attempt fails **whatever the default** (counted in `defaults` and `clones_dropped`) |
//! | **overload**: [`Config::max_pending`] connections (out and in) are outstanding, or the question does not fit in [`QUESTION_BYTES`]; or the packet cannot be cloned | not pended ([`StatsSnapshot::inbound_not_pended`]): **the default, at once**, and the service is asked *in the background* (below) |
//! | a reauthorization (not pendable) | the default at once, and a background ask |
//! | an established connection reauthorized after a policy change | the cache's verdict if it has one; else kept while the service is asked in the background (see "Established connections") |
//! | the driver is unloading | the default, at once (nothing is pended any more) |
//!
//! Overload falls back to the first version's answer: the default at once, and, unless
//! [`Config::background_asks`] questions are in flight already, its question does not fit in
//! [`QUESTION_BYTES`], or the driver is unloading, the question channel (or, with
//! [`AskVia::PortAndWorkItem`] or a question too long for the channel, a work item over the
//! port) asks the service in the background; its verdict is cached if the reply allows it, so
//! the peer's next attempt — a TCP SYN is retransmitted after about a second — gets it. (Unlike
//! an outbound connection it gets the default, not [`Config::overload`]: with a fail-open
//! default, a flood of new inbound peers gets in until the bound frees, so a product that fails
//! open should keep [`Config::max_pending`] large.) The background asks are bounded so a flood of
//! new peers cannot queue unbounded work items; a miss beyond that bound just gets the default,
//! and is counted ([`StatsSnapshot::background_skipped`]).
//!
//! The injection handle ([`InjectionHandle`], both IP versions) is created at load and
//! destroyed at unload after every pend is concluded; destroying it waits for the injections
//! still in flight.
//!
//! # The whole path
//!
//! A question carries the connection's whole image path, as the `ALE_APP_ID` field holds it:
//! the service's rules match paths (`app = '**\nc.exe'`), and a question about part of a path
//! could be answered more permissively than one about the whole path — under a default-allow
//! policy, a program started from a long path would escape a deny rule naming its file. So:
//!
//! - **No path Windows produces is cut.** A path is at most [`MAX_PATH_UNITS`] (32767) UTF-16
//!   units, `UNICODE_STRING_MAX_CHARS`: a `UNICODE_STRING`'s length is a `USHORT` count of
//!   bytes. (INFERRED: that WFP builds the application id from the image's `UNICODE_STRING`;
//!   its documented type is an `FWP_BYTE_BLOB`, which has no such bound.) A request is 74 bytes
//!   to [`REQUEST_MAX_LEN`] (65608), the one size a transport must take.
//! - **One allocation per question, sized to it.** The classify callback checks the path where
//!   the field holds it ([`PathBytes::from_app_id`]), allocates one non-paged buffer of exactly
//!   the request's length (tag `FwRq`), and encodes the request into it
//!   ([`RequestHead::encode_with_path`]) — no other allocation, nothing path-sized on the stack,
//!   so the same code serves at `DISPATCH_LEVEL`. The channel copies those bytes into a slot
//!   it allocated at load; the work item sends them as they are ([`ServerPort::send_encoded`]).
//! - **The defensive bound denies.** An application id a request cannot carry whole (longer
//!   than the bound, an odd number of bytes, a NUL inside) is never asked about with a part of
//!   it; the connection is denied — the one decision never more permissive than the service's —
//!   whatever [`Config::default`], wherever the cache does not answer (new connections and
//!   reauthorizations, out and in; the cache holds only verdicts asked with a whole path, and
//!   its key hashes the whole application id). It is counted
//!   ([`StatsSnapshot::unaskable`]) and logged (`firewall: pid 42 outbound: deny (the image
//!   path cannot be sent whole: …)`).
//!
//! # The verdict cache
//!
//! The key is (process id, image path hash, direction, IP protocol, remote address, remote
//! port, and for inbound connections the local port). An outbound connection's local port is
//! not part of it: every new outbound connection has a fresh one, so a key with it would never
//! be found again; a verdict that depends on it (a rule's `local_port`) must not be granted a
//! cache lifetime, and the example service grants none. An inbound connection's local port is
//! the port connected to, which rules name (`local_port = 22`) and a retransmission repeats. The
//! image path is hashed in (`wfp_rs::pend::app_hash` over the whole application id, every byte
//! of it: SipHash-2-4 under a secret drawn when the driver loads) so a reused process id does
//! not inherit a verdict, two programs whose paths differ only far along (past any length) have
//! different keys, and a path crafted to hash like an allowed image's cannot be computed.
//!
//! The cache is the public module [`cache`] ([`cache::VerdictCache`]), for
//! other drivers (and the benchmarks' C-style baseline) to use as it is.
//!
//! - **Bounded**: [`Config::cache_capacity`] entries (rounded down to a multiple of [`WAYS`]),
//!   allocated once by [`start`], 64 bytes each ([`cache::BYTES_PER_VERDICT`]; 64 KiB for the
//!   default 1024). Lookups and insertions never allocate.
//! - **Set-associative**: the key's hash picks a set of [`WAYS`] slots; a lookup scans one set
//!   under a spin lock, at any IRQL up to `DISPATCH_LEVEL`, so its cost does not grow with the
//!   capacity.
//! - **Eviction**: a new verdict takes its key's own slot, else a free slot of the set, else the
//!   slot that expired first, else the oldest entry of the set (first inserted). (A cache with
//!   fewer than [`WAYS`] entries is one set: plain "expired first, then oldest".)
//! - **Expiry**: a verdict lives `cache_seconds` from the reply (at most one day,
//!   [`firewall_protocol::MAX_CACHE_SECONDS`]), measured on the kernel's interrupt-time clock
//!   ([`wfp_rs::time::Instant`], which the wall clock's changes do not move); a lookup that
//!   finds it expired removes it and asks again. `cache_seconds = 0` means "do not cache".
//! - **Revocable**: each entry remembers the `request_id` of the reply that created it. The
//!   [`REVOKE`] command removes the entries of the listed requests, or all of them
//!   ([`Revoke::All`]). A reply whose question was asked *before* a revoke command and that
//!   arrives after it is applied to its connection but not cached, whatever the command named:
//!   it may be an answer under the rules the service just replaced.
//!
//! # Established connections
//!
//! A rules change reaches connections that are already established. When the service revokes
//! cached verdicts (the [`REVOKE`] command, which it sends after loading new rules), the driver
//! makes a *policy change*: it adds a filter at `ALE_AUTH_CONNECT` and `ALE_AUTH_RECV_ACCEPT`
//! (IPv4 and IPv6) and deletes it again, in a dynamic session of its own; the filters never
//! match (TCP from local port 0). WFP documents a filter added or deleted at the layer that
//! authorized an ALE flow as the policy change that reauthorizes the flow ("ALE
//! Reauthorization"): the flow's next packet, in either direction, is classified again at that
//! layer with `FWP_CONDITION_FLAG_IS_REAUTHORIZE` and the reason `POLICY_CHANGE`.
//!
//! Such a reauthorization cannot be pended. The callouts answer it from the cache; after a
//! revoke the cache usually has nothing, so the connection is **kept** and the service is asked
//! in the background (within [`Config::background_asks`]). The answer goes to the cache; a deny
//! makes another policy change (from a work item: the engine is called at `PASSIVE_LEVEL`), so
//! the connection's next packet meets the cached deny and WFP tears the flow down. A connection
//! the new rules allow runs on; its allow makes no policy change. So a denied established
//! connection is cut about one service round trip after the rules change, at its next packet
//! after that — not at once, and a connection that sends nothing is cut when it next does.
//! [`StatsSnapshot::policy_changes`] counts the policy changes.
//!
//! # The service's own traffic
//!
//! The service needs no network to do its job (it talks to the driver over the port and the
//! control device, which WFP does not see), and its connections, if it makes any, are decided
//! by its rules like every other process's — there is no exemption by process id. Exempting the
//! connected service's process would need its process id in the port's connect callback, which
//! the SDK does not expose yet, and trusting a process id the service *claims* would let any
//! administrator-run process exempt another. A service that does connect out should allow
//! itself in its rules and must not make that connection from the thread that answers the
//! driver: that connection would wait for the answer the same thread has to give, and time out
//! into the default.
//!
//! # Control device
//!
//! The [`REVOKE`] command arrives as a buffered I/O control request on the control device
//! [`CONTROL_DEVICE_NAME`] ([`ControlDevice`]; only administrators and SYSTEM may open it,
//! and the handler runs in the service's thread at `PASSIVE_LEVEL`): its input is decoded
//! with [`Revoke::decode`] and answered with [`Revoked`] (8 bytes; a smaller output buffer is
//! `STATUS_BUFFER_TOO_SMALL`, a malformed request `STATUS_INVALID_PARAMETER`). Any other control
//! code is `STATUS_INVALID_DEVICE_REQUEST`.
//!
//! # Only the service answers
//!
//! The port takes one connection ([`SERVICE_CONNECTIONS`]), and its security descriptor admits
//! every administrator's process. So while the service restarts, another elevated process could
//! connect first, keep the service out and answer "allow" to everything. With
//! [`Config::service_sid`] or [`Config::service_image`] set, [`start`] calls
//! [`Driver::admit_only`](wfp_rs::driver::Driver::admit_only) before it creates the port and the
//! control device: both then refuse every other process with `STATUS_ACCESS_DENIED`, the port
//! before that process takes the slot (the SDK checks the connecting process's token and image
//! in its context: see [`wfp_rs::client`]). The service's SID is best: its per-service SID
//! when it runs as a Windows service with `sc sidtype <name> unrestricted`. With neither set,
//! the driver behaves as before — any administrator — and warns on the debugger at load.
//!
//! `DriverEntry` reads the identity from the driver's service key, where the installer writes
//! it ([`admit_installed_service`]: `Parameters\ServiceSid`, `Parameters\ServiceImage`), then
//! starts with [`Config::DEFAULT`], which sets neither field; a `#[driver_entry]` of your own
//! can set them in the [`Config`] instead, as the simulator demo does.
//!
//! # Configuration
//!
//! [`Config`]; `DriverEntry` uses [`Config::DEFAULT`] (fail-closed, a 500 ms timeout, 1024
//! cache entries, loopback permitted, [`VERDICT_SLOTS`] pends at most, deny on overload). A product would read
//! its settings from its service key; here another configuration is a `#[driver_entry]` of
//! your own that calls [`start`], which is what the tests and the service's simulator demo do:
//!
//! ```
//! use core::time::Duration;
//! use firewall_driver::{Config, Firewall};
//! use firewall_protocol::Verdict;
//! use wfp_rs::driver::Driver;
//! use wfp_rs::irql::PassiveLevel;
//! use wfp_rs::Status;
//!
//! #[wfp_rs::driver_entry]
//! fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
//!     let config = Config { default: Verdict::Allow, timeout: Duration::from_secs(2), ..Config::DEFAULT };
//!     firewall_driver::start(irql, driver, config)
//! }
//! # let machine = wfp_rs_sim::Machine::new();
//! # let driver = machine.load_driver("firewall", DriverEntry).unwrap();
//! # machine.unload_driver(driver).unwrap();
//! # assert!(machine.pool_blocks().is_empty());
//! ```
//!
//! # Unloading
//!
//! As in the [seed-fixed example], so that every pended connection gets exactly one decision and
//! unload does not wait for a silent service:
//!
//! 1. [`Firewall::stopping`](DriverState::stopping) sets the "unloading" flag — new connections
//!    get the cache or the default at once, work items that have not asked yet do not ask, no
//!    background ask is queued —, stops the question channel ([`AskChannel::stop`]: every
//!    question outstanding is decided now with the default, so its pend is completed while the
//!    filters are there for the reauthorization, and an inbound pend's clone is reinjected
//!    (fail-open) or freed; it waits for no user-mode thread), and closes
//!    the service's port connection, so a send waiting for a reply fails at once.
//! 2. The SDK waits until no work item is queued or running: every pend is completed.
//! 3. [`Firewall::unload`](DriverState::unload) closes the control device (waiting for a
//!    command in progress), then waits until every completed pend has been reauthorized (no
//!    pend in flight, no slot of the [`VerdictTable`] reserved, the table empty), or until
//!    [`Config::timeout`] + [`REAUTHORIZATION_GRACE`] pass without progress.
//! 4. It closes the engine session (the filters go before the callouts: a terminating filter
//!    whose callout is gone blocks everything), unregisters the callouts, closes the question
//!    channel (its device goes; the service's waits complete as cancelled), closes the port,
//!    destroys the injection handle (which waits for the reinjections still in flight: no clone
//!    outlives the driver), and unregisters the minifilter.
//!
//! # Fail-closed from boot
//!
//! A callout driver's filters exist only while it is loaded, so between the boot and the
//! moment the driver is up — and whenever it is not loaded — nothing filters, and every
//! connection is allowed. [`Config::fail_closed_at_boot`] (the shipped `DriverEntry` reads it
//! from `Parameters\FailClosedAtBoot`, [`installed_fail_closed_at_boot`]) closes that gap with
//! what Windows offers for it:
//!
//! - the provider, sublayer, callout entries and the four filters are added **persistent**, in
//!   a non-dynamic session of their own ([`install_fail_closed_at_boot`]): BFE stores them and
//!   adds them back when it starts. While no driver has registered their callouts, the
//!   terminating filters block (documented for `FwpsCalloutUnregisterById0`: a filter whose
//!   callout is not registered is treated as a block), so from BFE's start until this driver
//!   loads, and after it unloads, TCP and UDP connections are blocked;
//! - four **boot-time** filters ([`BOOT_FILTER_CONNECT_V4`], …) block TCP and UDP (but
//!   loopback) at both layers while the machine boots, from the TCP/IP stack's start until BFE
//!   has started, when persistent filters take over. They name no provider or sublayer (at boot
//!   none of BFE's exist yet);
//! - once loaded, the callouts decide as ever; before the service connects that is
//!   [`Config::default`], which must be deny with this option (`start` refuses a fail-open
//!   default with `STATUS_INVALID_PARAMETER`).
//!
//! Each load with the option replaces the installed objects in one transaction (after the
//! callouts are registered, so no connection meets a filter without its callout). A load
//! **without** it removes them by key ([`Engine::delete_filter_by_key`], callout entries,
//! sublayer, provider), in the same transaction that adds the dynamic filters: loading the
//! driver once with the option off is how to uninstall (set `FailClosedAtBoot` to `0`, load and
//! unload the driver, then remove it). Deleting the driver package while the option is on
//! leaves every TCP and UDP connection blocked. See the repository's `docs/firewall.md`.
//!
//! [`Engine::delete_filter_by_key`]: wfp_rs::engine::Engine::delete_filter_by_key
//!
//! # Logging
//!
//! Each question and decision is logged with the request's id (`firewall: #17: pid 42 outbound
//! tcp 10.0.0.2:50000 -> 192.0.2.1:443: pended, asking the service`, `firewall: #17: allow
//! (service, cached for 60 s)`, `firewall: #18: deny (default: no reply within the timeout)`);
//! cache hits are only counted ([`Stats`]), to keep the hot path short. Unload logs the totals.
//!
//! [seed-fixed example]: https://github.com/wfp-rs/wfp-rs/tree/main/examples/seed-fixed
//! [`ConnectionRequest`]: firewall_protocol::ConnectionRequest
//! [`MAX_PATH_UNITS`]: firewall_protocol::MAX_PATH_UNITS
//! [`REQUEST_MAX_LEN`]: firewall_protocol::REQUEST_MAX_LEN
//! [`PathBytes::from_app_id`]: firewall_protocol::PathBytes::from_app_id
//! [`RequestHead::encode_with_path`]: firewall_protocol::RequestHead::encode_with_path
//! [`ServerPort::send_encoded`]: wfp_rs::port::ServerPort::send_encoded
//! [`ConnectionReply`]: firewall_protocol::ConnectionReply
//! [`ConnectionReply::answers`]: firewall_protocol::ConnectionReply::answers
//! [`Verdict::Deny`]: firewall_protocol::Verdict::Deny
//! [`REVOKE`]: firewall_protocol::control::REVOKE
//! [`Revoke::All`]: firewall_protocol::control::Revoke::All
//! [`Revoke::decode`]: firewall_protocol::control::Revoke::decode
//! [`Revoked`]: firewall_protocol::control::Revoked
//! [`CONTROL_DEVICE_NAME`]: firewall_protocol::control::CONTROL_DEVICE_NAME
//! [`VerdictTable`]: wfp_rs::pend::VerdictTable
//! [`ControlDevice`]: wfp_rs::control::ControlDevice
//! [`ConnectionKey`]: wfp_rs::pend::ConnectionKey
//! [`Classify::pend`]: wfp_rs::callout::Classify::pend
//! [`Classify::clone_for_receive`]: wfp_rs::callout::Classify::clone_for_receive
//! [`Classify::injection_state`]: wfp_rs::callout::Classify::injection_state
//! [`InjectionHandle`]: wfp_rs::inject::InjectionHandle
//! [`SendError::NotConnected`]: wfp_rs::port::SendError::NotConnected
//! [`NotAskedReason::NoService`]: wfp_rs::ask::NotAskedReason::NoService
//! [`SendError::Disconnected`]: wfp_rs::port::SendError::Disconnected
//! [`SendError::Timeout`]: wfp_rs::port::SendError::Timeout
//! [`SendError::Status`]: wfp_rs::port::SendError::Status

#![no_std]

extern crate alloc;

pub mod cache;
mod stats;

use core::fmt;
use core::net::IpAddr;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;
use wfp_rs::pool::PoolArc;

use firewall_protocol::control::{REVOKE, REVOKED_LEN, Revoke, Revoked};
use firewall_protocol::{
    ConnectionReply, Direction, FirewallProtocol, PathBytes, RequestHead, Verdict, request_len,
};
use wfp_rs::ask::{AskChannel, NotAskedReason, Outcome, QuestionHandler};
use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::classify::ClassifyOut;
use wfp_rs::client::{ClientIdentity, Sid};
use wfp_rs::control::{CommandHandler, ControlDevice};
use wfp_rs::driver::{Driver, DriverState};
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::event::{Event, EventKind};
use wfp_rs::filter::{Filter as WfpFilter, FilterAction, FilterFlags, Match};
use wfp_rs::inject::{InjectionHandle, InjectionState, ReceiveClone, ReceiveInjectable};
use wfp_rs::inverted::ControlCode;
use wfp_rs::irql::{AtMostDispatch, DispatchLevel, PassiveLevel, Token};
use wfp_rs::layer::value::{ConditionFlags, IpProtocol};
use wfp_rs::layer::{
    AleAuthConnectV4, AleAuthConnectV6, AleAuthRecvAcceptV4, AleAuthRecvAcceptV6, Field,
    IncomingValues, Layer, fields,
};
use wfp_rs::pend::{
    ConnectionKey, PendError, PendableByCompletionHandle, PendedClassify, VerdictTable,
};
use wfp_rs::pool::{PoolBox, PoolBytes, PoolTag};
use wfp_rs::port::{Filter, Malformed, SendError, ServerPort};
use wfp_rs::time::Instant;
use wfp_rs::work_item::WorkQueue;
use wfp_rs::{Guid, Status, guid, kd_print};

pub use cache::WAYS;
use cache::{Answer, CacheKey, Insert, Lookup, VerdictCache};
use stats::Counter;
pub use stats::{Stats, StatsSnapshot};

#[cfg(all(target_os = "windows", not(feature = "sim")))]
#[global_allocator]
static ALLOCATOR: wfp_rs::pool::PoolAllocator =
    wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"Fwal"));

/// How long a work item waits for the service's reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// How many verdicts the cache holds by default (64 KiB of non-paged pool, at
/// [`cache::BYTES_PER_VERDICT`] each).
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

/// How many inbound background asks may be in flight by default.
pub const DEFAULT_BACKGROUND_ASKS: usize = 8;

/// How many service connections the port accepts at a time: one service; a second instance is
/// refused (`STATUS_CONNECTION_COUNT_LIMIT`) until the first disconnects.
pub const SERVICE_CONNECTIONS: u32 = 1;

/// The size of the table of outbound verdicts waiting for their reauthorization, and the upper
/// bound of [`Config::max_pending`]. Each pended connection reserves a slot before it is pended
/// and frees it when its reauthorization takes the verdict, so a recorded verdict is never
/// evicted; a new connection that finds no free slot is not pended (see the crate
/// documentation). 2048 slots of 80 bytes: 160 KiB of non-paged pool (tag `FwVt`), allocated
/// at load. Enough for a burst of 1024 new connections at once
/// ([benchmarks](https://github.com/wfp-rs/wfp-rs/blob/main/docs/benchmarks.md), (b)) with room to spare.
pub const VERDICT_SLOTS: usize = 2048;

/// The most non-paged pool the questions of the moment may hold together: 4 MiB. A question
/// holds its request, 74 bytes to 64 KiB with the image path
/// ([`REQUEST_MAX_LEN`](firewall_protocol::REQUEST_MAX_LEN)), from its classification to the
/// end of its work item (through the channel, only until the channel copies it into a slot it
/// allocated at load); without this bound, [`VERDICT_SLOTS`] pended connections of a program
/// with the longest path would hold 128 MiB. A new outbound connection whose question does not
/// fit gets [`Config::overload`], as when the slots are taken (see "Overload" in the crate
/// documentation); an inbound one is not pended (the default at once) nor asked about in the
/// background. Questions with the
/// usual paths (40 to 150 units, 156 to 376 bytes) fit by the ten thousand.
pub const QUESTION_BYTES: usize = 4 << 20;

/// How long unload waits, beyond [`Config::timeout`], for the reauthorizations of the
/// connections it completed before it deletes its filters.
pub const REAUTHORIZATION_GRACE: Duration = Duration::from_secs(2);

/// The IP protocols handed to the callouts (see "Where it filters" in the crate documentation).
pub const FILTERED_PROTOCOLS: [IpProtocol; 2] = [IpProtocol::Tcp, IpProtocol::Udp];

/// The weight of this driver's sublayer.
pub const SUBLAYER_WEIGHT: u16 = 0x7D00;

/// The provider that owns the sublayer, callout entries and filters.
pub const PROVIDER: Guid = guid!("6ef0f72b-9146-4430-8724-b8f6d87e65da");
/// The sublayer.
pub const SUBLAYER: Guid = guid!("08d00c6a-7d82-4434-9ce3-29c9ec775842");
/// The callout at `ALE_AUTH_CONNECT_V4`.
pub const CALLOUT_CONNECT_V4: CalloutKey<AleAuthConnectV4> =
    CalloutKey::new(guid!("4ac3ff77-22e4-40be-b382-fce05c732936"));
/// The callout at `ALE_AUTH_CONNECT_V6`.
pub const CALLOUT_CONNECT_V6: CalloutKey<AleAuthConnectV6> =
    CalloutKey::new(guid!("972e0342-866c-4447-b41d-139981bdb90a"));
/// The callout at `ALE_AUTH_RECV_ACCEPT_V4`.
pub const CALLOUT_RECV_ACCEPT_V4: CalloutKey<AleAuthRecvAcceptV4> =
    CalloutKey::new(guid!("1fec78a3-50b9-48f7-874d-ca576f6180fd"));
/// The callout at `ALE_AUTH_RECV_ACCEPT_V6`.
pub const CALLOUT_RECV_ACCEPT_V6: CalloutKey<AleAuthRecvAcceptV6> =
    CalloutKey::new(guid!("d696e655-15ef-410b-92f3-75642e90ea04"));
/// The filter that hands outbound IPv4 TCP and UDP to [`CALLOUT_CONNECT_V4`].
pub const FILTER_CONNECT_V4: Guid = guid!("e94e0469-3137-4bcf-a8f6-351084057091");
/// The filter that hands outbound IPv6 TCP and UDP to [`CALLOUT_CONNECT_V6`].
pub const FILTER_CONNECT_V6: Guid = guid!("983ff833-1a7d-427e-9713-c93963014788");
/// The filter that hands inbound IPv4 TCP and UDP to [`CALLOUT_RECV_ACCEPT_V4`].
pub const FILTER_RECV_ACCEPT_V4: Guid = guid!("4a9e0d4f-09ba-40f1-b27d-0ba024e97ffc");
/// The filter that hands inbound IPv6 TCP and UDP to [`CALLOUT_RECV_ACCEPT_V6`].
pub const FILTER_RECV_ACCEPT_V6: Guid = guid!("f9e394eb-1314-44a7-9b08-b8584470658a");
/// With [`Config::fail_closed_at_boot`]: the boot-time filter that blocks outbound IPv4 TCP and
/// UDP while the machine boots (see "Fail-closed from boot" in the crate documentation).
pub const BOOT_FILTER_CONNECT_V4: Guid = guid!("b7bcc0dc-3933-41b5-a0e6-b81b908d67e9");
/// The boot-time filter that blocks outbound IPv6 TCP and UDP while the machine boots.
pub const BOOT_FILTER_CONNECT_V6: Guid = guid!("5cb10840-482c-43f5-9ef2-99eb7fb336f7");
/// The boot-time filter that blocks inbound IPv4 TCP and UDP while the machine boots.
pub const BOOT_FILTER_RECV_ACCEPT_V4: Guid = guid!("c16e724a-dade-42c2-8725-0b7f60ff9241");
/// The boot-time filter that blocks inbound IPv6 TCP and UDP while the machine boots.
pub const BOOT_FILTER_RECV_ACCEPT_V6: Guid = guid!("05555731-7442-495b-b8c5-1590d69a2956");

/// The value of the driver's `Parameters` key that turns on [`Config::fail_closed_at_boot`]
/// for the shipped `DriverEntry`: `REG_SZ` `"1"` (on) or `"0"` (off, as when it is absent);
/// anything else keeps the driver from loading (`STATUS_INVALID_PARAMETER`). See
/// [`installed_fail_closed_at_boot`].
pub const FAIL_CLOSED_AT_BOOT_PARAMETER: &str = "FailClosedAtBoot";

/// How the driver asks the service about a connection the cache does not answer (see the
/// crate documentation's decision tables: both designs decide the same cases the same way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AskVia {
    /// The question channel ([`wfp_rs::ask`], [`firewall_protocol::ASK_CHANNEL`] on the device
    /// [`Config::ask_device_name`]): `classifyFn` pends and asks at once, at `DISPATCH_LEVEL`,
    /// and the service's answer (or the deadline, or the service going away) completes the
    /// pend. No work item, no thread waits. The default.
    #[default]
    Channel,
    /// A PASSIVE_LEVEL work item sends the question over the filter-manager port
    /// ([`Config::port_name`]) and waits for the reply: the first design, kept so the
    /// benchmarks can compare the two.
    PortAndWorkItem,
}

impl fmt::Display for AskVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AskVia::Channel => "the question channel",
            AskVia::PortAndWorkItem => "the port and a work item",
        })
    }
}

/// The driver's settings.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How the service is asked: [`AskVia::Channel`] in [`Config::DEFAULT`].
    pub ask_via: AskVia,
    /// The question channel's device name (`\Device\<name>`), with [`AskVia::Channel`].
    pub ask_device_name: &'static str,
    /// The decision when the service gives none (see the crate documentation for every case).
    pub default: Verdict,
    /// How long the service has to answer (delivery and reply together): a work item's wait
    /// on the port, or a question's deadline on the channel.
    pub timeout: Duration,
    /// How many verdicts the cache holds (rounded down to a multiple of [`WAYS`]; 0 disables
    /// the cache: every new connection is asked about, and an inbound one beyond
    /// [`max_pending`](Self::max_pending) always gets the default).
    pub cache_capacity: usize,
    /// The filter-manager port the service connects to.
    pub port_name: &'static str,
    /// The control device's name (`\Device\<name>`).
    pub device_name: &'static str,
    /// Permit loopback connections without asking (`true`), or ask about them like any other.
    pub permit_loopback: bool,
    /// How many background asks may be in flight at once (inbound connections beyond
    /// [`max_pending`](Self::max_pending), established connections after a rules change).
    pub background_asks: usize,
    /// How many connections may be pended at once, outbound (counting those completed and
    /// waiting for their reauthorization) and inbound together; at most [`VERDICT_SLOTS`] (a
    /// larger value is clamped). A new outbound connection beyond it that the cache does not
    /// answer gets [`overload`](Self::overload) at once, an inbound one the default and a
    /// background ask (0: the driver never pends).
    pub max_pending: usize,
    /// The decision for a new outbound connection the cache does not answer while
    /// [`max_pending`](Self::max_pending) connections are outstanding. Separate from
    /// [`default`](Self::default) so that a fail-open default does not let a burst of
    /// connections past the deny rules (see "Overload" in the crate documentation).
    pub overload: Verdict,
    /// Counters to update besides the driver's own, for a caller that reads them while the
    /// driver runs (see [`Stats`]).
    pub stats: Option<&'static Stats>,
    /// The service's SID, `S-1-5-…` (its per-service SID `NT SERVICE\<name>`, which
    /// `sc showsid <name>` prints, or the SID of the account it alone runs as): only a process
    /// whose token has it may connect to the port or open the control device (see "Only the
    /// service answers" in the crate documentation). A malformed SID fails the load with
    /// `STATUS_INVALID_SID`.
    pub service_sid: Option<&'static str>,
    /// The service's executable, as an NT path (`\Device\HarddiskVolume3\...\firewall.exe`;
    /// compared case-insensitively): only a process running it may connect or open the device.
    /// With [`service_sid`](Self::service_sid), both must match. With neither, any
    /// administrator's process may, and the driver says so on the debugger at load.
    pub service_image: Option<&'static str>,
    /// Fail closed from boot (see "Fail-closed from boot" in the crate documentation): the
    /// provider, sublayer, callout entries and filters are added **persistent**, with
    /// **boot-time** filters that block TCP and UDP while the machine boots, so that from the
    /// boot until the driver is loaded, and whenever it is not, new connections are blocked
    /// rather than allowed. Requires [`default`](Self::default) = [`Verdict::Deny`] (the
    /// driver does not load otherwise: `STATUS_INVALID_PARAMETER`). Off (`false`, the default):
    /// everything is added in the driver's dynamic session, as ever, and what an earlier load
    /// with the option installed is removed — loading once with it off is how to uninstall.
    pub fail_closed_at_boot: bool,
}

impl Config {
    /// What `DriverEntry` uses: asks through the question channel, fail-closed, [`DEFAULT_TIMEOUT`], [`DEFAULT_CACHE_CAPACITY`],
    /// the protocol's port and device names, loopback permitted, [`DEFAULT_BACKGROUND_ASKS`],
    /// [`VERDICT_SLOTS`] pends at most, deny on overload.
    pub const DEFAULT: Config = Config {
        ask_via: AskVia::Channel,
        ask_device_name: firewall_protocol::ASK_DEVICE_NAME,
        default: Verdict::Deny,
        timeout: DEFAULT_TIMEOUT,
        cache_capacity: DEFAULT_CACHE_CAPACITY,
        port_name: firewall_protocol::PORT_NAME,
        device_name: firewall_protocol::control::CONTROL_DEVICE_NAME,
        permit_loopback: true,
        background_asks: DEFAULT_BACKGROUND_ASKS,
        max_pending: VERDICT_SLOTS,
        overload: Verdict::Deny,
        stats: None,
        service_sid: None,
        service_image: None,
        fail_closed_at_boot: false,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// Why a question was not asked at all (see [`Shared::ask_channel_first`]).
#[derive(Clone, Copy, Debug)]
enum Unasked {
    /// The driver is unloading.
    Unloading,
    /// No service has the question channel open.
    NoService,
}

impl fmt::Display for Unasked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unasked::Unloading => "unloading",
            Unasked::NoService => "no service",
        })
    }
}

impl From<Unasked> for AskError {
    fn from(why: Unasked) -> AskError {
        match why {
            Unasked::Unloading => AskError::Unloading,
            Unasked::NoService => AskError::NoService,
        }
    }
}

/// Why the service's answer could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskError {
    /// The driver is unloading: nothing is asked any more.
    Unloading,
    /// No service has the question channel open: nobody was asked (the service opens the
    /// port and the channel together, so the port is not tried either).
    NoService,
    /// The message was not sent, or no valid reply came back.
    Send(SendError),
    /// The reply is well-formed but answers another request.
    Mismatched {
        /// The request asked.
        asked: u64,
        /// The request the reply names.
        answered: u64,
    },
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::Unloading => f.write_str("unloading"),
            AskError::NoService => f.write_str("no service has the question channel open"),
            AskError::Send(error) => error.fmt(f),
            AskError::Mismatched { asked, answered } => {
                write!(f, "the reply answers request #{answered}, not #{asked}")
            }
        }
    }
}

/// An IP protocol number as the logs show it.
struct ProtocolName(u8);

impl fmt::Display for ProtocolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            6 => f.write_str("tcp"),
            17 => f.write_str("udp"),
            1 => f.write_str("icmp"),
            58 => f.write_str("icmpv6"),
            other => write!(f, "protocol {other}"),
        }
    }
}

/// A connection as a log line describes it.
struct Described<'a>(&'a RequestHead);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let arrow = match r.direction {
            Direction::Outbound => "->",
            Direction::Inbound => "<-",
        };
        write!(
            f,
            "pid {} {} {} {} {arrow} {}",
            r.process_id,
            r.direction,
            ProtocolName(r.ip_protocol),
            Endpoint(r.local_address, r.local_port),
            Endpoint(r.remote_address, r.remote_port),
        )
    }
}

/// `192.0.2.1:443`, `[2001:db8::1]:443`.
struct Endpoint(IpAddr, u16);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}:{}", self.1),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{}", self.1),
        }
    }
}

/// "" or ", cached for N s".
struct CachedFor(Option<u32>);

impl fmt::Display for CachedFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(secs) => write!(f, ", cached for {secs} s"),
            None => Ok(()),
        }
    }
}

/// What one classification is about, read from its fields.
struct Observed {
    key: ConnectionKey,
    direction: Direction,
    /// The `FLAGS` field has `FWP_CONDITION_FLAG_IS_REAUTHORIZE` (read with the loopback flag,
    /// in one read of the field).
    reauthorization: bool,
}

impl Observed {
    fn of<L>(c: &Classify<'_, L>, direction: Direction, flags: ConditionFlags) -> Option<Observed>
    where
        L: Layer,
        L::Address: Into<IpAddr>,
        fields::AleAppId: Field<L>,
        fields::IpProtocol: Field<L>,
        fields::IpLocalAddress: Field<L>,
        fields::IpLocalPort: Field<L>,
        fields::IpRemoteAddress: Field<L>,
        fields::IpRemotePort: Field<L>,
    {
        Some(Observed {
            key: ConnectionKey::of(c)?,
            direction,
            reauthorization: flags.contains(ConditionFlags::IS_REAUTHORIZE),
        })
    }

    fn cache_key(&self) -> CacheKey {
        CacheKey {
            pid: self.key.pid,
            app: self.key.app,
            direction: self.direction,
            protocol: self.key.protocol,
            remote: self.key.remote,
            // Outbound: a fresh port per connection, which would make every key new; the
            // service grants no lifetime to an outbound verdict that depends on it.
            local_port: match self.direction {
                Direction::Inbound => self.key.local.1,
                Direction::Outbound => 0,
            },
        }
    }

    /// The connection's fields but its image path, for request `request_id`.
    fn head(&self, request_id: u64) -> RequestHead {
        RequestHead {
            request_id,
            process_id: self.key.pid,
            direction: self.direction,
            ip_protocol: self.key.protocol,
            local_address: self.key.local.0,
            local_port: self.key.local.1,
            remote_address: self.key.remote.0,
            remote_port: self.key.remote.1,
        }
    }

    /// The question about this connection: the request's wire bytes, with the whole image
    /// path of the `ALE_APP_ID` field, in one pool allocation of exactly the request's length
    /// (74 bytes to 64 KiB).
    ///
    /// The path is checked where the field holds it and copied once, from the field into the
    /// pool: no other buffer, nothing path-sized on the stack (which could not hold 64 KiB, and
    /// where the network stack leaves callouts little room at all). So building a question
    /// allocates one buffer, bounded by
    /// [`REQUEST_MAX_LEN`](firewall_protocol::REQUEST_MAX_LEN), at any IRQL up to
    /// `DISPATCH_LEVEL`; `cargo wfp build -p firewall-driver` (a debug image) checks this
    /// frame's size.
    ///
    /// `path` is the classification's, checked once by [`whole_path`]; `charge` holds the
    /// question's bytes against [`QUESTION_BYTES`] and must be for `request_len(path.units())`
    /// bytes (the buffer is that long whatever it says).
    #[inline(never)]
    fn question(
        &self,
        path: PathBytes<'_>,
        request_id: u64,
        charge: Charge,
        irql: &impl AtMostDispatch,
    ) -> Result<Question, NoRequest> {
        let head = self.head(request_id);
        let mut bytes = PoolBytes::try_zeroed(request_len(path.units()), REQUEST_TAG, irql)
            .map_err(|_| NoRequest::NoPool)?;
        head.encode_with_path(path, &mut bytes)
            .map_err(NoRequest::Unaskable)?;
        Ok(Question {
            head,
            bytes,
            _charge: charge,
        })
    }
}

/// The image path of the classification's `ALE_APP_ID` field, if a request can carry it whole
/// (see [`PathBytes::from_app_id`]). A miss checks it once, here, and sizes, charges and builds
/// its question from the result. It borrows the values only, so the classification's `out` can
/// still be written while the path is held.
/// Whether this classification is a reauthorization a policy change caused (its
/// `REAUTHORIZE_REASON` has the `POLICY_CHANGE` bit): an established connection's, after a
/// filter was added or deleted at its layer ([`change_policy`]).
fn policy_changed<L: Layer>(c: &Classify<'_, L>) -> bool
where
    fields::ReauthorizeReason: Field<L>,
{
    c.values
        .get::<fields::ReauthorizeReason>()
        .is_ok_and(|reason| {
            reason & wfp_rs::sys::FWP_CONDITION_REAUTHORIZE_REASON_POLICY_CHANGE != 0
        })
}

fn whole_path<'v, L>(values: &'v IncomingValues<'_, L>) -> Result<PathBytes<'v>, Malformed>
where
    L: Layer,
    fields::AleAppId: Field<L>,
{
    let app = values
        .get::<fields::AleAppId>()
        .map_err(|_| Malformed("the application id cannot be read"))?;
    PathBytes::from_app_id(app.as_bytes())
}

/// A question for the service: a request's wire bytes, in one pool buffer of exactly their
/// length (tag `FwRq`), and the request's other fields, for the logs and to check the reply.
struct Question {
    head: RequestHead,
    bytes: PoolBytes,
    /// The buffer's share of [`QUESTION_BYTES`], given back with it.
    _charge: Charge,
}

/// Bytes charged to [`QUESTION_BYTES`], given back when dropped (at any IRQL up to
/// `DISPATCH_LEVEL`: wherever the question goes).
struct Charge {
    shared: PoolArc<Shared>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.shared
            .question_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Why no question was built for a connection.
#[derive(Clone, Copy, Debug)]
enum NoRequest {
    /// The image path cannot be carried whole (see [`PathBytes::from_app_id`]): the connection
    /// is denied, never asked about with part of its path.
    Unaskable(Malformed),
    /// No pool for the request.
    NoPool,
}

impl fmt::Display for NoRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRequest::Unaskable(why) => write!(f, "the image path cannot be sent whole: {why}"),
            NoRequest::NoPool => f.write_str("no pool for the request"),
        }
    }
}

/// The pool tag of the requests work items carry.
const REQUEST_TAG: PoolTag = PoolTag::new(b"FwRq");

/// The pool tag of the verdict table.
const VERDICTS_TAG: PoolTag = PoolTag::new(b"FwVt");
/// The tag of the state the callouts, the work items and the control device share.
const SHARED_TAG: PoolTag = PoolTag::new(b"FwSh");
/// The tag of the question channel's shared handle.
const CHANNEL_TAG: PoolTag = PoolTag::new(b"FwCh");

/// Adds one to `counter` unless it has reached `limit`; whether it did.
fn increment_below(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

/// The classification's `FLAGS` field; none if it cannot be read.
fn flags<L: Layer>(c: &Classify<'_, L>) -> ConditionFlags
where
    fields::Flags: Field<L>,
{
    c.values
        .get::<fields::Flags>()
        .unwrap_or(ConditionFlags::empty())
}

/// Applies `verdict`: a soft permit (a lighter sublayer may still block) or a hard block.
fn apply(out: &mut ClassifyOut<'_>, verdict: Verdict) {
    match verdict {
        Verdict::Allow => {
            // Without the write right this changes nothing: a hard decision stands.
            let _ = out.permit();
        }
        Verdict::Deny => {
            out.block();
        }
    }
}

/// What the callouts, work items and the control device share.
struct Shared {
    config: Config,
    port: ServerPort<FirewallProtocol>,
    cache: VerdictCache,
    /// In its own allocation: at 160 KiB it cannot pass through a kernel stack.
    verdicts: PoolBox<VerdictTable<Verdict, VERDICT_SLOTS>>,
    /// Set at unload: nothing is pended or asked any more.
    unloading: AtomicBool,
    /// Classifications that may pend (outbound, and inbound within the bound) between their
    /// check of `unloading` and their decision: the channel's `decide`, the end of their work
    /// item, or the path that decided without asking.
    in_flight: AtomicUsize,
    /// Connections holding a slot of the bound: reserved before the pend, freed when the
    /// reauthorization takes the verdict (outbound), when the question ends (inbound: nothing
    /// is reauthorized), or when the classification decides without pending or recording. At
    /// most `config.max_pending`, so `verdicts` never fills.
    outstanding: AtomicUsize,
    /// New connections refused a slot since the last one that got one: the current overload
    /// burst, logged when it starts and when it ends rather than per connection.
    overload_burst: AtomicU64,
    /// Bytes of pool the questions of the moment hold, at most [`QUESTION_BYTES`] (see
    /// [`Charge`]).
    question_bytes: AtomicUsize,
    /// Set, while unloading, when `in_flight` drops to zero or a recorded verdict is taken.
    progress: Event,
    next_request: AtomicU64,
    /// Inbound background asks queued or running.
    background: AtomicUsize,
    /// Set when a verdict denies an established connection: a policy change must reauthorize
    /// it ([`Shared::change_policy_if_due`]).
    policy_change_due: AtomicBool,
    /// Reinjects the clones of the inbound packets the service allowed, and recognises them
    /// when they cross `ALE_AUTH_RECV_ACCEPT` again. Destroyed at unload, after every pend is
    /// concluded (destroying it waits for its injections in flight).
    injection: InjectionHandle,
    own_stats: Stats,
}

impl Shared {
    fn count(&self, counter: Counter) {
        self.own_stats.count(counter);
        if let Some(stats) = self.config.stats {
            stats.count(counter);
        }
    }

    fn count_n(&self, counter: Counter, n: u64) {
        self.own_stats.add(counter, n);
        if let Some(stats) = self.config.stats {
            stats.add(counter, n);
        }
    }

    fn request_id(&self) -> u64 {
        // Ids only need to differ; 0 is never used, so a zeroed reply never matches.
        self.next_request.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A new connection's classification, or its work item, is done.
    fn finished(&self, irql: &impl AtMostDispatch) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.unloading.load(Ordering::SeqCst)
        {
            self.progress.set(irql);
        }
    }

    /// The start of both callouts' classification. A loopback connection (when
    /// [`Config::permit_loopback`]) is permitted, and one whose fields cannot be read gets the
    /// default: either way it is decided, and `None` returned. Otherwise what the
    /// classification is about, and its cache key.
    fn observe<L>(
        &self,
        c: &mut Classify<'_, L>,
        direction: Direction,
    ) -> Option<(Observed, CacheKey)>
    where
        L: Layer,
        L::Address: Into<IpAddr>,
        fields::AleAppId: Field<L>,
        fields::Flags: Field<L>,
        fields::IpProtocol: Field<L>,
        fields::IpLocalAddress: Field<L>,
        fields::IpLocalPort: Field<L>,
        fields::IpRemoteAddress: Field<L>,
        fields::IpRemotePort: Field<L>,
    {
        let flags = flags(c);
        if self.config.permit_loopback && flags.contains(ConditionFlags::IS_LOOPBACK) {
            self.count(Counter::Loopback);
            apply(&mut c.out, Verdict::Allow);
            return None;
        }
        let Some(observed) = Observed::of(c, direction, flags) else {
            let default = self.config.default;
            self.count(Counter::Defaults);
            // "firewall: outbound: …" or "firewall: inbound: …", as each callout logged it.
            kd_print!(
                Warning,
                "firewall: {direction}: {default} (default: the connection's fields cannot be read)\n"
            );
            apply(&mut c.out, default);
            return None;
        };
        let cache_key = observed.cache_key();
        Some((observed, cache_key))
    }

    /// Denies a classification whose image path no request can carry whole ([`whole_path`]
    /// said `why`). Called wherever a connection the cache does not answer would otherwise
    /// be asked about or given the default (or the overload decision): a question about part
    /// of a path could be answered more permissively than the service would answer about the
    /// whole path, and so could the default. (A cache hit needs no check: only a question with
    /// the whole path puts a verdict in the cache, and the key hashes every byte of the
    /// application id. It keeps the hit path to one pass over the path, the key's.)
    fn deny_unaskable(&self, out: &mut ClassifyOut<'_>, observed: &Observed, why: Malformed) {
        self.unaskable(observed, &why);
        apply(out, Verdict::Deny);
    }

    /// Counts and logs a connection denied because its image path cannot be sent whole.
    fn unaskable(&self, observed: &Observed, why: &dyn fmt::Display) {
        self.count(Counter::Unaskable);
        kd_print!(
            Warning,
            "firewall: pid {} {}: deny (the image path cannot be sent whole: {why})\n",
            observed.key.pid,
            observed.direction
        );
    }

    /// The cache's verdict for `key` now, counting a hit or an expiry.
    fn cached<I: Token>(&self, irql: &mut I, key: &CacheKey) -> Option<Verdict> {
        match self.cache.lookup(irql, key, Instant::now()) {
            Lookup::Hit(verdict) => {
                self.count(Counter::CacheHits);
                Some(verdict)
            }
            Lookup::Expired => {
                self.count(Counter::Expired);
                None
            }
            Lookup::Miss => None,
        }
    }

    /// Asks the service `question` over the port (the work item's job), and returns its
    /// reply; [`conclude`](Self::conclude) checks that it answers the question.
    fn ask_on_port(
        &self,
        irql: &PassiveLevel<'_>,
        question: &Question,
    ) -> Result<ConnectionReply, AskError> {
        if self.unloading.load(Ordering::SeqCst) {
            return Err(AskError::Unloading);
        }
        self.count(Counter::AskedViaPort);
        self.port
            .send_encoded(irql, &question.bytes, self.config.timeout)
            .map_err(AskError::Send)
    }

    /// Caches `reply`'s verdict for `key` if the reply grants it a lifetime and no revocation
    /// came since cache generation `generation` (read before the question was asked). Returns
    /// how long it was cached.
    fn cache_reply<I: Token>(
        &self,
        irql: &mut I,
        key: &CacheKey,
        reply: &ConnectionReply,
        generation: u64,
    ) -> Option<u32> {
        let lifetime = reply.cache?;
        let now = Instant::now();
        let expires = now.saturating_add(Duration::from_secs(u64::from(lifetime.as_secs())));
        let answer = Answer {
            verdict: reply.verdict,
            expires,
            request_id: reply.request_id,
        };
        let outcome = self.cache.insert(&mut *irql, *key, answer, now, generation);
        let cached = match outcome {
            Insert::Added => true,
            Insert::ReplacedExpired => {
                self.count(Counter::Expired);
                true
            }
            Insert::Evicted => {
                self.count(Counter::Evicted);
                true
            }
            Insert::Revoked => {
                self.count(Counter::NotCachedRevoked);
                false
            }
            Insert::Disabled => false,
        };
        if cached {
            self.count(Counter::Cached);
        }
        cached.then_some(lifetime.as_secs())
    }

    /// The end of every question, on either design, with the service's `reply` or why there
    /// is none: checks that the reply answers the question, caches its verdict if the reply
    /// grants it a lifetime and no revocation came since the question was asked, and logs.
    /// Then, for a pended connection, records the verdict (or the default) for its
    /// reauthorization and completes the pend; for an inbound background ask, frees its place.
    /// `via` says in the log which design asked (`", channel"` or nothing).
    fn conclude<I: Token>(
        &self,
        irql: &mut I,
        asked: Asked,
        reply: Result<ConnectionReply, impl fmt::Display>,
        via: &str,
    ) {
        let id = asked.request_id;
        let default = self.config.default;
        let later = match asked.waiting {
            Waiting::Connection(_) | Waiting::Inbound { .. } => "",
            Waiting::LaterAttempts => " for later attempts",
            Waiting::Established => " for an established connection",
        };
        let verdict = match reply {
            Ok(reply) if reply.request_id == id => {
                self.count(Counter::Answered);
                let cached =
                    self.cache_reply(&mut *irql, &asked.cache_key, &reply, asked.generation);
                kd_print!(
                    "firewall: #{id}: {}{later} (service{via}{})\n",
                    reply.verdict,
                    CachedFor(cached)
                );
                Some(reply.verdict)
            }
            no_answer => {
                let mismatched;
                let why: &dyn fmt::Display = match &no_answer {
                    Ok(reply) => {
                        mismatched = AskError::Mismatched {
                            asked: id,
                            answered: reply.request_id,
                        };
                        &mismatched
                    }
                    Err(why) => why,
                };
                match asked.waiting {
                    Waiting::Connection(_) | Waiting::Inbound { .. } => {
                        self.count(Counter::Defaults);
                        kd_print!(Warning, "firewall: #{id}: {default} (default: {why})\n");
                    }
                    Waiting::LaterAttempts => kd_print!(
                        Warning,
                        "firewall: #{id}: no verdict for later attempts ({why})\n"
                    ),
                    // It keeps running; the next policy change asks again.
                    Waiting::Established => kd_print!(
                        Warning,
                        "firewall: #{id}: no verdict for an established connection ({why})\n"
                    ),
                }
                None
            }
        };
        match asked.waiting {
            Waiting::Connection(pended) => {
                // Recorded before the completion: the reauthorization may run before
                // `complete` returns.
                self.record(&mut *irql, asked.key, verdict.unwrap_or(default));
                pended.complete(&*irql);
                self.finished(&*irql);
            }
            Waiting::Inbound { pended, clone } => {
                // Completed first, as for any pend; the clone then decides the attempt.
                pended.complete(&*irql);
                self.reinject_or_drop(&*irql, id, clone, verdict.unwrap_or(default));
                // No reauthorization follows at RECV_ACCEPT: the slot is free now.
                self.release(&*irql);
                self.finished(&*irql);
            }
            Waiting::LaterAttempts => {
                self.background.fetch_sub(1, Ordering::SeqCst);
            }
            Waiting::Established => {
                self.background.fetch_sub(1, Ordering::SeqCst);
                if verdict == Some(Verdict::Deny) {
                    self.policy_change_due.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Ends an inbound attempt whose pend was completed: `verdict` allows, so its packet's clone
    /// is reinjected (it crosses the inbound layers again, and the callout permits it as its
    /// own), or denies, so the clone is freed and the attempt fails. A clone the stack refuses
    /// to inject is freed too: that attempt fails whatever the verdict, and the peer's next one
    /// is asked about (or answered from the cache) again.
    fn reinject_or_drop(
        &self,
        irql: &impl AtMostDispatch,
        request_id: u64,
        clone: ReceiveClone,
        verdict: Verdict,
    ) {
        match verdict {
            Verdict::Allow => match clone.inject(irql, &self.injection) {
                Ok(()) => self.count(Counter::Reinjected),
                Err(refused) => {
                    self.count(Counter::ClonesDropped);
                    kd_print!(
                        Warning,
                        "firewall: #{request_id}: allowed, but the packet was not reinjected ({refused}); this attempt fails\n"
                    );
                    drop(refused.packet);
                }
            },
            Verdict::Deny => {
                self.count(Counter::ClonesDropped);
                drop(clone);
            }
        }
    }

    /// Takes a slot of the verdict table for a connection about to be pended, and charges its
    /// question's `bytes` to [`QUESTION_BYTES`], unless [`Config::max_pending`] slots are
    /// taken already or the bytes do not fit. Logs the start and the end of an overload burst,
    /// not each refused connection.
    fn reserve(this: &PoolArc<Shared>, bytes: usize) -> Option<Charge> {
        let limit = this.config.max_pending;
        let overload = this.config.overload;
        let charge = if increment_below(&this.outstanding, limit) {
            let charge = Shared::try_charge(this, bytes);
            if charge.is_none() {
                // No progress to signal: this classification is still in flight.
                this.outstanding.fetch_sub(1, Ordering::SeqCst);
            }
            charge.ok_or(false)
        } else {
            Err(true)
        };
        let charge = match charge {
            Ok(charge) => charge,
            Err(slots) => {
                if this.overload_burst.fetch_add(1, Ordering::Relaxed) == 0 {
                    if slots {
                        kd_print!(
                            Warning,
                            "firewall: {limit} connections pended or awaiting reauthorization; new connections the cache does not answer get {overload} (overload) until one is reauthorized (inbound ones: the default)\n"
                        );
                    } else {
                        kd_print!(
                            Warning,
                            "firewall: the questions waiting for the service hold {QUESTION_BYTES} bytes of pool; new connections the cache does not answer get {overload} (overload) until some are answered (inbound ones: the default)\n"
                        );
                    }
                }
                return None;
            }
        };
        // A load first, so the common case (no overload) writes nothing shared.
        if this.overload_burst.load(Ordering::Relaxed) != 0 {
            let refused = this.overload_burst.swap(0, Ordering::Relaxed);
            if refused != 0 {
                kd_print!(
                    Warning,
                    "firewall: pending again; {refused} connection(s) got {overload} (overload) or, inbound, the default while the driver was at its bound\n"
                );
            }
        }
        Some(charge)
    }

    /// Charges `bytes` of question to [`QUESTION_BYTES`], if they fit.
    fn try_charge(this: &PoolArc<Shared>, bytes: usize) -> Option<Charge> {
        let fits = this
            .question_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= QUESTION_BYTES)
            })
            .is_ok();
        fits.then(|| Charge {
            shared: PoolArc::clone(this),
            bytes,
        })
    }

    /// Frees a slot taken by [`reserve`](Self::reserve).
    fn release(&self, irql: &impl AtMostDispatch) {
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && self.unloading.load(Ordering::SeqCst)
        {
            self.progress.set(irql);
        }
    }

    /// Records `verdict` for `key`'s reauthorization, in the slot the classification reserved.
    /// Call it before completing the pend: the reauthorization may run before `complete`
    /// returns.
    fn record<I: Token>(&self, irql: &mut I, key: ConnectionKey, verdict: Verdict) {
        match self.verdicts.try_record(&mut *irql, key, verdict) {
            Ok(None) => {}
            // Two pends of one connection key at once (same process, image and both
            // endpoints): one verdict answers one of their reauthorizations, and the other
            // falls back to the cache or the default. Its slot is not needed any more.
            Ok(Some(_)) => {
                kd_print!(
                    Warning,
                    "firewall: pid {}: a second pend of the same connection; one reauthorization falls back to the cache or the default\n",
                    key.pid
                );
                self.release(irql);
            }
            // Cannot happen while every pend reserves a slot first; if it did, this verdict
            // is lost, not another one.
            Err(full) => {
                kd_print!(
                    Error,
                    "firewall: pid {}: {full} although a slot was reserved; its reauthorization falls back to the cache or the default\n",
                    key.pid
                );
                self.release(irql);
            }
        }
    }

    /// At unload: stops new pends, then waits until every pend this driver made is completed
    /// and reauthorized (see the crate documentation). Returns whether everything settled.
    fn settle(&self, irql: &mut PassiveLevel<'_>) -> bool {
        // Sequentially consistent with `classify`'s increment of `in_flight` and its load of
        // `unloading`: either a classification sees the flag and does not pend, or this sees
        // it in flight and waits for it.
        self.unloading.store(true, Ordering::SeqCst);
        let patience = self.config.timeout.saturating_add(REAUTHORIZATION_GRACE);
        let settled = |irql: &mut PassiveLevel<'_>| {
            self.in_flight.load(Ordering::SeqCst) == 0
                && self.outstanding.load(Ordering::SeqCst) == 0
                && self.verdicts.is_empty(irql)
        };
        loop {
            // Cleared before the check, so a signal after the check ends the wait.
            self.progress.clear(irql);
            if settled(irql) {
                return true;
            }
            if !self.progress.wait_timeout(irql, patience) {
                return settled(irql);
            }
        }
    }
}

/// The outbound callout, at `ALE_AUTH_CONNECT_V4` and `_V6`: cache, else pend and ask through
/// the question channel (or from a work item over the port), and answer the reauthorization from
/// the recorded verdict.
pub struct Outbound {
    shared: PoolArc<Shared>,
    queue: WorkQueue,
    /// The question channel, with [`AskVia::Channel`].
    channel: Option<PoolArc<QuestionChannel>>,
}

impl<L: PendableByCompletionHandle> Callout<L> for Outbound
where
    L::Address: Into<IpAddr>,
    fields::ReauthorizeReason: Field<L>,
    fields::AleAppId: Field<L>,
    fields::Flags: Field<L>,
    fields::IpProtocol: Field<L>,
    fields::IpLocalAddress: Field<L>,
    fields::IpLocalPort: Field<L>,
    fields::IpRemoteAddress: Field<L>,
    fields::IpRemotePort: Field<L>,
{
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let shared = &self.shared;
        let default = shared.config.default;
        let Some((observed, cache_key)) = shared.observe(c, Direction::Outbound) else {
            return;
        };
        // A reauthorization is decided here, or (an established connection after a rules
        // change) asked about below, from this frame as a new connection is: the outbound
        // classification's stack is the driver's deepest.
        let (question, waiting) = if observed.reauthorization {
            match Shared::reauthorized(shared, irql, c, &observed, cache_key) {
                Some(question) => (question, Waiting::Established),
                None => return,
            }
        } else {
            // The hot path, a cached verdict, in this frame: no call that takes the observed
            // connection and its key by value.
            if let Some(verdict) = shared.cached(irql, &cache_key) {
                apply(&mut c.out, verdict);
                return;
            }
            match Shared::pended_question(shared, irql, c, &observed) {
                Some((question, pended)) => (question, Waiting::Connection(pended)),
                None => return,
            }
        };
        let key = observed.key;
        let request_id = question.head.request_id;
        let channel = self.channel.as_deref();
        let asked =
            match shared.ask_channel_first(irql, channel, &question, waiting, key, cache_key) {
                // `Decisions::decide` concludes it, exactly once.
                Ok(None) => return,
                Ok(Some(asked)) => asked,
                // Unloading, or nobody to ask: the default, recorded for the
                // reauthorization (an established connection is kept).
                Err((asked, why)) => {
                    return shared.conclude(
                        irql,
                        asked,
                        Err::<ConnectionReply, AskError>(why.into()),
                        "",
                    );
                }
            };
        if matches!(asked.waiting, Waiting::Established) {
            return Shared::ask_background_on_port(shared, &*irql, &self.queue, question, asked);
        }
        let work = PoolArc::clone(shared);
        let queued = self.queue.queue(irql, move |passive| {
            let reply = work.ask_on_port(passive, &question);
            work.conclude(passive, asked, reply, "");
        });
        if let Err(not_queued) = queued {
            shared.count(Counter::Defaults);
            kd_print!(
                Warning,
                "firewall: #{request_id}: {default} (default: {not_queued})\n"
            );
            shared.record(irql, key, default);
            // Dropping the closure drops the pend in it, which completes it; the
            // reauthorization finds the default recorded.
            drop(not_queued);
            shared.finished(irql);
        }
    }
}

/// The inbound callout, at `ALE_AUTH_RECV_ACCEPT_V4` and `_V6`: cache, else pend, clone the
/// packet and ask through the question channel (or from a work item over the port), and
/// reinject the clone if the service allows; its own reinjected packet is permitted without
/// asking. Beyond the bound, the default at once and a background ask whose answer serves the
/// next attempt (see the crate documentation).
pub struct Inbound {
    shared: PoolArc<Shared>,
    queue: WorkQueue,
    /// The question channel, with [`AskVia::Channel`].
    channel: Option<PoolArc<QuestionChannel>>,
}

impl<L: PendableByCompletionHandle + ReceiveInjectable> Callout<L> for Inbound
where
    L::Address: Into<IpAddr>,
    fields::ReauthorizeReason: Field<L>,
    fields::AleAppId: Field<L>,
    fields::Flags: Field<L>,
    fields::IpProtocol: Field<L>,
    fields::IpLocalAddress: Field<L>,
    fields::IpLocalPort: Field<L>,
    fields::IpRemoteAddress: Field<L>,
    fields::IpRemotePort: Field<L>,
{
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, L>) {
        let shared = &self.shared;
        if c.injection_state(irql, &shared.injection) == InjectionState::InjectedBySelf {
            // The clone of a packet this callout pended and the service (or the default)
            // allowed: decided already. Asking again would pend it again, forever.
            shared.count(Counter::OwnReinjections);
            apply(&mut c.out, Verdict::Allow);
            return;
        }
        let Some((observed, cache_key)) = shared.observe(c, Direction::Inbound) else {
            return;
        };
        if let Some(verdict) = shared.cached(irql, &cache_key) {
            apply(&mut c.out, verdict);
            return;
        }
        if let Err(why) = whole_path(&c.values) {
            return shared.deny_unaskable(&mut c.out, &observed, why);
        }
        if observed.reauthorization {
            // Not pendable (WFP refuses a pend during a reauthorization).
            return self.at_once(irql, c, &observed, cache_key);
        }
        // Beyond the bound (logged per burst by `Shared::reserve`), or with no packet to hold.
        match self.pend(irql, c, &observed) {
            Ok(Some(held)) => self.ask_pended(irql, held, observed.key, cache_key),
            // Decided already.
            Ok(None) => {}
            Err(Unpended::Overload | Unpended::NoClone) => {
                shared.count(Counter::InboundNotPended);
                self.at_once(irql, c, &observed, cache_key);
            }
        }
    }
}

/// Why an inbound miss was not pended; it is then decided at once ([`Inbound::at_once`]).
enum Unpended {
    /// [`Config::max_pending`] connections are outstanding, or the question does not fit in
    /// [`QUESTION_BYTES`].
    Overload,
    /// The packet could not be cloned (none carried, or the stack refused).
    NoClone,
}

impl Inbound {
    /// Decides an inbound classification that is not pended: an established connection after
    /// a policy change is kept, anything else gets the default; either way the service is asked
    /// in the background, and its verdict cached for later attempts.
    fn at_once<L>(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, L>,
        observed: &Observed,
        cache_key: CacheKey,
    ) where
        L: Layer,
        fields::ReauthorizeReason: Field<L>,
        fields::AleAppId: Field<L>,
    {
        let shared = &self.shared;
        let Ok(path) = whole_path(&c.values) else {
            // Checked by the caller; denied, never asked about with part of it.
            apply(&mut c.out, Verdict::Deny);
            return;
        };
        let channel = self.channel.as_deref();
        let background = if observed.reauthorization && policy_changed(c) {
            // An established connection, after a rules change: kept while the service is
            // asked; a deny cuts it at its next packet.
            shared.count(Counter::EstablishedKept);
            apply(&mut c.out, Verdict::Allow);
            Background::Established
        } else {
            // This attempt gets the default whatever happens next.
            let default = shared.config.default;
            shared.count(Counter::Defaults);
            apply(&mut c.out, default);
            Background::Inbound(default)
        };
        Shared::ask_in_background(
            shared,
            irql,
            channel,
            &self.queue,
            observed,
            cache_key,
            path,
            background,
        );
    }

    /// Pends a new inbound connection the cache does not answer, with a clone of its packet,
    /// and returns them with the question to ask ([`Inbound::ask_pended`] asks it). `Ok(None)`
    /// when it was decided here (unloading, unaskable, no pool, no pend); `Err` when it was not
    /// pended and nothing was decided yet: the caller decides at once. A frame of its own, off
    /// the path that asks (the debug image's stack check).
    #[inline(never)]
    fn pend<L>(
        &self,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, L>,
        observed: &Observed,
    ) -> Result<Option<HeldInbound>, Unpended>
    where
        L: PendableByCompletionHandle + ReceiveInjectable,
        fields::AleAppId: Field<L>,
    {
        let shared = &self.shared;
        let default = shared.config.default;
        // Counted before the flag is read (see `Shared::settle`).
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let request_id = shared.request_id();
        let decided_at_once = |c: &mut Classify<'_, L>, reason: &dyn fmt::Display| {
            shared.count(Counter::Defaults);
            kd_print!(
                Warning,
                "firewall: #{request_id}: {default} (default: {reason})\n"
            );
            apply(&mut c.out, default);
            shared.finished(irql);
        };
        if shared.unloading.load(Ordering::SeqCst) {
            decided_at_once(c, &"unloading");
            return Ok(None);
        }
        let units = match whole_path(&c.values) {
            Ok(path) => path.units(),
            Err(why) => {
                shared.deny_unaskable(&mut c.out, observed, why);
                shared.finished(irql);
                return Ok(None);
            }
        };
        // The same bound as outbound pends: a slot (freed when the question ends: nothing is
        // reauthorized at RECV_ACCEPT) and room for the question.
        let Some(charge) = Shared::reserve(shared, request_len(units)) else {
            shared.finished(irql);
            return Err(Unpended::Overload);
        };
        // Cloned before the pend: a pend without a clone could never let the attempt through.
        let clone = match c.clone_for_receive(&*irql) {
            Ok(clone) => clone,
            Err(error) => {
                kd_print!(
                    Warning,
                    "firewall: #{request_id}: the packet cannot be cloned ({error}); not pended\n"
                );
                shared.release(irql);
                shared.finished(irql);
                return Err(Unpended::NoClone);
            }
        };
        let question = match whole_path(&c.values)
            .map_err(NoRequest::Unaskable)
            .and_then(|path| observed.question(path, request_id, charge, &*irql))
        {
            Ok(question) => question,
            Err(NoRequest::Unaskable(why)) => {
                shared.release(irql);
                shared.deny_unaskable(&mut c.out, observed, why);
                shared.finished(irql);
                return Ok(None);
            }
            Err(error @ NoRequest::NoPool) => {
                shared.release(irql);
                decided_at_once(c, &error);
                return Ok(None);
            }
        };
        let pended = match c.pend() {
            Ok(pended) => pended,
            // A heavier sublayer decided hard; there is nothing to ask (the clone is freed).
            Err(PendError::NoWriteRight) => {
                shared.release(irql);
                shared.finished(irql);
                return Ok(None);
            }
            Err(error) => {
                shared.release(irql);
                decided_at_once(c, &error);
                return Ok(None);
            }
        };
        shared.count(Counter::InboundPended);
        kd_print!(
            "firewall: #{request_id}: {}: pended, asking the service\n",
            Described(&question.head)
        );
        Ok(Some(HeldInbound {
            question,
            pended,
            clone,
        }))
    }

    /// Asks the service about a pended inbound connection, through the channel or a work item
    /// over the port; the question's end ([`Shared::conclude`], exactly once) completes the pend
    /// and reinjects or frees the clone.
    #[inline(never)]
    fn ask_pended(
        &self,
        irql: &mut DispatchLevel<'_>,
        held: HeldInbound,
        key: ConnectionKey,
        cache_key: CacheKey,
    ) {
        let shared = &self.shared;
        let HeldInbound {
            question,
            pended,
            clone,
        } = held;
        let request_id = question.head.request_id;
        let waiting = Waiting::Inbound { pended, clone };
        let channel = self.channel.as_deref();
        let asked =
            match shared.ask_channel_first(irql, channel, &question, waiting, key, cache_key) {
                // `Decisions::decide` concludes it, exactly once.
                Ok(None) => return,
                Ok(Some(asked)) => asked,
                // Unloading, or nobody to ask: the default, now.
                Err((asked, why)) => {
                    return shared.conclude(
                        irql,
                        asked,
                        Err::<ConnectionReply, AskError>(why.into()),
                        "",
                    );
                }
            };
        let work = PoolArc::clone(shared);
        let queued = self.queue.queue(irql, move |passive| {
            let reply = work.ask_on_port(passive, &question);
            work.conclude(passive, asked, reply, "");
        });
        if let Err(not_queued) = queued {
            // The closure cannot give the pend and the clone back: dropping it completes the
            // pend and frees the clone, so this attempt fails whatever the default (the one
            // case where an inbound attempt does not get it: no pool for a work item).
            shared.count(Counter::Defaults);
            shared.count(Counter::ClonesDropped);
            kd_print!(
                Warning,
                "firewall: #{request_id}: deny (no pool: {not_queued}; the clone is freed)\n"
            );
            drop(not_queued);
            shared.release(irql);
            shared.finished(irql);
        }
    }
}

/// A pended inbound connection, its packet's clone and the question to ask about it.
struct HeldInbound {
    question: Question,
    pended: PendedClassify,
    clone: ReceiveClone,
}

/// What a classification got while its question is asked in the background, for the logs.
#[derive(Clone, Copy)]
enum Background {
    /// A new inbound connection: the default now; the verdict serves later attempts.
    Inbound(Verdict),
    /// An established connection a policy change reauthorized: kept now, cut if denied.
    Established,
}

impl Background {
    fn waiting(self) -> Waiting {
        match self {
            Background::Inbound(_) => Waiting::LaterAttempts,
            Background::Established => Waiting::Established,
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Background::Inbound(_) => "inbound",
            Background::Established => "established",
        }
    }

    fn asking(self) -> &'static str {
        match self {
            Background::Inbound(_) => "asking the service for later attempts",
            Background::Established => "asking the service",
        }
    }
}

/// The start of the parenthesis the logs give for what a classification got meanwhile.
impl fmt::Display for Background {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Background::Inbound(default) => write!(f, "{default} (default: not cached; "),
            Background::Established => {
                f.write_str("allow (kept: a policy change reauthorized it; not cached; ")
            }
        }
    }
}

impl Shared {
    /// Takes one of the [`Config::background_asks`] slots, if one is free and the driver is
    /// not unloading.
    fn reserve_background(&self) -> bool {
        !self.unloading.load(Ordering::SeqCst)
            && increment_below(&self.background, self.config.background_asks)
    }

    /// Asks the service about `observed` with nobody waiting for the verdict (`background`
    /// says whose it is), within [`Config::background_asks`]: through the channel when there is
    /// one, else by a work item over the port. The verdict goes to the cache
    /// ([`Shared::conclude`]). Not asking is logged and counted, never an error: the
    /// classification has its decision already.
    #[expect(
        clippy::too_many_arguments,
        reason = "the classification's pieces, borrowed; a struct would only repeat them"
    )]
    fn ask_in_background(
        this: &PoolArc<Shared>,
        irql: &mut DispatchLevel<'_>,
        channel: Option<&QuestionChannel>,
        queue: &WorkQueue,
        observed: &Observed,
        cache_key: CacheKey,
        path: PathBytes<'_>,
        background: Background,
    ) {
        if let Some(question) =
            Shared::background_question(this, &*irql, observed, path, background)
        {
            let key = observed.key;
            Shared::send_background(
                this, irql, channel, queue, question, key, cache_key, background,
            );
        }
    }

    /// Takes a [`Config::background_asks`] slot and builds the question, or logs and counts
    /// why not.
    #[inline(never)]
    fn background_question(
        this: &PoolArc<Shared>,
        irql: &impl AtMostDispatch,
        observed: &Observed,
        path: PathBytes<'_>,
        background: Background,
    ) -> Option<Question> {
        let shared = this;
        let subject = background.subject();
        if !shared.reserve_background() {
            shared.count(Counter::BackgroundSkipped);
            kd_print!(
                Warning,
                "firewall: pid {} {subject}: {background}not asking: too many questions in flight, or unloading)\n",
                observed.key.pid
            );
            return None;
        }
        let not_asking = |why: &dyn fmt::Display| {
            shared.background.fetch_sub(1, Ordering::SeqCst);
            shared.count(Counter::BackgroundSkipped);
            kd_print!(
                Warning,
                "firewall: pid {} {subject}: {background}not asking: {why})\n",
                observed.key.pid
            );
        };
        let Some(charge) = Shared::try_charge(shared, request_len(path.units())) else {
            not_asking(&format_args!(
                "the questions waiting for the service hold {QUESTION_BYTES} bytes of pool"
            ));
            return None;
        };
        let request_id = shared.request_id();
        let question = match observed.question(path, request_id, charge, irql) {
            Ok(question) => question,
            Err(error) => {
                not_asking(&error);
                return None;
            }
        };
        kd_print!(
            "firewall: #{request_id}: {}: {background}{})\n",
            Described(&question.head),
            background.asking()
        );
        Some(question)
    }

    /// Asks a background question: through the channel when there is one, else by a work item
    /// over the port. The slot [`Shared::background_question`] took goes with the question.
    #[expect(
        clippy::too_many_arguments,
        reason = "the question's pieces; a struct would only repeat them"
    )]
    fn send_background<I: Token>(
        this: &PoolArc<Shared>,
        irql: &mut I,
        channel: Option<&QuestionChannel>,
        queue: &WorkQueue,
        question: Question,
        key: ConnectionKey,
        cache_key: CacheKey,
        background: Background,
    ) {
        let waiting = background.waiting();
        match this.ask_channel_first(irql, channel, &question, waiting, key, cache_key) {
            Ok(None) => this.count(Counter::BackgroundAsks),
            Ok(Some(asked)) => Shared::ask_background_on_port(this, &*irql, queue, question, asked),
            Err((asked, why)) => this.not_asked_in_background(asked.request_id, &why),
        }
    }

    /// A background question the channel handed back: a work item asks it over the port.
    #[inline(never)]
    fn ask_background_on_port(
        this: &PoolArc<Shared>,
        irql: &impl AtMostDispatch,
        queue: &WorkQueue,
        question: Question,
        asked: Asked,
    ) {
        let request_id = asked.request_id;
        let work = PoolArc::clone(this);
        let queued = queue.queue(irql, move |passive| {
            let reply = work.ask_on_port(passive, &question);
            work.conclude(passive, asked, reply, "");
            work.change_policy_if_due(passive);
        });
        match queued {
            Ok(()) => this.count(Counter::BackgroundAsks),
            Err(not_queued) => {
                drop(not_queued);
                this.not_asked_in_background(request_id, &"no work item could be queued");
            }
        }
    }

    /// A new outbound connection the cache did not answer: the connection pended and the
    /// question to ask about it (`Some`); or decided at once (unaskable, unloading, overload,
    /// no pool, no pend). A frame of its own, off the outbound classification's deepest path.
    #[inline(never)]
    fn pended_question<L>(
        this: &PoolArc<Shared>,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, L>,
        observed: &Observed,
    ) -> Option<(Question, PendedClassify)>
    where
        L: PendableByCompletionHandle,
        fields::AleAppId: Field<L>,
    {
        let shared = this;
        let default = shared.config.default;
        let path = match whole_path(&c.values) {
            Ok(path) => path,
            Err(why) => {
                shared.deny_unaskable(&mut c.out, observed, why);
                return None;
            }
        };
        // Counted before the flag is read (see `Shared::settle`).
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let request_id = shared.request_id();
        let decided_at_once = |c: &mut Classify<'_, L>, reason: &dyn fmt::Display| {
            shared.count(Counter::Defaults);
            kd_print!(
                Warning,
                "firewall: #{request_id}: {default} (default: {reason})\n"
            );
            apply(&mut c.out, default);
            shared.finished(irql);
        };
        if shared.unloading.load(Ordering::SeqCst) {
            decided_at_once(c, &"unloading");
            return None;
        }
        // A slot for the verdict, before the pend: a recorded verdict is never evicted. And
        // room for the question in the pool the questions may hold.
        let Some(charge) = Shared::reserve(shared, request_len(path.units())) else {
            // The cache did not answer (above): the overload decision, not the default (a
            // burst must not open a fail-open firewall); counted, logged per burst.
            shared.count(Counter::Overloaded);
            apply(&mut c.out, shared.config.overload);
            shared.finished(irql);
            return None;
        };
        let question = match observed.question(path, request_id, charge, irql) {
            Ok(question) => question,
            // The path was checked above; never asked about with part of it.
            Err(NoRequest::Unaskable(why)) => {
                shared.release(irql);
                shared.deny_unaskable(&mut c.out, observed, why);
                shared.finished(irql);
                return None;
            }
            Err(error @ NoRequest::NoPool) => {
                shared.release(irql);
                decided_at_once(c, &error);
                return None;
            }
        };
        let pended = match c.pend() {
            Ok(pended) => pended,
            // A heavier sublayer decided hard; there is nothing to ask.
            Err(PendError::NoWriteRight) => {
                shared.release(irql);
                shared.finished(irql);
                return None;
            }
            Err(error) => {
                shared.release(irql);
                decided_at_once(c, &error);
                return None;
            }
        };
        kd_print!(
            "firewall: #{request_id}: {}: pended, asking the service\n",
            Described(&question.head)
        );
        Some((question, pended))
    }

    /// Decides an outbound reauthorization: the verdict recorded for the connection this
    /// callout pended, else the cache's, else — for an established connection a policy change
    /// reauthorized — allow, and the question to ask about it (`Some`); else the default.
    #[inline(never)]
    fn reauthorized<L>(
        this: &PoolArc<Shared>,
        irql: &mut DispatchLevel<'_>,
        c: &mut Classify<'_, L>,
        observed: &Observed,
        cache_key: CacheKey,
    ) -> Option<Question>
    where
        L: Layer,
        fields::AleAppId: Field<L>,
        fields::ReauthorizeReason: Field<L>,
    {
        let shared = this;
        // The channel's `decide` or the work item recorded the verdict before it completed
        // the pend.
        if let Some(verdict) = shared.verdicts.take(&mut *irql, &observed.key) {
            // Its connection's slot is free again (and unload is told of progress).
            shared.release(irql);
            if shared.unloading.load(Ordering::SeqCst) {
                shared.progress.set(irql);
            }
            apply(&mut c.out, verdict);
            return None;
        }
        // A reauthorization this callout did not cause.
        if let Some(verdict) = shared.cached(irql, &cache_key) {
            apply(&mut c.out, verdict);
            return None;
        }
        let path = match whole_path(&c.values) {
            Ok(path) => path,
            Err(why) => {
                shared.unaskable(observed, &why);
                apply(&mut c.out, Verdict::Deny);
                return None;
            }
        };
        if !policy_changed(c) {
            let default = shared.config.default;
            shared.count(Counter::Defaults);
            kd_print!(
                Warning,
                "firewall: pid {}: {default} (default: a reauthorization with no recorded or cached verdict)\n",
                observed.key.pid
            );
            apply(&mut c.out, default);
            return None;
        }
        // An established connection, after a rules change: kept while the service is asked.
        shared.count(Counter::EstablishedKept);
        apply(&mut c.out, Verdict::Allow);
        Shared::background_question(shared, &*irql, observed, path, Background::Established)
    }

    /// A background question that was not asked after all: its slot is free again.
    #[inline(never)]
    fn not_asked_in_background(&self, request_id: u64, why: &dyn fmt::Display) {
        kd_print!(Warning, "firewall: #{request_id}: not asked ({why})\n");
        self.background.fetch_sub(1, Ordering::SeqCst);
        self.count(Counter::BackgroundSkipped);
    }
}

/// The question channel the callouts ask through with [`AskVia::Channel`].
type QuestionChannel = AskChannel<Decisions>;

/// Who waits for a question's verdict.
enum Waiting {
    /// An outbound connection, pended: the verdict is recorded for its reauthorization and the
    /// pend completed.
    Connection(PendedClassify),
    /// An inbound connection, pended at `ALE_AUTH_RECV_ACCEPT` with its packet absorbed and
    /// cloned: the pend is completed, then the clone reinjected (allow: the packet crosses the
    /// layers again, and the callout permits its own reinjection) or freed (deny: the attempt
    /// fails). Completing alone would not let the connection through: nothing reauthorizes it.
    Inbound {
        pended: PendedClassify,
        clone: ReceiveClone,
    },
    /// Nobody: an inbound background ask, whose verdict serves later attempts from the cache.
    LaterAttempts,
    /// Nobody: an established connection a policy change reauthorized (a rules change,
    /// [`Shared::change_policy`]) when the cache no longer knew it. It keeps running meanwhile;
    /// a deny makes another policy change, and its next packet meets the cached deny and cuts
    /// it.
    Established,
}

/// What the driver keeps per question, on either design, until [`Shared::conclude`] ends it:
/// the channel holds it as the question's context, a work item in its closure.
struct Asked {
    waiting: Waiting,
    key: ConnectionKey,
    cache_key: CacheKey,
    request_id: u64,
    /// The cache's revocation generation when the question was asked.
    generation: u64,
}

/// Why a channel question got no answer, as the logs say it; the answer itself, if it came
/// (whether it answers the question, [`Shared::conclude`] checks).
fn channel_reply(outcome: Outcome<ConnectionReply>) -> Result<ConnectionReply, &'static str> {
    match outcome {
        Outcome::Answered(reply) => Ok(reply),
        Outcome::Malformed => Err("a malformed reply"),
        Outcome::TimedOut => Err("no reply within the timeout"),
        Outcome::Cancelled => Err("the question was withdrawn"),
        Outcome::ServiceGone => Err("the service went away before replying"),
        Outcome::Closing => Err("unloading"),
    }
}

impl Shared {
    /// Asks `question` about `key` for `waiting`, through the channel when there is one: the
    /// channel copies its bytes into a slot it allocated at load, so the question's own buffer
    /// (and its share of [`QUESTION_BYTES`]) goes when the caller drops it, and concludes it
    /// later (`Ok(None)`). A question the channel does not take comes back to be asked by a
    /// work item over the port (`Ok(Some)`: no channel, a question longer than its slots,
    /// every slot taken), or unasked (`Err`): the channel is closing, or no service has the
    /// channel open, so there is nobody to ask and no work item is queued to find that out.
    #[expect(
        clippy::result_large_err,
        reason = "the context must come back whole, and boxing it would allocate in classifyFn"
    )]
    fn ask_channel_first<I: Token>(
        &self,
        irql: &mut I,
        channel: Option<&QuestionChannel>,
        question: &Question,
        waiting: Waiting,
        key: ConnectionKey,
        cache_key: CacheKey,
    ) -> Result<Option<Asked>, (Asked, Unasked)> {
        let request_id = question.head.request_id;
        let asked = Asked {
            waiting,
            key,
            cache_key,
            request_id,
            generation: self.cache.generation(),
        };
        let Some(channel) = channel else {
            return Ok(Some(asked));
        };
        match channel.ask(&mut *irql, &question.bytes, self.config.timeout, asked) {
            Ok(_) => {
                self.count(Counter::AskedViaChannel);
                Ok(None)
            }
            Err(not_asked) => match not_asked.reason() {
                NotAskedReason::Closed => Err((not_asked.into_context(), Unasked::Unloading)),
                // The service opens the port and the channel; with the channel closed it is
                // gone or not up yet, and the port (whose end may not have seen the service go)
                // has nobody to ask either.
                NotAskedReason::NoService => Err((not_asked.into_context(), Unasked::NoService)),
                NotAskedReason::Full | NotAskedReason::TooLarge { .. } => {
                    kd_print!(
                        "firewall: #{request_id}: asking through the port ({})\n",
                        not_asked
                    );
                    Ok(Some(not_asked.into_context()))
                }
            },
        }
    }
}

/// The question channel's handler: decodes the service's replies and decides the questions
/// (see the crate documentation's tables).
struct Decisions {
    shared: PoolArc<Shared>,
    /// For the policy change a denied established connection calls for (`decide` may run at
    /// `DISPATCH_LEVEL`; the engine is called at `PASSIVE_LEVEL`).
    queue: WorkQueue,
}

impl QuestionHandler for Decisions {
    type Context = Asked;
    type Answer = ConnectionReply;

    fn decode(&self, answer: &[u8]) -> Option<ConnectionReply> {
        // Untrusted: every field is validated; whether it answers the question is checked in
        // `Shared::conclude`, which knows the question.
        <ConnectionReply as wfp_rs::port::Message>::decode(answer).ok()
    }

    fn decide(
        &self,
        irql: &mut DispatchLevel<'_>,
        asked: Asked,
        outcome: Outcome<ConnectionReply>,
    ) {
        self.shared
            .conclude(irql, asked, channel_reply(outcome), ", channel");
        Shared::queue_policy_change_if_due(&self.shared, &self.queue, &*irql);
    }
}

impl Shared {
    /// A control request on the control device: [`REVOKE`] removes cached verdicts and writes
    /// a [`Revoked`] to `output`; any other code is `STATUS_INVALID_DEVICE_REQUEST`. Returns
    /// how many bytes of `output` it wrote.
    fn command(
        &self,
        irql: &mut PassiveLevel<'_>,
        code: ControlCode,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, Status> {
        if code != REVOKE {
            return Err(Status::INVALID_DEVICE_REQUEST);
        }
        let revoke = match Revoke::decode(input) {
            Ok(revoke) => revoke,
            Err(malformed) => {
                kd_print!(Warning, "firewall: revoke refused: {malformed}\n");
                return Err(Status::INVALID_PARAMETER);
            }
        };
        let out = output
            .get_mut(..REVOKED_LEN)
            .ok_or(Status::BUFFER_TOO_SMALL)?;
        let removed = self.cache.revoke(&mut *irql, &revoke);
        self.count_n(Counter::Revoked, u64::from(removed));
        match revoke {
            Revoke::All => kd_print!("firewall: revoked all cached verdicts ({removed})\n"),
            Revoke::Requests(ids) => kd_print!(
                "firewall: revoked {removed} cached verdict(s) of {} request(s)\n",
                ids.len()
            ),
        }
        // The rules changed: established connections are decided again, under the new rules.
        self.change_policy(irql);
        out.copy_from_slice(&Revoked { removed }.to_bytes());
        Ok(REVOKED_LEN)
    }
}

impl Shared {
    /// At `PASSIVE_LEVEL`: if a verdict denied an established connection since the last
    /// policy change, makes one ([`Shared::change_policy`]).
    fn change_policy_if_due(&self, irql: &mut PassiveLevel<'_>) {
        if self.policy_change_due.swap(false, Ordering::SeqCst) {
            self.change_policy(irql);
        }
    }

    /// Makes WFP reauthorize every established connection at its next packet (see
    /// [`change_policy`]); logged, and counted in [`StatsSnapshot::policy_changes`]. Nothing
    /// while unloading: the filters go anyway.
    fn change_policy(&self, irql: &mut PassiveLevel<'_>) {
        if self.unloading.load(Ordering::SeqCst) {
            return;
        }
        match change_policy(irql) {
            Ok(()) => {
                self.count(Counter::PolicyChanges);
                kd_print!("firewall: policy changed: established connections are reauthorized\n");
            }
            Err(status) => kd_print!(
                Warning,
                "firewall: no policy change ({status}): established connections keep their verdicts\n"
            ),
        }
    }

    /// From any IRQL: queues a work item for [`Shared::change_policy_if_due`] if one is due.
    fn queue_policy_change_if_due(
        this: &PoolArc<Shared>,
        queue: &WorkQueue,
        irql: &impl AtMostDispatch,
    ) {
        if !this.policy_change_due.load(Ordering::SeqCst) {
            return;
        }
        let work = PoolArc::clone(this);
        if let Err(not_queued) =
            queue.queue(irql, move |passive| work.change_policy_if_due(passive))
        {
            // Still due: the next verdict that concludes on a work item makes it.
            kd_print!(
                Warning,
                "firewall: policy change not queued ({not_queued})\n"
            );
        }
    }
}

/// A policy change at each layer where connections are authorized (ALE_AUTH_CONNECT and
/// ALE_AUTH_RECV_ACCEPT, IPv4 and IPv6): a filter added there and deleted again. WFP then
/// reauthorizes every connection those layers authorized when its next packet comes
/// (Microsoft's "ALE Reauthorization": a policy change is a filter added or deleted at the
/// layer), so the firewall's callouts decide established connections again. The filters never
/// match (TCP from local port 0) and live in a dynamic session of their own, which deletes them
/// when it closes.
#[inline(never)]
fn change_policy(irql: &mut PassiveLevel<'_>) -> Result<(), Status> {
    let engine = Engine::open(
        irql,
        SessionOptions::new()
            .dynamic()
            .name("wfp-rs firewall: policy change"),
    )?;
    let added = add_policy_change_filters(irql, &engine);
    let closed = engine.close(irql);
    added.and(closed)
}

#[inline(never)]
fn add_policy_change_filters(irql: &PassiveLevel<'_>, engine: &Engine) -> Result<(), Status> {
    fn never_matching<L: Layer>(irql: &PassiveLevel<'_>, engine: &Engine) -> Result<(), Status>
    where
        fields::IpProtocol: Field<L>,
        fields::IpLocalPort: Field<L>,
    {
        // In the default sublayer: the firewall's own belongs to its main (dynamic) session,
        // which a filter of another session may not reference.
        let filter = WfpFilter::<L>::new(Guid::default())
            .name("wfp-rs firewall: policy change")
            .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp))
            .condition::<fields::IpLocalPort>(Match::Equal(0))
            .action(FilterAction::Block);
        engine.add_filter(irql, &filter).map(|_| ())
    }
    never_matching::<AleAuthConnectV4>(irql, engine)?;
    never_matching::<AleAuthConnectV6>(irql, engine)?;
    never_matching::<AleAuthRecvAcceptV4>(irql, engine)?;
    never_matching::<AleAuthRecvAcceptV6>(irql, engine)
}

/// The control device's handler: the service's commands (see "Control device" in the crate
/// documentation).
pub struct Commands {
    shared: PoolArc<Shared>,
}

impl CommandHandler for Commands {
    fn command(
        &self,
        irql: &mut PassiveLevel<'_>,
        code: ControlCode,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, Status> {
        self.shared.command(irql, code, input, output)
    }
}

/// What the driver keeps while it is loaded.
pub struct Firewall {
    engine: Engine,
    connect_v4: CalloutRegistration<AleAuthConnectV4, Outbound>,
    connect_v6: CalloutRegistration<AleAuthConnectV6, Outbound>,
    accept_v4: CalloutRegistration<AleAuthRecvAcceptV4, Inbound>,
    accept_v6: CalloutRegistration<AleAuthRecvAcceptV6, Inbound>,
    control: ControlDevice<Commands>,
    /// With [`AskVia::Channel`]; the callouts hold it too.
    channel: Option<PoolArc<QuestionChannel>>,
    shared: PoolArc<Shared>,
    filter: Filter,
}

impl Firewall {
    /// The driver's counters now (its own, whether or not [`Config::stats`] is set).
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.own_stats.snapshot()
    }
}

impl DriverState for Firewall {
    fn stopping(&self, irql: &mut PassiveLevel<'_>) {
        // No new pends or questions; then fail the questions already waiting, so the work
        // items the SDK is about to wait for finish now rather than at their timeout.
        self.shared.unloading.store(true, Ordering::SeqCst);
        // Every question on the channel is decided now (`Closing`: the default), so its pend
        // is completed while the filters are still there for the reauthorization. Waits for
        // no user-mode thread.
        if let Some(channel) = &self.channel {
            channel.stop(irql);
        }
        let closed = self.shared.port.disconnect_all(irql);
        kd_print!("firewall: stopping; {closed} service connection(s) closed\n");
    }

    fn unload(self, irql: &mut PassiveLevel<'_>) {
        // `stopping` decided every question on the channel, and the SDK has waited for every
        // work item: no pend is outstanding.
        let Firewall {
            engine,
            connect_v4,
            connect_v6,
            accept_v4,
            accept_v6,
            control,
            channel,
            shared,
            filter,
        } = self;
        // No more commands; the handler's share of the state goes with the device.
        control.close(irql);
        if !shared.settle(irql) {
            kd_print!(
                Warning,
                "firewall: reauthorizations still outstanding at unload; they will not be filtered\n"
            );
        }
        // The filters go first, with the dynamic session: a terminating filter whose callout
        // is unregistered blocks everything it matches.
        if let Err(status) = engine.close(irql) {
            kd_print!(Error, "firewall: closing the session failed: {status}\n");
        }
        if let Err((_, status)) = connect_v4.unregister(&mut *irql) {
            kd_print!(
                Error,
                "firewall: unregistering (connect, IPv4) failed: {status}\n"
            );
        }
        if let Err((_, status)) = connect_v6.unregister(&mut *irql) {
            kd_print!(
                Error,
                "firewall: unregistering (connect, IPv6) failed: {status}\n"
            );
        }
        if let Err((_, status)) = accept_v4.unregister(&mut *irql) {
            kd_print!(
                Error,
                "firewall: unregistering (accept, IPv4) failed: {status}\n"
            );
        }
        if let Err((_, status)) = accept_v6.unregister(&mut *irql) {
            kd_print!(
                Error,
                "firewall: unregistering (accept, IPv6) failed: {status}\n"
            );
        }
        // The callouts' shares of the channel went with them: this is the last, and closing it
        // drops the handler's share of the state.
        if let Some(channel) = channel {
            match PoolArc::try_unwrap(channel) {
                Ok(channel) => channel.close(irql),
                // Cannot happen (the callouts are gone); dropped at PASSIVE_LEVEL, the last
                // share closes it the same way.
                Err(channel) => drop(channel),
            }
        }
        let stats = shared.own_stats.snapshot();
        let fail_closed_at_boot = shared.config.fail_closed_at_boot;
        // The port before the filter: a filter with an open port cannot be unregistered.
        match PoolArc::try_unwrap(shared) {
            Ok(Shared {
                port, injection, ..
            }) => {
                port.close(irql);
                // Every pend is concluded (its clone injected or freed); this waits for the
                // injections still in flight.
                if let Err(status) = injection.destroy(irql) {
                    kd_print!(
                        Error,
                        "firewall: destroying the injection handle failed: {status}\n"
                    );
                }
            }
            // A work item queued by a classification that raced the session's close still
            // holds it; it closes the port when it finishes, at PASSIVE_LEVEL, and the SDK
            // waits for it before the driver is gone.
            Err(shared) => drop(shared),
        }
        filter.close(irql);
        // A line of its own: debugger lines are cut at 256 bytes.
        kd_print!(
            "firewall: inbound: {} pended, {} reinjected, {} clones dropped\n",
            stats.inbound_pended,
            stats.reinjected,
            stats.clones_dropped
        );
        if fail_closed_at_boot {
            kd_print!(
                "firewall: fail-closed from boot stays installed: TCP and UDP connections are blocked until the driver is loaded again\n"
            );
        }
        kd_print!("firewall: unloaded ({stats})\n");
    }
}

/// The body of `DriverEntry`, with a configuration: registers the minifilter and the port, the
/// callouts, and then the filters that hand TCP and UDP connections to them. On an error
/// everything done so far is undone (dropped in reverse order, at `PASSIVE_LEVEL`).
///
/// The work is split into functions of their own (`open_port`, `register`, `add_filters`),
/// called one after the other, so that the temporaries of each are off the stack while the
/// next runs: in a debug build every temporary has a stack slot of its own, and each of these
/// reaches deep into the SDK (`cargo wfp build -p firewall-driver`, a debug image, checks the depth).
pub fn start(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    config: Config,
) -> Result<Firewall, Status> {
    admit_service(irql, driver, &config)?;
    let (filter, port) = open_port(irql, driver, config.port_name)?;
    // Built here rather than in `register`: below `register`'s frame, this path would be the
    // load's deepest in a debug image.
    let shared = shared_state(irql, config, port)?;
    let firewall = register(irql, driver, filter, shared);
    // Borrowed in the `Result` and returned as it is, rather than taken out with `?` and
    // wrapped again: in a debug build each of those moves is a copy of the whole state in this
    // frame, which lies under the filters' path.
    if let Ok(firewall) = &firewall {
        // On an error the firewall is dropped: its fields go in declaration order, the engine
        // session (and with it everything added in it) first, the minifilter last.
        add_filters(irql, firewall)?;
        announce(irql, firewall, driver.admitted());
    }
    firewall
}

/// Fail-closed from boot with a fail-open default would let connections through once the
/// driver is loaded: refused. A function of its own, so its log line's formatting is off
/// the load's path (see [`start`]).
#[inline(never)]
fn check_fail_closed_at_boot(config: &Config) -> Result<(), Status> {
    if config.fail_closed_at_boot && config.default != Verdict::Deny {
        kd_print!(
            Error,
            "firewall: fail-closed from boot needs the default deny (Config::default)\n"
        );
        return Err(Status::INVALID_PARAMETER);
    }
    Ok(())
}

/// Checks the configuration ([`check_fail_closed_at_boot`]), then restricts the port and the
/// control device to the configured service (before either exists, so no other process ever
/// gets in), or says on the debugger that any administrator's process may use them.
#[inline(never)]
fn admit_service(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    config: &Config,
) -> Result<(), Status> {
    check_fail_closed_at_boot(config)?;
    let sid = config.service_sid.map(Sid::parse).transpose()?;
    let identity = match (sid, config.service_image) {
        // Said at load, after the announcement (`announce`).
        (None, None) => return Ok(()),
        (Some(sid), None) => ClientIdentity::sid(sid),
        (None, Some(image)) => ClientIdentity::image(image)?,
        (Some(sid), Some(image)) => ClientIdentity::sid(sid).and_image(image)?,
    };
    driver.admit_only(irql, identity)
}

/// The load-time log line. A function of its own: its formatting temporaries stay off the
/// stack under [`add_filters`].
#[inline(never)]
fn announce(irql: &mut PassiveLevel<'_>, firewall: &Firewall, admitted: Option<&ClientIdentity>) {
    let config = &firewall.shared.config;
    kd_print!(
        "firewall: asking the service through {} on {} ({} ms timeout, default {}, {} cache entries, {} pends at most, overload {}, loopback {})\n",
        config.ask_via,
        match config.ask_via {
            AskVia::Channel => config.ask_device_name,
            AskVia::PortAndWorkItem => config.port_name,
        },
        config.timeout.as_millis(),
        config.default,
        firewall.shared.cache.capacity(irql),
        config.max_pending,
        config.overload,
        if config.permit_loopback {
            "permitted"
        } else {
            "asked"
        }
    );
    match admitted {
        None => kd_print!(
            Warning,
            "firewall: no service identity configured (Parameters\\{SERVICE_SID_PARAMETER} or \\{SERVICE_IMAGE_PARAMETER}, Config::service_sid or service_image): any administrator's process may connect to {} and answer\n",
            config.port_name
        ),
        Some(identity) => {
            kd_print!("firewall: only the service may connect or send commands: {identity:?}\n")
        }
    }
}

/// The value of the driver's `Parameters` key that names the service's SID (`S-1-5-…`), for
/// [`admit_installed_service`].
pub const SERVICE_SID_PARAMETER: &str = "ServiceSid";
/// The value of the driver's `Parameters` key that names the service's executable (an NT path),
/// for [`admit_installed_service`].
pub const SERVICE_IMAGE_PARAMETER: &str = "ServiceImage";

/// Reads the service's identity its installer wrote to the driver's service key —
/// `Parameters\ServiceSid` and/or `Parameters\ServiceImage` ([`SERVICE_SID_PARAMETER`],
/// [`SERVICE_IMAGE_PARAMETER`], `REG_SZ`) — and admits only that process
/// ([`Driver::admit_only`](wfp_rs::driver::Driver::admit_only)). Returns whether it found one.
/// `DriverEntry` calls it before [`start`]; a configuration that also sets
/// [`Config::service_sid`] or [`Config::service_image`] then fails with
/// `STATUS_INVALID_DEVICE_STATE` (one place says who the service is). A malformed SID is
/// `STATUS_INVALID_SID`: the driver does not load with a configuration it cannot apply.
#[inline(never)]
pub fn admit_installed_service(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
) -> Result<bool, Status> {
    let sid = driver.parameter(irql, SERVICE_SID_PARAMETER)?;
    let image = driver.parameter(irql, SERVICE_IMAGE_PARAMETER)?;
    let sid = sid.as_deref().map(Sid::parse).transpose()?;
    let identity = match (sid, image.as_deref()) {
        (None, None) => return Ok(false),
        (Some(sid), None) => ClientIdentity::sid(sid),
        (None, Some(image)) => ClientIdentity::image(image)?,
        (Some(sid), Some(image)) => ClientIdentity::sid(sid).and_image(image)?,
    };
    driver.admit_only(irql, identity)?;
    Ok(true)
}

/// Registers the minifilter and creates the service's port on it. Called by [`start`] on its
/// own, not from [`register`], so that `ServerPort::create` (deep in a debug build) runs with
/// only `start`'s frame above it.
#[inline(never)]
fn open_port(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    port_name: &str,
) -> Result<(Filter, ServerPort<FirewallProtocol>), Status> {
    let filter = Filter::register(irql, driver)?;
    let port =
        ServerPort::<FirewallProtocol>::create(irql, &filter, port_name, SERVICE_CONNECTIONS, ())?;
    Ok((filter, port))
}

/// Everything [`start`] does after [`open_port`] and [`shared_state`] and before the filters:
/// the control device, the callouts and the (still empty) dynamic engine session. On an error
/// the shared state (with the port) and then the minifilter it was given are dropped after its
/// own locals.
#[inline(never)]
fn register(
    irql: &mut PassiveLevel<'_>,
    driver: &mut Driver<'_>,
    filter: Filter,
    shared: PoolArc<Shared>,
) -> Result<Firewall, Status> {
    let config = &shared.config;
    let control = ControlDevice::new(
        irql,
        driver,
        config.device_name,
        Commands {
            shared: PoolArc::clone(&shared),
        },
    )?;
    let channel = match config.ask_via {
        AskVia::Channel => Some(open_channel(irql, driver, &shared)?),
        AskVia::PortAndWorkItem => None,
    };

    // Registered before the filters that name them exist, so no connection meets a filter
    // whose callout is missing (it would be blocked).
    let outbound = || Outbound {
        shared: PoolArc::clone(&shared),
        queue: driver.work_queue(),
        channel: channel.clone(),
    };
    let inbound = || Inbound {
        shared: PoolArc::clone(&shared),
        queue: driver.work_queue(),
        channel: channel.clone(),
    };
    let connect_v4 = CalloutRegistration::register(irql, driver, CALLOUT_CONNECT_V4, outbound())?;
    let connect_v6 = CalloutRegistration::register(irql, driver, CALLOUT_CONNECT_V6, outbound())?;
    let accept_v4 = CalloutRegistration::register(irql, driver, CALLOUT_RECV_ACCEPT_V4, inbound())?;
    let accept_v6 = CalloutRegistration::register(irql, driver, CALLOUT_RECV_ACCEPT_V6, inbound())?;

    // Dynamic: closing the session deletes everything added in it.
    let engine = Engine::open(
        irql,
        SessionOptions::new().dynamic().name("wfp-rs firewall"),
    )?;
    Ok(Firewall {
        engine,
        connect_v4,
        connect_v6,
        accept_v4,
        accept_v6,
        control,
        channel,
        shared,
        filter,
    })
}

/// The most questions the channel holds: one per pend the verdict table allows, and one per
/// inbound background ask, so a classification that reserved a slot always finds one free.
fn channel_capacity(config: &Config) -> usize {
    config
        .max_pending
        .saturating_add(config.background_asks)
        .clamp(1, wfp_rs::ask::MAX_CAPACITY)
}

/// Creates the question channel ([`firewall_protocol::ASK_CHANNEL`]) on
/// [`Config::ask_device_name`]. Only the service [`start`] admitted may open its device (the SDK
/// applies `Driver::admit_only` to every device it creates). A function of its own, for the
/// stack (see [`start`]).
#[inline(never)]
fn open_channel(
    irql: &mut PassiveLevel<'_>,
    driver: &Driver<'_>,
    shared: &PoolArc<Shared>,
) -> Result<PoolArc<QuestionChannel>, Status> {
    let config = &shared.config;
    let channel = AskChannel::new(
        irql,
        driver,
        config.ask_device_name,
        &firewall_protocol::ASK_CHANNEL,
        channel_capacity(config),
        Decisions {
            shared: PoolArc::clone(shared),
            queue: driver.work_queue(),
        },
    )?;
    // On a failure the channel comes back in the error and is dropped here, at PASSIVE_LEVEL.
    PoolArc::try_new(channel, CHANNEL_TAG, irql).map_err(|e| e.status())
}

/// The state the callouts, the work items and the control device share. A function of its
/// own (not inlined) so that its temporaries (the `Shared` value before it moves into the `Arc`)
/// are off the stack before [`add_filters`] runs: in a debug build every temporary has a slot
/// of its own, and `start`'s frame lies under the whole filter-adding path
/// (`cargo wfp build -p firewall-driver` checks it in a debug image).
#[inline(never)]
fn shared_state(
    irql: &mut PassiveLevel<'_>,
    config: Config,
    port: ServerPort<FirewallProtocol>,
) -> Result<PoolArc<Shared>, Status> {
    let config = Config {
        max_pending: config.max_pending.min(VERDICT_SLOTS),
        ..config
    };
    let cache = VerdictCache::new(config.cache_capacity)?;
    let verdicts =
        VerdictTable::try_new_in_pool(VERDICTS_TAG, irql).ok_or(Status::INSUFFICIENT_RESOURCES)?;
    let progress = Event::try_new(EventKind::Notification, false, irql)?;
    let injection = injection_handle(irql)?;
    // Fallible: `Arc::new` cannot report an exhausted pool, and in a driver its failure is a
    // bug check. On a failure the value comes back and is dropped like the other locals.
    PoolArc::try_new(
        Shared {
            config,
            port,
            cache,
            verdicts,
            unloading: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            overload_burst: AtomicU64::new(0),
            question_bytes: AtomicUsize::new(0),
            progress,
            next_request: AtomicU64::new(0),
            background: AtomicUsize::new(0),
            policy_change_due: AtomicBool::new(false),
            injection,
            own_stats: Stats::new(),
        },
        SHARED_TAG,
        irql,
    )
    .map_err(|e| e.status())
}

/// The injection handle the inbound callouts reinject with, for both IP versions (one handle
/// serves both callouts). A function of its own, for the stack (see [`shared_state`]).
#[inline(never)]
fn injection_handle(irql: &PassiveLevel<'_>) -> Result<InjectionHandle, Status> {
    InjectionHandle::create(irql, None)
}

/// Adds the provider and the sublayer; a function of its own, so that their builders are off
/// the stack under [`add_filter`] (see [`start`]).
#[inline(never)]
fn add_provider_and_sublayer(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    persistent: bool,
) -> Result<(), Status> {
    let provider = Provider::new(PROVIDER).name("wfp-rs firewall");
    let sublayer = Sublayer::new(SUBLAYER)
        .name("wfp-rs firewall")
        .provider(PROVIDER)
        .weight(SUBLAYER_WEIGHT);
    let (provider, sublayer) = if persistent {
        (provider.persistent(), sublayer.persistent())
    } else {
        (provider, sublayer)
    };
    engine.add_provider(irql, &provider)?;
    engine.add_sublayer(irql, &sublayer)?;
    Ok(())
}

/// Adds the provider, the sublayer, the callout entries and the filters that hand connections
/// to the callouts: to the firewall's engine (its dynamic session), in one transaction that first
/// removes what an earlier load installed persistent; or, `fail_closed_at_boot`, persistent,
/// with the boot-time filters ([`install_fail_closed_at_boot`]). Runs after the callouts are
/// registered: no other instance of the driver runs (its registrations would have failed), so
/// the objects found under the firewall's keys are an earlier load's.
#[inline(never)]
fn add_filters(irql: &mut PassiveLevel<'_>, firewall: &Firewall) -> Result<(), Status> {
    if firewall.shared.config.fail_closed_at_boot {
        return install_fail_closed_at_boot(irql);
    }
    let engine = &firewall.engine;
    // All or nothing: dropped on an error, the transaction is aborted.
    let txn = engine.transaction(irql)?;
    let removed = remove_installed(irql, &txn)?;
    add_callout_filters(irql, &txn, false)?;
    txn.commit(irql)?;
    if removed > 0 {
        kd_print!(
            "firewall: fail-closed from boot is off: removed the {removed} persistent and boot-time objects an earlier load installed\n"
        );
    }
    Ok(())
}

/// The provider, the sublayer, and for each layer the callout entry and the filter that hands
/// it connections; `persistent` or not.
#[inline(never)]
fn add_callout_filters(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    persistent: bool,
) -> Result<(), Status> {
    add_provider_and_sublayer(irql, engine, persistent)?;
    add_filter::<AleAuthConnectV4>(
        irql,
        engine,
        CALLOUT_CONNECT_V4,
        FILTER_CONNECT_V4,
        "firewall (connect, IPv4)",
        persistent,
    )?;
    add_filter(
        irql,
        engine,
        CALLOUT_CONNECT_V6,
        FILTER_CONNECT_V6,
        "firewall (connect, IPv6)",
        persistent,
    )?;
    add_filter(
        irql,
        engine,
        CALLOUT_RECV_ACCEPT_V4,
        FILTER_RECV_ACCEPT_V4,
        "firewall (accept, IPv4)",
        persistent,
    )?;
    add_filter(
        irql,
        engine,
        CALLOUT_RECV_ACCEPT_V6,
        FILTER_RECV_ACCEPT_V6,
        "firewall (accept, IPv6)",
        persistent,
    )
}

/// Installs fail-closed from boot (see the crate documentation): in a non-dynamic session of
/// its own (a dynamic one cannot add persistent objects), in one transaction, removes what an
/// earlier load installed, then adds the provider, the sublayer, the callout entries and the
/// filters persistent, and the boot-time filters. The session closes; the objects stay, across
/// unloads and reboots, until a load with the option off removes them.
#[inline(never)]
pub fn install_fail_closed_at_boot(irql: &mut PassiveLevel<'_>) -> Result<(), Status> {
    let engine = Engine::open(
        irql,
        SessionOptions::new().name("wfp-rs firewall: fail-closed from boot"),
    )?;
    let installed = install_persistent(irql, &engine);
    let closed = engine.close(irql);
    installed.and(closed)?;
    kd_print!(
        "firewall: fail-closed from boot: persistent filters and boot-time filters installed; TCP and UDP connections are blocked whenever the driver is not loaded\n"
    );
    Ok(())
}

#[inline(never)]
fn install_persistent(irql: &mut PassiveLevel<'_>, engine: &Engine) -> Result<(), Status> {
    let txn = engine.transaction(irql)?;
    remove_installed(irql, &txn)?;
    add_callout_filters(irql, &txn, true)?;
    add_boot_time_filters(irql, &txn)?;
    txn.commit(irql)
}

/// The boot-time filters: block TCP and UDP, out and in, over IPv4 and IPv6, while the machine
/// boots (but loopback, as the callouts permit it). In the default sublayer and without a
/// provider: at boot, before BFE, the firewall's persistent provider and sublayer do not exist
/// yet (persistent objects come with BFE).
#[inline(never)]
fn add_boot_time_filters(irql: &PassiveLevel<'_>, engine: &Engine) -> Result<(), Status> {
    fn boot_time<L: Layer>(
        irql: &PassiveLevel<'_>,
        engine: &Engine,
        key: Guid,
        name: &str,
    ) -> Result<(), Status>
    where
        fields::IpProtocol: Field<L>,
        fields::Flags: Field<L>,
    {
        let mut filter = WfpFilter::<L>::new(key)
            .name(name)
            .action(FilterAction::Block)
            .flags(FilterFlags::BOOT_TIME)
            .condition::<fields::Flags>(Match::FlagsNoneSet(ConditionFlags::IS_LOOPBACK));
        for protocol in FILTERED_PROTOCOLS {
            filter = filter.condition::<fields::IpProtocol>(Match::Equal(protocol));
        }
        engine.add_filter(irql, &filter).map(|_| ())
    }
    boot_time::<AleAuthConnectV4>(
        irql,
        engine,
        BOOT_FILTER_CONNECT_V4,
        "wfp-rs firewall: blocked while booting (connect, IPv4)",
    )?;
    boot_time::<AleAuthConnectV6>(
        irql,
        engine,
        BOOT_FILTER_CONNECT_V6,
        "wfp-rs firewall: blocked while booting (connect, IPv6)",
    )?;
    boot_time::<AleAuthRecvAcceptV4>(
        irql,
        engine,
        BOOT_FILTER_RECV_ACCEPT_V4,
        "wfp-rs firewall: blocked while booting (accept, IPv4)",
    )?;
    boot_time::<AleAuthRecvAcceptV6>(
        irql,
        engine,
        BOOT_FILTER_RECV_ACCEPT_V6,
        "wfp-rs firewall: blocked while booting (accept, IPv6)",
    )
}

/// Deletes, by key, every object fail-closed from boot installs — the filters (boot-time ones
/// too), then the callout entries, the sublayer and the provider, each only after what refers
/// to it — and returns how many there were. An object that is not there is skipped; any other
/// failure is returned.
#[inline(never)]
fn remove_installed(irql: &PassiveLevel<'_>, engine: &Engine) -> Result<usize, Status> {
    fn gone(result: Result<(), Status>) -> Result<usize, Status> {
        match result {
            Ok(()) => Ok(1),
            Err(
                Status::FWP_FILTER_NOT_FOUND
                | Status::FWP_CALLOUT_NOT_FOUND
                | Status::FWP_SUBLAYER_NOT_FOUND
                | Status::FWP_PROVIDER_NOT_FOUND,
            ) => Ok(0),
            Err(status) => Err(status),
        }
    }
    let mut removed = 0;
    for filter in [
        FILTER_CONNECT_V4,
        FILTER_CONNECT_V6,
        FILTER_RECV_ACCEPT_V4,
        FILTER_RECV_ACCEPT_V6,
        BOOT_FILTER_CONNECT_V4,
        BOOT_FILTER_CONNECT_V6,
        BOOT_FILTER_RECV_ACCEPT_V4,
        BOOT_FILTER_RECV_ACCEPT_V6,
    ] {
        removed += gone(engine.delete_filter_by_key(irql, filter))?;
    }
    removed += gone(engine.delete_callout(irql, CALLOUT_CONNECT_V4))?;
    removed += gone(engine.delete_callout(irql, CALLOUT_CONNECT_V6))?;
    removed += gone(engine.delete_callout(irql, CALLOUT_RECV_ACCEPT_V4))?;
    removed += gone(engine.delete_callout(irql, CALLOUT_RECV_ACCEPT_V6))?;
    removed += gone(engine.delete_sublayer(irql, SUBLAYER))?;
    removed += gone(engine.delete_provider(irql, PROVIDER))?;
    Ok(removed)
}

/// Reads [`FAIL_CLOSED_AT_BOOT_PARAMETER`] from the driver's service key, where an installer
/// writes it: `"1"` turns [`Config::fail_closed_at_boot`] on, `"0"` or no value leaves it off,
/// anything else is `STATUS_INVALID_PARAMETER` (the driver does not load with a configuration
/// it cannot read). `DriverEntry` calls it before [`start`].
#[inline(never)]
pub fn installed_fail_closed_at_boot(
    irql: &PassiveLevel<'_>,
    driver: &Driver<'_>,
) -> Result<bool, Status> {
    match driver
        .parameter(irql, FAIL_CLOSED_AT_BOOT_PARAMETER)?
        .as_deref()
    {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(_) => Err(Status::INVALID_PARAMETER),
    }
}

#[wfp_rs::driver_entry]
fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<Firewall, Status> {
    // One configuration, changed in place, and one call for the service key: in a debug build
    // each temporary has a slot in this frame, which lies under the whole load.
    let mut config = Config::DEFAULT;
    config.fail_closed_at_boot = read_service_key(irql, driver)?;
    start(irql, driver, config)
}

/// What `DriverEntry` reads from the service key: admits the installed service
/// ([`admit_installed_service`]) and returns [`installed_fail_closed_at_boot`].
#[inline(never)]
fn read_service_key(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<bool, Status> {
    admit_installed_service(irql, driver)?;
    installed_fail_closed_at_boot(irql, driver)
}

/// The terminating filter `filter` that hands connections to `callout`, without conditions. A
/// function of its own: in a debug build each step of the builder is a copy on the stack,
/// and these copies must not lie under [`Engine::add_filter`] (see [`start`]).
#[inline(never)]
fn terminating_filter<'a, L: Layer>(
    filter: Guid,
    callout: CalloutKey<L>,
    name: &'a str,
    persistent: bool,
) -> WfpFilter<'a, L> {
    WfpFilter::<L>::new(filter)
        .name(name)
        .provider(PROVIDER)
        .sublayer(SUBLAYER)
        .action(FilterAction::CalloutTerminating(callout))
        // Persistent: while the callout is not registered (the driver not loaded yet, or
        // unloaded), the filter blocks.
        .flags(if persistent {
            FilterFlags::PERSISTENT
        } else {
            FilterFlags::empty()
        })
}

/// Adds the callout entry `callout` at layer `L`; a function of its own, so that its builder is
/// off the stack under the filter's (see [`start`]).
#[inline(never)]
fn add_callout_entry<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    name: &str,
    persistent: bool,
) -> Result<(), Status> {
    let entry = CalloutEntry::<L>::new(callout)
        .name(name)
        .provider(PROVIDER);
    let entry = if persistent {
        entry.persistent()
    } else {
        entry
    };
    engine.add_callout(irql, &entry)?;
    Ok(())
}

/// Adds the callout entry `callout` at layer `L` and the terminating filter `filter` that hands
/// it every connection of the [`FILTERED_PROTOCOLS`].
fn add_filter<L: Layer>(
    irql: &PassiveLevel<'_>,
    engine: &Engine,
    callout: CalloutKey<L>,
    filter: Guid,
    name: &str,
    persistent: bool,
) -> Result<(), Status>
where
    fields::IpProtocol: Field<L>,
{
    add_callout_entry::<L>(irql, engine, callout, name, persistent)?;
    let mut entry = terminating_filter::<L>(filter, callout, name, persistent);
    // Consecutive conditions on one field: the engine ORs them.
    for protocol in FILTERED_PROTOCOLS {
        entry = entry.condition::<fields::IpProtocol>(Match::Equal(protocol));
    }
    engine.add_filter(irql, &entry)?;
    Ok(())
}
