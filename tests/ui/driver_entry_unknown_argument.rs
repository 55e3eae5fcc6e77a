// `#[driver_entry]` takes one optional argument, `no_panic_handler`; a misspelling must not
// silently leave the image without (or with) a panic handler.

use wfp_rs::Status;
use wfp_rs::driver::Driver;
use wfp_rs::irql::PassiveLevel;

#[wfp_rs::driver_entry(no_panic_handlers)]
fn entry(irql: &mut PassiveLevel, driver: &mut Driver) -> Result<(), Status> {
    let _ = (irql, driver);
    Ok(())
}

fn main() {}
