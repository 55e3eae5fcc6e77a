// A GUID literal with a digit missing from its last group.

const CALLOUT_KEY: wfp_rs::Guid = wfp_rs::guid!("7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4f");

fn main() {}
