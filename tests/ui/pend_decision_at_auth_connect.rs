// `pend_decision` (classify handle) exists only at the layers that pend that way; ALE_AUTH_CONNECT
// pends with a completion handle.
use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;

struct Asker;

impl Callout<AleAuthConnectV4> for Asker {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        let _pended = c.pend_decision();
    }
}

fn main() {}
