//! Custom (pass-through) protocol: the AccessToken line, then the device's framing.
//!
//! The framing comes with the auth reply and cuts the byte stream into messages:
//! delimiter, fixed length, length field, or idle gap with a buffer size (the default,
//! 1 KiB, as the original plugin had it). Every framing is bounded by the maximum
//! message size before it buffers.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tcpc_proto::v1::{Framing, framing};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

/// Default idle-gap framing when the device config names none.
pub const DEFAULT_BUFFER_SIZE: usize = 1024;
/// Default silence that ends a message in idle-gap framing.
pub const DEFAULT_IDLE_GAP: Duration = Duration::from_millis(50);

/// Why a byte stream does not fit the configured framing, or the framing is unusable.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("message exceeds the maximum of {max} bytes")]
    TooLong { max: usize },
    #[error("length field: {0}")]
    LengthField(#[source] std::io::Error),
    #[error("length field declares a message shorter than its own header")]
    DeclaredTooShort,
    #[error("invalid framing configuration: {0}")]
    Config(&'static str),
    #[error("socket: {0}")]
    Io(String),
}

impl From<std::io::Error> for FramingError {
    fn from(error: std::io::Error) -> Self {
        FramingError::Io(error.to_string())
    }
}

/// A custom device's framing, ready to cut its stream.
#[derive(Clone, Debug)]
pub enum CustomFramer {
    /// `searched`: bytes at the buffer's start already known to hold no delimiter, so
    /// that a message dripped byte by byte is scanned once, not once per read.
    Delimiter {
        delimiter: Bytes,
        max: usize,
        searched: usize,
    },
    FixedLength(usize),
    /// tokio-util's codec, bounded so that the whole frame (header, length and
    /// adjustment) stays within the maximum; it checks the length before it buffers.
    /// `header`: offset and width, which every frame at least holds.
    LengthField {
        codec: LengthDelimitedCodec,
        header: usize,
    },
    IdleGap {
        gap: Duration,
        buffer_size: usize,
    },
}

impl CustomFramer {
    /// Builds the framer the auth reply asks for, bounded by `max` bytes per message.
    ///
    /// # Errors
    /// A framing that cannot work (empty delimiter, zero length, a length field wider
    /// than 8 bytes, a size past `max`).
    pub fn from_proto(framing: Option<&Framing>, max: usize) -> Result<Self, FramingError> {
        let Some(kind) = framing.and_then(|f| f.kind.as_ref()) else {
            return Ok(CustomFramer::IdleGap {
                gap: DEFAULT_IDLE_GAP,
                buffer_size: DEFAULT_BUFFER_SIZE.min(max),
            });
        };
        let framer = match kind {
            framing::Kind::Delimiter(delimiter) if delimiter.is_empty() => {
                return Err(FramingError::Config("empty delimiter"));
            }
            framing::Kind::Delimiter(delimiter) => {
                CustomFramer::Delimiter { delimiter: delimiter.clone(), max, searched: 0 }
            }
            framing::Kind::FixedLength(0) => return Err(FramingError::Config("zero fixed length")),
            framing::Kind::FixedLength(n) if *n as usize > max => {
                return Err(FramingError::Config("fixed length above the maximum message size"));
            }
            framing::Kind::FixedLength(n) => CustomFramer::FixedLength(*n as usize),
            framing::Kind::LengthField(field) => {
                if !matches!(field.width, 1 | 2 | 4 | 8) {
                    return Err(FramingError::Config("length field width must be 1, 2, 4 or 8"));
                }
                // The header is buffered before the length is known, and the codec
                // bounds the length before the adjustment: a tenant's offset or
                // adjustment must not make the edge buffer past the maximum.
                let header = field.offset as usize + field.width as usize;
                let added = usize::try_from(field.adjustment.max(0)).unwrap_or(usize::MAX);
                let Some(payload_max) = max.checked_sub(header).and_then(|rest| rest.checked_sub(added))
                else {
                    return Err(FramingError::Config("length field ends past the maximum message size"));
                };
                let mut builder = LengthDelimitedCodec::builder();
                builder
                    .length_field_offset(field.offset as usize)
                    .length_field_length(field.width as usize)
                    // The whole frame, header included, is the message: nothing is
                    // skipped, and the header's length is added to the declared one.
                    .length_adjustment(field.adjustment as isize + header as isize)
                    .num_skip(0)
                    .max_frame_length(payload_max);
                if field.little_endian {
                    builder.little_endian();
                } else {
                    builder.big_endian();
                }
                CustomFramer::LengthField { codec: builder.new_codec(), header }
            }
            framing::Kind::IdleGap(idle) => CustomFramer::IdleGap {
                gap: if idle.gap_ms == 0 {
                    DEFAULT_IDLE_GAP
                } else {
                    Duration::from_millis(idle.gap_ms.into())
                },
                buffer_size: match idle.buffer_size as usize {
                    0 => DEFAULT_BUFFER_SIZE.min(max),
                    n if n > max => {
                        return Err(FramingError::Config("buffer size above the maximum message size"));
                    }
                    n => n,
                },
            },
        };
        Ok(framer)
    }

    /// For idle-gap framing: the silence after which buffered bytes are a message.
    pub fn idle_gap(&self) -> Option<Duration> {
        match self {
            CustomFramer::IdleGap { gap, .. } => Some(*gap),
            _ => None,
        }
    }

    /// Ends the message in progress: after its idle gap, or when the device closed the
    /// connection. Idle-gap and delimiter framings only: a fixed-length or length-field
    /// message cut short is incomplete, not a message.
    pub fn flush_at_end(&mut self, src: &mut BytesMut) -> Option<Bytes> {
        let ends = matches!(self, CustomFramer::IdleGap { .. } | CustomFramer::Delimiter { .. });
        if let CustomFramer::Delimiter { searched, .. } = self {
            *searched = 0;
        }
        (ends && !src.is_empty()).then(|| src.split().freeze())
    }
}

impl Decoder for CustomFramer {
    type Item = Bytes;
    type Error = FramingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
        match self {
            CustomFramer::Delimiter { delimiter, max, searched } => loop {
                // A delimiter may straddle the bytes searched and the new ones.
                let from = searched.saturating_sub(delimiter.len() - 1).min(src.len());
                let Some(at) = memchr::memmem::find(&src[from..], delimiter).map(|at| from + at) else {
                    *searched = src.len();
                    // No delimiter among `max` bytes plus a delimiter: never will be.
                    if src.len() > *max + delimiter.len() {
                        return Err(FramingError::TooLong { max: *max });
                    }
                    return Ok(None);
                };
                *searched = 0;
                if at > *max {
                    return Err(FramingError::TooLong { max: *max });
                }
                let message = src.split_to(at).freeze();
                let _ = src.split_to(delimiter.len());
                // Back-to-back delimiters (a blank line) carry no message.
                if !message.is_empty() {
                    return Ok(Some(message));
                }
            },
            CustomFramer::FixedLength(n) => Ok((src.len() >= *n).then(|| src.split_to(*n).freeze())),
            CustomFramer::LengthField { codec, header } => match codec.decode(src) {
                Ok(Some(frame)) if frame.len() < *header => Err(FramingError::DeclaredTooShort),
                Ok(frame) => Ok(frame.map(BytesMut::freeze)),
                Err(error) => Err(FramingError::LengthField(error)),
            },
            CustomFramer::IdleGap { buffer_size, .. } => {
                Ok((src.len() >= *buffer_size).then(|| src.split_to(*buffer_size).freeze()))
            }
        }
    }
}

