// Reading an IP address at a layer below IP: INBOUND_MAC_FRAME_ETHERNET sees Ethernet frames and
// has no IP version, so it has MAC addresses (MAC_REMOTE_ADDRESS) but no IP_REMOTE_ADDRESS. The
// layer's `Address` type is uninhabited; the field read itself does not compile.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::{InboundMacFrameEthernet, fields};

struct Frames;

impl Callout<InboundMacFrameEthernet> for Frames {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, InboundMacFrameEthernet>) {
        let _mac: Result<[u8; 6], _> = c.values.get::<fields::MacRemoteAddress>();
        let _ip = c.values.get::<fields::IpRemoteAddress>();
    }
}

fn main() {}
