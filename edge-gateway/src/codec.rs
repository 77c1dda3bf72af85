//! The TP frame codec: `'T' 'P' | TYPE u8 | CMD u8 | LENGTH u32 BE | PAYLOAD[LENGTH]`.
//!
//! The stream is a byte stream: a frame may arrive split over many reads or several
//! frames in one. LENGTH is checked against the configured maximum before a byte of
//! the payload is buffered, and a bad magic or an unknown TYPE is an error as soon as
//! its byte arrives, so a peer can never make the codec allocate past the limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The two magic bytes every frame starts with.
pub const MAGIC: &[u8; 2] = b"TP";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;

/// TYPE of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    Data = 0,
    Heartbeat = 1,
}

/// CMD values of the TP protocol (device → service 0x0–0x5, service → device 0x10–0x13).
pub mod cmd {
    /// Device → service: authenticate (payload: AccessToken). Service → device: the
    /// answer `{"result":0}` or `{"result":1,"message":"…"}`.
    pub const AUTH: u8 = 0x00;
    pub const ATTRIBUTES: u8 = 0x01;
    pub const EVENTS: u8 = 0x02;
    pub const TELEMETRY: u8 = 0x03;
    pub const COMMAND_RESPONSE: u8 = 0x04;
    pub const ATTRIBUTE_SET_RESPONSE: u8 = 0x05;
    pub const TELEMETRY_CONTROL: u8 = 0x10;
    pub const ATTRIBUTE_SET: u8 = 0x11;
    pub const COMMAND: u8 = 0x12;
    pub const ATTRIBUTE_GET: u8 = 0x13;
    /// Service → device: the connection is being closed for the reason in the payload
    /// `{"result":1,"message":"…"}`.
    pub const ERROR: u8 = 0xFF;
}

/// One TP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub frame_type: FrameType,
    pub cmd: u8,
    pub payload: Bytes,
}

impl Frame {
    pub fn data(cmd: u8, payload: impl Into<Bytes>) -> Self {
        Frame { frame_type: FrameType::Data, cmd, payload: payload.into() }
    }

    pub fn heartbeat(cmd: u8) -> Self {
        Frame { frame_type: FrameType::Heartbeat, cmd, payload: Bytes::new() }
    }

    /// The frame as bytes on the wire.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        put_frame(self, &mut out);
        out.freeze()
    }
}

/// Why a byte stream is not TP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TpError {
    #[error("bad magic {0:#04x}: frames start with 'T' 'P'")]
    BadMagic(u8),
    #[error("unknown frame TYPE {0:#04x}")]
    UnknownType(u8),
    #[error("frame LENGTH {length} exceeds the maximum of {max} bytes")]
    TooLong { length: u64, max: usize },
}

/// Reading and writing failed, or the stream is not TP.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Protocol(#[from] TpError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Decoder and encoder of TP frames with a maximum payload length.
#[derive(Clone, Copy, Debug)]
pub struct TpCodec {
    max_payload: usize,
}

impl TpCodec {
    pub fn new(max_payload: usize) -> Self {
        TpCodec { max_payload }
    }

    /// Checks the header bytes that have arrived so far, complete or not.
    fn check_header(&self, header: &[u8]) -> Result<Option<(FrameType, u8, usize)>, TpError> {
        for (i, &byte) in header.iter().take(2).enumerate() {
            if byte != MAGIC[i] {
                return Err(TpError::BadMagic(byte));
            }
        }
        let Some(&type_byte) = header.get(2) else {
            return Ok(None);
        };
        let frame_type = match type_byte {
            0 => FrameType::Data,
            1 => FrameType::Heartbeat,
            other => return Err(TpError::UnknownType(other)),
        };
        if header.len() < HEADER_LEN {
            return Ok(None);
        }
        let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if length as usize > self.max_payload {
            return Err(TpError::TooLong { length: length.into(), max: self.max_payload });
        }
        Ok(Some((frame_type, header[3], length as usize)))
    }
}

impl Decoder for TpCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some((frame_type, cmd, length)) = self.check_header(&src[..src.len().min(HEADER_LEN)])? else {
            return Ok(None);
        };
        let total = HEADER_LEN + length;
        if src.len() < total {
            // Bounded by the check above: at most max_payload + HEADER_LEN.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        frame.advance(HEADER_LEN);
        Ok(Some(Frame { frame_type, cmd, payload: frame.freeze() }))
    }
}

impl Encoder<Frame> for TpCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        if frame.payload.len() > self.max_payload {
            return Err(TpError::TooLong { length: frame.payload.len() as u64, max: self.max_payload }.into());
        }
        put_frame(&frame, dst);
        Ok(())
    }
}

