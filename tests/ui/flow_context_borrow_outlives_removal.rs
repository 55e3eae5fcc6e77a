// A callout reads its flow context, removes it, and reads the old reference again. Whatever the
// engine does with the removed context (on Windows flowDeleteFn may free it), a `&F` from
// `flow_context` cannot be alive across `remove_flow_context`, which takes the classification
// mutably.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::OutboundTransportV4;

struct Bytes(u64);

struct CountOnce;

impl Callout<OutboundTransportV4, Bytes> for CountOnce {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, OutboundTransportV4, Bytes>) {
        if let Some(bytes) = c.flow_context() {
            let _ = c.remove_flow_context(irql);
            let _ = bytes.0;
        }
    }
}

fn main() {}
