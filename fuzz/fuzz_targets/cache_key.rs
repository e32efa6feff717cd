#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::cache_key(data));
