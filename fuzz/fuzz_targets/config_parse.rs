//! The config parser on arbitrary input: never a panic; a rejection always says why;
//! an accepted file always validates.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xlb::fuzzing::config_parse(data);
});
