#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_user_qcow2_fuzz::harness::qmp::run(data);
});