/// What ends the AccessToken of a custom device (besides an idle gap).
pub const TOKEN_END: u8 = b'\n';

/// Takes the AccessToken off the front of a custom device's stream: the bytes up to the
/// first newline (a trailing `\r` and surrounding spaces dropped), leaving the rest in
/// `src`. With `gap_elapsed`, everything buffered is the token.
///
/// # Errors
/// The token is longer than `max` or not UTF-8.
pub fn take_token(src: &mut BytesMut, max: usize, gap_elapsed: bool) -> Result<Option<String>, TokenError> {
    let end = match src.iter().position(|&b| b == TOKEN_END) {
        Some(at) => at,
        None if src.len() > max => return Err(TokenError::TooLong { max }),
        None if gap_elapsed && !src.is_empty() => src.len(),
        None => return Ok(None),
    };
    if end > max {
        return Err(TokenError::TooLong { max });
    }
    let line = src.split_to(end);
    if !src.is_empty() {
        let _ = src.split_to(1);
    }
    let token = std::str::from_utf8(&line).map_err(|_| TokenError::NotUtf8)?.trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    Ok(Some(token.to_owned()))
}

/// Why the first line of a custom device is not an AccessToken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("access token longer than {max} bytes")]
    TooLong { max: usize },
    #[error("access token is not UTF-8")]
    NotUtf8,
    #[error("empty access token")]
    Empty,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpc_proto::v1::{IdleGap, LengthField};

    fn framer(kind: framing::Kind) -> CustomFramer {
        CustomFramer::from_proto(Some(&Framing { kind: Some(kind) }), 64).unwrap()
    }

    fn cut(framer: &mut CustomFramer, pieces: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(message) = framer.decode(&mut buf).unwrap() {
                out.push(message.to_vec());
            }
        }
        out
    }

    #[test]
    fn delimiter_split_and_coalesced() {
        let mut f = framer(framing::Kind::Delimiter(Bytes::from_static(b"\r\n")));
        assert_eq!(
            cut(&mut f, &[b"ab", b"c\r", b"\nde\r\n\r\nf\r\n"]),
            vec![b"abc".to_vec(), b"de".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn a_dripped_message_is_scanned_once() {
        let mut f = framer(framing::Kind::Delimiter(Bytes::from_static(b"\r\n")));
        let mut buf = BytesMut::new();
        for byte in b"abcdef\r" {
            buf.extend_from_slice(&[*byte]);
            assert_eq!(f.decode(&mut buf).unwrap(), None);
        }
        let CustomFramer::Delimiter { searched, .. } = f else { unreachable!() };
        assert_eq!(searched, 7, "every byte searched once, remembered");
        buf.extend_from_slice(b"\n");
        assert_eq!(f.decode(&mut buf).unwrap().as_deref(), Some(&b"abcdef"[..]), "a delimiter across reads");
    }

    #[test]
    fn delimiter_bounded_by_max() {
        let mut f = framer(framing::Kind::Delimiter(Bytes::from_static(b"\n")));
        let mut buf = BytesMut::from(&[b'x'; 66][..]);
        assert!(matches!(f.decode(&mut buf), Err(FramingError::TooLong { max: 64 })));
    }

    #[test]
    fn fixed_length() {
        let mut f = framer(framing::Kind::FixedLength(3));
        assert_eq!(cut(&mut f, &[b"12", b"3456", b"78"]), vec![b"123".to_vec(), b"456".to_vec()]);
    }

    #[test]
    fn length_field_big_and_little_endian() {
        // 0xAA marker, 2-byte big-endian length of what follows the header.
        let mut f = framer(framing::Kind::LengthField(LengthField {
            offset: 1,
            width: 2,
            little_endian: false,
            adjustment: 0,
        }));
        assert_eq!(
            cut(&mut f, &[b"\xaa\x00", b"\x02hi\xaa\x00\x01", b"!"]),
            vec![b"\xaa\x00\x02hi".to_vec(), b"\xaa\x00\x01!".to_vec()]
        );
        // Little-endian 4-byte length that counts itself (adjustment -4).
        let mut f = framer(framing::Kind::LengthField(LengthField {
            offset: 0,
            width: 4,
            little_endian: true,
            adjustment: -4,
        }));
        assert_eq!(cut(&mut f, &[b"\x06\x00\x00\x00ok"]), vec![b"\x06\x00\x00\x00ok".to_vec()]);
    }

    #[test]
    fn length_field_shorter_than_its_header_is_refused() {
        let mut f = framer(framing::Kind::LengthField(LengthField {
            offset: 1,
            width: 1,
            little_endian: false,
            adjustment: -2,
        }));
        let mut buf = BytesMut::from(&b"\xaa\x00\x00"[..]);
        assert!(matches!(f.decode(&mut buf), Err(FramingError::DeclaredTooShort)));
    }

    #[test]
    fn length_field_refuses_oversize_before_buffering() {
        let mut f = framer(framing::Kind::LengthField(LengthField {
            offset: 0,
            width: 8,
            little_endian: false,
            adjustment: 0,
        }));
        let mut buf = BytesMut::from(&[0xff; 8][..]);
        assert!(matches!(f.decode(&mut buf), Err(FramingError::LengthField(_))));
        assert!(buf.capacity() < 64);
    }

    #[test]
    fn idle_gap_cuts_at_buffer_size_and_flushes_on_gap() {
        let mut f = framer(framing::Kind::IdleGap(IdleGap { gap_ms: 20, buffer_size: 4 }));
        assert_eq!(f.idle_gap(), Some(Duration::from_millis(20)));
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(f.decode(&mut buf).unwrap().as_deref(), Some(&b"abcd"[..]));
        assert_eq!(f.decode(&mut buf).unwrap(), None);
        assert_eq!(f.flush_at_end(&mut buf).as_deref(), Some(&b"ef"[..]));
        assert_eq!(f.flush_at_end(&mut buf), None);
        let mut fixed = framer(framing::Kind::FixedLength(4));
        assert_eq!(
            fixed.flush_at_end(&mut BytesMut::from(&b"ab"[..])),
            None,
            "a cut-short frame is no message"
        );
    }

    #[test]
    fn default_is_idle_gap_with_one_kib() {
        assert!(matches!(
            CustomFramer::from_proto(None, 65536).unwrap(),
            CustomFramer::IdleGap { gap: DEFAULT_IDLE_GAP, buffer_size: 1024 }
        ));
    }

    #[test]
    fn unusable_framing_is_refused() {
        for kind in [
            framing::Kind::Delimiter(Bytes::new()),
            framing::Kind::FixedLength(0),
            framing::Kind::FixedLength(65),
            framing::Kind::LengthField(LengthField { width: 3, ..Default::default() }),
            // A tenant's offset would make the header alone exceed the maximum.
            framing::Kind::LengthField(LengthField { offset: 4_000_000_000, width: 4, ..Default::default() }),
            framing::Kind::LengthField(LengthField { offset: 60, width: 8, ..Default::default() }),
            // An adjustment would let a small length declare a huge frame.
            framing::Kind::LengthField(LengthField { width: 1, adjustment: 1 << 30, ..Default::default() }),
        ] {
            assert!(CustomFramer::from_proto(Some(&Framing { kind: Some(kind) }), 64).is_err());
        }
    }

    #[test]
    fn token_line_then_data_in_one_read() {
        let mut buf = BytesMut::from(&b"  tok-1\r\n\x01\x02"[..]);
        assert_eq!(take_token(&mut buf, 64, false), Ok(Some("tok-1".to_owned())));
        assert_eq!(&buf[..], b"\x01\x02");
    }

    #[test]
    fn token_waits_for_newline_or_gap() {
        let mut buf = BytesMut::from(&b"tok"[..]);
        assert_eq!(take_token(&mut buf, 64, false), Ok(None));
        assert_eq!(take_token(&mut buf, 64, true), Ok(Some("tok".to_owned())));
        assert!(buf.is_empty());
    }

    #[test]
    fn token_errors() {
        assert_eq!(
            take_token(&mut BytesMut::from(&[b'a'; 10][..]), 8, false),
            Err(TokenError::TooLong { max: 8 })
        );
        assert_eq!(take_token(&mut BytesMut::from(&b"\xff\n"[..]), 8, false), Err(TokenError::NotUtf8));
        assert_eq!(take_token(&mut BytesMut::from(&b" \r\n"[..]), 8, false), Err(TokenError::Empty));
    }
}
