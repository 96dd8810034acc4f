//! Decodes arbitrary bytes as a `HaveMessage`: it must fail cleanly or round-trip exactly.
#![no_main]

use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::wire::HaveMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = HaveMessage::decode(data) {
        // Canonical: whatever decodes re-encodes to the very same bytes.
        assert_eq!(value.encode().expect("a decoded value encodes"), data);
    }
});
