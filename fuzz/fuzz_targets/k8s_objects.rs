//! Arbitrary JSON as Services and EndpointSlices, through the translation the agent
//! runs on API objects: never a panic, and the same objects give the same result.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xlb::fuzzing::k8s_objects(data);
});
