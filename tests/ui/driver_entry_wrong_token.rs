// A driver entry that asks for the wrong token: DriverEntry runs at PASSIVE_LEVEL and receives
// `&mut PassiveLevel`, not the `&DispatchLevel` of a WFP callback.

use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::irql::DispatchLevel;

#[wfp_rs::driver_entry]
fn entry(irql: &DispatchLevel, driver: &mut Driver) -> Result<(), Status> {
    let _ = (irql, driver);
    Ok(())
}

fn main() {}
