// A closure that captures the shared token and locks through a copy of it, for example a
// callback handed to some iteration helper: still `&mut &PassiveLevel`, still refused.

use wfp_rs::event::Event;
use wfp_rs::irql::PassiveLevel;
use wfp_rs::spin_lock::SpinLock;

fn each(items: &[u32], mut f: impl FnMut(u32)) {
    for item in items {
        f(*item);
    }
}

fn add_all(irql: &PassiveLevel<'_>, total: &SpinLock<u32>, items: &[u32], reply: &Event) {
    each(items, |item| {
        let mut token = irql;
        total.lock(&mut token, |total, _| {
            *total += item;
            reply.wait(irql);
        });
    });
}

fn main() {}
