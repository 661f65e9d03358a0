//! The frame decoder on hostile bytes in any split, plus honest round trips.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmlink_endpoint::fuzzing::frame_decoder(data));
