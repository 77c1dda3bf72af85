//! Custom framings on arbitrary bytes: never panic, never return a message past the
//! maximum.
#![no_main]

use bytes::{Bytes, BytesMut};
use edge_gateway::framing::CustomFramer;
use libfuzzer_sys::fuzz_target;
use tcpc_proto::v1::{Framing, IdleGap, LengthField, framing::Kind};
use tokio_util::codec::Decoder;

const MAX: usize = 256;

fuzz_target!(|input: &[u8]| {
    let [kind, a, b, rest @ ..] = input else { return };
    let kind = match kind % 4 {
        0 => Kind::Delimiter(Bytes::copy_from_slice(&[*a, *b][..1 + (*b as usize % 2)])),
        1 => Kind::FixedLength(1 + u32::from(*a) % MAX as u32),
        2 => Kind::LengthField(LengthField {
            offset: u32::from(*a % 8),
            width: [1, 2, 4, 8][*b as usize % 4],
            little_endian: b & 4 != 0,
            adjustment: i32::from(*a as i8),
        }),
        _ => Kind::IdleGap(IdleGap { gap_ms: 1, buffer_size: 1 + u32::from(*a) % MAX as u32 }),
    };
    // As a device's config builds it; a framing refused there never cuts a stream.
    let Ok(mut framer) = CustomFramer::from_proto(Some(&Framing { kind: Some(kind) }), MAX) else { return };
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
