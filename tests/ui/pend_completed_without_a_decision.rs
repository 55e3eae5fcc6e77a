// Completing a pended decision with something that is not a decision: "continue" (the next
// filter decides) or a raw action value. A pend completes only with permit or block.

use wfp_rs::classify::Action;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::pend::{FinalAction, PendedDecision};

fn complete_with_continue(irql: &PassiveLevel<'_>, pended: PendedDecision) {
    pended.complete(irql, Action::Continue);
}

fn complete_with_a_raw_value(irql: &PassiveLevel<'_>, pended: PendedDecision) {
    pended.complete(irql, Action::Other(0x1234));
}

fn complete_with_final_continue(irql: &PassiveLevel<'_>, pended: PendedDecision) {
    pended.complete(irql, FinalAction::Continue);
}

fn main() {}
