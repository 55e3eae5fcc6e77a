// Cloning for network receive injection at a layer whose packet is not an IP packet from its
// IP header: INBOUND_TRANSPORT's data starts past the transport header. Network clones exist
// only at INBOUND_IPPACKET (receive) and OUTBOUND_IPPACKET (send), forward clones at IPFORWARD.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::InboundTransportV4;

struct Holder;

impl Callout<InboundTransportV4> for Holder {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, InboundTransportV4>) {
        let _ = c.clone_for_network_receive(irql);
    }
}

fn main() {}
