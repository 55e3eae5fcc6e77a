// PASSIVE_LEVEL-only calls from code that may run above it: opening a filter engine session
// from a classifyFn (`&DispatchLevel`) and creating a communication port with an `&ApcLevel`.
// Both take `&impl AtPassive`, which only a `PassiveLevel` token proves.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::engine::{Engine, SessionOptions};
use wfp_rs::irql::{ApcLevel, DispatchLevel};
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::port::{Filter, Protocol, ServerPort};

struct OpensASession;

impl Callout<AleAuthConnectV4> for OpensASession {
    fn classify(&self, irql: &mut DispatchLevel<'_>, _c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = Engine::open(irql, SessionOptions::new());
    }
}

fn create<P: Protocol>(irql: &ApcLevel<'_>, filter: &Filter) {
    let _ = ServerPort::<P>::create(irql, filter, "\\Port", 1, ());
}

fn main() {}
