//! The TP decoder on arbitrary bytes fed in arbitrary pieces: never panics, never
//! buffers or reserves past one maximal frame plus the piece just fed.
#![no_main]

use bytes::BytesMut;
use edge_gateway::codec::{HEADER_LEN, TpCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX: usize = 512;

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, bytes)) = input.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut codec = TpCodec::new(MAX);
    let mut buf = BytesMut::new();
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => assert!(frame.payload.len() <= MAX),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= HEADER_LEN + MAX + chunk);
        assert!(buf.capacity() <= 2 * (HEADER_LEN + MAX + chunk) + 64);
    }
});
