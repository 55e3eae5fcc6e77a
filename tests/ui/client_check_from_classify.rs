// The client check from code that may run above PASSIVE_LEVEL: a callout that keeps the
// service's identity and checks "the current process" in classifyFn, directly and through a
// helper closure. The check queries the process's token and image (PASSIVE_LEVEL only), and in
// classifyFn the current process is not the connection's anyway: it takes `&impl AtPassive`,
// which a `DispatchLevel` token does not prove.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::client::ClientIdentity;
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;

struct OnlyTheService {
    identity: ClientIdentity,
}

impl Callout<AleAuthConnectV4> for OnlyTheService {
    fn classify(&self, irql: &mut DispatchLevel<'_>, _c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = self.identity.check_current_process(irql);
        let is_service = |irql: &DispatchLevel<'_>| self.identity.check_current_process(irql).is_ok();
        let _ = is_service(irql);
    }
}

fn main() {}
