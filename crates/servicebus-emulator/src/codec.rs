//! Boundaries of AMQP-encoded values.
//!
//! `serde_amqp` decodes a value but does not say how many bytes it used. Frames put a
//! payload right after the performative, and messages are a run of sections, so the
//! engine needs the byte length of one encoded value before it hands the bytes to
//! `serde_amqp`. This scanner reads only constructors and size prefixes, never trusts a
//! length past the end of the buffer, and bounds the nesting of descriptors.

use thiserror::Error;

/// Why a byte run is not one well-formed AMQP value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The buffer ends before the value does.
    #[error("encoded value is truncated")]
    Truncated,
    /// A constructor byte that AMQP 1.0 does not define.
    #[error("unknown AMQP format code 0x{0:02x}")]
    UnknownFormatCode(u8),
    /// Descriptors nested deeper than any real peer sends.
    #[error("described types nested too deeply")]
    TooDeep,
    /// `serde_amqp` refused the bytes of a section or performative.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
}

const MAX_DEPTH: usize = 8;

/// Returns the number of bytes taken by the first encoded value in `buf`.
pub fn encoded_len(buf: &[u8]) -> Result<usize, CodecError> {
    encoded_len_at(buf, 0)
}

fn encoded_len_at(buf: &[u8], depth: usize) -> Result<usize, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    let code = *buf.first().ok_or(CodecError::Truncated)?;
    if code == 0x00 {
        let rest = &buf[1..];
        let descriptor = encoded_len_at(rest, depth + 1)?;
        let value = encoded_len_at(
            rest.get(descriptor..).ok_or(CodecError::Truncated)?,
            depth + 1,
        )?;
        return Ok(1 + descriptor + value);
    }
    let total = match code {
        0x40..=0x45 => 1,
        0x50..=0x56 => 2,
        0x60..=0x61 => 3,
        0x70..=0x74 => 5,
        0x80..=0x84 => 9,
        0x94 | 0x98 => 17,
        0xa0 | 0xa1 | 0xa3 | 0xc0 | 0xc1 | 0xe0 => {
            let size = *buf.get(1).ok_or(CodecError::Truncated)? as usize;
            2 + size
        }
        0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0 => {
            let bytes: [u8; 4] = buf
                .get(1..5)
                .and_then(|s| s.try_into().ok())
                .ok_or(CodecError::Truncated)?;
            5usize.saturating_add(u32::from_be_bytes(bytes) as usize)
        }
        other => return Err(CodecError::UnknownFormatCode(other)),
    };
    if total > buf.len() {
        return Err(CodecError::Truncated);
    }
    Ok(total)
}

/// Returns the numeric descriptor of a described value that starts at `buf[0]`, or `None`
/// when the value is not described by a `ulong` code.
pub fn descriptor_code(buf: &[u8]) -> Option<u64> {
    if buf.first() != Some(&0x00) {
        return None;
    }
    match buf.get(1)? {
        0x44 => Some(0),
        0x53 => buf.get(2).map(|b| u64::from(*b)),
        0x80 => buf
            .get(2..10)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes),
        0xa3 | 0xb3 => {
            let len = encoded_len(&buf[1..]).ok()?;
            let name = match buf[1] {
                0xa3 => buf.get(3..1 + len)?,
                _ => buf.get(6..1 + len)?,
            };
            symbolic_code(name)
        }
        _ => None,
    }
}

fn symbolic_code(name: &[u8]) -> Option<u64> {
    let code = match name {
        b"amqp:header:list" => 0x70,
        b"amqp:delivery-annotations:map" => 0x71,
        b"amqp:message-annotations:map" => 0x72,
        b"amqp:properties:list" => 0x73,
        b"amqp:application-properties:map" => 0x74,
        b"amqp:data:binary" => 0x75,
        b"amqp:amqp-sequence:list" => 0x76,
        b"amqp:amqp-value:*" => 0x77,
        b"amqp:footer:map" => 0x78,
        _ => return None,
    };
    Some(code)
}

/// Decodes `bytes` with `serde_amqp`, naming the item in the error.
pub fn decode<'de, T: serde::Deserialize<'de>>(
    what: &'static str,
    bytes: &'de [u8],
) -> Result<T, CodecError> {
    serde_amqp::from_slice(bytes).map_err(|e| CodecError::Decode {
        what,
        reason: e.to_string(),
    })
}

/// Encodes `value` with `serde_amqp`. Our own types always encode, so a failure is a bug
/// worth reporting rather than a peer's fault.
pub fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    serde_amqp::to_vec(value).map_err(|e| CodecError::Decode {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_variable_widths() {
        assert_eq!(encoded_len(&[0x40]), Ok(1));
        assert_eq!(encoded_len(&[0x52, 7, 9]), Ok(2));
        assert_eq!(encoded_len(&[0xa1, 2, b'h', b'i']), Ok(4));
        assert_eq!(encoded_len(&[0xa1, 3, b'h']), Err(CodecError::Truncated));
        assert_eq!(encoded_len(&[0x00, 0x53, 0x70, 0x45]), Ok(4));
        assert_eq!(descriptor_code(&[0x00, 0x53, 0x70, 0x45]), Some(0x70));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = vec![0u8; 64];
        assert_eq!(encoded_len(&deep), Err(CodecError::TooDeep));
        assert_eq!(
            encoded_len(&[0xff]),
            Err(CodecError::UnknownFormatCode(0xff))
        );
    }
}