fn put_frame(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(HEADER_LEN + frame.payload.len());
    dst.put_slice(MAGIC);
    dst.put_u8(frame.frame_type as u8);
    dst.put_u8(frame.cmd);
    dst.put_u32(frame.payload.len() as u32);
    dst.put_slice(&frame.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for frame in frames {
            TpCodec::new(usize::MAX).encode(frame.clone(), &mut out).unwrap();
        }
        out
    }

    fn decode_all(codec: &mut TpCodec, buf: &mut BytesMut) -> Vec<Frame> {
        std::iter::from_fn(|| codec.decode(buf).unwrap()).collect()
    }

    #[test]
    fn encodes_the_documented_layout() {
        let bytes = Frame::data(cmd::ATTRIBUTES, &b"{\"t\":1}"[..]).to_bytes();
        assert_eq!(&bytes[..], b"TP\x00\x01\x00\x00\x00\x07{\"t\":1}");
        assert_eq!(&Frame::heartbeat(0).to_bytes()[..], b"TP\x01\x00\x00\x00\x00\x00");
    }

    #[test]
    fn frames_split_at_every_byte() {
        let frames = [
            Frame::data(cmd::AUTH, &b"token"[..]),
            Frame::heartbeat(0),
            Frame::data(cmd::EVENTS, &b"{}"[..]),
        ];
        let whole = wire(&frames);
        for cut in 0..whole.len() {
            let mut codec = TpCodec::new(1024);
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = decode_all(&mut codec, &mut buf);
            buf.extend_from_slice(&whole[cut..]);
            got.extend(decode_all(&mut codec, &mut buf));
            assert_eq!(got, frames, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn coalesced_frames_decode_in_order() {
        let frames: Vec<_> = (0..10u8).map(|i| Frame::data(cmd::TELEMETRY, vec![i; i as usize])).collect();
        let mut buf = wire(&frames);
        assert_eq!(decode_all(&mut TpCodec::new(64), &mut buf), frames);
    }

    #[test]
    fn bad_magic_is_an_error_at_its_first_byte() {
        let mut codec = TpCodec::new(64);
        assert!(matches!(
            codec.decode(&mut BytesMut::from(&b"G"[..])),
            Err(CodecError::Protocol(TpError::BadMagic(b'G')))
        ));
        assert!(matches!(
            codec.decode(&mut BytesMut::from(&b"TX"[..])),
            Err(CodecError::Protocol(TpError::BadMagic(b'X')))
        ));
    }

    #[test]
    fn unknown_type_is_an_error() {
        let err = TpCodec::new(64).decode(&mut BytesMut::from(&b"TP\x07"[..])).unwrap_err();
        assert_eq!(err.to_string(), "unknown frame TYPE 0x07");
    }

    #[test]
    fn oversize_length_is_refused_before_the_payload_arrives() {
        let mut buf = BytesMut::from(&b"TP\x00\x01\xff\xff\xff\xff"[..]);
        let err = TpCodec::new(65536).decode(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "frame LENGTH 4294967295 exceeds the maximum of 65536 bytes");
        assert!(buf.capacity() < 1024, "nothing reserved for the oversize frame");
    }

    #[test]
    fn a_payload_at_the_limit_is_accepted() {
        let frame = Frame::data(cmd::TELEMETRY, vec![7u8; 16]);
        let mut buf = wire(std::slice::from_ref(&frame));
        assert_eq!(TpCodec::new(16).decode(&mut buf).unwrap(), Some(frame));
        let mut buf = wire(&[Frame::data(cmd::TELEMETRY, vec![7u8; 17])]);
        assert!(TpCodec::new(16).decode(&mut buf).is_err());
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        (any::<bool>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
            |(heartbeat, cmd, payload)| Frame {
                frame_type: if heartbeat { FrameType::Heartbeat } else { FrameType::Data },
                cmd,
                payload: payload.into(),
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip_through_any_read_sizes(
            frames in proptest::collection::vec(any_frame(), 0..20),
            chunk in 1usize..64,
        ) {
            let whole = wire(&frames);
            let mut codec = TpCodec::new(300);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in whole.chunks(chunk) {
                buf.extend_from_slice(piece);
                got.extend(decode_all(&mut codec, &mut buf));
            }
            prop_assert_eq!(got, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_reserve_past_the_limit(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            chunk in 1usize..128,
        ) {
            let max = 256;
            let mut codec = TpCodec::new(max);
            let mut buf = BytesMut::new();
            'feed: for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => prop_assert!(frame.payload.len() <= max),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                    // Never more buffered or reserved than a frame at the limit needs
                    // plus what the test fed in one piece.
                }
                prop_assert!(buf.len() <= HEADER_LEN + max + chunk);
            }
        }
    }
}
