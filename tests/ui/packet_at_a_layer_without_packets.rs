// Reading the packet at a layer that has none. In C, `layerData` is a `void *` at every layer: a
// callout at ALE_RESOURCE_ASSIGNMENT (a bind, no packet) can cast it to a NET_BUFFER_LIST and
// read whatever it points to, and at the stream layer it is not a NET_BUFFER_LIST at all. Here
// the packet exists only at the layers that pass one, and stream data only at stream layers.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::{AleResourceAssignmentV4, StreamV4};

struct BindInspector;

impl Callout<AleResourceAssignmentV4> for BindInspector {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleResourceAssignmentV4>) {
        let _ = c.packet();
    }
}

struct StreamInspector;

impl Callout<StreamV4> for StreamInspector {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, StreamV4>) {
        let _ = c.packet();
    }
}

fn main() {}
