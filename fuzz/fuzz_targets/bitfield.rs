//! Builds a bitfield from arbitrary parts (the first 4 bytes are the bit count, little endian):
//! it must fail cleanly or keep exactly those bytes. Bitfields on the wire travel inside
//! control responses, whose target also covers their serde path.
#![no_main]

use imiswarm_protocol::bitfield::Bitfield;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, bytes)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = u32::from_le_bytes(*len);
    if let Ok(bits) = Bitfield::from_parts(len, bytes) {
        assert_eq!(bits.len(), len);
        assert_eq!(bits.as_bytes(), bytes);
        assert!(bits.iter_ones().all(|i| i < len));
    }
});
