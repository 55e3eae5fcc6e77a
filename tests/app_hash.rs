//! The image hash of `ConnectionKey` (`wfp_rs::pend::app_hash`): keyed with a secret the SDK
//! draws from the kernel's RNG (`BCryptGenRandom`) at load, so paths crafted to collide under an
//! unkeyed hash do not collide under it; a load whose RNG fails fails with the RNG's status; and
//! the RNG is PASSIVE_LEVEL only.

#![cfg(any(not(windows), feature = "sim"))]

use core::ptr::null_mut;

use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::pend::app_hash;
use wfp_rs::{Status, sys};
use wfp_rs_sim::{Machine, app_id_bytes, bugcheck_test};

#[wfp_rs::driver_entry]
fn entry(_irql: &mut PassiveLevel<'_>, _driver: &mut Driver<'_>) -> Result<(), Status> {
    Ok(())
}

/// 64-bit FNV-1a, the unkeyed hash `ConnectionKey` used before.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Two image paths whose application ids (as the simulator hands them to a callout) have the
/// same FNV-1a-64, found offline with Brent's cycle search over five-character CJK names after
/// the volume prefix: FNV-1a keeps a collision through any common suffix, so both programs may
/// sit at the same place in the tree.
const COLLIDING: [&str; 2] = [COLLIDING_A, COLLIDING_B];
const COLLIDING_A: &str =
    "\\device\\harddiskvolume1\\\u{56ef}\u{5608}\u{4e48}\u{58e6}\u{548e}\\app.exe";
const COLLIDING_B: &str =
    "\\device\\harddiskvolume1\\\u{5746}\u{58dd}\u{607e}\u{670d}\u{54f5}\\app.exe";

fn loaded(machine: &Machine) -> wfp_rs_sim::LoadedDriver {
    machine
        .load_driver("app-hash", DriverEntry)
        .unwrap_or_else(|status| panic!("expected the driver to load, found {status}"))
}

fn unload(machine: &Machine, driver: wfp_rs_sim::LoadedDriver) {
    machine
        .unload_driver(driver)
        .unwrap_or_else(|error| panic!("expected a clean unload, found {error}"));
}

#[test]
fn paths_crafted_to_collide_under_fnv1a_hash_apart() {
    let machine = Machine::new();
    let driver = loaded(&machine);
    let [a, b] = COLLIDING.map(app_id_bytes);
    assert_ne!(a, b, "expected two different application ids");
    assert_eq!(
        fnv1a(&a),
        fnv1a(&b),
        "expected the crafted paths to collide under FNV-1a"
    );
    let (keyed_a, keyed_b) = (app_hash(&a), app_hash(&b));
    assert!(keyed_a.is_some(), "expected a secret once a driver loaded");
    assert_ne!(
        keyed_a, keyed_b,
        "expected the keyed hash to tell the crafted paths apart"
    );
    unload(&machine, driver);
}

#[test]
fn the_secret_stays_the_same_across_loads_and_machines() {
    let id = app_id_bytes(r"\device\harddiskvolume1\windows\system32\svchost.exe");
    let first = Machine::new();
    let driver = loaded(&first);
    let before = app_hash(&id);
    let second = Machine::new();
    let other = loaded(&second);
    assert_eq!(
        before,
        app_hash(&id),
        "expected a second load (another machine) not to re-key the hash the first one uses"
    );
    unload(&second, other);
    unload(&first, driver);
    assert_eq!(
        before,
        app_hash(&id),
        "expected unloads not to re-key either"
    );
}

#[test]
fn a_load_whose_rng_fails_fails_with_the_rngs_status() {
    let machine = Machine::new();
    machine.fail_random(Some(Status::INSUFFICIENT_RESOURCES));
    match machine.load_driver("app-hash", DriverEntry) {
        Err(status) => assert_eq!(status, Status::INSUFFICIENT_RESOURCES),
        Ok(_) => panic!("expected the load to fail with the RNG's status, found it loaded"),
    }
    machine.fail_random(None);
    let driver = loaded(&machine);
    unload(&machine, driver);
}

#[test]
fn bcrypt_gen_random_fills_the_buffer_and_checks_its_arguments() {
    let machine = Machine::new();
    machine.run(|| {
        let mut buffer = [0u8; 32];
        // SAFETY: a 32-byte buffer of ours, a null handle, the documented flag, PASSIVE_LEVEL.
        let status = unsafe {
            sys::BCryptGenRandom(
                null_mut(),
                buffer.as_mut_ptr(),
                32,
                sys::BCRYPT_USE_SYSTEM_PREFERRED_RNG,
            )
        };
        assert_eq!(status, 0, "expected STATUS_SUCCESS");
        // 32 zero bytes from a working RNG: probability 2^-256.
        assert_ne!(buffer, [0; 32], "expected random bytes in the buffer");
        // SAFETY: as above, without the flag: a provider handle is then required.
        let status = unsafe { sys::BCryptGenRandom(null_mut(), buffer.as_mut_ptr(), 32, 0) };
        assert_eq!(status, Status::INVALID_HANDLE.raw());
        let mut handle = 0u8;
        // SAFETY: as above; the flag requires a null handle and this one is not.
        let status = unsafe {
            sys::BCryptGenRandom(
                (&raw mut handle).cast(),
                buffer.as_mut_ptr(),
                32,
                sys::BCRYPT_USE_SYSTEM_PREFERRED_RNG,
            )
        };
        assert_eq!(status, Status::INVALID_PARAMETER.raw());
    });
}

bugcheck_test! {
    /// `BCRYPT_USE_SYSTEM_PREFERRED_RNG` is supported at PASSIVE_LEVEL only.
    fn the_system_preferred_rng_at_dispatch_stops() expects IRQL_NOT_LESS_OR_EQUAL {
        let machine = Machine::new();
        machine.at_dispatch(|_irql| {
            let mut buffer = [0u8; 16];
            // SAFETY: deliberately breaking the IRQL rule; the buffer is ours.
            unsafe {
                sys::BCryptGenRandom(
                    null_mut(),
                    buffer.as_mut_ptr(),
                    16,
                    sys::BCRYPT_USE_SYSTEM_PREFERRED_RNG,
                )
            };
        });
    }
}
