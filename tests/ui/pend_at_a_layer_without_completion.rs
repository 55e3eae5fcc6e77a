// `pend` (completion handle) exists only at ALE_AUTH_CONNECT and ALE_AUTH_RECV_ACCEPT; a packet at
// the transport layer cannot be held that way.
use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::OutboundTransportV4;

struct Asker;

impl Callout<OutboundTransportV4> for Asker {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, OutboundTransportV4>) {
        let _pended = c.pend();
    }
}

fn main() {}
