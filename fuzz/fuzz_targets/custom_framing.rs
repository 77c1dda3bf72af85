//! Custom framings on arbitrary bytes: never panic, never return a message past the
//! maximum.
#![no_main]

use bytes::{Bytes, BytesMut};
use edge_gateway::framing::CustomFramer;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX: usize = 256;

fuzz_target!(|input: &[u8]| {
    let [kind, a, b, rest @ ..] = input else { return };
    let mut framer = match kind % 4 {
        0 => CustomFramer::Delimiter { delimiter: Bytes::copy_from_slice(&[*a, *b][..1 + (*b as usize % 2)]), max: MAX },
        1 => CustomFramer::FixedLength(1 + *a as usize % MAX),
        2 => CustomFramer::LengthField {
            offset: *a as usize % 8,
            width: [1, 2, 4, 8][*b as usize % 4],
            little_endian: b & 4 != 0,
            adjustment: i64::from(*a as i8),
            max: MAX,
        },
        _ => CustomFramer::IdleGap { gap: std::time::Duration::from_millis(1), buffer_size: 1 + *a as usize % MAX },
    };
    let mut buf = BytesMut::new();
    for piece in rest.chunks(7) {
        buf.extend_from_slice(piece);
        loop {
            match framer.decode(&mut buf) {
                Ok(Some(message)) => assert!(message.len() <= MAX),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
