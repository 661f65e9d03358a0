//! The ring reader and writer with the shared count and data rewritten between operations.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmlink_endpoint::fuzzing::ring_reader(data));
