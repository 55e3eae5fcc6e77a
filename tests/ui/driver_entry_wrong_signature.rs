// A driver entry that leaves out the IRQL token: the SDK calls it with `&mut PassiveLevel` and
// `&mut Driver`, in that order.

use wfp_rs::Status;
use wfp_rs::driver::Driver;

#[wfp_rs::driver_entry]
fn entry(driver: &mut Driver) -> Result<(), Status> {
    let _ = driver;
    Ok(())
}

fn main() {}
